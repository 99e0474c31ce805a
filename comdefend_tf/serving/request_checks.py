"""In-graph checks of serving requests, run before any decoding or network call.

Every check raises ``tf.errors.InvalidArgumentError`` whose message names the first problem
(rank, channels, empty, batch over ``max_batch_size``, pixels over ``max_pixels``, NaN, values
outside [0, 1]); a checked tensor is produced only after its checks passed, so nothing that
consumes it runs on a refused request. ``refuse_unless`` (``comdefend_tf.io.graph_headers``)
is the one mechanism behind every refusal.
"""

from __future__ import annotations

import tensorflow as tf

from comdefend_tf.io.graph_headers import refuse_unless


def _too_many_images(max_batch_size: int, count, got: str = "got") -> tuple:
    return (count <= max_batch_size,
            [f"too many images: at most {max_batch_size} images per request are accepted (the "
             f"export's max_batch_size); {got}", count])


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
        checks.append(_too_many_images(max_batch_size, shape4[0], got="got batch"))
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
    shaped = refuse_unless(checks, images)
    smallest, largest = tf.reduce_min(shaped), tf.reduce_max(shaped)
    checked = refuse_unless(
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


def validate_encoded_batch(image_bytes: tf.Tensor, max_batch_size: int) -> tf.Tensor:
    """Encoded images of unknown rank -> string ``[batch]``, once checked: rank 1, at least one
    element, at most ``max_batch_size`` elements."""
    count = tf.size(image_bytes)
    checked = refuse_unless(
        [(tf.equal(tf.rank(image_bytes), 1),
          ["image_bytes must be a rank-1 string tensor [batch] of encoded images; got "
           "shape", tf.shape(image_bytes)]),
         (count >= 1, ["image_bytes must hold at least one encoded image; got none"]),
         _too_many_images(max_batch_size, count)], image_bytes)
    return tf.reshape(checked, [-1])


def validate_declared_pixels(image_bytes: tf.Tensor, heights: tf.Tensor, widths: tf.Tensor,
                             max_pixels: int) -> tf.Tensor:
    """``image_bytes`` once the declared sizes (int64 ``[batch]`` each, read from the headers)
    sum to at most ``max_pixels``; the refusal names the largest image."""
    pixels = heights * widths
    largest = tf.argmax(pixels, output_type=tf.int32)
    return refuse_unless(
        [(tf.reduce_sum(pixels) <= max_pixels,
          [f"too many pixels: at most {max_pixels} pixels (summed over the "
           "images' declared height x width) per request are accepted (the export's "
           "max_pixels); the headers declare", tf.reduce_sum(pixels), "in total; the "
           "largest, element", largest, "declares height x width",
           tf.stack([heights[largest], widths[largest]])])], image_bytes)


def validate_examples(examples: tf.Tensor) -> tf.Tensor:
    """Serialized ``tf.train.Example`` strings of unknown rank -> string ``[batch]``, once
    checked to be rank 1."""
    checked = refuse_unless(
        [(tf.equal(tf.rank(examples), 1),
          ["examples must be a rank-1 string tensor [batch] of serialized tf.train.Example; "
           "got shape", tf.shape(examples)])], examples)
    return tf.reshape(checked, [-1])
