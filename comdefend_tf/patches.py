"""Patch-wise purification of images of any size, with memory bounded by the patch batch.

The authors' release cuts a 224x224 image into a 7x7 grid of 32x32 tiles, purifies each tile
alone (its own zero padding and noise draw) and stitches them back. This module generalises that:

* ``patch_size`` p: each output tile is p x p (smaller when the image is).
* ``overlap`` o: every tile is purified with up to o pixels of real image context on each side,
  which is cropped away afterwards. ComDefend's receptive field radius is the number of
  convolutions in both networks (18 for ``paper``); with o >= that radius patch-wise output
  equals whole-image output exactly, while o = 0 reproduces the release's seams.
* Edges that do not divide evenly: the last tile of a row or column is moved inward so it
  ends at the image edge; it only contributes the pixels no earlier tile owns. Windows never
  leave the image, so no artificial padding content is ever purified.
* Memory: at most ``batch_size`` windows are in the network at once, whatever the image size.
  ``exact_tiling`` picks the tile size, overlap (the receptive-field radius) and batch so that
  one call holds at most a given number of window pixels, and ``whole_image_pixel_budget``
  derives that number from the model's widths and an activation-memory target (2 GiB:
  349,525 pixels for the ``paper`` widths, whose whole-image mode needs about 6 KB per pixel,
  tens of GB for a 24-megapixel photo).

All windows of one image have the same shape, so tiles from every image in the batch share
network calls. Works with any callable from images to images (a ComDefend model, a baseline
defense) and on every Keras backend; the geometry is computed from static shapes in Python.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from keras import ops


@dataclasses.dataclass(frozen=True)
class _Axis:
    """Tiling of one image axis: where each window starts and which part of it is kept."""

    window: int              # window length (patch + context, clipped to the image)
    starts: tuple[int, ...]  # window start per tile
    keep: tuple[tuple[int, int], ...]  # (offset inside the window, length) kept per tile


def _tile_axis(length: int, patch_size: int, overlap: int) -> _Axis:
    patch = min(patch_size, length)
    window = min(patch + 2 * overlap, length)
    count = -(-length // patch)
    starts, keep = [], []
    for index in range(count):
        owned_start = index * patch
        owned_end = min(owned_start + patch, length)
        tile_start = min(owned_start, length - patch)  # last tile moves inward
        window_start = min(max(tile_start - overlap, 0), length - window)
        starts.append(window_start)
        keep.append((owned_start - window_start, owned_end - owned_start))
    return _Axis(window, tuple(starts), tuple(keep))


def receptive_field_radius(config) -> int:
    """Pixels of context one output pixel depends on, per side: one per 3x3 convolution."""
    return len(config.encoder_widths) + len(config.decoder_widths) + 2


def purify_patchwise(purify_fn: Callable, images, patch_size: int = 32, overlap: int = 0,
                     batch_size: int = 64):
    """Applies ``purify_fn`` tile by tile and stitches the result.

    Args:
      purify_fn: callable from float ``[n, h, w, channels]`` in [0, 1] to the same shape.
      images: float ``[batch, height, width, channels]`` in [0, 1], static height and width.
      patch_size: side of each output tile in pixels (>= 1).
      overlap: context pixels on each side of a tile, purified and then discarded (>= 0).
      batch_size: windows per call of ``purify_fn``: bounds peak memory.

    Returns:
      float ``[batch, height, width, channels]``: the stitched purified images.
    """
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = ops.convert_to_tensor(images)
    if len(images.shape) != 4:
        raise ValueError(f"images must be [batch, height, width, channels], got shape "
                         f"{tuple(images.shape)}")
    num_images, height, width, _ = images.shape
    if height is None or width is None or num_images is None:
        raise ValueError("purify_patchwise needs static image shapes; the SavedModel export "
                         "has a graph version for dynamic shapes")
    rows, cols = _tile_axis(height, patch_size, overlap), _tile_axis(width, patch_size, overlap)
    windows = [(image, r, c) for image in range(num_images)
               for r in range(len(rows.starts)) for c in range(len(cols.starts))]

    kept, bands, last_col = {}, {}, len(cols.starts) - 1
    for first in range(0, len(windows), batch_size):
        chunk = windows[first:first + batch_size]
        batch = ops.stack([
            images[image, rows.starts[r]:rows.starts[r] + rows.window,
                   cols.starts[c]:cols.starts[c] + cols.window, :]
            for image, r, c in chunk])
        purified = purify_fn(batch)
        for index, (image, r, c) in enumerate(chunk):
            (row_offset, row_len), (col_offset, col_len) = rows.keep[r], cols.keep[c]
            kept[image, r, c] = purified[index, row_offset:row_offset + row_len,
                                         col_offset:col_offset + col_len, :]
            if c == last_col:
                # Windows run row by row, so this row is complete: join it now and free its
                # tiles, which keeps about one image's worth of tiles alive instead of two.
                bands[image, r] = ops.concatenate(
                    [kept.pop((image, r, col)) for col in range(last_col + 1)], axis=1)

    stitched = [ops.concatenate([bands.pop((image, r)) for r in range(len(rows.starts))],
                                axis=0) for image in range(num_images)]
    if num_images == 1:
        return ops.expand_dims(stitched[0], 0)  # no copy, unlike stack
    return ops.stack(stitched)


# Peak activation memory of one whole-image call, per pixel, is about the largest
# (input + output channels) of any convolution, in float32, times this factor: the convolution
# workspace and the allocator's slack. Measured on CPU (oneDNN) with the paper widths: 5.2-5.3
# KB per pixel at 256x256 and 512x512 against 1.5 KB of input + output maps, a factor of 3.5.
ACTIVATION_OVERHEAD = 4
DEFAULT_ACTIVATION_MEMORY_BYTES = 2 * 2**30


def activation_bytes_per_pixel(config) -> int:
    """Estimated peak bytes per image pixel of one float32 ComDefend call (see
    ``ACTIVATION_OVERHEAD``): 6144 for the ``paper`` widths, 320 for ``tiny``."""
    widths = ([config.input_channels, *config.encoder_widths, config.code_channels,
               *config.decoder_widths, config.input_channels])
    largest = max(a + b for a, b in zip(widths, widths[1:]))
    return 4 * largest * ACTIVATION_OVERHEAD


def whole_image_pixel_budget(config,
                             memory_bytes: int = DEFAULT_ACTIVATION_MEMORY_BYTES) -> int:
    """The most pixels one network call may hold within ``memory_bytes`` of activations
    (349,525 for the ``paper`` widths and the default 2 GiB: about 590x590)."""
    return max(1, memory_bytes // activation_bytes_per_pixel(config))


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Exact tiling under a pixel budget: tiles of ``patch_size`` with ``overlap`` (the
    receptive-field radius) of context, ``batch_size`` windows per call."""

    patch_size: int
    overlap: int
    batch_size: int


def exact_tiling(config, height: int, width: int, max_pixels: int) -> Tiling:
    """Tiles whose windows (tile + context on each side) hold at most ``max_pixels`` pixels
    per network call and whose stitched result equals the whole-image result.

    The window is the largest square within the budget (clipped to the image); the tile is that
    minus the receptive-field radius on each side; as many windows share a call as fit.

    Raises:
      ValueError: the budget cannot hold a window of at least three radii square.
    """
    overlap = receptive_field_radius(config)
    side = math.isqrt(max_pixels)
    patch = side - 2 * overlap
    if patch < overlap:
        raise ValueError(f"a pixel budget of {max_pixels:,} is too small for exact tiles: the "
                         f"receptive-field radius of {overlap} needs windows of at least "
                         f"{3 * overlap}x{3 * overlap} = {9 * overlap * overlap:,} pixels")
    window_h = min(patch + 2 * overlap, height)
    window_w = min(patch + 2 * overlap, width)
    return Tiling(patch, overlap, max(1, max_pixels // (window_h * window_w)))
