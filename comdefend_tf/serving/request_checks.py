"""In-graph checks of serving requests, run before any decoding or network call.

Every check raises ``tf.errors.InvalidArgumentError`` whose message names the first problem
(rank, channels, empty, batch over ``max_batch_size``, pixels over ``max_pixels``, NaN, values
outside [0, 1], a record that is not a ``tf.train.Example``); a checked tensor is produced only
after its checks passed, so nothing that consumes it runs on a refused request. Pixel counts
are compared without any int64 product or sum that could wrap around, and a message quotes at
most ``QUOTED_BYTES`` bytes of input, escaped. ``refuse_unless``
(``comdefend_tf.io.graph_headers``) is the one mechanism behind every refusal.
"""

from __future__ import annotations

import tensorflow as tf

from comdefend_tf.io import examples as example_io
from comdefend_tf.io.graph_headers import QUOTED_BYTES, escaped_prefix, refuse_unless


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
    checks.append((_product_at_most([shape4[0], shape4[1], shape4[2]], max_pixels),
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


def _product_at_most(factors: list, limit: int) -> tf.Tensor:
    """Whether the product of int64 scalars ``factors`` is at most ``limit``, exactly
    and without multiplying: ``a * b <= L`` iff ``b <= L // a`` for ``a >= 1``, so no product
    of huge dimensions can wrap around to a small one. A factor below 1 gives False."""
    remaining = tf.constant(limit, tf.int64)
    fits = tf.constant(True)
    for factor in factors:
        fits = tf.logical_and(fits, tf.logical_and(factor >= 1, factor <= remaining))
        remaining = remaining // tf.maximum(factor, 1)
    return fits


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
    sum to at most ``max_pixels``.

    First every element is checked on its own (the refusal names the first one over the
    budget), then the sum, which cannot wrap around: each size is clamped to ``max_pixels + 1``
    and the running sums are compared, so the first prefix over the budget is computed exactly
    (it is at most ``2 * max_pixels + 1 < 2**63``, ``ExportSettings`` keeps ``max_pixels``
    below 2**62) and what follows it cannot make the request pass. A side is at most
    2**31 - 1, so one element's height x width is exact in int64.
    """
    pixels = heights * widths
    over = pixels > max_pixels
    first_over = tf.argmax(tf.cast(over, tf.int32), output_type=tf.int32)
    running = tf.cumsum(tf.minimum(pixels, max_pixels + 1))
    over_total = running > max_pixels
    first_total = tf.argmax(tf.cast(over_total, tf.int32), output_type=tf.int32)
    return refuse_unless(
        [(tf.logical_not(tf.reduce_any(over)),
          [f"too many pixels: at most {max_pixels} pixels per request are accepted (the "
           "export's max_pixels); image_bytes element", first_over, "alone declares height x "
           "width", tf.stack([heights[first_over], widths[first_over]])]),
         (tf.logical_not(tf.reduce_any(over_total)),
          [f"too many pixels: at most {max_pixels} pixels (summed over the images' declared "
           "height x width) per request are accepted (the export's max_pixels); the headers "
           "of elements 0 to", first_total, "already declare", running[first_total],
           "in total"])], image_bytes)


def validate_examples(examples: tf.Tensor, max_batch_size: int) -> tf.Tensor:
    """Serialized ``tf.train.Example`` strings of unknown rank -> string ``[batch]``, once
    checked: rank 1, at most ``max_batch_size`` records, every record parsable with its
    ``image/encoded`` one bytes value (``example_io.unparsable``). The refusal names the first
    bad record and quotes at most its first ``QUOTED_BYTES`` bytes, escaped."""
    shaped = refuse_unless(
        [(tf.equal(tf.rank(examples), 1),
          ["examples must be a rank-1 string tensor [batch] of serialized tf.train.Example; "
           "got shape", tf.shape(examples)]),
         _too_many_images(max_batch_size, tf.size(examples))], examples)
    records = tf.reshape(shaped, [-1])
    failed = example_io.unparsable(records)
    first = tf.argmax(tf.cast(failed, tf.int32), output_type=tf.int32)
    return refuse_unless(
        [(tf.logical_not(tf.reduce_any(failed)),
          ["examples element", first, "is not a serialized tf.train.Example with one bytes "
           f"value in {example_io.FEATURE_ENCODED!r} (", tf.strings.length(records[first]),
           f"bytes; the first {QUOTED_BYTES}, escaped:", escaped_prefix(records[first]),
           ")"])], records)
