"""Seeds of attack runs: one independent, reproducible seed per (attack, loss, threat model,
norm, eps, defense).

With one seed for every run, APGD-CE, APGD-DLR and every threat model start from the same
random point, and the union over attacks has effectively one restart. Each run's seed here is
a stable hash of the run's identity and the protocol's base seed (the attacks' own
``apgd.derive_seed``: SHA-256, the same in every process, unlike Python's salted ``hash``).
"""

from __future__ import annotations

from comdefend_tf.attacks import apgd as apgd_lib


def attack_seed(base_seed: int, attack: str, loss: str | None, threat_model: str, norm: str,
                eps: float, defense: str) -> int:
    """A seed in ``[0, 2**31)`` for one attack run; equal inputs give equal seeds in every
    process. ``eps`` enters rounded to 6 significant digits (0.3 and 0.30000000000000004
    agree)."""
    return apgd_lib.derive_seed(int(base_seed), attack, loss or "-", threat_model, norm,
                                f"{float(eps):.6g}", defense)
