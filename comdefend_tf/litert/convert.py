"""Conversion of a ComDefend purifier to a LiteRT (``.tflite``) flatbuffer, and its op report.

``convert(purifier, variant, image_size, noise_std, representative_images)`` returns the model
bytes. The converted function is the served purify core (``serving.signatures``) at one fixed
height and width and any batch: float32 ``images [batch, H, W, C]`` in [0, 1] ->
``purified`` float32 ``[batch, H, W, C]`` and ``code_bits`` uint8 ``[batch, H, W, code]``.

Noise: with ``noise_std > 0`` the code noise is the builtin ``RANDOM_STANDARD_NORMAL`` op with
seed 0/0 (no Select TF ops): the LiteRT kernel seeds each op from a per-process generator that
``/dev/urandom`` seeds, when the interpreter prepares the op, and advances per call; so draws are
fresh per call and per interpreter (docs/litert.md says what that seeding does not give).
Variants: ``float32``; ``float16`` (weights stored in float16, computed in float32);
``dynamic_int8`` (int8 weights, activations quantized on the fly); ``full_int8`` (int8
weights and activations calibrated on ``representative_images``; inputs and outputs stay
float32, ops without an int8 kernel (the random draw) stay float islands).
``litert.ops.op_report`` reads a converted model's op list: which ops compute in int8.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import convert_to_constants

from comdefend_tf.model import ComDefend

VARIANTS = ("float32", "float16", "dynamic_int8", "full_int8")
INPUT_IMAGES = "images"
OUTPUT_PURIFIED = "purified"
OUTPUT_CODE_BITS = "code_bits"
# Tensor dtypes that count as quantized computation in the op report (int16 for 16x8 schemes);
# uint8 is left out: the only uint8 tensor is the code-bits output (a cast of a bool).


def purify_function(purifier: ComDefend, image_size: Sequence[int],
                    noise_std: float) -> tf.types.experimental.ConcreteFunction:
    """The purify core at ``image_size`` (height, width) with frozen weights.

    The graph is ``purifier.forward`` with an explicit noise tensor, as the serving export
    builds it: ``noise_std * RandomStandardNormal(seed=0, seed2=0)`` when ``noise_std > 0``,
    zeros otherwise (the model's own seeded ``CodeNoise`` never draws here). Weights are frozen
    to constants: the converter otherwise keeps Keras 3 variables as resource variables that
    the interpreter cannot read.
    """
    height, width = (int(side) for side in image_size)
    config = purifier.config

    def purify(images):
        # Shape from the input, not the constant size: the runtime may resize the input.
        code_shape = tf.concat([tf.shape(images)[:3], [config.code_channels]], 0)
        if noise_std > 0:
            noise = noise_std * tf.raw_ops.RandomStandardNormal(
                shape=code_shape, dtype=tf.float32, seed=0, seed2=0)
        else:
            noise = tf.zeros([], tf.float32)
        outputs = purifier.forward(images, training=False, noise=noise)
        return {OUTPUT_PURIFIED: tf.cast(outputs["purified"], tf.float32),
                OUTPUT_CODE_BITS: tf.cast(outputs["noisy_logits"] > 0, tf.uint8)}

    spec = tf.TensorSpec([None, height, width, config.input_channels], tf.float32,
                         name=INPUT_IMAGES)
    concrete = tf.function(purify, input_signature=[spec]).get_concrete_function()
    return convert_to_constants.convert_variables_to_constants_v2(concrete)


def _representative(images: np.ndarray) -> Iterable:
    def generate():
        for image in images:
            yield [image[None].astype(np.float32)]
    return generate


def convert(purifier: ComDefend, variant: str, image_size: Sequence[int],
            noise_std: float, representative_images: np.ndarray | None = None) -> bytes:
    """The ``.tflite`` bytes of ``purifier`` in ``variant`` (see the module docstring).

    Args:
      purifier: a ComDefend model (float32 weights are used as they are).
      variant: one of ``VARIANTS``.
      image_size: (height, width) of every image the file accepts, each >= 1.
      noise_std: the code noise std drawn per call; 0 converts a noise-free purifier.
      representative_images: float32 ``[n, H, W, C]`` in [0, 1], n >= 1, at ``image_size``;
        required for ``full_int8`` (calibration), ignored otherwise.

    Raises:
      ValueError: unknown variant, bad image size, negative noise, or missing / wrongly shaped
        representative images.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if len(image_size) != 2 or min(int(side) for side in image_size) < 1:
        raise ValueError(f"image_size must be (height, width) >= 1, got {tuple(image_size)}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [purify_function(purifier, image_size, noise_std)], tf.Module())
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "dynamic_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant == "full_int8":
        expected = (*map(int, image_size), purifier.config.input_channels)
        if representative_images is None or len(representative_images) == 0:
            raise ValueError("full_int8 needs representative images for calibration; got none")
        representative_images = np.asarray(representative_images, np.float32)
        if representative_images.ndim != 4 or representative_images.shape[1:] != expected:
            raise ValueError(f"representative images must be [n, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}]; got shape {representative_images.shape}")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative(representative_images)
        # int8 kernels where they exist, float builtins for the rest (the random draw): no
        # Select TF ops either way. Inputs and outputs stay float32 ([0, 1] images).
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                               tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


EXPORT_METADATA_MAX_BYTES = 2**20


def purifier_from_saved_model(version_dir: str) -> tuple[ComDefend, dict]:
    """The float ComDefend inside a serving export version (``serving.export``), with the
    export's metadata (``comdefend_export.json``).

    The purifier is rebuilt from the metadata's config and its weights are copied from the
    SavedModel's variables (the purifier is the first object the export tracks); the copy is
    accepted only if its ``weights_fingerprint`` equals the metadata's ``purifier_fingerprint``.

    Raises:
      FileNotFoundError: no export metadata in ``version_dir``.
      ValueError: unreadable metadata or SavedModel, or weights that do not match it.
    """
    from comdefend_tf.io import bounded
    from comdefend_tf.serving.export import EXPORT_METADATA_FILENAME
    from comdefend_tf.training import provenance

    metadata_path = os.path.join(version_dir, EXPORT_METADATA_FILENAME)
    if not os.path.isfile(metadata_path):
        raise FileNotFoundError(f"no SavedModel export at {version_dir!r} (expected "
                                f"{EXPORT_METADATA_FILENAME} in an export version folder)")
    try:
        metadata = json.loads(bounded.read_regular_file(metadata_path,
                                                        EXPORT_METADATA_MAX_BYTES))
        purifier = ComDefend(metadata["comdefend_config"])
        expected = metadata["purifier_fingerprint"]
    except (ValueError, KeyError, TypeError, OSError, bounded.FileReadError) as error:
        raise ValueError(f"unreadable export metadata {metadata_path!r}: {error}") from None
    try:
        loaded = tf.saved_model.load(version_dir)
    except Exception as error:  # TensorFlow raises many types for a damaged SavedModel
        raise ValueError(f"cannot load the SavedModel at {version_dir!r}: {error}") from None
    weights = purifier.weights
    variables = list(getattr(loaded, "variables", []))[:len(weights)]
    if len(variables) != len(weights) or any(
            tuple(v.shape) != tuple(w.shape) for v, w in zip(variables, weights)):
        raise ValueError(f"the SavedModel at {version_dir!r} does not hold the variables of "
                         "the purifier its metadata describes")
    for weight, variable in zip(weights, variables):
        weight.assign(variable.numpy())
    if provenance.weights_fingerprint(purifier) != expected:
        raise ValueError(f"the weights read from {version_dir!r} do not match the export's "
                         "purifier_fingerprint")
    return purifier, metadata
