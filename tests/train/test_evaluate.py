"""train.train_classifier and train.evaluate as a user runs them, on a folder:PATH dataset of
digit PNGs in class folders; bad flags fail with clear messages."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT, subprocess_env
from tests.fixtures import attack_models as attack_fixtures

NUM_FOLDER_IMAGES = 400
COLUMNS = ["attack", "eps", "steps", "threat model", "defense", "clean accuracy",
           "accuracy under attack", "strict accuracy (every draw)", "95% CI (strict)",
           "undefended attack success rate", "mean L2", "mean Linf"]


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def folder_setup(tmp_path_factory):
    """Writes digits as 8-bit grayscale PNGs in PATH/<digit>/, trains the classifier on that
    folder with the binary, and trains the tiny purifier in-process."""
    root = tmp_path_factory.mktemp("evaluate_binary")
    folder = root / "digits_png"
    images, labels = attack_fixtures.data_lib.take_arrays(attack_fixtures.digits().train,
                                                          NUM_FOLDER_IMAGES)
    for index, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(folder / str(label), exist_ok=True)
        pixels = np.round(image[..., 0] * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / str(label) / f"{index:04d}.png")
    classifier_dir = root / "classifier"
    trained = _run("train.train_classifier", f"--dataset=folder:{folder}", "--epochs=6",
                   "--batch_size=32", "--learning_rate=2e-3", f"--model_dir={classifier_dir}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    _, comdefend_dir = attack_fixtures.tiny_comdefend()
    return folder, classifier_dir, comdefend_dir, root, trained.stdout


def test_train_classifier_binary_learns_the_folder_digits(folder_setup):
    _, classifier_dir, _, _, stdout = folder_setup
    assert "Held-out accuracy:" in stdout
    with open(classifier_dir / "metrics.json") as handle:
        metrics = json.load(handle)
    assert metrics["held_out_accuracy"] >= 0.7 and metrics["num_held_out"] == 40
    assert (classifier_dir / "classifier.keras").is_file()


def test_evaluate_binary_writes_the_table_and_both_figures(folder_setup):
    folder, classifier_dir, comdefend_dir, root, _ = folder_setup
    output_dir = root / "evaluation"
    result = _run("train.evaluate", f"--dataset=folder:{folder}",
                  f"--classifier_dir={classifier_dir}", f"--comdefend_dir={comdefend_dir}",
                  "--attacks=fgsm,pgd,cw_l2", "--eps=0.1,0.3", "--pgd_steps=3",
                  "--cw_steps=5", "--cw_binary_search_steps=1", "--num_examples=12",
                  "--defenses=none,comdefend,jpeg,bit_depth,median", "--bit_depth=2",
                  "--threat_models=oblivious,adaptive", f"--output_dir={output_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    # The deprecated name still works, says so, and means bpda_eot.
    assert "'adaptive' is deprecated" in result.stderr
    assert "CPU-seconds in total" in result.stdout
    header = "| " + " | ".join(COLUMNS) + " |"
    assert header in result.stdout  # the table is printed
    with open(output_dir / "results.md") as handle:
        markdown = handle.read()
    assert header in markdown
    with open(output_dir / "results.json") as handle:
        payload = json.load(handle)
    # (fgsm, pgd) x 2 eps + cw once = 5 jobs, each 1 undefended + 4 defenses x 2 threat models.
    assert len(payload["rows"]) == 5 * 9
    assert {row["num_examples"] for row in payload["rows"]} == {12}
    assert {row["defense"] for row in payload["rows"]} == {
        "none", "comdefend", "jpeg", "bit_depth", "median"}
    assert payload["metadata"]["dataset"] == f"folder:{folder}"
    assert {row["threat_model"] for row in payload["rows"]} == {"white_box", "oblivious",
                                                                "bpda_eot"}
    assert payload["cpu_seconds_per_example"] == pytest.approx(payload["cpu_seconds"] / 12)
    for name in ("accuracy_vs_eps.png", "purification_grid.png"):
        with open(output_dir / name, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_flags_fail_with_clear_messages(folder_setup, tmp_path):
    folder, classifier_dir, _, _, _ = folder_setup
    common = ["train.evaluate", f"--dataset=folder:{folder}", f"--output_dir={tmp_path}",
              "--defenses=none,jpeg"]
    cases = {
        "unknown attack": (common + [f"--classifier_dir={classifier_dir}",
                                     "--attacks=fgsm,boom"], "--attacks must list names from"),
        "eps out of range": (common + [f"--classifier_dir={classifier_dir}", "--eps=0.1,1.5"],
                             "--eps values must be in [0, 1]"),
        "no classifier": (common + [f"--classifier_dir={tmp_path / 'missing'}"],
                          "--classifier_dir: no classifier at"),
        "comdefend without model": (
            ["train.evaluate", f"--dataset=folder:{folder}", f"--output_dir={tmp_path}",
             f"--classifier_dir={classifier_dir}", "--defenses=none,comdefend"],
            "--comdefend_dir is not set"),
        "missing adversarial classifier": (
            common + [f"--classifier_dir={classifier_dir}",
                      f"--adv_classifier_dir={tmp_path / 'missing_adv'}"],
            "--adv_classifier_dir: no classifier at"),
        "adversarially trained behind ComDefend without it": (
            common + [f"--classifier_dir={classifier_dir}",
                      f"--adv_purified_classifier_dir={classifier_dir}"],
            "--adv_purified_classifier_dir is evaluated behind ComDefend"),
        "litert without its float purifier": (
            common + [f"--classifier_dir={classifier_dir}",
                      f"--litert_purifier={tmp_path / 'p.tflite'}"],
            "--litert_purifier needs --comdefend_dir"),
    }
    # Start all at once: each child spends most of its time importing TensorFlow.
    processes = {name: subprocess.Popen([sys.executable, "-m", *args], cwd=REPO_ROOT,
                                        env=subprocess_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                 for name, (args, _) in cases.items()}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode != 0, name
        assert cases[name][1] in stderr, (name, stderr[-1500:])
    assert not os.path.exists(tmp_path / "results.json")


def test_both_defense_modes_side_by_side_with_figure4(folder_setup):
    folder, classifier_dir, comdefend_dir, root, _ = folder_setup
    purified_dir = root / "classifier_purified"
    trained = _run("train.train_classifier", f"--dataset=folder:{folder}", "--epochs=6",
                   "--batch_size=32", "--learning_rate=2e-3", f"--purifier_dir={comdefend_dir}",
                   f"--model_dir={purified_dir}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "Trained behind purifier" in trained.stdout
    output_dir = root / "modes"
    result = _run("train.evaluate", f"--dataset=folder:{folder}",
                  f"--classifier_dir={classifier_dir}", f"--comdefend_dir={comdefend_dir}",
                  f"--purified_classifier_dir={purified_dir}", "--attacks=fgsm", "--eps=0.3",
                  "--num_examples=12", "--defenses=comdefend",
                  "--threat_models=oblivious,bpda_eot", f"--output_dir={output_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PurifierMismatchWarning" not in result.stderr
    with open(output_dir / "results.json") as handle:
        payload = json.load(handle)
    # fgsm at one eps: 1 undefended row + 2 threat models x 2 modes.
    assert len(payload["rows"]) == 5
    assert set(payload["clean_accuracy"]) == {"none", "comdefend", "comdefend_train_test"}
    modes = {row["defense"]: row for row in payload["rows"] if row["threat_model"] == "bpda_eot"}
    assert set(modes["comdefend_train_test"]) == set(modes["comdefend"])
    with open(output_dir / "results.md") as handle:
        assert "comdefend_train_test: at training and test time" in handle.read()
    with open(output_dir / "figure4_modes.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    # The retrained classifier used without its purifier (as --classifier_dir, undefended).
    mismatch = _run("train.evaluate", f"--dataset=folder:{folder}",
                    f"--classifier_dir={purified_dir}", "--attacks=fgsm", "--eps=0.3",
                    "--num_examples=4", "--defenses=none", f"--output_dir={root / 'alone'}")
    assert mismatch.returncode == 0, mismatch.stderr[-3000:]
    assert "used without a purifier" in mismatch.stderr
    with open(root / "alone" / "results.json") as handle:
        assert handle.read().count("used without a purifier") == 1


def test_adversarially_trained_classifiers_alone_and_behind_comdefend(folder_setup):
    folder, classifier_dir, comdefend_dir, root, _ = folder_setup
    record = {"method": "fgsm_rs", "norm": "linf", "eps": 0.1, "steps": 1, "step_size": 0.125,
              "eps_warmup_epochs": 0, "eot": 1, "gradient": None, "behind_purifier": False,
              "purifier_fingerprint": None}
    alone = attack_fixtures.copy_with_adversarial_record(classifier_dir, root / "adv", record)
    behind = attack_fixtures.copy_with_adversarial_record(
        classifier_dir, root / "adv_purified",
        dict(record, behind_purifier=True, purifier_fingerprint="sha256:" + "0" * 64))
    output_dir = root / "adversarial"
    result = _run("train.evaluate", f"--dataset=folder:{folder}",
                  f"--classifier_dir={classifier_dir}", f"--comdefend_dir={comdefend_dir}",
                  f"--adv_classifier_dir={alone}", f"--adv_purified_classifier_dir={behind}",
                  "--attacks=fgsm", "--eps=0.3", "--num_examples=8", "--defenses=comdefend",
                  "--threat_models=oblivious,bpda_eot", f"--output_dir={output_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "whose weights differ" in result.stderr  # the recorded purifier is another one
    with open(output_dir / "results.json") as handle:
        payload = json.load(handle)
    assert payload["settings"]["defenses"] == ["none", "adv_training", "comdefend",
                                               "comdefend_adv_training"]
    # The same weights as --classifier_dir: the same clean accuracy, in its own row.
    assert payload["clean_accuracy"]["adv_training"] == payload["clean_accuracy"]["none"]
    defenses = {(row["defense"], row["threat_model"]) for row in payload["rows"]}
    assert {("adv_training", "white_box"), ("comdefend_adv_training", "bpda_eot"),
            ("comdefend_adv_training", "oblivious")} <= defenses
    assert payload["metadata"]["adversarial_training"]["adv_training"]["method"] == "fgsm_rs"
    assert any("whose weights differ" in w for w in payload["metadata"]["provenance_warnings"])


def test_a_litert_purifier_is_a_defense_of_the_paper_table(folder_setup):
    pytest.importorskip("ai_edge_litert", reason="the [litert] extra runs .tflite purifiers")
    from comdefend_tf.litert import convert

    folder, classifier_dir, comdefend_dir, root, _ = folder_setup
    purifier, _ = attack_fixtures.tiny_comdefend()
    tflite = root / "purifier.tflite"
    tflite.write_bytes(convert.convert(purifier, "dynamic_int8", (8, 8), noise_std=1.0))
    output_dir = root / "litert"
    result = _run("train.evaluate", f"--dataset=folder:{folder}",
                  f"--classifier_dir={classifier_dir}", f"--comdefend_dir={comdefend_dir}",
                  f"--litert_purifier={tflite}", "--inference_noise_std=1.0", "--eot_samples=2",
                  "--attacks=fgsm", "--eps=0.3", "--num_examples=8", "--defenses=comdefend",
                  "--threat_models=oblivious,bpda_eot,bpda_identity", f"--output_dir={output_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output_dir / "results.json") as handle:
        payload = json.load(handle)
    assert payload["settings"]["defenses"] == ["none", "comdefend", "comdefend_litert"]
    litert = {row["threat_model"]: row for row in payload["rows"]
              if row["defense"] == "comdefend_litert"}
    assert set(litert) == {"oblivious", "bpda_eot", "bpda_identity"}
    assert "noise per call" in payload["metadata"]["litert_purifier"]
