"""The LiteRT export binary: what it writes (the model, its JSON record, atomically) and the
one ``error:`` line with exit status 1 for a request it cannot honour."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf import load_comdefend
from comdefend_tf.serving import export as serving_export
from comdefend_tf.training import provenance
from tests.conftest import REPO_ROOT, subprocess_env
from tests.fixtures.purifiers import save_spread_tiny_purifier


def _run(*flags):
    return subprocess.run([sys.executable, "-m", "export.export_litert", *flags], cwd=REPO_ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=240)


def _error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("litert_export")
    model_dir = save_spread_tiny_purifier(root / "model")
    images = root / "calibration" / "unlabelled"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(6):
        pixels = rng.integers(0, 256, (20, 24, 1), dtype=np.uint8)
        (images / f"{index}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    return {"root": root, "model_dir": model_dir, "calibration": str(root / "calibration")}


def test_writes_the_model_and_its_record(tmp_path, sources):
    pytest.importorskip("ai_edge_litert", reason="the op report needs the [litert] extra")
    from comdefend_tf.litert.runtime import LiteRTPurifier

    output = str(tmp_path / "purifier.tflite")
    result = _run(f"--model_dir={sources['model_dir']}", f"--output={output}",
                  "--variant=full_int8", "--image_size=16,16", "--noise=on",
                  "--inference_noise_std=1", f"--representative_data=folder:"
                  f"{sources['calibration']}", "--representative_images=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout and "int8 ops" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["purifier.tflite", "purifier.tflite.json"]
    record = json.loads((tmp_path / "purifier.tflite.json").read_text())
    purifier = load_comdefend(sources["model_dir"])
    assert record["variant"] == "full_int8" and record["image_size"] == [16, 16]
    assert record["noise"] == "on" and record["noise_std"] == 1.0
    assert record["calibration"] == {"source": f"folder:{sources['calibration']}", "images": 4}
    assert record["purifier_fingerprint"] == provenance.weights_fingerprint(purifier)
    assert record["bytes"] == os.path.getsize(output)
    assert "ELU" in record["op_report"]["float_ops"]
    assert "CONV_2D" in record["op_report"]["int8_ops"]
    litert = LiteRTPurifier(output)
    assert litert.randomized and litert.image_size == (16, 16)


def test_converts_a_serving_export_noise_off(tmp_path, sources):
    pytest.importorskip("ai_edge_litert", reason="the op report needs the [litert] extra")
    from comdefend_tf.litert.runtime import LiteRTPurifier

    purifier = load_comdefend(sources["model_dir"])
    version_dir = serving_export.export_savedmodel(purifier, str(tmp_path / "exports"))
    output = str(tmp_path / "from_saved_model.tflite")
    result = _run(f"--saved_model={version_dir}", f"--output={output}", "--image_size=16,16",
                  "--noise=off")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(open(output + ".json").read())
    assert record["noise"] == "off" and record["noise_std"] == 0.0
    assert record["purifier_fingerprint"] == provenance.weights_fingerprint(purifier)
    images = np.random.default_rng(3).random((2, 16, 16, 1), dtype=np.float32)
    litert = LiteRTPurifier(output)
    assert not litert.randomized
    np.testing.assert_allclose(litert.purify(images), np.asarray(purifier(images)), atol=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--model_dir={missing}", "--image_size=16,16", "--noise=off"], "no ComDefend model"),
    (["--model_dir={model}", "--image_size=16,x", "--noise=off"], "--image_size must be"),
    (["--model_dir={model}", "--image_size=16,16", "--noise=off", "--variant=full_int8",
      "--representative_data=folder:{missing}"], "not a directory"),
    (["--model_dir={model}", "--image_size=16,16"], "inference noise std is 0"),
])
def test_bad_requests_end_in_one_error_line_and_write_nothing(tmp_path, sources, flags,
                                                              message):
    output = tmp_path / "out.tflite"
    values = {"model": sources["model_dir"], "missing": str(tmp_path / "missing")}
    result = _run(*[flag.format(**values) for flag in flags], f"--output={output}")
    assert result.returncode == 1, result.stderr[-3000:]
    errors = _error_lines(result)
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_an_existing_output_is_kept_without_overwrite(tmp_path, sources):
    output = tmp_path / "kept.tflite"
    output.write_bytes(b"an earlier model")
    result = _run(f"--model_dir={sources['model_dir']}", f"--output={output}",
                  "--image_size=16,16", "--noise=off")
    assert result.returncode == 1
    assert "pass --overwrite" in _error_lines(result)[0]
    assert output.read_bytes() == b"an earlier model"
    assert sorted(os.listdir(tmp_path)) == ["kept.tflite"]
