"""How well a purifier reconstructs held-out images, and how binary its code is.

* ``code_statistics(code_logits)``: code logits (any shape, float) -> ``CODE_STATISTICS`` keys:
  how many logits, their median and largest |logit|, the shares within 1 and 0.1 of 0 (bits a
  little noise or a rounding error can flip), the share of ones at noise 0, and the expected
  share flipped by N(0, 1) inference noise. The one implementation: training reports, the
  parity tool (tools/reproduce_authors_demo.py) and the tests read these keys.
* ``reconstruction_report(model, images)``: held-out PSNR (dB) and MSE plus the code statistics.
* ``mean_image_psnr`` / ``collapse_verdict``: the PSNR of the best constant output, and whether a
  purifier beats it by ``DEFAULT_COLLAPSE_MARGIN_DB`` (else it ``collapsed``).

Images are float32 ``[n, H, W, C]`` in [0, 1], or a ``tf.data`` dataset of such batches (or of
``(images, labels)`` batches).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from scipy.special import erfc

from comdefend_tf.model import ComDefend, psnr

# A purifier must beat "predict the mean held-out image" by this much held-out PSNR (dB).
DEFAULT_COLLAPSE_MARGIN_DB = 1.0
CODE_STATISTICS = ("num_logits", "median_abs_logit", "max_abs_logit", "near_zero_fraction",
                   "near_zero_0_1_fraction", "ones_fraction", "noise1_flip_rate")


def code_statistics(code_logits) -> dict:
    """How binary a code is, from its logits (any shape, float; at least one value).

    Returns:
      ``num_logits``; ``median_abs_logit`` and ``max_abs_logit``; ``near_zero_fraction`` and
      ``near_zero_0_1_fraction`` (shares with |logit| < 1 and < 0.1; 0 means a perfectly binary
      code); ``ones_fraction`` (share of bits set at noise 0); ``noise1_flip_rate`` (expected
      share of bits flipped by N(0, 1) inference noise: the mean of Phi(-|logit|)).

    Raises:
      ValueError: no logits.
    """
    logits = np.asarray(code_logits, dtype=np.float64).ravel()
    if not logits.size:
        raise ValueError("code_statistics needs at least one code logit")
    magnitude = np.abs(logits)
    return {"num_logits": int(logits.size),
            "median_abs_logit": float(np.median(magnitude)),
            "max_abs_logit": float(magnitude.max()),
            "near_zero_fraction": float(np.mean(magnitude < 1.0)),
            "near_zero_0_1_fraction": float(np.mean(magnitude < 0.1)),
            "ones_fraction": float(np.mean(logits > 0)),
            # P(sign flip) for logit l under N(0, 1) noise is Phi(-|l|).
            "noise1_flip_rate": float(np.mean(0.5 * erfc(magnitude / np.sqrt(2.0))))}


def reconstruction_report(model: ComDefend, images: tf.data.Dataset | np.ndarray,
                          batch_size: int = 64) -> dict:
    """Inference-time quality and code statistics on held-out images.

    Args:
      model: a ComDefend model (its inference noise and mode apply).
      images: float32 ``[n, H, W, C]`` in [0, 1], or a dataset of such batches (or of
        ``(images, labels)`` batches).

    Returns:
      dict: ``psnr_db`` (mean over images of per-image PSNR, dB), ``mse``, the
      ``code_statistics`` of all held-out code logits, ``bits_per_pixel`` and ``num_images``.
    """
    psnrs, mses, logits = [], [], []
    for batch in _image_batches(images, batch_size):
        outputs = model.forward(batch, training=False)
        purified = outputs["purified"]
        psnrs.append(np.asarray(psnr(batch, purified)))
        mses.append(np.mean(np.square(np.asarray(purified) - np.asarray(batch)), axis=(1, 2, 3)))
        logits.append(np.asarray(outputs["code_logits"], np.float32).ravel())
    return {
        "psnr_db": float(np.mean(np.concatenate(psnrs))),
        "mse": float(np.mean(np.concatenate(mses))),
        **code_statistics(np.concatenate(logits)),
        "bits_per_pixel": int(model.config.code_channels),
        "num_images": int(sum(len(p) for p in psnrs)),
    }


def mean_image_psnr(images: tf.data.Dataset | np.ndarray, batch_size: int = 64) -> float:
    """Held-out PSNR (dB, mean over images) of the best constant purifier: one that outputs the
    mean of ``images`` whatever its input. A purifier that ignores its input (a collapsed one)
    scores at most this.

    Args:
      images: float32 ``[n, H, W, C]`` in [0, 1], or a dataset of such batches (or of
        ``(images, labels)`` batches). Images of different sizes are compared with their mean
        colour instead of a mean image.
    """
    image_sum, colour_sum, count, pixels, shapes = None, 0.0, 0, 0, set()
    for batch in _image_batches(images, batch_size):
        batch = np.asarray(batch, np.float64)
        shapes.add(batch.shape[1:])
        if len(shapes) == 1:
            image_sum = batch.sum(axis=0) + (0.0 if image_sum is None else image_sum)
        colour_sum = colour_sum + batch.sum(axis=(0, 1, 2))
        count += len(batch)
        pixels += len(batch) * batch.shape[1] * batch.shape[2]
    if not count:
        raise ValueError("mean_image_psnr needs at least one image")
    mean = image_sum / count if len(shapes) == 1 else colour_sum / pixels
    psnrs = []
    for batch in _image_batches(images, batch_size):
        batch = np.asarray(batch, np.float32)
        constant = np.broadcast_to(mean.astype(np.float32), batch.shape)
        psnrs.append(np.asarray(psnr(batch, constant)))
    return float(np.mean(np.concatenate(psnrs)))


def collapse_verdict(psnr_db: float, mean_image_psnr_db: float,
                     margin_db: float = DEFAULT_COLLAPSE_MARGIN_DB) -> str:
    """``"ok"`` when a purifier's held-out PSNR beats the mean image's by at least
    ``margin_db`` dB, else ``"collapsed"`` (also for a NaN PSNR)."""
    if not (np.isfinite(psnr_db) and psnr_db >= mean_image_psnr_db + margin_db):
        return "collapsed"
    return "ok"


def _image_batches(images, batch_size):
    if isinstance(images, np.ndarray):
        images = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    for batch in images:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch
