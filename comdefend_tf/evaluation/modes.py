"""ComDefend's two defense modes side by side (the paper's Figure 4), in both protocols.

* ``comdefend`` (**test time**): the purifier in front of the classifier trained on clean
  images.
* ``comdefend_train_test`` (**training and test time**): the same purifier in front of a
  classifier trained on purified images (``train_classifier --purifier_dir``).

Each protocol runs once per mode and the results are merged; nothing in the protocols changes.
The second run evaluates the retrained classifier behind the purifier under the same threat
models, so its rows mean what the first run's mean with that classifier in place of the
original: ``oblivious`` attacks the retrained classifier alone (the attacker knows the deployed
classifier, not the purifier), ``bpda_eot``/``bpda_identity``/``soft_path``/
``bpda_smooth``/``fixed_noise``/``gradient_free`` differentiate or query the whole pipeline with
the retrained classifier, ``transfer`` comes from the same second classifier. Its rows are
renamed to the defense ``comdefend_train_test`` and carry every column of the others, plus
``classifier`` (``original`` or ``purified``) on every row. The second run's
``undefended_success_rate`` / ``undefended_success`` is measured against the retrained
classifier without the purifier; its undefended reference (the retrained classifier alone, a
composition it was not trained for) is kept out of the tables and reported as
``purified_classifier_without_purifier`` in the settings.
"""

from __future__ import annotations

import dataclasses

from comdefend_tf.evaluation import adaptive, paper, scoring, threat_models

TEST_TIME = "comdefend"
TRAIN_TEST = "comdefend_train_test"
MODE_LABELS = {paper.UNDEFENDED: "undefended",
               TEST_TIME: "ComDefend at test time",
               TRAIN_TEST: "ComDefend at training and test time"}
ORIGINAL, PURIFIED = "original", "purified"


def _renamed(rows, classifier_label):
    renamed = []
    for row in rows:
        if row["defense"] != TEST_TIME:
            continue
        row = dict(row, defense=TRAIN_TEST, classifier=classifier_label)
        if "defense_label" in row:
            # "comdefend(...)" -> "comdefend_train_test(...)": the purifier's own description.
            row["defense_label"] = row["defense_label"].replace(TEST_TIME, TRAIN_TEST, 1)
        renamed.append(row)
    return renamed


def merge_paper(test_time: paper.Evaluation, train_test: paper.Evaluation,
                purifier_record: dict | None = None) -> paper.Evaluation:
    """One paper-protocol ``Evaluation`` with both modes: every row of ``test_time`` (the
    original classifier behind each defense) and the ``comdefend`` rows of ``train_test`` (the
    retrained classifier behind ComDefend) renamed ``comdefend_train_test``, ordered by attack,
    eps and defense. ``clean_accuracy`` gains ``comdefend_train_test``.

    Raises:
      ValueError: either evaluation lacks ComDefend rows, or they used other images.
    """
    for name, evaluation in (("test_time", test_time), ("train_test", train_test)):
        if TEST_TIME not in evaluation.clean_accuracy:
            raise ValueError(f"the {name} evaluation has no {TEST_TIME!r} defense")
    if test_time.settings["num_examples"] != train_test.settings["num_examples"]:
        raise ValueError("both modes must be scored on the same images")
    rows = [dict(row, classifier=ORIGINAL) for row in test_time.rows]
    rows += _renamed(train_test.rows, PURIFIED)
    defenses = list(test_time.clean_accuracy)
    defenses.insert(defenses.index(TEST_TIME) + 1, TRAIN_TEST)
    attacks = test_time.settings["attacks"]
    eps_order = [None] + list(test_time.settings["eps"])
    rows.sort(key=lambda row: (attacks.index(row["attack"]), eps_order.index(row["eps"]),
                               defenses.index(row["defense"])))
    clean = {name: (train_test.clean_accuracy[TEST_TIME] if name == TRAIN_TEST
                    else test_time.clean_accuracy[name]) for name in defenses}
    settings = dict(test_time.settings, defenses=defenses)
    settings["modes"] = _modes_settings(purifier_record,
                                        train_test.clean_accuracy[paper.UNDEFENDED])
    return paper.Evaluation(rows, clean, settings, test_time.examples)


def _modes_settings(purifier_record, alone_accuracy):
    return {TEST_TIME: "purifier + the classifier trained on clean images",
            TRAIN_TEST: "purifier + the classifier trained on purified images",
            "purified_classifier_without_purifier": alone_accuracy,
            "purified_classifier_trained_behind": purifier_record}


def evaluate_paper_modes(classifier, purified_classifier, defenses: dict, images, labels,
                         attack_names, eps_values, purifier_record: dict | None = None,
                         **options) -> paper.Evaluation:
    """``paper.evaluate`` of both modes on the same images, merged (``merge_paper``).

    Args:
      classifier: trained on clean images. purified_classifier: trained behind the purifier.
      defenses: as for ``paper.evaluate``; must hold ``comdefend``.
      purifier_record: what the purified classifier records of its purifier (settings only).
      options: the other ``paper.evaluate`` arguments (threat models, steps, EOT, ...).
    """
    if TEST_TIME not in defenses:
        raise ValueError(f"the training-and-test-time mode needs the {TEST_TIME!r} defense")
    test_time = paper.evaluate(classifier, defenses, images, labels, attack_names, eps_values,
                               **options)
    train_test = paper.evaluate(purified_classifier, {TEST_TIME: defenses[TEST_TIME]}, images,
                                labels, attack_names, eps_values, **options)
    return merge_paper(test_time, train_test, purifier_record)


def merge_adaptive(test_time: dict, train_test: dict,
                   purifier_record: dict | None = None) -> dict:
    """Adaptive-protocol results (``adaptive.Evaluation.results()``) of both modes as one:
    rows, worst cases, masking checks, gradient checks and convergence curves of the second
    run's ``comdefend`` renamed ``comdefend_train_test``; ``clean`` gains it."""
    if TEST_TIME not in test_time["clean"] or TEST_TIME not in train_test["clean"]:
        raise ValueError(f"both adaptive runs need the {TEST_TIME!r} defense")
    if test_time["n"] != train_test["n"]:
        raise ValueError("both modes must be scored on the same examples")
    merged = dict(test_time)
    merged["rows"] = ([dict(row, classifier=ORIGINAL) for row in test_time["rows"]]
                      + _renamed(train_test["rows"], PURIFIED))
    merged["worst_case"] = ([dict(row, classifier=ORIGINAL) for row in test_time["worst_case"]]
                            + _renamed(train_test["worst_case"], PURIFIED))
    merged["masking"] = ([dict(entry, classifier=ORIGINAL) for entry in test_time["masking"]]
                         + _renamed(train_test["masking"], PURIFIED))
    prefix = f"{TEST_TIME} "
    merged["masking_warnings"] = list(test_time["masking_warnings"]) + [
        TRAIN_TEST + " " + warning[len(prefix):] for warning in train_test["masking_warnings"]
        if warning.startswith(prefix)]
    suffix = f"/{TEST_TIME}"
    merged["gradient_checks"] = list(test_time["gradient_checks"]) + [
        dict(check, attack=check["attack"][:-len(suffix)] + f"/{TRAIN_TEST}")
        for check in train_test["gradient_checks"] if check["attack"].endswith(suffix)]
    merged["gradient_checks_ok"] = all(check["ok"] for check in merged["gradient_checks"])
    merged["convergence"] = dict(test_time["convergence"])
    merged["convergence"].update({f"{TRAIN_TEST}, {key}": value
                                  for key, value in train_test["convergence"].items()})
    clean = {}
    for name, summary in test_time["clean"].items():
        clean[name] = summary
        if name == TEST_TIME:
            clean[TRAIN_TEST] = train_test["clean"][TEST_TIME]
    merged["clean"] = clean
    alone = train_test["clean"].get(paper.UNDEFENDED)
    merged["settings"] = dict(test_time["settings"], modes=_modes_settings(
        purifier_record, None if alone is None else alone["mean_acc"]))
    return merged


def run_adaptive_modes(models: adaptive.Models, purified_classifier, images, labels,
                       protocol: adaptive.Protocol, progress=None,
                       purifier_record: dict | None = None) -> dict:
    """The adaptive protocol on both modes, merged (``merge_adaptive``). The second run
    evaluates ``purified_classifier`` behind ``models.purifier`` only, with the same threat
    models, seeds and second classifier, and without the ablation (which studies the attack,
    not the classifier); the retrained classifier alone is only scored on the clean images."""
    if TEST_TIME not in protocol.defenses:
        raise ValueError(f"the training-and-test-time mode needs the {TEST_TIME!r} defense")
    say = progress or (lambda description: None)
    test_time = adaptive.Evaluation(models, images, labels, protocol).run(progress)
    second = dataclasses.replace(models, classifier=purified_classifier, baselines={})
    second_protocol = dataclasses.replace(protocol, defenses=(TEST_TIME,), ablation_steps=(),
                                          ablation_eot=(), ablation_restarts=())
    train_test = adaptive.Evaluation(second, images, labels, second_protocol).run(
        lambda text: say(f"[{TRAIN_TEST}] {text}"))
    alone = scoring.correct_per_draw(threat_models.classifier_fn(purified_classifier), images,
                                     labels, 1, protocol.batch_size)
    train_test["clean"] = dict(train_test["clean"], **{paper.UNDEFENDED:
                                                       scoring.summarize(alone)})
    return merge_adaptive(test_time, train_test, purifier_record)
