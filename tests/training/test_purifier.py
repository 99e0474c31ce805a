"""Training: the binary's output, resuming a killed run at its checkpointed step, refusing
diverged and collapsed runs without losing the previous model, and the distribute strategies."""

import json
import os
import random
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf.io import datasets as data
from comdefend_tf.training import purifier, run_state
from comdefend_tf.config import get_config
from comdefend_tf.model import ComDefend, load_comdefend, save_comdefend
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
        purifier.train_comdefend(config, digits, model_dir, epochs=4, batch_size=32,
                                 steps_per_epoch=3, verbose=0, extra_callbacks=[first],
                                 collapse_margin_db=None)
    assert first.epochs == [0, 1]
    assert os.path.isdir(os.path.join(model_dir, run_state.BACKUP_SUBDIR))
    assert not os.path.exists(os.path.join(model_dir, "comdefend.keras"))
    second = _EpochRecorder()
    _, metrics = purifier.train_comdefend(config, digits, model_dir, epochs=4, batch_size=32,
                                          steps_per_epoch=3, verbose=0,
                                          extra_callbacks=[second], collapse_margin_db=None)
    assert second.epochs == [2, 3]  # epochs 0 and 1 were not lost
    # history.json in the backup keeps the epochs of the killed process too.
    assert metrics["history"]["epoch"] == [0, 1, 2, 3] and len(metrics["history"]["loss"]) == 4
    assert metrics["steps"] == 12
    assert load_comdefend(model_dir).config == config


def test_channel_mismatch_is_explained(tmp_path, digits):
    with pytest.raises(ValueError, match="input_channels=1"):
        purifier.train_comdefend(get_config("tiny"), digits, str(tmp_path))


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
    assert metrics["verdict"] == "ok"
    assert metrics["held_out"]["psnr_db"] > metrics["mean_image_psnr_db"] + 1.0
    progress = json.loads((model_dir / run_state.PROGRESS_FILENAME).read_text())
    assert progress["state"] == "done" and progress["step"] == progress["total_steps"] == 100
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
from comdefend_tf.io import datasets as data
from comdefend_tf.training import purifier
from comdefend_tf.config import get_config
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
_, metrics = purifier.train_comdefend(get_config("tiny", input_channels=1), data.load_dataset(
    "digits"), sys.argv[1], epochs=1, batch_size=16, steps_per_epoch=4, strategy=strategy,
    verbose=0, collapse_margin_db=None)
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


def _run_workers(model_dir, *flags):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers},
                                "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "train.train_comdefend", "--strategy=multi_worker",
             "--dataset=digits", "--config=tiny", "--train_noise_std=1", "--steps_per_epoch=3",
             "--batch_size=8", "--collapse_margin_db=-1", f"--model_dir={model_dir}", *flags],
            cwd=REPO_ROOT, env=subprocess_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    try:
        outputs = [process.communicate(timeout=300) for process in processes]
    finally:
        for process in processes:
            process.kill()
    return processes, outputs


def test_multi_worker_strategy_with_two_processes(tmp_path):
    model_dir = tmp_path / "model"
    processes, outputs = _run_workers(model_dir, "--epochs=2")
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and len(metrics["history"]["loss"]) == 2
    _assert_workers_agree(model_dir, step=6)
    # Two more epochs: both workers resume from the chief's step-6 checkpoint, at the same step
    # (they check it with a collective), and end with identical weights again.
    outputs = _run_workers(model_dir, "--epochs=4")
    for process, (_, stderr) in zip(*outputs):
        assert process.returncode == 0, stderr[-3000:]
    progress = json.loads((model_dir / run_state.PROGRESS_FILENAME).read_text())
    assert progress["resumed_from_step"] == 6 and progress["step"] == 12
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["history"]["epoch"] == [0, 1, 2, 3] and metrics["steps"] == 12
    _assert_workers_agree(model_dir, step=12)


def _assert_workers_agree(model_dir, step):
    """Both workers' last checkpoints are of ``step`` and hold identical variables."""
    chief_path = tf.train.latest_checkpoint(str(model_dir / run_state.BACKUP_SUBDIR))
    other_path = tf.train.latest_checkpoint(str(model_dir / ".worker1"))
    assert chief_path.endswith(f"ckpt-{step}") and other_path.endswith(f"ckpt-{step}")
    chief, other = tf.train.load_checkpoint(chief_path), tf.train.load_checkpoint(other_path)
    names = [name for name in chief.get_variable_to_shape_map()
             if name.startswith(("model_variables/", "optimizer_variables/"))]
    widths = get_config("tiny", input_channels=1).encoder_widths
    # kernels and biases of both stacks, the noise seed state; Adam: step, rate, 2 per weight
    assert len(names) == ((len(widths) + 1) * 2 * 2 + 1) + (2 + (len(widths) + 1) * 2 * 2 * 2)
    for name in names:
        np.testing.assert_array_equal(chief.get_tensor(name), other.get_tensor(name))


# ----------------------------------------------------------------- step checkpoints and resume
# 12 steps leave the tiny purifier no better than the mean image: the collapse check has its
# own tests.
TINY = dict(epochs=2, batch_size=16, steps_per_epoch=6, checkpoint_every_steps=4, verbose=0,
            collapse_margin_db=None)


class _StepRecorder(keras.callbacks.Callback):
    """Records the global step after every batch; raises ``_Crash`` after ``crash_after``, or
    runs ``action(model)`` there (a stand-in for a kill or a fault at that moment)."""

    def __init__(self, crash_after=None, action=None, crash_on_train_end=False):
        super().__init__()
        self.steps, self.crash_after, self.action = [], crash_after, action
        self.crash_on_train_end = crash_on_train_end

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.steps.append(step)
        if step == self.crash_after:
            if self.action is None:
                raise _Crash(f"simulated kill after step {step}")
            self.action(self.model)

    def on_train_end(self, logs=None):
        if self.crash_on_train_end:
            raise _Crash("simulated kill after the last step, before the model is saved")


def _tiny_config():
    return get_config("tiny", input_channels=1, train_noise_std=1.0)


def _weights(model):
    return [np.asarray(variable) for variable in model.trainable_variables]


def _progress(model_dir):
    with open(os.path.join(model_dir, run_state.PROGRESS_FILENAME)) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits):
    """The tiny reference run (12 steps, checkpoints at 4, 6, 8, 12): its final weights."""
    model_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    model, _ = purifier.train_comdefend(_tiny_config(), digits, model_dir, **TINY)
    return _weights(model)


def test_killed_mid_epoch_resumes_at_the_checkpointed_step_and_matches(tmp_path, digits,
                                                                      uninterrupted):
    model_dir = str(tmp_path / "run")
    killed = _StepRecorder(crash_after=11)  # epoch 1, step 5 of 6; last checkpoint: step 8
    with pytest.raises(_Crash):
        purifier.train_comdefend(_tiny_config(), digits, model_dir, extra_callbacks=[killed],
                                 **TINY)
    assert killed.steps == list(range(1, 12))
    assert _progress(model_dir)["step"] == 11 and _progress(model_dir)["checkpoint_step"] == 8
    resumed = _StepRecorder()
    model, metrics = purifier.train_comdefend(_tiny_config(), digits, model_dir,
                                              extra_callbacks=[resumed], **TINY)
    assert resumed.steps == [9, 10, 11, 12]  # from the checkpoint, not the epoch start (7)
    assert _progress(model_dir)["resumed_from_step"] == 8
    # Same batches in the same order, same noise draws: the uninterrupted run's weights.
    for got, want in zip(_weights(model), uninterrupted):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert metrics["steps"] == 12 and metrics["history"]["epoch"] == [0, 1]


def test_kill_while_a_checkpoint_is_written_leaves_a_resumable_run(tmp_path, digits,
                                                                   uninterrupted):
    model_dir = str(tmp_path / "run")
    with pytest.raises(_Crash):
        purifier.train_comdefend(_tiny_config(), digits, model_dir,
                                 extra_callbacks=[_StepRecorder(crash_after=7)], **TINY)
    backup = os.path.join(model_dir, run_state.BACKUP_SUBDIR)
    assert tf.train.latest_checkpoint(backup).endswith("ckpt-6")
    # What a kill inside the write of ckpt-8 leaves: TensorFlow's temporary shard folder and a
    # truncated data file; the 'checkpoint' state file is replaced only after a complete write.
    os.makedirs(os.path.join(backup, "ckpt-8_temp"))
    with open(os.path.join(backup, "ckpt-8_temp", "part-00000-of-00001.data-00000-of-00001"),
              "wb") as handle:
        handle.write(b"\0" * 100)
    with open(os.path.join(backup, "ckpt-8.data-00000-of-00001"), "wb") as handle:
        handle.write(b"partial")
    resumed = _StepRecorder()
    model, _ = purifier.train_comdefend(_tiny_config(), digits, model_dir,
                                        extra_callbacks=[resumed], **TINY)
    assert resumed.steps == list(range(7, 13))
    assert not os.path.exists(os.path.join(backup, "ckpt-8_temp"))  # cleaned up on resume
    for got, want in zip(_weights(model), uninterrupted):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(tmp_path, digits):
    model_dir = str(tmp_path / "run")
    with pytest.raises(_Crash):
        purifier.train_comdefend(_tiny_config(), digits, model_dir,
                                 extra_callbacks=[_StepRecorder(crash_after=9)], **TINY)
    backup = os.path.join(model_dir, run_state.BACKUP_SUBDIR)
    assert tf.train.latest_checkpoint(backup).endswith("ckpt-8")
    with open(os.path.join(backup, "ckpt-8.index"), "wb") as handle:
        handle.write(b"corrupted by a disk fault")
    resumed = _StepRecorder()
    purifier.train_comdefend(_tiny_config(), digits, model_dir, extra_callbacks=[resumed],
                             **TINY)
    assert resumed.steps[0] == 7  # resumed from ckpt-6


def test_finished_but_unsaved_run_only_writes_the_model(tmp_path, digits, uninterrupted):
    model_dir = str(tmp_path / "run")
    with pytest.raises(_Crash):
        purifier.train_comdefend(_tiny_config(), digits, model_dir,
                                 extra_callbacks=[_StepRecorder(crash_on_train_end=True)],
                                 **TINY)
    assert not os.path.exists(os.path.join(model_dir, "comdefend.keras"))
    resumed = _StepRecorder()
    model, metrics = purifier.train_comdefend(_tiny_config(), digits, model_dir,
                                              extra_callbacks=[resumed], **TINY)
    assert resumed.steps == []  # no step trained again
    assert _progress(model_dir)["resumed_from_step"] == 12 and metrics["steps"] == 12
    loaded = load_comdefend(model_dir)
    for got, want in zip(_weights(loaded), uninterrupted):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # A finished run cannot silently ignore a new learning rate, nor resume other settings.
    with pytest.raises(purifier.TrainingError, match="would change nothing"):
        purifier.train_comdefend(_tiny_config(), digits, model_dir, learning_rate=1e-4, **TINY)
    with pytest.raises(purifier.TrainingError, match="batch_size: 16 -> 8"):
        purifier.train_comdefend(_tiny_config(), digits, model_dir,
                                 **dict(TINY, batch_size=8))
    # More epochs continue the finished run.
    more = _StepRecorder()
    purifier.train_comdefend(_tiny_config(), digits, model_dir, extra_callbacks=[more],
                             **dict(TINY, epochs=3))
    assert more.steps == list(range(13, 19))


# ------------------------------------------------------------------- non-finite and collapse
def _poison(model):
    kernel = model.trainable_variables[0]
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))


def test_non_finite_loss_fails_and_keeps_checkpoints_and_the_previous_model(tmp_path, digits):
    model_dir = str(tmp_path / "run")
    previous = ComDefend(_tiny_config(), seed=1)
    previous(np.zeros((1, 8, 8, 1), np.float32))
    keras_path = save_comdefend(previous, model_dir, {"previous": True})
    before = open(keras_path, "rb").read()
    diverging = _StepRecorder(crash_after=6, action=_poison)  # after ckpt-6 is written
    with pytest.raises(purifier.NonFiniteTraining, match="step 7.*step 6") as caught:
        purifier.train_comdefend(_tiny_config(), digits, model_dir,
                                 extra_callbacks=[diverging], **TINY)
    assert caught.value.step == 7 and caught.value.checkpoint_step == 6
    assert open(keras_path, "rb").read() == before
    backup = os.path.join(model_dir, run_state.BACKUP_SUBDIR)
    assert tf.train.latest_checkpoint(backup).endswith("ckpt-6")
    assert _progress(model_dir)["state"] == "diverged"
    # Non-finite weights are never checkpointed.
    model = ComDefend(_tiny_config(), seed=0)
    model(np.zeros((1, 8, 8, 1), np.float32))
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    state = run_state.RunState(str(tmp_path / "other"), model, optimizer, {"learning_rate": 1e-3})
    state.save(5)
    _poison(model)
    with pytest.raises(purifier.NonFiniteTraining, match="a weight"):
        state.save(6)
    assert tf.train.latest_checkpoint(str(tmp_path / "other" / "backup")).endswith("ckpt-5")
    # The kept checkpoint resumes (here with a lower learning rate) to a finite model.
    resumed = _StepRecorder()
    model, metrics = purifier.train_comdefend(_tiny_config(), digits, model_dir,
                                              extra_callbacks=[resumed],
                                              **dict(TINY, learning_rate=5e-4))
    assert resumed.steps[0] == 7 and metrics["learning_rate"] == 5e-4
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(5e-4)
    assert run_state.all_finite(load_comdefend(model_dir).variables)


def test_binary_refuses_a_collapsed_model_and_keeps_the_previous_one(tmp_path):
    model_dir = tmp_path / "model"
    previous = ComDefend(_tiny_config(), seed=1)
    previous(np.zeros((1, 8, 8, 1), np.float32))
    keras_path = save_comdefend(previous, str(model_dir), {"previous": True})
    before = open(keras_path, "rb").read()
    # One step leaves the tiny purifier untrained: its near-constant output is worse than the
    # mean image.
    result = subprocess.run(
        [sys.executable, "-m", "train.train_comdefend", "--dataset=digits", "--config=tiny",
         "--epochs=1", "--steps_per_epoch=1", "--batch_size=16", f"--model_dir={model_dir}"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "collapsed" in result.stderr and "--learning_rate=0.0001" in result.stderr
    assert "--noise_warmup_steps=100" in result.stderr
    assert open(keras_path, "rb").read() == before
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["verdict"] == "collapsed"
    assert metrics["held_out"]["psnr_db"] < metrics["mean_image_psnr_db"] + 1.0
    assert tf.train.latest_checkpoint(str(model_dir / "backup")).endswith("ckpt-1")


def test_binary_exits_non_zero_on_nan_and_the_run_resumes(tmp_path, digits):
    model_dir = tmp_path / "model"
    settings = dict(batch_size=16, steps_per_epoch=3, collapse_margin_db=None, verbose=0)
    purifier.train_comdefend(_tiny_config(), digits, str(model_dir), epochs=1, **settings)
    keras_path = model_dir / "comdefend.keras"
    before = keras_path.read_bytes()
    # The same run, one more epoch at an absurd learning rate: Adam steps of 1e30 overflow the
    # activations and the loss becomes NaN.
    diverged = subprocess.run(
        [sys.executable, "-m", "train.train_comdefend", "--dataset=digits", "--config=tiny",
         "--steps_per_epoch=3", "--batch_size=16", "--train_noise_std=1", "--epochs=2",
         "--learning_rate=1e30", f"--model_dir={model_dir}"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert diverged.returncode != 0
    assert "NaN or infinite" in diverged.stderr
    assert "checkpoint, step 3, stays" in diverged.stderr
    assert keras_path.read_bytes() == before
    assert tf.train.latest_checkpoint(str(model_dir / "backup")).endswith("ckpt-3")
    resumed = _StepRecorder()
    purifier.train_comdefend(_tiny_config(), digits, str(model_dir), epochs=2,
                             extra_callbacks=[resumed], **settings)
    assert resumed.steps == [4, 5, 6]
    assert keras_path.read_bytes() != before


def test_fault_injection_plan_spreads_20_seeded_kills_over_the_run():
    from tests.fixtures import fault_inject_training as fault

    args = fault.parse_args([])
    plan = fault.plan_kills(args, random.Random(0))
    assert plan == fault.plan_kills(args, random.Random(0))  # rerunnable
    assert len(plan) == 20 and {phase for phase, _ in plan} == set(fault.PHASES)
    in_run = [target for phase, target in plan if phase in ("mid_epoch", "checkpoint")]
    assert in_run == sorted(in_run) and 0 < in_run[0] and in_run[-1] <= 200
    assert all(target % 5 == 0 for phase, target in plan if phase == "checkpoint")
    assert [phase for phase, _ in plan[-3:]] == ["after_training"] * 3
