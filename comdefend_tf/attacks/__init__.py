"""Adversarial attacks for the evaluation: a registry of cleverhans-style functions
(``gradient_attacks``), the compatibility layer for cleverhans' C&W and SPSA
(``cleverhans_compat``), APGD and APGD-T (``apgd``; its per-step mathematics in
``apgd_steps``), Square (``square``) and the check every adversarial set passes before it is
scored (``constraints.check_adversarial``). See ``gradient_attacks`` for the shared face of
the registered attacks.

The registry's names are loaded on first use (PEP 562), so importing a submodule such as
``apgd_steps`` (adversarial training does, in the core install) does not import the registry
and with it cleverhans, which only the [eval] extra's users have."""

import importlib

__all__ = ["ATTACK_NAMES", "ATTACKS", "EOT_FORM", "AttackSpec",
           "expectation_over_transformation", "get_attack", "project_linf", "run_attack"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module("comdefend_tf.attacks.gradient_attacks"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
