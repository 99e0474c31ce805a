"""The serving functions in-process: in-graph tiling, validation, bytes, noise, classify."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from comdefend_tf import ComDefend, get_config, patches
from comdefend_tf.io import graph_headers
from comdefend_tf.serving import tiling
from comdefend_tf.serving.settings import ExportSettings
from comdefend_tf.serving.signatures import ComDefendServing, build_serving_functions


@pytest.fixture(scope="module")
def rgb_purifier():
    return ComDefend(get_config("tiny", input_channels=3), seed=3)


@pytest.fixture(scope="module")
def rgb_signatures(rgb_purifier):
    """Signatures with a small pixel limit, shared by the validation tests (tracing is slow)."""
    return ComDefendServing(rgb_purifier, settings=ExportSettings(max_pixels=3000)).signatures


@pytest.fixture(scope="module")
def gray_purifier():
    return ComDefend(get_config("tiny", input_channels=1), seed=4)


def _images(shape, seed=0):
    return np.random.RandomState(seed).rand(*shape).astype(np.float32)


def _signatures(purifier, classifier=None, **settings):
    return ComDefendServing(purifier, classifier, ExportSettings(**settings)).signatures


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


def test_serving_default_is_an_alias_not_a_code_path(gray_purifier):
    plain = build_serving_functions(gray_purifier)
    assert isinstance(plain, ComDefendServing)
    assert plain.serving_default is plain.purify and plain.classify is None
    assert list(plain.signatures) == ["purify", "purify_bytes", "purify_examples"]
    composed = ComDefendServing(gray_purifier, _tiny_classifier(True))
    assert composed.serving_default is composed.classify
    assert list(composed.signatures) == ["classify", "purify", "purify_bytes",
                                         "purify_examples"]
    assert all(composed.signatures[name] is getattr(composed, name)
               for name in composed.signatures)


def test_classify_refuses_sizes_the_classifier_cannot_take(gray_purifier):
    classify = _signatures(gray_purifier, _tiny_classifier(False))["classify"]
    assert "expects 8x8 images" in _error_message(lambda: classify(_images((1, 9, 8, 1))))


def test_a_classifier_for_other_channels_is_refused_at_export(gray_purifier):
    rgb_classifier = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                                       keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="3-channel images but the purifier produces 1"):
        ComDefendServing(gray_purifier, rgb_classifier)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="patch_size"):
        ExportSettings(patch_size=0)
    with pytest.raises(ValueError, match="inference_noise_std"):
        ExportSettings(inference_noise_std=-1.0)
    with pytest.raises(ValueError, match="classifier_outputs"):
        ExportSettings(classifier_outputs="scores")


# ------------------------------------------------ declared sizes, per-request limits, work
from tests.fixtures.hostile_requests import png_with_header  # noqa: E402


def _jpeg_declaring(height, width):
    jpeg = tf.io.encode_jpeg(np.zeros((5, 7, 3), np.uint8)).numpy()
    index = jpeg.find(b"\xff\xc0")  # baseline SOF0: length, precision, height, width
    return jpeg[:index + 5] + int(height).to_bytes(2, "big") + int(width).to_bytes(2, "big") + \
        jpeg[index + 9:]


def test_a_png_declaring_a_huge_size_is_refused_from_its_header(rgb_purifier):
    purify_bytes = _signatures(rgb_purifier)["purify_bytes"]  # default max_pixels
    bomb = png_with_header(20000, 20000)  # 69 bytes declaring 400 million pixels
    assert len(bomb) < 100
    message = _error_message(lambda: purify_bytes(tf.constant([bomb])))
    assert "too many pixels" in message and "declare" in message and "[20000 20000]" in message
    huge = _error_message(lambda: purify_bytes(tf.constant([png_with_header(2**31 - 1, 3)])))
    assert "too many pixels" in huge and "2147483647" in huge


def test_the_declared_size_is_checked_before_the_decoder_runs(rgb_signatures):
    # 100x100 declared, IDAT garbage: the decoder would fail ("Invalid PNG data"); the size
    # check must speak first, so nothing was decoded (or allocated) for it.
    declared_only = png_with_header(100, 100, idat=b"not zlib data")
    message = _error_message(lambda: rgb_signatures["purify_bytes"](tf.constant([declared_only])))
    assert "too many pixels" in message and "Invalid PNG" not in message
    jpeg = _error_message(lambda: rgb_signatures["purify_bytes"](
        tf.constant([_jpeg_declaring(60000, 60000)])))
    assert "too many pixels" in jpeg and "[60000 60000]" in jpeg


@pytest.mark.parametrize("encoded, expected", [
    (png_with_header(5, 5, bad_crc=True), "CRC does not match"),
    (png_with_header(0, 5), "width or height of 0"),
    (png_with_header(2**31, 5), "over 2**31 - 1"),
    (png_with_header(5, 5)[:20], "truncated PNG"),
    (png_with_header(5, 5)[:11] + b"\x0e" + png_with_header(5, 5)[12:], "13-byte IHDR"),
    (b"GIF89a" + b"\x00" * 40, "PNG or JPEG"),
    (b"", "PNG or JPEG"),
    (_jpeg_declaring(65535, 65535), "JPEG"),
])
def test_bad_headers_are_refused_with_a_named_problem(rgb_signatures, encoded, expected):
    valid = tf.io.encode_png(np.zeros((3, 3, 3), np.uint8)).numpy()
    message = _error_message(lambda: rgb_signatures["purify_bytes"](
        tf.constant([valid, encoded])))
    assert expected in message
    if expected != "JPEG":  # libjpeg's own message does not say which element
        assert "element] [1]" in message  # the bad one, not the valid one before it


def test_max_pixels_is_per_request_in_purify_bytes(rgb_signatures):
    purify_bytes = rgb_signatures["purify_bytes"]  # max_pixels=3000
    image = tf.io.encode_png(np.zeros((40, 40, 3), np.uint8)).numpy()  # 1600 pixels
    assert purify_bytes(tf.constant([image]))["purified_png_bytes"].shape == (1,)
    message = _error_message(lambda: purify_bytes(tf.constant([image, image])))
    assert "too many pixels" in message and "3200" in message
    jpeg = tf.io.encode_jpeg(np.zeros((40, 40, 3), np.uint8)).numpy()
    assert "too many pixels" in _error_message(lambda: purify_bytes(tf.constant([image, jpeg])))


def test_the_batch_length_is_capped_in_every_signature(gray_purifier):
    signatures = _signatures(gray_purifier, _tiny_classifier(False), max_batch_size=3)
    png = tf.io.encode_png(np.zeros((8, 8, 1), np.uint8)).numpy()
    assert signatures["purify"](_images((3, 2, 2, 1)))["purified"].shape == (3, 2, 2, 1)
    for name, request in [("purify", _images((4, 2, 2, 1))),
                          ("classify", _images((4, 8, 8, 1))),
                          ("purify_bytes", tf.constant([png] * 4))]:
        message = _error_message(lambda: signatures[name](request))
        assert "too many images: at most 3" in message and "max_batch_size" in message


def test_millions_of_tiny_images_are_refused_at_once_by_default(rgb_signatures):
    assert ExportSettings().max_batch_size == 1024
    message = _error_message(lambda: rgb_signatures["purify"](tf.zeros([2_000_000, 1, 1, 3])))
    assert "too many images" in message


def test_windows_are_chunked_by_pixels_not_by_count():
    calls = tf.Variable(0)

    @tf.function
    def run(images, patch_size, overlap, chunk_pixels):
        def identity(windows):
            calls.assign_add(1)
            return {"purified": windows}
        return purify_patchwise_graph(identity, images, patch_size, overlap, chunk_pixels,
                                      {"purified": (tf.float32, 1)})["purified"]

    purify_patchwise_graph = tiling.purify_patchwise_graph
    chunk_pixels = tiling.chunk_pixels_for(4, 2, 1)  # one 8x8 window = 64 pixels
    tiny = _images((1000, 1, 1, 1))
    np.testing.assert_array_equal(run(tiny, 4, 2, chunk_pixels).numpy(), tiny)
    assert int(calls.numpy()) == 16  # 1000 1x1 windows, 64 per call (not 1000 calls)
    calls.assign(0)
    large = _images((1, 20, 20, 1), seed=1)
    np.testing.assert_array_equal(run(large, 4, 2, chunk_pixels).numpy(), large)
    assert int(calls.numpy()) == 25  # 5x5 tiles, one full-size window per call


class _BatchAtMost(keras.layers.Layer):
    """Identity that fails when it sees more than ``limit`` images at once."""

    def __init__(self, limit, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit

    def call(self, images):
        check = tf.debugging.assert_less_equal(
            tf.shape(images)[0], self.limit, message="the classifier saw a batch over the chunk")
        with tf.control_dependencies([check]):
            return tf.identity(images)


def test_classify_runs_the_classifier_in_chunks_with_unchunked_results(gray_purifier):
    flatten, dense = keras.layers.Flatten(), keras.layers.Dense(4)
    inputs = keras.Input((8, 8, 1))
    chunked = keras.Model(inputs, dense(flatten(_BatchAtMost(2)(inputs))))
    plain = keras.Model(inputs, dense(flatten(inputs)))
    # 8-pixel tiles without overlap, two per call: 128 pixels, i.e. two 8x8 images per chunk.
    signatures = _signatures(gray_purifier, chunked, patch_size=8, patch_overlap=0,
                             patch_batch_size=2)
    images = _images((5, 8, 8, 1), seed=10)
    outputs = signatures["classify"](images)
    purified = signatures["purify"](images)["purified"]
    expected = tf.nn.softmax(plain(purified)).numpy()  # the whole batch at once
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(outputs["class_ids"].numpy(), expected.argmax(axis=1))


# ----------------------------------------------------------------------- 16-bit PNG values
def test_png_is_read_at_full_precision_and_8_bit_exactly_as_x_over_255():
    values16 = np.arange(0, 65536, 4099, dtype=np.uint16).reshape(4, 4, 1)
    decoded = graph_headers.decode_image_bytes(tf.io.encode_png(values16), 1).numpy()
    np.testing.assert_array_equal(decoded, values16.astype(np.float32) / np.float32(65535))
    assert len(np.unique(decoded)) == 16  # not collapsed to 8 bits
    values8 = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    decoded8 = graph_headers.decode_image_bytes(tf.io.encode_png(values8), 1).numpy()
    # TF widens 8-bit to 16-bit as x * 257, and 257 x / 65535 == x / 255: bit-identical.
    np.testing.assert_array_equal(decoded8, values8.astype(np.float32) / np.float32(255))
    rgb = np.random.RandomState(3).randint(0, 256, (5, 6, 3)).astype(np.uint8)
    jpeg = tf.io.encode_jpeg(rgb).numpy()
    np.testing.assert_array_equal(graph_headers.decode_image_bytes(jpeg, 3).numpy(),
                                  tf.io.decode_jpeg(jpeg).numpy().astype(np.float32) / 255)


def test_16_bit_grey_png_reads_the_same_in_serving_and_image_io(tmp_path):
    from comdefend_tf.io import images as image_io

    values16 = np.random.RandomState(4).randint(0, 65536, (6, 7, 1)).astype(np.uint16)
    path = tmp_path / "deep.png"
    path.write_bytes(tf.io.encode_png(values16).numpy())
    np.testing.assert_array_equal(image_io.read_image(str(path), 1),
                                  graph_headers.decode_image_bytes(path.read_bytes(), 1).numpy())


def test_purify_bytes_feeds_16_bit_precision_to_the_network(gray_purifier):
    signatures = _signatures(gray_purifier)
    values16 = np.random.RandomState(5).randint(0, 65536, (9, 7, 1)).astype(np.uint16)
    served = tf.io.decode_png(signatures["purify_bytes"](
        tf.constant([tf.io.encode_png(values16).numpy()]))["purified_png_bytes"][0]).numpy()
    exact = signatures["purify"](values16[None].astype(np.float32) / 65535)["purified"]
    np.testing.assert_array_equal(served, np.round(exact.numpy()[0] * 255).astype(np.uint8))


# -------------------------------------------------------------------------- hostile corpus
def test_the_hostile_request_corpus_is_refused_by_name(tmp_path):
    from tests.fixtures import hostile_requests

    version_dir, purifier, classifier, settings = hostile_requests.build_export(
        str(tmp_path), channels=3)
    signatures = tf.saved_model.load(version_dir).signatures
    cases = hostile_requests.build_corpus(3, settings.max_pixels, settings.max_batch_size,
                                          hostile_requests.CLASSIFIER_SIZE, signatures)
    assert len(cases) >= 200
    results = hostile_requests.run_corpus(signatures, cases)
    summary = hostile_requests.summarize(results)
    assert summary["not_as_expected"] == []
    assert summary["refused_with_naming_message"] == summary["malformed_cases"] >= 200
    assert hostile_requests.valid_request_check(signatures, 3, purifier, classifier)["ok"]


def test_a_grey_model_answers_cmyk_jpegs_and_alpha_pngs(gray_purifier):
    import io

    from PIL import Image

    rgb = np.random.RandomState(6).randint(0, 256, (6, 5, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, format="JPEG")
    grey_alpha = tf.io.encode_png(rgb[..., :2]).numpy()
    rgba = tf.io.encode_png(np.concatenate([rgb, rgb[..., :1]], axis=-1)).numpy()
    pngs = _signatures(gray_purifier)["purify_bytes"](
        tf.constant([buffer.getvalue(), grey_alpha, rgba]))["purified_png_bytes"].numpy()
    assert [tuple(tf.io.decode_png(png).shape) for png in pngs] == [(6, 5, 1)] * 3


def _example(encoded: bytes | None, label: int = 3) -> bytes:
    feature = {"image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}
    if encoded is not None:
        feature["image/encoded"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_purify_examples_equals_purify_bytes_and_keeps_its_checks(gray_purifier):
    # Noise 0 (the tiny config's inference default): the two input types give the same PNGs.
    signatures = _signatures(gray_purifier, max_pixels=500)
    small = np.round(_images((7, 9, 1), seed=7) * 255).astype(np.uint8)
    other = np.round(_images((12, 5, 1), seed=8) * 255).astype(np.uint8)
    encoded = [tf.io.encode_png(small).numpy(), tf.io.encode_jpeg(other, quality=95).numpy()]
    from_bytes = signatures["purify_bytes"](tf.constant(encoded))["purified_png_bytes"].numpy()
    from_examples = signatures["purify_examples"](
        tf.constant([_example(e) for e in encoded]))["purified_png_bytes"].numpy()
    assert list(from_examples) == list(from_bytes)
    missing = _error_message(lambda: signatures["purify_examples"](tf.constant([_example(None)])))
    assert "png" in missing.lower() and "jpeg" in missing.lower()
    huge = np.zeros((30, 30, 1), np.uint8)  # 900 pixels > max_pixels 500, refused by header
    too_large = _error_message(lambda: signatures["purify_examples"](
        tf.constant([_example(tf.io.encode_png(huge).numpy())])))
    assert "too many pixels" in too_large
    assert "rank-1" in _error_message(
        lambda: signatures["purify_examples"](tf.constant([[_example(encoded[0])]])))


# ------------------------------------------- issue 21: sums that wrap, garbage, short messages
from tests.fixtures import hostile_requests_round2 as round2  # noqa: E402

_HUGE = png_with_header(2 ** 31 - 1, 2 ** 31 - 1)


def test_declared_sizes_that_wrap_an_int64_sum_are_refused_before_decoding(rgb_purifier):
    # Four (2**31-1)**2 declarations sum to -17,179,869,180 in int64: the old check passed and
    # decoded the valid image first. The element over the budget is refused on its own.
    assert (4 * (2 ** 31 - 1) ** 2 + 2 ** 63) % 2 ** 64 - 2 ** 63 < 0
    signatures = _signatures(rgb_purifier)  # default max_pixels
    valid = tf.io.encode_png(np.zeros((300, 300, 3), np.uint8)).numpy()
    message = _error_message(lambda: signatures["purify_bytes"](
        tf.constant([valid, _HUGE, _HUGE, _HUGE, _HUGE])))
    assert "too many pixels" in message and "alone declares" in message
    assert "element] [1]" in message and "[2147483647 2147483647]" in message
    assert "Invalid PNG" not in message  # refused before any decoder ran
    examples = _error_message(lambda: signatures["purify_examples"](tf.constant(
        [round2.example([valid])] + [round2.example([_HUGE])] * 4)))
    assert "too many pixels" in examples and "alone declares" in examples


def test_the_sum_of_sizes_each_within_the_budget_is_exact(rgb_signatures):
    # max_pixels=3000: each at the budget passes alone, the running sum names the total.
    at_budget = [png_with_header(3000, 1), png_with_header(1, 3000), png_with_header(1, 1)]
    message = _error_message(lambda: rgb_signatures["purify_bytes"](tf.constant(at_budget)))
    assert "too many pixels" in message and "in total" in message
    assert "elements 0 to] [1]" in message and "[6000]" in message


def test_the_float_pixel_check_cannot_wrap():
    from comdefend_tf.serving.request_checks import _product_at_most

    check = tf.function(lambda factors: _product_at_most([factors[0], factors[1], factors[2]],
                                                         4096 * 4096))
    # 2**32 cubed is 0 in int64 and (2**21 + 1)**3 wraps to a small number: both refused.
    for factors in ([2 ** 32] * 3, [2 ** 21 + 1] * 3, [1, 4097, 4096], [0, 5, 5]):
        assert not bool(check(tf.constant(factors, tf.int64))), factors
    for factors in ([1, 4096, 4096], [16, 1024, 1024], [1, 1, 1]):
        assert bool(check(tf.constant(factors, tf.int64))), factors
    with pytest.raises(ValueError, match="max_pixels"):
        ExportSettings(max_pixels=2 ** 62)


def test_purify_examples_refuses_garbage_with_a_short_ascii_message(gray_purifier):
    signatures = _signatures(gray_purifier)
    garbage = np.random.RandomState(0).randint(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    # Before: UnicodeDecodeError (the parser quoted the whole record, raw) of over 1 MB.
    message = _error_message(lambda: signatures["purify_examples"](tf.constant([garbage])))
    refusal = message[message.index("assertion failed"):]  # after the node's Python trace
    assert len(refusal) < 1024 and message.isascii()
    assert "is not a serialized tf.train.Example" in refusal and "[1048576]" in refusal
    assert "\\\\xac\\\\x0a\\\\x7f" in message  # the first bytes, escaped (backslashes doubled)
    valid = tf.io.encode_png(np.zeros((4, 4, 1), np.uint8)).numpy()
    for bad in (round2.example(ints=[1]), round2.example([valid, valid]), b"\xff\xfe\x00"):
        second = _error_message(lambda: signatures["purify_examples"](
            tf.constant([round2.example([valid]), bad])))
        assert "examples element] [1]" in second
        assert len(second[second.index("assertion failed"):]) < 1024
    too_many = _error_message(lambda: _signatures(gray_purifier, max_batch_size=2)[
        "purify_examples"](tf.constant([garbage] * 3)))
    assert "too many images" in too_many  # capped before any record is parsed


def test_jpegs_whose_scan_data_is_cut_are_refused(rgb_signatures):
    purify_bytes = rgb_signatures["purify_bytes"]  # max_pixels=3000
    photo = np.random.RandomState(5).randint(0, 256, (40, 30, 3)).astype(np.uint8)
    jpeg = round2._pillow_jpeg(photo, quality=90)
    assert purify_bytes(tf.constant([jpeg, jpeg + b"\x00" * 50]))[
        "purified_png_bytes"].shape == (2,)
    for fraction in (0.2, 0.6, 0.95):
        message = _error_message(lambda: purify_bytes(tf.constant(
            [jpeg, round2.scan_cut(jpeg, fraction)])))
        assert "truncated JPEG" in message, fraction


def test_a_jpeg_declaring_more_pixels_than_its_bytes_can_code_is_refused(rgb_purifier):
    purify_bytes = _signatures(rgb_purifier)["purify_bytes"]  # default max_pixels
    tiny = round2.tiny_jpeg_declaring(2000, 2000)  # 4 million pixels in a few hundred bytes
    assert len(tiny) < 1000
    valid = tf.io.encode_png(np.zeros((3, 3, 3), np.uint8)).numpy()
    message = _error_message(lambda: purify_bytes(tf.constant([valid, tiny])))
    assert "pixels per byte" in message and "element] [1]" in message
    assert "[2000 2000]" in message and "scan data ends" not in message  # before decoding
