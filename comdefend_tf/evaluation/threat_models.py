"""The one vocabulary of threat models: what the attacker differentiates, per protocol.

A threat model decides which callable an attack sees; nothing else changes (cleverhans' lesson:
an attack takes any callable from images to logits). ``build`` returns that callable and says
in words what it differentiates:

============== ====================================================================
name           the attacked callable
============== ====================================================================
white_box      the undefended classifier (rows of the defense ``none``)
oblivious      the classifier alone; its images are then defended (the paper's setting)
bpda_eot       ``classifier(defense(x))`` with the deployed forward pass and the defense's
               own straight-through gradient (ComDefend: the binarizer's; JPEG, bit depth:
               identity; median: its real gradient); EOT over noise draws
bpda_identity  ``classifier(x + stop_gradient(defense(x) - x))``: the whole purifier is the
               identity in the backward pass (Athalye et al. 2018), EOT over noise draws
soft_path      ComDefend with ``sigmoid(noisy logits)`` in place of the threshold (the exact
               gradient of a smooth surrogate); the deployed (hard) pipeline judges what the
               attack keeps (``judge``) and scores it
bpda_smooth    ComDefend's hard bits forward, ``sigmoid(noisy logits / T)`` backward, one
               run per temperature T (trained logits sit far from 0, where the sigmoid at
               T = 1 passes gradient through few bits)
fixed_noise    ComDefend with each example's noise draw fixed and known to the attacker
transfer       a second, independently trained classifier
gradient_free  Square: forward passes of the deployed pipeline only
============== ====================================================================

``adaptive``, the paper protocol's former name of ``bpda_eot``, is accepted by ``resolve``
with a ``DeprecationWarning``.

Every surrogate's forward pass that decides what an attack keeps is the deployed one: the
straight-through ones (``bpda_*``) compute the deployed values forward; ``soft_path``, whose
forward pass is not, carries the deployed pipeline as its ``judge``. ``code_share`` measures
on how much of the code a surrogate's backward pass carries gradient (``CODE_SHARE_LEVEL``).

EOT comes in two forms, and each protocol says which it used: the adaptive protocol's APGD
averages the loss gradient over K draws per step (AutoAttack's form, ``eot_iter``); the paper
protocol's cleverhans attacks see ``expectation_over_transformation``, the logits averaged over
K draws.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import tensorflow as tf
from keras import ops

from comdefend_tf import bpda
from comdefend_tf.evaluation import baselines

# The vocabulary: every threat model of every protocol. Everything else (the protocols'
# lists, the binaries' flag choices and help) is derived from this tuple.
THREAT_MODELS = ("white_box", "oblivious", "bpda_eot", "bpda_identity", "soft_path",
                 "bpda_smooth", "fixed_noise", "transfer", "gradient_free")
DEPRECATED_ALIASES = {"adaptive": "bpda_eot"}
# The threat model of every row on the undefended classifier: assigned, never chosen.
UNDEFENDED_THREAT_MODEL = THREAT_MODELS[0]
# Threat models whose adversarial images do not depend on the defense: computed once per
# (attack, eps) and scored on every defense.
DEFENSE_INDEPENDENT = ("oblivious", "transfer")
# Threat models that need ComDefend's own forward options (code path, noise).
COMDEFEND_ONLY = ("soft_path", "bpda_smooth", "fixed_noise")
# Threat models run once per temperature of the smoothed binarizer.
TEMPERATURE_DEPENDENT = ("bpda_smooth",)
# A code element passes gradient when the surrogate's derivative there is at least this share
# of its peak (sigmoid(l / T): |l| <= about 6 T).
CODE_SHARE_LEVEL = 0.01
# Threat models that need more than the classifier and the defense: a second classifier.
NEEDS_SECOND_CLASSIFIER = ("transfer",)
# Threat models whose attack only queries the deployed pipeline (no gradient).
QUERY_ONLY = ("gradient_free",)
# Gradient attacks on the deployed pipeline itself (compared with the query-only attack by the
# adaptive protocol's masking check).
PIPELINE_GRADIENT = (UNDEFENDED_THREAT_MODEL, "bpda_eot", "bpda_identity")
# What each protocol lets a user choose. Adaptive (train/robustness_report.py): all of them.
# Paper (train/evaluate.py, cleverhans-style attacks on one callable): those that need
# neither ComDefend's forward options, nor a second classifier, nor a query-only attack.
ADAPTIVE_PROTOCOL = tuple(name for name in THREAT_MODELS if name != UNDEFENDED_THREAT_MODEL)
PAPER_PROTOCOL = tuple(name for name in ADAPTIVE_PROTOCOL
                       if name not in COMDEFEND_ONLY + NEEDS_SECOND_CLASSIFIER + QUERY_ONLY)
DIFFERENTIATES = {
    "white_box": "the undefended classifier",
    "oblivious": "the classifier alone (its images then go through the defense)",
    "bpda_eot": "classifier(defense(x)): deployed forward pass, the defense's own "
                "straight-through or real gradient backward, EOT over noise draws",
    "bpda_identity": "classifier(x + stop_gradient(defense(x) - x)): the whole defense is the "
                     "identity backward (BPDA, Athalye et al.), EOT over noise draws",
    "soft_path": "classifier(ComDefend with the soft code sigmoid(noisy logits)), EOT; the "
                 "deployed pipeline judges what is kept",
    "bpda_smooth": "classifier(defense(x)) with the hard bits forward and sigmoid(noisy "
                   "logits / T) backward, per temperature T, EOT",
    "fixed_noise": "classifier(ComDefend with each example's known noise draw)",
    "transfer": "a second, independently trained classifier",
    "gradient_free": "nothing: forward passes of the deployed pipeline only (Square)",
}


def resolve(name: str) -> str:
    """The canonical threat-model name; ``adaptive`` becomes ``bpda_eot`` with a
    ``DeprecationWarning``. Raises ValueError naming the known threat models."""
    if name in DEPRECATED_ALIASES:
        canonical = DEPRECATED_ALIASES[name]
        warnings.warn(f"threat model {name!r} is deprecated; it is {canonical!r} (the "
                      "straight-through binarizer surrogate)", DeprecationWarning, stacklevel=2)
        return canonical
    if name not in THREAT_MODELS:
        raise ValueError(f"unknown threat model {name!r}; choose from "
                         f"{', '.join(THREAT_MODELS)} (or the deprecated alias adaptive)")
    return name


@dataclasses.dataclass
class AttackedModel:
    """What an attack sees under a threat model.

    Attributes:
      threat_model: the canonical name.
      model: images float32 ``[B, H, W, C]`` in [0, 1] -> logits ``[B, classes]`` (for
        ``fixed_noise``: ``(images, example_index) -> logits``, see ``index_aware``).
      differentiates: what the attack's gradient (or query) goes through, in words.
      randomized: the callable draws fresh noise at each call (attacks need EOT).
      index_aware: ``model`` takes the examples' positions as a second argument.
      judge: the deployed forward pass (same signature as ``model``) where ``model``'s own
        forward pass is not deployed (``soft_path``): it decides what the attack keeps.
      code_share: ``images -> float``, the share of the code elements through which the
        backward pass carries gradient (None: no code surrogate, e.g. ``bpda_identity``).
      temperature: ``bpda_smooth``'s T.
    """

    threat_model: str
    model: Callable
    differentiates: str
    randomized: bool = False
    index_aware: bool = False
    judge: Callable | None = None
    code_share: Callable | None = None
    temperature: float | None = None


def logits_fn(classifier, defense=None, **forward_options) -> Callable:
    """``images -> classifier(defense(images))`` logits (the classifier alone without a
    defense); ``forward_options`` go to ``ComDefend.forward`` (``mode``, ``noise``)."""
    if defense is None:
        return lambda images: classifier(images, training=False)
    if forward_options:
        return lambda images: classifier(defense.forward(images, **forward_options)["purified"],
                                         training=False)
    return lambda images: classifier(defense(images), training=False)


def classifier_fn(classifier) -> Callable:
    """The undefended model as a tf.function: images ``[B, H, W, C]`` in [0, 1] -> logits."""
    return tf.function(logits_fn(classifier), reduce_retracing=True)


def pipeline_fn(classifier, defense) -> Callable:
    """``classifier(defense(images))`` as a tf.function; a randomized defense draws fresh noise
    at each call."""
    return tf.function(logits_fn(classifier, defense), reduce_retracing=True)


def fixed_noise_fn(classifier, purifier, noise) -> Callable:
    """``(images, example_index) -> logits`` of the pipeline with each example's own noise
    draw ``noise[example_index]`` (float ``[N, h, w, code_channels]``)."""
    noise = tf.constant(noise)

    def logits(images, index):
        draw = tf.gather(noise, index)
        return classifier(purifier.forward(images, noise=draw)["purified"], training=False)
    return logits


def smoothed_binarizer_fn(classifier, purifier, temperature: float) -> Callable:
    """``images -> logits`` of the deployed pipeline (hard bits, the inference noise) whose
    backward pass through the binarizer is ``sigmoid(noisy_logits / temperature)``'s
    (``bpda.smoothed_purify``)."""
    purify = bpda.smoothed_purify(purifier, temperature)
    return lambda images: classifier(purify(images), training=False)


def code_share_fn(purifier, temperature: float | None) -> Callable:
    """``images -> float``: the share of code elements (one draw of the noisy logits) where
    the surrogate's derivative is at least ``CODE_SHARE_LEVEL`` of its peak; ``temperature``
    None is the identity straight-through estimator (every element)."""
    def share(images):
        if temperature is None:
            return 1.0
        noisy = purifier.forward(images)["noisy_logits"]
        smooth = ops.sigmoid(ops.cast(noisy, "float32") / temperature)
        relative = 4.0 * smooth * (1.0 - smooth)  # sigmoid'(l / T) over its peak 1/4
        return float(ops.convert_to_numpy(ops.mean(ops.cast(relative >= CODE_SHARE_LEVEL,
                                                            "float32"))))
    return share


def _binarizer_temperature(purifier):
    """The deployed binarizer's straight-through gradient as a temperature (None: identity)."""
    return 1.0 if getattr(purifier.binarize, "gradient", "identity") == "sigmoid" else None


def variant_label(threat_model: str, temperature: float | None = None) -> str:
    """A threat model's name in reports and settings: ``bpda_smooth(T=5)`` with a
    temperature, the bare name without."""
    return threat_model if temperature is None else f"{threat_model}(T={temperature:g})"


def is_comdefend(defense) -> bool:
    """Whether ``defense`` is a ComDefend model (its forward options and binarizer exist)."""
    return hasattr(defense, "forward") and hasattr(defense, "binarize")


def applies(threat_model: str, defense_name: str, defense) -> bool:
    """Whether ``threat_model`` is a distinct attack on this defense: ``white_box`` only on the
    undefended classifier (with ``gradient_free`` and ``transfer``), the defense-dependent ones only on a real defense, ComDefend's
    forward options only on ComDefend (``fixed_noise`` only when it is randomized), and
    ``bpda_identity`` not where the defense's own backward pass already is the identity (JPEG,
    bit depth: the row would repeat ``bpda_eot``)."""
    undefended = defense is None or isinstance(defense, baselines.NoDefense)
    if threat_model == "white_box":
        return undefended
    if undefended:
        # On the undefended classifier oblivious and bpda_* are white_box itself.
        return threat_model in ("gradient_free", "transfer")
    if threat_model in COMDEFEND_ONLY and not is_comdefend(defense):
        return False  # e.g. a LiteRT purifier: its forward options are not ComDefend's
    if threat_model == "bpda_smooth":  # only where the deployed code is bits
        return defense.config.inference_mode == "hard"
    if threat_model == "fixed_noise":
        return baselines.is_randomized(defense)
    if threat_model == "bpda_identity":
        return not isinstance(defense, (baselines.JpegDefense,
                                        baselines.BitDepthReduction))
    return True


def build(threat_model: str, classifier, defense=None, second_classifier=None,
          fixed_noise=None, temperature: float | None = None) -> AttackedModel:
    """The callable an attack differentiates under ``threat_model`` (see the module table).

    Args:
      threat_model: a name from ``THREAT_MODELS`` (or the alias ``adaptive``).
      classifier: images -> logits. defense: a layer images -> images (None: undefended).
      second_classifier: the source model of ``transfer``.
      fixed_noise: ``fixed_noise``'s per-example draws, float ``[N, h, w, code_channels]``.
      temperature: ``bpda_smooth``'s T (> 0).

    Raises:
      ValueError: an unknown name, or what the threat model needs is missing.
    """
    name = resolve(threat_model)
    randomized = defense is not None and baselines.is_randomized(defense)
    describe = DIFFERENTIATES[name]
    if name in ("white_box", "oblivious"):
        return AttackedModel(name, logits_fn(classifier), describe)
    if name == "transfer":
        if second_classifier is None:
            raise ValueError("threat model transfer needs a second, independently trained "
                             "classifier")
        return AttackedModel(name, logits_fn(second_classifier), describe)
    if defense is None:
        raise ValueError(f"threat model {name} attacks a defense; none was given")
    comdefend = is_comdefend(defense)
    if name in ("bpda_eot", "gradient_free"):
        share = (code_share_fn(defense, _binarizer_temperature(defense))
                 if comdefend and name == "bpda_eot" else None)
        return AttackedModel(name, logits_fn(classifier, defense), describe, randomized,
                             code_share=share)
    if name == "bpda_identity":
        purify = bpda.identity_backward(defense)
        return AttackedModel(name, lambda images: classifier(purify(images), training=False),
                             describe, randomized)
    if not hasattr(defense, "forward"):
        raise ValueError(f"threat model {name} needs a ComDefend purifier, got "
                         f"{type(defense).__name__}")
    if name == "soft_path":
        return AttackedModel(name, logits_fn(classifier, defense, mode="soft"), describe,
                             randomized, judge=logits_fn(classifier, defense),
                             code_share=code_share_fn(defense, 1.0))
    if name == "bpda_smooth":
        if temperature is None:
            raise ValueError("threat model bpda_smooth needs a temperature")
        return AttackedModel(name, smoothed_binarizer_fn(classifier, defense, temperature),
                             describe, randomized, code_share=code_share_fn(defense, temperature),
                             temperature=float(temperature))
    if fixed_noise is None:
        raise ValueError("threat model fixed_noise needs the per-example noise draws")
    return AttackedModel(name, fixed_noise_fn(classifier, defense, fixed_noise), describe,
                         False, index_aware=True,
                         code_share=code_share_fn(defense, _binarizer_temperature(defense)))
