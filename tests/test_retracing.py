"""Repeated purification calls with the same shape reuse one trace (no per-call retracing)."""

import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf import precision
from comdefend_tf.config import get_config
from comdefend_tf.patches import purify_patchwise


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_same_shape_calls_trace_once(compute):
    model = precision.build_comdefend(get_config("tiny"), compute, seed=0)
    traces = []

    @tf.function
    def purify(images):
        traces.append(images.shape)  # runs only while tracing
        return model(images, training=False)

    rng = np.random.default_rng(0)
    for _ in range(4):
        purify(tf.constant(rng.random((2, 12, 12, 3), dtype=np.float32)))
    assert len(traces) == 1 and purify.experimental_get_tracing_count() == 1
    purify(tf.constant(rng.random((2, 20, 12, 3), dtype=np.float32)))  # a new shape: one more
    assert purify.experimental_get_tracing_count() == 2


def test_patchwise_reuses_the_trace_across_images_of_one_size():
    model = precision.build_comdefend(get_config("tiny"), "float32", seed=0)
    purify = tf.function(lambda images: model(images, training=False))
    rng = np.random.default_rng(1)
    for _ in range(3):
        purify_patchwise(purify, rng.random((1, 40, 40, 3), dtype=np.float32), patch_size=16,
                         overlap=2, batch_size=4)
    # 3x3 windows of 20x20 in chunks of 4, 4 and 1: two window-batch shapes, traced once each.
    assert purify.experimental_get_tracing_count() == 2


def test_unknown_size_signature_never_retraces_for_new_sizes():
    model = precision.build_comdefend(get_config("tiny"), "float32", seed=0)
    purify = tf.function(lambda images: model(images, training=False),
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    rng = np.random.default_rng(2)
    for size in (8, 13, 21, 8):
        out = purify(tf.constant(rng.random((1, size, size, 3), dtype=np.float32)))
        assert out.shape == (1, size, size, 3)
    assert purify.experimental_get_tracing_count() == 1
