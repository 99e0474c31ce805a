"""The authors' released ComDefend weights, imported into a ``ComDefend`` without running any
code a file might contain.

* ``read_weight_arrays(path)``: one released file (an ``np.savez_compressed`` zip named
  ``.npy`` whose member ``w.npy`` is an object array of 18 float arrays, ``[W1, b1, ..., W9,
  b9]``, kernels HWIO ``(3, 3, in, out)``) -> 18 finite float32 arrays. The zip is read by
  ``safe_zip``, the member by ``pickle_reader``; neither uses ``zipfile``, ``pickle.load`` or
  ``np.load(allow_pickle=True)``.
* ``read_reference_pair`` reads both files and infers their architecture
  (``architectures.infer_architecture``); ``load_reference_model`` builds the matching
  ``ComDefend`` and copies the arrays in with ``assign_weights`` (no transposition).

Errors: ``FileNotFoundError`` for a missing path, ``ReferenceWeightsError`` (a ``ValueError``
naming the file, and the layer where one applies) for everything else. No file, however
crafted, ends in a ``zipfile``, ``zlib``, ``pickle`` or ``numpy`` exception.
docs/internals/weights.md holds the format, every limit and the measured parity.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from comdefend_tf.weights.architectures import infer_architecture
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


def read_weight_arrays(path: str) -> list[np.ndarray]:
    """Reads one released weight file without running any code it might contain.

    Args:
      path: a ``.npy``-named ``np.savez_compressed`` (or ``np.savez``) zip archive whose one
        member ``w.npy`` is an object array of float16/32/64 arrays (the release's format).
        ``safe_zip`` and ``pickle_reader`` list every limit and what is refused.

    Returns:
      the arrays in file order (kernels and biases alternating), each float32 and finite.

    Raises:
      FileNotFoundError: no file at ``path``.
      ReferenceWeightsError: anything else: not a regular file, too large, not a zip archive
        (a plain .npy included), not exactly one ``w`` member, encrypted, compressed other than
        stored/deflate, corrupt, truncated, inflating beyond its declared size, a pickle
        opcode, global, call, dtype or shape a released file does not hold, or non-finite
        values. The message names the file and the problem.
    """
    payload = read_weights_member(path)
    arrays = []
    for index, entry in enumerate(object_array_entries(payload, path)):
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

    Returns ``(architecture, encoder_arrays, decoder_arrays)`` (a ``KnownArchitecture`` and two
    lists of 18 float32 arrays). Raises ``FileNotFoundError`` or ``ReferenceWeightsError``
    (see ``read_weight_arrays`` and ``infer_architecture``); builds no model.
    """
    encoder_arrays = read_weight_arrays(encoder_path)
    decoder_arrays = read_weight_arrays(decoder_path)
    architecture = infer_architecture(encoder_arrays, decoder_arrays, encoder_path, decoder_path)
    return architecture, encoder_arrays, decoder_arrays


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
    architecture, encoder_arrays, decoder_arrays = read_reference_pair(encoder_path,
                                                                       decoder_path)
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
