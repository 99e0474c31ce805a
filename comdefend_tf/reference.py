"""The authors' released ComDefend weights: a safe reader and the import into ``ComDefend``.

The authors (jiaxiaojunQAQ/Comdefend, TensorFlow 1) released one file per network, e.g.
``enc20_0.0001.npy`` (ComCNN) and ``dec20_0.0001.npy`` (ResCNN). Despite the ``.npy`` name each
is a zip archive in ``np.savez_compressed`` format whose single member ``w.npy`` is an object
array of 18 float32 arrays ``[W1, b1, ..., W9, b9]``: one kernel/bias pair per 3x3 convolution,
first layer first, kernels already in Keras' HWIO layout ``(3, 3, in, out)``.

An object array is a pickle, and unpickling a file a user hands us could run arbitrary code, so
``read_weight_arrays`` never calls ``np.load(..., allow_pickle=True)``. It parses the ``.npy``
header itself and unpickles the payload with a restricted unpickler that resolves only the
few numpy globals such a file needs (``ALLOWED_GLOBALS``); any other global (``os.system``,
``builtins.eval``, ...) raises ``ReferenceWeightsError`` before it is called.

``load_reference_model`` infers which released architecture the files hold (``paper`` widths
with RGB or 1-channel input, or the ``released_gray`` widths) from the array shapes and loads
them into a ``ComDefend`` with ``set_weights``, no transposition. Errors name the file and the
layer. The module also holds the two uint8 conversions (the release's truncation and our
rounding) and code-logit statistics (how binary a code is).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import zipfile
from typing import Sequence

import numpy as np

from comdefend_tf.config import ComDefendConfig, get_config
from comdefend_tf.image_io import to_uint8 as round_to_uint8  # our rounding, for comparison

WEIGHTS_MEMBER = "w.npy"
CONVOLUTIONS_PER_NETWORK = 9
ARRAYS_PER_NETWORK = 2 * CONVOLUTIONS_PER_NETWORK
# A released file unpacks to about 3.5 MB; refuse members that would unpack to far more (a
# zip bomb) before reading them.
MAX_MEMBER_BYTES = 512 * 1024 * 1024

# sha256 of the authors' files at jiaxiaojunQAQ/Comdefend commit 6cd8b4e, used only to record
# provenance (an unknown hash is still loaded if its shapes fit).
RELEASED_FILES_SHA256 = {
    "14ad4726c517982d2c74b809bf1fd623f8abbe887d15e8b24f3a5dee2bb504d5": "enc20_0.0001.npy",
    "d2df77581e5913c126a30c943acb29bbada6beb942a189652c4f726d7a98ecf7": "dec20_0.0001.npy",
    "0a68830c61e364189e8f2c81d742425af34bb7c5119601bab08710454cd4114b": "enc_mnist.npy",
    "54a4eec163bc7d4c7447acb63b9d0a2b0736c2f89c588ebd57e441d93525b651": "dec_mnist.npy",
}
RELEASE_SOURCE = "jiaxiaojunQAQ/Comdefend@6cd8b4e"


class ReferenceWeightsError(ValueError):
    """A weight file that cannot be read or does not fit a released architecture."""


# ------------------------------------------------------------------------ restricted unpickling
def _allowed_globals() -> dict[tuple[str, str], object]:
    import codecs

    try:  # numpy 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray

    def reconstruct(subtype, shape, dtype):
        # numpy pickles call this with shape (0,) and fill the array from the pickled state;
        # refuse anything else so a crafted file cannot make us allocate a huge array.
        if subtype is not np.ndarray or tuple(np.atleast_1d(shape)) != (0,):
            raise pickle.UnpicklingError(
                f"unexpected array reconstruction ({getattr(subtype, '__name__', subtype)}, "
                f"shape {shape})")
        return multiarray._reconstruct(subtype, shape, dtype)

    return {
        # Pickles written by numpy 1 name numpy.core; numpy 2 moved it to numpy._core.
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Protocol 2 stores raw bytes as latin-1 text re-encoded by _codecs.encode.
        ("_codecs", "encode"): codecs.encode,
    }


ALLOWED_GLOBALS = tuple(sorted(_allowed_globals()))


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``ALLOWED_GLOBALS``; everything else is refused before it is called."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._globals = _allowed_globals()

    def find_class(self, module, name):
        try:
            return self._globals[module, name]
        except KeyError:
            raise ReferenceWeightsError(
                f"{self._source}: refusing to unpickle the global {module}.{name}; a weight "
                f"file may only reference {', '.join('.'.join(g) for g in ALLOWED_GLOBALS)}. "
                f"The file is not a released ComDefend weight file (it may try to run code)."
            ) from None

    def persistent_load(self, pid):
        raise ReferenceWeightsError(f"{self._source}: persistent ids are not allowed in a "
                                    f"weight file")


def _unpickle_npy_object_array(payload: bytes, source: str) -> np.ndarray:
    """Parses a ``.npy`` byte string holding an object array without numpy's pickle loader."""
    stream = io.BytesIO(payload)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as error:
        raise ReferenceWeightsError(f"{source}: not a valid .npy member: {error}") from error
    if dtype != np.dtype(object):
        raise ReferenceWeightsError(
            f"{source}: expected an object array of {ARRAYS_PER_NETWORK} arrays, found a plain "
            f"{dtype} array of shape {shape}")
    try:
        loaded = _RestrictedUnpickler(stream, source).load()
    except ReferenceWeightsError:
        raise
    except Exception as error:  # a corrupt pickle raises many types
        raise ReferenceWeightsError(f"{source}: cannot unpickle the weight array: "
                                    f"{type(error).__name__}: {error}") from error
    if not isinstance(loaded, np.ndarray) or loaded.dtype != np.dtype(object):
        raise ReferenceWeightsError(f"{source}: the pickle does not hold an object array")
    if loaded.shape != tuple(shape):
        raise ReferenceWeightsError(f"{source}: header says shape {shape}, pickle holds "
                                    f"{loaded.shape}")
    return loaded


def read_weight_arrays(path: str) -> list[np.ndarray]:
    """Reads one released weight file without running any code it might contain.

    Args:
      path: a ``.npy``-named ``np.savez_compressed`` zip archive with a ``w.npy`` member (the
        release's format).

    Returns:
      the arrays in file order (kernels and biases alternating), each float32 and finite.

    Raises:
      FileNotFoundError: no file at ``path``.
      ReferenceWeightsError: not a zip archive, no ``w`` entry, a refused pickle global, or
        entries that are not finite float arrays. The message names the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weight file at {path!r}")
    if not zipfile.is_zipfile(path):
        raise ReferenceWeightsError(
            f"{path}: not an npz (zip) archive; the authors' weight files are np.savez_compressed "
            f"archives named .npy with one member {WEIGHTS_MEMBER!r}")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if WEIGHTS_MEMBER not in names:
            raise ReferenceWeightsError(
                f"{path}: the archive has no 'w' entry (members: {names}); the authors' weight "
                f"files hold the arrays in {WEIGHTS_MEMBER!r}")
        info = archive.getinfo(WEIGHTS_MEMBER)
        if info.file_size > MAX_MEMBER_BYTES:
            raise ReferenceWeightsError(
                f"{path}: {WEIGHTS_MEMBER} would unpack to {info.file_size} bytes, more than the "
                f"{MAX_MEMBER_BYTES} a weight file may hold")
        payload = archive.read(WEIGHTS_MEMBER)
    entries = _unpickle_npy_object_array(payload, path)
    arrays = []
    for index, entry in enumerate(entries.ravel()):
        if not isinstance(entry, np.ndarray) or entry.dtype.kind != "f":
            kind = entry.dtype if isinstance(entry, np.ndarray) else type(entry).__name__
            raise ReferenceWeightsError(f"{path}: entry {index} is {kind}, not a float array")
        entry = entry.astype(np.float32, copy=False)
        if not np.all(np.isfinite(entry)):
            raise ReferenceWeightsError(f"{path}: entry {index} holds non-finite values")
        arrays.append(entry)
    return arrays


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------- architecture inference
@dataclasses.dataclass(frozen=True)
class KnownArchitecture:
    """One released architecture: a label and the config whose layer shapes it has."""

    label: str
    config: ComDefendConfig


def known_architectures() -> tuple[KnownArchitecture, ...]:
    """The architectures a released file may hold, most specific first."""
    return (
        KnownArchitecture("paper widths, RGB (enc20_0.0001/dec20_0.0001)", get_config("paper")),
        KnownArchitecture("released_gray widths, 1 channel (enc_mnist/dec_mnist)",
                          get_config("released_gray")),
        KnownArchitecture("paper widths, 1 channel", get_config("paper", input_channels=1)),
    )


def _stack_shapes(in_channels: int, widths: Sequence[int], out_channels: int):
    shapes, channels = [], in_channels
    for width in tuple(widths) + (out_channels,):
        shapes += [(3, 3, channels, width), (width,)]
        channels = width
    return shapes


def network_shapes(config: ComDefendConfig, network: str) -> list[tuple[int, ...]]:
    """Kernel/bias shapes, in file order, of ``network`` (``encoder`` or ``decoder``)."""
    if network == "encoder":
        return _stack_shapes(config.input_channels, config.encoder_widths, config.code_channels)
    if network == "decoder":
        return _stack_shapes(config.code_channels, config.decoder_widths, config.input_channels)
    raise ValueError(f"network must be 'encoder' or 'decoder', got {network!r}")


def _layer_name(network: str, index: int) -> str:
    prefix = "comcnn" if network == "encoder" else "rescnn"
    return f"{prefix}_conv{index // 2 + 1} {'kernel' if index % 2 == 0 else 'bias'}"


def _first_mismatch(shapes, expected) -> int | None:
    for index, (have, want) in enumerate(zip(shapes, expected)):
        if tuple(have) != tuple(want):
            return index
    return None


def _matches(shapes, config, network) -> bool:
    expected = network_shapes(config, network)
    return len(shapes) == len(expected) and _first_mismatch(shapes, expected) is None


def infer_architecture(encoder_arrays: Sequence[np.ndarray], decoder_arrays: Sequence[np.ndarray],
                       encoder_source: str = "encoder file",
                       decoder_source: str = "decoder file") -> KnownArchitecture:
    """The released architecture both files fit.

    Args:
      encoder_arrays, decoder_arrays: arrays as returned by ``read_weight_arrays``.
      encoder_source, decoder_source: names used in error messages (the file paths).

    Raises:
      ReferenceWeightsError: a wrong number of arrays, encoder and decoder swapped, the two
        files from different architectures, or a shape that fits no known architecture (naming
        the file, the layer, the shape found and the shape expected).
    """
    for arrays, source in ((encoder_arrays, encoder_source), (decoder_arrays, decoder_source)):
        if len(arrays) != ARRAYS_PER_NETWORK:
            raise ReferenceWeightsError(
                f"{source}: holds {len(arrays)} arrays, expected {ARRAYS_PER_NETWORK} (a kernel "
                f"and a bias for each of the {CONVOLUTIONS_PER_NETWORK} convolutions)")
    encoder_shapes = [a.shape for a in encoder_arrays]
    decoder_shapes = [a.shape for a in decoder_arrays]
    known = known_architectures()

    encoder_fits = [arch for arch in known if _matches(encoder_shapes, arch.config, "encoder")]
    decoder_fits = [arch for arch in known if _matches(decoder_shapes, arch.config, "decoder")]
    for arch in encoder_fits:
        if arch in decoder_fits:
            return arch

    swapped_encoder = [a for a in known if _matches(decoder_shapes, a.config, "encoder")]
    swapped_decoder = [a for a in known if _matches(encoder_shapes, a.config, "decoder")]
    if swapped_encoder and swapped_decoder:
        raise ReferenceWeightsError(
            f"encoder and decoder swapped: {encoder_source} holds a ResCNN (decoder) and "
            f"{decoder_source} holds a ComCNN (encoder); pass them the other way round")
    if swapped_decoder and not encoder_fits:
        raise ReferenceWeightsError(
            f"{encoder_source}: holds a ResCNN (decoder, {swapped_decoder[0].label}), not a "
            f"ComCNN (encoder); was the decoder file given twice or the files swapped?")
    if swapped_encoder and not decoder_fits:
        raise ReferenceWeightsError(
            f"{decoder_source}: holds a ComCNN (encoder, {swapped_encoder[0].label}), not a "
            f"ResCNN (decoder); was the encoder file given twice or the files swapped?")
    if encoder_fits and decoder_fits:
        raise ReferenceWeightsError(
            f"{encoder_source} ({encoder_fits[0].label}) and {decoder_source} "
            f"({decoder_fits[0].label}) come from different architectures")

    # Report the first layer that fits no architecture, against the closest candidate.
    for shapes, source, network in ((encoder_shapes, encoder_source, "encoder"),
                                    (decoder_shapes, decoder_source, "decoder")):
        if any(_matches(shapes, arch.config, network) for arch in known):
            continue
        closest, closest_index = None, -1
        for arch in known:
            index = _first_mismatch(shapes, network_shapes(arch.config, network))
            if index is not None and index > closest_index:
                closest, closest_index = arch, index
        want = network_shapes(closest.config, network)[closest_index]
        raise ReferenceWeightsError(
            f"{source}: layer {_layer_name(network, closest_index)} has shape "
            f"{tuple(shapes[closest_index])}, but the closest known architecture "
            f"({closest.label}) expects {want}; the file fits no known ComDefend "
            f"{network} ({'; '.join(a.label for a in known)})")
    raise AssertionError("unreachable: every case above raises or returns")


# ----------------------------------------------------------------------------------- loading
def assign_weights(model, encoder_arrays: Sequence[np.ndarray],
                   decoder_arrays: Sequence[np.ndarray]) -> None:
    """Copies released arrays into ``model.encoder`` / ``model.decoder`` convolutions in order.

    Kernels go in unchanged: the release already uses Keras' HWIO layout and TensorFlow's
    cross-correlation. Raises ``ReferenceWeightsError`` naming the layer on a shape mismatch.
    """
    for network_model, arrays, prefix in ((model.encoder, encoder_arrays, "comcnn"),
                                          (model.decoder, decoder_arrays, "rescnn")):
        for index in range(len(arrays) // 2):
            layer = network_model.get_layer(f"{prefix}_conv{index + 1}")
            kernel, bias = arrays[2 * index], arrays[2 * index + 1]
            have = [tuple(w.shape) for w in layer.get_weights()]
            if have != [kernel.shape, bias.shape]:
                raise ReferenceWeightsError(
                    f"layer {layer.name}: model expects {have}, file holds "
                    f"{[kernel.shape, bias.shape]}")
            layer.set_weights([kernel, bias])


def load_reference_model(encoder_path: str, decoder_path: str,
                         inference_noise_std: float = 0.0, inference_mode: str | None = None,
                         seed: int | None = None):
    """Builds the matching ``ComDefend`` and loads the authors' weights into it.

    Args:
      encoder_path: the ComCNN file (``enc20_0.0001.npy`` or ``enc_mnist.npy``).
      decoder_path: the ResCNN file (``dec20_0.0001.npy`` or ``dec_mnist.npy``).
      inference_noise_std: standard deviation of the test-time code noise (the release ran with
        1.0; 0 is deterministic).
      inference_mode: ``hard`` or ``soft``; None keeps the architecture's default (``hard``
        for the RGB release, ``soft`` for the Fashion-MNIST release, as the authors ran them).
      seed: seed of the inference noise.

    Returns:
      ``(model, provenance)``: the ``ComDefend`` (float32 images ``[B, H, W, C]`` in [0, 1]
      -> purified, same shape) and a JSON-serialisable dict describing the source files.
    """
    encoder_arrays = read_weight_arrays(encoder_path)
    decoder_arrays = read_weight_arrays(decoder_path)
    architecture = infer_architecture(encoder_arrays, decoder_arrays, encoder_path, decoder_path)
    changes = {"inference_noise_std": float(inference_noise_std)}
    if inference_mode is not None:
        changes["inference_mode"] = inference_mode
    config = architecture.config.replace(**changes)

    from comdefend_tf.model import ComDefend  # keeps this module importable without keras

    model = ComDefend(config, seed=seed)
    assign_weights(model, encoder_arrays, decoder_arrays)
    provenance = {"architecture": architecture.label, "config_name": config.name}
    for role, path, arrays in (("encoder", encoder_path, encoder_arrays),
                               ("decoder", decoder_path, decoder_arrays)):
        digest = file_sha256(path)
        provenance[f"{role}_file"] = os.path.abspath(path)
        provenance[f"{role}_sha256"] = digest
        provenance[f"{role}_parameters"] = int(sum(a.size for a in arrays))
        provenance[f"{role}_released_as"] = (
            f"{RELEASED_FILES_SHA256[digest]} ({RELEASE_SOURCE})"
            if digest in RELEASED_FILES_SHA256 else None)
    return model, provenance


# ------------------------------------------------------------------ uint8 conversion, statistics
def truncate_to_uint8(images) -> np.ndarray:
    """The release's conversion: ``(y * 255).astype(uint8)`` in float32 (truncation).

    ``images``: float array in [0, 1]; returns uint8 of the same shape. Biased low by half a
    grey level on average; use ``round_to_uint8`` (``image_io.to_uint8``) for anything but
    reproducing their files.
    """
    scaled = np.asarray(images, dtype=np.float32) * np.float32(255)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def uint8_agreement(ours, theirs) -> dict[str, float]:
    """How closely two uint8 images (same shape) agree.

    Returns ``exact`` (fraction of equal values), ``mean_abs`` (mean absolute difference in
    1/255 units), ``within_1`` (fraction at most 1 apart), ``max_abs`` and ``psnr_db`` (PSNR of
    one against the other on 0..255; inf when identical).
    """
    ours = np.asarray(ours)
    theirs = np.asarray(theirs)
    if ours.shape != theirs.shape:
        raise ValueError(f"shapes differ: {ours.shape} vs {theirs.shape}")
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return {"exact": float(np.mean(diff == 0)), "mean_abs": float(np.mean(diff)),
            "within_1": float(np.mean(diff <= 1)), "max_abs": int(diff.max()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))}


def code_statistics(code_logits) -> dict[str, float]:
    """How binary a code is, from its logits (any shape, float).

    Returns ``values``, ``median_abs`` (median |logit|), ``below_1`` and ``below_0_1`` (fractions
    with |logit| < 1 and < 0.1: bits that a little noise or a rounding error can flip),
    ``max_abs``, ``ones`` (fraction of bits set at sigma 0) and ``flip_rate_sigma1`` (expected
    fraction of bits flipped by N(0, 1) inference noise: mean of Phi(-|logit|)).
    """
    from math import erfc, sqrt

    logits = np.asarray(code_logits, dtype=np.float64).ravel()
    magnitude = np.abs(logits)
    flip = np.vectorize(lambda v: 0.5 * erfc(v / sqrt(2.0)), otypes=[np.float64])
    # Phi(-|l|) underflows to 0 for |l| > 40; evaluate only where it can matter.
    small = magnitude[magnitude < 40.0]
    flip_rate = float(np.sum(flip(small)) / logits.size) if logits.size else 0.0
    return {"values": int(logits.size), "median_abs": float(np.median(magnitude)),
            "below_1": float(np.mean(magnitude < 1.0)),
            "below_0_1": float(np.mean(magnitude < 0.1)), "max_abs": float(magnitude.max()),
            "ones": float(np.mean(logits > 0)), "flip_rate_sigma1": flip_rate}
