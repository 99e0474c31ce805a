"""Fair scoring of a (possibly randomized) defense: confidence intervals, accuracy over noise
draws, per-example worst case over attacks, and gradient sanity checks.

A randomized purifier gives a different prediction at each call, so one accuracy number hides
luck. Here every adversarial set is classified ``K`` times: the mean accuracy over the draws
and the accuracy of the majority vote are both reported, with a 95% Wilson interval. An
example counts as robust in the worst case only if it survives every attack and threat model
(per draw-averaged correctness >= 0.5, i.e. it is classified correctly by majority vote).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

Z_95 = 1.959963984540054


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


def summarize(correct: np.ndarray) -> dict:
    """Accuracy figures from bool ``[draws, N]`` correctness.

    Returns dict: ``n``, ``draws``, ``mean_acc`` (over draws and examples), ``majority_acc``
    (examples right in more than half the draws; ties count as wrong), ``ci_low``/``ci_high``
    (95% Wilson interval of the majority-vote accuracy), ``draw_std`` (std of the per-draw
    accuracy, 0 for a deterministic defense).
    """
    correct = np.asarray(correct, bool)
    if correct.ndim != 2 or correct.shape[1] < 1:
        raise ValueError(f"correct must be [draws, N] with N >= 1, got {correct.shape}")
    draws, count = correct.shape
    majority = correct.sum(axis=0) * 2 > draws
    low, high = wilson_interval(int(majority.sum()), count)
    return {"n": int(count), "draws": int(draws), "mean_acc": float(correct.mean()),
            "majority_acc": float(majority.mean()), "ci_low": low, "ci_high": high,
            "draw_std": float(correct.mean(axis=1).std())}


def robust_by_majority(correct: np.ndarray) -> np.ndarray:
    """bool ``[N]``: right in more than half of the draws of a ``[draws, N]`` array."""
    correct = np.asarray(correct, bool)
    return correct.sum(axis=0) * 2 > correct.shape[0]


def worst_case(survived: Mapping[str, np.ndarray]) -> dict:
    """Per-example worst case over attacks: robust only if robust under every entry.

    Args:
      survived: name -> bool ``[N]`` (the example is still classified correctly under that
        attack / threat model). All arrays must have the same length N >= 1.

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
        others = np.delete(stacked, index, axis=0).all(axis=0) if len(arrays) > 1 else \
            np.ones_like(robust)
        decisive[name] = int(np.sum(others & ~stacked[index]))
    low, high = wilson_interval(int(robust.sum()), robust.size)
    return {"robust": robust, "n": int(robust.size), "acc": float(robust.mean()),
            "ci_low": low, "ci_high": high, "decisive": decisive}


def gradient_check(zero_fraction: float, nonfinite: int, tolerance: float = 0.01) -> dict:
    """Sanity verdict on the gradients an attack used: all finite, and exactly-zero gradients
    in at most ``tolerance`` of (example, step) pairs (zero gradients mean the attack was
    blind there: a masked or saturated pipeline)."""
    return {"zero_gradient_fraction": float(zero_fraction), "nonfinite_gradients": int(nonfinite),
            "ok": bool(nonfinite == 0 and zero_fraction <= tolerance)}
