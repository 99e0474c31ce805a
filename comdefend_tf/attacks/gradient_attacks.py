"""The attacks of the evaluation, one function each, in cleverhans' style, and their registry.

Every attack has the face ``attack(model_fn, x, eps, steps=..., y=None, batch_size=...,
progress=False) -> numpy adversarial images``:

* ``model_fn``: a callable from images float32 ``[B, H, W, C]`` in [0, 1] to logits
  ``[B, num_classes]``; it is what the attack differentiates (the threat model decides whether
  it is the classifier alone or ``classifier(defense(x))``, see ``comdefend_tf.evaluation``).
* ``x``: numpy float32 ``[n, H, W, C]`` in [0, 1]; ``y``: int ``[n]`` true labels (None: the
  model's own predictions, cleverhans' default; the evaluation always passes true labels).
* ``eps``: L-inf budget in [0, 1] for the bounded attacks; ignored by ``cw_l2`` (a
  minimum-L2-norm attack, ``bounded=False`` in its spec).
* the result: numpy float32 of ``x``'s shape, in [0, 1]; batches run with a tqdm bar.

Sources: FGSM, BIM, PGD, MIM from ``cleverhans.tf2.attacks`` unchanged; C&W-L2 and SPSA from
cleverhans through ``comdefend_tf.attacks.cleverhans_compat`` (Keras 3 fixes); DeepFool
(L-inf, Moosavi-Dezfooli et al. 2016) from foolbox 3.3.4's ``LinfDeepFoolAttack``, its
perturbation projected onto the eps ball by foolbox.

Step sizes: the iterative L-inf attacks (BIM, PGD, MIM) use ``eps_iter = 2.5 * eps / steps``
(Madry et al.'s rule, so the boundary is reachable from any start); PGD starts at a uniform
random point in the eps ball, BIM and MIM at the clean image.

EOT (randomized purifiers): ``expectation_over_transformation(model_fn, samples)`` returns a
model_fn whose logits are the mean over ``samples`` calls, i.e. over ``samples`` independent
noise draws. Its gradient is the mean of the ``samples`` per-draw logit gradients, so every
gradient attack above (and SPSA's loss) sees the expectation. This is the logit-averaging form
of EOT, the one accepted for attack libraries that take a model callable; results record
``eot_samples`` and ``eot_form``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from comdefend_tf import optional
from comdefend_tf.attacks import cleverhans_compat

EOT_FORM = "mean of logits over K noise draws (gradient = mean of the K logit gradients)"


def _run_batched(name, attack_batch, x, y, batch_size, progress):
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"{name}: images must be [n, H, W, C], got shape {x.shape}")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(f"{name}: images must lie in [0, 1], got [{x.min()}, {x.max()}]")
    labels = None if y is None else np.asarray(y, dtype=np.int64)
    if labels is not None and labels.shape != (len(x),):
        raise ValueError(f"{name}: labels must be [n] = [{len(x)}], got shape {labels.shape}")
    adversarial = np.empty_like(x)
    starts = range(0, len(x), batch_size)
    for start in tqdm(starts, desc=name, unit="batch", disable=not progress, leave=False):
        stop = start + batch_size
        batch_labels = None if labels is None else labels[start:stop]
        adversarial[start:stop] = np.asarray(attack_batch(x[start:stop], batch_labels),
                                              dtype=np.float32)
    return np.clip(adversarial, 0.0, 1.0)


def _check_eps(name, eps):
    if eps is None or not 0.0 <= float(eps) <= 1.0:
        raise ValueError(f"{name}: eps must be in [0, 1] for images in [0, 1], got {eps}")
    return float(eps)


def _tensor_labels(labels):
    return None if labels is None else tf.constant(labels, dtype=tf.int64)


def fgsm(model_fn, x, eps, steps: int = 1, y=None, batch_size: int = 128,
         progress: bool = False) -> np.ndarray:
    """Fast Gradient Sign Method (Goodfellow et al. 2015), one L-inf step of size ``eps``.
    ``steps`` is accepted for a uniform interface and must be 1."""
    from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method

    eps = _check_eps("fgsm", eps)
    if steps != 1:
        raise ValueError(f"fgsm takes exactly one step, got steps={steps}")
    return _run_batched("fgsm", lambda images, labels: fast_gradient_method(
        model_fn, tf.constant(images), eps, np.inf, clip_min=0.0, clip_max=1.0,
        y=_tensor_labels(labels)), x, y, batch_size, progress)


def bim(model_fn, x, eps, steps: int = 10, y=None, batch_size: int = 128,
        progress: bool = False) -> np.ndarray:
    """Basic Iterative Method / I-FGSM (Kurakin et al. 2017): ``steps`` L-inf sign steps from
    the clean image, projected onto the eps ball."""
    from cleverhans.tf2.attacks.basic_iterative_method import basic_iterative_method

    eps = _check_eps("bim", eps)
    return _run_batched("bim", lambda images, labels: basic_iterative_method(
        model_fn, tf.constant(images), eps, 2.5 * eps / steps, steps, np.inf, clip_min=0.0,
        clip_max=1.0, y=_tensor_labels(labels), sanity_checks=False), x, y, batch_size, progress)


def pgd(model_fn, x, eps, steps: int = 20, y=None, batch_size: int = 128,
        progress: bool = False) -> np.ndarray:
    """Projected Gradient Descent (Madry et al. 2018), L-inf, uniform random start."""
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    eps = _check_eps("pgd", eps)
    return _run_batched("pgd", lambda images, labels: projected_gradient_descent(
        model_fn, tf.constant(images), eps, 2.5 * eps / steps, steps, np.inf, clip_min=0.0,
        clip_max=1.0, y=_tensor_labels(labels), rand_init=True, rand_minmax=eps,
        sanity_checks=False), x, y, batch_size, progress)


def mim(model_fn, x, eps, steps: int = 10, y=None, batch_size: int = 128,
        progress: bool = False) -> np.ndarray:
    """Momentum Iterative Method / MI-FGSM (Dong et al. 2018), L-inf, decay 1.0."""
    from cleverhans.tf2.attacks.momentum_iterative_method import momentum_iterative_method

    eps = _check_eps("mim", eps)
    return _run_batched("mim", lambda images, labels: momentum_iterative_method(
        model_fn, tf.constant(images), eps, 2.5 * eps / steps, steps, np.inf, clip_min=0.0,
        clip_max=1.0, y=_tensor_labels(labels), sanity_checks=False), x, y, batch_size, progress)


def cw_l2(model_fn, x, eps=None, steps: int = 100, y=None, batch_size: int = 128,
          progress: bool = False, binary_search_steps: int = 3, learning_rate: float = 0.1,
          initial_const: float = 1.0, confidence: float = 0.0) -> np.ndarray:
    """Carlini-Wagner L2 (2017), untargeted, minimum-norm: ``eps`` is ignored; ``steps`` Adam
    iterations per binary-search step over the constant. Examples where no adversarial image
    was found come back unchanged. The Adam learning rate 0.1 (upstream 5e-3 for 1,000
    iterations) suits the short budgets of a CPU run: with 30 steps x 3 binary-search steps
    on 100 28x28 digits it fooled 96 % of them (0.05: 61 %), at a larger mean L2."""
    del eps  # a minimum-norm attack has no budget

    def attack_batch(images, labels):
        return cleverhans_compat.carlini_wagner_l2(
            model_fn, images, y=labels, targeted=False, batch_size=len(images),
            clip_min=0.0, clip_max=1.0, binary_search_steps=binary_search_steps,
            max_iterations=steps, learning_rate=learning_rate, initial_const=initial_const,
            confidence=confidence)

    return _run_batched("cw_l2", attack_batch, x, y, batch_size, progress)


def spsa(model_fn, x, eps, steps: int = 20, y=None, batch_size: int = 1,
         progress: bool = False, spsa_samples: int = 64, learning_rate: float | None = None,
         delta: float = 0.01) -> np.ndarray:
    """SPSA (Uesato et al. 2018), L-inf, gradient-free: ``steps`` Adam steps on a margin loss
    estimated from ``spsa_samples`` random +/-delta probes, from a uniform random start. Adam's
    first steps move each pixel by about ``learning_rate``, so its default is the iterative
    attacks' ``2.5 * eps / steps``. Each image gets the iterate with the lowest margin seen
    (not the last one). One image at a time (``batch_size`` is ignored); needs labels (the
    model's predictions when ``y`` is None)."""
    eps = _check_eps("spsa", eps)
    del batch_size
    if learning_rate is None:
        learning_rate = 2.5 * eps / steps

    def attack_one(image, label):
        if label is None:
            label = np.argmax(np.asarray(model_fn(tf.constant(image))), axis=-1)
        return cleverhans_compat.spsa(
            model_fn, tf.constant(image), tf.constant(label, tf.int64), eps, steps,
            clip_min=0.0, clip_max=1.0, learning_rate=learning_rate, delta=delta,
            spsa_samples=spsa_samples)

    return _run_batched("spsa", attack_one, x, y, 1, progress)


def _import_foolbox():
    # eagerpy 0.30 calls np.find_common_type (removed in NumPy 2) only when two dtypes meet;
    # we always pass float32 images and int64 labels, so no shim is installed.
    return optional.require("foolbox", "eval", "DeepFool and C&W (foolbox)")


def project_linf(clean, adversarial, eps: float) -> np.ndarray:
    """``adversarial`` projected onto the L-inf ball of radius ``eps`` around ``clean`` (both
    float32 ``[n, H, W, C]`` in [0, 1]), staying in [0, 1]: what foolbox's ``clipped`` output
    is for an L-inf minimum-norm attack."""
    clean = np.asarray(clean, np.float32)
    perturbation = np.clip(np.asarray(adversarial, np.float32) - clean, -eps, eps)
    return np.clip(clean + perturbation, 0.0, 1.0).astype(np.float32)


def deepfool(model_fn, x, eps, steps: int = 50, y=None, batch_size: int = 128,
             progress: bool = False, overshoot: float = 0.02,
             candidates: int | None = 10) -> np.ndarray:
    """DeepFool, L-inf (Moosavi-Dezfooli et al. 2016), from foolbox 3.3.4: ``steps`` linearised
    steps towards the nearest decision boundary among the ``candidates`` top classes, then
    projected onto the eps ball (foolbox's ``clipped`` output). ``eps=None`` returns the
    unprojected minimum-norm images: the search itself does not depend on eps, so
    ``project_linf(x, deepfool(..., eps=None), eps)`` equals ``deepfool(..., eps)`` and the
    evaluation runs it once for all eps values. Needs labels (the model's predictions when
    ``y`` is None)."""
    foolbox = _import_foolbox()
    eps = None if eps is None else _check_eps("deepfool", eps)
    model = foolbox.TensorFlowModel(model_fn, bounds=(0.0, 1.0))

    def attack_batch(images, labels):
        images = tf.constant(images)
        if labels is None:
            labels = np.argmax(np.asarray(model_fn(images)), axis=-1)
        num_classes = int(model_fn(images[:1]).shape[-1])
        attack = foolbox.attacks.LinfDeepFoolAttack(
            steps=steps, overshoot=overshoot,
            candidates=None if candidates is None else min(candidates, num_classes))
        _, clipped, _ = attack(model, images, tf.constant(labels, tf.int64), epsilons=eps)
        return clipped.numpy()

    return _run_batched("deepfool", attack_batch, x, y, batch_size, progress)


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One registered attack.

    Attributes:
      name: registry key.
      function: the attack function (see the module docstring for its face).
      norm: ``linf`` or ``l2``, the norm its budget or objective uses.
      bounded: True when ``eps`` bounds the perturbation; False for minimum-norm attacks, which
        the evaluation runs once with eps recorded as None.
      default_steps: iterations when the caller gives none.
      library: where it comes from (for the README and results).
      gradient_free: True when it only queries logits (SPSA).
      eps_independent: True when the search ignores eps and the result is only projected onto
        the eps ball afterwards (DeepFool): run it once with ``eps=None``, then
        ``project_linf`` for each eps.
    """

    name: str
    function: Callable
    norm: str
    bounded: bool
    default_steps: int
    library: str
    gradient_free: bool = False
    eps_independent: bool = False


ATTACKS = {
    "fgsm": AttackSpec("fgsm", fgsm, "linf", True, 1, "cleverhans 4.0.0"),
    "bim": AttackSpec("bim", bim, "linf", True, 10, "cleverhans 4.0.0"),
    "pgd": AttackSpec("pgd", pgd, "linf", True, 20, "cleverhans 4.0.0"),
    "mim": AttackSpec("mim", mim, "linf", True, 10, "cleverhans 4.0.0"),
    "cw_l2": AttackSpec("cw_l2", cw_l2, "l2", False, 100,
                        "cleverhans 4.0.0 + comdefend_tf Keras 3 compat"),
    "spsa": AttackSpec("spsa", spsa, "linf", True, 20,
                       "cleverhans 4.0.0 + comdefend_tf Keras 3 compat", gradient_free=True),
    "deepfool": AttackSpec("deepfool", deepfool, "linf", True, 50, "foolbox 3.3.4",
                           eps_independent=True),
}
ATTACK_NAMES = tuple(ATTACKS)


def get_attack(name: str) -> AttackSpec:
    """The registered attack ``name``. Raises ValueError naming the known attacks."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACK_NAMES)}")
    return ATTACKS[name]


def run_attack(name: str, model_fn, x, eps, y=None, steps: int | None = None,
               batch_size: int = 128, progress: bool = False, **options) -> np.ndarray:
    """Runs the registered attack ``name`` with its default steps unless ``steps`` is given;
    ``options`` go to the attack function (e.g. ``spsa_samples``)."""
    spec = get_attack(name)
    steps = spec.default_steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"{name}: steps must be >= 1, got {steps}")
    return spec.function(model_fn, x, eps, steps=steps, y=y, batch_size=batch_size,
                         progress=progress, **options)


def expectation_over_transformation(model_fn, samples: int):
    """A model_fn averaging ``model_fn``'s logits over ``samples`` calls (noise draws).

    ``model_fn`` must draw fresh randomness at each call (e.g. ``classifier(purifier(x))`` with
    inference noise). The returned callable maps images ``[B, H, W, C]`` to the mean logits
    ``[B, num_classes]``; its gradient is the mean of the ``samples`` per-draw gradients. With
    ``samples == 1`` ``model_fn`` itself is returned. The callable carries ``eot_samples``.
    """
    samples = int(samples)
    if samples < 1:
        raise ValueError(f"EOT needs at least 1 sample, got {samples}")
    if samples == 1:
        return model_fn

    def averaged_logits(images):
        return tf.add_n([model_fn(images) for _ in range(samples)]) / float(samples)

    averaged_logits.eot_samples = samples
    return averaged_logits
