"""The one tf.train.Example schema: what the writer stores, what the graph readers give back,
and what they refuse before decoding."""

import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf.io import examples
from tests.io.encoded import example as _example, png_bytes as _png_bytes


# -------------------------------------------------------------------------- Python side
@pytest.mark.parametrize("include_code_bits", [False, True])
def test_to_example_stores_every_feature(include_code_bits):
    bits = np.random.default_rng(0).integers(0, 2, (5, 7, 12)).astype(np.uint8)
    png = _png_bytes(np.zeros((5, 7), np.uint8))
    item = examples.PurifiedImage("cats/ké.png", 3, png, bits, (5, 7, 1))
    serialized = examples.to_example(item, include_code_bits)
    feature = tf.train.Example.FromString(serialized).features.feature
    assert feature[examples.FEATURE_ENCODED].bytes_list.value == [png]
    assert feature[examples.FEATURE_FORMAT].bytes_list.value == [b"png"]
    assert feature[examples.FEATURE_KEY].bytes_list.value == ["cats/ké.png".encode("utf-8")]
    assert [feature[name].int64_list.value[0] for name in (
        examples.FEATURE_LABEL, examples.FEATURE_HEIGHT, examples.FEATURE_WIDTH,
        examples.FEATURE_CHANNELS)] == [3, 5, 7, 1]
    assert (examples.FEATURE_CODE_BITS in feature) == include_code_bits
    if include_code_bits:
        assert feature[examples.FEATURE_CODE_CHANNELS].int64_list.value == [12]
        np.testing.assert_array_equal(examples.unpack_code_bits(serialized), bits)
    assert examples.to_example(item, include_code_bits) == serialized  # deterministic bytes


def test_parse_example_reads_what_to_example_wrote_and_defaults_the_rest():
    png = _png_bytes(np.zeros((4, 6, 3), np.uint8))
    written = examples.to_example(examples.PurifiedImage("k", 2, png, np.zeros((4, 6, 1)),
                                                         (4, 6, 3)), False)
    parsed = examples.parse_example(tf.constant(written))
    assert parsed[examples.FEATURE_ENCODED].numpy() == png
    assert [int(parsed[name]) for name in (examples.FEATURE_LABEL, examples.FEATURE_HEIGHT,
                                           examples.FEATURE_WIDTH, examples.FEATURE_CHANNELS)] \
        == [2, 4, 6, 3]
    bare = examples.parse_example(tf.constant(tf.train.Example().SerializeToString()))
    assert bare[examples.FEATURE_ENCODED].numpy() == b""
    assert int(bare[examples.FEATURE_LABEL]) == -1 and int(bare[examples.FEATURE_HEIGHT]) == -1
    shape, label = examples.example_shape_and_label(tf.constant(_example(png)))
    assert shape.numpy().tolist() == [4, 6, 3] and int(label) == -1
    encoded = examples.parse_encoded(tf.constant([written, _example(b"x", 1),
                                                  tf.train.Example().SerializeToString()]))
    assert encoded.numpy().tolist() == [png, b"x", b""]


def test_unparsable_finds_the_records_the_parser_would_fail_on_without_raising():
    png = _png_bytes(np.zeros((2, 3), np.uint8))
    garbage = np.random.RandomState(0).randint(0, 256, 4096, dtype=np.uint8).tobytes()
    as_ints = tf.train.Example(features=tf.train.Features(feature={
        examples.FEATURE_ENCODED: tf.train.Feature(int64_list=tf.train.Int64List(value=[7]))}))
    two_values = tf.train.Example(features=tf.train.Features(feature={
        examples.FEATURE_ENCODED: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[png, png]))}))
    records = [_example(png), garbage, tf.train.Example().SerializeToString(),
               as_ints.SerializeToString(), two_values.SerializeToString(), _example(png)[:9],
               b"", _example(b"\xff\xfe", label=3)]
    expected = [False, True, False, True, True, True, False, False]
    assert examples.unparsable(tf.constant(records)).numpy().tolist() == expected
    in_graph = tf.function(examples.unparsable, input_signature=[tf.TensorSpec([None],
                                                                               tf.string)])
    assert in_graph(tf.constant(records)).numpy().tolist() == expected
    assert in_graph(tf.zeros([0], tf.string)).numpy().tolist() == []
    # Every record the check passes parses; every one it flags makes the parser raise.
    parsable = [record for record, bad in zip(records, expected) if not bad]
    assert examples.parse_encoded(tf.constant(parsable)).shape == (len(parsable),)
    for record, bad in zip(records, expected):
        if bad:
            with pytest.raises((tf.errors.InvalidArgumentError, UnicodeDecodeError)):
                examples.parse_encoded(tf.constant([record]))
