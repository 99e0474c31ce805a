"""The order of training batches: a function of the seed and the global step alone."""

import numpy as np
import pytest

from comdefend_tf.io import datasets as data
from comdefend_tf.training import stream


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def test_training_stream_from_any_step_continues_the_full_stream(digits):
    images = digits.train.take(100)  # 6 batches of 16 per pass
    for total in (15, 200):  # 3 chained passes; 34 passes (one reshuffled repetition)
        full = list(stream.training_stream(images, 16, 3, 0, total, 6, images_only=True))
        assert len(full) == total
        assert not np.array_equal(full[0], full[6])  # each pass has its own order
        for start in (5, 6, 13):
            tail = list(stream.training_stream(images, 16, 3, start, total, 6,
                                                 images_only=True))
            assert len(tail) == total - start
            for got, want in zip(tail, full[start:]):
                np.testing.assert_array_equal(got, want)
    other_seed = next(iter(stream.training_stream(images, 16, 4, 0, 15, 6, images_only=True)))
    assert not np.array_equal(other_seed, full[0])
