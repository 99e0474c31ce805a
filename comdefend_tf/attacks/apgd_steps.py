"""APGD's per-step mathematics (Croce and Hein, ICML 2020, arXiv 2003.01690): the losses, the
margin, the (EOT) input gradient, the projected momentum step and the step-size schedule.
``comdefend_tf.attacks.apgd`` runs the attack loop over these.

All tensors are float32; images ``[B, H, W, C]`` in [0, 1], labels int ``[B]``, logits
``[B, classes]``. The update, from ``eta = 2 * eps`` (the first step plain, then
``alpha = MOMENTUM``)::

    z       = P(x_k + eta * s(grad))
    x_{k+1} = P(x_k + alpha * (z - x_k) + (1 - alpha) * (x_k - x_{k-1}))

(``s`` = sign for L-inf, grad / ||grad||_2 for L2, ``P`` = projection onto the ball and [0, 1]).
``eta`` halves at the checkpoints ``w_j = ceil(p_j * steps)``,
``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, per example, when
``halving_decision`` says so (its docstring gives both conditions; how they differ from
AutoAttack's code is in docs/internals/evaluation.md).
"""

from __future__ import annotations

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


def project(candidate, images, eps, norm: str):
    """``candidate`` projected onto the ``norm`` ball of radius ``eps`` around ``images``, then
    clipped to [0, 1] (clipping only shrinks each pixel's change, so it stays in the ball)."""
    if norm == "linf":
        candidate = tf.clip_by_value(candidate, images - eps, images + eps)
    else:
        delta = candidate - images
        norms = tf.sqrt(tf.reduce_sum(tf.square(delta), axis=[1, 2, 3], keepdims=True))
        delta = delta * tf.minimum(1.0, eps / (norms + _TINY))
        candidate = images + delta
    return tf.clip_by_value(candidate, 0.0, 1.0)


def step_direction(gradient, norm: str):
    """The steepest-ascent direction of unit ``norm``-size: ``sign(g)`` for L-inf,
    ``g / ||g||_2`` for L2 (per example)."""
    if norm == "linf":
        return tf.sign(gradient)
    norms = tf.sqrt(tf.reduce_sum(tf.square(gradient), axis=[1, 2, 3], keepdims=True))
    return gradient / (norms + _TINY)


def momentum_step(current, previous, gradient, eta, images, eps, norm: str, alpha):
    """One APGD update: ``z = P(x_k + eta * s(g))``, then
    ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))``. ``eta``: float32
    ``[B, 1, 1, 1]``; ``alpha``: 1 for the first step, ``MOMENTUM`` after."""
    z = project(current + eta * step_direction(gradient, norm), images, eps, norm)
    moved = current + alpha * (z - current) + (1.0 - alpha) * (current - previous)
    return project(moved, images, eps, norm)


def halving_decision(increases, span, halved_at_last_check, best_loss, best_loss_at_check,
                     rho: float = RHO):
    """Which examples halve their step size at a checkpoint (bool ``[B]``).

    Args:
      increases: ``[B]`` how many of the ``span`` steps since the previous checkpoint raised
        the loss above that of the iterate before (``f(x_{i+1}) > f(x_i)``).
      span: steps since the previous checkpoint (``w_j - w_{j-1}``).
      halved_at_last_check: bool ``[B]``, whether the step size was halved at the previous
        checkpoint (False at the first one).
      best_loss, best_loss_at_check: ``[B]`` the best loss now and at the previous checkpoint.

    Condition 1: ``increases < rho * span``. Condition 2: the step size is unchanged since the
    previous checkpoint and the best loss has not improved (``best_loss <= best_loss_at_check``).
    """
    increases = tf.cast(increases, tf.float32)
    few_increases = increases < rho * float(span)
    stalled = tf.logical_and(tf.logical_not(tf.cast(halved_at_last_check, tf.bool)),
                             tf.cast(best_loss, tf.float32)
                             <= tf.cast(best_loss_at_check, tf.float32))
    return tf.logical_or(few_increases, stalled)


def random_start(images, eps, norm: str, generator: tf.random.Generator):
    """A random point of the ball: uniform in the L-inf cube, or on the L2 sphere of radius eps
    (then clipped to [0, 1])."""
    if norm == "linf":
        delta = generator.uniform(tf.shape(images), -1.0, 1.0) * eps
    else:
        direction = generator.normal(tf.shape(images))
        norms = tf.sqrt(tf.reduce_sum(tf.square(direction), axis=[1, 2, 3], keepdims=True))
        delta = eps * direction / (norms + _TINY)
    return project(images + delta, images, eps, norm)
