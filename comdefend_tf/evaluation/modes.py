"""Defenses that are another classifier: the same protocol run again with that classifier, merged.

A **variant** (``Variant``) is a defense made of a different classifier behind one of the main
run's defenses (``behind``: ``comdefend`` or ``none``). Each variant's protocol runs once more
with its classifier in place of the original, on the same examples, with the same threat
models, seeds and second classifier (nothing in the protocols changes); its rows of ``behind``
are renamed to the variant's label and merged into one result:

* ``comdefend_train_test`` (the paper's **training and test time** mode, Figure 4): ComDefend
  in front of a classifier trained on purified images (``train_classifier --purifier_dir``);
  ``comdefend`` is the **test time** mode (the classifier trained on clean images).
* ``adv_training``: an adversarially trained classifier with no purifier
  (``train_classifier --adversarial``).
* ``comdefend_adv_training``: ComDefend in front of a classifier adversarially trained behind
  it (``--adversarial`` with ``--purifier_dir``).

Every variant row means what the main run's row of ``behind`` means with that classifier in
place of the original: ``oblivious`` attacks the variant's classifier alone, ``bpda_*``/
``soft_path``/``fixed_noise``/``gradient_free`` the whole pipeline with it, ``white_box`` (behind
``none``) the variant's classifier itself, ``transfer`` comes from the same second classifier.
Rows carry ``classifier`` (``original`` or the variant's ``classifier_label``). A variant's
``undefended_success`` is measured against its own classifier without a purifier; that
classifier's clean accuracy alone (behind ``comdefend``) is kept out of the tables and reported
in the settings (``variants``; ``modes`` keeps the training-and-test-time entry's old keys).
"""

from __future__ import annotations

import dataclasses

from comdefend_tf.evaluation import adaptive, paper, scoring, threat_models
from comdefend_tf.training import provenance

TEST_TIME = "comdefend"
TRAIN_TEST = "comdefend_train_test"
ADV_TRAINING = "adv_training"
ADV_PURIFIED = "comdefend_adv_training"
MODE_LABELS = {paper.UNDEFENDED: "undefended",
               TEST_TIME: "ComDefend at test time",
               TRAIN_TEST: "ComDefend at training and test time",
               ADV_TRAINING: "adversarial training",
               ADV_PURIFIED: "ComDefend + adversarial training",
               adaptive.LITERT: "ComDefend (LiteRT)"}
VARIANT_LABELS = (TRAIN_TEST, ADV_TRAINING, ADV_PURIFIED)
ORIGINAL, PURIFIED = "original", "purified"
ADVERSARIAL, ADVERSARIAL_PURIFIED = "adversarial", "adversarial_purified"
ADVERSARIAL_KEY = provenance.ADVERSARIAL_KEY
# Help of the binaries' flags naming a variant's classifier (train/evaluate.py and
# train/robustness_report.py define them).
FLAG_HELP = {
    "adv_classifier_dir": "An adversarially trained classifier (train_classifier "
                          "--adversarial=pgd|fgsm_rs): evaluated alone as the defense "
                          f"{ADV_TRAINING}, on the same examples and under the same protocol.",
    "adv_purified_classifier_dir": "A classifier adversarially trained behind --comdefend_dir "
                                   "(train_classifier --adversarial --purifier_dir): evaluated "
                                   f"behind ComDefend as the defense {ADV_PURIFIED}.",
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One defense made of ``classifier`` behind the main run's defense ``behind``.

    ``label``: its name in the tables; ``classifier_label``: the rows' ``classifier`` column;
    ``record``: its provenance (settings only: a purifier record or an adversarial record)."""

    label: str
    classifier: object
    behind: str
    classifier_label: str
    description: str
    record: dict | None = None


def train_test_variant(classifier, purifier_record: dict | None = None) -> Variant:
    """ComDefend at training and test time: the purifier before ``classifier``."""
    return Variant(TRAIN_TEST, classifier, TEST_TIME, PURIFIED,
                   "purifier + the classifier trained on purified images", purifier_record)


def adversarial_variant(classifier, record: dict | None, behind_purifier: bool) -> Variant:
    """``adv_training`` (``classifier`` alone) or ``comdefend_adv_training`` (ComDefend before
    it); ``record``: its adversarial-training record (None: it records none)."""
    if behind_purifier:
        return Variant(ADV_PURIFIED, classifier, TEST_TIME, ADVERSARIAL_PURIFIED,
                       "purifier + a classifier adversarially trained behind it", record)
    return Variant(ADV_TRAINING, classifier, paper.UNDEFENDED, ADVERSARIAL,
                   "an adversarially trained classifier, no purifier", record)


def load_variants(classifier_dir: str, purifier, comdefend_dir: str | None,
                  purified_classifier_dir: str | None = None,
                  adv_classifier_dir: str | None = None,
                  adv_purified_classifier_dir: str | None = None) -> tuple[list, list[str]]:
    """The variants the binaries' flags name, loaded, and the provenance problems of the whole
    evaluation (``provenance.evaluation_problems`` and ``adversarial_problems``), as
    ``(variants, warnings)``; order: training-and-test time, adversarial training, both.

    Raises:
      FileNotFoundError, ValueError: a classifier that cannot be loaded.
    """
    from comdefend_tf.training import classifier as classifiers

    mismatches, purified_record = provenance.evaluation_problems(
        classifier_dir, purifier, comdefend_dir, purified_classifier_dir)
    variants = ([train_test_variant(classifiers.load_classifier(purified_classifier_dir),
                                    purified_record)] if purified_classifier_dir else [])
    for path, behind in ((adv_classifier_dir, False), (adv_purified_classifier_dir, True)):
        if path:
            problems, record = adversarial_problems(path, behind, purifier, comdefend_dir)
            mismatches += problems
            variants.append(adversarial_variant(classifiers.load_classifier(path), record,
                                                behind))
    return variants, mismatches


def adversarial_problems(classifier_path: str, behind_purifier: bool, purifier=None,
                         purifier_path: str | None = None) -> tuple[list[str], dict | None]:
    """``(messages, record)`` of a classifier passed as adversarially trained: no adversarial
    record; trained behind a purifier but evaluated alone (or the reverse); behind another
    purifier than ``purifier`` (by weights fingerprint). Empty messages when all match."""
    flag = "--adv_purified_classifier_dir" if behind_purifier else "--adv_classifier_dir"
    record = provenance.adversarial_record(classifier_path)
    if record is None:
        return [f"{flag} {classifier_path} records no adversarial training (no "
                f"'{ADVERSARIAL_KEY}' in its {provenance.METRICS_FILENAME}): its rows are "
                "those of an ordinary classifier"], None
    trained_behind = bool(record.get("behind_purifier"))
    if trained_behind != behind_purifier:
        return [f"{flag} {classifier_path} was adversarially trained "
                f"{'behind' if trained_behind else 'without'} a purifier but is evaluated "
                f"{'behind' if behind_purifier else 'without'} one"], record
    if behind_purifier and purifier is not None:
        here = provenance.weights_fingerprint(purifier)
        if record.get("purifier_fingerprint") != here:
            return [f"{flag} {classifier_path} was adversarially trained behind the purifier "
                    f"{record.get('purifier_fingerprint')} but is composed with "
                    f"{purifier_path or 'the purifier'} ({here}), whose weights differ"], record
    return [], record


def _renamed(entries, variant: Variant):
    """The entries of ``variant.behind`` renamed to ``variant.label``, with its classifier."""
    renamed = []
    for entry in entries:
        if entry["defense"] != variant.behind:
            continue
        entry = dict(entry, defense=variant.label, classifier=variant.classifier_label)
        if "defense_label" in entry:
            # "comdefend(...)" -> "comdefend_train_test(...)": the defense's own description.
            entry["defense_label"] = entry["defense_label"].replace(variant.behind,
                                                                    variant.label, 1)
        renamed.append(entry)
    return renamed


def _insert(names: list, variant: Variant) -> list:
    """``names`` with ``variant.label`` after ``behind`` and the variants already after it."""
    names = list(names)
    position = names.index(variant.behind) + 1
    while position < len(names) and names[position] in VARIANT_LABELS:
        position += 1
    names.insert(position, variant.label)
    return names


def _variant_settings(variant: Variant, alone_accuracy) -> dict:
    return {"classifier": variant.classifier_label, "behind": variant.behind,
            "description": variant.description, "record": variant.record,
            "classifier_without_purifier": alone_accuracy}


def _with_modes(settings: dict, runs) -> dict:
    settings = dict(settings, variants={variant.label: _variant_settings(variant, alone)
                                        for variant, alone in runs})
    for variant, alone in runs:
        if variant.label == TRAIN_TEST:
            settings["modes"] = {TEST_TIME: "purifier + the classifier trained on clean images",
                                 TRAIN_TEST: variant.description,
                                 "purified_classifier_without_purifier": alone,
                                 "purified_classifier_trained_behind": variant.record}
    return settings


def _check_behind(variant: Variant, available, run_name: str):
    if variant.behind not in available:
        raise ValueError(f"the {run_name} evaluation has no {variant.behind!r} defense")


# ------------------------------------------------------------------------ paper protocol
def merge_paper_variants(main: paper.Evaluation, runs) -> paper.Evaluation:
    """One paper-protocol ``Evaluation``: every row of ``main`` and, per ``(variant,
    evaluation)`` of ``runs``, that evaluation's ``variant.behind`` rows renamed, ordered by
    attack, eps and defense; ``clean_accuracy`` gains each label.

    Raises:
      ValueError: a run lacks its ``behind`` defense, or was scored on other images.
    """
    rows = [dict(row, classifier=ORIGINAL) for row in main.rows]
    defenses = list(main.clean_accuracy)
    clean = dict(main.clean_accuracy)
    alone = []
    for variant, evaluation in runs:
        _check_behind(variant, main.clean_accuracy, "test_time")
        _check_behind(variant, evaluation.clean_accuracy, variant.label)
        if main.settings["num_examples"] != evaluation.settings["num_examples"]:
            raise ValueError("both modes must be scored on the same images")
        rows += _renamed(evaluation.rows, variant)
        defenses = _insert(defenses, variant)
        clean[variant.label] = evaluation.clean_accuracy[variant.behind]
        alone.append((variant, None if variant.behind == paper.UNDEFENDED
                      else evaluation.clean_accuracy[paper.UNDEFENDED]))
    attacks = main.settings["attacks"]
    eps_order = [None] + list(main.settings["eps"])
    rows.sort(key=lambda row: (attacks.index(row["attack"]), eps_order.index(row["eps"]),
                               defenses.index(row["defense"])))
    settings = _with_modes(dict(main.settings, defenses=defenses), alone)
    return paper.Evaluation(rows, {name: clean[name] for name in defenses}, settings,
                            main.examples)


def merge_paper(test_time: paper.Evaluation, train_test: paper.Evaluation,
                purifier_record: dict | None = None) -> paper.Evaluation:
    """Both ComDefend modes as one paper-protocol ``Evaluation`` (``merge_paper_variants``
    with the training-and-test-time variant)."""
    return merge_paper_variants(test_time, [(train_test_variant(None, purifier_record),
                                             train_test)])


def evaluate_paper_variants(classifier, variants, defenses: dict, images, labels,
                            attack_names, eps_values, **options) -> paper.Evaluation:
    """``paper.evaluate`` of ``classifier`` behind ``defenses``, then of each variant's
    classifier behind its ``behind`` defense alone, on the same images, merged."""
    for variant in variants:
        if variant.behind != paper.UNDEFENDED and variant.behind not in defenses:
            raise ValueError(f"{variant.label} needs the {variant.behind!r} defense")
    main = paper.evaluate(classifier, defenses, images, labels, attack_names, eps_values,
                          **options)
    if not variants:
        return main
    runs = [(variant, paper.evaluate(
        variant.classifier, {} if variant.behind == paper.UNDEFENDED
        else {variant.behind: defenses[variant.behind]}, images, labels, attack_names,
        eps_values, **options)) for variant in variants]
    return merge_paper_variants(main, runs)


def evaluate_paper_modes(classifier, purified_classifier, defenses: dict, images, labels,
                         attack_names, eps_values, purifier_record: dict | None = None,
                         **options) -> paper.Evaluation:
    """Both ComDefend modes on the same images (``evaluate_paper_variants``).

    Args:
      classifier: trained on clean images. purified_classifier: trained behind the purifier.
      defenses: as for ``paper.evaluate``; must hold ``comdefend``.
      purifier_record: what the purified classifier records of its purifier (settings only).
      options: the other ``paper.evaluate`` arguments (threat models, steps, EOT, ...).
    """
    if TEST_TIME not in defenses:
        raise ValueError(f"the training-and-test-time mode needs the {TEST_TIME!r} defense")
    return evaluate_paper_variants(classifier, [train_test_variant(purified_classifier,
                                                                   purifier_record)],
                                   defenses, images, labels, attack_names, eps_values,
                                   **options)


# --------------------------------------------------------------------- adaptive protocol
def merge_adaptive_variants(main: dict, runs) -> dict:
    """Adaptive-protocol results (``adaptive.Evaluation.results()``) as one: per ``(variant,
    results, alone_accuracy)`` of ``runs``, its rows, worst cases, masking checks and warnings,
    gradient checks and convergence curves of ``variant.behind`` renamed ``variant.label``;
    ``clean`` gains the label."""
    merged = dict(main)
    for key in ("rows", "worst_case", "masking"):
        merged[key] = [dict(entry, classifier=ORIGINAL) for entry in main[key]]
    merged["masking_warnings"] = list(main["masking_warnings"])
    merged["gradient_checks"] = list(main["gradient_checks"])
    merged["convergence"] = dict(main["convergence"])
    names = list(main["clean"])
    clean = dict(main["clean"])
    alone = []
    for variant, results, alone_accuracy in runs:
        _check_behind(variant, main["clean"], "test_time")
        _check_behind(variant, results["clean"], variant.label)
        if main["n"] != results["n"]:
            raise ValueError("both modes must be scored on the same examples")
        for key in ("rows", "worst_case", "masking"):
            merged[key] += _renamed(results[key], variant)
        prefix = f"{variant.behind} "
        merged["masking_warnings"] += [variant.label + " " + warning[len(prefix):]
                                       for warning in results["masking_warnings"]
                                       if warning.startswith(prefix)]
        suffix = f"/{variant.behind}"
        # Every APGD run of the variant's protocol attacked its classifier: keep each check.
        merged["gradient_checks"] += [dict(check, attack=(
            check["attack"][:-len(suffix)] if check["attack"].endswith(suffix)
            else check["attack"]) + f"/{variant.label}") for check in results["gradient_checks"]]
        merged["convergence"].update({f"{variant.label}, {key}": value
                                      for key, value in results["convergence"].items()})
        names = _insert(names, variant)
        clean[variant.label] = results["clean"][variant.behind]
        alone.append((variant, alone_accuracy))
    merged["gradient_checks_ok"] = all(check["ok"] for check in merged["gradient_checks"])
    merged["clean"] = {name: clean[name] for name in names}
    merged["settings"] = _with_modes(main["settings"], alone)
    return merged


def merge_adaptive(test_time: dict, train_test: dict,
                   purifier_record: dict | None = None) -> dict:
    """Both ComDefend modes' adaptive results as one (``merge_adaptive_variants``); the
    retrained classifier's accuracy alone is ``train_test["clean"]["none"]`` when there."""
    alone = train_test["clean"].get(paper.UNDEFENDED)
    return merge_adaptive_variants(test_time, [(train_test_variant(None, purifier_record),
                                                train_test,
                                                None if alone is None else alone["mean_acc"])])


def run_adaptive_variants(models: adaptive.Models, variants, images, labels,
                          protocol: adaptive.Protocol, progress=None,
                          main: dict | None = None) -> dict:
    """The adaptive protocol on ``models``, then on each variant's classifier behind its
    ``behind`` defense only, with the same threat models, seeds and second classifier, and
    without the ablation (which studies the attack, not the classifier), merged. A variant
    behind ComDefend has its classifier alone scored on the clean images (settings only).
    ``main``: the main run's results already made (``reusable_main_report``), not rerun."""
    for variant in variants:
        if variant.behind not in protocol.defenses:
            raise ValueError(f"{variant.label} needs the {variant.behind!r} defense")
    say = progress or (lambda description: None)
    if main is None:
        main = adaptive.Evaluation(models, images, labels, protocol).run(progress)
    runs = []
    for variant in variants:
        second = dataclasses.replace(models, classifier=variant.classifier, baselines={},
                                     extra={})
        second_protocol = dataclasses.replace(protocol, defenses=(variant.behind,),
                                              ablation_steps=(), ablation_eot=(),
                                              ablation_restarts=())
        results = adaptive.Evaluation(second, images, labels, second_protocol).run(
            lambda text, label=variant.label: say(f"[{label}] {text}"))
        alone = None
        if variant.behind != paper.UNDEFENDED:
            alone = scoring.summarize(scoring.correct_per_draw(
                threat_models.classifier_fn(variant.classifier), images, labels, 1,
                protocol.batch_size))["mean_acc"]
        runs.append((variant, results, alone))
    return merge_adaptive_variants(main, runs)


# What a reused main report must share with this run (its metadata), besides N and protocol.
MAIN_REPORT_MODELS = ("dataset", "classifier_dir", "comdefend_dir", "second_classifier_dir",
                      "inference_noise_std", "purifier_precision")
MAIN_REPORT_MAX_BYTES = 512 * 2**20


def reusable_main_report(path: str, protocol: adaptive.Protocol, n: int,
                         metadata: dict) -> dict:
    """The results of an earlier ``robustness_report.json`` (this protocol's main run, without
    variants) so that variants can be added without rerunning it: same N, the same protocol
    settings (``adaptive.settings_of``), and the same ``MAIN_REPORT_MODELS`` entries as
    ``metadata`` (directories compared by real path). Its ``metadata`` and CPU figures are left
    out; the caller records them. The examples are the first N of the held-out split, so N and
    the dataset fix them.

    Raises:
      ValueError: the file is unreadable, too large, not such a report, or differs (named).
    """
    import json
    import os

    from comdefend_tf.io import bounded

    try:
        payload = json.loads(bounded.read_regular_file(path, MAIN_REPORT_MAX_BYTES))
    except (OSError, ValueError) as error:
        raise ValueError(f"--main_report {path}: not a readable robustness report ({error})")
    if not isinstance(payload, dict) or not {"rows", "settings", "n", "metadata"} <= set(payload):
        raise ValueError(f"--main_report {path}: not a robustness_report.json")
    if "variants" in payload["settings"] or "modes" in payload["settings"]:
        raise ValueError(f"--main_report {path} already holds variants; give the report of a "
                         "run without them")
    if payload["n"] != n:
        raise ValueError(f"--main_report {path} scored N = {payload['n']} examples, this run "
                         f"N = {n}")
    expected = adaptive.settings_of(protocol)
    differing = sorted(key for key in set(expected) | set(payload["settings"])
                       if expected.get(key) != payload["settings"].get(key))
    if differing:
        raise ValueError(f"--main_report {path} ran another protocol: "
                         + ", ".join(f"{key} {payload['settings'].get(key)!r} there, "
                                     f"{expected.get(key)!r} here" for key in differing))
    same = lambda value: (os.path.realpath(value) if isinstance(value, str)
                          and os.path.exists(value) else value)
    for key in MAIN_REPORT_MODELS:
        if same(payload["metadata"].get(key)) != same(metadata.get(key)):
            raise ValueError(f"--main_report {path} has {key} {payload['metadata'].get(key)!r}, "
                             f"this run {metadata.get(key)!r}")
    results = {key: value for key, value in payload.items()
               if key not in ("metadata", "cpu_seconds", "cpu_seconds_per_example")}
    # The JSON's keys are sorted; the defenses' order is the protocol's.
    order = list(protocol.defenses)
    results["clean"] = dict(sorted(results["clean"].items(), key=lambda item: (
        order.index(item[0]) if item[0] in order else len(order))))
    return results


def run_adaptive_modes(models: adaptive.Models, purified_classifier, images, labels,
                       protocol: adaptive.Protocol, progress=None,
                       purifier_record: dict | None = None) -> dict:
    """Both ComDefend modes (``run_adaptive_variants`` with the training-and-test-time
    variant)."""
    if TEST_TIME not in protocol.defenses:
        raise ValueError(f"the training-and-test-time mode needs the {TEST_TIME!r} defense")
    return run_adaptive_variants(models, [train_test_variant(purified_classifier,
                                                             purifier_record)],
                                 images, labels, protocol, progress)


def describe_record(record: dict | None) -> str:
    """A variant's provenance in words (adversarial or purifier record)."""
    if not record:
        return "no provenance recorded"
    if "method" in record:
        text = (f"{record['method']} adversarial training, {record.get('norm')} eps "
                f"{record.get('eps')}, {record.get('steps')} steps of "
                f"{record.get('step_size')}, eps warm-up {record.get('eps_warmup_epochs')} "
                f"epochs, EOT {record.get('eot')}")
        if record.get("behind_purifier"):
            text += (f", behind the purifier {record.get('purifier_fingerprint')} (gradient "
                     f"{record.get('gradient')})")
        if record.get("train_cpu_seconds") is not None:
            text += f", {record['train_cpu_seconds']:.0f} training CPU-seconds"
        return text
    return f"trained behind the purifier {record.get('path')} ({record.get('fingerprint')})"


def markdown_lines(settings: dict) -> list[str]:
    """The robustness report's paragraph on the variants (empty without any)."""
    variants = settings.get("variants") or {}
    if not variants:
        return []
    lines = ["", "Defenses that are another classifier (the same protocol, examples, threat "
             "models and seeds with that classifier in place of the original: oblivious "
             "attacks it alone, bpda_* the whole pipeline with it, white_box the classifier "
             "itself; its `undefended_success` is measured on it without a purifier):"]
    for label, entry in variants.items():
        alone = entry.get("classifier_without_purifier")
        lines.append(f"- `{label}`: {entry['description']}; {describe_record(entry['record'])}"
                     + ("" if alone is None else
                        f"; clean accuracy without the purifier {100 * alone:.1f} %") + ".")
    return lines


def worst_case_lines(results: dict) -> list[str]:
    """One line per (norm, eps) of the adaptive results: every defense's strict worst case
    with its 95% interval, e.g. ``Strict worst case, linf eps=0.1 (N = 100): undefended 0.0 %
    [0.0, 3.7], ...`` (defenses in the order of ``results["clean"]``)."""
    order = list(results["clean"])
    radii = sorted({(row["norm"], row["eps"]) for row in results["worst_case"] if row["full"]})
    lines = []
    for norm, eps in radii:
        rows = sorted((row for row in results["worst_case"]
                       if (row["norm"], row["eps"]) == (norm, eps)),
                      key=lambda row: order.index(row["defense"]))
        lines.append(f"Strict worst case, {norm} eps={eps:g} (N = {results['n']}): " + ", ".join(
            f"{MODE_LABELS.get(row['defense'], row['defense'])} "
            f"{100 * row['robust_acc_strict']:.1f} % [{100 * row['ci_low']:.1f}, "
            f"{100 * row['ci_high']:.1f}]" for row in rows))
    return lines
