"""Square attack, L-inf (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020, arXiv 1912.00049).

A score-based random search that never uses gradients. It starts from vertical stripes of
``+-eps`` and, at each query, redraws one random square window of the perturbation as ``+-eps``
per channel, keeping the change for an example when its margin ``z_y - max_{i != y} z_i`` drops.
The square's area is a fraction ``p`` of the image, halved on the published schedule (at 10,
50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000 iterations, rescaled to the budget).
Run on the whole pipeline (``classifier(purifier(x))``, forward passes only) it is the check for
gradient masking: if Square finds adversarial examples that the gradient attacks miss, the
gradients were misleading. On a randomized pipeline every query is a fresh draw, so the search
sees the defense as deployed.

Written here rather than taken from ART: ART's ``SquareAttack`` retraces its compiled forward
pass whenever the set of unbroken examples shrinks, which made it 10x slower on our CPUs.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

_SCHEDULE = ((10, 2), (50, 4), (200, 8), (500, 16), (1000, 32), (2000, 64), (4000, 128),
             (6000, 256), (8000, 512))


def square_fraction(p_init: float, iteration: int, queries: int) -> float:
    """The fraction of pixels the square covers at ``iteration`` of ``queries``."""
    scaled = int(iteration / queries * 10000)
    divisor = 1
    for start, value in _SCHEDULE:
        if scaled > start:
            divisor = value
    return p_init / divisor


def _margins(forward, images, labels):
    logits = forward(tf.constant(images)).numpy().astype(np.float64)
    rows = np.arange(len(labels))
    true_logit = logits[rows, labels]
    logits[rows, labels] = -np.inf
    return true_logit - logits.max(axis=1)


def square_linf(model, images, labels, eps: float, queries: int = 1000, p_init: float = 0.8,
                seed: int = 0, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Runs the L-inf Square attack with a budget of ``queries`` model queries per example.

    Args:
      model: callable, float32 ``[B, H, W, C]`` in [0, 1] -> logits ``[B, classes]``; only its
        forward pass is used.
      images: float32 ``[N, H, W, C]`` in [0, 1]. labels: int ``[N]``.
      eps: L-inf radius in (0, 1]. queries: iterations after the initial stripes.
      p_init: initial fraction of pixels in the square (the paper's 0.8 for L-inf).
      seed: seed of the search. progress: optional callable told ``progress(1)`` per query.

    Returns:
      ``(adversarial, margins)``: float32 ``[N, H, W, C]`` in [0, 1] within ``eps`` of
      ``images``, and float ``[N]`` the margin each reached (< 0: broken, on that query's draw).
    """
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must be in (0, 1], got {eps}")
    if queries < 1:
        raise ValueError(f"queries must be >= 1, got {queries}")
    if not 0.0 < p_init <= 1.0:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int64)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"expected images [N, H, W, C] and labels [N], got {images.shape} and "
                         f"{labels.shape}")
    count, height, width, channels = images.shape
    forward = tf.function(model, input_signature=[
        tf.TensorSpec([None, height, width, channels], tf.float32)])
    rng = np.random.default_rng(seed)
    stripes = eps * rng.choice([-1.0, 1.0], size=(count, 1, width, channels))
    adversarial = np.clip(images + stripes, 0.0, 1.0).astype(np.float32)
    margins = _margins(forward, adversarial, labels)
    for iteration in range(queries):
        active = np.flatnonzero(margins >= 0)
        if active.size == 0:
            if progress is not None:
                progress(queries - iteration)
            break
        fraction = square_fraction(p_init, iteration, queries)
        side = int(round(np.sqrt(fraction * height * width)))
        side = min(max(side, 1), min(height, width) - 1) if min(height, width) > 1 else 1
        candidate = adversarial[active].copy()
        originals = images[active]
        delta = candidate - originals
        for row in range(active.size):
            top = rng.integers(0, height - side + 1)
            left = rng.integers(0, width - side + 1)
            window = (row, slice(top, top + side), slice(left, left + side))
            delta[window] = eps * rng.choice([-1.0, 1.0], size=(1, 1, channels))
        candidate = np.clip(originals + delta, 0.0, 1.0).astype(np.float32)
        candidate_margins = _margins(forward, candidate, labels[active])
        better = candidate_margins < margins[active]
        adversarial[active[better]] = candidate[better]
        margins[active[better]] = candidate_margins[better]
        if progress is not None:
            progress(1)
    return adversarial, margins
