"""SavedModel export of ComDefend for TF Serving: one purify core, thin decoders, atomic versions.

What is served is one core, the *purify core*: float32 images ``[batch, height, width,
channels]`` in [0, 1] -> purified images (same shape) and code bits. It processes images
patch-wise inside the graph (dynamic shapes, a ``tf.while_loop`` over chunks of windows), and a
chunk holds as many windows as fit in a fixed *pixel* budget (``patch_batch_size`` full-size
windows' worth), so the network's working memory (its wide feature maps) is bounded whatever
the image size, and a batch of many tiny images costs a few network calls, not one per four
images. How inputs arrive is the job of thin decoders around it, each a named signature:

* ``purify``: ``images`` float32 ``[batch, height, width, C]`` in [0, 1] ->
  ``purified`` float32 (same shape, in [0, 1]) and ``code_bits`` uint8 ``[batch, height, width,
  code_channels]`` (0/1).
* ``purify_bytes``: ``image_bytes`` string ``[batch]`` (declared with unknown rank, checked in
  the graph like the float inputs) of encoded PNG or JPEG images (what TF
  Serving's REST API carries as ``{"b64": ...}``) -> ``purified_png_bytes`` string ``[batch]``
  (8-bit PNGs; TF Serving's REST API returns string outputs whose name ends in ``_bytes`` as
  ``{"b64": ...}``). Images in one batch may have different sizes. PNGs are decoded at full
  precision (``uint16 / 65535``: 16-bit PNGs keep their precision and 8-bit PNGs give exactly
  ``uint8 / 255``, because the decoder widens 8-bit values by ``x * 257``); JPEGs as
  ``uint8 / 255``.
* ``classify`` (only when a classifier is exported with the purifier): ``images`` as for
  ``purify`` -> the purified images fed to the classifier, in chunks of the same pixel budget
  -> ``probabilities`` float32 ``[batch, num_classes]`` and ``class_ids`` int64 ``[batch]``.
  Composition, not a copy.
* ``serving_default``: the same function as ``classify`` when a classifier is present, else
  ``purify``.

Validation happens in the graph, before any decoding or network call, and raises
``InvalidArgumentError`` with a message naming the problem: wrong rank, wrong channel count,
empty images, more than ``max_batch_size`` images, more than ``max_pixels`` pixels in the whole
request (batch x height x width, summed over the images of ``purify_bytes``), NaN, values
outside [0, 1]; for bytes: neither PNG nor JPEG, a malformed PNG header (signature, IHDR chunk
length, type or CRC, a zero or out-of-range width or height), and a PNG or JPEG whose *declared*
size (read from the PNG IHDR chunk, or by ``tf.image.extract_jpeg_shape``, which parses the JPEG
header without decoding) is over the budget, so a small file declaring a huge image is refused
before anything is allocated for it. Corrupt image data past the header fails in the decoder
with its own ``InvalidArgumentError`` (its message says "PNG" or "JPEG"). The float signatures
declare an *unknown rank*: a model server feeds tensors without checking declared shapes, and a
rank-3 tensor that reached a convolution aborted the whole process here (a oneDNN ``Check
failed``), so the rank is checked in the graph before anything else runs.

Noise: the served code noise is drawn by TensorFlow's stateful ``RandomStandardNormal`` op
inside the graph, never by Keras' ``SeedGenerator`` (whose seed and counter are variables that
a SavedModel would carry, so every process loading it would replay the same draws). Without
``noise_seed`` the op has seed 0/0, which TensorFlow resolves by seeding each kernel from the
operating system's entropy when the model is loaded: fresh processes draw different noise and
nothing in the files determines it. With ``noise_seed`` the ops get fixed seeds: every fresh
process replays the same sequence of draws (reproducible per process, and predictable by anyone
who has the export). Either way each execution reserves its own samples under the kernel's
lock, so concurrent calls never share a draw.

Dtype policy: the core casts windows to ``purifier.compute_dtype`` before the network and its
outputs back to float32, so a purifier built under a Keras mixed-precision policy exports with
the same signatures (the signatures always speak float32).

Versions are written atomically in the layout TF Serving watches: ``EXPORT_BASE/VERSION/``
is built in a hidden temporary folder beside it, flushed to disk and renamed into place, so a
crash, a kill or a full disk never leaves a half-written numeric version that a model server
would load; the next export removes temporary folders left by exports that were killed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Callable

import keras
import tensorflow as tf

from comdefend_tf.training import provenance
from comdefend_tf.io.datasets import TFRECORD_IMAGE_FEATURE
from comdefend_tf.model import ComDefend
from comdefend_tf.patches import receptive_field_radius

SIGNATURE_PURIFY = "purify"
SIGNATURE_PURIFY_BYTES = "purify_bytes"
SIGNATURE_PURIFY_EXAMPLES = "purify_examples"
INPUT_EXAMPLES = "examples"
SIGNATURE_CLASSIFY = "classify"
SIGNATURE_DEFAULT = "serving_default"
INPUT_IMAGES = "images"
INPUT_IMAGE_BYTES = "image_bytes"
EXPORT_METADATA_FILENAME = "comdefend_export.json"
CLASSIFIER_OUTPUTS = ("auto", "logits", "probabilities")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# Signature (8 bytes), IHDR length (4), type (4), data (13: width, height, depth, colour type,
# compression, filter, interlace), CRC (4): every PNG starts with these 33 bytes.
_PNG_HEADER_BYTES = 33
_PNG_IHDR_LENGTH_AND_TYPE = b"\x00\x00\x00\x0dIHDR"
_PNG_MAX_SIDE = 2 ** 31 - 1  # the PNG specification's limit for width and height
_TEMP_PREFIXES = (".partial-", ".retired-")


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """How the purifier is served; fixed at export time.

    Attributes:
      inference_noise_std: standard deviation of the noise subtracted from the code logits in
        the served graph; 0 is deterministic; None keeps the purifier config's value.
      noise_seed: None (the default): the served noise is seeded from the operating system's
        entropy in every process that loads the export, so it cannot be predicted from the
        files. An integer in [0, 2**63): every process replays the same sequence of draws
        (reproducible per process, and predictable by anyone holding the export; for tests and
        audits, not for production). Only used with noise.
      patch_size: side in pixels of the output tiles images are cut into inside the graph.
      patch_overlap: context pixels purified around each tile and discarded; None uses the
        network's receptive field radius, with which tiled output equals whole-image output.
      patch_batch_size: full-size windows (``patch_size + 2 * overlap`` on a side) per network
        call; smaller windows are packed into a call up to the same number of pixels. Bounds
        the graph's peak memory.
      max_pixels: the most pixels one request may carry, summed over its images (batch x
        height x width for the float signatures; the sum of the declared sizes for
        ``purify_bytes``). Bounds the work and memory of one request.
      max_batch_size: the most images one request may carry (every signature).
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
    max_batch_size: int = 1024
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
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.noise_seed is not None and not 0 <= self.noise_seed < 2 ** 63:
            raise ValueError(f"noise_seed must be in [0, 2**63), got {self.noise_seed}")
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


def chunk_pixels_for(patch_size: int, overlap: int, patch_batch_size: int) -> int:
    """Pixels per network call: ``patch_batch_size`` full-size windows of side
    ``patch_size + 2 * overlap``."""
    return patch_batch_size * (patch_size + 2 * overlap) ** 2


def purify_patchwise_graph(purify_fn: Callable[[tf.Tensor], dict], images: tf.Tensor,
                           patch_size: int, overlap: int, chunk_pixels: int,
                           output_specs: dict) -> dict:
    """Tiled purification with dynamic shapes, for use inside a ``tf.function``.

    The geometry is that of ``comdefend_tf.patches.purify_patchwise``: output tiles of
    ``patch_size``, windows with ``overlap`` context pixels that never leave the image, the last
    tile of a row or column moved inward. All windows of one call have the same size (all
    images of a batch do); they are purified ``max(1, chunk_pixels // window pixels)`` at a
    time in a ``tf.while_loop`` with ``parallel_iterations=1``. So at most ``chunk_pixels``
    pixels (or one window, when a window is larger) are in the network at once, and the number
    of network calls is about the request's pixels over ``chunk_pixels``, however the pixels
    are split into images: a million 1x1 images take a few calls, not a million.

    Args:
      purify_fn: maps float32 windows ``[n, wh, ww, C]`` to a dict of tensors ``[n, wh, ww, k]``
        with the keys, dtypes and depths of ``output_specs``.
      images: float32 ``[batch, height, width, C]``, static ``C``, dynamic everything else;
        ``batch >= 1``.
      patch_size, overlap, chunk_pixels: Python ints (>= 1, >= 0, >= 1).
      output_specs: ``{key: (tf.DType, depth)}`` of ``purify_fn``'s result.

    Returns:
      dict with the keys of ``output_specs``, each ``[batch, height, width, depth]``: the owned
      part of every window, stitched.
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
    windows_per_chunk = tf.maximum(1, chunk_pixels // (window_h * window_w))
    num_chunks = (num_windows + windows_per_chunk - 1) // windows_per_chunk

    # One loop and no call before it: a random op in purify_fn then exists once in the graph,
    # so a seeded export never repeats a stream between two of its own nodes.
    arrays = {key: tf.TensorArray(dtype, size=num_chunks, infer_shape=False,
                                  element_shape=tf.TensorShape([None, None, None, depth]))
              for key, (dtype, depth) in output_specs.items()}

    def body(chunk, arrays):
        first = chunk * windows_per_chunk
        outputs = purify_fn(windows[first:tf.minimum(first + windows_per_chunk, num_windows)])
        return chunk + 1, {key: arrays[key].write(chunk, outputs[key]) for key in arrays}

    _, arrays = tf.while_loop(lambda chunk, _: chunk < num_chunks, body,
                              (tf.constant(0), arrays), parallel_iterations=1)

    # Stitch: every output pixel reads its owner window at its position inside it.
    stitch_rows = owner_h * window_h + pos_h
    stitch_cols = owner_w * window_w + pos_w
    stitched = {}
    for key, array in arrays.items():
        depth = output_specs[key][1]
        purified = tf.reshape(array.concat(),
                              [num_images, tiles_h, tiles_w, window_h, window_w, depth])
        purified = tf.transpose(purified, [0, 1, 3, 2, 4, 5])
        purified = tf.reshape(purified, [num_images, tiles_h * window_h, tiles_w * window_w,
                                         depth])
        purified = tf.gather(tf.gather(purified, stitch_rows, axis=1), stitch_cols, axis=2)
        purified.set_shape([None, None, None, depth])
        stitched[key] = purified
    return stitched


def map_in_chunks(fn: Callable[[tf.Tensor], tf.Tensor], images: tf.Tensor, chunk_pixels: int,
                  depth: int, dtype=tf.float32) -> tf.Tensor:
    """``fn`` applied to ``images`` ``[batch, height, width, C]`` a chunk of
    ``max(1, chunk_pixels // (height * width))`` images at a time (a ``tf.while_loop``,
    ``parallel_iterations=1``); ``fn`` maps ``[n, height, width, C]`` to ``[n, depth]``.
    Returns ``[batch, depth]``: the same values as ``fn(images)``, with bounded memory."""
    shape = tf.shape(images)
    num_images = shape[0]
    per_chunk = tf.maximum(1, chunk_pixels // (shape[1] * shape[2]))
    num_chunks = (num_images + per_chunk - 1) // per_chunk
    array = tf.TensorArray(dtype, size=num_chunks, infer_shape=False,
                           element_shape=tf.TensorShape([None, depth]))

    def body(chunk, array):
        first = chunk * per_chunk
        return chunk + 1, array.write(
            chunk, tf.cast(fn(images[first:tf.minimum(first + per_chunk, num_images)]), dtype))

    _, array = tf.while_loop(lambda chunk, _: chunk < num_chunks, body, (tf.constant(0), array),
                             parallel_iterations=1)
    result = array.concat()
    result.set_shape([None, depth])
    return result


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
                    height_width: tuple[int, int] | None = None,
                    max_batch_size: int | None = None) -> tf.Tensor:
    """In-graph checks of a float32 image batch of unknown rank; returns it with static rank.

    Checks, in order (the first failing one raises ``InvalidArgumentError`` with its message):
    rank 4; ``channels`` channels; at least one image of at least 1x1 pixels; at most
    ``max_batch_size`` images when given; ``height_width`` when given (a classifier with a
    fixed input size); at most ``max_pixels`` pixels in the whole request (batch x height x
    width); then, only for a request whose shape passed, no NaN and every value in [0, 1]. The
    returned tensor is produced only after all checks passed, so nothing downstream runs on
    refused input.
    """
    # int64: the Shape op refuses to report a dimension of 2**31 - 1 in 32 bits.
    shape = tf.shape(images, out_type=tf.int64)
    rank = tf.size(shape)
    # Padded to four entries so that indexing is safe whatever the rank.
    shape4 = tf.concat([shape, tf.ones([4], tf.int64)], axis=0)[:4]
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
    if max_batch_size is not None:
        checks.append((shape4[0] <= max_batch_size,
                       [f"too many images: at most {max_batch_size} images per request are "
                        "accepted (the export's max_batch_size); got batch", shape4[0]]))
    if height_width is not None:
        checks.append((tf.reduce_all(tf.equal(shape4[1:3], tf.constant(height_width, tf.int64))),
                       [f"the classifier expects {height_width[0]}x{height_width[1]} images; "
                        "got height x width", shape4[1:3]]))
    pixels = tf.reduce_prod(shape4[:3])
    checks.append((pixels <= max_pixels,
                   [f"too many pixels: at most {max_pixels} (batch x height x width) per "
                    "request are accepted (the export's max_pixels); got shape", shape]))
    # The values are looked at only once the shape passed: no pass over the data of a
    # request that is refused for its size (and no int64 copy of it: one bool per value).
    shaped = _refuse_unless(checks, images)
    smallest, largest = tf.reduce_min(shaped), tf.reduce_max(shaped)
    checked = _refuse_unless(
        [(tf.logical_not(tf.reduce_any(tf.math.is_nan(shaped))),
          ["images contain NaN values"]),
         (tf.logical_and(smallest >= 0.0, largest <= 1.0),
          ["images must hold values in [0, 1] (divide 8-bit pixels by 255); got min", smallest,
           "max", largest])], shaped)
    # A reshape, not tf.ensure_shape: Grappler propagated an EnsureShape's rank back through
    # the tf.cond into the checks themselves, which then failed on a rank-3 input with an
    # unhelpful "Invalid reduction dimension" before the rank check could speak.
    checked = tf.reshape(checked, shape4)
    checked.set_shape([None, None, None, channels])
    return checked


def _crc32_table() -> list[int]:
    """The 256-entry table of the reflected CRC-32 (polynomial 0xEDB88320) that PNG uses."""
    table = []
    for byte in range(256):
        value = byte
        for _ in range(8):
            value = (value >> 1) ^ 0xEDB88320 if value & 1 else value >> 1
        table.append(value)
    return table


def _crc32(data: tf.Tensor) -> tf.Tensor:
    """CRC-32 of every row of ``data`` (int64 ``[n, length]`` bytes, static length) -> int64
    ``[n]``; unrolled over the few bytes of a PNG IHDR chunk."""
    table = tf.constant(_crc32_table(), tf.int64)
    crc = tf.fill(tf.shape(data)[:1], tf.constant(0xFFFFFFFF, tf.int64))
    for index in range(data.shape[1]):
        low = tf.bitwise.bitwise_and(tf.bitwise.bitwise_xor(crc, data[:, index]), 0xFF)
        crc = tf.bitwise.bitwise_xor(tf.gather(table, low), tf.bitwise.right_shift(crc, 8))
    return tf.bitwise.bitwise_xor(crc, 0xFFFFFFFF)


def _big_endian(data: tf.Tensor) -> tf.Tensor:
    """int64 ``[n, 4]`` bytes -> int64 ``[n]`` unsigned big-endian values."""
    return tf.reduce_sum(data * tf.constant([1 << 24, 1 << 16, 1 << 8, 1], tf.int64), axis=1)


def _first_index(condition: tf.Tensor) -> tf.Tensor:
    """Index of the first True in a bool vector (0 when there is none)."""
    return tf.argmax(tf.cast(condition, tf.int32), output_type=tf.int32)


def declared_sizes(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Reads every image's size from its header, without decoding; refuses bad headers.

    Args:
      encoded: string ``[n]``, ``n >= 1``.

    Returns:
      ``(heights, widths, is_png)``: int64 ``[n]``, int64 ``[n]``, bool ``[n]``. PNG sizes come
      from the IHDR chunk (after checking the signature, the chunk's length, type and CRC,
      and that width and height are in [1, 2**31 - 1]); JPEG sizes from
      ``tf.image.extract_jpeg_shape``, which parses the header without decoding (its own
      ``InvalidArgumentError`` "Invalid JPEG data" for a header it cannot parse, including
      sides over libjpeg's 65500).

    Raises (in the graph): ``InvalidArgumentError`` naming the first problem and the element.
    """
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_MAGIC)), _PNG_MAGIC)
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(_JPEG_MAGIC)), _JPEG_MAGIC)
    supported = tf.logical_or(is_png, is_jpeg)
    encoded = _refuse_unless(
        [(tf.reduce_all(supported),
          ["image_bytes must hold PNG or JPEG encoded images; element",
           _first_index(tf.logical_not(supported)), "is neither (",
           tf.strings.length(encoded), "bytes each; empty, corrupt or another format such as "
           "GIF, BMP, WebP or EPS)"])],
        encoded)

    # The first 33 bytes of every element, zero-padded (substr from 0 is valid on any string).
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(encoded, 0, _PNG_HEADER_BYTES),
                                              b"\x00" * _PNG_HEADER_BYTES]),
                             0, _PNG_HEADER_BYTES)
    head = tf.cast(tf.io.decode_raw(head, tf.uint8, fixed_length=_PNG_HEADER_BYTES), tf.int64)
    head = tf.reshape(head, [-1, _PNG_HEADER_BYTES])
    long_enough = tf.strings.length(encoded) >= _PNG_HEADER_BYTES
    ihdr_start = tf.reduce_all(tf.equal(head[:, 8:16], tf.constant(
        list(_PNG_IHDR_LENGTH_AND_TYPE), tf.int64)), axis=1)
    crc_ok = tf.equal(_crc32(head[:, 12:29]), _big_endian(head[:, 29:33]))
    png_width, png_height = _big_endian(head[:, 16:20]), _big_endian(head[:, 20:24])
    sides_ok = tf.logical_and(
        tf.logical_and(png_width >= 1, png_width <= _PNG_MAX_SIDE),
        tf.logical_and(png_height >= 1, png_height <= _PNG_MAX_SIDE))
    not_png = tf.logical_not(is_png)
    png_checks = [
        (tf.logical_or(not_png, long_enough),
         "is a truncated PNG (shorter than the 33-byte signature and IHDR chunk)"),
        (tf.logical_or(not_png, ihdr_start),
         "is a malformed PNG: its first chunk is not a 13-byte IHDR chunk"),
        (tf.logical_or(not_png, crc_ok), "is a corrupt PNG: the IHDR chunk's CRC does not match"),
        (tf.logical_or(not_png, sides_ok),
         "is a malformed PNG: its IHDR declares a width or height of 0 or over 2**31 - 1"),
    ]
    checks = []
    earlier_ok = tf.ones_like(is_png)
    for condition, text in png_checks:
        # An element fails only its first failing check, so the message names that one.
        failed = tf.logical_and(earlier_ok, tf.logical_not(condition))
        checks.append((tf.logical_not(tf.reduce_any(failed)),
                       ["image_bytes element", _first_index(failed), text]))
        earlier_ok = tf.logical_and(earlier_ok, condition)
    encoded = _refuse_unless(checks, encoded)

    def jpeg_size(element):
        data, jpeg = element
        return tf.cond(jpeg, lambda: tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64),
                       lambda: tf.zeros([2], tf.int64))

    jpeg_sizes = tf.map_fn(jpeg_size, (encoded, is_jpeg), parallel_iterations=1,
                           fn_output_signature=tf.TensorSpec([2], tf.int64))
    heights = tf.where(is_png, png_height, jpeg_sizes[:, 0])
    widths = tf.where(is_png, png_width, jpeg_sizes[:, 1])
    return heights, widths, is_png


def _decode_declared(encoded: tf.Tensor, is_png: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
                     channels: int) -> tf.Tensor:
    """One PNG or JPEG string whose header was checked -> float32 ``[height, width, channels]``
    in [0, 1]: PNG as ``uint16 / 65535`` (8-bit PNGs give exactly ``uint8 / 255``), JPEG as
    ``uint8 / 255`` (a CMYK JPEG for a 1-channel model through RGB, which libjpeg can convert
    it to). Refuses an image whose decoded size differs from its declared one."""
    def decode_png():
        pixels = tf.io.decode_png(encoded, channels=channels, dtype=tf.uint16)
        return tf.cast(pixels, tf.float32) / 65535.0

    def decode_jpeg():
        if channels != 1:
            return tf.cast(tf.io.decode_jpeg(encoded, channels=channels), tf.float32) / 255.0

        def cmyk_to_grey():
            # libjpeg converts CMYK to RGB but not to grey: go through RGB (ITU-R 601 luma).
            rgb = tf.io.decode_jpeg(encoded, channels=3)
            return tf.round(tf.image.rgb_to_grayscale(tf.cast(rgb, tf.float32))) / 255.0

        def grey():
            return tf.cast(tf.io.decode_jpeg(encoded, channels=1), tf.float32) / 255.0

        return tf.cond(tf.equal(tf.image.extract_jpeg_shape(encoded)[2], 4), cmyk_to_grey, grey)

    image = tf.cond(is_png, decode_png, decode_jpeg)
    image = tf.ensure_shape(image, [None, None, channels])
    decoded = tf.cast(tf.shape(image)[:2], tf.int64)
    return _refuse_unless(
        [(tf.reduce_all(tf.equal(decoded, tf.stack([height, width]))),
          ["an image decoded to height x width", decoded, "but its header declared",
           tf.stack([height, width])])], image)


def decode_image_bytes(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """One encoded PNG or JPEG (a string scalar) -> float32 ``[height, width, channels]`` in
    [0, 1], exactly as ``purify_bytes`` reads it: the header checked and its declared size read
    first (``declared_sizes``), then PNG decoded as ``uint16 / 65535`` and JPEG as
    ``uint8 / 255``. No size limit is applied here (``purify_bytes`` applies ``max_pixels``)."""
    encoded = tf.reshape(tf.convert_to_tensor(encoded, tf.string), [1])
    heights, widths, is_png = declared_sizes(encoded)
    return _decode_declared(encoded[0], is_png[0], heights[0], widths[0], channels)


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


def _classifier_num_classes(classifier: keras.Model, height_width, channels: int) -> int:
    """The classifier's static number of classes (its output's last dimension)."""
    try:
        num_classes = classifier.outputs[0].shape[-1]
    except (AttributeError, IndexError, TypeError, ValueError):
        num_classes = None
    if num_classes is None and height_width is not None:
        num_classes = classifier(tf.zeros([1, *height_width, channels])).shape[-1]
    if num_classes is None:
        raise ValueError("the classifier's output must have a static number of classes")
    return int(num_classes)


@dataclasses.dataclass(frozen=True)
class ServingFunctions:
    """What ``build_serving_functions`` returns.

    Attributes:
      signatures: signature name -> ``tf.function`` with an input signature, in export order
        (``serving_default``'s target first): ``classify`` (with a classifier), ``purify``,
        ``purify_bytes``.
      purify_core: the shared core, float32 ``[None, None, None, C]`` -> dict(purified,
        code_bits); no validation, not a signature of its own.
      purifier: the Keras model the functions call (the input purifier; the served noise is
        drawn in the graph and passed to it).
    """

    signatures: dict
    purify_core: object
    purifier: ComDefend


def _noise_stream(std: float, seed: int | None, stream: int) -> Callable | None:
    """A function from a shape to float32 noise ``N(0, std**2)``, or None when ``std`` is 0.

    The draw is TensorFlow's stateful ``RandomStandardNormal``: seed 0/0 (no ``seed``) makes
    each kernel seed itself from OS entropy when the graph is loaded; with ``seed`` the op gets
    ``(seed, stream + 1)`` (never 0/0), so each signature has its own reproducible stream.
    """
    if std == 0.0:
        return None
    op_seed, op_seed2 = (0, 0) if seed is None else (seed, stream + 1)

    def draw(shape):
        return std * tf.raw_ops.RandomStandardNormal(shape=shape, dtype=tf.float32,
                                                     seed=op_seed, seed2=op_seed2)

    return draw


def effective_noise_std(purifier: ComDefend, settings: ExportSettings) -> float:
    """The code noise std of the served graph: the settings' value, else the purifier's."""
    return float(purifier.config.inference_noise_std if settings.inference_noise_std is None
                 else settings.inference_noise_std)


def build_serving_functions(purifier: ComDefend, classifier: keras.Model | None = None,
                            settings: ExportSettings = ExportSettings()) -> ServingFunctions:
    """The serving ``tf.function``s, keyed by signature name, ``serving_default``'s target first.

    Args:
      purifier: a ComDefend model (its encoder and decoder weights are used as they are; the
        inference noise comes from ``settings`` and is drawn in the graph, not by the model's
        seed generator).
      classifier: optional Keras model from float32 ``[batch, height, width, C]`` in [0, 1] to
        logits or probabilities ``[batch, num_classes]``.
      settings: the export settings.

    Returns:
      a ``ServingFunctions``.
    """
    config = purifier.config
    channels = config.input_channels
    overlap = (receptive_field_radius(config) if settings.patch_overlap is None
               else settings.patch_overlap)
    chunk_pixels = chunk_pixels_for(settings.patch_size, overlap, settings.patch_batch_size)
    compute_dtype = purifier.compute_dtype
    noise_std = effective_noise_std(purifier, settings)
    output_specs = {"purified": (tf.float32, channels),
                    "code_bits": (tf.uint8, config.code_channels)}

    def core(images, stream: int):
        """Validated float32 [batch, height, width, C] -> dict(purified, code_bits); ``stream``
        tells the signatures' noise ops apart (with a seed)."""
        draw = _noise_stream(noise_std, settings.noise_seed, stream)

        def purify_windows(windows):
            code_shape = tf.concat([tf.shape(windows)[:3], [config.code_channels]], axis=0)
            # Always an explicit noise tensor: the model's own CodeNoise (a SeedGenerator whose
            # state a SavedModel would carry) never draws in the served graph.
            noise = tf.zeros([], tf.float32) if draw is None else draw(code_shape)
            outputs = purifier.forward(tf.cast(windows, compute_dtype), training=False,
                                       noise=noise)
            return {"purified": tf.cast(outputs["purified"], tf.float32),
                    "code_bits": tf.cast(outputs["noisy_logits"] > 0, tf.uint8)}

        return purify_patchwise_graph(purify_windows, images, settings.patch_size, overlap,
                                      chunk_pixels, output_specs)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32,
                                                name=INPUT_IMAGES)])
    def purify_core(images):
        """float32 [batch, height, width, C] in [0, 1] (already validated) -> dict(purified
        float32 same shape, code_bits uint8 [batch, height, width, code_channels])."""
        return core(images, stream=0)

    unknown_rank_images = tf.TensorSpec(None, tf.float32, name=INPUT_IMAGES)

    def checked_images(images, height_width=None):
        return validate_images(images, channels, settings.max_pixels, height_width,
                               settings.max_batch_size)

    @tf.function(input_signature=[unknown_rank_images])
    def purify(images):
        return core(checked_images(images), stream=1)

    def purify_encoded(image_bytes, stream):
        """Encoded PNG/JPEG strings (any shape; checked to be rank 1) -> purified PNGs."""
        count = tf.size(image_bytes)
        checked = _refuse_unless(
            [(tf.equal(tf.rank(image_bytes), 1),
              ["image_bytes must be a rank-1 string tensor [batch] of encoded images; got "
               "shape", tf.shape(image_bytes)]),
             (count >= 1, ["image_bytes must hold at least one encoded image; got none"]),
             (count <= settings.max_batch_size,
              [f"too many images: at most {settings.max_batch_size} images per request are "
               "accepted (the export's max_batch_size); got", count])], image_bytes)
        image_bytes = tf.reshape(checked, [-1])
        heights, widths, is_png = declared_sizes(image_bytes)
        pixels = heights * widths
        largest = tf.argmax(pixels, output_type=tf.int32)
        image_bytes = _refuse_unless(
            [(tf.reduce_sum(pixels) <= settings.max_pixels,
              [f"too many pixels: at most {settings.max_pixels} pixels (summed over the "
               "images' declared height x width) per request are accepted (the export's "
               "max_pixels); the headers declare", tf.reduce_sum(pixels), "in total; the "
               "largest, element", largest, "declares height x width",
               tf.stack([heights[largest], widths[largest]])])], image_bytes)

        def purify_one(element):
            encoded, png, height, width = element
            image = _decode_declared(encoded, png, height, width, channels)
            return _to_png(core(image[None], stream=stream)["purified"][0])

        pngs = tf.map_fn(purify_one, (image_bytes, is_png, heights, widths),
                         parallel_iterations=1, fn_output_signature=tf.TensorSpec([], tf.string))
        return {"purified_png_bytes": pngs}

    @tf.function(input_signature=[tf.TensorSpec(None, tf.string, name=INPUT_IMAGE_BYTES)])
    def purify_bytes(image_bytes):
        return purify_encoded(image_bytes, stream=2)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.string, name=INPUT_EXAMPLES)])
    def purify_examples(examples):
        # TF Model Garden's third input type: serialized tf.train.Example with the usual
        # ``image/encoded`` feature; every check of purify_bytes then applies to its images
        # (a missing feature parses as an empty string and is refused as neither PNG nor JPEG).
        checked = _refuse_unless(
            [(tf.equal(tf.rank(examples), 1),
              ["examples must be a rank-1 string tensor [batch] of serialized tf.train.Example; "
               "got shape", tf.shape(examples)])], examples)
        features = tf.io.parse_example(tf.reshape(checked, [-1]), {
            TFRECORD_IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string, default_value="")})
        return purify_encoded(features[TFRECORD_IMAGE_FEATURE], stream=4)

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
        num_classes = _classifier_num_classes(classifier, height_width, channels)

        def scores_of(purified):
            return tf.cast(classifier(purified, training=False), tf.float32)

        @tf.function(input_signature=[unknown_rank_images])
        def classify(images):
            purified = core(checked_images(images, height_width), stream=3)["purified"]
            # In chunks of the core's pixel budget: the classifier's memory is bounded too.
            scores = map_in_chunks(scores_of, purified, chunk_pixels, num_classes)
            probabilities = scores if emits_probabilities else tf.nn.softmax(scores, axis=-1)
            return {"probabilities": probabilities,
                    "class_ids": tf.argmax(probabilities, axis=-1, output_type=tf.int64)}

        signatures[SIGNATURE_CLASSIFY] = classify
    signatures[SIGNATURE_PURIFY] = purify
    signatures[SIGNATURE_PURIFY_BYTES] = purify_bytes
    signatures[SIGNATURE_PURIFY_EXAMPLES] = purify_examples
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
                    settings: ExportSettings, version: int,
                    classifier_record: dict | None = None,
                    provenance_warnings=()) -> dict:
    """The ``comdefend_export.json`` contents. ``defense_mode``: ``test_time`` (a classifier
    trained on clean images), ``train_and_test_time`` (one trained behind a purifier:
    ``classifier_record``, ``provenance.read_classifier_purifier``) or ``purify_only`` (no
    classifier); ``provenance_warnings``: the purifier mismatches found at export."""
    signatures = ([SIGNATURE_CLASSIFY] if classifier is not None else []) + [
        SIGNATURE_PURIFY, SIGNATURE_PURIFY_BYTES, SIGNATURE_PURIFY_EXAMPLES]
    overlap = (receptive_field_radius(purifier.config) if settings.patch_overlap is None
               else settings.patch_overlap)
    noise_std = effective_noise_std(purifier, settings)
    return {"version": version, "comdefend_config": purifier.config.to_dict(),
            "settings": dataclasses.asdict(settings),
            "effective_inference_noise_std": noise_std,
            "noise_source": ("none" if noise_std == 0.0 else
                             "os_entropy_per_process" if settings.noise_seed is None else
                             "fixed_seed_reproducible_per_process"),
            "patch_overlap": overlap,
            "chunk_pixels": chunk_pixels_for(settings.patch_size, overlap,
                                             settings.patch_batch_size),
            "limits": {"max_pixels_per_request": settings.max_pixels,
                       "max_batch_size": settings.max_batch_size,
                       "image_bytes_formats": ["png", "jpeg"]},
            "signatures": signatures, "serving_default": signatures[0],
            "classifier": None if classifier is None else classifier.name,
            "classifier_height_width": (None if classifier is None
                                        else classifier_height_width(classifier)),
            "defense_mode": ("purify_only" if classifier is None
                             else provenance.defense_mode(classifier_record, purifier)),
            "purifier_fingerprint": provenance.weights_fingerprint(purifier),
            "classifier_trained_behind_purifier": classifier_record,
            "provenance_warnings": list(provenance_warnings)}


def _write_version(archive, folder: str, metadata: dict) -> None:
    archive.write_out(folder, verbose=False)
    with open(os.path.join(folder, EXPORT_METADATA_FILENAME), "w") as handle:
        json.dump(metadata, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _fsync_tree(folder: str) -> None:
    """Flushes every file and folder under ``folder`` (and itself) to disk, so that the rename
    that publishes it cannot outlive its contents in a power loss."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(root)


def _fsync_dir(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _temp_name(kind: str, version: int) -> str:
    return f"{kind}{version}-pid{os.getpid()}-"


_TEMP_NAME = re.compile(r"^\.(?:partial|retired)-\d+-pid(\d+)-")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(export_base: str) -> list[str]:
    """Removes the hidden temporary folders of exports that died (killed, crashed) under
    ``export_base`` and returns their names.

    A folder is stale when its name does not carry a process id or carries the id of a process
    that no longer runs on this machine; folders of exports still running are kept. (Exports
    into one folder from several machines would need a lock instead.) Numeric versions are
    never touched. TF Serving ignores these folders anyway: it only loads numeric names.
    """
    if not os.path.isdir(export_base):
        return []
    removed = []
    for name in sorted(os.listdir(export_base)):
        if not name.startswith(_TEMP_PREFIXES):
            continue
        match = _TEMP_NAME.match(name)
        if match and _process_alive(int(match.group(1))):
            continue
        shutil.rmtree(os.path.join(export_base, name), ignore_errors=True)
        removed.append(name)
    return removed


def export_savedmodel(purifier: ComDefend, export_base: str, classifier: keras.Model | None = None,
                      settings: ExportSettings = ExportSettings(), version: int | None = None,
                      overwrite: bool = False, classifier_record: dict | None = None,
                      purifier_path: str | None = None) -> str:
    """Writes ``export_base/VERSION/`` (a SavedModel TF Serving can load) atomically.

    The version is built in a hidden temporary folder beside it (``.partial-VERSION-pidPID-*``,
    a name TF Serving ignores), flushed to disk (fsync) and renamed into place; on any error
    the temporary folder is removed and no version folder appears. A process killed mid-write
    (SIGKILL, power loss) leaves only its hidden folder, which the next export removes
    (``remove_stale_temporaries``). Besides the SavedModel, the folder holds
    ``comdefend_export.json`` (config, settings, limits, signature names).

    Args:
      purifier, classifier, settings: see ``build_serving_functions``.
      export_base: the folder TF Serving's ``--model_base_path`` points at.
      version: a positive integer; None takes one more than the highest existing version.
      overwrite: replace an existing version (otherwise ``FileExistsError``). The old folder
        is moved aside and the new one renamed in: in between, for two renames, the version is
        absent (never partial).
      classifier_record: the purifier the classifier was trained behind
        (``provenance.read_classifier_purifier``; None: trained on clean images). A record
        naming another purifier than ``purifier`` (weights or inference settings) is warned
        about (``provenance.PurifierMismatchWarning``) and listed in the metadata's
        ``provenance_warnings``; the metadata's ``defense_mode`` follows from it.
      purifier_path: where ``purifier`` came from (named in those warnings).

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
    mismatches = (provenance.check_composition(classifier_record, purifier, purifier_path)
                  if classifier is not None else [])
    archive = build_export_archive(purifier, classifier, settings)
    os.makedirs(export_base, exist_ok=True)
    remove_stale_temporaries(export_base)
    partial = tempfile.mkdtemp(prefix=_temp_name(".partial-", version), dir=export_base)
    try:
        _write_version(archive, partial,
                       export_metadata(purifier, classifier, settings, version,
                                       classifier_record, mismatches))
        _fsync_tree(partial)
        if os.path.exists(final):
            if not overwrite:
                raise FileExistsError(f"export version {final} appeared while writing; "
                                      "not overwriting it")
            retired = tempfile.mkdtemp(prefix=_temp_name(".retired-", version), dir=export_base)
            os.rename(final, os.path.join(retired, "old"))
            os.rename(partial, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(partial, final)
        _fsync_dir(export_base)
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
