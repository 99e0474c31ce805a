"""Threat models, scoring on the same images, tables and figures of the evaluation."""

import json
import os

import pytest

from comdefend_tf import defenses as defenses_lib
from comdefend_tf import evaluation
from tests import attack_fixtures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():
    classifier, _ = attack_fixtures.tiny_classifier()
    purifier, _ = attack_fixtures.tiny_comdefend()
    images, labels = attack_fixtures.attack_batch()
    defenses = {"comdefend": purifier, "bit_depth": defenses_lib.BitDepthReduction(2)}
    return evaluation.evaluate(classifier, defenses, images[:16], labels[:16],
                               ["fgsm", "pgd"], [0.1, 0.3], steps={"pgd": 8},
                               progress=False), purifier, classifier


def test_rows_cover_every_combination_on_the_same_images(result):
    evaluated, _, _ = result
    # 2 attacks x 2 eps x (1 undefended + 2 defenses x 2 threat models)
    assert len(evaluated.rows) == 2 * 2 * 5
    assert {row["num_examples"] for row in evaluated.rows} == {16}
    undefended = [row for row in evaluated.rows if row["defense"] == "none"]
    assert {row["threat_model"] for row in undefended} == {evaluation.NO_THREAT_MODEL}
    assert evaluated.clean_accuracy["none"] == 1.0  # the fixed batch is all correct
    for row in evaluated.rows:
        assert row["mean_linf"] <= row["eps"] + 1e-5
        assert 0.0 <= row["accuracy_under_attack"] <= 1.0
        assert row["clean_accuracy"] == evaluated.clean_accuracy[row["defense"]]
        if row["defense"] == "none":
            # Every image starts correct, so success rate = 1 - accuracy under attack.
            assert row["undefended_success_rate"] == pytest.approx(
                1.0 - row["accuracy_under_attack"])


def test_oblivious_rows_share_the_undefended_adversarial_images(result):
    evaluated, _, _ = result
    for attack in ("fgsm", "pgd"):
        for eps in (0.1, 0.3):
            rows = [row for row in evaluated.rows if (row["attack"], row["eps"]) == (attack, eps)
                    and row["threat_model"] in ("oblivious", evaluation.NO_THREAT_MODEL)]
            assert len({(row["mean_l2"], row["undefended_success_rate"]) for row in rows}) == 1


def test_adaptive_attack_is_at_least_as_strong_as_oblivious(result):
    evaluated, _, _ = result
    by_key = {(row["attack"], row["eps"], row["defense"], row["threat_model"]): row
              for row in evaluated.rows}
    for attack in ("fgsm", "pgd"):
        for eps in (0.1, 0.3):
            for defense in ("comdefend", "bit_depth"):
                oblivious = by_key[(attack, eps, defense, "oblivious")]["accuracy_under_attack"]
                adaptive = by_key[(attack, eps, defense, "adaptive")]["accuracy_under_attack"]
                assert adaptive <= oblivious, (attack, eps, defense)
                row = by_key[(attack, eps, defense, "adaptive")]
                assert 0 <= row["oblivious_kept"] <= 16
                assert row["gradient_only_accuracy"] >= adaptive - 1e-9
    # With the straight-through gradient, PGD at eps 0.3 breaks the purifier outright.
    assert by_key[("pgd", 0.3, "comdefend", "adaptive")]["accuracy_under_attack"] <= 0.25


def test_threat_models_pick_the_callable_and_eot(result):
    _, purifier, classifier = result
    _, samples = evaluation.attack_model_fn("adaptive", classifier, purifier, eot_samples=5)
    assert samples == 1  # deterministic purifier: EOT would average identical draws
    noisy = purifier.with_inference(noise_std=1.0)
    model_fn, samples = evaluation.attack_model_fn("adaptive", classifier, noisy, eot_samples=5)
    assert samples == 5 and model_fn.eot_samples == 5
    _, samples = evaluation.attack_model_fn("oblivious", classifier, noisy, eot_samples=5)
    assert samples == 1
    with pytest.raises(ValueError, match="unknown threat model"):
        evaluation.attack_model_fn("white_box", classifier, noisy)


def test_bad_settings_are_rejected_before_attacking(result):
    _, purifier, classifier = result
    images, labels = attack_fixtures.attack_batch()
    with pytest.raises(ValueError, match=r"eps must be in \[0, 1\]"):
        evaluation.evaluate(classifier, {}, images, labels, ["fgsm"], [3.0], progress=False)
    with pytest.raises(ValueError, match="unknown attack"):
        evaluation.evaluate(classifier, {}, images, labels, ["boom"], [0.1], progress=False)
    with pytest.raises(ValueError, match="unknown threat model"):
        evaluation.evaluate(classifier, {}, images, labels, ["fgsm"], [0.1],
                            threat_models=["grey"], progress=False)


def test_results_table_and_figures_are_written(result, tmp_path):
    evaluated, purifier, classifier = result
    paths = evaluation.write_results(evaluated, str(tmp_path), {"dataset": "digits"})
    with open(paths["markdown"]) as handle:
        markdown = handle.read()
    header = next(line for line in markdown.splitlines() if line.startswith("| attack"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        "attack", "eps", "steps", "threat model", "defense", "clean accuracy",
        "accuracy under attack", "undefended attack success rate", "mean L2", "mean Linf"]
    assert markdown.count("\n| pgd |") == 10
    with open(paths["json"]) as handle:
        payload = json.load(handle)
    assert len(payload["rows"]) == len(evaluated.rows)
    assert payload["settings"]["eot_form"].startswith("mean of logits")
    plot = evaluation.plot_accuracy_vs_eps(evaluated, str(tmp_path / "accuracy.png"))
    images, _ = attack_fixtures.attack_batch()
    grid = evaluation.plot_purification_grid(
        str(tmp_path / "grid.png"), images, evaluated.examples["adversarial"], classifier,
        purifier=purifier, count=3)
    for path in (plot, grid):
        with open(path, "rb") as handle:
            assert handle.read(8) == PNG_SIGNATURE
        assert os.path.getsize(path) > 5_000
    assert evaluated.examples["attack"] == "fgsm" and evaluated.examples["eps"] == 0.3
