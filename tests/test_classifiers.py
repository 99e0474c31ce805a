"""Classifiers: architecture choice, logits shapes, ResNet50 weights from a local file only,
training to a saved model with held-out accuracy, resuming at the checkpointed step, refusing
NaN, loading and clear errors."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf import classifiers, training
from tests import attack_fixtures


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

    with pytest.raises(training.NonFiniteTraining, match="step 12"):
        classifiers.train_classifier(digits, model_dir, extra_callbacks=[_KillAfter(11, poison)],
                                     **dict(settings, epochs=3))
    assert open(os.path.join(model_dir, classifiers.KERAS_FILENAME), "rb").read() == before
    assert tf.train.latest_checkpoint(os.path.join(model_dir, training.BACKUP_SUBDIR)).endswith(
        "ckpt-10")
