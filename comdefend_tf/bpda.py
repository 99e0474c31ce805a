"""BPDA surrogates of a purifier (Athalye, Carlini, Wagner 2018): the deployed values forward,
an approximation's gradient backward. The one home of both; the attacks of the evaluation
(``evaluation.threat_models``) and adversarial training (``training.adversarial``) call them.

* ``identity_backward(defense)``: ``x + stop_gradient(defense(x) - x)``, any defense (images
  float32 ``[B, H, W, C]`` -> the same shape): the identity's gradient through all of it.
* ``smoothed_purify(purifier, T)``: a ComDefend's deployed pipeline (encoder, inference noise,
  hard bits, decoder) whose binarizer backward pass is ``sigmoid(noisy_logits / T)``'s. With
  trained code logits far from 0, T ~ 10 passes gradient through most bits where T = 1 (the
  soft code) passes it through a few percent.
"""

from __future__ import annotations

from collections.abc import Callable

from keras import ops

from comdefend_tf.layers import hard_threshold


def identity_backward(defense) -> Callable:
    """``images -> defense(images)`` forward, the identity backward."""
    def purify(images):
        images = ops.convert_to_tensor(images)
        return images + ops.stop_gradient(defense(images) - images)
    return purify


def smoothed_purify(purifier, temperature: float) -> Callable:
    """``images -> purified`` of a ComDefend (hard bits, its inference noise) with
    ``sigmoid(noisy_logits / temperature)`` as the binarizer's backward pass.

    Raises:
      ValueError: ``temperature`` is not > 0.
    """
    if not (temperature is not None and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def purify(images):
        images = ops.convert_to_tensor(images)
        noisy = purifier.code_noise(purifier.encoder(images, training=False), training=False)
        smooth = ops.sigmoid(noisy / temperature)
        code = hard_threshold(noisy) + (smooth - ops.stop_gradient(smooth))
        return purifier.decoder(code, training=False)
    return purify
