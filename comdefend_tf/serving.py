"""SavedModel export of ComDefend for TF Serving: one purify core, thin decoders, atomic versions.

What is served is one ``tf.function``, the *purify core*: float32 images ``[batch, height,
width, channels]`` in [0, 1] -> purified images (same shape) and code bits. It processes images
patch-wise inside the graph (dynamic shapes, a ``tf.while_loop`` over chunks of windows), so
the network's working memory (its wide feature maps) is bounded by ``patch_batch_size``
windows whatever the image size; only the input and output windows, a few channels each,
scale with the image. How inputs arrive is the job of thin decoders around it, each a named
signature:

* ``purify``: ``images`` float32 ``[batch, height, width, C]`` in [0, 1] ->
  ``purified`` float32 (same shape, in [0, 1]) and ``code_bits`` uint8 ``[batch, height, width,
  code_channels]`` (0/1).
* ``purify_bytes``: ``image_bytes`` string ``[batch]`` (declared with unknown rank, checked in
  the graph like the float inputs) of encoded PNG or JPEG images (what TF
  Serving's REST API carries as ``{"b64": ...}``) -> ``purified_png_bytes`` string ``[batch]``
  (8-bit PNGs; TF Serving's REST API returns string outputs whose name ends in ``_bytes`` as
  ``{"b64": ...}``). Images in one batch may have different sizes.
* ``classify`` (only when a classifier is exported with the purifier): ``images`` as for
  ``purify`` -> the purified images fed to the classifier -> ``probabilities`` float32
  ``[batch, num_classes]`` and ``class_ids`` int64 ``[batch]``. Composition, not a copy.
* ``serving_default``: the same function as ``classify`` when a classifier is present, else
  ``purify``.

Validation happens in the graph and raises ``InvalidArgumentError`` with a message naming the
problem: wrong rank, wrong channel count, empty images, too many pixels (``max_pixels`` per
request), NaN, values outside [0, 1], bytes that are neither PNG nor JPEG (and the decoder's own
error for corrupt PNG/JPEG data). The float signatures therefore declare an *unknown rank*: a
model server feeds tensors without checking declared shapes, and a rank-3 tensor that reached a
convolution aborted the whole process here (a oneDNN ``Check failed``), so the rank is checked
in the graph before anything else runs.

Dtype policy: the core casts windows to ``purifier.compute_dtype`` before the network and its
outputs back to float32, so a purifier built under a Keras mixed-precision policy exports with
the same signatures (the signatures always speak float32).

Versions are written atomically in the layout TF Serving watches: ``EXPORT_BASE/VERSION/``
is built in a hidden temporary folder beside it and renamed into place, so a crash or a full
disk never leaves a half-written numeric version that a model server would load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Callable

import keras
import tensorflow as tf

from comdefend_tf.model import ComDefend
from comdefend_tf.patches import receptive_field_radius

SIGNATURE_PURIFY = "purify"
SIGNATURE_PURIFY_BYTES = "purify_bytes"
SIGNATURE_CLASSIFY = "classify"
SIGNATURE_DEFAULT = "serving_default"
INPUT_IMAGES = "images"
INPUT_IMAGE_BYTES = "image_bytes"
EXPORT_METADATA_FILENAME = "comdefend_export.json"
CLASSIFIER_OUTPUTS = ("auto", "logits", "probabilities")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """How the purifier is served; fixed at export time.

    Attributes:
      inference_noise_std: standard deviation of the noise subtracted from the code logits in
        the served graph; 0 is deterministic; None keeps the purifier config's value.
      noise_seed: seed of the served noise generator (None: random); only used with noise.
      patch_size: side in pixels of the output tiles images are cut into inside the graph.
      patch_overlap: context pixels purified around each tile and discarded; None uses the
        network's receptive field radius, with which tiled output equals whole-image output.
      patch_batch_size: windows per network call: bounds the graph's peak memory.
      max_pixels: the most pixels (batch x height x width) one request may carry.
      classifier_outputs: what the classifier's last layer emits: ``probabilities``,
        ``logits`` (a softmax is applied) or ``auto`` (probabilities when its last layer is a
        softmax).
    """

    inference_noise_std: float | None = None
    noise_seed: int | None = None
    patch_size: int = 256
    patch_overlap: int | None = None
    patch_batch_size: int = 4
    max_pixels: int = 4096 * 4096
    classifier_outputs: str = "auto"

    def __post_init__(self):
        if self.inference_noise_std is not None and self.inference_noise_std < 0:
            raise ValueError(f"inference_noise_std must be >= 0, got {self.inference_noise_std}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.patch_overlap is not None and self.patch_overlap < 0:
            raise ValueError(f"patch_overlap must be >= 0, got {self.patch_overlap}")
        if self.patch_batch_size < 1:
            raise ValueError(f"patch_batch_size must be >= 1, got {self.patch_batch_size}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.classifier_outputs not in CLASSIFIER_OUTPUTS:
            raise ValueError(f"classifier_outputs must be one of {CLASSIFIER_OUTPUTS}, got "
                             f"{self.classifier_outputs!r}")


# ------------------------------------------------------------------------ in-graph tiling
def _axis_tiling(length, patch_size: int, overlap: int):
    """Tiling of one image axis of dynamic ``length`` (int32 scalar), as ``patches.py`` does it.

    Returns ``(window, window_starts, owner, position_in_window)``: the window length, the
    start of every window ``[count]``, and for every pixel ``[length]`` the tile that owns it
    and its position inside that tile's window.
    """
    patch = tf.minimum(patch_size, length)
    window = tf.minimum(patch + 2 * overlap, length)
    count = (length + patch - 1) // patch
    owned_starts = tf.range(count) * patch
    tile_starts = tf.minimum(owned_starts, length - patch)  # the last tile moves inward
    window_starts = tf.clip_by_value(tile_starts - overlap, 0, length - window)
    owner = tf.range(length) // patch
    position_in_window = tf.range(length) - tf.gather(window_starts, owner)
    return window, window_starts, owner, position_in_window


def purify_patchwise_graph(purify_fn: Callable[[tf.Tensor], dict], images: tf.Tensor,
                           patch_size: int, overlap: int, batch_size: int) -> dict:
    """Tiled purification with dynamic shapes, for use inside a ``tf.function``.

    The geometry is that of ``comdefend_tf.patches.purify_patchwise``: output tiles of
    ``patch_size``, windows with ``overlap`` context pixels that never leave the image, the last
    tile of a row or column moved inward. Windows are purified ``batch_size`` at a time in a
    ``tf.while_loop`` with ``parallel_iterations=1``, so at most that many are in the network.

    Args:
      purify_fn: maps float32 windows ``[n, wh, ww, C]`` to a dict of tensors ``[n, wh, ww, k]``
        (any dtype, static ``k``).
      images: float32 ``[batch, height, width, C]``, static ``C``, dynamic everything else;
        ``batch >= 1``.
      patch_size, overlap, batch_size: Python ints (>= 1, >= 0, >= 1).

    Returns:
      dict with the keys of ``purify_fn``'s result, each ``[batch, height, width, k]``: the
      owned part of every window, stitched.
    """
    shape = tf.shape(images)
    num_images, height, width = shape[0], shape[1], shape[2]
    channels = images.shape[-1]
    window_h, starts_h, owner_h, pos_h = _axis_tiling(height, patch_size, overlap)
    window_w, starts_w, owner_w, pos_w = _axis_tiling(width, patch_size, overlap)
    tiles_h, tiles_w = tf.size(starts_h), tf.size(starts_w)

    # Windows in (image, tile row, tile column) order: two gathers, one reshape.
    rows = tf.reshape(starts_h[:, None] + tf.range(window_h)[None, :], [-1])
    cols = tf.reshape(starts_w[:, None] + tf.range(window_w)[None, :], [-1])
    windows = tf.gather(tf.gather(images, rows, axis=1), cols, axis=2)
    windows = tf.reshape(windows, [num_images, tiles_h, window_h, tiles_w, window_w, channels])
    windows = tf.transpose(windows, [0, 1, 3, 2, 4, 5])
    windows = tf.reshape(windows, [-1, window_h, window_w, channels])
    num_windows = tf.shape(windows)[0]
    num_chunks = (num_windows + batch_size - 1) // batch_size

    def purify_chunk(chunk):
        first = chunk * batch_size
        return purify_fn(windows[first:tf.minimum(first + batch_size, num_windows)])

    # The first chunk runs before the loop: its outputs give the dtypes and depths.
    first_outputs = purify_chunk(tf.constant(0))
    arrays = {key: tf.TensorArray(value.dtype, size=num_chunks, infer_shape=False,
                                  element_shape=tf.TensorShape([None, None, None,
                                                                value.shape[-1]])
                                  ).write(0, value)
              for key, value in first_outputs.items()}
    depths = {key: value.shape[-1] for key, value in first_outputs.items()}

    def body(chunk, arrays):
        outputs = purify_chunk(chunk)
        return chunk + 1, {key: arrays[key].write(chunk, outputs[key]) for key in arrays}

    _, arrays = tf.while_loop(lambda chunk, _: chunk < num_chunks, body,
                              (tf.constant(1), arrays), parallel_iterations=1)

    # Stitch: every output pixel reads its owner window at its position inside it.
    stitch_rows = owner_h * window_h + pos_h
    stitch_cols = owner_w * window_w + pos_w
    stitched = {}
    for key, array in arrays.items():
        depth = depths[key]
        purified = tf.reshape(array.concat(),
                              [num_images, tiles_h, tiles_w, window_h, window_w, depth])
        purified = tf.transpose(purified, [0, 1, 3, 2, 4, 5])
        purified = tf.reshape(purified, [num_images, tiles_h * window_h, tiles_w * window_w,
                                         depth])
        purified = tf.gather(tf.gather(purified, stitch_rows, axis=1), stitch_cols, axis=2)
        purified.set_shape([None, None, None, depth])
        stitched[key] = purified
    return stitched


# ---------------------------------------------------------------------------- validation
def _check(condition, *message_and_values):
    return tf.debugging.Assert(condition, list(message_and_values), summarize=8)


def _refuse_unless(checks, value: tf.Tensor) -> tf.Tensor:
    """``value`` when every check holds; otherwise raises the first failing check's message.

    ``checks``: list of ``(condition, message_and_values)``. The result is the output of a
    ``tf.cond`` on all conditions, a data dependency: nothing that consumes it can run before
    the checks are decided. Later checks are vacuous once an earlier one failed, so the error
    names the first problem (the channel check says nothing about a rank-3 tensor).
    """
    all_ok = tf.reduce_all(tf.stack([condition for condition, _ in checks]))

    def refuse():
        earlier_ok = tf.constant(True)
        asserts = []
        for condition, message in checks:
            asserts.append(_check(tf.logical_or(tf.logical_not(earlier_ok), condition),
                                  *message))
            earlier_ok = tf.logical_and(earlier_ok, condition)
        with tf.control_dependencies(asserts):
            return tf.identity(value)

    return tf.cond(all_ok, lambda: tf.identity(value), refuse)


def validate_images(images: tf.Tensor, channels: int, max_pixels: int,
                    height_width: tuple[int, int] | None = None) -> tf.Tensor:
    """In-graph checks of a float32 image batch of unknown rank; returns it with static rank.

    Checks, in order (the first failing one raises ``InvalidArgumentError`` with its message):
    rank 4; ``channels`` channels; at least one image of at least 1x1 pixels; ``height_width``
    when given (a classifier with a fixed input size); at most ``max_pixels`` pixels (batch x
    height x width); no NaN; every value in [0, 1]. The returned tensor is produced only after
    all checks passed, so nothing downstream runs on refused input.
    """
    shape = tf.shape(images)
    rank = tf.size(shape)
    # Padded to four entries so that indexing is safe whatever the rank.
    shape4 = tf.concat([shape, tf.ones([4], tf.int32)], axis=0)[:4]
    checks = [
        (tf.equal(rank, 4),
         ["images must be a rank-4 tensor [batch, height, width, channels] of float32 values "
          "in [0, 1]; got rank", rank, "and shape", shape]),
        (tf.equal(shape4[3], channels),
         [f"images must have {channels} channel(s) (the purifier's input_channels); got",
          shape4[3], "in shape", shape]),
        (tf.reduce_all(shape4[:3] > 0),
         ["images must hold at least one image of at least 1x1 pixels; got shape", shape]),
    ]
    if height_width is not None:
        checks.append((tf.reduce_all(tf.equal(shape4[1:3], tf.constant(height_width))),
                       [f"the classifier expects {height_width[0]}x{height_width[1]} images; "
                        "got height x width", shape4[1:3]]))
    pixels = tf.reduce_prod(tf.cast(shape, tf.int64))
    nan_count = tf.reduce_sum(tf.cast(tf.math.is_nan(images), tf.int64))
    smallest, largest = tf.reduce_min(images), tf.reduce_max(images)
    checks += [
        (pixels <= max_pixels * channels,
         [f"too many pixels: at most {max_pixels} (batch x height x width) per request are "
          "accepted (the export's max_pixels); got shape", shape]),
        (tf.equal(nan_count, 0), ["images contain NaN values:", nan_count, "of them"]),
        (tf.logical_and(smallest >= 0.0, largest <= 1.0),
         ["images must hold values in [0, 1] (divide 8-bit pixels by 255); got min", smallest,
          "max", largest]),
    ]
    checked = _refuse_unless(checks, images)
    # A reshape, not tf.ensure_shape: Grappler propagated an EnsureShape's rank back through
    # the tf.cond into the checks themselves, which then failed on a rank-3 input with an
    # unhelpful "Invalid reduction dimension" before the rank check could speak.
    checked = tf.reshape(checked, shape4)
    checked.set_shape([None, None, None, channels])
    return checked


def _decode_checked(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """One PNG or JPEG string -> uint8 ``[height, width, channels]``; refuses other formats.

    Data that starts like a PNG or JPEG but is corrupt fails in the decoder with its own
    ``InvalidArgumentError`` (for example "Invalid PNG. Failed to initialize decoder.").
    """
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_MAGIC)), _PNG_MAGIC)
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(_JPEG_MAGIC)), _JPEG_MAGIC)
    encoded = _refuse_unless(
        [(tf.logical_or(is_png, is_jpeg),
          ["image_bytes must hold PNG or JPEG encoded images; an element of",
           tf.strings.length(encoded), "bytes is neither (corrupt or another format)"])],
        encoded)
    image = tf.io.decode_image(encoded, channels=channels, dtype=tf.uint8,
                               expand_animations=False)
    return tf.ensure_shape(image, [None, None, channels])


def _to_png(purified: tf.Tensor) -> tf.Tensor:
    """float ``[height, width, C]`` in [0, 1] -> an 8-bit PNG string (rounded, clipped)."""
    pixels = tf.cast(tf.round(tf.clip_by_value(purified, 0.0, 1.0) * 255.0), tf.uint8)
    return tf.io.encode_png(pixels)


# ---------------------------------------------------------------------- serving functions
def classifier_emits_probabilities(classifier: keras.Model) -> bool:
    """True when the classifier's last layer is a softmax (an ``Activation``/``Softmax`` layer
    or a layer with ``activation=softmax``)."""
    last = classifier.layers[-1] if getattr(classifier, "layers", None) else classifier
    if isinstance(last, keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


def _classifier_channels(classifier: keras.Model) -> int | None:
    try:
        shape = tuple(classifier.inputs[0].shape)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    return int(shape[-1]) if len(shape) == 4 and shape[-1] is not None else None


def classifier_height_width(classifier: keras.Model) -> tuple[int, int] | None:
    """The classifier's static input (height, width), or None when it accepts any size."""
    try:
        shape = tuple(classifier.inputs[0].shape)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    if len(shape) == 4 and shape[1] is not None and shape[2] is not None:
        return int(shape[1]), int(shape[2])
    return None


@dataclasses.dataclass(frozen=True)
class ServingFunctions:
    """What ``build_serving_functions`` returns.

    Attributes:
      signatures: signature name -> ``tf.function`` with an input signature, in export order
        (``serving_default``'s target first): ``classify`` (with a classifier), ``purify``,
        ``purify_bytes``.
      purify_core: the shared core, float32 ``[None, None, None, C]`` -> dict(purified,
        code_bits); no validation, not a signature of its own.
      purifier: the Keras model the functions call (the input purifier, or a weight-sharing
        copy with the export's inference noise).
    """

    signatures: dict
    purify_core: object
    purifier: ComDefend


def build_serving_functions(purifier: ComDefend, classifier: keras.Model | None = None,
                            settings: ExportSettings = ExportSettings()) -> ServingFunctions:
    """The serving ``tf.function``s, keyed by signature name, ``serving_default``'s target first.

    Args:
      purifier: a ComDefend model (its encoder and decoder weights are used as they are; the
        inference noise comes from ``settings``).
      classifier: optional Keras model from float32 ``[batch, height, width, C]`` in [0, 1] to
        logits or probabilities ``[batch, num_classes]``.
      settings: the export settings.

    Returns:
      a ``ServingFunctions``.
    """
    config = purifier.config
    if settings.inference_noise_std is not None or settings.noise_seed is not None:
        purifier = purifier.with_inference(noise_std=settings.inference_noise_std,
                                           seed=settings.noise_seed)
    channels = config.input_channels
    overlap = (receptive_field_radius(config) if settings.patch_overlap is None
               else settings.patch_overlap)
    compute_dtype = purifier.compute_dtype

    def purify_windows(windows):
        outputs = purifier.forward(tf.cast(windows, compute_dtype), training=False)
        return {"purified": tf.cast(outputs["purified"], tf.float32),
                "code_bits": tf.cast(outputs["noisy_logits"] > 0, tf.uint8)}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32,
                                                name=INPUT_IMAGES)])
    def purify_core(images):
        """float32 [batch, height, width, C] in [0, 1] (already validated) -> dict(purified
        float32 same shape, code_bits uint8 [batch, height, width, code_channels])."""
        return purify_patchwise_graph(purify_windows, images, settings.patch_size, overlap,
                                      settings.patch_batch_size)

    unknown_rank_images = tf.TensorSpec(None, tf.float32, name=INPUT_IMAGES)

    @tf.function(input_signature=[unknown_rank_images])
    def purify(images):
        images = validate_images(images, channels, settings.max_pixels)
        return purify_core(images)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.string, name=INPUT_IMAGE_BYTES)])
    def purify_bytes(image_bytes):
        checked = _refuse_unless(
            [(tf.equal(tf.rank(image_bytes), 1),
              ["image_bytes must be a rank-1 string tensor [batch] of encoded images; got "
               "shape", tf.shape(image_bytes)])], image_bytes)
        image_bytes = tf.reshape(checked, [-1])

        def purify_one(encoded):
            image = tf.cast(_decode_checked(encoded, channels), tf.float32) / 255.0
            image = validate_images(image[None], channels, settings.max_pixels)
            return _to_png(purify_core(image)["purified"][0])

        pngs = tf.map_fn(purify_one, image_bytes, parallel_iterations=1,
                         fn_output_signature=tf.TensorSpec([], tf.string))
        return {"purified_png_bytes": pngs}

    signatures = {}
    if classifier is not None:
        classifier_channels = _classifier_channels(classifier)
        if classifier_channels is not None and classifier_channels != channels:
            raise ValueError(f"the classifier takes {classifier_channels}-channel images but the "
                             f"purifier produces {channels}-channel images")
        height_width = classifier_height_width(classifier)
        if settings.classifier_outputs == "auto":
            emits_probabilities = classifier_emits_probabilities(classifier)
        else:
            emits_probabilities = settings.classifier_outputs == "probabilities"

        @tf.function(input_signature=[unknown_rank_images])
        def classify(images):
            images = validate_images(images, channels, settings.max_pixels, height_width)
            purified = purify_core(images)["purified"]
            scores = tf.cast(classifier(purified, training=False), tf.float32)
            probabilities = scores if emits_probabilities else tf.nn.softmax(scores, axis=-1)
            return {"probabilities": probabilities,
                    "class_ids": tf.argmax(probabilities, axis=-1, output_type=tf.int64)}

        signatures[SIGNATURE_CLASSIFY] = classify
    signatures[SIGNATURE_PURIFY] = purify
    signatures[SIGNATURE_PURIFY_BYTES] = purify_bytes
    return ServingFunctions(signatures, purify_core, purifier)


def build_export_archive(purifier: ComDefend, classifier: keras.Model | None = None,
                         settings: ExportSettings = ExportSettings()) -> keras.export.ExportArchive:
    """A ``keras.export.ExportArchive`` holding the signatures (see the module docstring).

    The first endpoint registered becomes ``serving_default``: ``classify`` when a classifier
    is given, else ``purify``.
    """
    functions = build_serving_functions(purifier, classifier, settings)
    archive = keras.export.ExportArchive()
    archive.track(functions.purifier)
    if classifier is not None:
        archive.track(classifier)
    for name, function in functions.signatures.items():
        function.get_concrete_function()
        archive.add_endpoint(name, function)
    return archive


# ----------------------------------------------------------------------- versioned writes
def list_versions(export_base: str) -> list[int]:
    """Numeric version folders under ``export_base`` (what TF Serving loads), ascending."""
    if not os.path.isdir(export_base):
        return []
    return sorted(int(name) for name in os.listdir(export_base)
                  if name.isdigit() and os.path.isdir(os.path.join(export_base, name)))


def next_version(export_base: str) -> int:
    """One more than the highest existing version, or 1."""
    versions = list_versions(export_base)
    return versions[-1] + 1 if versions else 1


def export_metadata(purifier: ComDefend, classifier: keras.Model | None,
                    settings: ExportSettings, version: int) -> dict:
    signatures = ([SIGNATURE_CLASSIFY] if classifier is not None else []) + [
        SIGNATURE_PURIFY, SIGNATURE_PURIFY_BYTES]
    return {"version": version, "comdefend_config": purifier.config.to_dict(),
            "settings": dataclasses.asdict(settings),
            "effective_inference_noise_std": (purifier.config.inference_noise_std
                                              if settings.inference_noise_std is None
                                              else settings.inference_noise_std),
            "patch_overlap": (receptive_field_radius(purifier.config)
                              if settings.patch_overlap is None else settings.patch_overlap),
            "signatures": signatures, "serving_default": signatures[0],
            "classifier": None if classifier is None else classifier.name}


def _write_version(archive, folder: str, metadata: dict) -> None:
    archive.write_out(folder, verbose=False)
    with open(os.path.join(folder, EXPORT_METADATA_FILENAME), "w") as handle:
        json.dump(metadata, handle, indent=2, sort_keys=True)
        handle.write("\n")


def export_savedmodel(purifier: ComDefend, export_base: str, classifier: keras.Model | None = None,
                      settings: ExportSettings = ExportSettings(), version: int | None = None,
                      overwrite: bool = False) -> str:
    """Writes ``export_base/VERSION/`` (a SavedModel TF Serving can load) atomically.

    The version is built in a hidden temporary folder beside it (``.partial-VERSION-*``, a
    name TF Serving ignores) and renamed into place; on any error the temporary folder is
    removed and no version folder appears. Besides the SavedModel, the folder holds
    ``comdefend_export.json`` (config, settings, signature names).

    Args:
      purifier, classifier, settings: see ``build_serving_functions``.
      export_base: the folder TF Serving's ``--model_base_path`` points at.
      version: a positive integer; None takes one more than the highest existing version.
      overwrite: replace an existing version (otherwise ``FileExistsError``).

    Returns:
      the absolute path of the written version folder.
    """
    export_base = os.path.abspath(export_base)
    if version is None:
        version = next_version(export_base)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"version must be a positive integer, got {version!r}")
    final = os.path.join(export_base, str(version))
    if os.path.exists(final) and not overwrite:
        raise FileExistsError(f"export version {final} already exists; pass overwrite=True "
                              f"(--overwrite) to replace it or choose another version")
    archive = build_export_archive(purifier, classifier, settings)
    os.makedirs(export_base, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".partial-{version}-", dir=export_base)
    try:
        _write_version(archive, partial,
                       export_metadata(purifier, classifier, settings, version))
        if os.path.exists(final):
            if not overwrite:
                raise FileExistsError(f"export version {final} appeared while writing; "
                                      "not overwriting it")
            retired = tempfile.mkdtemp(prefix=f".retired-{version}-", dir=export_base)
            os.rename(final, os.path.join(retired, "old"))
            os.rename(partial, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def next_step_commands(version_dir: str, channels: int,
                       height_width: tuple[int, int] = (32, 32)) -> dict:
    """Shell lines a user can run next on an exported version, keyed ``show``, ``sample``,
    ``run`` and ``serve`` (the sample writes ``images.npy``: float32 ``[1, H, W, C]`` in [0, 1];
    ``saved_model_cli run --input_exprs`` takes only Python literals, so arrays go in as .npy)."""
    height, width = height_width
    export_base = os.path.dirname(os.path.abspath(version_dir))
    return {
        "show": f"saved_model_cli show --all --dir {version_dir}",
        "sample": ('python -c "import numpy as np; np.save(\'images.npy\', np.random.rand('
                   f'1, {height}, {width}, {channels}).astype(\'float32\'))"'),
        "run": (f"saved_model_cli run --dir {version_dir} --tag_set serve --signature_def "
                f"{SIGNATURE_DEFAULT} --inputs {INPUT_IMAGES}=images.npy"),
        "serve": (f"tensorflow_model_server --rest_api_port=8501 --model_name=comdefend "
                  f"--model_base_path={export_base}"),
    }
