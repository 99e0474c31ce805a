"""Training: the binary's output, resuming a killed run, and both distribute strategies."""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf import data, training
from comdefend_tf.config import get_config
from comdefend_tf.model import load_comdefend
from tests.conftest import REPO_ROOT, subprocess_env


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


class _Crash(Exception):
    pass


class _EpochRecorder(keras.callbacks.Callback):
    def __init__(self, crash_at=None):
        super().__init__()
        self.epochs, self.crash_at = [], crash_at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.crash_at:
            raise _Crash(f"simulated crash at the start of epoch {epoch}")
        self.epochs.append(epoch)


def test_killed_run_resumes_at_the_epoch_it_stopped(tmp_path, digits):
    config = get_config("tiny", input_channels=1, train_noise_std=1.0)
    model_dir = str(tmp_path / "run")
    first = _EpochRecorder(crash_at=2)
    with pytest.raises(_Crash):
        training.train_comdefend(config, digits, model_dir, epochs=4, batch_size=32,
                                 steps_per_epoch=3, verbose=0, extra_callbacks=[first])
    assert first.epochs == [0, 1]
    assert os.path.isdir(os.path.join(model_dir, training.BACKUP_SUBDIR))
    assert not os.path.exists(os.path.join(model_dir, "comdefend.keras"))
    second = _EpochRecorder()
    _, metrics = training.train_comdefend(config, digits, model_dir, epochs=4, batch_size=32,
                                          steps_per_epoch=3, verbose=0,
                                          extra_callbacks=[second])
    assert second.epochs == [2, 3]  # epochs 0 and 1 were not lost
    assert len(metrics["history"]["loss"]) == 2
    assert load_comdefend(model_dir).config == config


def test_channel_mismatch_is_explained(tmp_path, digits):
    with pytest.raises(ValueError, match="input_channels=1"):
        training.train_comdefend(get_config("tiny"), digits, str(tmp_path))


def test_train_binary_writes_model_and_reports_psnr(tmp_path):
    model_dir = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "-m", "train.train_comdefend", "--dataset=digits", "--config=tiny",
         "--epochs=2", "--batch_size=32", "--train_noise_std=1", f"--model_dir={model_dir}"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Held-out reconstruction PSNR (dB)" in result.stdout
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["held_out"]["num_images"] == 180
    assert 5.0 < metrics["held_out"]["psnr_db"] < 60.0
    assert len(metrics["history"]["val_psnr"]) == 2
    assert json.loads((model_dir / "config.json").read_text())["train_noise_std"] == 1.0
    assert any(name.startswith("events") for _, _, files in os.walk(model_dir / "logs")
               for name in files)


def test_train_binary_rejects_bad_flags(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "train.train_comdefend", "--dataset=digits", "--epochs=0",
         f"--model_dir={tmp_path}"], cwd=REPO_ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "epochs" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "train.train_comdefend", "--dataset=nope",
         f"--model_dir={tmp_path}"], cwd=REPO_ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "unknown dataset 'nope'" in result.stderr


MIRRORED_SCRIPT = """
import json, sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from comdefend_tf import data, training
from comdefend_tf.config import get_config
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
_, metrics = training.train_comdefend(get_config("tiny", input_channels=1), data.load_dataset(
    "digits"), sys.argv[1], epochs=1, batch_size=16, steps_per_epoch=4, strategy=strategy,
    verbose=0)
print(json.dumps({"replicas": metrics["replicas"], "loss": metrics["history"]["loss"]}))
"""


def test_mirrored_strategy_trains_on_two_logical_devices(tmp_path):
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, str(tmp_path)],
                            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["replicas"] == 2 and np.isfinite(summary["loss"][0])
    assert (tmp_path / "comdefend.keras").exists()


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_multi_worker_strategy_with_two_processes(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    model_dir = tmp_path / "model"
    processes = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers},
                                "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "train.train_comdefend", "--strategy=multi_worker",
             "--dataset=digits", "--config=tiny", "--epochs=2", "--steps_per_epoch=3",
             "--batch_size=8", f"--model_dir={model_dir}"],
            cwd=REPO_ROOT, env=subprocess_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    try:
        outputs = [process.communicate(timeout=300) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and len(metrics["history"]["loss"]) == 2
    # Both workers end with identical weights (their own checkpoints of the last epoch).
    chief = tf.train.load_checkpoint(str(model_dir / training.BACKUP_SUBDIR))
    other = tf.train.load_checkpoint(str(model_dir / ".worker1"))
    names = [name for name in chief.get_variable_to_shape_map() if "_trainable_variables" in name]
    assert len(names) == len(get_config("tiny", input_channels=1).encoder_widths) * 2 * 2 + 4
    for name in names:
        np.testing.assert_array_equal(chief.get_tensor(name), other.get_tensor(name))
