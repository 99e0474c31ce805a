"""Repeated purification calls with the same shape reuse one trace (no per-call retracing)."""

import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf.training import precision
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


def _linear_model(size=16, classes=4, seed=0):
    weights = tf.constant(np.random.default_rng(seed).normal(size=(size, classes)), tf.float32)

    def logits(images):
        return tf.matmul(tf.reshape(images, [tf.shape(images)[0], -1]), weights)
    return logits


def test_apgd_runs_on_one_model_share_one_trace():
    from comdefend_tf.attacks import apgd as apgd_lib

    model = _linear_model()
    rng = np.random.default_rng(3)
    images = rng.uniform(size=(6, 4, 4, 1)).astype(np.float32)
    labels = np.arange(6) % 4
    # Different eps and seeds: one trace of the iteration per configuration.
    for eps, seed in ((0.05, 0), (0.1, 1), (0.2, 2)):
        apgd_lib.apgd(model, images, labels, eps, steps=5, seed=seed)
    functions = apgd_lib.compiled_functions(model, "ce", "linf", 1, False, False)
    assert functions.iterate.experimental_get_tracing_count() == 1
    assert functions.start.experimental_get_tracing_count() == 1
    # APGD-T: one trace for all targets (same chunk size).
    apgd_lib.apgd_targeted(model, images, labels, 0.05, steps=3, n_target_classes=3,
                           batch_size=3)
    targeted = apgd_lib.compiled_functions(model, "dlr", "linf", 1, True, False)
    assert targeted.iterate.experimental_get_tracing_count() <= 2  # chunks of 3, then fewer


def test_square_forward_pass_is_traced_once_for_every_batch_size():
    from comdefend_tf.attacks import square as square_lib

    model = _linear_model()
    rng = np.random.default_rng(4)
    images = rng.uniform(size=(6, 4, 4, 1)).astype(np.float32)
    labels = np.arange(6) % 4
    for queries in (5, 9):  # the unbroken set shrinks as examples break
        square_lib.square(model, images, labels, 0.3, queries=queries)
    forward = square_lib._forward(model, images.shape[1:])
    assert forward.experimental_get_tracing_count() == 1
