"""The evaluation package: two protocols over one vocabulary, one scorer, one report writer.

==================  =====================================================================
module              idea
==================  =====================================================================
``threat_models``   the one vocabulary: what an attack differentiates, per protocol
``baselines``       baseline input defenses (JPEG, bit depth, median) with the purifier's face
``scoring``         K draws per example; mean / majority / strict; Wilson; worst case
``seeds``           one stable seed per (attack, loss, threat model, norm, eps, defense)
``checks``          adversarial sets inside their eps ball; a real second classifier
``cpu_time``        CPU-seconds of the process (the cost the reports quote)
``paper``           the paper protocol: cleverhans/foolbox attacks, one table (train.evaluate)
``cascade``         the adaptive protocol's attacks per defense and eps, in cascade order
``adaptive``        the adaptive protocol: runs and scores the cascade, worst case
                    (train.robustness_report)
``modes``           ComDefend at test time and at training and test time, both protocols
``figure4``         the paper's Figure 4 layout of the two modes
``report``          Markdown, JSON and PNG figures of both protocols
==================  =====================================================================
"""

from comdefend_tf.evaluation.threat_models import (THREAT_MODELS, classifier_fn,
                                                   pipeline_fn)

__all__ = ["THREAT_MODELS", "classifier_fn", "pipeline_fn"]
