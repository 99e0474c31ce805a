"""The LiteRT runtime wrapper: refusals like the serving signatures', batches, the exact
patch-wise path for larger images, and code noise fresh per call, interpreter and process."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="the [litert] extra runs converted purifiers")

from comdefend_tf.litert import convert  # noqa: E402
from comdefend_tf.litert.runtime import (LiteRTInputError, LiteRTModelError,  # noqa: E402
                                         LiteRTPurifier)
from comdefend_tf.patches import purify_patchwise, receptive_field_radius  # noqa: E402
from tests.conftest import REPO_ROOT, subprocess_env  # noqa: E402

SIZE = (16, 16)


@pytest.fixture(scope="module")
def float_file(purifier):
    return convert.convert(purifier, "float32", SIZE, 0.0)


@pytest.fixture(scope="module")
def noisy_file(tmp_path_factory, purifier):
    data = convert.convert(purifier.with_inference(noise_std=1.0), "float32", SIZE, 1.0)
    path = tmp_path_factory.mktemp("noisy") / "noisy.tflite"
    path.write_bytes(data)
    return str(path)


def _images(count=2, size=SIZE, seed=0):
    return np.random.default_rng(seed).random((count, *size, 1), dtype=np.float32)


def _assert_close_to_keras(purified, purifier, images):
    # Same float32 arithmetic in another order; spread logits keep every code bit decided.
    assert np.all(np.abs(np.asarray(purifier.encoder(images))) > 1e-4)
    np.testing.assert_allclose(purified, np.asarray(purifier(images)), atol=1e-5)


@pytest.mark.parametrize("images, message", [
    (np.zeros((1, 16, 16, 1), np.float64), "must be float32"),
    (np.zeros((16, 16, 1), np.float32), "rank-4 tensor"),
    (np.zeros((1, 16, 16, 3), np.float32), r"1 channel\(s\)"),
    (np.zeros((0, 16, 16, 1), np.float32), "at least one image"),
    (np.full((1, 16, 16, 1), np.nan, np.float32), "NaN"),
    (np.full((1, 16, 16, 1), np.inf, np.float32), r"values in \[0, 1\]"),
    (np.full((1, 16, 16, 1), 1.5, np.float32), r"values in \[0, 1\].*max 1.5"),
    (np.full((1, 16, 16, 1), -0.1, np.float32), r"values in \[0, 1\]"),
    (np.zeros((1, 64, 64, 1), np.float32), "too many pixels: at most 2048"),
    (np.zeros((5, 4, 4, 1), np.float32), "too many images: at most 4"),
])
def test_bad_input_is_refused_by_name(float_file, images, message):
    purifier = LiteRTPurifier(float_file, max_pixels=2048, max_batch_size=4)
    with pytest.raises(LiteRTInputError, match=message):
        purifier(images)
    # Still serving after a refusal.
    assert purifier(_images(1))["purified"].shape == (1, 16, 16, 1)


def test_bad_files_are_refused_by_name(tmp_path, float_file):
    with pytest.raises(LiteRTModelError, match="no LiteRT model"):
        LiteRTPurifier(str(tmp_path / "missing.tflite"))
    with pytest.raises(LiteRTModelError, match="not a regular file"):
        LiteRTPurifier(str(tmp_path))
    big = tmp_path / "big.tflite"
    big.write_bytes(float_file)
    with pytest.raises(LiteRTModelError, match="over the 1000-byte limit"):
        LiteRTPurifier(str(big), max_file_bytes=1000)
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"not a flatbuffer" * 64)
    with pytest.raises(LiteRTModelError, match="not a LiteRT model"):
        LiteRTPurifier(str(garbage))


def _select_tf_ops_file(tmp_path) -> bytes:
    """A .tflite that reads a file with a Select TF ("Flex") op: what a hostile model would
    do if LiteRT ran it in a process that has TensorFlow."""
    import tensorflow as tf

    secret = tmp_path / "secret.txt"
    secret.write_text("not for the model")

    @tf.function(input_signature=[tf.TensorSpec([1, 4, 4, 1], tf.float32)])
    def reads_a_file(images):
        return images + tf.cast(tf.strings.length(tf.io.read_file(str(secret))), tf.float32)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [reads_a_file.get_concrete_function()], reads_a_file)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                           tf.lite.OpsSet.SELECT_TF_OPS]
    return converter.convert()


def test_a_file_with_ops_a_purifier_never_has_is_refused_before_loading(tmp_path, float_file):
    with pytest.raises(LiteRTModelError, match="custom op 'FlexReadFile'"):
        LiteRTPurifier(_select_tf_ops_file(tmp_path))
    # The same check passes every op the converter emits for a purifier.
    from comdefend_tf.litert import runtime
    runtime.check_ops(float_file)
    # A file declaring huge tensors is refused before anything is allocated.
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 4096, 4096, 16], tf.float32)])
    def huge(images):
        return images + 1.0

    content = tf.lite.TFLiteConverter.from_concrete_functions(
        [huge.get_concrete_function()], huge).convert()
    with pytest.raises(LiteRTModelError, match="declares tensors of .* bytes, over the"):
        LiteRTPurifier(content)


def test_a_batch_equals_image_by_image_and_the_keras_purifier(float_file, purifier):
    images = _images(5, seed=4)
    litert = LiteRTPurifier(float_file)
    batch = litert(images)
    one_by_one = np.concatenate([litert(images[i:i + 1])["purified"] for i in range(5)])
    np.testing.assert_array_equal(batch["purified"], one_by_one)
    _assert_close_to_keras(batch["purified"], purifier, images)


def test_larger_images_are_tiled_exactly_as_the_keras_patchwise_path(float_file, purifier):
    litert = LiteRTPurifier(float_file, batch_pixels=3 * 16 * 16)
    assert litert.overlap == receptive_field_radius(purifier.config)
    images = _images(2, size=(37, 45), seed=5)
    purified = litert(images)["purified"]
    patch = min(SIZE) - 2 * litert.overlap
    keras_tiled = purify_patchwise(lambda tiles: purifier(tiles, training=False), images,
                                   patch_size=patch, overlap=litert.overlap)
    np.testing.assert_allclose(purified, np.asarray(keras_tiled), atol=1e-5)
    _assert_close_to_keras(purified, purifier, images)


def test_smaller_images_run_whole(float_file, purifier):
    images = _images(3, size=(9, 13), seed=6)
    _assert_close_to_keras(LiteRTPurifier(float_file)(images)["purified"], purifier, images)


def test_a_file_too_small_for_exact_tiles_refuses_larger_images(purifier):
    litert = LiteRTPurifier(convert.convert(purifier, "float32", (12, 12), 0.0))
    with pytest.raises(LiteRTInputError, match="convert the purifier at a larger --image_size"):
        litert(_images(1, size=(20, 20)))


def test_noise_off_is_deterministic_across_calls_and_interpreters(float_file):
    images = _images(2, seed=7)
    first, second = LiteRTPurifier(float_file), LiteRTPurifier(float_file)
    assert not first.randomized
    np.testing.assert_array_equal(first(images)["code_bits"], first(images)["code_bits"])
    np.testing.assert_array_equal(first(images)["code_bits"], second(images)["code_bits"])


def test_noise_is_fresh_per_call_and_per_interpreter(noisy_file):
    images = _images(2, seed=8)
    first, second = LiteRTPurifier(noisy_file), LiteRTPurifier(noisy_file)
    assert first.randomized
    call_a, call_b = first(images)["code_bits"], first(images)["code_bits"]
    other = second(images)["code_bits"]
    # std 1 on spread logits flips a share of the bits each draw.
    assert (call_a != call_b).mean() > 0.01
    assert (call_a != other).mean() > 0.01


_CHILD = textwrap.dedent("""
    import hashlib, sys
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=sys.argv[1])
    interpreter.allocate_tensors()
    images = np.random.default_rng(0).random((1, 16, 16, 1), dtype=np.float32)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images)
    interpreter.invoke()
    bits = [d for d in interpreter.get_output_details() if d["dtype"] == np.uint8][0]
    print(hashlib.sha256(interpreter.get_tensor(bits["index"]).tobytes()).hexdigest())
""")


def test_fresh_processes_draw_different_noise(noisy_file):
    digests = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", _CHILD, noisy_file], cwd=REPO_ROOT,
                                env=subprocess_env(), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        digests.append(result.stdout.split()[-1])
    assert digests[0] != digests[1]
