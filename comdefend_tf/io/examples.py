"""The one ``tf.train.Example`` schema of images: feature names, the writer and the readers.

A record holds ``image/encoded`` (PNG or JPEG bytes) and, optionally, ``image/class/label``
(int64, -1 when absent), ``image/height``, ``image/width``, ``image/channels`` (int64),
``image/format``, ``image/source_key`` and the packed code bits (``image/code_bits``,
``image/code_channels``): the layout the Beam purifier writes and TF Model Garden reads.
``to_example``/``unpack_code_bits`` work on Python bytes; ``parse_example``,
``example_shape_and_label``, ``parse_encoded`` and ``unparsable`` are graph functions (bad input
raises ``InvalidArgumentError`` in the graph; ``unparsable`` finds, without raising, the records
``parse_encoded`` would fail on, whose error would quote the whole record).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf


FEATURE_ENCODED = "image/encoded"
FEATURE_LABEL = "image/class/label"
FEATURE_FORMAT = "image/format"
FEATURE_KEY = "image/source_key"
FEATURE_HEIGHT = "image/height"
FEATURE_WIDTH = "image/width"
FEATURE_CHANNELS = "image/channels"
FEATURE_CODE_BITS = "image/code_bits"          # np.packbits of uint8 [H, W, code_channels]
FEATURE_CODE_CHANNELS = "image/code_channels"


class PurifiedImage(NamedTuple):
    """One purified image to store: ``key`` (its source's name), ``label`` (-1 when none),
    ``png`` (8-bit PNG bytes), ``code_bits`` (uint8 0/1 ``[H, W, K]``) and ``shape``
    ``(height, width, channels)`` of the image."""

    key: str
    label: int
    png: bytes
    code_bits: np.ndarray
    shape: tuple


# ------------------------------------------------------------------------------ Python side
def to_example(item: PurifiedImage, include_code_bits: bool) -> bytes:
    """A serialized ``tf.train.Example`` of one purified image (features ``FEATURE_*``)."""
    def ints(*values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))

    def strings(*values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))

    height, width, channels = item.shape
    feature = {FEATURE_ENCODED: strings(item.png), FEATURE_FORMAT: strings(b"png"),
               FEATURE_LABEL: ints(item.label), FEATURE_KEY: strings(item.key.encode("utf-8")),
               FEATURE_HEIGHT: ints(height), FEATURE_WIDTH: ints(width),
               FEATURE_CHANNELS: ints(channels)}
    if include_code_bits:
        feature[FEATURE_CODE_BITS] = strings(np.packbits(item.code_bits.astype(np.uint8))
                                             .tobytes())
        feature[FEATURE_CODE_CHANNELS] = ints(item.code_bits.shape[-1])
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def unpack_code_bits(example: bytes) -> np.ndarray:
    """The uint8 0/1 code bits ``[H, W, K]`` stored in a purified ``tf.train.Example``."""
    features = tf.train.Example.FromString(example).features.feature
    shape = (features[FEATURE_HEIGHT].int64_list.value[0],
             features[FEATURE_WIDTH].int64_list.value[0],
             features[FEATURE_CODE_CHANNELS].int64_list.value[0])
    packed = np.frombuffer(features[FEATURE_CODE_BITS].bytes_list.value[0], np.uint8)
    return np.unpackbits(packed)[:int(np.prod(shape))].reshape(shape)


# ------------------------------------------------------------------------------- graph side
def parse_example(serialized: tf.Tensor) -> dict:
    """One serialized example (string scalar) -> dict of scalars: ``FEATURE_ENCODED`` (string,
    "" when absent), ``FEATURE_LABEL``, ``FEATURE_HEIGHT``, ``FEATURE_WIDTH`` and
    ``FEATURE_CHANNELS`` (int64, -1 when absent)."""
    return tf.io.parse_single_example(serialized, {
        FEATURE_ENCODED: tf.io.FixedLenFeature([], tf.string, default_value=""),
        FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        FEATURE_HEIGHT: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        FEATURE_WIDTH: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        FEATURE_CHANNELS: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    })


def example_shape_and_label(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``([height, width, channels] int64, label int64)`` of one record; decodes only when the
    record does not state its shape."""
    features = parse_example(serialized)
    stated = tf.stack([features[FEATURE_HEIGHT], features[FEATURE_WIDTH],
                       features[FEATURE_CHANNELS]])
    shape = tf.cond(
        tf.reduce_all(stated > 0), lambda: stated,
        lambda: tf.cast(tf.shape(tf.io.decode_image(features[FEATURE_ENCODED],
                                                    expand_animations=False)), tf.int64))
    return shape, features[FEATURE_LABEL]


def _encoded_only() -> dict:
    return {FEATURE_ENCODED: tf.io.FixedLenFeature([], tf.string, default_value="")}


def parse_encoded(serialized: tf.Tensor) -> tf.Tensor:
    """Serialized examples string ``[n]`` -> their ``FEATURE_ENCODED`` bytes, string ``[n]``
    ("" where the feature is absent). Check ``unparsable`` first: the parser's own error
    quotes the whole record, raw (not even valid UTF-8)."""
    return tf.io.parse_example(serialized, _encoded_only())[FEATURE_ENCODED]


def unparsable(serialized: tf.Tensor) -> tf.Tensor:
    """Serialized examples string ``[n]`` -> bool ``[n]``: True where ``parse_encoded`` would
    fail (not a ``tf.train.Example``, or ``FEATURE_ENCODED`` not one bytes value).

    Each record is parsed on its own in a ``tf.data`` pipeline whose ``ignore_errors`` drops
    the failures; their parse errors, messages and all, are discarded there, never raised.
    """
    count = tf.size(serialized, out_type=tf.int64)

    def parse_one(index, record):
        return index, tf.io.parse_single_example(record, _encoded_only())[FEATURE_ENCODED]

    parsed = tf.data.Dataset.from_tensor_slices((tf.range(count), serialized)).map(
        parse_one).ignore_errors()
    return parsed.reduce(tf.ones([count], tf.bool), lambda failed, item: (
        tf.tensor_scatter_nd_update(failed, [[item[0]]], [False])))
