"""The LiteRT purifier as a defense: its forward pass is the LiteRT output, its gradient the
float purifier's BPDA gradient, and it says whether it is randomized."""

import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("ai_edge_litert", reason="the [litert] extra runs converted purifiers")

from comdefend_tf.evaluation.baselines import is_randomized  # noqa: E402
from comdefend_tf.litert import convert  # noqa: E402
from comdefend_tf.litert.defense import LiteRTPurifierDefense  # noqa: E402
from comdefend_tf.litert.runtime import LiteRTInputError, LiteRTPurifier  # noqa: E402

SIZE = (16, 16)


@pytest.fixture(scope="module")
def int8_defense(purifier, calibration):
    litert = LiteRTPurifier(convert.convert(purifier, "full_int8", SIZE, 0.0, calibration))
    return LiteRTPurifierDefense(litert, purifier)


def _images(seed=0):
    return tf.constant(np.random.default_rng(seed).random((2, *SIZE, 1), dtype=np.float32))


def test_forward_is_the_litert_output(int8_defense, purifier):
    images = _images()
    defended = int8_defense(images).numpy()
    litert = int8_defense.litert.purify(images.numpy())
    np.testing.assert_allclose(defended, litert, atol=1e-6)
    # The int8 purifier is not the float one: the test would notice a float forward pass.
    assert np.abs(litert - np.asarray(purifier(images))).max() > 1e-3


def test_gradient_is_the_float_purifiers_bpda_gradient(int8_defense, purifier):
    images = _images(1)
    weights = tf.constant(np.random.default_rng(2).normal(size=images.shape), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(images)
        through_defense = tf.reduce_sum(weights * int8_defense(images))
        through_float = tf.reduce_sum(weights * purifier(images, training=False))
    defense_gradient = tape.gradient(through_defense, images).numpy()
    float_gradient = tape.gradient(through_float, images).numpy()
    assert np.abs(float_gradient).max() > 0
    np.testing.assert_allclose(defense_gradient, float_gradient, rtol=1e-6, atol=1e-7)


def test_runs_inside_a_tf_function(int8_defense):
    images = _images(3)
    compiled = tf.function(lambda x: int8_defense(x))
    np.testing.assert_allclose(compiled(images).numpy(),
                               int8_defense.litert.purify(images.numpy()), atol=1e-6)


def test_randomized_follows_the_file_and_describe_says_so(purifier):
    noisy = LiteRTPurifierDefense(
        convert.convert(purifier.with_inference(noise_std=1.0), "float32", SIZE, 1.0),
        purifier.with_inference(noise_std=1.0))
    assert noisy.randomized and is_randomized(noisy)
    assert "noise per call" in noisy.describe() and "BPDA" in noisy.describe()
    quiet = LiteRTPurifierDefense(convert.convert(purifier, "float32", SIZE, 0.0), purifier)
    assert not quiet.randomized and not is_randomized(quiet)
    assert "noise off" in quiet.describe()


def test_refused_input_raises_the_runtime_error(int8_defense):
    images = tf.constant(np.full((1, *SIZE, 1), 2.0, np.float32))
    with pytest.raises(Exception, match=r"values in \[0, 1\]") as raised:
        int8_defense(images)
    assert isinstance(raised.value, (LiteRTInputError, tf.errors.InvalidArgumentError))
