"""Checks that run before anything is scored: adversarial sets inside their eps ball, and a
second classifier that really is a second classifier.

A number computed from an adversarial image outside its ball, outside [0, 1] or with a NaN is
not a robustness number; such a set is an error here. A transfer attack from "a second
classifier" that is the first one again is a white-box attack on the classifier reported as
transfer; it is refused, by path and by the fingerprint of its weights
(``comdefend_tf.training.provenance.weights_fingerprint``, the one metrics.json records).
"""

from __future__ import annotations

import os

import numpy as np

from comdefend_tf.attacks import constraints
from comdefend_tf.training import provenance


def check_adversarial(clean: np.ndarray, adversarial: np.ndarray, eps: float | None,
                      norm: str) -> None:
    """Raises ValueError when ``adversarial`` (float ``[n, H, W, C]``) leaves the ``norm`` ball
    of radius ``eps`` around ``clean``, leaves [0, 1] or holds a non-finite value (the
    attacks' own check, ``comdefend_tf.attacks.constraints.check_adversarial``). ``eps``
    None (a minimum-norm attack) checks only range and finiteness."""
    clean = np.asarray(clean, np.float32)
    adversarial = np.asarray(adversarial, np.float32)
    if clean.shape != adversarial.shape:
        raise ValueError(f"adversarial set of shape {adversarial.shape} does not match the clean "
                         f"images {clean.shape}")
    constraints.check_adversarial(clean, adversarial, None if eps is None else float(eps), norm)


def _model_file(path: str, filename: str) -> str:
    return os.path.realpath(os.path.join(path, filename) if os.path.isdir(path) else path)


def check_second_classifier(first, second, first_path: str | None = None,
                            second_path: str | None = None,
                            filename: str = "classifier.keras") -> None:
    """Raises ValueError when the "second" classifier is the first one again: the same file
    (paths resolved, a directory meaning its ``filename``) or the same weights (a copy)."""
    if first_path and second_path and (_model_file(first_path, filename)
                                       == _model_file(second_path, filename)):
        raise ValueError(f"the second classifier ({second_path}) is the same file as the "
                         f"classifier ({first_path}); transfer needs an independently trained "
                         "one")
    if second is first or (provenance.weights_fingerprint(first)
                            == provenance.weights_fingerprint(second)):
        raise ValueError(f"the second classifier{f' ({second_path})' if second_path else ''} has "
                         "the same weights as the classifier (a copy); transfer needs an "
                         "independently trained one")
