"""The authors' released ComDefend weights, imported into a ``ComDefend`` without running any
code a file might contain.

* ``read_weight_file(path) -> WeightFile``: one released file (an ``np.savez_compressed`` zip
  named ``.npy`` whose member ``w.npy`` is an object array of 18 float arrays, ``[W1, b1, ...,
  W9, b9]``, kernels HWIO ``(3, 3, in, out)``), read once -> 18 finite float32 arrays and the
  sha256 of the bytes that were parsed (``read_weight_arrays`` returns the arrays alone). The
  zip is read by ``safe_zip``, the member by ``pickle_reader``; neither uses ``zipfile``,
  ``pickle.load`` or ``np.load(allow_pickle=True)``. At most ``MAX_CONVERTED_BYTES`` of float32
  are produced from one file.
* ``read_reference_pair`` reads both files and infers their architecture
  (``architectures.infer_architecture``); ``load_reference_model`` builds the matching
  ``ComDefend`` and copies the arrays in with ``assign_weights`` (no transposition); its
  provenance records the sha256 of the bytes read, never of a second opening of the path.

Errors: ``FileNotFoundError`` for a missing path, ``ReferenceWeightsError`` (a ``ValueError``
naming the file, and the layer where one applies) for everything else. No file, however
crafted, ends in a ``zipfile``, ``zlib``, ``pickle`` or ``numpy`` exception.
docs/internals/weights.md holds the format, every limit and the measured parity.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from comdefend_tf.weights.architectures import infer_architecture, largest_network_float32_bytes
from comdefend_tf.weights.errors import ReferenceWeightsError
from comdefend_tf.weights.pickle_reader import object_array_entries
from comdefend_tf.weights.safe_zip import read_weights_member

# sha256 of the authors' files at jiaxiaojunQAQ/Comdefend commit 6cd8b4e, used only to record
# provenance (an unknown hash is still loaded if its shapes fit).
RELEASED_FILES_SHA256 = {
    "14ad4726c517982d2c74b809bf1fd623f8abbe887d15e8b24f3a5dee2bb504d5": "enc20_0.0001.npy",
    "d2df77581e5913c126a30c943acb29bbada6beb942a189652c4f726d7a98ecf7": "dec20_0.0001.npy",
    "0a68830c61e364189e8f2c81d742425af34bb7c5119601bab08710454cd4114b": "enc_mnist.npy",
    "54a4eec163bc7d4c7447acb63b9d0a2b0736c2f89c588ebd57e441d93525b651": "dec_mnist.npy",
}
RELEASE_SOURCE = "jiaxiaojunQAQ/Comdefend@6cd8b4e"

# float32 bytes one file may be converted into: CONVERTED_BYTES_FACTOR times the largest
# network a known architecture has (about 3.3 MB, so about 13 MB). No file beyond it could fit
# an architecture; the factor only keeps the layer-by-layer message for files slightly off.
CONVERTED_BYTES_FACTOR = 4
MAX_CONVERTED_BYTES = CONVERTED_BYTES_FACTOR * largest_network_float32_bytes()


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """One weight file as read: ``arrays`` (finite float32, file order), ``sha256`` (hex, of
    the file bytes those arrays were parsed from) and ``path``."""

    path: str
    arrays: list
    sha256: str


def read_weight_file(path: str) -> WeightFile:
    """Reads one released weight file once, without running any code it might contain.

    Args:
      path: a ``.npy``-named ``np.savez_compressed`` (or ``np.savez``) zip archive whose one
        member ``w.npy`` is an object array of float16/32/64 arrays (the release's format).
        ``safe_zip`` and ``pickle_reader`` list every limit and what is refused.

    Returns:
      a ``WeightFile``: the arrays in file order (kernels and biases alternating), each float32
      and finite, and the sha256 of the file bytes they were parsed from.

    Raises:
      FileNotFoundError: no file at ``path``.
      ReferenceWeightsError: anything else: not a regular file, too large, not a zip archive
        (a plain .npy included), not exactly one ``w`` member, encrypted, compressed other than
        stored/deflate, corrupt, truncated, inflating beyond its declared size, a pickle
        opcode, global, call, dtype or shape a released file does not hold, an array listed
        twice or empty, more than ``MAX_CONVERTED_BYTES`` once converted to float32, or
        non-finite values. The message names the file and the problem.
    """
    member = read_weights_member(path)
    entries = object_array_entries(member.data, path)
    # Counted before anything is converted: float16 doubles, and no file beyond this could
    # fit a known architecture anyway.
    converted = 4 * sum(entry.size for entry in entries)
    if converted > MAX_CONVERTED_BYTES:
        raise ReferenceWeightsError(
            f"{path}: its {len(entries)} arrays hold {converted} bytes as float32, more than the "
            f"{MAX_CONVERTED_BYTES} a weight file may (the largest released network holds "
            f"{largest_network_float32_bytes()}): a memory amplification or no ComDefend")
    arrays = []
    for index, entry in enumerate(entries):
        entry = entry.astype(np.float32, copy=False)
        if not np.all(np.isfinite(entry)):
            raise ReferenceWeightsError(f"{path}: entry {index} holds non-finite values")
        arrays.append(entry)
    return WeightFile(path, arrays, member.sha256)


def read_weight_arrays(path: str) -> list[np.ndarray]:
    """The arrays of ``read_weight_file(path)``: 18 finite float32 arrays for a released file
    (same errors)."""
    return read_weight_file(path).arrays


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


def read_reference_pair(encoder_path: str, decoder_path: str):
    """Reads both files and infers their architecture: every check of the import but the model.

    Returns ``(architecture, encoder_file, decoder_file)`` (a ``KnownArchitecture`` and two
    ``WeightFile``s of 18 float32 arrays each). Raises ``FileNotFoundError`` or
    ``ReferenceWeightsError`` (see ``read_weight_file`` and ``infer_architecture``); builds no
    model.
    """
    encoder_file = read_weight_file(encoder_path)
    decoder_file = read_weight_file(decoder_path)
    architecture = infer_architecture(encoder_file.arrays, decoder_file.arrays, encoder_path,
                                      decoder_path)
    return architecture, encoder_file, decoder_file


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
    architecture, encoder_file, decoder_file = read_reference_pair(encoder_path, decoder_path)
    changes = {"inference_noise_std": float(inference_noise_std)}
    if inference_mode is not None:
        changes["inference_mode"] = inference_mode
    config = architecture.config.replace(**changes)

    from comdefend_tf.model import ComDefend  # keeps this module importable without keras

    model = ComDefend(config, seed=seed)
    assign_weights(model, encoder_file.arrays, decoder_file.arrays)
    provenance = {"architecture": architecture.label, "config_name": config.name}
    for role, weight_file in (("encoder", encoder_file), ("decoder", decoder_file)):
        digest = weight_file.sha256  # of the bytes loaded: the path is not opened again
        provenance[f"{role}_file"] = os.path.abspath(weight_file.path)
        provenance[f"{role}_sha256"] = digest
        provenance[f"{role}_parameters"] = int(sum(a.size for a in weight_file.arrays))
        provenance[f"{role}_released_as"] = (
            f"{RELEASED_FILES_SHA256[digest]} ({RELEASE_SOURCE})"
            if digest in RELEASED_FILES_SHA256 else None)
    return model, provenance
