"""Every registered attack really lowers an undefended classifier's accuracy; the Keras 3
fixes for cleverhans' C&W and SPSA work; EOT averages K draws."""

import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf import attacks
from comdefend_tf.attacks import cleverhans_compat
from comdefend_tf.evaluation import classifier_fn
from tests import attack_fixtures

# Tiny step counts: the point is that each attack works, not its strength.
ATTACK_CASES = {
    "fgsm": dict(eps=0.3, steps=1),
    "bim": dict(eps=0.3, steps=5),
    "pgd": dict(eps=0.3, steps=5),
    "mim": dict(eps=0.3, steps=5),
    "cw_l2": dict(eps=None, steps=25),
    "spsa": dict(eps=0.3, steps=8, spsa_samples=32),
    "deepfool": dict(eps=0.3, steps=10),
}


@pytest.fixture(scope="module")
def setup():
    classifier, _ = attack_fixtures.tiny_classifier()
    images, labels = attack_fixtures.attack_batch()
    return classifier_fn(classifier), images, labels


def _accuracy(model_fn, images, labels):
    return float(np.mean(np.argmax(np.asarray(model_fn(tf.constant(images))), -1) == labels))


def test_registry_covers_the_paper_attacks_and_cleverhans():
    assert set(ATTACK_CASES) == set(attacks.ATTACK_NAMES)
    assert not attacks.get_attack("cw_l2").bounded
    assert attacks.get_attack("deepfool").library.startswith("foolbox")
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        attacks.get_attack("nope")


@pytest.mark.parametrize("name", list(ATTACK_CASES))
def test_attack_lowers_undefended_accuracy(setup, name):
    model_fn, images, labels = setup
    case = dict(ATTACK_CASES[name])
    # The slow ones (one image at a time, or many small Adam steps) get fewer images.
    count = {"spsa": 6, "cw_l2": 12}.get(name, len(images))
    images, labels = images[:count], labels[:count]
    eps = case.pop("eps")
    steps = case.pop("steps")
    assert _accuracy(model_fn, images, labels) == 1.0  # the batch is correctly classified
    adversarial = attacks.run_attack(name, model_fn, images, eps, y=labels, steps=steps, **case)
    assert adversarial.shape == images.shape and adversarial.dtype == np.float32
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    if eps is not None:
        assert np.abs(adversarial - images).max() <= eps + 1e-5
    # Every attack must fool the classifier on at least half of a batch it got fully right.
    assert _accuracy(model_fn, adversarial, labels) <= 0.5, name


def test_attack_input_errors_are_clear(setup):
    model_fn, images, labels = setup
    with pytest.raises(ValueError, match="eps must be in"):
        attacks.run_attack("fgsm", model_fn, images, 1.5, y=labels)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        attacks.run_attack("pgd", model_fn, images * 3.0, 0.1, y=labels)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        attacks.run_attack("bim", model_fn, images, 0.1, y=labels, steps=0)


def test_cw_optimizer_resets_state_but_never_the_learning_rate():
    optimizer = cleverhans_compat._AdamWithVariablesMethod(0.05)
    variable = tf.Variable(tf.zeros([3]))
    optimizer.apply_gradients([(tf.ones([3]), variable)])
    names = [v.name for v in optimizer.variables()]
    assert "learning_rate" not in names and "iteration" in names
    for v in optimizer.variables():
        v.assign(tf.zeros(v.shape, v.dtype))
    assert float(optimizer._adam.learning_rate) == pytest.approx(0.05)


def test_cw_untargeted_with_true_labels_changes_predictions_batch_by_batch(setup):
    # Two batches of 4: a fresh optimizer per batch and labels sliced per batch.
    model_fn, images, labels = setup
    adversarial = cleverhans_compat.carlini_wagner_l2(
        model_fn, images[:8], y=labels[:8], batch_size=4, max_iterations=15,
        binary_search_steps=2, learning_rate=0.05, initial_const=1.0)
    changed = np.abs(adversarial - images[:8]).reshape(8, -1).max(axis=1) > 0
    assert changed.sum() >= 4
    assert _accuracy(model_fn, adversarial, labels[:8]) <= 0.5


def test_spsa_adam_accepts_lr_under_keras3():
    optimizer = cleverhans_compat.SPSAAdam(lr=0.02, num_samples=8)
    assert optimizer.lr == 0.02 and optimizer._num_samples == 4
    with pytest.raises(ValueError, match="even"):
        cleverhans_compat.SPSAAdam(num_samples=7)


def test_eot_calls_the_model_k_times_and_averages_their_gradients():
    weights = tf.constant(np.random.RandomState(0).randn(4, 3).astype(np.float32))
    scales = [1.0, 2.0, 6.0]
    calls = []

    def draw_model(images):  # a "random" model: each call is the next draw
        scale = scales[len(calls) % len(scales)]
        calls.append(scale)
        return scale * tf.matmul(images, weights)

    averaged = attacks.expectation_over_transformation(draw_model, 3)
    assert averaged.eot_samples == 3
    images = tf.constant(np.ones((2, 4), np.float32))
    with tf.GradientTape() as tape:
        tape.watch(images)
        loss = tf.reduce_sum(averaged(images)[:, 0])
    gradient = tape.gradient(loss, images)
    assert calls == scales
    expected = np.mean(scales) * np.tile(weights.numpy()[:, 0], (2, 1))
    np.testing.assert_allclose(gradient.numpy(), expected, rtol=1e-6)
    assert attacks.expectation_over_transformation(draw_model, 1) is draw_model
    with pytest.raises(ValueError):
        attacks.expectation_over_transformation(draw_model, 0)


def test_deepfool_runs_once_and_projects_per_eps(setup):
    model_fn, images, labels = setup
    assert attacks.get_attack("deepfool").eps_independent
    unprojected = attacks.run_attack("deepfool", model_fn, images[:8], None, y=labels[:8],
                                     steps=5)
    projected = attacks.run_attack("deepfool", model_fn, images[:8], 0.05, y=labels[:8], steps=5)
    np.testing.assert_allclose(attacks.project_linf(images[:8], unprojected, 0.05), projected,
                               atol=1e-6)
    assert np.abs(projected - images[:8]).max() <= 0.05 + 1e-6
