"""Adversarial attacks for the evaluation: a registry of cleverhans-style functions
(``gradient_attacks``), the compatibility layer for cleverhans' C&W and SPSA
(``cleverhans_compat``), APGD and APGD-T (``apgd``; its per-step mathematics in
``apgd_steps``), Square (``square``) and the check every adversarial set passes before it is
scored (``constraints.check_adversarial``). See ``gradient_attacks`` for the shared face of
the registered attacks."""

from comdefend_tf.attacks.gradient_attacks import (ATTACK_NAMES, ATTACKS, EOT_FORM, AttackSpec,
                                                   expectation_over_transformation, get_attack,
                                                   project_linf, run_attack)

__all__ = ["ATTACK_NAMES", "ATTACKS", "EOT_FORM", "AttackSpec",
           "expectation_over_transformation", "get_attack", "project_linf", "run_attack"]
