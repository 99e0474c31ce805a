"""Square attack (L-inf): schedule, budget, ball, and that it breaks an undefended classifier
without gradients."""

import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf.attacks import square as square_lib
from tests import attack_fixtures


def test_square_fraction_halves_on_the_published_schedule():
    assert square_lib.square_fraction(0.8, 0, 10000) == pytest.approx(0.8)
    assert square_lib.square_fraction(0.8, 11, 10000) == pytest.approx(0.4)
    assert square_lib.square_fraction(0.8, 501, 10000) == pytest.approx(0.05)
    # Rescaled to a 100-query budget: query 6 is iteration 600 of 10,000.
    assert square_lib.square_fraction(0.8, 6, 100) == pytest.approx(0.8 / 16)
    assert square_lib.square_fraction(0.8, 99, 100) == pytest.approx(0.8 / 512)


def test_square_breaks_the_undefended_classifier_without_gradients():
    classifier, _ = attack_fixtures.tiny_classifier()
    images, labels = attack_fixtures.attack_batch()
    queries = []

    def forward_only(batch):
        # Square must never need a gradient: block it.
        return tf.stop_gradient(classifier(batch))

    eps = 0.3
    adversarial, margins = square_lib.square_linf(forward_only, images, labels, eps,
                                                  queries=150, seed=0,
                                                  progress=queries.append)
    assert adversarial.shape == images.shape and adversarial.dtype == np.float32
    assert np.abs(adversarial - images).max() <= eps + 1e-6
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    assert sum(queries) == 150  # the budget, reported even when it stops early
    predictions = np.argmax(np.asarray(classifier(adversarial)), axis=-1)
    # attack_batch holds only correctly classified digits: accuracy starts at 100%.
    assert np.mean(predictions == labels) < 0.5
    np.testing.assert_array_equal(predictions != labels, margins < 0)


def test_square_rejects_bad_arguments():
    images = np.zeros((2, 4, 4, 1), np.float32)
    labels = np.zeros(2, np.int64)
    model = lambda batch: tf.zeros([tf.shape(batch)[0], 3])  # noqa: E731
    with pytest.raises(ValueError, match="eps"):
        square_lib.square_linf(model, images, labels, 1.5)
    with pytest.raises(ValueError, match="queries"):
        square_lib.square_linf(model, images, labels, 0.1, queries=0)
    with pytest.raises(ValueError, match="labels"):
        square_lib.square_linf(model, images, labels[:1], 0.1)
