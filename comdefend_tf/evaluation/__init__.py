"""The evaluation package: two protocols over one vocabulary, one scorer, one report writer.

==================  =====================================================================
module              idea
==================  =====================================================================
``threat_models``   what an attack differentiates (oblivious, bpda_eot, bpda_identity, ...)
``scoring``         K draws per example; mean / majority / strict; Wilson; worst case
``seeds``           one stable seed per (attack, loss, threat model, norm, eps, defense)
``checks``          adversarial sets inside their eps ball; a real second classifier
``cpu_time``        CPU-seconds of the process (the cost the reports quote)
``paper``           the paper protocol: cleverhans/foolbox attacks, one table (train.evaluate)
``adaptive``        the adaptive protocol: APGD-CE/-T/-DLR + Square, cascade, worst case
                    (train.robustness_report)
``report``          Markdown, JSON and PNG figures of both protocols
==================  =====================================================================
"""

from comdefend_tf.evaluation.threat_models import (THREAT_MODELS, classifier_fn,
                                                   pipeline_fn)

__all__ = ["THREAT_MODELS", "classifier_fn", "pipeline_fn"]
