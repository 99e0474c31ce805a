"""The check every adversarial set passes before it is scored: finite, inside the clip range and
inside its eps ball around the clean images.

An attack bug that leaves the ball (a projection skipped, a wrong norm, a NaN) makes a defense
look weaker than it is, and nothing downstream would notice; so the evaluation calls
``check_adversarial`` on each set and the attack tests use it too.
"""

from __future__ import annotations

import numpy as np

NORMS = ("linf", "l2")


def perturbation_norms(clean, adversarial, norm: str) -> np.ndarray:
    """Per-example size of ``adversarial - clean`` (float64 ``[N]``): the largest absolute pixel
    change for ``linf``, the Euclidean norm over all pixels and channels for ``l2``."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    delta = (np.asarray(adversarial, np.float64) - np.asarray(clean, np.float64)).reshape(
        len(clean), -1)
    if norm == "linf":
        return np.abs(delta).max(axis=1) if delta.shape[1] else np.zeros(len(clean))
    return np.sqrt(np.sum(np.square(delta), axis=1))


def clean_batch(images, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validates an attack's inputs: images float32 ``[N, H, W, C]`` in [0, 1] and int64 labels
    ``[N]``; returns them as numpy arrays or raises ValueError naming what is wrong."""
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int64)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"expected images [N, H, W, C] and labels [N], got {images.shape} and "
                         f"{labels.shape}")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise ValueError("images must lie in [0, 1]")
    return images, labels


def check_adversarial(clean, adversarial, eps, norm: str, clip=(0.0, 1.0), atol: float = 1e-5):
    """Raises ValueError unless every adversarial example is finite, inside ``clip`` and within
    ``eps`` (+ ``atol``) of its clean image in ``norm``.

    Args:
      clean: float ``[N, ...]`` the clean images. adversarial: float, the same shape.
      eps: the radius of the ball, >= 0; ``None`` skips the ball check (minimum-norm attacks).
      norm: ``linf`` or ``l2``.
      clip: ``(low, high)`` the valid pixel range, or None to skip the range check.
      atol: slack for float32 round-off, on the norm and on the range.

    Returns:
      float64 ``[N]``: the perturbation norms (so a caller can report them).

    The message names how many examples break each rule and the worst offender (its index and
    norm, or its value), e.g. ``3 of 100 examples outside the linf ball of radius 0.1 (worst:
    example 7 at 0.13)``.
    """
    clean = np.asarray(clean)
    adversarial = np.asarray(adversarial)
    if clean.shape != adversarial.shape:
        raise ValueError(f"adversarial shape {adversarial.shape} differs from the clean shape "
                         f"{clean.shape}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    count = len(clean)
    flat = adversarial.reshape(count, -1).astype(np.float64)
    problems = []
    finite = np.all(np.isfinite(flat), axis=1)
    if not finite.all():
        worst = int(np.flatnonzero(~finite)[0])
        problems.append(f"{int((~finite).sum())} of {count} examples with non-finite values "
                        f"(first: example {worst})")
    # Non-finite rows are reported above; measure the rest with them zeroed.
    safe = np.where(np.isfinite(flat), flat, 0.0).reshape(adversarial.shape)
    if clip is not None:
        low, high = clip
        below = np.maximum(low - safe.reshape(count, -1), 0.0).max(axis=1, initial=0.0)
        above = np.maximum(safe.reshape(count, -1) - high, 0.0).max(axis=1, initial=0.0)
        excess = np.maximum(below, above)
        outside = finite & (excess > atol)
        if outside.any():
            worst = int(np.argmax(np.where(outside, excess, -1.0)))
            problems.append(f"{int(outside.sum())} of {count} examples outside the clip range "
                            f"[{low}, {high}] (worst: example {worst}, {excess[worst]:.6g} "
                            f"beyond it)")
    norms = perturbation_norms(clean, safe, norm)
    if eps is not None:
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        outside = finite & (norms > eps + atol)
        if outside.any():
            worst = int(np.argmax(np.where(outside, norms, -1.0)))
            problems.append(f"{int(outside.sum())} of {count} examples outside the {norm} ball "
                            f"of radius {eps:g} (worst: example {worst} at {norms[worst]:.6g})")
    if problems:
        raise ValueError("adversarial set rejected: " + "; ".join(problems))
    return norms
