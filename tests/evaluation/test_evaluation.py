"""The evaluation package: threat models, the paper protocol's table and figures, the checks
before scoring, and the adaptive protocol's cascade."""

import json
import os
import shutil
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf.evaluation import baselines
from comdefend_tf.evaluation import adaptive, cascade, checks, paper, report
from comdefend_tf.evaluation import threat_models as threat_models_lib
from tests.fixtures import attack_models as attack_fixtures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():
    classifier, _ = attack_fixtures.tiny_classifier()
    purifier, _ = attack_fixtures.tiny_comdefend()
    images, labels = attack_fixtures.attack_batch()
    defenses = {"comdefend": purifier, "bit_depth": baselines.BitDepthReduction(2)}
    return paper.evaluate(classifier, defenses, images[:16], labels[:16], ["fgsm", "pgd"],
                          [0.1, 0.3], threat_models=["oblivious", "bpda_eot", "bpda_identity"],
                          steps={"pgd": 8}, progress=False), purifier, classifier


def test_rows_cover_every_combination_on_the_same_images(result):
    evaluated, _, _ = result
    # 2 attacks x 2 eps x (1 undefended + comdefend x 3 threat models + bit depth x 2: its
    # own backward pass is the identity, so bpda_identity would repeat bpda_eot).
    assert len(evaluated.rows) == 2 * 2 * (1 + 3 + 2)
    assert not [row for row in evaluated.rows if row["defense"] == "bit_depth"
                and row["threat_model"] == "bpda_identity"]
    assert {row["num_examples"] for row in evaluated.rows} == {16}
    undefended = [row for row in evaluated.rows if row["defense"] == "none"]
    assert {row["threat_model"] for row in undefended} == {"white_box"}
    assert evaluated.clean_accuracy["none"] == 1.0  # the fixed batch is all correct
    for row in evaluated.rows:
        assert row["mean_linf"] <= row["eps"] + 1e-5
        assert row["clean_accuracy"] == evaluated.clean_accuracy[row["defense"]]
        assert row["draws"] == 1  # deterministic purifier: one scoring draw
        assert row["accuracy_strict"] == row["accuracy_under_attack"]
        assert row["ci_low"] <= row["accuracy_strict"] <= row["ci_high"]
        if row["defense"] == "none":
            assert row["undefended_success_rate"] == pytest.approx(
                1.0 - row["accuracy_under_attack"])


def test_gradient_rows_are_at_least_as_strong_as_oblivious(result):
    evaluated, _, _ = result
    by_key = {(row["attack"], row["eps"], row["defense"], row["threat_model"]): row
              for row in evaluated.rows}
    for attack in ("fgsm", "pgd"):
        for eps in (0.1, 0.3):
            oblivious = by_key[(attack, eps, "comdefend", "oblivious")]["accuracy_under_attack"]
            for threat_model in ("bpda_eot", "bpda_identity"):
                row = by_key[(attack, eps, "comdefend", threat_model)]
                assert row["accuracy_under_attack"] <= oblivious
                assert row["gradient_only_accuracy"] >= row["accuracy_under_attack"] - 1e-9
    # Through the straight-through gradient PGD at eps 0.3 breaks the purifier outright.
    assert by_key[("pgd", 0.3, "comdefend", "bpda_eot")]["accuracy_under_attack"] <= 0.25


def test_adaptive_is_a_deprecated_alias_of_bpda_eot(result):
    _, purifier, classifier = result
    with pytest.warns(DeprecationWarning, match="bpda_eot"):
        assert threat_models_lib.resolve("adaptive") == "bpda_eot"
    noisy = purifier.with_inference(noise_std=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model_fn, samples = paper.attack_model_fn("adaptive", classifier, noisy, eot_samples=5)
    assert samples == 5 and model_fn.eot_samples == 5
    assert paper.attack_model_fn("bpda_eot", classifier, purifier, eot_samples=5)[1] == 1
    assert paper.attack_model_fn("oblivious", classifier, noisy, eot_samples=5)[1] == 1
    with pytest.raises(ValueError, match="unknown threat model 'grey'"):
        threat_models_lib.resolve("grey")


def test_bpda_identity_gradient_is_the_classifiers_gradient_at_the_purified_image():
    classifier = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                                   keras.layers.Dense(3, kernel_initializer="glorot_uniform")])
    purifier = attack_fixtures.tiny_comdefend()[0].with_inference(noise_std=0.0)
    images = tf.constant(np.random.default_rng(0).random((2, 4, 4, 1)), tf.float32)
    weights = tf.constant([[1.0, -2.0, 0.5], [0.3, 0.7, -1.0]])
    attacked = threat_models_lib.build("bpda_identity", classifier, purifier)
    with tf.GradientTape() as tape:
        tape.watch(images)
        loss = tf.reduce_sum(attacked.model(images) * weights)
    through_pipeline = tape.gradient(loss, images)
    purified = tf.constant(purifier(images))
    with tf.GradientTape() as tape:
        tape.watch(purified)
        loss = tf.reduce_sum(classifier(purified) * weights)
    at_purified = tape.gradient(loss, purified)
    np.testing.assert_allclose(through_pipeline.numpy(), at_purified.numpy(), rtol=1e-6)
    # The forward pass is the deployed pipeline's.
    np.testing.assert_allclose(attacked.model(images).numpy(),
                               classifier(purifier(images)).numpy(), rtol=1e-6)
    # ...and it differs from the binarizer's straight-through gradient (bpda_eot).
    with tf.GradientTape() as tape:
        tape.watch(images)
        loss = tf.reduce_sum(threat_models_lib.build("bpda_eot", classifier,
                                                     purifier).model(images) * weights)
    assert not np.allclose(tape.gradient(loss, images).numpy(), at_purified.numpy())


def test_threat_models_apply_where_they_are_distinct():
    purifier = attack_fixtures.tiny_comdefend()[0]
    jpeg, median = baselines.JpegDefense(75), baselines.MedianFilter(3)
    assert threat_models_lib.applies("white_box", "none", None)
    assert not threat_models_lib.applies("oblivious", "none", None)
    assert threat_models_lib.applies("bpda_identity", "median", median)
    assert not threat_models_lib.applies("bpda_identity", "jpeg", jpeg)
    assert not threat_models_lib.applies("soft_path", "jpeg", jpeg)
    assert threat_models_lib.applies("soft_path", "comdefend", purifier)
    assert not threat_models_lib.applies("fixed_noise", "comdefend", purifier)
    assert threat_models_lib.applies("fixed_noise", "comdefend",
                                     purifier.with_inference(noise_std=1.0))


def test_paper_protocol_rejects_bad_settings(result):
    _, _, classifier = result
    images, labels = attack_fixtures.attack_batch()
    with pytest.raises(ValueError, match=r"eps must be in \[0, 1\]"):
        paper.evaluate(classifier, {}, images, labels, ["fgsm"], [3.0], progress=False)
    with pytest.raises(ValueError, match="unknown attack"):
        paper.evaluate(classifier, {}, images, labels, ["boom"], [0.1], progress=False)
    with pytest.raises(ValueError, match="not one of the paper protocol's"):
        paper.evaluate(classifier, {}, images, labels, ["fgsm"], [0.1],
                       threat_models=["soft_path"], progress=False)


def test_results_table_and_figures_are_written(result, tmp_path):
    evaluated, purifier, classifier = result
    paths = report.write_results(evaluated, str(tmp_path), {"dataset": "digits",
                                                            "cpu_seconds": 32.0})
    with open(paths["markdown"]) as handle:
        markdown = handle.read()
    header = next(line for line in markdown.splitlines() if line.startswith("| attack"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        "attack", "eps", "steps", "threat model", "defense", "clean accuracy",
        "accuracy under attack", "strict accuracy (every draw)", "95% CI (strict)",
        "undefended attack success rate", "mean L2", "mean Linf"]
    assert markdown.count("\n| pgd |") == 12
    assert "32 CPU-seconds in total, 2.0 per example" in markdown
    with open(paths["json"]) as handle:
        payload = json.load(handle)
    assert len(payload["rows"]) == len(evaluated.rows)
    assert payload["cpu_seconds_per_example"] == pytest.approx(2.0)
    assert payload["settings"]["eot_form"].startswith("mean of logits")
    plot = report.plot_accuracy_vs_eps(evaluated, str(tmp_path / "accuracy.png"))
    images, _ = attack_fixtures.attack_batch()
    grid = report.plot_purification_grid(
        str(tmp_path / "grid.png"), images, evaluated.examples["adversarial"], classifier,
        purifier=purifier, count=3)
    for path in (plot, grid):
        with open(path, "rb") as handle:
            assert handle.read(8) == PNG_SIGNATURE
        assert os.path.getsize(path) > 5_000


def test_an_adversarial_set_outside_its_ball_is_an_error_not_a_number():
    images, _ = attack_fixtures.attack_batch()
    clean = images[:4]
    inside = np.clip(clean + 0.1, 0.0, 1.0)
    checks.check_adversarial(clean, inside, 0.1, "linf")
    with pytest.raises(ValueError, match="linf"):
        checks.check_adversarial(clean, np.clip(clean + 0.2, 0.0, 1.0), 0.1, "linf")
    with pytest.raises(ValueError):
        checks.check_adversarial(clean, np.where(clean > 0.5, np.nan, clean), 0.1, "linf")
    with pytest.raises(ValueError):
        checks.check_adversarial(clean, clean + 1.5, None, "linf")  # outside [0, 1]


def _copy_of(classifier):
    copy = keras.models.clone_model(classifier)
    copy.set_weights(classifier.get_weights())
    return copy


def test_transfer_refuses_the_same_classifier_by_path_and_by_weights(tmp_path):
    classifier, classifier_dir = attack_fixtures.tiny_classifier()
    with pytest.raises(ValueError, match="same file"):
        checks.check_second_classifier(classifier, classifier, classifier_dir,
                                       os.path.join(classifier_dir, "classifier.keras"))
    copied_dir = tmp_path / "copy"
    shutil.copytree(classifier_dir, copied_dir)
    copy = keras.saving.load_model(str(copied_dir / "classifier.keras"))
    with pytest.raises(ValueError, match="same weights"):
        checks.check_second_classifier(classifier, copy, classifier_dir, str(copied_dir))
    other = _copy_of(classifier)
    other.set_weights([w * 1.01 for w in classifier.get_weights()])
    checks.check_second_classifier(classifier, other, classifier_dir, str(tmp_path / "other"))
    protocol = adaptive.Protocol(eps={"linf": [0.1]}, headline_eps=0.1, defenses=["none"],
                                 threat_models=["transfer"])
    images, labels = attack_fixtures.attack_batch()
    with pytest.raises(ValueError, match="same weights"):
        adaptive.Evaluation(adaptive.Models(classifier, second_classifier=_copy_of(classifier)),
                            images, labels, protocol)


class _FixedAttacks:
    """Per-example deterministic attacks for the cascade tests: one FGSM step of a given size
    on the classifier, whatever examples it is run on (so cascade and full runs can match)."""

    def __init__(self, evaluation, sizes):
        self.evaluation, self.sizes = evaluation, sizes

    def __call__(self, defense_name, norm, eps, full):
        classifier = self.evaluation.models.classifier
        images, labels = self.evaluation.images, self.evaluation.labels

        def fgsm(indices, size):
            batch = tf.constant(images[indices])
            with tf.GradientTape() as tape:
                tape.watch(batch)
                loss = tf.keras.losses.sparse_categorical_crossentropy(
                    labels[indices], classifier(batch), from_logits=True)
            step = size * np.sign(tape.gradient(loss, batch).numpy())
            return np.clip(images[indices] + step, 0.0, 1.0).astype(np.float32)
        return [cascade.CascadeAttack("bpda_eot", f"fgsm-{size}", 1, 1, 1,
                                       lambda indices, size=size: fgsm(indices, size))
                for size in self.sizes]


def _run_cascade(per_attack_rows, sizes, defense="bit_depth"):
    classifier, _ = attack_fixtures.tiny_classifier()
    images, labels = attack_fixtures.attack_batch()
    protocol = adaptive.Protocol(eps={"linf": [0.2]}, headline_eps=0.2, defenses=[defense],
                                 threat_models=["bpda_eot"], ablation_steps=[],
                                 ablation_eot=[], per_attack_rows=per_attack_rows)
    evaluation = adaptive.Evaluation(
        adaptive.Models(classifier, baselines={"bit_depth": baselines.BitDepthReduction(3)}),
        images, labels, protocol)
    evaluation.cascade = _FixedAttacks(evaluation, sizes)
    return evaluation.run()


def test_cascade_gives_the_same_worst_case_as_every_attack_on_every_example():
    sizes = (0.05, 0.12, 0.2)
    cascaded = _run_cascade(False, sizes)
    full = _run_cascade(True, sizes)
    (worst_cascade,), (worst_full,) = cascaded["worst_case"], full["worst_case"]
    assert worst_cascade["robust_examples"] == worst_full["robust_examples"]
    assert worst_cascade["robust_acc_strict"] == worst_full["robust_acc_strict"]
    assert worst_cascade["robust_acc_majority"] == worst_full["robust_acc_majority"]
    assert 0 < worst_full["robust_acc_strict"] < 1  # a fixture where attacks matter
    n = len(attack_fixtures.attack_batch()[0])
    assert [row["n"] for row in full["rows"]] == [n] * 3
    ran_on = [row["n"] for row in cascaded["rows"]]
    assert ran_on[0] == n and ran_on[1] < n and ran_on == sorted(ran_on, reverse=True)
    # Full rows are each attack's own accuracy; the last cascade row's standing is the worst
    # case itself.
    assert cascaded["rows"][-1]["standing_strict"] == worst_cascade["robust_acc_strict"]
    assert sum(worst_cascade["broken_first"].values()) == round(
        n * (cascaded["clean"]["bit_depth"]["strict_acc"] - worst_cascade["robust_acc_strict"]))


def test_an_attack_leaving_its_ball_stops_the_protocol():
    sizes = (0.5,)  # an FGSM step of 0.5 at eps 0.2
    with pytest.raises(ValueError, match="ball"):
        _run_cascade(False, sizes)


def test_the_smoothed_surrogate_runs_once_per_temperature_with_its_own_label():
    classifier, _ = attack_fixtures.tiny_classifier()
    purifier, _ = attack_fixtures.tiny_comdefend()
    images, labels = attack_fixtures.attack_batch()
    protocol = adaptive.Protocol(eps={"linf": [0.1]}, headline_eps=0.1, defenses=["comdefend"],
                                 threat_models=["bpda_smooth", "gradient_free"], losses=["ce"],
                                 temperatures=(5, 10), ablation_steps=[], ablation_eot=[],
                                 ablation_restarts=[])
    plan = adaptive.Evaluation(adaptive.Models(classifier, purifier), images, labels, protocol)
    attacks = plan.cascade("comdefend", "linf", 0.1, True)
    assert [a.label for a in attacks] == ["bpda_smooth(T=5)/apgd-ce",
                                          "bpda_smooth(T=10)/apgd-ce", "gradient_free/square"]
    assert [a.temperature for a in attacks] == [5.0, 10.0, None]
