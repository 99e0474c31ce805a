"""Conversion to LiteRT: every variant converts and runs, the float32 file reproduces the Keras
purifier, and the op report says which ops run in int8 and which stay float islands."""

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="the [litert] extra runs converted purifiers")

from comdefend_tf import ComDefend, get_config  # noqa: E402
from comdefend_tf.litert import convert  # noqa: E402
from comdefend_tf.litert import ops as litert_ops  # noqa: E402
from comdefend_tf.litert.runtime import LiteRTPurifier  # noqa: E402

SIZE = (16, 16)


@pytest.fixture(scope="module")
def converted(purifier, calibration):
    return {variant: convert.convert(purifier, variant, SIZE, 0.0, calibration)
            for variant in convert.VARIANTS}


@pytest.fixture(scope="module")
def small_converted(calibration):
    """The `small` widths: the converter leaves weight tensors under 1024 values in float in
    the weight-only variants, so the tiny purifier's would not shrink."""
    small = ComDefend(get_config("small", input_channels=1), seed=0)
    return {variant: convert.convert(small, variant, SIZE, 0.0, calibration)
            for variant in convert.VARIANTS}


def _images(count=3, seed=0, size=SIZE):
    return np.random.default_rng(seed).random((count, *size, 1), dtype=np.float32)


@pytest.mark.parametrize("variant", convert.VARIANTS)
def test_each_variant_runs_and_stays_near_the_keras_purifier(variant, converted, purifier):
    images = _images()
    outputs = LiteRTPurifier(converted[variant])(images)
    reference = np.asarray(purifier(images))
    assert outputs["purified"].shape == images.shape
    assert outputs["purified"].dtype == np.float32
    assert 0.0 <= outputs["purified"].min() and outputs["purified"].max() <= 1.0
    assert set(np.unique(outputs["code_bits"])) <= {0, 1}
    assert outputs["code_bits"].shape == (*images.shape[:3], purifier.config.code_channels)
    # Quantized variants flip some code bits near 0; the mean error stays small.
    assert np.abs(outputs["purified"] - reference).mean() < 0.05


def test_float32_file_equals_the_keras_purifier_with_noise_off(converted, purifier):
    images = _images(4, seed=3)
    outputs = LiteRTPurifier(converted["float32"])(images)
    logits = np.asarray(purifier.encoder(images))
    bits = np.asarray(purifier.code_bits(images)).astype(np.uint8)
    # Same float32 arithmetic in another summation order (XNNPACK vs oneDNN): differences of
    # a few float32 ulps in the logits, so bits may differ only where a logit is within 1e-4
    # of 0, and the purified images by rounding (1e-5 on values in [0, 1]).
    decided = np.abs(logits) > 1e-4
    np.testing.assert_array_equal(outputs["code_bits"][decided], bits[decided])
    if decided.all():
        np.testing.assert_allclose(outputs["purified"], np.asarray(purifier(images)), atol=1e-5)


def test_smaller_variants_are_smaller(small_converted):
    sizes = {variant: len(data) for variant, data in small_converted.items()}
    assert sizes["float16"] < sizes["float32"]
    assert sizes["dynamic_int8"] < sizes["float16"]
    assert sizes["full_int8"] < sizes["float32"]


def test_full_int8_report_lists_int8_ops_and_the_elu_float_islands(purifier, calibration):
    noisy = purifier.with_inference(noise_std=1.0)
    report = litert_ops.op_report(convert.convert(noisy, "full_int8", SIZE, 1.0, calibration))
    assert "CONV_2D" in report["int8_ops"] and "LOGISTIC" in report["int8_ops"]
    # The converter has no int8 ELU: each ELU is a float island between DEQUANTIZE/QUANTIZE.
    assert "ELU" in report["float_ops"] and "ELU" not in report["int8_ops"]
    assert {"QUANTIZE", "DEQUANTIZE"} <= set(report["boundary_ops"])
    assert "RANDOM_STANDARD_NORMAL" in report["float_ops"]
    elus = [op for op in report["ops"] if op["op"] == "ELU"]
    assert len(elus) == len(purifier.config.encoder_widths) + len(
        purifier.config.decoder_widths)
    assert all(op["inputs"] == ["float32"] for op in elus)
    assert report["counts"]["int8"] >= 6 and report["bytes"] > 0


def test_float_and_hybrid_reports(small_converted):
    converted = small_converted
    float32 = litert_ops.op_report(converted["float32"])
    assert float32["int8_ops"] == [] and float32["boundary_ops"] == []
    assert {"CONV_2D", "ELU", "LOGISTIC"} <= set(float32["float_ops"])
    dynamic = litert_ops.op_report(converted["dynamic_int8"])
    assert "CONV_2D" in dynamic["boundary_ops"]  # int8 weights, float activations
    assert "DEQUANTIZE" in litert_ops.op_report(converted["float16"])["float_ops"]


def test_noise_is_a_builtin_op_with_no_select_tf_ops(purifier):
    report = litert_ops.op_report(convert.convert(purifier, "float32", SIZE, 1.0))
    names = {op["op"] for op in report["ops"]}
    assert "RANDOM_STANDARD_NORMAL" in names
    assert not any(name.startswith("Flex") or name == "CUSTOM" for name in names)
    assert litert_ops.draws_noise(convert.convert(purifier, "float32", SIZE, 1.0))
    assert not litert_ops.draws_noise(convert.convert(purifier, "float32", SIZE, 0.0))


@pytest.mark.parametrize("kwargs, message", [
    ({"variant": "int4"}, "variant must be one of"),
    ({"image_size": (0, 16)}, "image_size must be"),
    ({"noise_std": -1.0}, "noise_std must be >= 0"),
    ({"variant": "full_int8", "representative_images": None}, "needs representative images"),
    ({"variant": "full_int8", "representative_images": np.zeros((2, 8, 8, 1), np.float32)},
     "representative images must be"),
])
def test_bad_conversion_requests_are_refused(purifier, kwargs, message):
    arguments = {"variant": "float32", "image_size": SIZE, "noise_std": 0.0,
                 "representative_images": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        convert.convert(purifier, arguments.pop("variant"), arguments.pop("image_size"),
                        arguments.pop("noise_std"), **arguments)
