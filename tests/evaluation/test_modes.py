"""ComDefend's two defense modes side by side: the merged paper and adaptive results carry
every column, the training-and-test-time rows really use the retrained classifier, and the
Figure 4 bars and PNG."""

import functools
import os

import numpy as np
import pytest

from comdefend_tf.training import classifier as classifiers
from comdefend_tf.evaluation import adaptive, figure4, modes, paper, scoring
from comdefend_tf.evaluation import threat_models as threat_models_lib
from tests.fixtures import attack_models as attack_fixtures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@functools.lru_cache(maxsize=None)
def purified_classifier():
    """The tiny classifier's recipe trained behind the tiny ComDefend (2 epochs)."""
    _, purifier_dir = attack_fixtures.tiny_comdefend()
    model_dir = os.path.join(attack_fixtures.workdir(), "classifier_purified")
    classifier, metrics = classifiers.train_classifier(
        attack_fixtures.digits(), model_dir, epochs=2, batch_size=32, learning_rate=2e-3,
        seed=0, verbose=0, purifier_dir=purifier_dir)
    return classifier, model_dir, metrics


@pytest.fixture(scope="module")
def merged():
    classifier, _ = attack_fixtures.tiny_classifier()
    purifier, _ = attack_fixtures.tiny_comdefend()
    retrained, _, metrics = purified_classifier()
    images, labels = attack_fixtures.attack_batch()
    return modes.evaluate_paper_modes(
        classifier, retrained, {"comdefend": purifier}, images[:16], labels[:16],
        ["fgsm", "deepfool"], [0.1, 0.3], threat_models=["oblivious", "bpda_eot"],
        steps={"deepfool": 10}, progress=False,
        purifier_record=metrics["trained_behind_purifier"])


def test_both_modes_have_a_row_for_every_attack_eps_and_threat_model(merged):
    rows = merged.rows
    assert all("classifier" in row for row in rows)
    # Each training-and-test-time row has exactly the columns of its test-time counterpart
    # (gradient rows add gradient_only_accuracy and oblivious_kept in both modes).
    test_time = {(row["attack"], row["eps"], row["threat_model"]): row for row in rows
                 if row["defense"] == "comdefend"}
    for row in rows:
        if row["defense"] == "comdefend_train_test":
            twin = test_time[(row["attack"], row["eps"], row["threat_model"])]
            assert set(row) == set(twin), set(row) ^ set(twin)
    combos = {(row["attack"], row["eps"], row["threat_model"]) for row in rows
              if row["defense"] == "comdefend"}
    assert combos == {(row["attack"], row["eps"], row["threat_model"]) for row in rows
                      if row["defense"] == "comdefend_train_test"}
    assert len(combos) == 2 * 2 * 2
    assert {row["classifier"] for row in rows if row["defense"] == "comdefend_train_test"} == {
        "purified"}
    assert {row["classifier"] for row in rows if row["defense"] != "comdefend_train_test"} == {
        "original"}
    assert list(merged.clean_accuracy) == ["none", "comdefend", "comdefend_train_test"]
    for row in rows:
        assert row["clean_accuracy"] == merged.clean_accuracy[row["defense"]]
    assert merged.settings["defenses"] == ["none", "comdefend", "comdefend_train_test"]
    assert merged.settings["modes"]["purified_classifier_trained_behind"]["purified"] == (
        "on_the_fly")


def test_the_training_and_test_time_rows_use_the_retrained_classifier(merged):
    classifier, _ = attack_fixtures.tiny_classifier()
    purifier, _ = attack_fixtures.tiny_comdefend()
    retrained, _, _ = purified_classifier()
    images, labels = attack_fixtures.attack_batch()
    images, labels = images[:16], labels[:16]

    def clean(model):
        return scoring.summarize(scoring.correct_per_draw(
            threat_models_lib.pipeline_fn(model, purifier), images, labels, 1))["mean_acc"]

    assert merged.clean_accuracy["comdefend_train_test"] == clean(retrained)
    assert merged.clean_accuracy["comdefend"] == clean(classifier)
    # The oblivious train-and-test rows attack the retrained classifier alone: its own FGSM
    # images, scored behind the purifier.
    from comdefend_tf import attacks

    adversarial = attacks.run_attack("fgsm", threat_models_lib.classifier_fn(retrained), images,
                                     0.3, y=labels, progress=False)
    expected = np.mean(paper.predict(threat_models_lib.pipeline_fn(retrained, purifier),
                                     adversarial) == labels)
    row = next(row for row in merged.rows if row["defense"] == "comdefend_train_test"
               and row["attack"] == "fgsm" and row["eps"] == 0.3
               and row["threat_model"] == "oblivious")
    assert row["accuracy_under_attack"] == pytest.approx(expected)


def test_figure4_bars_and_png(merged, tmp_path):
    bars = figure4.figure4_table(merged.rows, merged.clean_accuracy, "oblivious")
    assert [bar["group"] for bar in bars] == ["clean"] * 3 + ["fgsm"] * 3 + ["deepfool"] * 3
    assert {bar["eps"] for bar in bars if bar["group"] == "fgsm"} == {0.3}
    undefended = next(bar for bar in bars if bar["group"] == "fgsm" and bar["defense"] == "none")
    white_box = next(row for row in merged.rows if row["defense"] == "none"
                     and row["attack"] == "fgsm" and row["eps"] == 0.3)
    assert undefended["accuracy_strict"] == white_box["accuracy_strict"]
    at_01 = figure4.figure4_table(merged.rows, merged.clean_accuracy, "bpda_eot", eps=0.1)
    row = next(row for row in merged.rows if row["defense"] == "comdefend_train_test"
               and row["attack"] == "fgsm" and row["eps"] == 0.1
               and row["threat_model"] == "bpda_eot")
    bar = next(bar for bar in at_01 if bar["group"] == "fgsm"
               and bar["defense"] == "comdefend_train_test")
    assert (bar["accuracy_strict"], bar["ci_low"], bar["ci_high"]) == (
        row["accuracy_strict"], row["ci_low"], row["ci_high"])
    path = figure4.plot_figure4(merged.rows, merged.clean_accuracy,
                                str(tmp_path / figure4.FIGURE4_PLOT))
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    with pytest.raises(ValueError, match="defended mode"):
        figure4.plot_figure4([r for r in merged.rows if r["defense"] == "none"],
                             merged.clean_accuracy, str(tmp_path / "empty.png"))


def test_merging_refuses_runs_that_cannot_be_compared(merged):
    classifier, _ = attack_fixtures.tiny_classifier()
    images, labels = attack_fixtures.attack_batch()
    undefended = paper.evaluate(classifier, {}, images[:4], labels[:4], ["fgsm"], [0.1],
                                progress=False)
    with pytest.raises(ValueError, match="no 'comdefend' defense"):
        modes.merge_paper(merged, undefended)
    with pytest.raises(ValueError, match="needs the 'comdefend' defense"):
        modes.evaluate_paper_modes(classifier, classifier, {}, images, labels, ["fgsm"], [0.1])


def test_adaptive_modes_merge_every_result_of_the_second_run():
    classifier, _ = attack_fixtures.tiny_classifier()
    purifier, _ = attack_fixtures.tiny_comdefend()
    retrained, _, _ = purified_classifier()
    images, labels = attack_fixtures.attack_batch()
    protocol = adaptive.Protocol(eps={"linf": [0.2]}, headline_eps=0.2, steps=3, eot_samples=1,
                                 losses=("ce",), threat_models=("oblivious", "bpda_eot"),
                                 defenses=("none", "comdefend"), ablation_steps=(),
                                 ablation_eot=(), ablation_restarts=(), square_queries=5,
                                 batch_size=64)
    results = modes.run_adaptive_modes(adaptive.Models(classifier, purifier), retrained,
                                       images[:10], labels[:10], protocol)
    assert list(results["clean"]) == ["none", "comdefend", "comdefend_train_test"]
    worst = {row["defense"]: row for row in results["worst_case"]}
    assert set(worst) == {"none", "comdefend", "comdefend_train_test"}
    assert set(worst["comdefend_train_test"]) == set(worst["comdefend"])
    keys = set(results["rows"][0])
    assert all(set(row) == keys for row in results["rows"])
    threat = {row["threat_model"] for row in results["rows"]
              if row["defense"] == "comdefend_train_test"}
    assert {"oblivious", "bpda_eot"} <= threat
    assert any(check["attack"].endswith("/comdefend_train_test")
               for check in results["gradient_checks"])
    assert 0.0 <= results["settings"]["modes"]["purified_classifier_without_purifier"] <= 1.0
    assert worst["comdefend_train_test"]["robust_acc_strict"] <= (
        results["clean"]["comdefend_train_test"]["strict_acc"])
