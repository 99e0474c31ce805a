"""The purify pipeline's Beam ``ModelHandler``: batches of same-shape images through a purifier.

A purifier is a callable float32 ``[n, H, W, C]`` in [0, 1] -> ``(purified float32 [n, H, W, C],
code_bits uint8 0/1 [n, H, W, K])``. One loader per model kind: ``load_saved_model_purifier``
(the ``purify`` signature of an export version folder) and ``load_keras_purifier`` (a ``.keras``
ComDefend, tiled exactly above its pixel budget as the purify command tiles). An export
refuses requests over its limits (``ExportLimits``, read from its ``comdefend_export.json``):
``split_to_requests`` cuts batches to fit them, and an image the export still refuses
(``ModelRefusedError``) comes out as a ``PredictionResult`` whose inference is
``{"refused": detail}``, for the dead letters, while the others go on. Beam's own TensorFlow
handlers need ``tf.keras`` and ``tensorflow_hub``; this one needs neither.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Iterable, NamedTuple, Sequence

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
    """The model cannot serve the pipeline (no ``purify`` signature, unreadable metadata)."""


class ModelRefusedError(ValueError):
    """The model refused a request (an export's ``InvalidArgumentError``); the message is the
    export's reason line (``refusal_message``)."""


MAX_REFUSAL_CHARS = 300


class ExportLimits(NamedTuple):
    """What one request to an export may carry (its ``comdefend_export.json`` ``limits``):
    ``max_pixels`` summed over the images (batch x height x width), ``max_images``."""

    max_pixels: int
    max_images: int


_TF_BOILERPLATE = ("Graph execution error", "Detected at node", "<stack traces", "[[", "File ")


def refusal_message(text: str) -> str:
    """The reason line of a TensorFlow error message (``assertion failed: [...]`` of an
    in-graph check, without the graph's node and stack lines), at most
    ``MAX_REFUSAL_CHARS`` characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(_TF_BOILERPLATE)] or lines or [""]
    reason = reasons[0].removeprefix("assertion failed: ").replace("\\'", "'")
    return reason[:MAX_REFUSAL_CHARS]


def read_export_limits(metadata: dict, source: str = "the export") -> ExportLimits:
    """The request limits of an export's metadata dict.

    Raises:
      ModelLoadError: no ``limits`` with positive integer ``max_pixels_per_request`` and
        ``max_batch_size``.
    """
    limits = metadata.get("limits") if isinstance(metadata, dict) else None
    try:
        pixels, images = limits["max_pixels_per_request"], limits["max_batch_size"]
    except (TypeError, KeyError) as error:
        raise ModelLoadError(f"{source} has no request limits (limits.max_pixels_per_request "
                             f"and limits.max_batch_size) in its metadata") from error
    for name, value in (("max_pixels_per_request", pixels), ("max_batch_size", images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelLoadError(f"{source}'s limits.{name} must be a positive integer, got "
                                 f"{value!r}")
    return ExportLimits(pixels, images)


def load_export_limits(saved_model_dir: str) -> ExportLimits:
    """``read_export_limits`` of ``saved_model_dir``'s ``comdefend_export.json``."""
    from comdefend_tf.serving.export import EXPORT_METADATA_FILENAME

    path = FileSystems.join(saved_model_dir, EXPORT_METADATA_FILENAME)
    try:
        with FileSystems.open(path) as handle:
            metadata = json.loads(handle.read().decode("utf-8"))
    except Exception as error:  # missing, unreadable, not JSON
        raise ModelLoadError(f"cannot read {path!r}: {error}") from error
    return read_export_limits(metadata, repr(saved_model_dir))


def split_to_requests(batch: Sequence[DecodedImage],
                      limits: ExportLimits | None) -> list[list[DecodedImage]]:
    """Same-shape images cut, in order, into requests within ``limits`` (None: one request).
    An image over ``max_pixels`` alone is a request of its own (the export refuses it)."""
    batch = list(batch)
    if limits is None or not batch:
        return [batch] if batch else []
    height, width = batch[0].image.shape[:2]
    per_request = max(1, min(limits.max_images, limits.max_pixels // (height * width)))
    return [batch[start:start + per_request] for start in range(0, len(batch), per_request)]


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
        try:
            outputs = signature(**{signatures.INPUT_IMAGES: tf.constant(images)})
        except tf.errors.InvalidArgumentError as error:
            raise ModelRefusedError(refusal_message(error.message or str(error))) from None
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
    ``load_keras_purifier``'s. ``limits``: an export's request limits (None: read from its
    metadata; a Keras model has none). Use with ``with_no_batching()``: the pipeline forms
    the batches itself, by shape; this handler cuts them to the limits.
    """

    def __init__(self, saved_model_dir: str | None = None, keras_path: str | None = None,
                 inference_noise_std: float | None = None, seed: int | None = None,
                 tile_above_pixels: int | None = None, limits: ExportLimits | None = None):
        if (saved_model_dir is None) == (keras_path is None):
            raise ValueError("give exactly one of saved_model_dir and keras_path")
        if saved_model_dir is not None and limits is None:
            limits = load_export_limits(saved_model_dir)
        self._limits = limits
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
        """One model call per request of ``split_to_requests(batch, limits)``; a request the
        model refuses is asked again one image at a time, and an image refused alone yields
        ``{"refused": detail}``."""
        batch = list(batch)
        shapes = {item.image.shape for item in batch}
        if len(shapes) != 1:
            raise ValueError(f"a batch must hold images of one shape, got {sorted(shapes)}")
        results = []
        for request in split_to_requests(batch, self._limits):
            try:
                results += self._purify(request, model)
            except ModelRefusedError as error:
                if len(request) == 1:
                    results.append(PredictionResult(request[0], {"refused": str(error)}))
                    continue
                for item in request:
                    try:
                        results += self._purify([item], model)
                    except ModelRefusedError as alone:
                        results.append(PredictionResult(item, {"refused": str(alone)}))
        return results

    @staticmethod
    def _purify(request: list[DecodedImage], model: Purifier) -> list[PredictionResult]:
        purified, code_bits = model(np.stack([item.image for item in request]))
        return [PredictionResult(item, {"purified": purified[i], "code_bits": code_bits[i]})
                for i, item in enumerate(request)]

    def get_num_bytes(self, batch: Sequence[DecodedImage]) -> int:
        return sum(item.image.nbytes for item in batch)

    def get_metrics_namespace(self) -> str:
        return counters.METRICS_NAMESPACE
