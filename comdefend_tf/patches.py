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

All windows of one image have the same shape, so tiles from every image in the batch share
network calls. Works with any callable from images to images (a ComDefend model, a baseline
defense) and on every Keras backend; the geometry is computed from static shapes in Python.
"""

from __future__ import annotations

import dataclasses
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
