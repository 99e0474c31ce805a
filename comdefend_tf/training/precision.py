"""Numeric precision for ComDefend: float32, bfloat16 (Keras ``mixed_bfloat16``) or ``auto``.

The paper network costs about 3.1 MFLOP per pixel, so its speed is set by the convolutions'
arithmetic. CPUs with bf16 dot-product units (``avx512_bf16``, ``amx_bf16``) and GPUs of compute
capability 8.0 or newer run those convolutions faster in bfloat16. Under Keras'
``mixed_bfloat16`` policy the variables stay float32 and only the computation is bfloat16.

What stays float32 under ``mixed_bfloat16`` (``comdefend_tf.model`` gives both output
convolutions a float32 policy): the code logits, so the binarizer's threshold ``logit > 0`` is
taken on float32 values, and the final sigmoid, so ``purified`` is float32 in (0, 1) whatever
the policy. The code bits themselves are exact 0/1 in either dtype.

Choosing:

* ``float32``: the reference precision.
* ``bfloat16``: mixed precision, whether or not the hardware has bf16 units (on hardware
  without them it runs, usually slower).
* ``auto``: bfloat16 only where ``bf16_hardware_support`` finds bf16 units *and*, when a model
  and images are at hand, ``quality_check`` finds the bf16 purifier within
  ``MAX_PSNR_DROP_DB`` of float32's reconstruction PSNR with at most ``MAX_BIT_FLIP_FRACTION``
  of the code bits flipped; float32 otherwise.

A float32-trained model runs in bf16 by building the same architecture under the policy and
copying its weights (``convert_model``); ``ComDefend.from_config`` rebuilds its layers, so a
``.keras`` file loaded while the policy is set (``apply_precision``, ``policy_scope``) also
comes back in bf16.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import keras
import numpy as np

from comdefend_tf.config import ComDefendConfig
from comdefend_tf.model import ComDefend, psnr

PRECISIONS = ("float32", "bfloat16", "auto")
KERAS_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
MIN_GPU_COMPUTE_CAPABILITY = (8, 0)
MAX_PSNR_DROP_DB = 0.2
MAX_BIT_FLIP_FRACTION = 0.01


def _check_name(precision: str, allowed=PRECISIONS) -> None:
    if precision not in allowed:
        raise ValueError(f"precision must be one of {', '.join(allowed)}, got {precision!r}")


# ------------------------------------------------------------------------ hardware detection
def cpu_bf16_flags(cpuinfo_path: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The bf16 instruction-set flags (``CPU_BF16_FLAGS``) the CPU reports, sorted; empty when
    there are none or ``cpuinfo_path`` cannot be read (not Linux)."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    reported = set(line.split(":", 1)[1].split())
                    return tuple(sorted(reported.intersection(CPU_BF16_FLAGS)))
    except OSError:
        pass
    return ()


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """``(major, minor)`` compute capability of each visible GPU (empty without GPUs)."""
    import tensorflow as tf  # device queries are TensorFlow's; the rest of this module is not

    capabilities = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        if capability:
            capabilities.append(tuple(int(part) for part in capability))
    return capabilities


def bf16_hardware_support(cpuinfo_path: str = "/proc/cpuinfo") -> tuple[bool, str]:
    """Whether this machine has bf16 arithmetic units, and a sentence saying why.

    True for any GPU of compute capability >= 8.0, or a CPU reporting ``amx_bf16`` or
    ``avx512_bf16`` in ``cpuinfo_path``.
    """
    capabilities = gpu_compute_capabilities()
    fast_gpus = [c for c in capabilities if c >= MIN_GPU_COMPUTE_CAPABILITY]
    if fast_gpus:
        return True, f"GPU with compute capability {fast_gpus[0][0]}.{fast_gpus[0][1]}"
    flags = cpu_bf16_flags(cpuinfo_path)
    if capabilities:
        return False, (f"GPU compute capability {capabilities[0][0]}.{capabilities[0][1]} is "
                       f"below {MIN_GPU_COMPUTE_CAPABILITY[0]}.{MIN_GPU_COMPUTE_CAPABILITY[1]}")
    if flags:
        return True, f"CPU flags {', '.join(flags)}"
    return False, f"no GPU and the CPU reports none of {', '.join(CPU_BF16_FLAGS)}"


# --------------------------------------------------------------------- policies and models
@contextlib.contextmanager
def policy_scope(precision: str) -> Iterator[str]:
    """Sets the Keras global dtype policy for ``float32`` or ``bfloat16`` inside the block and
    restores the previous one after it; yields the policy name. Layers built inside keep it."""
    _check_name(precision, tuple(KERAS_POLICIES))
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(KERAS_POLICIES[precision])
    try:
        yield KERAS_POLICIES[precision]
    finally:
        keras.mixed_precision.set_global_policy(previous)


def model_precision(model: ComDefend) -> str:
    """``bfloat16`` if the model's encoder computes in bfloat16, else ``float32``."""
    compute_dtype = model.encoder.get_layer("comcnn_conv1").compute_dtype
    return "bfloat16" if compute_dtype == "bfloat16" else "float32"


def build_comdefend(config: ComDefendConfig, precision: str = "float32",
                    seed: int | None = None) -> ComDefend:
    """A new ComDefend whose convolutions compute in ``precision`` (float32 variables either
    way; inputs float32 or bfloat16 ``[B, H, W, C]`` in [0, 1], outputs always float32)."""
    with policy_scope(precision):
        return ComDefend(config, seed=seed)


def convert_model(model: ComDefend, precision: str, noise_seed: int | None = None) -> ComDefend:
    """``model`` running in ``precision``: the model itself when it already does, otherwise a
    new ComDefend of the same config and name holding a copy of its weights, its noise seeded
    by ``noise_seed`` (None: the model's seed)."""
    _check_name(precision, tuple(KERAS_POLICIES))
    if model_precision(model) == precision:
        return model
    with policy_scope(precision):
        converted = ComDefend(model.config, name=model.name,
                              seed=model.seed if noise_seed is None else noise_seed)
    converted.set_weights(model.get_weights())
    return converted


# --------------------------------------------------------------------------- quality check
@dataclasses.dataclass(frozen=True)
class QualityReport:
    """bf16 against float32 on the same images (inference settings of the model).

    psnr_float32_db / psnr_bfloat16_db: mean per-image reconstruction PSNR (dB) of each;
    psnr_drop_db: float32 minus bfloat16 (positive: bf16 is worse);
    bit_flip_fraction: share of code bits that differ between the two;
    max_abs_difference: largest |purified_bf16 - purified_float32| (images in [0, 1]);
    passed: both within the limits the check was run with.
    """

    num_images: int
    psnr_float32_db: float
    psnr_bfloat16_db: float
    psnr_drop_db: float
    bit_flip_fraction: float
    max_abs_difference: float
    passed: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def quality_check(model: ComDefend, images, batch_size: int = 64,
                  max_psnr_drop_db: float = MAX_PSNR_DROP_DB,
                  max_bit_flip_fraction: float = MAX_BIT_FLIP_FRACTION,
                  bf16_model: ComDefend | None = None) -> QualityReport:
    """Compares the bf16 version of ``model`` with its float32 version on ``images``.

    Args:
      model: a ComDefend model (either precision; both versions are derived from its weights).
      images: float ``[n, H, W, C]`` in [0, 1], real images (random noise says little).
      batch_size: images per forward pass.
      max_psnr_drop_db / max_bit_flip_fraction: the limits for ``passed``.
      bf16_model: an already converted bf16 model to reuse (saves a conversion).

    Uses the model's inference noise; for a meaningful comparison that should be 0 (the check
    then compares deterministic purifiers).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty [n, H, W, C] array, got shape "
                         f"{images.shape}")
    float_model = convert_model(model, "float32")
    bf16_model = bf16_model or convert_model(model, "bfloat16")
    psnr_float, psnr_bf16, flips, bits, max_difference = [], [], 0, 0, 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        outputs = {}
        for label, candidate in (("float32", float_model), ("bfloat16", bf16_model)):
            forward = candidate.forward(batch, training=False, mode="hard")
            # The decoder of a soft-mode model sees soft codes; compare its own output too.
            purified = (candidate(batch, training=False)
                        if candidate.config.inference_mode != "hard" else forward["purified"])
            outputs[label] = (np.asarray(keras.ops.convert_to_numpy(forward["code"]),
                                         np.float32),
                              np.asarray(keras.ops.convert_to_numpy(purified), np.float32))
        (bits_float, purified_float), (bits_bf16, purified_bf16) = (outputs["float32"],
                                                                    outputs["bfloat16"])
        flips += int(np.count_nonzero(bits_float != bits_bf16))
        bits += bits_float.size
        max_difference = max(max_difference,
                             float(np.max(np.abs(purified_float - purified_bf16))))
        psnr_float.append(keras.ops.convert_to_numpy(psnr(batch, purified_float)))
        psnr_bf16.append(keras.ops.convert_to_numpy(psnr(batch, purified_bf16)))
    mean_float = float(np.mean(np.concatenate(psnr_float)))
    mean_bf16 = float(np.mean(np.concatenate(psnr_bf16)))
    drop = mean_float - mean_bf16
    flip_fraction = flips / bits
    return QualityReport(
        num_images=len(images), psnr_float32_db=mean_float, psnr_bfloat16_db=mean_bf16,
        psnr_drop_db=drop, bit_flip_fraction=flip_fraction, max_abs_difference=max_difference,
        passed=bool(drop <= max_psnr_drop_db and flip_fraction <= max_bit_flip_fraction))


# ---------------------------------------------------------------- entry points for binaries
def apply_precision(precision: str, cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """Sets the process-wide Keras policy for ``--precision`` and returns the one chosen.

    For binaries that build new models (training): ``auto`` becomes ``bfloat16`` where
    ``bf16_hardware_support`` finds bf16 units and ``float32`` elsewhere (no trained model
    exists yet to run the quality check on). Models built or loaded afterwards use the
    policy; binaries that purify with a trained model use ``select_for_inference`` instead.
    """
    precision = resolve_by_hardware(precision, cpuinfo_path)
    keras.mixed_precision.set_global_policy(KERAS_POLICIES[precision])
    return precision


def resolve_by_hardware(precision: str, cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """``precision`` with ``auto`` made ``bfloat16`` where ``bf16_hardware_support`` finds bf16
    units, else ``float32`` (no model quality check: for new models and attack searches)."""
    _check_name(precision)
    if precision != "auto":
        return precision
    return "bfloat16" if bf16_hardware_support(cpuinfo_path)[0] else "float32"


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    """What ``select_for_inference`` chose and why.

    model: the ComDefend to run (float32 outputs either way); precision: ``float32`` or
    ``bfloat16``; reason: one sentence; quality: the ``QualityReport`` when one was run.
    """

    model: ComDefend
    precision: str
    reason: str
    quality: QualityReport | None = None


def select_for_inference(model: ComDefend, precision: str, images=None,
                         cpuinfo_path: str = "/proc/cpuinfo") -> PrecisionChoice:
    """The purifier to run for ``--precision`` (for evaluation, export and purification).

    ``float32``/``bfloat16`` convert ``model`` unconditionally. ``auto`` picks bfloat16 only
    when the hardware has bf16 units and, given ``images`` (float ``[n, H, W, C]`` in [0, 1],
    a few dozen real ones suffice), ``quality_check`` passes; without images it stays float32,
    because bf16 is never made the default unchecked.
    """
    _check_name(precision)
    if precision != "auto":
        return PrecisionChoice(convert_model(model, precision), precision,
                               f"--precision={precision} requested")
    supported, hardware = bf16_hardware_support(cpuinfo_path)
    if not supported:
        return PrecisionChoice(convert_model(model, "float32"), "float32",
                               f"no bf16 hardware ({hardware})")
    if images is None:
        return PrecisionChoice(convert_model(model, "float32"), "float32",
                               "bf16 hardware found but no images to check quality on")
    bf16_model = convert_model(model, "bfloat16")
    report = quality_check(model, images, bf16_model=bf16_model)
    verdict = (f"PSNR drop {report.psnr_drop_db:.3f} dB (limit {MAX_PSNR_DROP_DB}), "
               f"{100 * report.bit_flip_fraction:.3f} % code bits flipped "
               f"(limit {100 * MAX_BIT_FLIP_FRACTION:g} %) on {report.num_images} images")
    if report.passed:
        return PrecisionChoice(bf16_model, "bfloat16", f"{hardware}; {verdict}", report)
    return PrecisionChoice(convert_model(model, "float32"), "float32",
                           f"{hardware} but the quality check failed: {verdict}", report)
