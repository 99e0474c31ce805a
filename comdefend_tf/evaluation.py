"""Threat models, scoring, tables and figures of the attack evaluation.

A threat model decides which callable an attack differentiates; nothing else changes:

* ``oblivious`` (the paper's setting, "gray-box"): the attack sees the classifier alone,
  ``model_fn = classifier``; its adversarial images are then defended and classified. The same
  adversarial images serve every defense.
* ``adaptive``: the attack sees the whole pipeline, ``model_fn = classifier(defense(x))``,
  differentiated with the defense's straight-through gradient (BPDA: ComDefend's binarizer,
  JPEG, bit depth) or real gradient (median). When the defense is randomized (ComDefend with
  inference noise > 0) the attack differentiates ``expectation_over_transformation(model_fn,
  K)``, the logits averaged over K noise draws (EOT). The adaptive attacker knows the
  pipeline, so per example it keeps the oblivious image where only that one fools the
  defended classifier: the adaptive row is never weaker than the oblivious one (for a
  deterministic defense). Straight-through gradients can be worse guides than the plain
  classifier's (the oblivious images sometimes transfer better), so each adaptive row also
  records ``gradient_only_accuracy`` (the gradient attack alone) and ``oblivious_kept``.

Against the undefended classifier both are the same attack; those rows carry the threat model
``n/a``.

Scoring (``evaluate``): every row is computed on the SAME images and labels. A row holds
``attack``, ``eps`` (None for the minimum-norm C&W), ``steps``, ``threat_model``, ``defense``,
``clean_accuracy`` (of the defended classifier on the clean images; the undefended value for
``none``), ``accuracy_under_attack`` (defended classifier on the adversarial images),
``undefended_success_rate`` (share of the images the undefended classifier gets right when
clean that it gets wrong on this row's adversarial images), ``mean_l2`` and ``mean_linf`` (mean
over images of the perturbation norms, pixel scale [0, 1]), ``eot_samples``, ``num_examples``
and ``seconds``. Accuracies are fractions in [0, 1]; a randomized defense is scored with one
noise draw per image.

Outputs: ``write_results`` (``results.json``, ``results.md``), ``plot_accuracy_vs_eps`` and
``plot_purification_grid`` (PNG, matplotlib's Agg backend).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from comdefend_tf import attacks as attacks_lib
from comdefend_tf import defenses as defenses_lib
from comdefend_tf.files import write_json_atomic

THREAT_MODELS = ("oblivious", "adaptive")
UNDEFENDED = "none"
NO_THREAT_MODEL = "n/a"
TABLE_COLUMNS = (
    ("attack", "attack"), ("eps", "eps"), ("steps", "steps"),
    ("threat_model", "threat model"), ("defense", "defense"),
    ("clean_accuracy", "clean accuracy"), ("accuracy_under_attack", "accuracy under attack"),
    ("undefended_success_rate", "undefended attack success rate"),
    ("mean_l2", "mean L2"), ("mean_linf", "mean Linf"),
)
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
ACCURACY_PLOT = "accuracy_vs_eps.png"
GRID_PLOT = "purification_grid.png"


# ------------------------------------------------------------------------------ callables
def classifier_fn(classifier):
    """The undefended model_fn: images ``[B, H, W, C]`` in [0, 1] -> logits (a tf.function)."""
    return tf.function(lambda images: classifier(images, training=False), reduce_retracing=True)


def pipeline_fn(classifier, defense):
    """``classifier(defense(images))`` as a tf.function; a randomized defense draws fresh noise
    at each call."""
    return tf.function(lambda images: classifier(defense(images), training=False),
                       reduce_retracing=True)


def attack_model_fn(threat_model: str, classifier, defense, eot_samples: int = 1):
    """The callable an attack differentiates under ``threat_model``.

    Returns ``(model_fn, eot_samples_used)``: for ``oblivious`` the classifier (EOT 1); for
    ``adaptive`` the pipeline, wrapped in logit-averaging EOT over ``eot_samples`` draws when
    ``defense`` is randomized (otherwise EOT 1: every draw would be identical).
    """
    if threat_model == "oblivious":
        return classifier_fn(classifier), 1
    if threat_model == "adaptive":
        samples = eot_samples if defenses_lib.is_randomized(defense) else 1
        return attacks_lib.expectation_over_transformation(
            pipeline_fn(classifier, defense), samples), samples
    raise ValueError(f"unknown threat model {threat_model!r}; choose from "
                     f"{', '.join(THREAT_MODELS)}")


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


# ------------------------------------------------------------------------------- evaluate
@dataclasses.dataclass
class Evaluation:
    """What ``evaluate`` returns.

    Attributes:
      rows: one dict per (attack, eps, threat model, defense), keys as in the module docstring.
      clean_accuracy: defense name -> accuracy on the clean images.
      settings: the attacks, eps values, steps, EOT samples and image count used.
      examples: ``{"images", "labels", "adversarial", "attack", "eps"}`` numpy arrays of the
        oblivious adversarial images of the first bounded attack at its largest eps (for
        ``plot_purification_grid``), or None when no bounded attack ran.
    """

    rows: list
    clean_accuracy: dict
    settings: dict
    examples: dict | None = None


def evaluate(classifier, defenses: dict, images: np.ndarray, labels: np.ndarray,
             attack_names, eps_values, threat_models=THREAT_MODELS, steps: dict | None = None,
             eot_samples: int = 1, batch_size: int = 128, attack_options: dict | None = None,
             progress: bool = True) -> Evaluation:
    """Attacks ``classifier`` behind each defense and scores every row on the same images.

    Args:
      classifier: images float32 ``[B, H, W, C]`` in [0, 1] -> logits.
      defenses: name -> defense layer (``comdefend_tf.defenses.make_defense``); ``none`` is
        added when missing (it is the undefended reference).
      images: float32 ``[n, H, W, C]`` in [0, 1]; labels: int ``[n]``.
      attack_names: registered attack names (``comdefend_tf.attacks.ATTACK_NAMES``).
      eps_values: L-inf budgets in [0, 1]; minimum-norm attacks run once, eps None.
      threat_models: a subset of ``THREAT_MODELS``.
      steps: attack name -> iterations (registry defaults otherwise).
      eot_samples: noise draws averaged by adaptive attacks on randomized defenses.
      batch_size: images per attack batch.
      attack_options: attack name -> extra keyword arguments (e.g. ``{"spsa":
        {"spsa_samples": 32}}``).
      progress: show tqdm bars.

    Raises:
      ValueError: unknown attack, threat model or defense setting, eps outside [0, 1], or
        images/labels that do not match.
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
    for threat_model in threat_models:
        if threat_model not in THREAT_MODELS:
            raise ValueError(f"unknown threat model {threat_model!r}; choose from "
                             f"{', '.join(THREAT_MODELS)}")
    steps = {spec.name: int((steps or {}).get(spec.name) or spec.default_steps)
             for spec in specs}
    attack_options = attack_options or {}
    defenses = dict(defenses)
    defenses.setdefault(UNDEFENDED, defenses_lib.NoDefense(name=UNDEFENDED))
    defense_names = [UNDEFENDED] + [name for name in defenses if name != UNDEFENDED]

    undefended_fn = classifier_fn(classifier)
    defended_fns = {name: undefended_fn if name == UNDEFENDED
                    else pipeline_fn(classifier, defenses[name]) for name in defense_names}
    clean_predictions = {name: predict(fn, images) for name, fn in defended_fns.items()}
    clean_accuracy = {name: float(np.mean(predictions == labels))
                      for name, predictions in clean_predictions.items()}
    undefended_correct = clean_predictions[UNDEFENDED] == labels

    jobs = []
    for spec in specs:
        for eps in (eps_values if spec.bounded else [None]):
            jobs.append((spec, eps))
    rows, examples = [], None
    # Minimum-norm searches that are only projected onto the eps ball (DeepFool) run once per
    # (attack, attacked callable); each eps projects the cached result.
    unprojected = {}
    for spec, eps in tqdm(jobs, desc="attacks", unit="attack", disable=not progress):

        def run(model_fn, defense_name=UNDEFENDED):
            if not spec.eps_independent:
                return attacks_lib.run_attack(spec.name, model_fn, images, eps, y=labels,
                                              steps=steps[spec.name], batch_size=batch_size,
                                              progress=progress,
                                              **attack_options.get(spec.name, {}))
            key = (spec.name, defense_name)
            if key not in unprojected:
                unprojected[key] = attacks_lib.run_attack(
                    spec.name, model_fn, images, None, y=labels, steps=steps[spec.name],
                    batch_size=batch_size, progress=progress,
                    **attack_options.get(spec.name, {}))
            return attacks_lib.project_linf(images, unprojected[key], eps)

        def score(defense_name, threat_model, adversarial, eot_used, seconds, extra=None):
            defended = predict(defended_fns[defense_name], adversarial)
            undefended = (defended if defense_name == UNDEFENDED
                          else predict(undefended_fn, adversarial))
            fooled = undefended_correct & (undefended != labels)
            mean_l2, mean_linf = perturbation_norms(images, adversarial)
            rows.append({
                "attack": spec.name, "eps": eps, "steps": steps[spec.name],
                "threat_model": threat_model, "defense": defense_name,
                "defense_label": defenses_lib.describe_defense(defense_name,
                                                               defenses[defense_name]),
                "clean_accuracy": clean_accuracy[defense_name],
                "accuracy_under_attack": float(np.mean(defended == labels)),
                "undefended_success_rate": float(np.sum(fooled) / max(np.sum(undefended_correct),
                                                                      1)),
                "mean_l2": mean_l2, "mean_linf": mean_linf, "norm": spec.norm,
                "eot_samples": eot_used, "num_examples": int(len(images)),
                "seconds": seconds, "library": spec.library, **(extra or {}),
            })

        start = time.perf_counter()
        oblivious = run(undefended_fn)
        oblivious_seconds = time.perf_counter() - start
        score(UNDEFENDED, NO_THREAT_MODEL, oblivious, 1, oblivious_seconds)
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
                model_fn, eot_used = attack_model_fn(threat_model, classifier,
                                                     defenses[defense_name], eot_samples)
                start = time.perf_counter()
                adversarial, extra = _best_of(defended_fns[defense_name],
                                              run(model_fn, defense_name), oblivious, labels)
                score(defense_name, threat_model, adversarial, eot_used,
                      time.perf_counter() - start, extra)
    settings = {"attacks": [spec.name for spec in specs], "eps": eps_values,
                "threat_models": list(threat_models), "defenses": defense_names,
                "steps": steps, "eot_samples": int(eot_samples),
                "eot_form": attacks_lib.EOT_FORM, "num_examples": int(len(images)),
                "batch_size": batch_size, "attack_options": attack_options,
                "step_size_rule": "eps_iter = 2.5 * eps / steps (BIM, PGD, MIM)"}
    return Evaluation(rows, clean_accuracy, settings, examples)


def _best_of(defended_fn, gradient_adversarial, oblivious_adversarial, labels):
    """The adaptive attacker's final images: per example, its own (gradient) adversarial image,
    or the oblivious one where only the latter fools the defended pipeline (a white-box
    attacker can run the pipeline and keep its best candidate). Returns ``(images, extra)``,
    ``extra`` holding ``gradient_only_accuracy`` (the gradient attack's own accuracy, same
    draw) and ``oblivious_kept`` (how many examples took the oblivious image)."""
    gradient_correct = predict(defended_fn, gradient_adversarial) == labels
    oblivious_correct = predict(defended_fn, oblivious_adversarial) == labels
    keep_oblivious = gradient_correct & ~oblivious_correct
    chosen = np.where(keep_oblivious[:, None, None, None], oblivious_adversarial,
                      gradient_adversarial)
    return chosen, {"gradient_only_accuracy": float(np.mean(gradient_correct)),
                    "oblivious_kept": int(np.sum(keep_oblivious))}


# --------------------------------------------------------------------------------- tables
def _format_cell(key, value):
    if value is None:
        return "min-norm" if key == "eps" else "-"
    if key in ("clean_accuracy", "accuracy_under_attack", "undefended_success_rate"):
        return f"{100 * value:.1f} %"
    if key in ("mean_l2", "mean_linf"):
        return f"{value:.3f}"
    if key == "eps":
        return f"{value:g}"
    return str(value)


def format_table(rows) -> str:
    """A Markdown table of ``rows`` with the columns of ``TABLE_COLUMNS`` (accuracies in %)."""
    header = "| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for key, _ in TABLE_COLUMNS:
            value = row.get("defense_label", row["defense"]) if key == "defense" else row[key]
            cells.append(_format_cell(key, value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(evaluation: Evaluation, output_dir: str, metadata: dict | None = None) -> dict:
    """Writes ``results.json`` (rows, clean accuracies, settings, ``metadata``) and
    ``results.md`` (the table and the settings) into ``output_dir``, each atomically.
    Returns ``{"json": path, "markdown": path}``."""
    os.makedirs(output_dir, exist_ok=True)
    payload = {"rows": evaluation.rows, "clean_accuracy": evaluation.clean_accuracy,
               "settings": evaluation.settings, "metadata": metadata or {}}
    json_path = os.path.join(output_dir, RESULTS_JSON)
    write_json_atomic(json_path, payload)
    settings = evaluation.settings
    clean = ", ".join(f"{name} {100 * value:.1f} %"
                      for name, value in evaluation.clean_accuracy.items())
    notes = [
        "# Robustness table",
        "",
        f"{settings['num_examples']} held-out images, the same images in every row. "
        f"Clean accuracy: {clean}.",
        "",
        format_table(evaluation.rows),
        "",
        "- oblivious: adversarial images made against the classifier alone, then defended "
        "(the paper's setting). adaptive: the attack differentiates classifier(defense(x)) "
        "with straight-through (BPDA) gradients; randomized defenses add EOT "
        f"({settings['eot_form']}; K = {settings['eot_samples']}), and keeps per example the "
        "oblivious image where only that one fools the defense (results.json: "
        "gradient_only_accuracy, oblivious_kept). n/a: undefended classifier.",
        "- undefended attack success rate: share of the images the undefended classifier gets "
        "right when clean that it gets wrong on the row's adversarial images.",
        "- eps: L-inf budget on [0, 1] pixels; min-norm: C&W-L2, unbounded, reported by its "
        f"mean L2. Step sizes: {settings['step_size_rule']}.",
        "",
    ]
    for key, value in (metadata or {}).items():
        notes.append(f"- {key}: {value}")
    markdown_path = os.path.join(output_dir, RESULTS_MD)
    partial = markdown_path + ".partial"
    with open(partial, "w") as handle:
        handle.write("\n".join(notes) + "\n")
    os.replace(partial, markdown_path)
    return {"json": json_path, "markdown": markdown_path}


# -------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_eps(evaluation: Evaluation, path: str) -> str:
    """One panel per bounded attack: accuracy under attack (%) against eps, one line per
    (defense, threat model), eps 0 being the clean accuracy. Writes a PNG at ``path``."""
    plt = _pyplot()
    bounded = [name for name in evaluation.settings["attacks"]
               if attacks_lib.get_attack(name).bounded]
    panels = bounded or evaluation.settings["attacks"][:1]
    figure, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 3.6),
                                squeeze=False)
    for axis, attack in zip(axes[0], panels):
        rows = [row for row in evaluation.rows
                if row["attack"] == attack and row["eps"] is not None]
        series = {}
        for row in rows:
            key = (row.get("defense_label", row["defense"]), row["threat_model"], row["defense"])
            series.setdefault(key, []).append((row["eps"], row["accuracy_under_attack"]))
        defense_order = list(evaluation.clean_accuracy)
        for (label, threat_model, defense), points in series.items():
            points = [(0.0, evaluation.clean_accuracy[defense])] + sorted(points)
            eps, accuracy = zip(*points)
            # One colour per defense; solid oblivious, dashed adaptive.
            style = "--" if threat_model == "adaptive" else "-"
            name = label if threat_model == NO_THREAT_MODEL else f"{label}, {threat_model}"
            colour = f"C{defense_order.index(defense) % 10}"
            axis.plot(eps, [100 * value for value in accuracy], style, color=colour,
                      marker="o" if threat_model != "adaptive" else "s", label=name)
        axis.set_title(attack)
        axis.set_xlabel("eps (L-inf, pixels in [0, 1])")
        axis.set_ylabel("accuracy (%)")
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return path


def plot_purification_grid(path: str, images: np.ndarray, adversarial: np.ndarray,
                           classifier, purifier=None, defense=None, title: str = "",
                           count: int = 4) -> str:
    """The paper's Figure 3 layout for ``count`` examples: clean | adversarial | code bits
    (mean over code channels, when ``purifier`` is a ComDefend) | purified.

    ``images``/``adversarial``: float32 ``[n, H, W, C]`` in [0, 1]. Without a purifier the last
    column shows ``defense(adversarial)`` (or the adversarial image again when None). Each
    panel is titled with the classifier's prediction. Writes a PNG at ``path``.
    """
    plt = _pyplot()
    count = min(count, len(images))
    clean, attacked = images[:count], adversarial[:count]
    columns = [("clean", clean), (title or "adversarial", attacked)]
    if purifier is not None:
        code_bits = np.asarray(purifier.code_bits(attacked))
        columns.append(("code bits (mean)", np.mean(code_bits, axis=-1, keepdims=True)))
        columns.append(("purified", np.asarray(purifier(attacked))))
    elif defense is not None:
        columns.append(("defended", np.asarray(defense(attacked))))
    figure, axes = plt.subplots(count, len(columns), figsize=(2.1 * len(columns), 2.1 * count),
                                squeeze=False)
    for column, (name, panel_images) in enumerate(columns):
        predictions = None
        if panel_images.shape[-1] == images.shape[-1] and name != "code bits (mean)":
            predictions = np.argmax(np.asarray(classifier(panel_images, training=False)), -1)
        for row in range(count):
            axis = axes[row][column]
            image = np.clip(panel_images[row], 0.0, 1.0)
            if image.shape[-1] == 1:
                axis.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
            else:
                axis.imshow(image)
            label = name if row == 0 else ""
            if predictions is not None:
                label = f"{label}\npred {predictions[row]}" if label else f"pred {predictions[row]}"
            axis.set_title(label, fontsize=8)
            axis.axis("off")
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return path


def _save_figure(figure, path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = os.path.join(directory, ".partial." + os.path.basename(path))
    figure.savefig(partial, dpi=110, format="png")
    os.replace(partial, path)
