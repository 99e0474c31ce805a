"""APGD: the published schedule, losses, EOT averaging, strength against PGD and agreement with
the Adversarial Robustness Toolbox's implementation on the same images and budget."""

import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf import data as data_lib
from comdefend_tf.attacks import apgd as apgd_lib
from tests import attack_fixtures

CROSS_CHECK_EXAMPLES = 160  # 2 points = 3 examples: a meaningful tolerance


@pytest.fixture(scope="module")
def classifier():
    model, _ = attack_fixtures.tiny_classifier()
    return model


@pytest.fixture(scope="module")
def held_out():
    return data_lib.take_arrays(attack_fixtures.digits().test, CROSS_CHECK_EXAMPLES)


def accuracy(model, images, labels):
    return float(np.mean(np.argmax(np.asarray(model(images)), axis=-1) == labels))


def test_checkpoints_follow_the_published_sequence():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 -> w_j = ceil(p_j * 100).
    assert apgd_lib.checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_lib.checkpoints(50) == [11, 21, 29, 35, 40, 44, 47, 50]
    with pytest.raises(ValueError, match="steps"):
        apgd_lib.checkpoints(0)


def test_dlr_losses_match_the_formulas():
    logits = tf.constant([[5.0, 3.0, 1.0, 0.0, -1.0]])
    labels = tf.constant([1])
    # Untargeted: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3) = -(3 - 5) / (5 - 1).
    assert apgd_lib.loss_per_example(logits, labels, "dlr").numpy()[0] == pytest.approx(0.5)
    # Targeted (t = 3): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(3 - 0) / (5 - 0.5).
    targeted = apgd_lib.loss_per_example(logits, labels, "dlr", tf.constant([3]))
    assert targeted.numpy()[0] == pytest.approx(-3.0 / 4.5)
    assert apgd_lib.margin(logits, labels).numpy()[0] == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="at least 4 classes"):
        apgd_lib.loss_per_example(tf.zeros([1, 3]), tf.constant([0]), "dlr", tf.constant([1]))


class CountingScaledModel:
    """A random 'pipeline' whose k-th call scales its input by scales[k % len(scales)], and
    counts its calls in a variable (visible through tf.function too)."""

    def __init__(self, scales, num_classes=3, size=4):
        rng = np.random.default_rng(0)
        self.weights = tf.constant(rng.normal(size=(size, num_classes)), tf.float32)
        self.scales = tf.constant(scales, tf.float32)
        self.calls = tf.Variable(0, dtype=tf.int64)

    def __call__(self, images):
        scale = tf.gather(self.scales, self.calls % len(self.scales))
        self.calls.assign_add(1)
        flat = tf.reshape(images, [tf.shape(images)[0], -1])
        return tf.matmul(scale * flat, self.weights)


def test_eot_gradient_averages_one_gradient_per_draw():
    model = CountingScaledModel([1.0, 2.0, -3.0])
    images = tf.constant(np.random.default_rng(1).uniform(size=(2, 2, 2, 1)), tf.float32)
    labels = tf.constant([0, 2])
    loss, _, _, gradient = apgd_lib.eot_gradient(model, images, labels, "ce", eot_iter=3)
    assert int(model.calls.numpy()) == 3
    model.calls.assign(0)
    singles = [apgd_lib.single_draw_gradient(model, images, labels, "ce") for _ in range(3)]
    np.testing.assert_allclose(gradient.numpy(), np.mean([g.numpy() for _, _, g in singles], 0),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss.numpy(), np.mean([l.numpy() for l, _, _ in singles], 0),
                               rtol=1e-5)


def test_apgd_with_eot_calls_the_model_k_times_per_step():
    model = CountingScaledModel([1.0, 0.5])
    images = np.random.default_rng(2).uniform(size=(3, 2, 2, 1)).astype(np.float32)
    steps, eot = 4, 3
    result = apgd_lib.apgd(model, images, np.array([0, 1, 2]), 0.1, steps=steps, eot_iter=eot)
    # One evaluation at the random start, then one per step; each averages eot draws.
    assert result.gradient_calls == eot * (steps + 1)
    assert int(model.calls.numpy()) == eot * (steps + 1)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_apgd_stays_in_the_ball_and_in_range(classifier, held_out, norm, eps):
    images, labels = held_out[0][:32], held_out[1][:32]
    result = apgd_lib.apgd(classifier, images, labels, eps, norm=norm, steps=10, restarts=2)
    delta = (result.adversarial - images).reshape(len(images), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= eps + 1e-5
    assert result.adversarial.min() >= 0.0 and result.adversarial.max() <= 1.0
    # The returned points are the lowest-margin ones: their recorded margin is the real one.
    np.testing.assert_allclose(apgd_lib.margin(classifier(result.adversarial), labels).numpy(),
                               result.best_margin, rtol=1e-4, atol=1e-4)
    # Convergence curve: monotone non-increasing fraction of unbroken examples.
    assert np.all(np.diff(result.robust_curve[0]) <= 1e-9)
    assert result.nonfinite_gradients == 0


def test_apgd_is_at_least_as_strong_as_pgd(classifier, held_out):
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    images, labels = held_out
    eps, steps = 0.1, 20
    pgd = projected_gradient_descent(classifier, tf.constant(images), eps, 2.5 * eps / steps,
                                     steps, np.inf, clip_min=0.0, clip_max=1.0,
                                     y=tf.constant(labels), rand_init=True,
                                     sanity_checks=False)
    result = apgd_lib.apgd(classifier, images, labels, eps, steps=steps)
    pgd_accuracy = accuracy(classifier, pgd.numpy(), labels)
    apgd_accuracy = accuracy(classifier, result.adversarial, labels)
    assert apgd_accuracy < accuracy(classifier, images, labels) - 0.2
    assert apgd_accuracy <= pgd_accuracy + 1.0 / len(labels)


def test_targeted_apgd_reaches_the_target(classifier, held_out):
    images, labels = held_out[0][:40], held_out[1][:40]
    targets = apgd_lib.top_wrong_classes(np.asarray(classifier(images)), labels)
    assert np.all(targets != labels)
    result = apgd_lib.apgd(classifier, images, labels, 0.3, steps=20, loss="dlr",
                           target_labels=targets)
    predictions = np.argmax(np.asarray(classifier(result.adversarial)), axis=-1)
    assert np.mean(predictions == targets) > 0.5


def test_apgd_agrees_with_art(classifier, held_out):
    from art.attacks.evasion import AutoProjectedGradientDescent
    from art.estimators.classification import TensorFlowV2Classifier

    images, labels = held_out
    eps, steps = 0.1, 20
    ours = accuracy(classifier, apgd_lib.apgd(classifier, images, labels, eps,
                                              steps=steps).adversarial, labels)
    estimator = TensorFlowV2Classifier(
        classifier, nb_classes=10, input_shape=images.shape[1:], clip_values=(0.0, 1.0),
        loss_object=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # ART's first step is 2 * eps_step; APGD's is 2 * eps.
    art_attack = AutoProjectedGradientDescent(
        estimator, norm=np.inf, eps=eps, eps_step=eps, max_iter=steps, nb_random_init=1,
        batch_size=len(images), loss_type="cross_entropy", verbose=False)
    art = accuracy(classifier, art_attack.generate(images, y=np.eye(10)[labels]), labels)
    clean = accuracy(classifier, images, labels)
    assert 0.2 < ours < clean - 0.2, "eps should leave the cross-check informative"
    assert abs(ours - art) <= 0.02 + 1e-9, (ours, art)


def test_bad_arguments_fail_clearly(classifier, held_out):
    images, labels = held_out[0][:2], held_out[1][:2]
    with pytest.raises(ValueError, match="norm"):
        apgd_lib.apgd(classifier, images, labels, 0.1, norm="l1")
    with pytest.raises(ValueError, match="loss"):
        apgd_lib.apgd(classifier, images, labels, 0.1, loss="hinge")
    with pytest.raises(ValueError, match="eps"):
        apgd_lib.apgd(classifier, images, labels, 0.0)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        apgd_lib.apgd(classifier, images * 2 + 1, labels, 0.1)
    with pytest.raises(ValueError, match="differ"):
        apgd_lib.apgd(classifier, images, labels, 0.1, target_labels=labels)
