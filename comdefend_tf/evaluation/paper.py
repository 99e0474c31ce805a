"""The paper protocol (``train/evaluate.py``): the paper's attacks (FGSM, BIM, PGD, MIM,
C&W-L2, SPSA, DeepFool) against the classifier with and without each defense, one table.

Threat models (``threat_models``): ``oblivious`` (the paper's: the attack sees the classifier;
its images then go through each defense; the same images serve every defense), ``bpda_eot``
(the attack differentiates ``classifier(defense(x))`` through the defense's own
straight-through gradient; formerly ``adaptive``) and ``bpda_identity`` (the whole defense is
the identity backward). On a randomized defense the gradient threat models attack
``expectation_over_transformation(model_fn, K)``: the logits averaged over K noise draws.
Against the undefended classifier every threat model is the same attack: those rows carry
the threat model ``white_box``.

A gradient attacker can run the pipeline, so per example it keeps the oblivious image where
only that one fools the defended classifier: a gradient row is never weaker than the
oblivious one (on a deterministic defense); ``gradient_only_accuracy`` and ``oblivious_kept``
say how much came from where.

Scoring (``scoring``): every row is computed on the SAME images and labels, each adversarial
set checked inside its eps ball first (``checks.check_adversarial``), and classified K times
on a randomized defense (``draws``). A row holds ``attack``, ``eps`` (None for the
minimum-norm C&W), ``steps``, ``threat_model``, ``defense``, ``clean_accuracy`` (of that
defense on the clean images, mean over draws), ``accuracy_under_attack`` (mean over draws),
``accuracy_strict`` (right in every draw) with its 95% Wilson interval (``ci_low``,
``ci_high``), ``undefended_success_rate`` (share of the images the undefended classifier gets
right when clean that it gets wrong on this row's adversarial images), ``mean_l2`` and
``mean_linf`` (mean perturbation norms on [0, 1] pixels), ``eot_samples``, ``draws``,
``num_examples`` and ``seconds``.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from comdefend_tf import attacks as attacks_lib
from comdefend_tf.evaluation import baselines
from comdefend_tf.evaluation import checks, scoring
from comdefend_tf.evaluation import threat_models as threat_models_lib

THREAT_MODELS = threat_models_lib.PAPER_PROTOCOL
DEFAULT_THREAT_MODELS = ("oblivious", "bpda_eot")
UNDEFENDED = "none"
UNDEFENDED_THREAT_MODEL = threat_models_lib.UNDEFENDED_THREAT_MODEL


def predict(model_fn, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Argmax predictions int64 ``[n]`` of ``model_fn`` on images float32 ``[n, H, W, C]``."""
    predictions = [np.argmax(np.asarray(model_fn(tf.constant(images[start:start + batch_size]))),
                             axis=-1) for start in range(0, len(images), batch_size)]
    return np.concatenate(predictions).astype(np.int64)


def perturbation_norms(clean: np.ndarray, adversarial: np.ndarray) -> tuple[float, float]:
    """Mean over images of the L2 and L-inf norms of ``adversarial - clean`` (both ``[n, H, W,
    C]`` in [0, 1]); returns ``(mean_l2, mean_linf)``."""
    difference = (np.asarray(adversarial, np.float64) - np.asarray(clean, np.float64))
    difference = difference.reshape(len(difference), -1)
    return (float(np.mean(np.linalg.norm(difference, axis=1))),
            float(np.mean(np.max(np.abs(difference), axis=1))))


def attack_model_fn(threat_model: str, classifier, defense, eot_samples: int = 1):
    """The model_fn a cleverhans-style attack differentiates under ``threat_model`` and the
    EOT samples it averages: ``(model_fn, eot_samples_used)``. Oblivious: the classifier
    (EOT 1); ``bpda_eot``/``bpda_identity`` (alias ``adaptive``): the pipeline, wrapped in
    logit-averaging EOT over ``eot_samples`` draws when ``defense`` is randomized."""
    name = threat_models_lib.resolve(threat_model)
    if name not in THREAT_MODELS:
        raise ValueError(f"threat model {name!r} is not one of the paper protocol's: "
                         f"{', '.join(THREAT_MODELS)}")
    attacked = threat_models_lib.build(name, classifier, defense)
    if name == "oblivious":
        return tf.function(attacked.model, reduce_retracing=True), 1
    samples = eot_samples if attacked.randomized else 1
    model_fn = tf.function(attacked.model, reduce_retracing=True)
    return attacks_lib.expectation_over_transformation(model_fn, samples), samples


@dataclasses.dataclass
class Evaluation:
    """What ``evaluate`` returns.

    Attributes:
      rows: one dict per (attack, eps, threat model, defense), keys as in the module docstring.
      clean_accuracy: defense name -> accuracy on the clean images (mean over draws).
      settings: the attacks, eps values, steps, EOT samples and image count used.
      examples: ``{"images", "labels", "adversarial", "attack", "eps"}`` numpy arrays of the
        oblivious adversarial images of the first bounded attack at its largest eps (for
        ``report.plot_purification_grid``), or None when no bounded attack ran.
    """

    rows: list
    clean_accuracy: dict
    settings: dict
    examples: dict | None = None


def evaluate(classifier, defenses: dict, images: np.ndarray, labels: np.ndarray,
             attack_names, eps_values, threat_models=DEFAULT_THREAT_MODELS,
             steps: dict | None = None, eot_samples: int = 1, batch_size: int = 128,
             attack_options: dict | None = None, progress: bool = True) -> Evaluation:
    """Attacks ``classifier`` behind each defense and scores every row on the same images.

    Args:
      classifier: images float32 ``[B, H, W, C]`` in [0, 1] -> logits.
      defenses: name -> defense layer (``comdefend_tf.evaluation.baselines.make_defense``); ``none`` is
        added when missing (it is the undefended reference).
      images: float32 ``[n, H, W, C]`` in [0, 1]; labels: int ``[n]``.
      attack_names: registered attack names (``comdefend_tf.attacks.ATTACK_NAMES``).
      eps_values: L-inf budgets in [0, 1]; minimum-norm attacks run once, eps None.
      threat_models: names from ``THREAT_MODELS`` (``adaptive`` is accepted, deprecated).
      steps: attack name -> iterations (registry defaults otherwise).
      eot_samples: K: noise draws averaged by gradient attacks on a randomized defense, and
        draws per example when scoring it.
      batch_size: images per attack batch.
      attack_options: attack name -> extra keyword arguments (e.g. ``{"spsa":
        {"spsa_samples": 32}}``).
      progress: show tqdm bars.

    Raises:
      ValueError: unknown attack, threat model or defense setting, eps outside [0, 1], images/
        labels that do not match, or an adversarial set outside its eps ball.
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int64)
    if images.ndim != 4 or labels.shape != (len(images),) or not len(images):
        raise ValueError(f"need images [n, H, W, C] and labels [n] with n > 0, got "
                         f"{images.shape} and {labels.shape}")
    specs = [attacks_lib.get_attack(name) for name in attack_names]
    eps_values = [float(eps) for eps in eps_values]
    for eps in eps_values:
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps must be in [0, 1] for images in [0, 1], got {eps}")
    threat_models = list(dict.fromkeys(threat_models_lib.resolve(name)
                                       for name in threat_models))
    for name in threat_models:
        if name not in THREAT_MODELS:
            raise ValueError(f"threat model {name!r} is not one of the paper protocol's: "
                             f"{', '.join(THREAT_MODELS)}")
    steps = {spec.name: int((steps or {}).get(spec.name) or spec.default_steps)
             for spec in specs}
    attack_options = attack_options or {}
    defenses = dict(defenses)
    defenses.setdefault(UNDEFENDED, baselines.NoDefense(name=UNDEFENDED))
    defense_names = [UNDEFENDED] + [name for name in defenses if name != UNDEFENDED]

    undefended_fn = threat_models_lib.classifier_fn(classifier)
    defended_fns = {name: undefended_fn if name == UNDEFENDED
                    else threat_models_lib.pipeline_fn(classifier, defenses[name])
                    for name in defense_names}
    draws = {name: eot_samples if baselines.is_randomized(defenses[name]) else 1
             for name in defense_names}

    def correct(name, adversarial):
        return scoring.correct_per_draw(defended_fns[name], adversarial, labels, draws[name],
                                        batch_size)

    clean_accuracy = {name: scoring.summarize(correct(name, images))["mean_acc"]
                      for name in defense_names}
    undefended_correct = predict(undefended_fn, images) == labels

    jobs = [(spec, eps) for spec in specs for eps in (eps_values if spec.bounded else [None])]
    rows, examples = [], None
    # Minimum-norm searches that are only projected onto the eps ball (DeepFool) run once per
    # (attack, attacked callable); each eps projects the cached result.
    unprojected = {}
    for spec, eps in tqdm(jobs, desc="attacks", unit="attack", disable=not progress):

        def run(model_fn, key):
            options = attack_options.get(spec.name, {})
            if not spec.eps_independent:
                return attacks_lib.run_attack(spec.name, model_fn, images, eps, y=labels,
                                              steps=steps[spec.name], batch_size=batch_size,
                                              progress=progress, **options)
            if key not in unprojected:
                unprojected[key] = attacks_lib.run_attack(
                    spec.name, model_fn, images, None, y=labels, steps=steps[spec.name],
                    batch_size=batch_size, progress=progress, **options)
            return attacks_lib.project_linf(images, unprojected[key], eps)

        def score(defense_name, threat_model, adversarial, eot_used, seconds, extra=None):
            checks.check_adversarial(images, adversarial, eps, spec.norm if spec.bounded
                                     else "l2")
            summary = scoring.summarize(correct(defense_name, adversarial))
            undefended = predict(undefended_fn, adversarial)
            fooled = undefended_correct & (undefended != labels)
            mean_l2, mean_linf = perturbation_norms(images, adversarial)
            rows.append({
                "attack": spec.name, "eps": eps, "steps": steps[spec.name],
                "threat_model": threat_model, "defense": defense_name,
                "defense_label": baselines.describe_defense(defense_name,
                                                               defenses[defense_name]),
                "clean_accuracy": clean_accuracy[defense_name],
                "accuracy_under_attack": summary["mean_acc"],
                "accuracy_strict": summary["strict_acc"], "ci_low": summary["ci_low"],
                "ci_high": summary["ci_high"],
                "undefended_success_rate": float(np.sum(fooled) / max(np.sum(undefended_correct),
                                                                      1)),
                "mean_l2": mean_l2, "mean_linf": mean_linf, "norm": spec.norm,
                "eot_samples": eot_used, "draws": summary["draws"],
                "num_examples": int(len(images)), "seconds": seconds,
                "library": spec.library, **(extra or {}),
            })

        start = time.perf_counter()
        oblivious = run(undefended_fn, (spec.name, UNDEFENDED))
        oblivious_seconds = time.perf_counter() - start
        score(UNDEFENDED, UNDEFENDED_THREAT_MODEL, oblivious, 1, oblivious_seconds)
        # The grid shows the first bounded attack in the list at its largest eps.
        if spec.bounded and (examples is None or (examples["attack"] == spec.name
                                                  and eps > examples["eps"])):
            examples = {"images": images, "labels": labels, "adversarial": oblivious,
                        "attack": spec.name, "eps": eps}
        for defense_name in defense_names[1:]:
            for threat_model in threat_models:
                if threat_model == "oblivious":
                    score(defense_name, threat_model, oblivious, 1, oblivious_seconds)
                    continue
                if not threat_models_lib.applies(threat_model, defense_name,
                                                 defenses[defense_name]):
                    continue
                model_fn, eot_used = attack_model_fn(threat_model, classifier,
                                                     defenses[defense_name], eot_samples)
                start = time.perf_counter()
                adversarial, extra = _best_of(defended_fns[defense_name],
                                              run(model_fn, (spec.name, defense_name,
                                                             threat_model)),
                                              oblivious, labels)
                score(defense_name, threat_model, adversarial, eot_used,
                      time.perf_counter() - start, extra)
    settings = {"attacks": [spec.name for spec in specs], "eps": eps_values,
                "threat_models": threat_models, "defenses": defense_names,
                "steps": steps, "eot_samples": int(eot_samples),
                "eot_form": attacks_lib.EOT_FORM, "num_examples": int(len(images)),
                "batch_size": batch_size, "attack_options": attack_options,
                "step_size_rule": "eps_iter = 2.5 * eps / steps (BIM, PGD, MIM)"}
    return Evaluation(rows, clean_accuracy, settings, examples)


def _best_of(defended_fn, gradient_adversarial, oblivious_adversarial, labels):
    """Per example the gradient attack's image, or the oblivious one where only the latter
    fools the defended pipeline (on one draw). Returns ``(images, extra)`` with
    ``gradient_only_accuracy`` and ``oblivious_kept``."""
    gradient_correct = predict(defended_fn, gradient_adversarial) == labels
    oblivious_correct = predict(defended_fn, oblivious_adversarial) == labels
    keep_oblivious = gradient_correct & ~oblivious_correct
    chosen = np.where(keep_oblivious[:, None, None, None], oblivious_adversarial,
                      gradient_adversarial)
    return chosen, {"gradient_only_accuracy": float(np.mean(gradient_correct)),
                    "oblivious_kept": int(np.sum(keep_oblivious))}
