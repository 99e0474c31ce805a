"""In-graph patch-wise purification with dynamic shapes, in chunks of a fixed pixel budget.

The tile geometry is ``comdefend_tf.patches``' own (``axis_tiling``, ``window_start``) evaluated
on int32 tensors, so the served graph and ``patches.purify_patchwise`` cut images alike. Images:
float32 ``[batch, height, width, C]``, static ``C``, everything else dynamic. Memory is bounded
by ``chunk_pixels`` window pixels per network call (or one window, when a window is larger).
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from comdefend_tf import patches


def _axis_tiling(length, patch_size: int, overlap: int):
    """Tiling of one image axis of dynamic ``length`` (int32 scalar).

    Returns ``(window, window_starts, owner, position_in_window)``: the window length, the
    start of every window ``[count]``, and for every pixel ``[length]`` the tile that owns it
    and its position inside that tile's window.
    """
    patch, window, count = patches.axis_tiling(length, patch_size, overlap, minimum=tf.minimum)
    window_starts = patches.window_start(tf.range(count), length, patch, window, overlap,
                                         minimum=tf.minimum, maximum=tf.maximum)
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

    Output tiles of ``patch_size``, windows with ``overlap`` context pixels that never leave
    the image, the last tile of a row or column moved inward (``comdefend_tf.patches``). All
    windows of one call have the same size (all images of a batch do); they are purified
    ``max(1, chunk_pixels // window pixels)`` at a time in a ``tf.while_loop`` with
    ``parallel_iterations=1``, so the number of network calls is about the request's pixels
    over ``chunk_pixels`` however the pixels are split into images.

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
