"""Parity with the authors' files: their uint8 conversion (truncation) against ours (rounding),
and the agreement measure between two uint8 images."""

import numpy as np
import pytest

from comdefend_tf.io import images as image_io
from comdefend_tf.weights import parity


def test_truncation_and_rounding_differ_as_documented():
    values = np.array([0.0, 0.5 / 255, 0.999 / 255, 254.6 / 255, 1.0], np.float32)
    np.testing.assert_array_equal(parity.truncate_to_uint8(values), [0, 0, 0, 254, 255])
    np.testing.assert_array_equal(image_io.to_uint8(values), [0, 0, 1, 255, 255])


def test_uint8_agreement():
    ours = np.array([[10, 20, 30, 40]], np.uint8)
    theirs = np.array([[10, 21, 30, 44]], np.uint8)
    agreement = parity.uint8_agreement(ours, theirs)
    assert agreement["exact"] == 0.5 and agreement["mean_abs"] == 1.25
    assert agreement["within_1"] == 0.75 and agreement["max_abs"] == 4
    assert agreement["psnr_db"] == pytest.approx(10 * np.log10(255 ** 2 / (17 / 4)))


def test_uint8_agreement_refuses_different_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        parity.uint8_agreement(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
