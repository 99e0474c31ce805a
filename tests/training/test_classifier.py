"""Classifiers: architecture choice, logits shapes, ResNet50 weights from a local file only,
training to a saved model with held-out accuracy, resuming at the checkpointed step, refusing
NaN, loading and clear errors."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf.training import classifier as classifiers
from comdefend_tf.training import run_state
from comdefend_tf.training.purifier import train_comdefend
from tests.fixtures import attack_models as attack_fixtures


@pytest.mark.parametrize("shape, expected", [
    ((8, 8, 1), "small_cnn"), ((28, 28, 1), "small_cnn"), ((32, 32, 3), "resnet_cifar"),
    ((224, 224, 3), "resnet50")])
def test_auto_architecture_follows_the_image_shape(shape, expected):
    assert classifiers.choose_architecture(shape) == expected


def test_bad_architecture_and_class_count_are_rejected():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        classifiers.choose_architecture((8, 8, 1), "vgg")
    with pytest.raises(ValueError, match="fixed image size"):
        classifiers.choose_architecture((None, None, 3))
    with pytest.raises(ValueError, match="at least 2 classes"):
        classifiers.build_classifier((8, 8, 1), None)
    with pytest.raises(ValueError, match="only supported for resnet50"):
        classifiers.build_classifier((8, 8, 1), 10, weights_path="x.h5")


@pytest.mark.parametrize("shape, architecture", [
    ((8, 8, 1), "small_cnn"), ((28, 28, 1), "small_cnn"), ((32, 32, 3), "resnet_cifar")])
def test_classifiers_map_images_to_logits(shape, architecture):
    model = classifiers.build_classifier(shape, 10, architecture, seed=0)
    images = np.random.RandomState(0).rand(3, *shape).astype(np.float32)
    logits = np.asarray(model(images))
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    # Logits, not probabilities: rows do not sum to 1 and values leave [0, 1].
    assert not np.allclose(logits.sum(axis=1), 1.0)


def test_resnet50_loads_weights_from_a_local_file_only(tmp_path):
    source = keras.applications.ResNet50(weights=None, include_top=False, pooling="avg",
                                         input_shape=(32, 32, 3))
    path = str(tmp_path / "resnet50_notop.weights.h5")
    source.save_weights(path)
    model = classifiers.build_classifier((32, 32, 3), 7, "resnet50", weights_path=path)
    backbone = model.get_layer("resnet50")
    np.testing.assert_array_equal(backbone.get_layer("conv1_conv").kernel.numpy(),
                                  source.get_layer("conv1_conv").kernel.numpy())
    assert model.output_shape == (None, 7)
    with pytest.raises(FileNotFoundError, match="no ResNet50 weights file"):
        classifiers.build_classifier((32, 32, 3), 7, "resnet50",
                                     weights_path=str(tmp_path / "missing.h5"))


def test_caffe_preprocessing_matches_keras_resnet50_preprocess_input():
    images = np.random.RandomState(0).rand(2, 4, 4, 3).astype(np.float32)
    expected = keras.applications.resnet50.preprocess_input(images * 255.0)
    np.testing.assert_allclose(
        np.asarray(classifiers.CaffeImageNetPreprocess()(images)), expected, atol=1e-3)


def test_training_saves_an_accurate_classifier_that_reloads_identically():
    classifier, model_dir = attack_fixtures.tiny_classifier()
    with open(os.path.join(model_dir, classifiers.METRICS_FILENAME)) as handle:
        metrics = json.load(handle)
    assert metrics["held_out_accuracy"] > 0.85
    assert metrics["architecture"] == "small_cnn" and metrics["num_classes"] == 10
    assert not os.path.exists(os.path.join(model_dir, ".partial." + classifiers.KERAS_FILENAME))
    loaded = classifiers.load_classifier(model_dir)
    images, labels = attack_fixtures.attack_batch()
    np.testing.assert_allclose(classifiers.predict_logits(loaded, images),
                               classifiers.predict_logits(classifier, images), atol=1e-5)
    assert classifiers.accuracy(loaded, images, labels) == 1.0


def test_clean_training_keeps_its_settings_and_metrics_free_of_adversarial_keys():
    from comdefend_tf.training import provenance

    _, model_dir = attack_fixtures.tiny_classifier()
    with open(os.path.join(model_dir, run_state.BACKUP_SUBDIR, run_state.RUN_FILENAME)) as handle:
        settings = json.load(handle)
    # A clean run's resumable settings are those it had before adversarial training existed.
    assert set(settings) == {"kind", "architecture", "dataset", "image_shape", "num_classes",
                             "weights_path", "batch_size", "seed", "steps_per_epoch", "epochs",
                             "learning_rate"}
    assert provenance.adversarial_record(model_dir) is None
    with open(os.path.join(model_dir, classifiers.METRICS_FILENAME)) as handle:
        metrics = json.load(handle)
    assert provenance.ADVERSARIAL_KEY not in metrics
    assert "held_out_adversarial_accuracy" not in metrics
    assert "pgd_accuracy" not in metrics["history"]


def test_loading_and_training_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        classifiers.load_classifier(str(tmp_path))
    with pytest.raises(ValueError, match="default and mirrored"):
        classifiers.train_classifier(attack_fixtures.digits(), str(tmp_path / "m"),
                                     strategy="multi_worker")


class _Crash(Exception):
    pass


class _KillAfter(keras.callbacks.Callback):
    """Raises ``_Crash`` after global step ``step`` (or runs ``action(model)`` there)."""

    def __init__(self, step, action=None):
        super().__init__()
        self.step, self.action, self.steps = step, action, []

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.steps.append(step)
        if step == self.step:
            if self.action is None:
                raise _Crash(f"simulated kill after step {step}")
            self.action(self.model)


def test_classifier_training_resumes_mid_epoch_and_refuses_nan(tmp_path):
    settings = dict(epochs=2, batch_size=32, steps_per_epoch=5, checkpoint_every_steps=3,
                    verbose=0)
    digits = attack_fixtures.digits()
    reference, _ = classifiers.train_classifier(digits, str(tmp_path / "reference"), **settings)
    model_dir = str(tmp_path / "run")
    with pytest.raises(_Crash):
        classifiers.train_classifier(digits, model_dir, extra_callbacks=[_KillAfter(8)],
                                     **settings)
    resumed = _KillAfter(None)
    classifier, metrics = classifiers.train_classifier(digits, model_dir,
                                                       extra_callbacks=[resumed], **settings)
    assert resumed.steps == [7, 8, 9, 10]  # from the step-6 checkpoint, mid-epoch
    assert metrics["steps"] == 10 and metrics["history"]["epoch"] == [0, 1]
    for got, want in zip(classifier.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)

    # NaN weights: the run fails, keeps its checkpoint and the previous classifier file.
    before = open(os.path.join(model_dir, classifiers.KERAS_FILENAME), "rb").read()

    def poison(model):
        kernel = model.trainable_variables[0]
        kernel.assign(np.full(kernel.shape, np.nan, np.float32))

    with pytest.raises(run_state.NonFiniteTraining, match="step 12"):
        classifiers.train_classifier(digits, model_dir, extra_callbacks=[_KillAfter(11, poison)],
                                     **dict(settings, epochs=3))
    assert open(os.path.join(model_dir, classifiers.KERAS_FILENAME), "rb").read() == before
    assert tf.train.latest_checkpoint(os.path.join(model_dir, run_state.BACKUP_SUBDIR)).endswith(
        "ckpt-10")


# ------------------------------------------------------------------ behind a frozen purifier
MIRRORED_BEHIND_PURIFIER_SCRIPT = """
import json, sys, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from comdefend_tf.io import datasets as data
from comdefend_tf.training import classifier as classifiers, provenance
from comdefend_tf.model import load_comdefend
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
_, metrics = classifiers.train_classifier(
    data.load_dataset("digits"), sys.argv[2], epochs=1, batch_size=16, steps_per_epoch=4,
    strategy=strategy, verbose=0, purifier_dir=sys.argv[1])
print(json.dumps({"replicas": metrics["replicas"], "loss": metrics["history"]["loss"],
                  "recorded": metrics[provenance.PURIFIER_KEY]["fingerprint"],
                  "file": provenance.weights_fingerprint(load_comdefend(sys.argv[1]))}))
"""


@pytest.fixture(scope="module")
def coarse_purifier(tmp_path_factory):
    """``(purifier, model_dir)``: a cheap purifier that really changes the digits: the tiny
    config with one code bit per pixel, 200 steps (held-out PSNR about 13 dB), inference noise
    std 1 (a fresh draw per call). The clean-trained tiny classifier gets about half of its
    purified held-out digits right."""
    from comdefend_tf.config import get_config

    model_dir = str(tmp_path_factory.mktemp("coarse_purifier"))
    config = get_config("tiny", input_channels=1, code_channels=1, train_noise_std=5.0,
                        inference_noise_std=1.0)
    purifier, _ = train_comdefend(config, attack_fixtures.digits(), model_dir, epochs=1,
                                  steps_per_epoch=200, batch_size=20, seed=0, verbose=0,
                                  collapse_margin_db=None)
    return purifier, model_dir


class _PurifierWeightsAtTrainEnd(keras.callbacks.Callback):
    def on_train_end(self, logs=None):
        self.weights = [np.array(w) for w in self.model.purifier.weights]


def _file_weights(model_dir):
    from comdefend_tf.model import load_comdefend

    return [np.asarray(w) for w in load_comdefend(model_dir).weights]


def test_training_behind_a_frozen_purifier_beats_the_clean_classifier_on_purified_digits(
        tmp_path, coarse_purifier):
    from comdefend_tf.training import provenance
    from comdefend_tf.io.datasets import take_arrays
    from comdefend_tf.model import load_comdefend

    _, purifier_dir = coarse_purifier
    before = _file_weights(purifier_dir)
    digits = attack_fixtures.digits()
    seen = _PurifierWeightsAtTrainEnd()
    classifier, metrics = classifiers.train_classifier(
        digits, str(tmp_path / "behind"), epochs=4, batch_size=32, learning_rate=2e-3, seed=0,
        verbose=0, purifier_dir=purifier_dir, extra_callbacks=[seen])
    # The purifier the training ran (and its file) hold the weights they started with.
    assert len(seen.weights) == len(before) > 0
    for want, trained, stored in zip(before, seen.weights, _file_weights(purifier_dir)):
        np.testing.assert_array_equal(trained, want)
        np.testing.assert_array_equal(stored, want)
    record = metrics[provenance.PURIFIER_KEY]
    assert record["path"] == os.path.abspath(purifier_dir) and record["purified"] == "on_the_fly"
    assert record["fingerprint"] == provenance.weights_fingerprint(load_comdefend(purifier_dir))
    assert provenance.read_classifier_purifier(str(tmp_path / "behind")) == record
    # On real held-out digits, purified with fresh noise: a real margin over the classifier
    # trained on clean digits (measured: about 80 % against 54 %).
    images, labels = take_arrays(digits.test, 1000)
    purifier = load_comdefend(purifier_dir, seed=3)
    purified = np.concatenate([np.asarray(purifier(images)) for _ in range(3)])
    labels3 = np.concatenate([labels] * 3)
    clean_classifier, _ = attack_fixtures.tiny_classifier()
    retrained = classifiers.accuracy(classifier, purified, labels3)
    original = classifiers.accuracy(clean_classifier, purified, labels3)
    assert retrained >= original + 0.15, (retrained, original)
    assert abs(metrics["held_out_accuracy"] - retrained) < 0.08
    assert 0.0 <= metrics["held_out_accuracy_unpurified"] <= 1.0


def test_the_frozen_purifier_is_not_trainable_and_resume_replays_its_noise(tmp_path,
                                                                          coarse_purifier):
    from comdefend_tf.model import load_comdefend

    _, purifier_dir = coarse_purifier
    digits = attack_fixtures.digits()
    trainer = classifiers.PurifiedClassifier(load_comdefend(purifier_dir),
                                             classifiers.build_classifier((8, 8, 1), 10, seed=0))
    trainer(np.zeros((1, 8, 8, 1), np.float32))
    assert {id(v) for v in trainer.trainable_variables} == {
        id(v) for v in trainer.classifier.trainable_variables}
    settings = dict(epochs=2, batch_size=32, steps_per_epoch=5, checkpoint_every_steps=3,
                    verbose=0, purifier_dir=purifier_dir)
    reference, _ = classifiers.train_classifier(digits, str(tmp_path / "reference"), **settings)
    model_dir = str(tmp_path / "run")
    with pytest.raises(_Crash):
        classifiers.train_classifier(digits, model_dir, extra_callbacks=[_KillAfter(8)],
                                     **settings)
    resumed = _KillAfter(None)
    classifier, _ = classifiers.train_classifier(digits, model_dir, extra_callbacks=[resumed],
                                                 **settings)
    assert resumed.steps == [7, 8, 9, 10]
    # Equal to the uninterrupted run: the noise generator's state was checkpointed too.
    for got, want in zip(classifier.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # Another purifier in the same directory is another run: refused, not silently mixed.
    other_dir = str(tmp_path / "other_purifier")
    from comdefend_tf.config import get_config
    from comdefend_tf.model import ComDefend, save_comdefend

    save_comdefend(ComDefend(get_config("tiny", input_channels=1, code_channels=1), seed=9),
                   other_dir)
    with pytest.raises(run_state.TrainingError, match="purifier"):
        classifiers.train_classifier(digits, model_dir, **dict(settings, epochs=3,
                                                               purifier_dir=other_dir))


def test_fine_tuning_and_images_purified_in_advance_record_the_purifier(tmp_path,
                                                                       coarse_purifier):
    from comdefend_tf.training import provenance

    _, purifier_dir = coarse_purifier
    digits = attack_fixtures.digits()
    clean_classifier, clean_dir = attack_fixtures.tiny_classifier()
    # Fine-tuning starts from the saved classifier's weights (one step of Adam moves little).
    tuned, metrics = classifiers.train_classifier(
        digits, str(tmp_path / "tuned"), epochs=1, steps_per_epoch=1, batch_size=32,
        learning_rate=1e-5, verbose=0, init_classifier_dir=clean_dir, purifier_dir=purifier_dir)
    assert metrics["init_classifier"]["fingerprint"] == provenance.weights_fingerprint(
        clean_classifier)
    np.testing.assert_allclose(np.asarray(tuned.trainable_variables[0]),
                               np.asarray(clean_classifier.trainable_variables[0]), atol=1e-4)
    # Images purified in advance: nothing runs, the purifier is named by the manifest.
    purified_dir = tmp_path / "purified"
    purified_dir.mkdir()
    (purified_dir / "manifest.json").write_text(json.dumps({"model": purifier_dir}))
    _, metrics = classifiers.train_classifier(
        digits, str(tmp_path / "in_advance"), epochs=1, steps_per_epoch=2, batch_size=32,
        verbose=0, purified_input=True, purify_manifest=str(purified_dir))
    record = metrics[provenance.PURIFIER_KEY]
    assert record["purified"] == "in_advance" and "held_out_accuracy_unpurified" not in metrics
    assert record["path"] == os.path.abspath(purifier_dir)
    assert record["manifest"] == str(purified_dir / "manifest.json")
    with pytest.raises(ValueError, match="say which purifier"):
        classifiers.train_classifier(digits, str(tmp_path / "x"), epochs=1, verbose=0,
                                     purified_input=True)
    with pytest.raises(ValueError, match="not by"):
        classifiers.train_classifier(digits, str(tmp_path / "y"), epochs=1, verbose=0,
                                     purified_input=True, purify_manifest=str(purified_dir),
                                     purifier_dir=attack_fixtures.tiny_comdefend()[1])
    with pytest.raises(ValueError, match="has 10 outputs|takes images of shape"):
        classifiers.train_classifier(attack_fixtures.digits_rgb(), str(tmp_path / "z"),
                                     epochs=1, verbose=0, init_classifier_dir=clean_dir)


def test_mirrored_strategy_trains_behind_a_purifier_built_in_its_scope(tmp_path,
                                                                      coarse_purifier):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, subprocess_env

    _, purifier_dir = coarse_purifier
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_BEHIND_PURIFIER_SCRIPT, purifier_dir,
         str(tmp_path / "mirrored")], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["replicas"] == 2 and np.isfinite(summary["loss"][0])
    assert summary["recorded"] == summary["file"]
    assert (tmp_path / "mirrored" / classifiers.KERAS_FILENAME).exists()
