"""The purifier composes with any Keras classifier: Sequential, functional, saved and reloaded,
fine-tuned behind a frozen purifier, and (as an export) through ``keras.layers.TFSMLayer``."""

import numpy as np
import pytest
import keras

from comdefend_tf import ComDefend, get_config, load_comdefend, save_comdefend
from comdefend_tf.io import datasets as data_lib
from comdefend_tf.serving.export import export_savedmodel

IMAGE_SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def digits():
    image_data = data_lib.load_dataset("digits")
    train_images, train_labels = data_lib.take_arrays(image_data.train, 512)
    test_images, test_labels = data_lib.take_arrays(image_data.test, 256)
    return train_images, train_labels, test_images, test_labels


@pytest.fixture(scope="module")
def purifier(digits, tmp_path_factory):
    """A tiny purifier trained briefly on digits, saved and loaded back as users get it."""
    keras.utils.set_random_seed(0)
    # A milder training noise than the paper's 20 so a tiny model learns in seconds
    # (about 21 dB PSNR on digits after 6 epochs).
    model = ComDefend(get_config("tiny", input_channels=1, train_noise_std=5.0), seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(digits[0], batch_size=32, epochs=6, verbose=0)
    model_dir = str(tmp_path_factory.mktemp("purifier"))
    save_comdefend(model, model_dir)
    return load_comdefend(model_dir)


def _classifier(num_classes=10, name="classifier"):
    return keras.Sequential([
        keras.Input(IMAGE_SHAPE),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(num_classes),
    ], name=name)


def test_sequential_composition_is_classifier_after_purifier(purifier, digits):
    classifier = _classifier()
    composed = keras.Sequential([keras.Input(IMAGE_SHAPE), purifier, classifier])
    images = digits[2][:16]
    np.testing.assert_allclose(np.asarray(composed(images)),
                               np.asarray(classifier(purifier(images))), atol=1e-6)
    assert composed.output_shape == (None, 10)


def test_functional_composition_survives_a_keras_file_round_trip(purifier, digits, tmp_path):
    classifier = _classifier()
    images_in = keras.Input(IMAGE_SHAPE, name="images")
    composed = keras.Model(images_in, classifier(purifier(images_in)), name="protected")
    images = digits[2][:16]
    expected = np.asarray(classifier(purifier(images)))
    np.testing.assert_allclose(np.asarray(composed(images)), expected, atol=1e-6)
    path = str(tmp_path / "protected.keras")
    composed.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(reloaded(images)), expected, atol=1e-6)
    assert isinstance(reloaded.layers[1], ComDefend)


def test_fine_tuning_a_classifier_behind_a_frozen_purifier(purifier, digits):
    train_images, train_labels, test_images, test_labels = digits
    keras.utils.set_random_seed(1)
    purifier.trainable = False
    try:
        classifier = _classifier()
        composed = keras.Sequential([keras.Input(IMAGE_SHAPE), purifier, classifier])
        composed.compile(optimizer=keras.optimizers.Adam(1e-2),
                         loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                         metrics=["accuracy"])
        assert len(composed.trainable_weights) == len(classifier.trainable_weights) == 4
        purifier_before = [np.array(w) for w in purifier.get_weights()]
        classifier_before = [np.array(w) for w in classifier.get_weights()]
        # Frozen means inference settings even with training=True (no training noise).
        images = test_images[:8]
        np.testing.assert_array_equal(np.asarray(purifier(images, training=True)),
                                      np.asarray(purifier(images)))
        history = composed.fit(train_images, train_labels, batch_size=32, epochs=4, verbose=0)
        losses = history.history["loss"]
        assert losses[-1] < 0.6 * losses[0]
        for before, after in zip(purifier_before, purifier.get_weights()):
            np.testing.assert_array_equal(before, after)
        assert any(not np.array_equal(before, after)
                   for before, after in zip(classifier_before, classifier.get_weights()))
        test_loss, test_accuracy = composed.evaluate(test_images, test_labels, verbose=0)
        assert test_accuracy > 0.6  # ten classes: chance is 0.1
    finally:
        purifier.trainable = True
    # Trainable again, training=True means the training noise.
    assert not np.array_equal(np.asarray(purifier(test_images[:8], training=True)),
                              np.asarray(purifier(test_images[:8])))


def test_an_export_composes_as_a_keras_layer(purifier, digits, tmp_path):
    version_dir = export_savedmodel(purifier, str(tmp_path))
    served_purifier = keras.layers.TFSMLayer(version_dir, call_endpoint="purify")
    classifier = _classifier()
    images_in = keras.Input(IMAGE_SHAPE)
    composed = keras.Model(images_in, classifier(served_purifier(images_in)["purified"]))
    images = digits[2][:8]
    np.testing.assert_allclose(np.asarray(composed(images)),
                               np.asarray(classifier(purifier(images))), atol=1e-5)
