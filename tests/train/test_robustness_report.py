"""The robustness report binary end to end on a tiny setting, its flag errors, and the thin
binaries."""

import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from comdefend_tf.evaluation import adaptive, report
from comdefend_tf.training import precision
from tests.conftest import REPO_ROOT, subprocess_env
from tests.fixtures import attack_models as attack_fixtures

BINARIES = ("train/evaluate.py", "train/robustness_report.py")


def run_report(*flags, timeout=420):
    return subprocess.run([sys.executable, "-m", "train.robustness_report", *flags],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def second_classifier_dir(tmp_path_factory):
    """A second classifier: the tiny one with perturbed weights (different weights, so the
    same-classifier check lets it through)."""
    classifier, _ = attack_fixtures.tiny_classifier()
    import keras

    from comdefend_tf.training import classifier as classifiers

    second = keras.models.clone_model(classifier)
    second.set_weights([w * 1.02 for w in classifier.get_weights()])
    model_dir = str(tmp_path_factory.mktemp("classifier2"))
    classifiers.save_classifier(second, model_dir)
    return model_dir


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, second_classifier_dir):
    _, classifier_dir = attack_fixtures.tiny_classifier()
    _, comdefend_dir = attack_fixtures.tiny_comdefend()
    output_dir = str(tmp_path_factory.mktemp("robustness"))
    result = run_report(
        "--dataset=digits", f"--classifier_dir={classifier_dir}",
        f"--second_classifier_dir={second_classifier_dir}", f"--comdefend_dir={comdefend_dir}",
        "--inference_noise_std=1.0", "--num_examples=12", "--eps=0.2", "--l2_eps=1.0",
        "--sanity_eps=0.5", "--steps=3", "--eot_samples=2", "--square_queries=5",
        "--target_classes=2", "--ablation_steps=2,3", "--ablation_eot=1,2",
        "--ablation_restarts=1,2", "--ablation_examples=6", "--verify_draws=6",
        "--temperatures=10", f"--output_dir={output_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(output_dir, report.REPORT_JSON)) as handle:
        payload = json.load(handle)
    with open(os.path.join(output_dir, report.REPORT_MD)) as handle:
        markdown = handle.read()
    return output_dir, payload, markdown, result.stdout


def test_report_rows_have_every_promised_column(report_run):
    _, payload, markdown, _ = report_run
    assert payload["rows"] and payload["cascade"]
    for row in payload["rows"]:
        assert set(adaptive.ROW_COLUMNS) <= set(row)
        assert 0 <= row["n"] <= 12
        if row["n"]:
            assert (0.0 <= row["ci_low"] <= row["robust_acc_strict"] <= row["ci_high"] <= 1.0)
            assert row["robust_acc_strict"] <= row["robust_acc_majority"] + 1e-9
    assert "| " + " | ".join(adaptive.ROW_COLUMNS) + " |" in markdown
    threat_models = {row["threat_model"] for row in payload["rows"]}
    assert {"white_box", "oblivious", "bpda_eot", "bpda_identity", "soft_path", "bpda_smooth",
            "fixed_noise", adaptive.FIXED_NOISE_SAME_DRAW, "transfer",
            "gradient_free"} <= threat_models
    assert {r["temperature"] for r in payload["rows"] if r["threat_model"] == "bpda_smooth"} \
        == {10.0}
    attacks = {(row["threat_model"], row["attack"]) for row in payload["rows"]}
    for threat_model in ("oblivious", "bpda_eot", "bpda_identity", "transfer", "soft_path",
                         "bpda_smooth", "fixed_noise"):
        assert {(threat_model, a) for a in ("apgd-ce", "apgd-dlr")} <= attacks
    # APGD-T by default only under the strongest threat models (the lowest temperature's
    # bpda_smooth is T = 10 here, the only one).
    assert {t for t, a in attacks if a == "apgd-t"} == {"white_box", "oblivious", "transfer",
                                                         "bpda_eot", "bpda_smooth"}
    # --search_precision=auto: bfloat16 only where the hardware computes it natively.
    assert payload["settings"]["search_precision"] == (
        "bfloat16" if precision.bf16_hardware_support()[0] else "float32")
    assert payload["settings"]["targeted_threat_models"] == [
        "white_box", "oblivious", "transfer", "bpda_eot", "bpda_smooth(T=10)"]
    # Square and transfer run on every defense, baselines included.
    for kind in ("gradient_free", "transfer"):
        assert {r["defense"] for r in payload["rows"] if r["threat_model"] == kind} == set(
            adaptive.DEFENSES)
    bpda = [r for r in payload["rows"] if r["threat_model"] == "bpda_eot"
            and r["defense"] == "comdefend"]
    assert bpda and all(r["eot"] == 2 for r in bpda)
    # Attacks average 2 draws (--eot_samples); every point is verified over 6.
    assert payload["clean"]["comdefend"]["draws"] == 6
    assert "verification draws per point: 6" in markdown


def test_worst_case_is_strict_and_majority_and_no_better_than_any_attack(report_run):
    _, payload, markdown, _ = report_run
    assert "**strict worst case**" in markdown and "majority worst case" in markdown
    for worst in payload["worst_case"]:
        assert worst["robust_acc_strict"] <= worst["robust_acc_majority"] + 1e-9
        assert worst["robust_acc_strict"] <= payload["clean"][worst["defense"]]["strict_acc"]
        assert worst["ci_low"] <= worst["robust_acc_strict"] <= worst["ci_high"]
        rows = [r for r in payload["rows"] if r["defense"] == worst["defense"]
                and r["norm"] == worst["norm"] and r["eps"] == worst["eps"]
                and r["threat_model"] != adaptive.FIXED_NOISE_SAME_DRAW]
        assert rows and rows[-1]["standing_strict"] == worst["robust_acc_strict"]
    covered = {(w["norm"], w["eps"]) for w in payload["worst_case"]}
    assert {("linf", 0.2), ("l2", 1.0), ("linf", 0.5)} <= covered
    assert {m["defense"] for m in payload["masking"]} >= {"comdefend", "none"}


def test_report_states_cpu_seconds_and_has_its_evidence_and_plot(report_run):
    output_dir, payload, markdown, stdout = report_run
    assert payload["cpu_seconds"] > 0
    assert payload["cpu_seconds_per_example"] == pytest.approx(payload["cpu_seconds"] / 12)
    assert "CPU-seconds in total" in markdown and "per example" in markdown
    assert [(r["steps"], r["eot"], r["restarts"]) for r in payload["ablation"]] == [
        (3, 1, 1), (2, 2, 1), (3, 2, 1), (3, 2, 2)]
    verdict = payload["convergence_verdict"]
    assert set(verdict["ladders"]) == {"steps", "eot", "restarts"}
    assert "### Convergence at L-inf" in markdown and "**Verdict: " in markdown
    for worst in payload["worst_case"]:
        assert len(worst["failure_rates"]) == 12
        broken = [r for r in worst["failure_rates"] if r > 0]
        assert len(broken) == round(12 * (worst["clean_acc_strict"]
                                          - worst["robust_acc_strict"])) or not worst["full"]
    shares = [c["code_gradient_share"] for c in payload["gradient_checks"]
              if c["attack"].startswith("bpda_smooth")]
    assert shares and all(0.0 <= s <= 1.0 for s in shares)
    assert "Share of the code the surrogate's backward pass carries gradient" in markdown
    worst_so_far = [r["cumulative_worst_case"] for r in payload["ablation"]]
    assert worst_so_far == sorted(worst_so_far, reverse=True)
    assert payload["gradient_checks"] and all(
        c["nonfinite_gradients"] == 0 for c in payload["gradient_checks"])
    with open(os.path.join(output_dir, report.WORST_CASE_PLOT), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert report.REPORT_MD in stdout


def test_bad_flags_fail_clearly(tmp_path):
    _, classifier_dir = attack_fixtures.tiny_classifier()
    out = f"--output_dir={tmp_path}"
    cases = {
        "no classifier": ([out], "--classifier_dir is required"),
        "unknown threat model": ([f"--classifier_dir={classifier_dir}",
                                  "--threat_models=oblivious,telepathy", out],
                                 "unknown threat model 'telepathy'"),
        "eps": ([f"--classifier_dir={classifier_dir}", "--eps=1.5", out], "must be in (0, 1]"),
        "same second classifier": ([f"--classifier_dir={classifier_dir}",
                                    f"--second_classifier_dir={classifier_dir}",
                                    "--defenses=none", out], "same file as the classifier"),
        "litert without float model": ([f"--classifier_dir={classifier_dir}",
                                        f"--litert_purifier={tmp_path / 'p.tflite'}",
                                        "--defenses=none", out],
                                       "--litert_purifier needs --comdefend_dir"),
        "missing adversarial classifier": ([f"--classifier_dir={classifier_dir}",
                                            f"--adv_classifier_dir={tmp_path / 'nothing'}",
                                            "--defenses=none", out],
                                           "--adv_classifier_dir: no classifier at"),
    }
    # Start all at once: each child spends most of its time importing TensorFlow.
    processes = {name: subprocess.Popen(
        [sys.executable, "-m", "train.robustness_report", "--dataset=digits", *flags],
        cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for name, (flags, _) in cases.items()}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode != 0, name
        assert cases[name][1] in stdout + stderr, (name, stderr[-1500:])
    assert not os.path.exists(tmp_path / report.REPORT_JSON)


def test_protocol_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown threat model"):
        adaptive.Protocol(eps={"linf": [0.1]}, headline_eps=0.1, threat_models=["psychic"])
    with pytest.raises(ValueError, match="unknown norm"):
        adaptive.Protocol(eps={"l1": [0.1]}, headline_eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        adaptive.Protocol(eps={"linf": [2.0]}, headline_eps=0.1)
    with pytest.raises(ValueError, match="unknown loss"):
        adaptive.Protocol(eps={"linf": [0.1]}, headline_eps=0.1, losses=["hinge"])
    # Losses always run in cascade order, whatever order they were given in.
    assert adaptive.Protocol(eps={"linf": [0.1]}, headline_eps=0.1,
                             losses=["dlr", "ce"]).losses == ["ce", "dlr"]
    protocol = adaptive.Protocol(eps={"linf": [0.1]}, headline_eps=0.1,
                                 threat_models=["transfer"], defenses=["none"])
    classifier, _ = attack_fixtures.tiny_classifier()
    images = np.zeros((2, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="second, independently trained classifier"):
        adaptive.Evaluation(adaptive.Models(classifier), images, np.zeros(2), protocol)


def test_best_baseline_breaks_ties_at_the_headline_by_the_whole_curve():
    rows = [{"defense": name, "norm": "linf", "eps": eps, "robust_acc_strict": acc}
            for name, eps, acc in [("jpeg", 0.1, 0.58), ("jpeg", 0.3, 0.0),
                                   ("bit_depth", 0.1, 0.31), ("bit_depth", 0.3, 0.0),
                                   ("none", 0.1, 0.9), ("none", 0.3, 0.5)]]
    assert adaptive.best_baseline(rows, 0.3) == "jpeg"
    rows.append({"defense": "median", "norm": "linf", "eps": 0.3, "robust_acc_strict": 0.1})
    assert adaptive.best_baseline(rows, 0.3) == "median"


@pytest.mark.parametrize("path", BINARIES)
def test_binaries_only_parse_flags_and_call_the_library(path):
    with open(os.path.join(REPO_ROOT, path)) as handle:
        tree = ast.parse(handle.read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"matplotlib", "json", "numpy", "tensorflow"}
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id",
                                                                                  None)
             for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not calls & {"open", "savefig", "dump", "write", "apgd", "square"}
    # No Markdown is rendered in a binary: no table rules in its strings.
    strings = [node.value for node in ast.walk(tree)
               if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    assert not [text for text in strings if "|---" in text or text.startswith("| ")]


def test_adversarial_training_and_a_litert_purifier_in_one_report(tmp_path):
    pytest.importorskip("ai_edge_litert", reason="the [litert] extra runs .tflite purifiers")
    from comdefend_tf.litert import convert
    from comdefend_tf.training import provenance

    _, classifier_dir = attack_fixtures.tiny_classifier()
    purifier, comdefend_dir = attack_fixtures.tiny_comdefend()
    tflite = tmp_path / "purifier.tflite"
    tflite.write_bytes(convert.convert(purifier, "float32", (8, 8), noise_std=1.0))
    record = {"method": "pgd", "norm": "linf", "eps": 0.3, "steps": 5, "step_size": 0.1,
              "eps_warmup_epochs": 1, "eot": 1, "gradient": None, "behind_purifier": False,
              "purifier_fingerprint": None}
    alone = attack_fixtures.copy_with_adversarial_record(classifier_dir, tmp_path / "adv", record)
    behind = attack_fixtures.copy_with_adversarial_record(
        classifier_dir, tmp_path / "adv_purified",
        dict(record, behind_purifier=True, gradient="bpda_smooth(T=10)",
             purifier_fingerprint=provenance.weights_fingerprint(purifier)))
    output_dir = tmp_path / "report"
    result = run_report(
        "--dataset=digits", f"--classifier_dir={classifier_dir}",
        f"--comdefend_dir={comdefend_dir}", "--inference_noise_std=1.0",
        f"--adv_classifier_dir={alone}", f"--adv_purified_classifier_dir={behind}",
        f"--litert_purifier={tflite}", "--defenses=none,comdefend", "--num_examples=6",
        "--norm=linf", "--eps=0.2", "--sanity_eps=", "--steps=2", "--eot_samples=2",
        "--square_queries=5", "--losses=ce", "--ablation_steps=", "--ablation_eot=",
        "--ablation_restarts=", "--verify_draws=3", "--temperatures=10",
        f"--output_dir={output_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning:" not in result.stderr  # records present, the same purifier weights
    with open(output_dir / report.REPORT_JSON) as handle:
        payload = json.load(handle)
    assert set(payload["clean"]) == {"none", "adv_training", "comdefend",
                                     "comdefend_adv_training", "comdefend_litert"}
    worst = {row["defense"]: row for row in payload["worst_case"]}
    assert set(worst) == set(payload["clean"])
    assert worst["comdefend_litert"]["verify_draws"] == 3  # the file draws noise
    litert = {row["threat_model"] for row in payload["rows"]
              if row["defense"] == "comdefend_litert"}
    assert {"bpda_eot", "bpda_identity", "gradient_free"} <= litert
    assert not litert & {"soft_path", "bpda_smooth", "fixed_noise"}
    metadata = payload["metadata"]
    assert metadata["adversarial_training"]["comdefend_adv_training"]["gradient"] == (
        "bpda_smooth(T=10)")
    assert "BPDA through the float purifier" in metadata["litert_purifier"]
    with open(output_dir / report.REPORT_MD) as handle:
        markdown = handle.read()
    assert "`comdefend_adv_training`: purifier + a classifier adversarially trained" in markdown
    assert "`comdefend_litert`: the LiteRT purifier" in markdown
