"""Comparing our purified images with the authors' files: their uint8 conversion
(``truncate_to_uint8``, truncation) and how closely two uint8 images agree
(``uint8_agreement``). Our own conversion (rounding) is ``comdefend_tf.io.images.to_uint8``.
"""

from __future__ import annotations

import numpy as np


def truncate_to_uint8(images) -> np.ndarray:
    """The release's conversion: ``(y * 255).astype(uint8)`` in float32 (truncation).

    ``images``: float array in [0, 1]; returns uint8 of the same shape. Biased low by half a
    grey level on average; use ``comdefend_tf.io.images.to_uint8`` for anything but
    reproducing their files.
    """
    scaled = np.asarray(images, dtype=np.float32) * np.float32(255)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def uint8_agreement(ours, theirs) -> dict[str, float]:
    """How closely two uint8 images (same shape) agree.

    Returns ``exact`` (fraction of equal values), ``mean_abs`` (mean absolute difference in
    1/255 units), ``within_1`` (fraction at most 1 apart), ``max_abs`` and ``psnr_db`` (PSNR of
    one against the other on 0..255; inf when identical).
    """
    ours = np.asarray(ours)
    theirs = np.asarray(theirs)
    if ours.shape != theirs.shape:
        raise ValueError(f"shapes differ: {ours.shape} vs {theirs.shape}")
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return {"exact": float(np.mean(diff == 0)), "mean_abs": float(np.mean(diff)),
            "within_1": float(np.mean(diff <= 1)), "max_abs": int(diff.max()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))}
