"""The serving functions in-process: in-graph tiling, validation, bytes, noise, classify."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from comdefend_tf import ComDefend, get_config, patches, serving


@pytest.fixture(scope="module")
def rgb_purifier():
    return ComDefend(get_config("tiny", input_channels=3), seed=3)


@pytest.fixture(scope="module")
def rgb_signatures(rgb_purifier):
    """Signatures with a small pixel limit, shared by the validation tests (tracing is slow)."""
    return serving.build_serving_functions(
        rgb_purifier, settings=serving.ExportSettings(max_pixels=3000)).signatures


@pytest.fixture(scope="module")
def gray_purifier():
    return ComDefend(get_config("tiny", input_channels=1), seed=4)


def _images(shape, seed=0):
    return np.random.RandomState(seed).rand(*shape).astype(np.float32)


def _signatures(purifier, classifier=None, **settings):
    return serving.build_serving_functions(purifier, classifier,
                                           serving.ExportSettings(**settings)).signatures


def _error_message(call):
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        call()
    return caught.value.message


# ---------------------------------------------------------------------------------- tiling
def test_graph_tiling_equals_python_tiling_without_overlap(rgb_purifier):
    images = _images((2, 16, 24, 3))
    purify = _signatures(rgb_purifier, patch_size=8, patch_overlap=0, patch_batch_size=5)
    served = purify["purify"](images)["purified"].numpy()
    expected = np.asarray(patches.purify_patchwise(rgb_purifier, images, patch_size=8,
                                                   overlap=0, batch_size=5))
    np.testing.assert_allclose(served, expected, atol=1e-5)
    # Tiles really are purified alone: without overlap the result differs from whole-image.
    assert np.abs(served - np.asarray(rgb_purifier(images))).max() > 1e-3


def test_graph_tiling_matches_python_tiling_with_overlap_on_ragged_sizes(rgb_purifier):
    images = _images((1, 19, 13, 3), seed=1)
    served = _signatures(rgb_purifier, patch_size=8, patch_overlap=2,
                         patch_batch_size=3)["purify"](images)["purified"].numpy()
    expected = np.asarray(patches.purify_patchwise(rgb_purifier, images, 8, 2, 3))
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_default_overlap_gives_whole_image_output_and_bits(rgb_purifier):
    images = _images((2, 21, 30, 3), seed=2)
    outputs = _signatures(rgb_purifier, patch_size=8, patch_batch_size=2)["purify"](images)
    np.testing.assert_allclose(outputs["purified"].numpy(), np.asarray(rgb_purifier(images)),
                               atol=1e-5)
    bits = outputs["code_bits"].numpy()
    assert bits.dtype == np.uint8 and bits.shape == (2, 21, 30, 12)
    expected_bits = np.asarray(rgb_purifier.code_bits(images)).astype(np.uint8)
    assert np.mean(bits == expected_bits) > 0.999  # ties at a logit of exactly 0 aside
    assert set(np.unique(bits)) <= {0, 1}


def test_chunk_size_does_not_change_the_result(rgb_purifier):
    images = _images((3, 17, 9, 3), seed=3)
    one_at_a_time = _signatures(rgb_purifier, patch_size=4, patch_batch_size=1)
    many = _signatures(rgb_purifier, patch_size=4, patch_batch_size=7)
    np.testing.assert_allclose(one_at_a_time["purify"](images)["purified"].numpy(),
                               many["purify"](images)["purified"].numpy(), atol=1e-5)


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("bad, expected", [
    (np.zeros((5, 5, 3), np.float32), "rank-4 tensor"),
    (np.zeros((1, 5, 5, 3, 1), np.float32), "rank-4 tensor"),
    (np.zeros((1, 5, 5, 1), np.float32), "must have 3 channel(s)"),
    (np.zeros((0, 5, 5, 3), np.float32), "at least one image"),
    (np.full((1, 4, 4, 3), np.nan, np.float32), "contain NaN"),
    (np.full((1, 4, 4, 3), 1.5, np.float32), "values in [0, 1]"),
    (np.full((1, 4, 4, 3), -0.1, np.float32), "values in [0, 1]"),
    (np.zeros((2, 40, 40, 3), np.float32), "too many pixels"),
])
def test_bad_float_input_is_refused_with_a_clear_message(rgb_signatures, bad, expected):
    purify = rgb_signatures["purify"]
    assert expected in _error_message(lambda: purify(bad))


def test_pixel_limit_admits_inputs_at_the_limit(rgb_signatures):
    assert rgb_signatures["purify"](_images((2, 30, 50, 3)))["purified"].shape == (2, 30, 50, 3)


def test_bad_bytes_are_refused(gray_purifier):
    purify_bytes = _signatures(gray_purifier)["purify_bytes"]
    png = tf.io.encode_png(np.zeros((6, 6, 1), np.uint8)).numpy()
    assert "PNG or JPEG" in _error_message(lambda: purify_bytes(tf.constant([b"not an image"])))
    assert "PNG or JPEG" in _error_message(lambda: purify_bytes(tf.constant([png, b"GIF89a"])))
    truncated = _error_message(lambda: purify_bytes(tf.constant([png[:30]])))
    assert "PNG" in truncated
    for wrong_rank in (tf.constant(png), tf.constant([[png]])):
        assert "rank-1 string tensor" in _error_message(lambda: purify_bytes(wrong_rank))


# ----------------------------------------------------------------------------------- bytes
def test_purify_bytes_round_trips_pngs_and_jpegs_of_mixed_sizes(gray_purifier):
    signatures = _signatures(gray_purifier)
    small = np.round(_images((7, 9, 1), seed=5) * 255).astype(np.uint8)
    large = np.round(_images((12, 5, 1), seed=6) * 255).astype(np.uint8)
    encoded = [tf.io.encode_png(small).numpy(), tf.io.encode_jpeg(large, quality=95).numpy()]
    pngs = signatures["purify_bytes"](tf.constant(encoded))["purified_png_bytes"].numpy()
    assert pngs.shape == (2,)
    for png, source in zip(pngs, encoded):
        decoded_input = tf.io.decode_image(source, channels=1).numpy()
        purified = tf.io.decode_png(png).numpy()
        assert purified.shape == decoded_input.shape and purified.dtype == np.uint8
        float_result = signatures["purify"](decoded_input[None].astype(np.float32) / 255.0)
        expected = np.round(float_result["purified"].numpy()[0] * 255)
        assert np.abs(purified.astype(np.float32) - expected).max() <= 1


def test_purify_bytes_converts_rgb_files_for_a_gray_model(gray_purifier):
    rgb = np.round(_images((5, 6, 3), seed=7) * 255).astype(np.uint8)
    pngs = _signatures(gray_purifier)["purify_bytes"](
        tf.constant([tf.io.encode_png(rgb).numpy()]))["purified_png_bytes"].numpy()
    assert tf.io.decode_png(pngs[0]).shape == (5, 6, 1)


# ----------------------------------------------------------------------------------- noise
def test_zero_noise_is_deterministic_and_noise_is_an_export_setting(gray_purifier):
    images = _images((1, 10, 10, 1), seed=8)
    quiet = _signatures(gray_purifier, inference_noise_std=0.0)["purify"]
    np.testing.assert_array_equal(quiet(images)["purified"].numpy(),
                                  quiet(images)["purified"].numpy())
    noisy = _signatures(gray_purifier, inference_noise_std=5.0, noise_seed=1)["purify"]
    first, second = noisy(images)["code_bits"].numpy(), noisy(images)["code_bits"].numpy()
    assert np.mean(first != second) > 0.05  # fresh draws per call
    # The purifier passed in keeps its own setting (the export uses a weight-sharing copy).
    assert gray_purifier.config.inference_noise_std == 0.0


# -------------------------------------------------------------------------------- classify
def _tiny_classifier(softmax: bool):
    return keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(),
        keras.layers.Dense(4, activation="softmax" if softmax else None)])


@pytest.mark.parametrize("softmax", [False, True])
def test_classify_is_classifier_after_purify(gray_purifier, softmax):
    classifier = _tiny_classifier(softmax)
    signatures = _signatures(gray_purifier, classifier)
    assert list(signatures)[0] == "classify"  # becomes serving_default
    images = _images((3, 8, 8, 1), seed=9)
    outputs = signatures["classify"](images)
    scores = classifier(signatures["purify"](images)["purified"]).numpy()
    expected = scores if softmax else tf.nn.softmax(scores).numpy()
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(outputs["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(outputs["class_ids"].numpy(), expected.argmax(axis=1))


def test_classify_refuses_sizes_the_classifier_cannot_take(gray_purifier):
    classify = _signatures(gray_purifier, _tiny_classifier(False))["classify"]
    assert "expects 8x8 images" in _error_message(lambda: classify(_images((1, 9, 8, 1))))


def test_a_classifier_for_other_channels_is_refused_at_export(gray_purifier):
    rgb_classifier = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                                       keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="3-channel images but the purifier produces 1"):
        serving.build_serving_functions(gray_purifier, rgb_classifier)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="patch_size"):
        serving.ExportSettings(patch_size=0)
    with pytest.raises(ValueError, match="inference_noise_std"):
        serving.ExportSettings(inference_noise_std=-1.0)
    with pytest.raises(ValueError, match="classifier_outputs"):
        serving.ExportSettings(classifier_outputs="scores")
