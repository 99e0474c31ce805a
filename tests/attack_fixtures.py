"""Shared, cached artefacts for the attack tests: a tiny classifier and a tiny ComDefend trained
on scikit-learn's 8x8 digits for a few seconds, and a tiny classifier of the same digits in RGB
(for attacks whose bugs depend on the channel count), saved once per test process.

Each function is cached, so test modules that run in one process share one training run.
"""

import dataclasses
import functools
import os
import tempfile

import numpy as np
import tensorflow as tf

from comdefend_tf.training import classifier as classifiers
from comdefend_tf.training import purifier as training
from comdefend_tf.io import datasets as data_lib
from comdefend_tf.config import get_config

NUM_ATTACK_IMAGES = 24


@functools.lru_cache(maxsize=None)
def workdir() -> str:
    return tempfile.mkdtemp(prefix="comdefend_attack_tests_")


@functools.lru_cache(maxsize=None)
def digits():
    return data_lib.load_dataset("digits")


@functools.lru_cache(maxsize=None)
def tiny_classifier():
    """``(classifier, model_dir)``: a small CNN trained 4 epochs on the digits (about 95 %)."""
    model_dir = os.path.join(workdir(), "classifier")
    classifier, _ = classifiers.train_classifier(digits(), model_dir, epochs=4, batch_size=32,
                                                 learning_rate=2e-3, seed=0, verbose=0)
    return classifier, model_dir


@functools.lru_cache(maxsize=None)
def tiny_comdefend():
    """``(purifier, model_dir)``: the ``small`` ComDefend config trained briefly on the digits
    (deterministic inference, hard bits)."""
    model_dir = os.path.join(workdir(), "comdefend")
    config = get_config("small", input_channels=1, train_noise_std=5.0)
    purifier, _ = training.train_comdefend(config, digits(), model_dir, epochs=2, batch_size=20,
                                           seed=0, verbose=0)
    return purifier, model_dir


@functools.lru_cache(maxsize=None)
def attack_batch():
    """The fixed batch the attack tests use: the first held-out digits the tiny classifier gets
    right, images float32 ``[n, 8, 8, 1]`` and labels int64 ``[n]``."""
    classifier, _ = tiny_classifier()
    images, labels = data_lib.take_arrays(digits().test, 4 * NUM_ATTACK_IMAGES)
    predictions = np.argmax(classifiers.predict_logits(classifier, images), axis=-1)
    correct = predictions == labels
    return images[correct][:NUM_ATTACK_IMAGES], labels[correct][:NUM_ATTACK_IMAGES]


def _to_rgb(image, label):
    # Three distinct channels, all in [0, 1], so an attack cannot treat them as one.
    return tf.concat([image, 0.5 * image + 0.25, 1.0 - image], axis=-1), label


@functools.lru_cache(maxsize=None)
def digits_rgb():
    """The digits as 8x8x3 RGB images (channels: x, x / 2 + 1/4, 1 - x)."""
    gray = digits()
    return dataclasses.replace(gray, train=gray.train.map(_to_rgb), test=gray.test.map(_to_rgb),
                               image_shape=tuple(gray.image_shape[:2]) + (3,))


@functools.lru_cache(maxsize=None)
def tiny_rgb_classifier():
    """``(classifier, model_dir)``: the tiny classifier trained on ``digits_rgb``."""
    model_dir = os.path.join(workdir(), "classifier_rgb")
    classifier, _ = classifiers.train_classifier(digits_rgb(), model_dir, epochs=4,
                                                 batch_size=32, learning_rate=2e-3, seed=0,
                                                 verbose=0)
    return classifier, model_dir


@functools.lru_cache(maxsize=None)
def attack_batch_rgb():
    """Like ``attack_batch``, from ``digits_rgb`` and ``tiny_rgb_classifier``."""
    classifier, _ = tiny_rgb_classifier()
    images, labels = data_lib.take_arrays(digits_rgb().test, 4 * NUM_ATTACK_IMAGES)
    predictions = np.argmax(classifiers.predict_logits(classifier, images), axis=-1)
    correct = predictions == labels
    return images[correct][:NUM_ATTACK_IMAGES], labels[correct][:NUM_ATTACK_IMAGES]
