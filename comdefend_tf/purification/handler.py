"""The purify pipeline's Beam ``ModelHandler``: batches of same-shape images through a purifier.

A purifier is a callable float32 ``[n, H, W, C]`` in [0, 1] -> ``(purified float32 [n, H, W, C],
code_bits uint8 0/1 [n, H, W, K])``. One loader per model kind: ``load_saved_model_purifier``
(the ``purify`` signature of an export version folder) and ``load_keras_purifier`` (a ``.keras``
ComDefend, tiled exactly above its pixel budget as the purify command tiles). Beam's own
TensorFlow handlers need ``tf.keras`` and ``tensorflow_hub``; this one needs neither.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Iterable, Sequence

import numpy as np

from comdefend_tf import optional
from comdefend_tf.purification import counters
from comdefend_tf.purification.plan import is_remote
from comdefend_tf.purification.sources import DecodedImage

optional.require("apache_beam", "beam", "dataset purification on Apache Beam")
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.ml.inference.base import ModelHandler, PredictionResult  # noqa: E402

Purifier = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class ModelLoadError(ValueError):
    """The model cannot serve the pipeline (no ``purify`` signature)."""


def load_saved_model_purifier(saved_model_dir: str) -> Purifier:
    """The ``purify`` signature of an export version folder (``serving.signatures``); the
    export carries its own noise and tiling settings.

    Raises:
      ModelLoadError: the SavedModel has no ``purify`` signature.
    """
    import tensorflow as tf

    from comdefend_tf.serving import signatures

    loaded = tf.saved_model.load(saved_model_dir)
    if signatures.SIGNATURE_PURIFY not in loaded.signatures:
        raise ModelLoadError(f"{saved_model_dir!r} has no {signatures.SIGNATURE_PURIFY!r} "
                             f"signature (signatures: {sorted(loaded.signatures)})")
    signature = loaded.signatures[signatures.SIGNATURE_PURIFY]

    def purify(images):
        outputs = signature(**{signatures.INPUT_IMAGES: tf.constant(images)})
        return outputs["purified"].numpy(), outputs["code_bits"].numpy().astype(np.uint8)

    purify.keep_alive = loaded  # the signature needs its SavedModel object alive
    return purify


def local_keras_file(keras_path: str) -> str:
    """A local path of a ``.keras`` file or model directory: remote ones are copied to a new
    temporary folder first (Keras reads local files only)."""
    if not is_remote(keras_path):
        return keras_path
    from comdefend_tf.model import KERAS_FILENAME

    if not keras_path.endswith(".keras"):
        keras_path = FileSystems.join(keras_path, KERAS_FILENAME)
    local = os.path.join(tempfile.mkdtemp(prefix="comdefend-"), KERAS_FILENAME)
    with FileSystems.open(keras_path) as source, open(local, "wb") as target:
        target.write(source.read())
    return local


def load_keras_purifier(keras_path: str, inference_noise_std: float | None = None,
                        seed: int | None = None,
                        tile_above_pixels: int | None = None) -> Purifier:
    """A ``.keras`` ComDefend (file or model directory, local or remote) as a purifier.

    ``inference_noise_std``/``seed``: None keeps the model's own. Images above
    ``tile_above_pixels`` pixels are purified in the exact tiles the purify command uses
    (``files.automatic_tiling``; None: the model's budget, 0: never).
    """
    from keras import ops

    from comdefend_tf.model import load_comdefend
    from comdefend_tf.patches import purify_patchwise
    from comdefend_tf.purification.files import automatic_tiling

    model = load_comdefend(local_keras_file(keras_path),
                           inference_noise_std=inference_noise_std, seed=seed)
    channels = model.config.input_channels

    def purified_and_bits(images):
        outputs = model.forward(images, training=False)
        return ops.concatenate([ops.cast(outputs["purified"], "float32"),
                                ops.cast(outputs["noisy_logits"] > 0, "float32")], axis=-1)

    def purify(images):
        tiling = automatic_tiling(model, images.shape[1], images.shape[2], tile_above_pixels)
        if tiling is None:
            both = purified_and_bits(images)
        else:
            both = purify_patchwise(purified_and_bits, images, patch_size=tiling.patch_size,
                                    overlap=tiling.overlap, batch_size=tiling.batch_size)
        both = np.asarray(ops.convert_to_numpy(both))
        return both[..., :channels], both[..., channels:].astype(np.uint8)

    return purify


class PurifierModelHandler(ModelHandler):
    """Beam ``ModelHandler``: a batch of same-shape ``DecodedImage`` in,
    ``PredictionResult(image, {"purified": float32 [H, W, C], "code_bits": uint8 [H, W, K]})``
    out.

    Exactly one of ``saved_model_dir`` and ``keras_path`` is given; the other settings are
    ``load_keras_purifier``'s. Use with ``with_no_batching()``: the pipeline forms the batches
    itself, by shape.
    """

    def __init__(self, saved_model_dir: str | None = None, keras_path: str | None = None,
                 inference_noise_std: float | None = None, seed: int | None = None,
                 tile_above_pixels: int | None = None):
        if (saved_model_dir is None) == (keras_path is None):
            raise ValueError("give exactly one of saved_model_dir and keras_path")
        self._saved_model_dir = saved_model_dir
        self._keras_path = keras_path
        self._keras_settings = {"inference_noise_std": inference_noise_std, "seed": seed,
                                "tile_above_pixels": tile_above_pixels}

    def load_model(self) -> Purifier:
        if self._saved_model_dir is not None:
            return load_saved_model_purifier(self._saved_model_dir)
        return load_keras_purifier(self._keras_path, **self._keras_settings)

    def run_inference(self, batch: Sequence[DecodedImage], model: Purifier,
                      inference_args=None) -> Iterable[PredictionResult]:
        batch = list(batch)
        shapes = {item.image.shape for item in batch}
        if len(shapes) != 1:
            raise ValueError(f"a batch must hold images of one shape, got {sorted(shapes)}")
        purified, code_bits = model(np.stack([item.image for item in batch]))
        return [PredictionResult(item, {"purified": purified[i], "code_bits": code_bits[i]})
                for i, item in enumerate(batch)]

    def get_num_bytes(self, batch: Sequence[DecodedImage]) -> int:
        return sum(item.image.nbytes for item in batch)

    def get_metrics_namespace(self) -> str:
        return counters.METRICS_NAMESPACE
