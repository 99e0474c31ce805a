"""Every registered attack really lowers an undefended classifier's accuracy; the fixes for
cleverhans' C&W (Keras 3, and the per-example constant of upstream issue 1205: minimal norm and
independent of the batch size, on RGB and grayscale) and SPSA (Keras 3, best iterate) work; EOT
averages K draws; ``check_adversarial`` rejects what leaves the ball, the range or the reals."""

import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf import attacks
from comdefend_tf.attacks import cleverhans_compat
from comdefend_tf.attacks.constraints import check_adversarial
from comdefend_tf.evaluation import classifier_fn
from tests.fixtures import attack_models as attack_fixtures

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
        model_fn, images[:8], y=labels[:8], batch_size=4, max_iterations=30,
        binary_search_steps=3, learning_rate=0.1, initial_const=1.0)
    changed = np.abs(adversarial - images[:8]).reshape(8, -1).max(axis=1) > 0
    assert changed.sum() >= 6
    assert _accuracy(model_fn, adversarial, labels[:8]) <= 0.25


# Pixels at 0 or 1 sit where tanh saturates, so C&W needs a large Adam rate to move them in
# few iterations; 60 x 6 at 0.3 finds a smaller L2 than 100 x 5 at 0.2 on these digits.
CW_OPTIONS = dict(max_iterations=60, binary_search_steps=6, learning_rate=0.3,
                  initial_const=1.0)


def _cw_and_pgd_l2(channels):
    classifier, _ = (attack_fixtures.tiny_classifier() if channels == 1
                     else attack_fixtures.tiny_rgb_classifier())
    images, labels = (attack_fixtures.attack_batch() if channels == 1
                      else attack_fixtures.attack_batch_rgb())
    return classifier_fn(classifier), images[:6], labels[:6]


def _l2(images, adversarial):
    return np.linalg.norm((adversarial - images).reshape(len(images), -1), axis=1)


@pytest.mark.parametrize("channels", [1, 3])
def test_cw_l2_finds_smaller_perturbations_than_pgd_l2(channels):
    """Upstream's constant has the image shape: on grayscale it weighs the misclassification
    term by ~1e5 and switches the L2 penalty off, on RGB it crashes. Per example, C&W is a
    minimum-norm attack and must beat PGD-L2 at its radius where both succeed."""
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    model_fn, images, labels = _cw_and_pgd_l2(channels)
    assert _accuracy(model_fn, images, labels) == 1.0
    cw = cleverhans_compat.carlini_wagner_l2(model_fn, images, y=labels, batch_size=6,
                                             **CW_OPTIONS)
    eps = 1.0
    pgd = projected_gradient_descent(model_fn, tf.constant(images), eps, 2.5 * eps / 20, 20, 2,
                                     clip_min=0.0, clip_max=1.0, y=tf.constant(labels),
                                     rand_init=False, sanity_checks=False).numpy()
    check_adversarial(images, pgd, eps, "l2")
    cw_broken = np.argmax(np.asarray(model_fn(cw)), -1) != labels
    pgd_broken = np.argmax(np.asarray(model_fn(pgd)), -1) != labels
    both = cw_broken & pgd_broken
    assert cw_broken.sum() >= pgd_broken.sum() - 1  # comparable success
    assert both.sum() >= 4
    assert _l2(images, cw)[both].mean() <= _l2(images, pgd)[both].mean()


@pytest.mark.parametrize("channels", [1, 3])
def test_cw_l2_does_not_depend_on_the_batch_size(channels):
    model_fn, images, labels = _cw_and_pgd_l2(channels)
    images, labels = images[:4], labels[:4]
    options = dict(CW_OPTIONS, max_iterations=30, binary_search_steps=3)
    small = cleverhans_compat.carlini_wagner_l2(model_fn, images, y=labels, batch_size=2,
                                                **options)
    whole = cleverhans_compat.carlini_wagner_l2(model_fn, images, y=labels, batch_size=4,
                                                **options)
    assert np.abs(small - images).max() > 0.05  # it did attack
    np.testing.assert_allclose(small, whole, atol=1e-4)


def test_spsa_optimizer_accepts_lr_under_keras3():
    optimizer = cleverhans_compat.SPSAAdam(lr=0.02, num_samples=8)
    assert optimizer.lr == 0.02 and optimizer._num_samples == 4
    with pytest.raises(ValueError, match="even"):
        cleverhans_compat.SPSAAdam(num_samples=7)


def test_spsa_returns_its_best_iterate_not_its_last():
    # One pixel; class 1 wins only in a narrow band around 0.3. From the start at 1.0 Adam
    # (lr 0.2) runs through the band (at 0.254) and overshoots to 0 and back, ending at 0.176,
    # where class 0 wins again.
    iterates = []

    def band(images):
        value = tf.reshape(images, [tf.shape(images)[0], -1])[:, :1]
        if images.shape[0] == 1:  # the iterates (the probes come in batches)
            iterates.append(float(value[0, 0]))
        return tf.concat([tf.zeros_like(value), 1.0 - 400.0 * tf.square(value - 0.3)], axis=1)

    def margin(value):
        return 0.0 - (1.0 - 400.0 * (value - 0.3) ** 2)

    image = tf.constant([[[[0.8]]]], tf.float32)
    adversarial = cleverhans_compat.spsa(band, image, tf.constant([0], tf.int64), 0.8, 12,
                                         clip_min=0.0, clip_max=1.0, learning_rate=0.2,
                                         delta=0.01, spsa_samples=8, seed=1)
    assert len(iterates) == 13  # the start and 12 steps
    assert margin(iterates[-1]) > 0  # the last iterate is classified correctly ...
    best = int(np.argmin([margin(v) for v in iterates]))
    assert margin(iterates[best]) < 0  # ... an earlier one was not
    assert float(adversarial.numpy().ravel()[0]) == pytest.approx(iterates[best], abs=1e-6)
    assert np.argmax(band(adversarial).numpy()) == 1


def test_check_adversarial_accepts_the_ball_and_names_what_leaves_it():
    clean = np.full((4, 2, 2, 1), 0.5, np.float32)
    inside = clean + 0.1
    norms = check_adversarial(clean, inside, 0.1, "linf")
    np.testing.assert_allclose(norms, 0.1, atol=1e-6)
    np.testing.assert_allclose(check_adversarial(clean, inside, 0.2, "l2"), 0.2, atol=1e-6)
    outside = inside.copy()
    outside[2, 0, 0, 0] += 0.05
    outside[3, 1, 1, 0] += 0.02
    with pytest.raises(ValueError, match=r"2 of 4 examples outside the linf ball of radius "
                                         r"0.1 \(worst: example 2 at 0.15"):
        check_adversarial(clean, outside, 0.1, "linf")
    with pytest.raises(ValueError, match="outside the l2 ball"):
        check_adversarial(clean, clean + 0.3, 0.5, "l2")  # L2 norm 0.6
    out_of_range = clean.copy()
    out_of_range[1, 0, 0, 0] = 1.2
    with pytest.raises(ValueError, match=r"1 of 4 examples outside the clip range \[0.0, 1.0\] "
                                         r"\(worst: example 1"):
        check_adversarial(clean, out_of_range, 1.0, "linf")
    not_finite = clean.copy()
    not_finite[3, 0, 1, 0] = np.nan
    with pytest.raises(ValueError, match="1 of 4 examples with non-finite values"):
        check_adversarial(clean, not_finite, 0.1, "linf")
    check_adversarial(clean, clean + 5.0, None, "l2", clip=None)  # both checks off
    with pytest.raises(ValueError, match="shape"):
        check_adversarial(clean, clean[:2], 0.1, "linf")


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
