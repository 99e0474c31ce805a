"""Square attack, L-inf and L2: schedule, window sizes and the L2 pattern, the eps ball, that it
breaks an undefended classifier without gradients, query counting, and EOT scoring that never
accepts a candidate or counts a success on one lucky noise draw."""

import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf.attacks import square as square_lib
from comdefend_tf.attacks.constraints import check_adversarial
from tests.fixtures import attack_models as attack_fixtures


def test_square_fraction_halves_on_the_published_schedule():
    assert square_lib.square_fraction(0.8, 0, 10000) == pytest.approx(0.8)
    assert square_lib.square_fraction(0.8, 11, 10000) == pytest.approx(0.4)
    assert square_lib.square_fraction(0.8, 501, 10000) == pytest.approx(0.05)
    # Rescaled to a 100-query budget: query 6 is iteration 600 of 10,000.
    assert square_lib.square_fraction(0.8, 6, 100) == pytest.approx(0.8 / 16)
    assert square_lib.square_fraction(0.8, 99, 100) == pytest.approx(0.8 / 512)


def test_window_sides():
    assert square_lib.window_side(0.8, 28, 28, "linf") == 25  # round(sqrt(0.8 * 784))
    assert square_lib.window_side(0.001, 28, 28, "linf") == 1
    assert square_lib.window_side(0.001, 28, 28, "l2") == 3  # at least 3
    assert square_lib.window_side(0.2, 28, 28, "l2") == 13  # round(12.5) = 12 -> odd 13
    assert square_lib.window_side(1.0, 8, 8, "l2") == 8  # never larger than the image


def test_l2_meta_pattern():
    pattern = square_lib.meta_pattern(5)
    assert np.sum(pattern ** 2) == pytest.approx(1.0)
    assert np.all(pattern[:2] > 0) and np.all(pattern[2:] < 0)  # two halves of opposite sign
    # Peaks at the centre of each half, symmetric left-right.
    assert np.argmax(pattern[:2]) == np.ravel_multi_index((1, 2), (2, 5))
    assert np.argmin(pattern[2:]) == np.ravel_multi_index((1, 2), (3, 5))
    np.testing.assert_allclose(pattern, pattern[:, ::-1])
    # Nested squares: the centre pixel of the top half weighs 1 + 1/4 + 1/9 against 1/9 at
    # its outer ring.
    assert pattern[1, 2] / pattern[1, 0] == pytest.approx((1 + 1 / 4 + 1 / 9) / (1 / 9))


@pytest.fixture(scope="module")
def setup():
    classifier, _ = attack_fixtures.tiny_classifier()
    images, labels = attack_fixtures.attack_batch()
    return classifier, images, labels


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 1.0)])
def test_square_breaks_the_undefended_classifier_without_gradients(setup, norm, eps):
    classifier, images, labels = setup

    def forward_only(batch):
        # Square must never need a gradient: block it.
        return tf.stop_gradient(classifier(batch))

    result = square_lib.square(forward_only, images, labels, eps, norm=norm, queries=300,
                               seed=0)
    assert result.adversarial.shape == images.shape and result.adversarial.dtype == np.float32
    check_adversarial(images, result.adversarial, eps, norm)
    predictions = np.argmax(np.asarray(classifier(result.adversarial)), axis=-1)
    # attack_batch holds only correctly classified digits: accuracy starts at 100%.
    assert np.mean(predictions == labels) <= 0.5
    np.testing.assert_array_equal(predictions != labels, result.broken)
    np.testing.assert_array_equal(result.broken, result.margin < 0)


def test_l2_start_and_every_candidate_use_the_whole_budget(setup):
    classifier, images, labels = setup
    eps = 0.5
    # One query: the L2 start and one candidate are rescaled to norm eps (then clipped to
    # [0, 1], which can only shrink them).
    result = square_lib.square(classifier, images, labels, eps, norm="l2", queries=1)
    norms = check_adversarial(images, result.adversarial, eps, "l2")
    assert np.median(norms) > 0.8 * eps


def test_square_linf_alias_keeps_its_interface(setup):
    classifier, images, labels = setup
    ticks = []
    adversarial, margins = square_lib.square_linf(classifier, images[:6], labels[:6], 0.3, 40,
                                                  seed=1, progress=ticks.append)
    result = square_lib.square(classifier, images[:6], labels[:6], 0.3, queries=40, seed=1)
    np.testing.assert_array_equal(adversarial, result.adversarial)
    np.testing.assert_array_equal(margins, result.margin)
    assert sum(ticks) == 40


class ScheduledMarginModel:
    """The true class (0) gets logit ``levels[k]`` at the k-th call (the last level repeats),
    three other classes 0: every example's margin is exactly the level."""

    def __init__(self, levels):
        self.levels = tf.constant(levels, tf.float32)
        self.calls = tf.Variable(0, dtype=tf.int64)

    def __call__(self, images):
        level = tf.gather(self.levels, tf.minimum(self.calls, len(self.levels) - 1))
        self.calls.assign_add(1)
        batch = tf.shape(images)[0]
        return tf.concat([tf.fill([batch, 1], level), tf.zeros([batch, 3])], axis=1)


def test_query_counting_and_model_calls():
    images = np.full((5, 6, 6, 1), 0.5, np.float32)
    labels = np.zeros(5, np.int64)
    ticks = []
    model = ScheduledMarginModel([1.0])  # never broken: the whole budget is spent
    result = square_lib.square(model, images, labels, 0.1, queries=7, eot_draws=3,
                               batch_size=2, progress=ticks.append)
    np.testing.assert_array_equal(result.queries, 8)  # the start + 7 candidates
    assert result.model_calls == 3 * 3 * 8 == int(model.calls.numpy())  # draws x chunks x 8
    assert sum(ticks) == 7
    ticks.clear()
    broken_at_start = ScheduledMarginModel([-1.0])
    result = square_lib.square(broken_at_start, images, labels, 0.1, queries=7, eot_draws=3,
                               progress=ticks.append)
    np.testing.assert_array_equal(result.queries, 1)
    assert result.model_calls == 3 == int(broken_at_start.calls.numpy())
    assert result.broken.all() and sum(ticks) == 7  # the budget is still reported


def test_a_candidate_is_kept_only_if_the_mean_margin_over_the_draws_improves():
    images = np.full((4, 6, 6, 1), 0.5, np.float32)
    labels = np.zeros(4, np.int64)
    # Start: draws (1, 1), mean 1. Every candidate: one "misclassified" draw (-5) and one
    # at 8: mean 1.5, worse than 1 -> rejected every time, never counted broken.
    rejected = square_lib.square(ScheduledMarginModel([1.0, 1.0] + [-5.0, 8.0] * 20),
                                 images, labels, 0.1, queries=10, eot_draws=2, seed=0)
    np.testing.assert_array_equal(rejected.accepted, 0)
    assert not rejected.broken.any()
    np.testing.assert_allclose(rejected.margin, 1.0)
    np.testing.assert_array_equal(rejected.adversarial, _start_point(images))
    # Draws (-5, 6.9): mean 0.95 < 1 -> accepted at the first candidate, but one draw was
    # classified correctly, so not broken; the search goes on.
    accepted = square_lib.square(ScheduledMarginModel([1.0, 1.0] + [-5.0, 6.9] * 20),
                                 images, labels, 0.1, queries=10, eot_draws=2, seed=0)
    assert np.all(accepted.accepted >= 1) and not accepted.broken.any()
    np.testing.assert_array_equal(accepted.queries, 11)


def _start_point(images, eps=0.1, seed=0):
    """The L-inf start for ``seed``: the stripes drawn first from the search's generator."""
    rng = np.random.default_rng(seed)
    count, _, width, channels = images.shape
    stripes = eps * rng.choice([-1.0, 1.0], size=(count, 1, width, channels))
    return np.clip(images.astype(np.float64) + stripes, 0.0, 1.0).astype(np.float32)


class RandomMarginModel:
    """Each call draws every example's true-class logit from N(1, 1) (others 0): a 16% chance
    per draw of a 'misclassified' output that says nothing about the image."""

    def __call__(self, images):
        batch = tf.shape(images)[0]
        true_logit = 1.0 + tf.random.normal([batch, 1])
        return tf.concat([true_logit, tf.zeros([batch, 3])], axis=1)


def test_eot_scoring_rejects_lucky_single_draws():
    images = np.full((24, 6, 6, 1), 0.5, np.float32)
    labels = np.zeros(24, np.int64)
    tf.random.set_seed(0)
    one_draw = square_lib.square(RandomMarginModel(), images, labels, 0.1, queries=60,
                                 eot_draws=1, seed=0)
    # With one draw a lucky output is taken for a success: nearly every example "breaks".
    assert one_draw.broken.mean() >= 0.9
    eight_draws = square_lib.square(RandomMarginModel(), images, labels, 0.1, queries=60,
                                    eot_draws=8, seed=0)
    # Eight draws must all be misclassified (0.16^8 = 4e-7 per candidate): none breaks.
    assert not eight_draws.broken.any()
    np.testing.assert_array_equal(eight_draws.queries, 61)


def test_square_rejects_bad_arguments():
    images = np.zeros((2, 4, 4, 1), np.float32)
    labels = np.zeros(2, np.int64)
    model = lambda batch: tf.zeros([tf.shape(batch)[0], 3])  # noqa: E731
    with pytest.raises(ValueError, match="eps"):
        square_lib.square(model, images, labels, 1.5)
    with pytest.raises(ValueError, match="queries"):
        square_lib.square(model, images, labels, 0.1, queries=0)
    with pytest.raises(ValueError, match="labels"):
        square_lib.square(model, images, labels[:1], 0.1)
    with pytest.raises(ValueError, match="norm"):
        square_lib.square(model, images, labels, 0.1, norm="l1")
    with pytest.raises(ValueError, match="eot_draws"):
        square_lib.square(model, images, labels, 0.1, eot_draws=0)
    with pytest.raises(ValueError, match="p_init"):
        square_lib.square(model, images, labels, 0.1, p_init=1.5)
