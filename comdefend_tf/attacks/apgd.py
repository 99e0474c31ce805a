"""Auto-PGD (APGD; Croce and Hein, ICML 2020, arXiv 2003.01690) in TensorFlow, with EOT, and
APGD-T, AutoAttack's targeted version.

APGD is PGD without a step size to tune: it starts at ``eta = 2 * eps``, moves with momentum
(the first step plain, then ``alpha = 0.75``)::

    z       = P(x_k + eta * s(grad))
    x_{k+1} = P(x_k + alpha * (z - x_k) + (1 - alpha) * (x_k - x_{k-1}))

(``s`` = sign for L-inf, grad / ||grad||_2 for L2, ``P`` = projection onto the ball and [0, 1])
and halves ``eta`` at the checkpoints ``w_j = ceil(p_j * steps)``,

    p_0 = 0,  p_1 = 0.22,  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06),

per example, when (1) the loss went up (``f(x_{i+1}) > f(x_i)``) in fewer than ``rho = 0.75``
of the steps since the previous checkpoint, or (2) the step size was not halved at the previous
checkpoint and the best loss has not improved since then (at the first checkpoint ``eta`` has
never changed, so (2) applies there as in the paper's condition ``eta_{w_{j-1}} = eta_{w_j}``;
AutoAttack's code switches (2) off at the first checkpoint and uses ``<=`` in (1)). A halved
example restarts from its best point ``x_max`` with the best point's gradient; its momentum term
is then ``x_max - x_k`` (``x_k`` the iterate before the checkpoint), as in AutoAttack's code.
Losses: cross-entropy (``ce``) and the difference-of-logits ratio (``dlr``); untargeted and
targeted (targeted DLR as published: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``); L-inf
and L2 balls; random restarts, each from its own random start.

APGD-T (``apgd_targeted``): the targeted DLR loss run once per target class, the targets being
the 2nd, 3rd, ... ``(n_target_classes + 1)``-th most likely classes on the clean image (the top
``n_target_classes`` wrong classes), each target a full run of ``steps`` iterations on the
examples that earlier targets left unbroken; an example keeps its first success.

Randomized defenses (``eot_iter = K``): at every step the loss and its gradient are averaged
over K calls of the model, each with a fresh noise draw (AutoAttack's ``rand`` version). The
model is any callable ``images -> logits`` that ``tf.GradientTape`` can differentiate, e.g.
``lambda x: classifier(purifier(x))`` with ComDefend's straight-through binarizer (BPDA).

Every example keeps the point with the lowest classification margin ``z_y - max_{i != y} z_i``
(logits averaged over the K draws) seen anywhere in any restart: that is the returned
adversarial image. A negative margin means the (averaged) prediction is wrong.

Speed: one APGD iteration (the step, the K model calls with their gradients and the
bookkeeping) is one ``tf.function`` call. The compiled functions are cached per model callable
(weakly: they go when the model goes) and take eps, the momentum and the batch as tensors, so
further runs on the same callable with another eps, seed or batch of the same size reuse the
trace. Pass the same callable to every run that can share it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import weakref

import numpy as np
import tensorflow as tf

from comdefend_tf.attacks.constraints import clean_batch

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


def derive_seed(base_seed: int, *parts) -> int:
    """A seed for one attack run, from the protocol's seed and what identifies the run (e.g.
    ``derive_seed(0, "apgd", "ce", "bpda_identity", "linf", 0.1)``): stable across processes and
    Python versions (SHA-256 of the parts' ``repr``), in ``[0, 2**31)``. Distinct runs get
    distinct random starts, so a union over runs really has independent restarts."""
    text = "\x1f".join(repr(part) for part in (int(base_seed),) + parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> 1


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


@dataclasses.dataclass
class APGDResult:
    """What one APGD (or APGD-T) run found.

    Attributes:
      adversarial: float32 ``[N, H, W, C]`` in [0, 1], inside the eps-ball: per example the
        lowest-margin point of all steps and restarts (APGD-T: of the first target that broke
        it, or of all targets when none did).
      best_margin: float32 ``[N]``, the margin there (< 0: the averaged prediction is wrong).
      robust_curve: float ``[runs, steps + 1]``: fraction of examples not yet broken
        (best margin >= 0) after each step; one row per restart (APGD-T: per target and
        restart); flat at the end = converged for this budget.
      loss_curve: float ``[runs, steps + 1]``: mean loss of the current iterates.
      step_sizes: float ``[runs, steps]``: mean step size per iteration.
      zero_gradient_fraction: fraction of gradients that were exactly 0 among the (example,
        step) pairs where the example was not yet broken (margin >= 0 at that point).
      nonfinite_gradients: number of gradients with a NaN or Inf entry (should be 0).
      gradient_calls: number of model calls made for gradients.
      target_labels: APGD-T only: int64 ``[N]`` the target of the run that produced each
        returned point (-1 for plain APGD).
    """

    adversarial: np.ndarray
    best_margin: np.ndarray
    robust_curve: np.ndarray
    loss_curve: np.ndarray
    step_sizes: np.ndarray
    zero_gradient_fraction: float
    nonfinite_gradients: int
    gradient_calls: int
    target_labels: np.ndarray | None = None


class _Functions:
    """The (optionally compiled) pieces of one APGD configuration for one model: ``start``
    evaluates the random start, ``iterate`` runs one full iteration."""

    def __init__(self, model_ref, loss, norm, eot_iter, targeted, index_aware, compile):
        def call_model(points, index):
            model = model_ref()
            return model(points, index) if index_aware else model(points)

        def draw(points, labels, targets, index):
            with tf.GradientTape() as tape:
                tape.watch(points)
                logits = tf.cast(call_model(points, index), tf.float32)
                losses = loss_per_example(logits, labels, loss, targets if targeted else None)
            gradient = tape.gradient(losses, points)
            if gradient is None:
                raise ValueError("the model's output does not depend on its input under "
                                 "tf.GradientTape (a non-differentiable step with no "
                                 "straight-through gradient?)")
            return losses, gradient, logits

        def evaluate(points, labels, targets, index):
            loss_sum, gradient_sum, logits_sum = draw(points, labels, targets, index)
            # Compiled, the further draws are a graph loop (one copy of the model in the
            # graph, so tracing does not grow with K); each iteration draws fresh noise.
            extra = tf.range(eot_iter - 1) if compile else range(eot_iter - 1)
            for _ in extra:
                losses, gradient, logits = draw(points, labels, targets, index)
                loss_sum += losses
                gradient_sum += gradient
                logits_sum += logits
            scale = 1.0 / eot_iter
            value, gradient = loss_sum * scale, gradient_sum * scale
            point_margin = margin(logits_sum * scale, labels)
            finite = tf.reduce_all(tf.math.is_finite(gradient), axis=[1, 2, 3])
            nonzero = tf.reduce_any(tf.not_equal(gradient, 0.0), axis=[1, 2, 3])
            # A zero gradient only matters where the example is not yet broken: DLR is
            # constant once the true class ranks third, which is success, not masking.
            unbroken = point_margin >= 0
            stats = tf.stack([tf.reduce_sum(tf.cast(~finite, tf.int64)),
                              tf.reduce_sum(tf.cast(~nonzero & unbroken, tf.int64)),
                              tf.reduce_sum(tf.cast(unbroken, tf.int64))])
            gradient = tf.where(tf.reshape(finite, [-1, 1, 1, 1]), gradient, 0.0)
            return value, point_margin, gradient, stats

        def start(points, labels, targets, index):
            return evaluate(points, labels, targets, index)

        def iterate(state, images, labels, targets, index, eps, alpha):
            candidate = momentum_step(state["current"], state["previous"], state["gradient"],
                                      state["eta"], images, eps, norm, alpha)
            value, point_margin, gradient, stats = evaluate(candidate, labels, targets, index)
            improved_margin = tf.reshape(point_margin < state["best_margin"], [-1, 1, 1, 1])
            improved = value > state["best_loss"]
            improved4 = tf.reshape(improved, [-1, 1, 1, 1])
            best_margin = tf.minimum(point_margin, state["best_margin"])
            new_state = {
                "previous": state["current"], "current": candidate, "gradient": gradient,
                "value": value, "eta": state["eta"],
                "increases": state["increases"] + tf.cast(value > state["value"], tf.float32),
                "best_adv": tf.where(improved_margin, candidate, state["best_adv"]),
                "best_margin": best_margin,
                "best_point": tf.where(improved4, candidate, state["best_point"]),
                "best_gradient": tf.where(improved4, gradient, state["best_gradient"]),
                "best_loss": tf.where(improved, value, state["best_loss"]),
            }
            curve = tf.stack([tf.reduce_mean(tf.cast(best_margin >= 0, tf.float32)),
                              tf.reduce_mean(value), tf.reduce_mean(state["eta"])])
            return new_state, stats, curve

        if compile:
            self.start = tf.function(start, reduce_retracing=True)
            self.iterate = tf.function(iterate, reduce_retracing=True)
        else:
            self.start, self.iterate = start, iterate


# model -> {configuration: _Functions}; weak, so a model's traces go with the model.
_FUNCTION_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_functions(model, loss: str, norm: str, eot_iter: int, targeted: bool,
                       index_aware: bool, compile: bool = True) -> _Functions:
    """The cached APGD functions of ``model`` for one configuration (built on first use).
    Models that cannot be weakly referenced, and bound methods (a new object at each access),
    get fresh functions each time."""
    key = (loss, norm, int(eot_iter), bool(targeted), bool(index_aware), bool(compile))
    cacheable = not hasattr(model, "__self__")
    if cacheable:
        try:
            per_model = _FUNCTION_CACHE.setdefault(model, {})
        except TypeError:
            cacheable = False
    if not cacheable:
        return _Functions(lambda: model, *key)
    if key not in per_model:
        per_model[key] = _Functions(weakref.ref(model), *key)
    return per_model[key]


def _apgd_once(functions, images, labels, targets, index, eps, norm, steps, generator):
    """One APGD run from a random start on one chunk. Returns (best_adv, best_margin,
    robust [steps + 1], losses [steps + 1], etas [steps], stats [3]) as tensors."""
    batch = int(images.shape[0])
    marks = set(checkpoints(steps))
    eps_tensor = tf.constant(eps, tf.float32)
    start_points = random_start(images, eps_tensor, norm, generator)
    value, point_margin, gradient, stats = functions.start(start_points, labels, targets, index)
    state = {"current": start_points, "previous": start_points, "gradient": gradient,
             "value": value, "eta": tf.fill([batch, 1, 1, 1], 2.0 * eps),
             "increases": tf.zeros([batch], tf.float32), "best_adv": start_points,
             "best_margin": point_margin, "best_point": start_points,
             "best_gradient": gradient, "best_loss": value}
    curves = [tf.stack([tf.reduce_mean(tf.cast(point_margin >= 0, tf.float32)),
                        tf.reduce_mean(value), 0.0])]
    halved_last = tf.zeros([batch], tf.bool)
    best_loss_at_check, last_check = value, 0
    first, later = tf.constant(1.0), tf.constant(MOMENTUM)
    for step in range(steps):
        state, step_stats, curve = functions.iterate(state, images, labels, targets, index,
                                                     eps_tensor, first if step == 0 else later)
        stats += step_stats
        curves.append(curve)
        iteration = step + 1
        if iteration in marks and iteration < steps:
            halve = halving_decision(state["increases"], iteration - last_check, halved_last,
                                     state["best_loss"], best_loss_at_check)
            halve4 = tf.reshape(halve, [-1, 1, 1, 1])
            state["eta"] = tf.where(halve4, state["eta"] / 2.0, state["eta"])
            # Halved examples go back to their best point; "previous" stays x_k, so the next
            # momentum term is x_max - x_k.
            state["current"] = tf.where(halve4, state["best_point"], state["current"])
            state["gradient"] = tf.where(halve4, state["best_gradient"], state["gradient"])
            state["value"] = tf.where(halve, state["best_loss"], state["value"])
            state["increases"] = tf.zeros([batch], tf.float32)
            halved_last, best_loss_at_check, last_check = halve, state["best_loss"], iteration
    curves = tf.stack(curves).numpy()
    return (state["best_adv"], state["best_margin"], curves[:, 0], curves[:, 1],
            curves[1:, 2], stats)


def _check_inputs(images, labels, eps, norm, steps, restarts, eot_iter):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if steps < 1 or restarts < 1 or eot_iter < 1:
        raise ValueError(f"steps, restarts and eot_iter must be >= 1, got {steps}, {restarts}, "
                         f"{eot_iter}")
    images, labels = clean_batch(images, labels)
    return images, labels


class _Accumulator:
    """Results of several APGD runs over subsets of one set of N examples."""

    def __init__(self, images, steps):
        self.count = len(images)
        self.adversarial = images.copy()
        self.best_margin = np.full(self.count, np.inf, np.float32)
        self.targets = np.full(self.count, -1, np.int64)
        self.steps = steps
        self.robust, self.losses, self.etas = [], [], []
        self.stats = np.zeros(3, np.int64)
        self.calls = 0

    def new_run(self):
        self.robust.append(np.zeros(self.steps + 1))
        self.losses.append(np.zeros(self.steps + 1))
        self.etas.append(np.zeros(self.steps))

    def result(self) -> APGDResult:
        total = max(int(self.stats[2]), 1)
        return APGDResult(
            adversarial=self.adversarial, best_margin=self.best_margin,
            robust_curve=np.array(self.robust), loss_curve=np.array(self.losses),
            step_sizes=np.array(self.etas),
            zero_gradient_fraction=float(self.stats[1]) / total,
            nonfinite_gradients=int(self.stats[0]), gradient_calls=self.calls,
            target_labels=self.targets)


def _run(accumulator, functions, images, labels, eps, norm, steps, restarts, eot_iter,
         targets, positions, generator, batch_size, progress, keep_first_success=False):
    """APGD with restarts on ``images[positions]`` (positions into the full set, which the
    index-aware model sees), updating ``accumulator``.

    ``keep_first_success``: an example already broken (best margin < 0) keeps its point even if
    this run finds a lower margin (APGD-T keeps the first target that succeeds)."""
    batch_size = batch_size or max(len(positions), 1)
    first_row = len(accumulator.robust)
    for _ in range(restarts):
        accumulator.new_run()
    for start in range(0, len(positions), batch_size):
        chunk = positions[start:start + batch_size]
        for restart in range(restarts):
            todo = chunk if restart == 0 else chunk[accumulator.best_margin[chunk] >= 0]
            if todo.size == 0:
                continue
            if keep_first_success:
                todo = todo[accumulator.best_margin[todo] >= 0]
                if todo.size == 0:
                    continue
            chunk_targets = labels[todo] if targets is None else targets[todo]
            found, found_margin, robust, losses, etas, stats = _apgd_once(
                functions, tf.constant(images[todo]), tf.constant(labels[todo]),
                tf.constant(chunk_targets), tf.constant(todo, tf.int64), float(eps), norm,
                steps, generator)
            found_margin = found_margin.numpy()
            better = found_margin < accumulator.best_margin[todo]
            accumulator.adversarial[todo[better]] = found.numpy()[better]
            accumulator.best_margin[todo[better]] = found_margin[better]
            if targets is not None:
                accumulator.targets[todo[better]] = targets[todo[better]]
            accumulator.stats += stats.numpy()
            accumulator.calls += eot_iter * (steps + 1)
            # Curves as fractions of the whole set: examples not in this run count as broken.
            weight = todo.size / accumulator.count
            row = first_row + restart
            accumulator.robust[row] += robust * weight
            accumulator.losses[row] += losses * weight
            accumulator.etas[row] += etas * weight
        if progress is not None:
            progress(len(chunk))


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
      target_labels: optional int ``[N]`` target classes (targeted loss; none equal to the
        true label). Success is still any misclassification.
      seed: seed of the random starts: every restart and chunk draws its own start from one
        generator seeded here; give each run its own seed (see ``derive_seed``).
      batch_size: examples per chunk (default all).
      progress: optional callable ``progress(n)`` told after each chunk of ``n`` examples.
      compile: run each iteration as one ``tf.function`` (faster; False runs eagerly).
      index_aware: call ``model(images, example_index)`` with int64 ``[B]`` positions of the
        examples in ``images`` (for a model whose randomness is fixed per example, such as an
        attacker who knows each example's noise draw).

    Returns:
      An ``APGDResult``.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    images, labels = _check_inputs(images, labels, eps, norm, steps, restarts, eot_iter)
    if target_labels is not None:
        target_labels = np.asarray(target_labels, np.int64)
        if target_labels.shape != labels.shape or np.any(target_labels == labels):
            raise ValueError("target_labels must be [N] and differ from the true labels")
    functions = compiled_functions(model, loss, norm, eot_iter, target_labels is not None,
                                   index_aware, compile)
    accumulator = _Accumulator(images, steps)
    _run(accumulator, functions, images, labels, eps, norm, steps, restarts, eot_iter,
         target_labels, np.arange(len(images)), tf.random.Generator.from_seed(seed),
         batch_size, progress)
    return accumulator.result()


def clean_logits(model, images, eot_iter: int = 1, batch_size: int | None = None,
                 index_aware: bool = False) -> np.ndarray:
    """The model's logits on ``images`` averaged over ``eot_iter`` draws, float32
    ``[N, classes]`` (index-aware models get each example's position)."""
    images = np.asarray(images, np.float32)
    batch_size = batch_size or max(len(images), 1)
    parts = []
    for start in range(0, len(images), batch_size):
        batch = tf.constant(images[start:start + batch_size])
        index = tf.range(start, start + len(batch), dtype=tf.int64)
        total = 0.0
        for _ in range(eot_iter):
            total += tf.cast(model(batch, index) if index_aware else model(batch), tf.float32)
        parts.append((total / eot_iter).numpy())
    return np.concatenate(parts)


def apgd_targeted(model, images, labels, eps: float, norm: str = "linf", steps: int = 100,
                  eot_iter: int = 1, n_target_classes: int = 9, seed: int = 0,
                  restarts: int = 1, batch_size: int | None = None, progress=None,
                  compile: bool = True, index_aware: bool = False) -> APGDResult:
    """APGD-T (AutoAttack's targeted APGD): the targeted DLR loss, one run of ``steps``
    iterations (times ``restarts``) per target class.

    The targets of an example are its ``n_target_classes`` most likely wrong classes on the
    clean image (logits averaged over ``eot_iter`` draws), tried in order of likelihood; each
    target runs only on the examples no earlier target broke, and an example keeps the point of
    its first success (examples no target breaks keep their lowest-margin point overall).
    ``n_target_classes`` is capped at ``classes - 1``; the targeted DLR loss needs at least 4
    classes. Other arguments as ``apgd``; ``progress`` is told each chunk of each target run.
    One random generator seeded with ``seed`` gives every target and restart its own start.

    Returns:
      An ``APGDResult`` with one curve row per (target, restart) and ``target_labels`` the
      target whose run produced each returned point.
    """
    images, labels = _check_inputs(images, labels, eps, norm, steps, restarts, eot_iter)
    if n_target_classes < 1:
        raise ValueError(f"n_target_classes must be >= 1, got {n_target_classes}")
    logits = clean_logits(model, images, eot_iter, batch_size, index_aware)
    num_classes = logits.shape[-1]
    if num_classes < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got {num_classes}")
    functions = compiled_functions(model, "dlr", norm, eot_iter, True, index_aware, compile)
    accumulator = _Accumulator(images, steps)
    generator = tf.random.Generator.from_seed(seed)
    for rank in range(1, min(n_target_classes, num_classes - 1) + 1):
        targets = top_wrong_classes(logits, labels, rank)
        positions = np.flatnonzero(accumulator.best_margin >= 0)
        _run(accumulator, functions, images, labels, eps, norm, steps, restarts, eot_iter,
             targets, positions, generator, batch_size, progress, keep_first_success=True)
    return accumulator.result()


def top_wrong_classes(logits, labels, rank: int = 1) -> np.ndarray:
    """The ``rank``-th most likely wrong class per example (1 = the runner-up), int64 ``[N]``:
    the targets of APGD-T's ``rank``-th run."""
    logits = np.array(logits, np.float64, copy=True)
    logits[np.arange(len(labels)), labels] = -np.inf
    order = np.argsort(-logits, axis=1, kind="stable")
    return order[:, rank - 1].astype(np.int64)
