"""Patch-wise purification of images of any size: the tile geometry and its static-shape use.

Images are float ``[batch, height, width, channels]`` in [0, 1]. Output tiles are
``patch_size`` on a side (smaller when the image is); each is purified in a window with up to
``overlap`` pixels of real context per side, cropped afterwards; the last tile of a row or
column moves inward, and windows never leave the image. With ``overlap`` >= the receptive
field radius (``receptive_field_radius``) tiled output equals whole-image output; 0 reproduces
the authors' release (32x32 tiles, seams). ``axis_tiling``/``window_start`` are the geometry,
for Python ints and for the SavedModel's int32 tensors alike; at most ``batch_size`` windows
are in the network at once. Bad arguments raise ``ValueError``. Memory measurements:
docs/internals/serving.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from keras import ops


def axis_tiling(length, patch_size, overlap, minimum=min):
    """The tiling of one image axis of ``length`` pixels: ``(patch, window, count)``.

    ``patch``: the tile side (``patch_size``, or ``length`` when shorter); ``window``: the tile
    plus ``overlap`` context pixels per side, clipped to the axis; ``count``: the number of
    tiles. Tile ``i`` owns pixels ``[i * patch, min((i + 1) * patch, length))``. Works on
    Python ints (the default ``minimum``) and on integer tensors (``minimum=tf.minimum``, as
    the SavedModel export does): one geometry for both.
    """
    patch = minimum(patch_size, length)
    window = minimum(patch + 2 * overlap, length)
    count = (length + patch - 1) // patch
    return patch, window, count


def window_start(tile_index, length, patch, window, overlap, minimum=min, maximum=max):
    """Where the window of tile ``tile_index`` (an int, or an integer tensor of indices with
    tensor ``minimum``/``maximum``) starts: ``overlap`` pixels before the tile, never outside
    the axis; the last tile moves inward so that it ends at the edge."""
    tile_start = minimum(tile_index * patch, length - patch)
    return minimum(maximum(tile_start - overlap, 0), length - window)


@dataclasses.dataclass(frozen=True)
class _Axis:
    """Tiling of one image axis: where each window starts and which part of it is kept."""

    window: int              # window length (patch + context, clipped to the image)
    starts: tuple[int, ...]  # window start per tile
    keep: tuple[tuple[int, int], ...]  # (offset inside the window, length) kept per tile


def _tile_axis(length: int, patch_size: int, overlap: int) -> _Axis:
    patch, window, count = axis_tiling(length, patch_size, overlap)
    starts, keep = [], []
    for index in range(count):
        owned_start = index * patch
        owned_end = min(owned_start + patch, length)
        start = window_start(index, length, patch, window, overlap)
        starts.append(start)
        keep.append((owned_start - start, owned_end - owned_start))
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


# Peak activation memory per pixel of one whole-image call is about the largest (input +
# output channels) of any convolution, in float32, times this factor (the convolution
# workspace and allocator slack; measured 3.5 on CPU, see docs/internals/serving.md).
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
