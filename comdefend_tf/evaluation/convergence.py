"""Convergence of the attack at the headline eps: robust accuracy against the attack's budget on
the same examples, and whether it plateaued.

Three ladders vary one budget each from the protocol's own setting (the others held there):
APGD steps (e.g. 50/100/200), EOT draws (e.g. 1/5/20; only on a randomized defense) and
restarts (e.g. 1/3). Each rung is an attack run on the same examples, verified like the
cascade (``scoring.significantly_failing`` on fresh draws). A ladder has **plateaued** when its
last rung changed the strict verdict of fewer than ``share`` of the examples (the default 1%:
on fewer than 100 examples, of none); the verdict is plateaued only if every ladder has.
"""

from __future__ import annotations

import numpy as np

LADDERS = ("steps", "eot", "restarts")


def rungs(protocol, randomized: bool) -> dict:
    """``{ladder: [(steps, eot, restarts), ...]}`` in increasing budget; ladders with fewer than
    one rung are left out (``eot`` on a deterministic defense)."""
    steps, eot, restarts = protocol.steps, protocol.eot_samples if randomized else 1, \
        protocol.restarts
    ladders = {"steps": [(int(s), eot, restarts) for s in sorted(set(protocol.ablation_steps))],
               "eot": ([(steps, int(k), restarts) for k in sorted(set(protocol.ablation_eot))]
                       if randomized else []),
               "restarts": [(steps, eot, int(r))
                            for r in sorted(set(protocol.ablation_restarts))]}
    return {name: values for name, values in ladders.items() if values}


def verdict(ladders: dict, robust: dict, share: float) -> dict:
    """The plateau verdict.

    Args:
      ladders: as ``rungs`` returns. robust: ``{(steps, eot, restarts): bool [n]}``, the
        strict verdict per example of each rung (same examples everywhere).
      share: the largest share of examples the last rung may change and still plateau.

    Returns:
      ``{"ladders": {name: {"rungs": [...], "robust_acc": [...], "last_changed": int,
      "plateaued": bool}}, "plateaued": bool}`` (``last_changed``: examples whose verdict the
      last rung changed; None and ``plateaued`` False for a one-rung ladder, which shows
      nothing).
    """
    result = {}
    for name, settings in ladders.items():
        accuracies = [float(np.mean(robust[setting])) for setting in settings]
        if len(settings) < 2:
            result[name] = {"rungs": [list(s) for s in settings], "robust_acc": accuracies,
                            "last_changed": None, "plateaued": False}
            continue
        last, before = robust[settings[-1]], robust[settings[-2]]
        changed = int(np.sum(last != before))
        result[name] = {"rungs": [list(s) for s in settings], "robust_acc": accuracies,
                        "last_changed": changed, "plateaued": changed < share * len(last)}
    return {"ladders": result,
            "plateaued": bool(result) and all(v["plateaued"] for v in result.values())}


def _percent(value) -> str:
    return f"{100 * value:.1f}"


def markdown_lines(verdict: dict | None) -> list[str]:
    """The convergence verdict as Markdown lines (empty without one)."""
    if not verdict:
        return []
    lines = [f"**Verdict: {'plateaued' if verdict['plateaued'] else 'NOT shown to plateau'}** "
             "(plateaued: the last rung of every ladder changed the strict verdict of fewer "
             "than 1% of the examples).", ""]
    for name, ladder in verdict["ladders"].items():
        values = [rung[LADDERS.index(name)] for rung in ladder["rungs"]]
        accuracy = ", ".join(f"{v}: {_percent(a)}" for v, a in zip(values, ladder["robust_acc"]))
        changed = ("-" if ladder["last_changed"] is None
                   else f"{ladder['last_changed']} example(s)")
        lines.append(f"- {name}: strict robust accuracy {accuracy}; last rung changed "
                     f"{changed}: {'plateaued' if ladder['plateaued'] else 'not plateaued'}")
    return lines + [""]
