"""APGD and Square on randomized toy models whose failure rates are known: no success is
thrown away (candidates), a negative mean margin is not a break, a lucky scoring does not end
Square's search, and a surrogate's forward pass never decides what is kept (``judge``)."""

import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import norm as gaussian

from comdefend_tf.attacks import apgd as apgd_lib
from comdefend_tf.attacks import apgd_steps
from comdefend_tf.attacks import square as square_lib


class NoisyMargin:
    """Logits ``[b(x) + std * n, 0, -10, -10]`` with ``b(x) = scale * (mean(x) - centre)`` and
    one fresh ``n ~ N(0, 1)`` per example and call: label 0 fails with probability
    ``Phi(-b(x) / std)``, known exactly."""

    def __init__(self, std=1.0, scale=10.0, centre=0.5, seed=0):
        self.std, self.scale, self.centre = std, scale, centre
        self.generator = tf.random.Generator.from_seed(seed)

    def base(self, images):
        return self.scale * (tf.reduce_mean(images, axis=[1, 2, 3]) - self.centre)

    def __call__(self, images):
        images = tf.convert_to_tensor(images, tf.float32)
        first = self.base(images) + self.std * self.generator.normal(tf.shape(images)[:1])
        rest = tf.zeros_like(first)
        return tf.stack([first, rest, rest - 10.0, rest - 10.0], axis=-1)


def constant_images(values, size=2):
    return np.stack([np.full((size, size, 1), v, np.float32) for v in values])


def value_for(failure_rate, model=None):
    """The pixel value whose clean failure rate under ``NoisyMargin()`` is ``failure_rate``."""
    model = model or NoisyMargin()
    return model.centre + model.std * -gaussian.ppf(failure_rate) / model.scale


def test_apgd_keeps_every_point_a_draw_misclassified_as_a_candidate():
    # Failure rates 0.3 (the attack cannot move them: eps is tiny) and ~0: the mean margin
    # over 5 draws stays mostly positive, but draws fail and must be kept.
    model = NoisyMargin()
    images = constant_images([value_for(0.3), value_for(0.3), 1.0])
    labels = np.zeros(3, np.int64)
    result = apgd_lib.apgd(model, images, labels, 1e-4, steps=5, eot_iter=5, seed=1)
    assert np.all(result.candidate_failures[:2] >= 1)
    assert result.candidate_failures[2] == 0  # b = 5 std: never fails
    np.testing.assert_array_equal(result.candidates[2], images[2])  # no candidate: clean image
    assert np.max(np.abs(result.candidates - images)) <= 1e-4 + 1e-7
    # broken means every draw of one step was wrong, never merely a negative mean margin.
    np.testing.assert_array_equal(result.broken, result.candidate_failures == 5)


def test_a_negative_mean_margin_does_not_skip_restarts():
    # Failure rate 0.6: the mean margin over 20 draws is negative, but all 20 draws of one step
    # are wrong with probability 0.6 ** 20 ~ 4e-5: the example is not broken, so every restart
    # must run on it (the old rule, mean margin < 0, skipped them).
    model = NoisyMargin()
    images = constant_images([value_for(0.6)])
    steps, eot, restarts = 3, 20, 3
    result = apgd_lib.apgd(model, images, np.zeros(1, np.int64), 1e-4, steps=steps,
                           eot_iter=eot, restarts=restarts, seed=2)
    assert result.best_margin[0] < 0
    assert not result.broken[0] and result.candidate_failures[0] >= 10
    assert result.gradient_calls == restarts * eot * (steps + 1)


def test_apgd_t_runs_every_target_on_examples_not_broken_in_every_draw():
    model = NoisyMargin()
    images = constant_images([value_for(0.6)])
    result = apgd_lib.apgd_targeted(model, images, np.zeros(1, np.int64), 1e-4, steps=2,
                                    eot_iter=20, n_target_classes=3, seed=3)
    assert result.robust_curve.shape[0] == 3 and not result.broken[0]
    assert result.gradient_calls == 3 * 20 * 3


class Surrogate:
    """A surrogate whose own forward pass says "wrong" everywhere (class 1 wins by 5) while
    the deployed pipeline (``judge``) is always right: what an attack keeps must follow the
    judge."""

    def __call__(self, images):
        mean = tf.reduce_mean(images, axis=[1, 2, 3])
        return tf.stack([mean, mean + 5.0, mean - 10.0, mean - 10.0], axis=-1)


def deployed(images):
    mean = tf.reduce_mean(tf.convert_to_tensor(images, tf.float32), axis=[1, 2, 3])
    return tf.stack([mean + 5.0, mean, mean - 10.0, mean - 10.0], axis=-1)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_the_deployed_forward_pass_decides_what_apgd_keeps(loss):
    images = constant_images([0.3, 0.7])
    labels = np.zeros(2, np.int64)
    own = apgd_lib.apgd(Surrogate(), images, labels, 0.05, steps=3, loss=loss, seed=0)
    assert np.all(own.best_margin < 0) and np.all(own.broken)  # judged by the surrogate
    judged = apgd_lib.apgd(Surrogate(), images, labels, 0.05, steps=3, loss=loss, seed=0,
                           judge=deployed)
    assert np.all(judged.best_margin > 4.0) and not np.any(judged.broken)
    assert np.all(judged.candidate_failures == 0)
    np.testing.assert_allclose(judged.best_margin,
                               apgd_steps.margin(deployed(judged.adversarial), labels).numpy(),
                               atol=1e-5)
    targeted = apgd_lib.apgd_targeted(Surrogate(), images, labels, 0.05, steps=2,
                                      n_target_classes=2, judge=deployed)
    assert not np.any(targeted.broken) and np.all(targeted.best_margin > 4.0)


def test_apgd_t_passes_its_targets_to_the_loss(monkeypatch):
    """Fails if APGD-T runs the untargeted DLR loss, or targets other than the clean image's
    top wrong classes in order."""
    seen = []
    real = apgd_steps.loss_per_example

    def spy(logits, labels, loss, target_labels=None):
        seen.append((loss, None if target_labels is None else np.asarray(target_labels)))
        return real(logits, labels, loss, target_labels)

    monkeypatch.setattr(apgd_steps, "loss_per_example", spy)
    weights = tf.constant(np.random.default_rng(0).normal(size=(4, 5)), tf.float32)

    def model(images):
        return tf.matmul(tf.reshape(images, [-1, 4]), weights)

    images = np.random.default_rng(1).uniform(size=(3, 2, 2, 1)).astype(np.float32)
    labels = np.argmax(model(images).numpy(), axis=-1)
    apgd_lib.apgd_targeted(model, images, labels, 1e-4, steps=2, n_target_classes=3,
                           compile=False)
    assert seen and all(loss == "dlr" and targets is not None for loss, targets in seen)
    logits = model(images).numpy()
    expected = [apgd_lib.top_wrong_classes(logits, labels, rank) for rank in (1, 2, 3)]
    runs = [targets for _, targets in seen]
    per_run = len(runs) // 3
    for rank in range(3):
        for targets in runs[rank * per_run:(rank + 1) * per_run]:
            np.testing.assert_array_equal(targets, expected[rank])


# ------------------------------------------------------------------------------- Square
def test_square_keeps_candidates_and_a_lucky_scoring_does_not_end_the_search():
    model = NoisyMargin(seed=5)
    images = constant_images([value_for(0.3)], size=4)
    labels = np.zeros(1, np.int64)
    queries = 30
    lucky = square_lib.square(model, images, labels, 1e-4, queries=queries, eot_draws=1,
                              seed=0)
    assert lucky.broken[0] and lucky.queries[0] < queries + 1  # one wrong draw ended it
    confirmed = square_lib.square(NoisyMargin(seed=5), images, labels, 1e-4, queries=queries,
                                  eot_draws=1, seed=0, confirm_draws=20)
    # 20 more draws all wrong has probability 0.3 ** 20: the search goes on to the end.
    assert not confirmed.broken[0] and confirmed.queries[0] == queries + 1
    assert confirmed.candidate_failures[0] == 1
    assert np.max(np.abs(confirmed.candidates - images)) <= 1e-4 + 1e-7
    # A point wrong in every draw is confirmed and ends the search.
    always = square_lib.square(NoisyMargin(std=0.01), constant_images([0.1], size=4), labels,
                               1e-4, queries=queries, eot_draws=2, seed=0, confirm_draws=20)
    assert always.broken[0] and always.queries[0] == 1
    assert always.model_calls == 2 + 20
    with pytest.raises(ValueError, match="confirm_draws"):
        square_lib.square(model, images, labels, 0.1, queries=2, confirm_draws=-1)


def test_eot_draws_of_comdefends_own_code_noise_are_independent():
    """The K draws averaged in one compiled APGD evaluation must each get fresh ``CodeNoise``:
    the mean of K = 8 then has about 1/sqrt(8) of one draw's spread (identical draws: 1)."""
    from comdefend_tf.evaluation import threat_models
    from tests.fixtures import attack_models as attack_fixtures

    classifier, _ = attack_fixtures.tiny_classifier()
    purifier = attack_fixtures.tiny_comdefend()[0].with_inference(noise_std=4.0)
    images, labels = attack_fixtures.attack_batch()
    images, labels = tf.constant(images[:4]), tf.constant(labels[:4], tf.int64)
    model = threat_models.build("bpda_eot", classifier, purifier).model
    index = tf.range(4, dtype=tf.int64)
    spreads = {}
    for draws in (1, 8):
        start = apgd_lib.compiled_functions(model, "ce", "linf", draws, False, False).start
        losses = np.array([start(images, labels, labels, index)[0].numpy() for _ in range(32)])
        spreads[draws] = losses.std(axis=0).mean()
    assert spreads[8] > 0
    assert 1.8 < spreads[1] / spreads[8] < 4.5, spreads


@pytest.mark.parametrize("draws_per_call", [3, 8])
def test_eot_as_a_batch_dimension_averages_independent_draws(draws_per_call):
    """K = 8 draws stacked into calls of 3 (3 + 3 + 2) or 8 copies: on a deterministic model
    the result equals one call per draw; on ComDefend's CodeNoise each copy draws its own
    noise (the spread of the mean shrinks as with separate calls)."""
    from comdefend_tf.evaluation import threat_models
    from tests.fixtures import attack_models as attack_fixtures

    weights = tf.constant(np.random.default_rng(0).normal(size=(4, 5)), tf.float32)

    def linear(images):
        return tf.matmul(tf.reshape(images, [-1, 4]), weights)

    images = np.random.default_rng(1).uniform(size=(3, 2, 2, 1)).astype(np.float32)
    labels = np.argmax(linear(images).numpy(), axis=-1)
    looped = apgd_lib.apgd(linear, images, labels, 0.05, steps=4, eot_iter=8, seed=0)
    stacked = apgd_lib.apgd(linear, images, labels, 0.05, steps=4, eot_iter=8, seed=0,
                            draws_per_call=draws_per_call)
    np.testing.assert_allclose(stacked.adversarial, looped.adversarial, atol=1e-6)
    np.testing.assert_allclose(stacked.loss_curve, looped.loss_curve, rtol=1e-5)

    classifier, _ = attack_fixtures.tiny_classifier()
    purifier = attack_fixtures.tiny_comdefend()[0].with_inference(noise_std=4.0)
    batch, batch_labels = attack_fixtures.attack_batch()
    batch, batch_labels = tf.constant(batch[:4]), tf.constant(batch_labels[:4], tf.int64)
    model = threat_models.build("bpda_eot", classifier, purifier).model
    index = tf.range(4, dtype=tf.int64)
    spreads = {}
    for draws, per_call in ((1, 1), (8, draws_per_call)):
        start = apgd_lib.compiled_functions(model, "ce", "linf", draws, False, False,
                                            draws_per_call=per_call).start
        losses = np.array([start(batch, batch_labels, batch_labels, index)[0].numpy()
                           for _ in range(32)])
        spreads[draws] = losses.std(axis=0).mean()
    assert 1.8 < spreads[1] / spreads[8] < 4.5, spreads
    with pytest.raises(ValueError, match="draws_per_call"):
        apgd_lib.apgd(linear, images, labels, 0.05, steps=1, draws_per_call=0)
