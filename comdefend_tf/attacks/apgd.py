"""Auto-PGD (APGD; Croce and Hein, ICML 2020, arXiv 2003.01690) with EOT, and APGD-T,
AutoAttack's targeted version: the attack loop (restarts, chunks, targets, best points).
The per-step mathematics (losses, projected momentum step, step-size schedule) is
``comdefend_tf.attacks.apgd_steps``.

``apgd(model, images, labels, eps, ...)``: ``model`` is any callable, float32 ``[B, H, W, C]``
in [0, 1] -> logits ``[B, classes]``, that ``tf.GradientTape`` can differentiate (e.g.
``lambda x: classifier(purifier(x))`` with ComDefend's straight-through binarizer). Losses
``ce`` and ``dlr``, untargeted or targeted; L-inf and L2 balls; random restarts, each from its
own random start, after the first only on examples not yet broken. Returns an ``APGDResult``:
per example the point with the lowest margin ``z_y - max_{i != y} z_i`` (logits averaged over
the K draws) seen in any step of any restart, inside the ball and [0, 1].

``apgd_targeted``: the targeted DLR loss once per target class, the targets being the top
``n_target_classes`` wrong classes on the clean image, each target run on the examples earlier
targets left unbroken; an example keeps its first success.

Randomized models (``eot_iter = K``): every step averages loss and gradient over K calls, each
with a fresh noise draw (AutoAttack's ``rand`` version). No success is thrown away: every
iterate that at least one draw misclassified is a *candidate*, and each example keeps the one
misclassified in the most draws (``candidates``, ``candidate_failures``) beside its
lowest-margin point; callers verify both with many fresh draws. An example counts as broken
(``broken``: later restarts and targets skip it) only when one iterate was misclassified in
all K draws of its step, not when the mean margin is negative.

``judge``: the deployed forward pass when ``model`` is a surrogate whose own forward pass is
not (``soft_path``): margins, candidates and the returned points are decided on the judge's
logits, the gradient on the surrogate's.

One iteration is one ``tf.function`` call. The compiled functions are cached weakly per model
callable and take eps, the momentum and the batch as tensors: pass the same callable to every
run that can share a trace.
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref

import numpy as np
import tensorflow as tf

from comdefend_tf.attacks.apgd_steps import (LOSSES, MOMENTUM, NORMS, checkpoints,
                                             halving_decision, margin, momentum_step,
                                             random_start, single_draw_gradient)
from comdefend_tf.attacks.constraints import clean_batch


def derive_seed(base_seed: int, *parts) -> int:
    """A seed for one attack run, from the protocol's seed and what identifies the run (e.g.
    ``derive_seed(0, "apgd", "ce", "bpda_identity", "linf", 0.1)``): stable across processes and
    Python versions (SHA-256 of the parts' ``repr``), in ``[0, 2**31)``. Distinct runs get
    distinct random starts, so a union over runs really has independent restarts."""
    text = "\x1f".join(repr(part) for part in (int(base_seed),) + parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> 1


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
      candidates: float32 ``[N, H, W, C]``: per example the iterate misclassified in the most
        of its step's draws (ties: the lowest margin); the clean image where none was.
      candidate_failures: int ``[N]``: in how many of the ``eot_iter`` draws it was
        misclassified (0: no candidate).
      broken: bool ``[N]``: a candidate was misclassified in every draw of its step.
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
    candidates: np.ndarray | None = None
    candidate_failures: np.ndarray | None = None
    broken: np.ndarray | None = None


def keep_candidate(state, point, failures, point_margin):
    """The state's candidate entries after seeing ``point``: it replaces an example's candidate
    when more of its draws were wrong, or as many (at least one) with a lower margin."""
    held, held_margin = state["candidate_failures"], state["candidate_margin"]
    better = (failures > held) | ((failures == held) & (failures > 0)
                                  & (point_margin < held_margin))
    return {"candidate": tf.where(tf.reshape(better, [-1, 1, 1, 1]), point,
                                  state["candidate"]),
            "candidate_failures": tf.where(better, failures, held),
            "candidate_margin": tf.where(better, point_margin, held_margin)}


class _Functions:
    """The (optionally compiled) pieces of one APGD configuration for one model: ``start``
    evaluates the random start, ``iterate`` runs one full iteration."""

    def __init__(self, model_ref, loss, norm, eot_iter, targeted, index_aware, compile,
                 judge=None, draws_per_call=1):
        def call_model(points, index, model=None):
            model = model_ref() if model is None else model
            return model(points, index) if index_aware else model(points)

        def draw(points, labels, targets, index):
            losses, logits, gradient = single_draw_gradient(
                lambda batch: call_model(batch, index), points, labels, loss,
                targets if targeted else None)
            if judge is not None:  # the deployed forward pass decides, not the surrogate's
                logits = tf.cast(call_model(points, index, judge), tf.float32)
            wrong = tf.cast(tf.not_equal(tf.argmax(logits, -1, output_type=labels.dtype),
                                         labels), tf.int32)
            return losses, gradient, logits, wrong

        def draws(points, labels, targets, index, count):
            """Sums over ``count`` draws made in one model call on ``count`` stacked copies
            of the batch (EOT as a batch dimension; each copy gets its own noise)."""
            if count == 1:
                return draw(points, labels, targets, index)
            batch = tf.shape(points)[0]
            tile = lambda values: tf.tile(values, [count] + [1] * (len(values.shape) - 1))
            parts = draw(tile(points), tile(labels), tile(targets), tile(index))
            return tuple(tf.reduce_sum(tf.reshape(part, tf.concat(
                [[count, batch], tf.shape(part)[1:]], 0)), axis=0) for part in parts)

        def evaluate(points, labels, targets, index):
            group = min(draws_per_call, eot_iter)
            full, rest = divmod(eot_iter, group)
            loss_sum, gradient_sum, logits_sum, failures = draws(points, labels, targets,
                                                                 index, group)
            # Compiled, the further groups are a graph loop (one copy of the model in the
            # graph, so tracing does not grow with K); each iteration draws fresh noise.
            extra = tf.range(full - 1) if compile else range(full - 1)
            for _ in extra:
                losses, gradient, logits, wrong = draws(points, labels, targets, index, group)
                loss_sum += losses
                gradient_sum += gradient
                logits_sum += logits
                failures += wrong
            if rest:
                losses, gradient, logits, wrong = draws(points, labels, targets, index, rest)
                loss_sum += losses
                gradient_sum += gradient
                logits_sum += logits
                failures += wrong
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
            return value, point_margin, gradient, stats, failures

        def start(points, labels, targets, index):
            return evaluate(points, labels, targets, index)

        def iterate(state, images, labels, targets, index, eps, alpha):
            candidate = momentum_step(state["current"], state["previous"], state["gradient"],
                                      state["eta"], images, eps, norm, alpha)
            value, point_margin, gradient, stats, failures = evaluate(candidate, labels,
                                                                      targets, index)
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
            new_state.update(keep_candidate(state, candidate, failures, point_margin))
            curve = tf.stack([tf.reduce_mean(tf.cast(best_margin >= 0, tf.float32)),
                              tf.reduce_mean(value), tf.reduce_mean(state["eta"])])
            return new_state, stats, curve

        if compile:
            self.start = tf.function(start, reduce_retracing=True, jit_compile=JIT_COMPILE)
            self.iterate = tf.function(iterate, reduce_retracing=True,
                                       jit_compile=JIT_COMPILE)
        else:
            self.start, self.iterate = start, iterate


# XLA for the compiled iteration (None: TensorFlow's default, no XLA). On this CPU XLA cost 2x
# to 4x more CPU per step than the plain graph (benchmarks/attack_cost.py,
# docs/internals/evaluation.md), so it stays off; a GPU user may measure it there.
JIT_COMPILE = None

# model -> {configuration: _Functions}; weak, so a model's traces go with the model.
_FUNCTION_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_functions(model, loss: str, norm: str, eot_iter: int, targeted: bool,
                       index_aware: bool, compile: bool = True, judge=None,
                       draws_per_call: int = 1) -> _Functions:
    """The cached APGD functions of ``model`` for one configuration (built on first use).
    Models that cannot be weakly referenced, and bound methods (a new object at each access),
    get fresh functions each time. ``judge``: the deployed forward pass (see the module);
    ``draws_per_call``: EOT draws stacked into one model call."""
    if draws_per_call < 1:
        raise ValueError(f"draws_per_call must be >= 1, got {draws_per_call}")
    key = (loss, norm, int(eot_iter), bool(targeted), bool(index_aware), bool(compile), judge,
           int(draws_per_call))
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
    robust [steps + 1], losses [steps + 1], etas [steps], stats [3], (candidate,
    candidate_failures, candidate_margin))."""
    batch = int(images.shape[0])
    marks = set(checkpoints(steps))
    eps_tensor = tf.constant(eps, tf.float32)
    start_points = random_start(images, eps_tensor, norm, generator)
    value, point_margin, gradient, stats, failures = functions.start(start_points, labels,
                                                                     targets, index)
    state = {"current": start_points, "previous": start_points, "gradient": gradient,
             "value": value, "eta": tf.fill([batch, 1, 1, 1], 2.0 * eps),
             "increases": tf.zeros([batch], tf.float32), "best_adv": start_points,
             "best_margin": point_margin, "best_point": start_points,
             "best_gradient": gradient, "best_loss": value, "candidate": start_points,
             "candidate_failures": failures, "candidate_margin": point_margin}
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
            curves[1:, 2], stats, (state["candidate"], state["candidate_failures"],
                                   state["candidate_margin"]))


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

    def __init__(self, images, steps, eot_iter):
        self.count = len(images)
        self.adversarial = images.copy()
        self.best_margin = np.full(self.count, np.inf, np.float32)
        self.candidates = images.copy()
        self.candidate_failures = np.zeros(self.count, np.int64)
        self.candidate_margin = np.full(self.count, np.inf, np.float32)
        self.eot_iter = eot_iter
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
            target_labels=self.targets, candidates=self.candidates,
            candidate_failures=self.candidate_failures, broken=self.broken)

    @property
    def broken(self) -> np.ndarray:
        return self.candidate_failures >= self.eot_iter

    def keep_candidates(self, positions, points, failures, margins):
        better = (failures > self.candidate_failures[positions]) | (
            (failures == self.candidate_failures[positions]) & (failures > 0)
            & (margins < self.candidate_margin[positions]))
        chosen = positions[better]
        self.candidates[chosen] = points[better]
        self.candidate_failures[chosen] = failures[better]
        self.candidate_margin[chosen] = margins[better]


def _run(accumulator, functions, images, labels, eps, norm, steps, restarts, eot_iter,
         targets, positions, generator, batch_size, progress, keep_first_success=False):
    """APGD with restarts on ``images[positions]`` (positions into the full set, which the
    index-aware model sees), updating ``accumulator``.

    Later restarts (and, with ``keep_first_success``, this run) skip the examples already
    broken in every draw (``_Accumulator.broken``), not those with a negative mean margin.
    ``keep_first_success``: a broken example keeps its point (APGD-T keeps the first target
    that succeeds)."""
    batch_size = batch_size or max(len(positions), 1)
    first_row = len(accumulator.robust)
    for _ in range(restarts):
        accumulator.new_run()
    for start in range(0, len(positions), batch_size):
        chunk = positions[start:start + batch_size]
        for restart in range(restarts):
            todo = chunk if restart == 0 and not keep_first_success else chunk[
                ~accumulator.broken[chunk]]
            if todo.size == 0:
                continue
            chunk_targets = labels[todo] if targets is None else targets[todo]
            found, found_margin, robust, losses, etas, stats, candidate = _apgd_once(
                functions, tf.constant(images[todo]), tf.constant(labels[todo]),
                tf.constant(chunk_targets), tf.constant(todo, tf.int64), float(eps), norm,
                steps, generator)
            found_margin = found_margin.numpy()
            accumulator.keep_candidates(todo, *(value.numpy() for value in candidate))
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
         compile: bool = True, index_aware: bool = False, judge=None,
         draws_per_call: int = 1) -> APGDResult:
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
      judge: optional deployed forward pass (same signature as ``model``) that decides
        margins, candidates and the returned points when ``model`` is a surrogate.
      draws_per_call: EOT draws made in one model call on stacked copies of the batch (EOT
        as a batch dimension; 1: one call per draw). The model must draw its noise per row.

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
                                   index_aware, compile, judge, draws_per_call)
    accumulator = _Accumulator(images, steps, eot_iter)
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
                  compile: bool = True, index_aware: bool = False, judge=None,
                  draws_per_call: int = 1) -> APGDResult:
    """APGD-T (AutoAttack's targeted APGD): the targeted DLR loss, one run of ``steps``
    iterations (times ``restarts``) per target class.

    The targets of an example are its ``n_target_classes`` most likely wrong classes on the
    clean image (logits averaged over ``eot_iter`` draws, of ``judge`` when given), tried in
    order of likelihood; each target runs only on the examples no earlier target broke in every
    draw (``APGDResult.broken``), and an example keeps the point of
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
    logits = clean_logits(model if judge is None else judge, images, eot_iter, batch_size,
                          index_aware)
    num_classes = logits.shape[-1]
    if num_classes < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got {num_classes}")
    functions = compiled_functions(model, "dlr", norm, eot_iter, True, index_aware, compile,
                                   judge, draws_per_call)
    accumulator = _Accumulator(images, steps, eot_iter)
    generator = tf.random.Generator.from_seed(seed)
    for rank in range(1, min(n_target_classes, num_classes - 1) + 1):
        targets = top_wrong_classes(logits, labels, rank)
        positions = np.flatnonzero(~accumulator.broken)
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
