"""Baseline defenses keep shapes and the [0, 1] range, transform as documented, pass the
gradients adaptive attacks need, and serialize."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.ndimage import median_filter

from comdefend_tf.evaluation import baselines
from comdefend_tf.config import get_config
from comdefend_tf.model import ComDefend

BASELINES = [baselines.NoDefense(), baselines.JpegDefense(50), baselines.BitDepthReduction(3),
             baselines.MedianFilter(3), baselines.MedianFilter(2)]


def _images(shape, seed=0):
    return tf.constant(np.random.RandomState(seed).rand(*shape).astype(np.float32))


def _value_and_gradient(defense, images):
    with tf.GradientTape() as tape:
        tape.watch(images)
        defended = defense(images)
        loss = tf.reduce_sum(defended)
    return defended, tape.gradient(loss, images)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("defense", BASELINES, ids=lambda d: f"{type(d).__name__}")
def test_shapes_ranges_and_gradients(defense, channels):
    images = _images((3, 9, 12, channels))
    defended, gradient = _value_and_gradient(defense, images)
    assert defended.shape == images.shape and defended.dtype == tf.float32
    assert float(tf.reduce_min(defended)) >= 0.0 and float(tf.reduce_max(defended)) <= 1.0
    assert gradient is not None and np.all(np.isfinite(gradient.numpy()))
    # Each output pixel's gradient reaches exactly one input pixel (identity or the median's
    # selected pixel), so the gradient of sum(outputs) sums to the number of outputs.
    assert float(tf.reduce_sum(gradient)) == pytest.approx(images.shape.num_elements())
    assert defense(images).shape == tf.function(defense)(images).shape


@pytest.mark.parametrize("defense", [baselines.JpegDefense(50), baselines.BitDepthReduction(3)])
def test_quantizers_pass_the_identity_gradient(defense):
    images = _images((2, 8, 8, 1))
    defended, gradient = _value_and_gradient(defense, images)
    np.testing.assert_array_equal(gradient.numpy(), np.ones(images.shape, np.float32))
    assert float(tf.reduce_max(tf.abs(defended - images))) > 0.0  # it did transform


def test_bit_depth_values_lie_on_the_levels():
    defended = baselines.BitDepthReduction(2)(_images((2, 5, 5, 3))).numpy()
    np.testing.assert_allclose(np.unique(np.round(defended * 3, 5)) % 1, 0.0, atol=1e-5)
    assert set(np.round(np.unique(defended) * 3).astype(int)) <= {0, 1, 2, 3}


def test_median_matches_scipy_with_reflected_borders():
    images = _images((2, 7, 6, 3))
    expected = median_filter(images.numpy(), size=(1, 3, 3, 1), mode="mirror")
    np.testing.assert_allclose(baselines.MedianFilter(3)(images).numpy(), expected, atol=1e-7)


def test_jpeg_stays_close_and_removes_detail():
    images = _images((2, 16, 16, 3))
    smooth = tf.image.resize(images, (4, 4))
    smooth = tf.image.resize(smooth, (16, 16))
    jpeg = baselines.JpegDefense(20)
    # Noise is what JPEG discards: the error on noise is larger than on a smooth image.
    assert float(tf.reduce_mean(tf.abs(jpeg(images) - images))) > \
        float(tf.reduce_mean(tf.abs(jpeg(smooth) - smooth)))
    assert float(tf.reduce_mean(tf.abs(jpeg(smooth) - smooth))) < 0.05


@pytest.mark.parametrize("defense", BASELINES[1:], ids=lambda d: type(d).__name__)
def test_defenses_round_trip_through_keras_files(defense, tmp_path):
    images = _images((2, 8, 8, 1))
    model = keras.Sequential([keras.Input((8, 8, 1)), defense])
    path = str(tmp_path / "defense.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded(images).numpy(), defense(images).numpy())


def test_make_defense_and_settings_validation():
    purifier = ComDefend(get_config("tiny", input_channels=1))
    assert baselines.make_defense("comdefend", purifier=purifier) is purifier
    assert baselines.make_defense("jpeg", jpeg_quality=30).quality == 30
    assert baselines.make_defense("bit_depth", bit_depth=1).bits == 1
    assert baselines.make_defense("median", median_size=2).size == 2
    assert baselines.describe_defense("jpeg", baselines.JpegDefense(30)) == "jpeg(q=30)"
    with pytest.raises(ValueError, match="needs a trained ComDefend"):
        baselines.make_defense("comdefend")
    with pytest.raises(ValueError, match="unknown defense 'blur'"):
        baselines.make_defense("blur")
    for bad in (lambda: baselines.JpegDefense(0), lambda: baselines.BitDepthReduction(9),
                lambda: baselines.MedianFilter(0)):
        with pytest.raises(ValueError):
            bad()


def test_randomized_only_when_the_purifier_has_inference_noise():
    purifier = ComDefend(get_config("tiny", input_channels=1))
    assert not baselines.is_randomized(purifier)
    assert baselines.is_randomized(purifier.with_inference(noise_std=1.0))
    assert not baselines.is_randomized(baselines.JpegDefense(50))
