"""Square attack, L-inf and L2 (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020,
arXiv 1912.00049), with EOT scoring for randomized pipelines.

A score-based random search that never uses gradients; each query changes one random square
window of the current perturbation and keeps the change for an example when its margin
``z_y - max_{i != y} z_i`` drops. The window covers a fraction ``p`` of the image, ``p_init``
halved on the published schedule (at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of
10,000 iterations, rescaled to the budget). ``p_init`` defaults to AutoAttack's 0.8 for both
norms.

* L-inf: the start is vertical stripes of ``+-eps`` (one sign per column and channel); a query
  sets the window to ``+-eps`` with one random sign per channel.
* L2: the start is a grid of windows holding the paper's nested-squares "meta-pattern" with
  a random sign per channel, rescaled to norm ``eps``; a query moves the mass of one window
  into another and adds a fresh signed meta-pattern there, then rescales the whole
  perturbation to norm ``eps`` (details: docs/internals/evaluation.md).

Every example draws its own window positions and signs (vectorised over the batch).

Randomized pipelines (``eot_draws = K``): every candidate is scored by calling the model K
times (K independent noise draws) and averaging the K margins; a candidate replaces the current
point only if that mean margin is lower, or if it is misclassified in all K draws. An example
counts as broken, and leaves the search, only when it is misclassified in every one of the K
draws of one scoring (strict: a single lucky draw among K never counts). With ``K = 1`` this is
the published attack.

No success is thrown away: every scored point misclassified in at least one draw is a
*candidate*; each example keeps the one misclassified in the most draws of its scoring (ties:
the lowest mean margin), returned beside the current point for the caller to verify with many
fresh draws. ``confirm_draws = V`` (for a randomized model): an example whose scoring was
wrong in all K draws leaves the search only if V further draws of that point are all wrong
too; otherwise it keeps searching (a lucky scoring no longer ends the search). Run on the
whole pipeline (``classifier(purifier(x))``, forward passes
only) it is the check for gradient masking: if Square finds adversarial examples that the
gradient attacks miss, the gradients were misleading.

A query is one candidate scored (``K`` model calls). ``queries`` is the number of iterations
after the initial point, as in AutoAttack's ``n_queries``, so an example never broken uses
``queries + 1`` scorings.

The compiled forward pass has an unknown batch dimension and is cached per model callable
(why not ART's ``SquareAttack``: docs/internals/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import numpy as np
import tensorflow as tf

from comdefend_tf.attacks.constraints import clean_batch

NORMS = ("linf", "l2")
DEFAULT_P_INIT = 0.8
_SCHEDULE = ((10, 2), (50, 4), (200, 8), (500, 16), (1000, 32), (2000, 64), (4000, 128),
             (6000, 256), (8000, 512))
_TINY = 1e-12


def square_fraction(p_init: float, iteration: int, queries: int) -> float:
    """The fraction of pixels the square covers at ``iteration`` of ``queries``."""
    scaled = int(iteration / queries * 10000)
    divisor = 1
    for start, value in _SCHEDULE:
        if scaled > start:
            divisor = value
    return p_init / divisor


def window_side(fraction: float, height: int, width: int, norm: str) -> int:
    """The side of the square window covering ``fraction`` of an ``height x width`` image:
    ``round(sqrt(fraction * h * w))``, at least 1 (L-inf) or at least 3 and odd (L2), at most
    the image's shorter side."""
    side = int(round(math.sqrt(fraction * height * width)))
    if norm == "l2":
        side = max(side, 3)
        side += 1 - side % 2
    return max(1, min(side, height, width))


def meta_pattern(side: int) -> np.ndarray:
    """The L2 attack's ``side x side`` update pattern, unit L2 norm: the top ``side // 2`` rows
    hold nested squares around their centre (a pixel at Chebyshev distance ``d`` from it weighs
    ``sum_{k >= d} 1 / (k + 1)^2``), the other rows the same with a minus sign."""

    def nested(rows, cols):
        if rows == 0:
            return np.zeros((0, cols))
        levels = max(rows // 2 + 1, cols // 2 + 1)
        weights = np.cumsum(1.0 / np.arange(levels, 0, -1) ** 2)[::-1]  # weight of distance d
        distance = np.maximum(np.abs(np.arange(rows)[:, None] - rows // 2),
                              np.abs(np.arange(cols)[None, :] - cols // 2))
        block = weights[distance]
        return block / np.sqrt(np.sum(block ** 2))

    pattern = np.concatenate([nested(side // 2, side), -nested(side - side // 2, side)])
    return pattern / np.sqrt(np.sum(pattern ** 2))


@dataclasses.dataclass
class SquareResult:
    """What one Square run found.

    Attributes:
      adversarial: float32 ``[N, H, W, C]`` in [0, 1], inside the eps ball.
      margin: float ``[N]``: the margin at that point, averaged over the ``eot_draws`` draws of
        the scoring that accepted it.
      broken: bool ``[N]``: misclassified in every draw of that scoring (strict).
      queries: int ``[N]``: candidates scored for each example, the initial point included.
      accepted: int ``[N]``: candidates that replaced the current point.
      model_calls: total model calls (each on a batch of the examples still searched).
      candidates: float32 ``[N, H, W, C]``: per example the scored point misclassified in the
        most draws of its scoring (the clean image where none was).
      candidate_failures: int ``[N]``: in how many of the ``eot_draws`` draws (0: none).
    """

    adversarial: np.ndarray
    margin: np.ndarray
    broken: np.ndarray
    queries: np.ndarray
    accepted: np.ndarray
    model_calls: int
    candidates: np.ndarray | None = None
    candidate_failures: np.ndarray | None = None


# model -> compiled forward pass (unknown batch size), weak so it goes with the model.
_FORWARD_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _forward(model, shape):
    key = tuple(shape)

    def build(model_ref):
        return tf.function(lambda images: tf.cast(model_ref()(images), tf.float32),
                           input_signature=[tf.TensorSpec((None,) + key, tf.float32)])

    if hasattr(model, "__self__"):
        return build(lambda: model)
    try:
        per_model = _FORWARD_CACHE.setdefault(model, {})
    except TypeError:
        return build(lambda: model)
    if key not in per_model:
        per_model[key] = build(weakref.ref(model))
    return per_model[key]


def _margins_per_draw(forward, images, labels, draws, batch_size):
    """``[draws, B]`` margins, one model call per draw (per chunk of ``batch_size``)."""
    rows = np.arange(len(labels))
    result = np.empty((draws, len(labels)))
    for draw in range(draws):
        parts = [forward(tf.constant(images[start:start + batch_size])).numpy()
                 for start in range(0, len(images), batch_size)]
        logits = np.concatenate(parts).astype(np.float64)
        true_logit = logits[rows, labels]
        logits[rows, labels] = -np.inf
        result[draw] = true_logit - logits.max(axis=1)
    return result


def _windows(rng, count, side, height, width):
    """Per-example top-left corners ``(top [B], left [B])`` of a ``side`` window."""
    return (rng.integers(0, height - side + 1, size=count),
            rng.integers(0, width - side + 1, size=count))


def _block_index(top, left, side):
    """Advanced indices selecting each example's ``side x side`` window: ``[B, s, s]`` each."""
    offsets = np.arange(side)
    batch = np.arange(len(top))[:, None, None]
    rows = top[:, None, None] + offsets[None, :, None]
    cols = left[:, None, None] + offsets[None, None, :]
    return batch, rows, cols


def _signed_patterns(rng, count, side, channels):
    """``[B, s, s, C]`` meta-patterns, each randomly transposed, with a sign per channel."""
    pattern = meta_pattern(side)
    transpose = rng.random(count) < 0.5
    patterns = np.where(transpose[:, None, None], pattern.T[None], pattern[None])
    signs = rng.choice([-1.0, 1.0], size=(count, 1, 1, channels))
    return patterns[..., None] * signs


def _l2_normalize(delta, eps):
    norms = np.sqrt(np.sum(np.square(delta), axis=(1, 2, 3), keepdims=True))
    return delta * (eps / (norms + _TINY))


def _initial_point(rng, images, eps, norm):
    count, height, width, channels = images.shape
    if norm == "linf":
        delta = eps * rng.choice([-1.0, 1.0], size=(count, 1, width, channels))
        return np.clip(images + delta, 0.0, 1.0).astype(np.float32)
    side = max(height // 5, 1)
    offset = (height - 5 * side) // 2
    delta = np.zeros(images.shape)
    for top in range(offset, height - side + 1, side):
        for left in range(offset, width - side + 1, side):
            tops, lefts = np.full(count, top), np.full(count, left)
            delta[_block_index(tops, lefts, side)] += _signed_patterns(rng, count, side,
                                                                       channels)
    return np.clip(images + _l2_normalize(delta, eps), 0.0, 1.0).astype(np.float32)


def _candidates(rng, images, current, eps, norm, fraction):
    count, height, width, channels = images.shape
    side = window_side(fraction, height, width, norm)
    delta = current.astype(np.float64) - images
    if norm == "linf":
        top, left = _windows(rng, count, side, height, width)
        signs = eps * rng.choice([-1.0, 1.0], size=(count, 1, 1, channels))
        delta[_block_index(top, left, side)] = np.broadcast_to(signs,
                                                               (count, side, side, channels))
        return np.clip(images + delta, 0.0, 1.0).astype(np.float32)
    first = _block_index(*_windows(rng, count, side, height, width), side)
    second = _block_index(*_windows(rng, count, side, height, width), side)
    window = delta[first]  # [B, s, s, C]
    window_norms = np.sqrt(np.sum(np.square(window), axis=(1, 2), keepdims=True))
    image_norms = np.sqrt(np.sum(np.square(delta), axis=(1, 2, 3)))
    union = np.zeros(delta.shape[:3], bool)
    union[first] = True
    union[second] = True
    union_norms = np.sqrt(np.sum(np.square(delta) * union[..., None], axis=(1, 2, 3)))
    update = _signed_patterns(rng, count, side, channels) + window / (window_norms + _TINY)
    target = np.sqrt(np.maximum(eps ** 2 - image_norms ** 2, 0.0) / channels
                     + union_norms ** 2)[:, None, None, None]
    update_norms = np.sqrt(np.sum(np.square(update), axis=(1, 2), keepdims=True))
    delta[second] = 0.0
    delta[first] = update / (update_norms + _TINY) * target
    return np.clip(images + _l2_normalize(delta, eps), 0.0, 1.0).astype(np.float32)


def square(model, images, labels, eps: float, norm: str = "linf", queries: int = 5000,
           p_init: float | None = None, eot_draws: int = 1, seed: int = 0, progress=False,
           batch_size: int | None = None, confirm_draws: int = 0) -> SquareResult:
    """Runs the Square attack with ``queries`` iterations per example.

    Args:
      model: callable, float32 ``[B, H, W, C]`` in [0, 1] -> logits ``[B, classes]``; only its
        forward pass is used; may draw fresh randomness at every call.
      images: float32 ``[N, H, W, C]`` in [0, 1]. labels: int ``[N]`` true classes.
      eps: the radius: L-inf in (0, 1], L2 > 0.
      norm: ``linf`` or ``l2``.
      queries: iterations after the initial point (AutoAttack's 5,000 by default).
      p_init: the initial window fraction in (0, 1] (None: 0.8).
      eot_draws: model calls per scoring (see the module docstring: mean-margin acceptance,
        strict success).
      seed: seed of the search (windows, signs, start).
      progress: False, True (a tqdm bar over queries) or a callable told ``progress(1)`` per
        iteration (the whole budget is reported even when every example breaks early).
      batch_size: examples per model call (default all).
      confirm_draws: further draws that must all be wrong before an example wrong in every
        draw of a scoring leaves the search (0: none, the published attack).

    Returns:
      A ``SquareResult``.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not eps > 0 or (norm == "linf" and eps > 1.0):
        raise ValueError(f"eps must be in (0, 1] for linf or > 0 for l2, got {eps}")
    if queries < 1:
        raise ValueError(f"queries must be >= 1, got {queries}")
    p_init = DEFAULT_P_INIT if p_init is None else float(p_init)
    if not 0.0 < p_init <= 1.0:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    if eot_draws < 1 or confirm_draws < 0:
        raise ValueError(f"eot_draws must be >= 1 and confirm_draws >= 0, got {eot_draws} "
                         f"and {confirm_draws}")
    images, labels = clean_batch(images, labels)
    count = len(images)
    batch_size = batch_size or max(count, 1)
    forward = _forward(model, images.shape[1:])
    rng = np.random.default_rng(seed)
    tick, bar = _progress(progress, queries)
    clean64 = images.astype(np.float64)
    adversarial = _initial_point(rng, clean64, eps, norm)
    draws = _margins_per_draw(forward, adversarial, labels, eot_draws, batch_size)
    best = draws.mean(axis=0)
    candidates = _Candidates(images)
    candidates.keep(np.arange(count), adversarial, draws)
    used = np.ones(count, np.int64)
    accepted = np.zeros(count, np.int64)
    calls = eot_draws * math.ceil(count / batch_size) if count else 0

    def confirmed(positions, points, all_wrong):
        """Of ``positions`` whose scoring was wrong in every draw, those that stay wrong in
        ``confirm_draws`` more; counts the calls."""
        nonlocal calls
        result = np.array(all_wrong, bool)
        check = np.flatnonzero(result)
        if confirm_draws and check.size:
            more = _margins_per_draw(forward, points[check], labels[positions[check]],
                                     confirm_draws, batch_size)
            calls += confirm_draws * math.ceil(check.size / batch_size)
            result[check] = np.all(more < 0, axis=0)
        return result

    broken = confirmed(np.arange(count), adversarial, np.all(draws < 0, axis=0))
    try:
        for iteration in range(queries):
            active = np.flatnonzero(~broken)
            if active.size == 0:
                tick(queries - iteration)
                break
            fraction = square_fraction(p_init, iteration, queries)
            candidate = _candidates(rng, clean64[active], adversarial[active], eps, norm,
                                    fraction)
            draws = _margins_per_draw(forward, candidate, labels[active], eot_draws,
                                      batch_size)
            calls += eot_draws * math.ceil(active.size / batch_size)
            candidates.keep(active, candidate, draws)
            mean = draws.mean(axis=0)
            all_wrong = np.all(draws < 0, axis=0)
            take = (mean < best[active]) | all_wrong
            chosen = active[take]
            adversarial[chosen] = candidate[take]
            best[chosen] = mean[take]
            broken[chosen] = confirmed(chosen, candidate[take], all_wrong[take])
            accepted[chosen] += 1
            used[active] += 1
            tick(1)
    finally:
        if bar is not None:
            bar.close()
    return SquareResult(adversarial=adversarial, margin=best, broken=broken, queries=used,
                        accepted=accepted, model_calls=int(calls),
                        candidates=candidates.points, candidate_failures=candidates.failures)


class _Candidates:
    """Per example the scored point misclassified in the most draws (ties: lowest mean
    margin); the clean image with 0 failures until one is seen."""

    def __init__(self, images):
        self.points = np.array(images, np.float32, copy=True)
        self.failures = np.zeros(len(images), np.int64)
        self.margin = np.full(len(images), np.inf)

    def keep(self, positions, points, draws):
        failures = np.sum(draws < 0, axis=0)
        mean = draws.mean(axis=0)
        held = self.failures[positions]
        better = (failures > held) | ((failures == held) & (failures > 0)
                                      & (mean < self.margin[positions]))
        chosen = positions[better]
        self.points[chosen] = points[better]
        self.failures[chosen] = failures[better]
        self.margin[chosen] = mean[better]


def _progress(progress, total):
    if callable(progress):
        return progress, None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="square", unit="query", leave=False)
        return bar.update, bar
    return (lambda n: None), None


def square_linf(model, images, labels, eps: float, queries: int = 1000, p_init: float = 0.8,
                seed: int = 0, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """The L-inf attack with one draw per query, the earlier interface: returns
    ``(adversarial, margins)`` of ``square(model, images, labels, eps, "linf", queries, p_init,
    eot_draws=1, seed=seed, progress=progress)``."""
    result = square(model, images, labels, eps, "linf", queries, p_init, eot_draws=1,
                    seed=seed, progress=progress or False)
    return result.adversarial, result.margin
