"""The straight-through binarizer and the code-noise layer."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from comdefend_tf.layers import CodeNoise, StraightThroughBinarize, hard_threshold


def test_binarize_forward_is_exact_zero_one_threshold():
    logits = np.array([-1544.3, -2.0, -1e-6, 0.0, 1e-6, 0.7, 1544.3], np.float32)
    bits = np.asarray(StraightThroughBinarize()(logits))
    np.testing.assert_array_equal(bits, [0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(hard_threshold(logits)), bits)


@pytest.mark.parametrize("gradient, expected", [
    ("identity", lambda z: np.ones_like(z)),
    ("sigmoid", lambda z: (1 / (1 + np.exp(-z))) * (1 - 1 / (1 + np.exp(-z)))),
])
def test_binarize_gradient_is_straight_through(gradient, expected):
    logits = tf.constant([-3.0, -0.5, 0.2, 4.0])
    layer = StraightThroughBinarize(gradient)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        total = tf.reduce_sum(layer(logits) * tf.constant([1.0, 2.0, 3.0, 4.0]))
    grad = tape.gradient(total, logits).numpy()
    np.testing.assert_allclose(grad, expected(logits.numpy()) * [1, 2, 3, 4], rtol=1e-6)


def test_binarize_inside_tf_function_keeps_values_and_gradient():
    layer = StraightThroughBinarize()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def value_and_grad(logits):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            bits = layer(logits)
            total = tf.reduce_sum(bits)
        return bits, tape.gradient(total, logits)

    bits, grad = value_and_grad(tf.constant([-1.0, 2.0]))
    np.testing.assert_array_equal(bits.numpy(), [0.0, 1.0])
    np.testing.assert_array_equal(grad.numpy(), [1.0, 1.0])


def test_unknown_gradient_is_rejected():
    with pytest.raises(ValueError, match="gradient must be one of"):
        StraightThroughBinarize("tanh")


def test_noise_uses_training_std_in_training_and_none_at_inference_zero():
    layer = CodeNoise(train_std=20.0, inference_std=0.0, seed=1)
    logits = np.zeros((64, 16, 16, 4), np.float32)
    np.testing.assert_array_equal(np.asarray(layer(logits, training=False)), logits)
    noisy = np.asarray(layer(logits, training=True))
    assert abs(noisy.std() - 20.0) < 0.5
    assert abs(noisy.mean()) < 0.5


def test_inference_noise_when_set_and_fresh_per_call():
    layer = CodeNoise(train_std=20.0, inference_std=1.0, seed=3)
    logits = np.zeros((32, 16, 16, 4), np.float32)
    first, second = (np.asarray(layer(logits, training=False)) for _ in range(2))
    assert abs(first.std() - 1.0) < 0.05
    assert not np.array_equal(first, second)


def test_given_noise_is_subtracted_as_is():
    layer = CodeNoise(train_std=20.0, inference_std=1.0)
    logits = np.full((2, 3), 5.0, np.float32)
    noise = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(np.asarray(layer(logits, training=True, noise=noise)),
                                  logits - noise)


def test_negative_std_is_rejected():
    with pytest.raises(ValueError, match=">= 0"):
        CodeNoise(train_std=-1.0)


def test_layers_round_trip_through_keras_file_in_safe_mode(tmp_path):
    inputs = keras.Input((None, None, 4))
    noisy = CodeNoise(train_std=7.0, inference_std=0.0, seed=5)(inputs)
    bits = StraightThroughBinarize("sigmoid")(noisy)
    model = keras.Model(inputs, bits)
    path = str(tmp_path / "layers.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    noise_layer = next(l for l in loaded.layers if isinstance(l, CodeNoise))
    binarize_layer = next(l for l in loaded.layers if isinstance(l, StraightThroughBinarize))
    # The seed is not saved: a loaded layer's noise comes from OS entropy (not the file).
    assert (noise_layer.train_std, noise_layer.inference_std, noise_layer.seed) == (7.0, 0.0, None)
    assert binarize_layer.gradient == "sigmoid"
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
