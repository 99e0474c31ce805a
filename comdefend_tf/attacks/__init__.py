"""Adversarial attacks for the evaluation: a registry of cleverhans-style functions
(``gradient_attacks``) and the Keras 3 compatibility layer for cleverhans' C&W and SPSA
(``cleverhans_compat``). See ``gradient_attacks`` for the shared face of every attack."""

from comdefend_tf.attacks.gradient_attacks import (ATTACK_NAMES, ATTACKS, EOT_FORM, AttackSpec,
                                                   expectation_over_transformation, get_attack,
                                                   project_linf, run_attack)

__all__ = ["ATTACK_NAMES", "ATTACKS", "EOT_FORM", "AttackSpec",
           "expectation_over_transformation", "get_attack", "project_linf", "run_attack"]
