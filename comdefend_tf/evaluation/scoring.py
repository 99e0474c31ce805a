"""The one scorer of every protocol: K draws per example, mean / majority / strict, Wilson
intervals, per-example worst case, and the gradient sanity verdict.

A randomized purifier gives a different prediction at each call, so one accuracy number hides
luck. Every adversarial set is classified ``K`` times (``K = 1`` for a deterministic defense),
which gives a correctness matrix bool ``[K, N]``. From it:

* ``mean``: correct (draw, example) pairs over all pairs, the expected accuracy of one request;
* ``majority``: an example counts when it is right in more than half of its K draws (ties
  count as wrong), the accuracy of a deployment that votes over K calls;
* ``strict``: an example counts only when it is right in every one of its K draws. The
  deployed pipeline makes one draw per request and an attacker can resubmit, so strict is the
  headline: per example strict <= majority, and both come with 95% Wilson intervals.

**Verification.** An attack returns several points per example (its final point and the
candidates a searched draw misclassified); each is classified in V fresh deployed
draws and the example keeps the point wrong in the most (``strongest_point``). Its failure
rate is ``failures / V``; it counts as broken when that rate is significantly above zero: the
one-sided 95% Wilson lower bound is above 0 (``significantly_failing``), which holds exactly
when at least one of the V draws was wrong, so one failure in 20 draws is a failure. This is
the strict sense.

The worst case over attacks is per example: an example is robust only if it survives every
attack (and is correct on the clean image), strictly (every draw of every attack) or by
majority vote (a majority of the draws of each attack), reported side by side.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

Z_95 = 1.959963984540054
Z_95_ONE_SIDED = 1.6448536269514722
# Gradient check: a code surrogate must carry gradient through at least this share of the code.
MIN_CODE_SHARE = 0.1


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (default 95%), as ``(low, high)`` in
    [0, 1]. ``total`` must be >= 1 and ``0 <= successes <= total``."""
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if not 0 <= successes <= total:
        raise ValueError(f"successes must be in [0, {total}], got {successes}")
    phat = successes / total
    denominator = 1.0 + z * z / total
    centre = (phat + z * z / (2 * total)) / denominator
    half = z * math.sqrt(phat * (1 - phat) / total + z * z / (4 * total * total)) / denominator
    # Exact ends at 0 and N successes (the formula gives them up to rounding).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return low, high


def correct_per_draw(predict, images, labels, draws: int, batch_size: int = 256) -> np.ndarray:
    """Correctness of ``predict`` (images -> logits) on each of ``draws`` independent calls.

    Returns bool ``[draws, N]``. ``images`` float32 ``[N, H, W, C]``, labels int ``[N]``.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    labels = np.asarray(labels)
    correct = np.zeros((draws, len(labels)), bool)
    for draw in range(draws):
        for start in range(0, len(labels), batch_size):
            logits = np.asarray(predict(images[start:start + batch_size]))
            correct[draw, start:start + batch_size] = (
                logits.argmax(axis=-1) == labels[start:start + batch_size])
    return correct


def failure_counts(correct) -> np.ndarray:
    """int ``[N]``: draws in which each example was misclassified (``correct`` ``[V, N]``)."""
    return (~_check_matrix(correct)).sum(axis=0)


def significantly_failing(failures, draws: int, z: float = Z_95_ONE_SIDED) -> np.ndarray:
    """bool ``[N]``: the failure rate ``failures / draws`` is significantly above 0 (the
    one-sided Wilson lower bound at ``z`` is above 0; true exactly when ``failures >= 1``)."""
    return np.array([wilson_interval(int(k), int(draws), z)[0] > 0.0
                     for k in np.atleast_1d(failures)], bool)


def strongest_point(corrects) -> tuple[np.ndarray, np.ndarray]:
    """Of several points per example, each scored bool ``[V, N]``, the one wrong in the most
    draws (ties: the first). Returns ``(choice int [N], correct bool [V, N])``."""
    stacked = np.stack([_check_matrix(c) for c in corrects])  # [points, V, N]
    choice = np.argmax((~stacked).sum(axis=1), axis=0)
    return choice, stacked[choice, :, np.arange(stacked.shape[2])].T


def _check_matrix(correct) -> np.ndarray:
    correct = np.asarray(correct, bool)
    if correct.ndim != 2 or correct.shape[0] < 1:
        raise ValueError(f"correct must be bool [draws, N] with draws >= 1, got {correct.shape}")
    return correct


def robust_by_majority(correct: np.ndarray) -> np.ndarray:
    """bool ``[N]``: right in more than half of the draws of a ``[draws, N]`` array."""
    correct = _check_matrix(correct)
    return correct.sum(axis=0) * 2 > correct.shape[0]


def robust_strictly(correct: np.ndarray) -> np.ndarray:
    """bool ``[N]``: right in every draw of a ``[draws, N]`` array."""
    return _check_matrix(correct).all(axis=0)


def summarize(correct: np.ndarray) -> dict:
    """Accuracy figures from bool ``[draws, N]`` correctness (N >= 1).

    Returns dict: ``n``, ``draws``, ``mean_acc`` (over draws and examples), ``majority_acc``,
    ``strict_acc``, their Wilson intervals ``majority_ci`` and ``strict_ci`` (``[low, high]``),
    ``ci_low``/``ci_high`` (the strict interval, the headline) and ``draw_std`` (std of the
    per-draw accuracy, 0 for a deterministic defense).
    """
    correct = _check_matrix(correct)
    if correct.shape[1] < 1:
        raise ValueError("correct must hold at least one example")
    draws, count = correct.shape
    majority = robust_by_majority(correct)
    strict = robust_strictly(correct)
    majority_ci = wilson_interval(int(majority.sum()), count)
    strict_ci = wilson_interval(int(strict.sum()), count)
    return {"n": int(count), "draws": int(draws), "mean_acc": float(correct.mean()),
            "majority_acc": float(majority.mean()), "strict_acc": float(strict.mean()),
            "majority_ci": list(majority_ci), "strict_ci": list(strict_ci),
            "ci_low": strict_ci[0], "ci_high": strict_ci[1],
            "draw_std": float(correct.mean(axis=1).std())}


def worst_case(survived: Mapping[str, np.ndarray]) -> dict:
    """Per-example worst case over attacks: robust only if robust under every entry.

    Args:
      survived: name -> bool ``[N]`` (the example is still classified correctly under that
        attack, in whichever sense the caller chose: strict or majority). All arrays must have
        the same length N >= 1. Include the clean images as an entry to require clean
        correctness.

    Returns:
      dict: ``robust`` (bool ``[N]``), ``n``, ``acc``, ``ci_low``, ``ci_high``, and
      ``decisive`` (name -> number of examples that entry alone breaks: robust under all other
      entries but not this one).
    """
    if not survived:
        raise ValueError("worst_case needs at least one attack result")
    arrays = {name: np.asarray(values, bool) for name, values in survived.items()}
    lengths = {values.shape for values in arrays.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1 or next(iter(lengths))[0] < 1:
        raise ValueError(f"every entry must be a bool [N] array of one length, got {lengths}")
    stacked = np.stack(list(arrays.values()))
    robust = stacked.all(axis=0)
    decisive = {}
    for index, name in enumerate(arrays):
        others = (np.delete(stacked, index, axis=0).all(axis=0) if len(arrays) > 1
                  else np.ones_like(robust))
        decisive[name] = int(np.sum(others & ~stacked[index]))
    low, high = wilson_interval(int(robust.sum()), robust.size)
    return {"robust": robust, "n": int(robust.size), "acc": float(robust.mean()),
            "ci_low": low, "ci_high": high, "decisive": decisive}


def gradient_check(zero_fraction: float, nonfinite: int, tolerance: float = 0.01,
                   code_share: float | None = None,
                   min_code_share: float = MIN_CODE_SHARE) -> dict:
    """Sanity verdict on the gradients an attack used: all finite, exactly-zero gradients in at
    most ``tolerance`` of (example, step) pairs (zero gradients mean the attack was blind
    there: a masked or saturated pipeline), and, for a surrogate of ComDefend's binarizer,
    gradient through at least ``min_code_share`` of the code (``code_share``, from
    ``threat_models.code_share_fn``; a gradient non-zero on a tiny share of the code is as
    blind as a zero one). ``reasons`` says what failed."""
    reasons = []
    if nonfinite:
        reasons.append(f"{int(nonfinite)} non-finite gradients")
    if zero_fraction > tolerance:
        reasons.append(f"zero gradients in {zero_fraction:.1%} of (example, step) pairs")
    if code_share is not None and code_share < min_code_share:
        reasons.append(f"gradient through only {code_share:.1%} of the code "
                       f"(< {min_code_share:.0%})")
    return {"zero_gradient_fraction": float(zero_fraction), "nonfinite_gradients": int(nonfinite),
            "code_gradient_share": None if code_share is None else float(code_share),
            "reasons": reasons, "ok": not reasons}
