"""Auto-PGD (APGD; Croce and Hein, ICML 2020, arXiv 2003.01690) in TensorFlow, with EOT.

APGD is PGD without a step size to tune: it starts at ``2 * eps``, moves with momentum
(``alpha = 0.75``) and halves the step at checkpoints ``w_j = ceil(p_j * steps)`` with

    p_0 = 0,  p_1 = 0.22,  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)

whenever, since the previous checkpoint, (1) the loss went up in fewer than ``rho = 0.75`` of
the steps, or (2) neither the step size nor the best loss changed. After a halving the iterate
restarts from the best point found so far. Losses: cross-entropy (``ce``) and the
difference-of-logits ratio (``dlr``); untargeted and targeted (targeted DLR as published:
``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``); L-inf and L2 balls; random restarts.

Randomized defenses (``eot_iter = K``): at every step the loss and its gradient are averaged
over K calls of the model, each with a fresh noise draw (AutoAttack's ``rand`` version). The
model is any callable ``images -> logits`` that ``tf.GradientTape`` can differentiate, e.g.
``lambda x: classifier(purifier(x))`` with ComDefend's straight-through binarizer (BPDA).

Every example keeps the point with the lowest classification margin ``z_y - max_{i != y} z_i``
(logits averaged over the K draws) seen anywhere in any restart: that is the returned
adversarial image. A negative margin means the (averaged) prediction is wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import tensorflow as tf

LOSSES = ("ce", "dlr")
NORMS = ("linf", "l2")
MOMENTUM = 0.75
RHO = 0.75
_TINY = 1e-12


def checkpoints(steps: int) -> list[int]:
    """The iterations ``w_j = ceil(p_j * steps)`` (excluding 0, at most ``steps``) at which
    APGD may halve its step size, from the published ``p_j`` sequence."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    fractions = [0.0, 0.22]
    while fractions[-1] < 1.0:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    # Rounded first: 0.41 * 100 is 41.000000000000007 in floating point.
    points = sorted({math.ceil(round(p * steps, 6)) for p in fractions[1:] if p <= 1.0 + 1e-9})
    return [w for w in points if 0 < w <= steps]


def margin(logits, labels):
    """``z_y - max_{i != y} z_i`` per example, float32 ``[batch]``; negative = misclassified."""
    logits = tf.cast(logits, tf.float32)
    num_classes = logits.shape[-1]
    true_mask = tf.one_hot(labels, num_classes) > 0.5
    true_logit = tf.reduce_sum(tf.where(true_mask, logits, 0.0), axis=-1)
    other_max = tf.reduce_max(tf.where(true_mask, -np.inf, logits), axis=-1)
    return true_logit - other_max


def loss_per_example(logits, labels, loss: str, target_labels=None):
    """The quantity APGD maximises, float32 ``[batch]``.

    ``ce``: cross-entropy of the true label (untargeted) or minus that of the target label;
    ``dlr``: ``-(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)`` untargeted, or
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` targeted (``z_pi`` sorted decreasing).
    """
    logits = tf.cast(logits, tf.float32)
    if loss == "ce":
        if target_labels is None:
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        return -tf.nn.sparse_softmax_cross_entropy_with_logits(target_labels, logits)
    if loss != "dlr":
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    num_classes = logits.shape[-1]
    needed = 3 if target_labels is None else 4
    if num_classes < needed:
        raise ValueError(f"the {'targeted ' if target_labels is not None else ''}DLR loss needs "
                         f"at least {needed} classes, got {num_classes}")
    ordered = tf.sort(logits, axis=-1, direction="DESCENDING")
    true_logit = tf.gather(logits, labels, axis=-1, batch_dims=1)
    if target_labels is None:
        return -margin(logits, labels) / (ordered[:, 0] - ordered[:, 2] + _TINY)
    target_logit = tf.gather(logits, target_labels, axis=-1, batch_dims=1)
    scale = ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + _TINY
    return -(true_logit - target_logit) / scale


def single_draw_gradient(model, images, labels, loss: str, target_labels=None):
    """One model call: ``(loss [batch], logits [batch, classes], d loss / d images)``."""
    with tf.GradientTape() as tape:
        tape.watch(images)
        logits = tf.cast(model(images), tf.float32)
        losses = loss_per_example(logits, labels, loss, target_labels)
    gradient = tape.gradient(losses, images)
    if gradient is None:
        raise ValueError("the model's output does not depend on its input under "
                         "tf.GradientTape (a non-differentiable step with no "
                         "straight-through gradient?)")
    return losses, logits, gradient


def compile_gradient():
    """A ``tf.function`` version of ``single_draw_gradient`` (one per attack run, so traces of
    different models never mix). Random layers draw afresh at every call inside it."""
    return tf.function(single_draw_gradient, reduce_retracing=True)


def eot_gradient(model, images, labels, loss: str, eot_iter: int = 1, target_labels=None,
                 compiled=None):
    """Loss, margin and input gradient averaged over ``eot_iter`` calls of ``model``.

    Each call draws the model's randomness afresh (for a deterministic model the K calls agree).
    Returns ``(loss [batch], margin [batch], mean_logits [batch, classes], gradient
    [batch, H, W, C])``, all float32; the margin is that of the draw-averaged logits.
    ``compiled``: optional result of ``compile_gradient()`` used for each draw.
    """
    if eot_iter < 1:
        raise ValueError(f"eot_iter must be >= 1, got {eot_iter}")
    images = tf.convert_to_tensor(images, tf.float32)
    draw = single_draw_gradient if compiled is None else compiled
    loss_sum = tf.zeros(tf.shape(images)[:1], tf.float32)
    gradient_sum = tf.zeros_like(images)
    logits_sum = None
    for _ in range(eot_iter):
        losses, logits, gradient = draw(model, images, labels, loss, target_labels)
        loss_sum += losses
        gradient_sum += gradient
        logits_sum = logits if logits_sum is None else logits_sum + logits
    scale = 1.0 / eot_iter
    mean_logits = logits_sum * scale
    return loss_sum * scale, margin(mean_logits, labels), mean_logits, gradient_sum * scale


def _project(candidate, images, eps: float, norm: str):
    if norm == "linf":
        candidate = tf.clip_by_value(candidate, images - eps, images + eps)
    else:
        delta = candidate - images
        norms = tf.sqrt(tf.reduce_sum(tf.square(delta), axis=[1, 2, 3], keepdims=True))
        delta = delta * tf.minimum(1.0, eps / (norms + _TINY))
        candidate = images + delta
    return tf.clip_by_value(candidate, 0.0, 1.0)


def _step_direction(gradient, norm: str):
    if norm == "linf":
        return tf.sign(gradient)
    norms = tf.sqrt(tf.reduce_sum(tf.square(gradient), axis=[1, 2, 3], keepdims=True))
    return gradient / (norms + _TINY)


def _random_start(images, eps: float, norm: str, generator: tf.random.Generator):
    if norm == "linf":
        delta = generator.uniform(tf.shape(images), -eps, eps)
    else:
        direction = generator.normal(tf.shape(images))
        norms = tf.sqrt(tf.reduce_sum(tf.square(direction), axis=[1, 2, 3], keepdims=True))
        delta = eps * direction / (norms + _TINY)
    return _project(images + delta, images, eps, norm)


@dataclasses.dataclass
class APGDResult:
    """What one APGD run found.

    Attributes:
      adversarial: float32 ``[N, H, W, C]`` in [0, 1], inside the eps-ball: per example the
        lowest-margin point of all steps and restarts.
      best_margin: float32 ``[N]``, the margin there (< 0: the averaged prediction is wrong).
      robust_curve: float ``[restarts, steps + 1]``: fraction of examples not yet broken
        (best margin >= 0) after each step; flat at the end = converged for this budget.
      loss_curve: float ``[restarts, steps + 1]``: mean loss of the current iterates.
      step_sizes: float ``[restarts, steps]``: mean step size per iteration.
      zero_gradient_fraction: fraction of gradients that were exactly 0 among the (example,
        step) pairs where the example was not yet broken (margin >= 0 at that point).
      nonfinite_gradients: number of gradients with a NaN or Inf entry (should be 0).
      gradient_calls: number of model calls made for gradients.
    """

    adversarial: np.ndarray
    best_margin: np.ndarray
    robust_curve: np.ndarray
    loss_curve: np.ndarray
    step_sizes: np.ndarray
    zero_gradient_fraction: float
    nonfinite_gradients: int
    gradient_calls: int


def _apgd_once(model, images, labels, eps, norm, steps, loss, eot_iter, target_labels,
               generator, stats, compiled):
    """One APGD run from a random start. Returns (best_adv, best_margin, robust, losses,
    etas) with per-step curves as lists."""
    batch = int(images.shape[0])
    marks = set(checkpoints(steps))

    def evaluate(points):
        value, point_margin, _, gradient = eot_gradient(model, points, labels, loss, eot_iter,
                                                        target_labels, compiled)
        finite = tf.reduce_all(tf.math.is_finite(gradient), axis=[1, 2, 3])
        nonzero = tf.reduce_any(tf.not_equal(gradient, 0.0), axis=[1, 2, 3])
        stats["nonfinite"] += int(tf.reduce_sum(tf.cast(~finite, tf.int32)))
        # A zero gradient only matters where the example is not yet broken: DLR is constant
        # (= 1) once the true class ranks third, which is success, not masking.
        unbroken = point_margin >= 0
        stats["zero"] += int(tf.reduce_sum(tf.cast(~nonzero & unbroken, tf.int32)))
        stats["total"] += int(tf.reduce_sum(tf.cast(unbroken, tf.int32)))
        stats["calls"] += eot_iter
        gradient = tf.where(tf.reshape(finite, [-1, 1, 1, 1]), gradient, 0.0)
        return value, point_margin, gradient

    eta = tf.fill([batch, 1, 1, 1], 2.0 * eps)
    current = _random_start(images, eps, norm, generator)
    value, point_margin, gradient = evaluate(current)
    best_adv, best_margin = current, point_margin
    best_point, best_loss, best_gradient = current, value, gradient
    previous = current
    increases = tf.zeros([batch], tf.float32)
    last_check, eta_at_check, best_loss_at_check = 0, eta, best_loss
    robust_curve = [float(tf.reduce_mean(tf.cast(best_margin >= 0, tf.float32)))]
    loss_curve = [float(tf.reduce_mean(value))]
    eta_curve = []
    for step in range(steps):
        step_alpha = 1.0 if step == 0 else MOMENTUM
        z = _project(current + eta * _step_direction(gradient, norm), images, eps, norm)
        candidate = _project(current + step_alpha * (z - current)
                             + (1.0 - step_alpha) * (current - previous), images, eps, norm)
        previous, current = current, candidate
        new_value, point_margin, gradient = evaluate(current)
        increases += tf.cast(new_value > value, tf.float32)
        value = new_value
        improved_margin = point_margin < best_margin
        best_adv = tf.where(tf.reshape(improved_margin, [-1, 1, 1, 1]), current, best_adv)
        best_margin = tf.minimum(point_margin, best_margin)
        improved = value > best_loss
        improved4 = tf.reshape(improved, [-1, 1, 1, 1])
        best_point = tf.where(improved4, current, best_point)
        best_gradient = tf.where(improved4, gradient, best_gradient)
        best_loss = tf.where(improved, value, best_loss)
        eta_curve.append(float(tf.reduce_mean(eta)))
        robust_curve.append(float(tf.reduce_mean(tf.cast(best_margin >= 0, tf.float32))))
        loss_curve.append(float(tf.reduce_mean(value)))
        iteration = step + 1
        if iteration in marks and iteration < steps:
            span = iteration - last_check
            few_increases = increases < RHO * span
            stalled = tf.logical_and(tf.reduce_all(tf.equal(eta, eta_at_check), axis=[1, 2, 3]),
                                     tf.equal(best_loss, best_loss_at_check))
            halve = tf.logical_or(few_increases, stalled)
            halve4 = tf.reshape(halve, [-1, 1, 1, 1])
            eta_at_check, best_loss_at_check = eta, best_loss
            eta = tf.where(halve4, eta / 2.0, eta)
            # Restart halved examples from their best point, without momentum.
            current = tf.where(halve4, best_point, current)
            previous = tf.where(halve4, best_point, previous)
            gradient = tf.where(halve4, best_gradient, gradient)
            value = tf.where(halve, best_loss, value)
            increases = tf.zeros([batch], tf.float32)
            last_check = iteration
    return best_adv, best_margin, robust_curve, loss_curve, eta_curve


def apgd(model, images, labels, eps: float, norm: str = "linf", steps: int = 100,
         loss: str = "ce", restarts: int = 1, eot_iter: int = 1, target_labels=None,
         seed: int = 0, batch_size: int | None = None, progress=None,
         compile: bool = True, index_aware: bool = False) -> APGDResult:
    """Runs APGD on ``images`` against ``model``.

    Args:
      model: callable, float32 ``[B, H, W, C]`` in [0, 1] -> logits ``[B, classes]``,
        differentiable under ``tf.GradientTape``; may be random (then use ``eot_iter > 1``).
      images: float32 ``[N, H, W, C]`` in [0, 1]. labels: int ``[N]`` true classes.
      eps: radius of the ball (L-inf: max pixel change; L2: Euclidean norm), > 0.
      norm: ``linf`` or ``l2``. steps: iterations per restart. loss: ``ce`` or ``dlr``.
      restarts: random restarts; restarts after the first run only on examples not yet broken.
      eot_iter: model calls averaged per gradient (EOT over the model's randomness).
      target_labels: optional int ``[N]`` target classes (targeted attack; none equal to the
        true label).
      seed: seed of the random starts. batch_size: examples per chunk (default all).
      progress: optional callable ``progress(n)`` told after each chunk of ``n`` examples.
      compile: run each model call inside a ``tf.function`` (faster; False runs eagerly).
      index_aware: call ``model(images, example_index)`` with int64 ``[B]`` positions of the
        examples in ``images`` (for a model whose randomness is fixed per example, such as an
        attacker who knows each example's noise draw).

    Returns:
      An ``APGDResult``.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if steps < 1 or restarts < 1 or eot_iter < 1:
        raise ValueError(f"steps, restarts and eot_iter must be >= 1, got {steps}, {restarts}, "
                         f"{eot_iter}")
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int64)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"expected images [N, H, W, C] and labels [N], got {images.shape} and "
                         f"{labels.shape}")
    if images.min() < 0.0 or images.max() > 1.0:
        raise ValueError("images must lie in [0, 1]")
    if target_labels is not None:
        target_labels = np.asarray(target_labels, np.int64)
        if target_labels.shape != labels.shape or np.any(target_labels == labels):
            raise ValueError("target_labels must be [N] and differ from the true labels")
    batch_size = batch_size or len(images)
    generator = tf.random.Generator.from_seed(seed)
    stats = {"nonfinite": 0, "zero": 0, "total": 0, "calls": 0}
    compiled = compile_gradient() if compile else None
    adversarial = images.copy()
    best_margin = np.full(len(images), np.inf, np.float32)
    robust_curves = np.zeros((restarts, steps + 1))
    loss_curves = np.zeros((restarts, steps + 1))
    eta_curves = np.zeros((restarts, steps))
    for start in range(0, len(images), batch_size):
        chunk = slice(start, start + batch_size)
        chunk_size = len(images[chunk])
        for restart in range(restarts):
            todo = np.arange(chunk_size) if restart == 0 else np.flatnonzero(
                best_margin[chunk] >= 0)
            if todo.size == 0:
                robust_curves[restart] += 0.0
                continue
            index = start + todo
            targets = None if target_labels is None else tf.constant(target_labels[index])
            call = model
            if index_aware:
                call = functools.partial(_call_with_index, model, tf.constant(index))
            found, found_margin, robust, losses, etas = _apgd_once(
                call, tf.constant(images[index]), tf.constant(labels[index]), float(eps), norm,
                steps, loss, eot_iter, targets, generator, stats, compiled)
            found_margin = found_margin.numpy()
            better = found_margin < best_margin[index]
            adversarial[index[better]] = found.numpy()[better]
            best_margin[index[better]] = found_margin[better]
            # Curves as fractions of the whole chunk (not-yet-run examples count as broken).
            weight = todo.size / len(images)
            robust_curves[restart] += np.asarray(robust) * weight
            loss_curves[restart] += np.asarray(losses) * todo.size / len(images)
            eta_curves[restart] += np.asarray(etas) * todo.size / len(images)
        if progress is not None:
            progress(chunk_size)
    total = max(stats["total"], 1)
    return APGDResult(adversarial=adversarial, best_margin=best_margin,
                      robust_curve=robust_curves, loss_curve=loss_curves, step_sizes=eta_curves,
                      zero_gradient_fraction=stats["zero"] / total,
                      nonfinite_gradients=stats["nonfinite"], gradient_calls=stats["calls"])


def _call_with_index(model, index, images):
    return model(images, index)


def top_wrong_classes(logits, labels, rank: int = 1) -> np.ndarray:
    """The ``rank``-th most likely wrong class per example (1 = the runner-up), int64 ``[N]``:
    the targets APGD-T uses, one per restart."""
    logits = np.array(logits, np.float64, copy=True)
    logits[np.arange(len(labels)), labels] = -np.inf
    order = np.argsort(-logits, axis=1)
    return order[:, rank - 1].astype(np.int64)
