"""Held-out quality: the code statistics' values on a known code, the report over batches, and
the collapse check against the mean image."""

import numpy as np
import pytest

from comdefend_tf.config import get_config
from comdefend_tf.io import datasets as data
from comdefend_tf.model import ComDefend
from comdefend_tf.training import reconstruction


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def _tiny_config():
    return get_config("tiny", input_channels=1, train_noise_std=1.0)


def test_code_statistics_of_a_known_code():
    logits = np.array([-200.0, -0.5, 0.05, 3.0, 150.0], np.float32)
    stats = reconstruction.code_statistics(logits)
    assert set(stats) == set(reconstruction.CODE_STATISTICS)
    assert stats["num_logits"] == 5
    assert stats["median_abs_logit"] == pytest.approx(3.0)
    assert stats["max_abs_logit"] == pytest.approx(200.0)
    assert stats["near_zero_fraction"] == pytest.approx(0.4)
    assert stats["near_zero_0_1_fraction"] == pytest.approx(0.2)
    assert stats["ones_fraction"] == pytest.approx(0.6)
    # Phi(-0.5) + Phi(-0.05) + Phi(-3) over 5 values.
    assert stats["noise1_flip_rate"] == pytest.approx((0.308538 + 0.480061 + 0.001350) / 5,
                                                      abs=1e-5)


def test_code_statistics_refuses_an_empty_code():
    with pytest.raises(ValueError, match="at least one"):
        reconstruction.code_statistics(np.zeros((0, 4), np.float32))


def test_report_holds_the_code_statistics_of_every_held_out_logit(digits):
    images = data.take_arrays(digits.test)[0][:50]
    model = ComDefend(_tiny_config(), seed=0)
    # Batches of 16: the last of 50 images holds 2, and every logit counts once.
    report = reconstruction.reconstruction_report(model, images, batch_size=16)
    expected = reconstruction.code_statistics(model.forward(images, training=False)["code_logits"])
    for key in reconstruction.CODE_STATISTICS:
        assert report[key] == pytest.approx(expected[key], rel=1e-6), key
    assert report["num_images"] == 50
    assert report["num_logits"] == 50 * 8 * 8 * model.config.code_channels
    assert report["bits_per_pixel"] == model.config.code_channels


def _constant_output_model(level):
    model = ComDefend(_tiny_config(), seed=0)
    model(np.zeros((1, 8, 8, 1), np.float32))
    last = model.decoder.layers[-1]
    last.kernel.assign(np.zeros(last.kernel.shape, np.float32))
    last.bias.assign(np.full(last.bias.shape, np.log(level / (1 - level)), np.float32))
    return model


def test_a_constant_output_model_is_detected_as_collapsed(digits):
    images = data.take_arrays(digits.test)[0]
    baseline = reconstruction.mean_image_psnr(images)
    # The mean image is the best constant output: every constant grey level scores lower.
    for level in (0.05, 0.2, 0.5):
        model = _constant_output_model(level)
        report = reconstruction.reconstruction_report(model, images)
        assert report["psnr_db"] < baseline
        assert reconstruction.collapse_verdict(report["psnr_db"], baseline) == "collapsed"
    assert reconstruction.collapse_verdict(baseline + 0.5, baseline, margin_db=1.0) == "collapsed"
    assert reconstruction.collapse_verdict(baseline + 1.5, baseline, margin_db=1.0) == "ok"
    assert reconstruction.collapse_verdict(float("nan"), baseline) == "collapsed"
    mean = images.mean(axis=0)
    expected = np.mean([10 * np.log10(1 / np.mean((image - mean) ** 2)) for image in images])
    assert baseline == pytest.approx(expected, abs=1e-3)
