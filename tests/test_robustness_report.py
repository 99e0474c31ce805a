"""The robustness report binary end to end on a tiny setting, and its flag errors."""

import json
import os
import subprocess
import sys

import pytest

from comdefend_tf import robustness
from tests import attack_fixtures
from tests.conftest import REPO_ROOT, subprocess_env


def run_report(*flags, timeout=420):
    return subprocess.run([sys.executable, "-m", "train.robustness_report", *flags],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    _, classifier_dir = attack_fixtures.tiny_classifier()
    _, comdefend_dir = attack_fixtures.tiny_comdefend()
    output_dir = str(tmp_path_factory.mktemp("robustness"))
    result = run_report(
        "--dataset=digits", f"--classifier_dir={classifier_dir}",
        f"--second_classifier_dir={classifier_dir}", f"--comdefend_dir={comdefend_dir}",
        "--inference_noise_std=1.0", "--num_examples=12", "--eps=0.2", "--l2_eps=1.0",
        "--sanity_eps=0.5", "--steps=3", "--eot_samples=2", "--square_queries=5",
        "--ablation_steps=2,3", "--ablation_eot=1,2", "--ablation_examples=6",
        f"--output_dir={output_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(output_dir, "robustness_report.json")) as handle:
        payload = json.load(handle)
    with open(os.path.join(output_dir, "robustness_report.md")) as handle:
        markdown = handle.read()
    return output_dir, payload, markdown, result.stdout


def test_report_rows_have_every_promised_column(report):
    _, payload, markdown, _ = report
    assert payload["rows"]
    for row in payload["rows"]:
        assert set(robustness.ROW_COLUMNS) <= set(row)
        assert row["n"] == 12
        assert 0.0 <= row["ci_low"] <= row["robust_acc_majority"] <= row["ci_high"] <= 1.0
    header = "| " + " | ".join(robustness.ROW_COLUMNS) + " |"
    assert header in markdown
    threat_models = {row["threat_model"] for row in payload["rows"]}
    assert {"white_box", "oblivious", "bpda_eot", "soft_path", "fixed_noise",
            robustness.FIXED_NOISE_SAME_DRAW, "transfer", "gradient_free"} <= threat_models
    defenses = {row["defense"] for row in payload["rows"]}
    assert defenses == set(robustness.DEFENSES)
    # The randomized ComDefend is attacked with EOT 2 and scored over 2 draws.
    bpda = [r for r in payload["rows"] if r["threat_model"] == "bpda_eot"
            and r["defense"] == "comdefend"]
    assert bpda and all(r["eot"] == 2 for r in bpda)
    assert payload["clean"]["comdefend"]["draws"] == 2


def test_worst_case_is_no_better_than_any_attack(report):
    _, payload, markdown, _ = report
    assert "Worst case per example" in markdown
    for worst in payload["worst_case"]:
        rows = [r for r in payload["rows"] if r["defense"] == worst["defense"]
                and r["norm"] == worst["norm"] and r["eps"] == worst["eps"]
                and r["threat_model"] != robustness.FIXED_NOISE_SAME_DRAW]
        assert rows
        assert worst["robust_acc"] <= min(r["robust_acc_majority"] for r in rows) + 1e-9
    eps_covered = {(w["norm"], w["eps"]) for w in payload["worst_case"]}
    assert {("linf", 0.2), ("l2", 1.0), ("linf", 0.5)} <= eps_covered


def test_report_has_sanity_evidence_and_plot(report):
    output_dir, payload, markdown, stdout = report
    # Steps {2, 3} at the main EOT (2) and EOT {1, 2} at the main steps (3), by budget.
    assert [(r["steps"], r["eot"]) for r in payload["ablation"]] == [(3, 1), (2, 2), (3, 2)]
    worst_so_far = [r["cumulative_worst_case"] for r in payload["ablation"]]
    assert worst_so_far == sorted(worst_so_far, reverse=True)
    assert all("cumulative_worst_case" in r for r in payload["ablation"])
    assert payload["gradient_checks"] and all(
        c["nonfinite_gradients"] == 0 for c in payload["gradient_checks"])
    assert "Gradient check" in markdown and "Ablation" in markdown
    assert payload["metadata"]["wall_time_s"] > 0
    with open(os.path.join(output_dir, "worst_case_vs_eps.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "robustness_report.md" in stdout


@pytest.mark.parametrize("flags,message", [
    (["--output_dir=/tmp/x"], "--classifier_dir is required"),
    (["--classifier_dir=CLS", "--threat_models=oblivious,telepathy", "--output_dir=/tmp/x"],
     "unknown threat model 'telepathy'"),
    (["--classifier_dir=CLS", "--eps=1.5", "--output_dir=/tmp/x"], "must be in (0, 1]"),
])
def test_bad_flags_fail_clearly(flags, message):
    _, classifier_dir = attack_fixtures.tiny_classifier()
    flags = [flag.replace("CLS", classifier_dir) for flag in flags]
    result = run_report("--dataset=digits", *flags, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


def test_protocol_and_evaluation_reject_bad_settings():
    import numpy as np

    with pytest.raises(ValueError, match="unknown threat model"):
        robustness.Protocol(eps={"linf": [0.1]}, headline_eps=0.1, threat_models=["psychic"])
    with pytest.raises(ValueError, match="unknown norm"):
        robustness.Protocol(eps={"l1": [0.1]}, headline_eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        robustness.Protocol(eps={"linf": [2.0]}, headline_eps=0.1)
    protocol = robustness.Protocol(eps={"linf": [0.1]}, headline_eps=0.1,
                                   threat_models=["transfer"], defenses=["none"])
    classifier, _ = attack_fixtures.tiny_classifier()
    images = np.zeros((2, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="second, independently trained classifier"):
        robustness.Evaluation(robustness.Models(classifier), images, np.zeros(2), protocol)


def test_best_baseline_breaks_ties_at_the_headline_by_the_whole_curve():
    rows = [{"defense": name, "norm": "linf", "eps": eps, "robust_acc": acc}
            for name, eps, acc in [("jpeg", 0.1, 0.58), ("jpeg", 0.3, 0.0),
                                   ("bit_depth", 0.1, 0.31), ("bit_depth", 0.3, 0.0),
                                   ("none", 0.1, 0.9), ("none", 0.3, 0.5)]]
    assert robustness.best_baseline(rows, 0.3) == "jpeg"
    rows.append({"defense": "median", "norm": "linf", "eps": 0.3, "robust_acc": 0.1})
    assert robustness.best_baseline(rows, 0.3) == "median"
