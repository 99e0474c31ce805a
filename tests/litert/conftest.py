"""The tiny purifier and calibration images every LiteRT test converts (16x16, 1 channel)."""

import numpy as np
import pytest

from comdefend_tf import load_comdefend
from tests.fixtures.purifiers import save_spread_tiny_purifier


@pytest.fixture(scope="module")
def purifier(tmp_path_factory):
    return load_comdefend(save_spread_tiny_purifier(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def calibration():
    """Full-int8 calibration images: float32 [16, 16, 16, 1] in [0, 1), seeded."""
    return np.random.default_rng(1).random((16, 16, 16, 1), dtype=np.float32)
