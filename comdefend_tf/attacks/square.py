"""Square attack, L-inf (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020, arXiv 1912.00049).

A score-based random search that never uses gradients: each query changes one random square of
the perturbation to +-eps per channel and keeps the change when the margin loss drops. Run on
the whole pipeline (``classifier(purifier(x))``, forward passes only), it is the check for
gradient masking: if Square finds adversarial examples that the gradient attacks miss, the
gradients the gradient attacks followed were misleading.

The search itself is the Adversarial Robustness Toolbox's ``SquareAttack`` (ART 1.20.1) on a
``TensorFlowV2Classifier`` wrapping the callable; this module fixes the settings, checks the
inputs and reports the query budget. On a randomized pipeline every query is a fresh draw, so
the search sees the defense as it is deployed.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf


def square_linf(model, images, labels, eps: float, queries: int = 1000, p_init: float = 0.8,
                restarts: int = 1, batch_size: int = 128, seed: int = 0,
                num_classes: int | None = None) -> np.ndarray:
    """Runs the L-inf Square attack with ``queries`` iterations per example.

    Args:
      model: callable, float32 ``[B, H, W, C]`` in [0, 1] -> logits ``[B, classes]``; only its
        forward pass is used.
      images: float32 ``[N, H, W, C]`` in [0, 1]. labels: int ``[N]``.
      eps: L-inf radius in (0, 1]. queries: iterations (model queries) per example and restart.
      p_init: initial fraction of pixels in the square (the paper's 0.8 for L-inf).
      restarts: independent searches (each continues only on examples not yet broken).
      seed: seeds numpy's global generator, which ART's search draws from.
      num_classes: number of logits (default: inferred from one forward pass).

    Returns:
      float32 ``[N, H, W, C]`` adversarial images in [0, 1] within ``eps`` of ``images``.
    """
    from art.attacks.evasion import SquareAttack  # heavy import, only when used
    from art.estimators.classification import TensorFlowV2Classifier

    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must be in (0, 1], got {eps}")
    if queries < 1 or restarts < 1:
        raise ValueError(f"queries and restarts must be >= 1, got {queries}, {restarts}")
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int64)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"expected images [N, H, W, C] and labels [N], got {images.shape} and "
                         f"{labels.shape}")
    if num_classes is None:
        num_classes = int(model(tf.constant(images[:1])).shape[-1])

    def logits_fn(batch, training=False):  # ART passes training=; always inference here
        del training
        return tf.cast(model(tf.convert_to_tensor(batch, tf.float32)), tf.float32)

    estimator = TensorFlowV2Classifier(
        logits_fn, nb_classes=num_classes, input_shape=images.shape[1:],
        clip_values=(0.0, 1.0),
        loss_object=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    attack = SquareAttack(estimator, norm=np.inf, max_iter=queries, eps=float(eps),
                          p_init=p_init, nb_restarts=restarts, batch_size=batch_size,
                          verbose=False)
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    state = np.random.get_state()
    np.random.seed(seed)
    art_logger = logging.getLogger("art")
    level = art_logger.level
    art_logger.setLevel(logging.WARNING)
    try:
        adversarial = attack.generate(images, y=one_hot)
    finally:
        np.random.set_state(state)
        art_logger.setLevel(level)
    adversarial = np.clip(adversarial.astype(np.float32), images - eps, images + eps)
    return np.clip(adversarial, 0.0, 1.0)
