"""Shared, cached artefacts for the attack tests: a tiny classifier and a tiny ComDefend trained
on scikit-learn's 8x8 digits for a few seconds, saved once per test process.

Each function is cached, so test modules that run in one process share one training run.
"""

import functools
import os
import tempfile

import numpy as np

from comdefend_tf import classifiers, training
from comdefend_tf import data as data_lib
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
