"""The classifiers ComDefend protects, and how to train, save and load them.

Every classifier here is a Keras model from images float32 ``[batch, height, width, channels]``
in [0, 1] to **logits** float32 ``[batch, num_classes]`` (no softmax), so any attack written
against a logits callable (cleverhans, foolbox) and any purifier with the same image face
compose with it: ``classifier(purifier(images))``.

Architectures (``ARCHITECTURES``):

* ``small_cnn``: two 3x3 convolution blocks and a dense layer; for 8x8 and 28x28 grayscale
  digits (about 0.2 M parameters at 28x28, seconds per epoch on a CPU).
* ``resnet_cifar``: a ResNet-20-style network (He et al. 2016, CIFAR variant: 3 stages of 16,
  32, 64 channels, ``blocks_per_stage`` residual blocks each) for 32x32 RGB.
* ``resnet50``: ``keras.applications.ResNet50`` (``weights=None``, never downloaded) behind a
  registered preprocessing layer that maps [0, 1] RGB to the Caffe-style input those weights
  expect; ImageNet weights load from a local ``.h5``/``.weights.h5`` file when given.
* ``auto``: chooses by input shape (``choose_architecture``).

Training (``train_classifier``) uses ``fit`` with the step checkpoints, data order,
non-finite checks and strategies of ``run_state``, ``stream`` and ``strategies``: a killed run
resumes at its last checkpointed step, a diverged run raises ``NonFiniteTraining`` and writes
no model; ``save_classifier`` writes ``MODEL_DIR/classifier.keras`` and ``metrics.json``
atomically. With ``purifier_dir`` the classifier is trained behind a frozen purifier (on the
fly, ``PurifiedClassifier``, or on images purified in advance with ``purified_input``), and
``metrics.json`` records that purifier under ``provenance.PURIFIER_KEY``
(docs/internals/training.md). With ``adversarial`` settings it trains on PGD or FGSM-RS batches
(``comdefend_tf.training.adversarial``, docs/adversarial_training.md).
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from comdefend_tf.io import datasets as data_lib
from comdefend_tf.io.atomic import atomic_path, write_json_atomic
from comdefend_tf.training import adversarial as adversarial_lib
from comdefend_tf.training import provenance, run_state, strategies, stream

ARCHITECTURES = ("auto", "small_cnn", "resnet_cifar", "resnet50")
KERAS_FILENAME = "classifier.keras"
METRICS_FILENAME = "metrics.json"
# The per-channel means (BGR order, 0..255 scale) Keras' ImageNet ResNet50 weights expect.
_CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)


def choose_architecture(image_shape, name: str = "auto") -> str:
    """The architecture for images of ``image_shape`` ``(height, width, channels)``.

    ``auto`` picks ``small_cnn`` for grayscale images up to 64x64, ``resnet_cifar`` for colour
    images up to 64x64 and ``resnet50`` for anything larger; any other name is returned after
    validation.

    Raises:
      ValueError: an unknown architecture name, or an image shape without a known size.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    if name != "auto":
        return name
    height, width, channels = image_shape
    if height is None or width is None:
        raise ValueError(f"architecture auto needs a fixed image size, got {image_shape}; pass "
                         "an image size or name the architecture")
    if max(height, width) > 64:
        return "resnet50"
    return "small_cnn" if channels == 1 else "resnet_cifar"


def build_classifier(image_shape, num_classes: int, architecture: str = "auto",
                     weights_path: str | None = None, blocks_per_stage: int = 3,
                     seed: int | None = None) -> keras.Model:
    """A fresh (or locally loaded) classifier from images in [0, 1] to logits.

    Args:
      image_shape: ``(height, width, channels)`` of the input images.
      num_classes: number of logits.
      architecture: a name from ``ARCHITECTURES``.
      weights_path: ``resnet50`` only: a local Keras weights file of ``ResNet50(include_top=
        True)`` (ImageNet, 1000 classes; needs ``num_classes == 1000``) or of ``ResNet50(
        include_top=False)`` (then a fresh head with ``num_classes`` logits is added). Never
        downloaded.
      blocks_per_stage: ``resnet_cifar`` only: residual blocks per stage (3 gives ResNet-20).
      seed: seeds the weight initialisers.

    Returns:
      a ``keras.Model`` named after the architecture: float32 ``[B, H, W, C]`` in [0, 1] ->
      float32 logits ``[B, num_classes]``.

    Raises:
      ValueError: bad shape, class count or architecture; FileNotFoundError: missing weights.
    """
    if num_classes is None or num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes} (is the "
                         "dataset labelled?)")
    architecture = choose_architecture(image_shape, architecture)
    if weights_path is not None and architecture != "resnet50":
        raise ValueError(f"weights_path is only supported for resnet50, not {architecture}")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    if architecture == "small_cnn":
        return _small_cnn(image_shape, num_classes)
    if architecture == "resnet_cifar":
        return _resnet_cifar(image_shape, num_classes, blocks_per_stage)
    return _resnet50(image_shape, num_classes, weights_path)


def _small_cnn(image_shape, num_classes):
    images = keras.Input(image_shape, name="images")
    features = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(images)
    # 8x8 digits keep their resolution through the first block; 28x28 digits are pooled twice.
    if min(image_shape[0], image_shape[1]) >= 16:
        features = keras.layers.MaxPooling2D(2, name="pool1")(features)
    features = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(features)
    features = keras.layers.MaxPooling2D(2, name="pool2")(features)
    features = keras.layers.Flatten(name="flatten")(features)
    features = keras.layers.Dense(128, activation="relu", name="dense")(features)
    logits = keras.layers.Dense(num_classes, name="logits")(features)
    return keras.Model(images, logits, name="small_cnn")


def _residual_block(features, filters, stride, name):
    shortcut = features
    features = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                                   kernel_initializer="he_normal", name=f"{name}_conv1")(features)
    features = keras.layers.BatchNormalization(name=f"{name}_bn1")(features)
    features = keras.layers.Activation("relu", name=f"{name}_relu1")(features)
    features = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                   kernel_initializer="he_normal", name=f"{name}_conv2")(features)
    features = keras.layers.BatchNormalization(name=f"{name}_bn2")(features)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                       name=f"{name}_shortcut")(shortcut)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_shortcut_bn")(shortcut)
    features = keras.layers.Add(name=f"{name}_add")([features, shortcut])
    return keras.layers.Activation("relu", name=f"{name}_out")(features)


def _resnet_cifar(image_shape, num_classes, blocks_per_stage):
    if blocks_per_stage < 1:
        raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
    images = keras.Input(image_shape, name="images")
    centred = keras.layers.Rescaling(2.0, offset=-1.0, name="centre")(images)
    features = keras.layers.Conv2D(16, 3, padding="same", use_bias=False,
                                   kernel_initializer="he_normal", name="stem_conv")(centred)
    features = keras.layers.BatchNormalization(name="stem_bn")(features)
    features = keras.layers.Activation("relu", name="stem_relu")(features)
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 1 and block == 0 else 1
            features = _residual_block(features, filters, stride, f"stage{stage}_block{block}")
    features = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    logits = keras.layers.Dense(num_classes, name="logits")(features)
    return keras.Model(images, logits, name="resnet_cifar")


@keras.saving.register_keras_serializable(package="comdefend_tf")
class CaffeImageNetPreprocess(keras.layers.Layer):
    """RGB images in [0, 1] -> the BGR, mean-subtracted 0..255 input of Keras' ImageNet ResNet50.

    Input float ``[B, H, W, 3]`` (or ``[B, H, W, 1]``, repeated to three channels); output float
    ``[B, H, W, 3]`` with values in about [-124, 152].
    """

    def call(self, images):
        if images.shape[-1] == 1:
            images = ops.concatenate([images] * 3, axis=-1)
        bgr = ops.flip(images, axis=-1) * 255.0
        return bgr - ops.convert_to_tensor(_CAFFE_BGR_MEANS, dtype=bgr.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (3,)


def _resnet50(image_shape, num_classes, weights_path):
    images = keras.Input(image_shape, name="images")
    preprocessed = CaffeImageNetPreprocess(name="caffe_preprocess")(images)
    input_shape = tuple(image_shape[:2]) + (3,)
    if weights_path is not None and not os.path.isfile(weights_path):
        raise FileNotFoundError(f"no ResNet50 weights file at {weights_path!r}")
    full_top = weights_path is None and num_classes == 1000
    if weights_path is not None:
        # A file with the 1000-class head loads into include_top=True, a headless one into
        # include_top=False: try the matching layout first.
        backbone = None
        for include_top in (num_classes == 1000, num_classes != 1000):
            candidate = keras.applications.ResNet50(
                weights=None, include_top=include_top, input_shape=input_shape,
                pooling=None if include_top else "avg", classifier_activation=None)
            try:
                candidate.load_weights(weights_path)
            except (ValueError, KeyError) as error:
                last_error = error
                continue
            backbone, full_top = candidate, include_top
            break
        if backbone is None:
            raise ValueError(f"{weights_path!r} holds neither ResNet50 weights with the ImageNet "
                             f"head nor without it: {last_error}")
        if full_top and num_classes != 1000:
            raise ValueError(f"{weights_path!r} has the 1000-class ImageNet head but the data "
                             f"has {num_classes} classes")
    else:
        backbone = keras.applications.ResNet50(
            weights=None, include_top=full_top, input_shape=input_shape,
            pooling=None if full_top else "avg", classes=1000, classifier_activation=None)
    features = backbone(preprocessed)
    logits = features if full_top else keras.layers.Dense(num_classes, name="logits")(features)
    return keras.Model(images, logits, name="resnet50")


# ------------------------------------------------------------------------ train, save, load
def predict_logits(classifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits float32 ``[n, num_classes]`` of ``images`` float32 ``[n, H, W, C]`` in [0, 1]."""
    outputs = [np.asarray(classifier(images[start:start + batch_size], training=False))
               for start in range(0, len(images), batch_size)]
    return np.concatenate(outputs).astype(np.float32)


def accuracy(classifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Share of ``images`` (float32 ``[n, H, W, C]`` in [0, 1]) whose argmax logit equals
    ``labels`` (int ``[n]``), in [0, 1]."""
    predictions = np.argmax(predict_logits(classifier, images, batch_size), axis=-1)
    return float(np.mean(predictions == np.asarray(labels)))


def _compile(model, learning_rate):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])


class PurifiedClassifier(keras.Model):
    """``classifier(purifier(images))`` with the purifier frozen: what is trained when a
    classifier learns behind a purifier.

    Images float32 ``[B, H, W, C]`` in [0, 1] -> logits ``[B, num_classes]``. The purifier is set
    ``trainable=False`` and always runs its inference settings (a frozen ``ComDefend`` ignores
    ``training``): its inference noise, when it has any, is drawn afresh at every call from its
    seed generator, whose state is a model variable (checkpointed, so a resumed run replays the
    draws). Only the classifier's variables are trainable. The wrapper is never saved: the
    classifier is (``save_classifier``), and its ``metrics.json`` names the purifier.
    """

    def __init__(self, purifier: keras.Model, classifier: keras.Model, **kwargs):
        super().__init__(**kwargs)
        purifier.trainable = False
        self.purifier = purifier
        self.classifier = classifier

    def call(self, images, training=None):
        purified = self.purifier(images, training=False)
        return self.classifier(purified, training=training)


def _purifier_provenance(image_data, purifier_dir, purified_input, purify_manifest, seed):
    """``(purifier to run or None, provenance record or None)`` for ``train_classifier``."""
    from comdefend_tf.model import load_comdefend

    if purify_manifest is not None and not purified_input:
        raise ValueError("purify_manifest describes images purified in advance; pass "
                         "purified_input=True with it")
    if not purified_input:
        if purifier_dir is None:
            return None, None
        purifier = load_comdefend(purifier_dir, seed=seed)
        if purifier.config.input_channels != image_data.channels:
            raise ValueError(f"the purifier {purifier_dir!r} takes "
                             f"{purifier.config.input_channels}-channel images but dataset "
                             f"{image_data.name!r} has {image_data.channels} channels")
        return purifier, provenance.purifier_record(purifier, purifier_dir)
    if purify_manifest is None:
        purify_manifest = provenance.find_purify_manifest(image_data.name)
    if purifier_dir is None and purify_manifest is None:
        raise ValueError(f"purified_input: say which purifier purified {image_data.name!r}: "
                         "give purifier_dir (fingerprinted, not run) or the purify command's "
                         "manifest.json (purify_manifest)")
    record = provenance.manifest_record(purify_manifest) if purify_manifest else None
    if purifier_dir is not None:
        # Loaded only to fingerprint it: it never runs on the (already purified) images.
        given = provenance.purifier_record(load_comdefend(purifier_dir), purifier_dir,
                                           provenance.IN_ADVANCE, purify_manifest)
        if (record is not None and record["fingerprint"] is not None
                and record["fingerprint"] != given["fingerprint"]):
            raise ValueError(f"the manifest {purify_manifest!r} says the images were purified "
                             f"by {record['path']} ({record['fingerprint']}), not by "
                             f"{purifier_dir!r} ({given['fingerprint']})")
        record = given
    return None, record


def train_classifier(image_data: data_lib.ImageData, model_dir: str, architecture: str = "auto",
                     epochs: int = 5, batch_size: int = 64, learning_rate: float = 1e-3,
                     strategy: str | tf.distribute.Strategy = "default", seed: int = 0,
                     weights_path: str | None = None, steps_per_epoch: int | None = None,
                     verbose: int | str = "auto", extra_callbacks: list | None = None,
                     checkpoint_every_steps: int = run_state.DEFAULT_CHECKPOINT_EVERY_STEPS,
                     purifier_dir: str | None = None, purified_input: bool = False,
                     purify_manifest: str | None = None,
                     init_classifier_dir: str | None = None,
                     adversarial: adversarial_lib.AdversarialSettings | None = None,
                     ) -> tuple[keras.Model, dict]:
    """Trains a classifier on ``image_data.train`` with cross-entropy on logits and saves it.

    Uses ``run_state.fit_resumable``: checkpoints every ``checkpoint_every_steps`` steps in
    ``model_dir/backup`` (a killed run restarted with the same ``model_dir`` resumes at the
    checkpointed step with the batches it had not seen; a finished one only rewrites the
    model), ``TensorBoard`` logs and ``model_dir/progress.json``, like
    ``comdefend_tf.training.purifier.train_comdefend``. Writes ``model_dir/classifier.keras`` and
    ``metrics.json`` (``held_out_accuracy`` in [0, 1], the history, the settings; behind a
    purifier also its record under ``provenance.PURIFIER_KEY``).

    Args:
      image_data: a labelled source from ``comdefend_tf.io.datasets.load_dataset``.
      model_dir: output directory.
      architecture: a name from ``ARCHITECTURES`` (ignored with ``init_classifier_dir``).
      epochs, batch_size, learning_rate: Adam training settings.
      strategy: ``default`` or ``mirrored`` (or a strategy object). ``multi_worker`` is refused:
        Keras 3 ``fit`` fails under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585).
      seed: seeds initialisation, the data order and the purifier's noise draws.
      weights_path: local ResNet50 weights (see ``build_classifier``).
      steps_per_epoch: steps per epoch (None: one pass).
      verbose: Keras progress-bar verbosity.
      extra_callbacks: more Keras callbacks.
      checkpoint_every_steps: global steps between checkpoints.
      purifier_dir: a ComDefend model directory (or ``.keras`` file): train behind it, frozen,
        on the fly (``PurifiedClassifier``); ``held_out_accuracy`` is then measured on purified
        held-out images and ``held_out_accuracy_unpurified`` on the clean ones.
      purified_input: the images of ``image_data`` were purified in advance; the purifier is
        not run, only recorded (from ``purifier_dir`` and/or ``purify_manifest``; for a
        ``tfrecord:GLOB`` source the ``manifest.json`` beside the records is found alone).
      purify_manifest: the purify command's ``manifest.json`` (or its folder).
      init_classifier_dir: start from this saved classifier (fine-tuning) instead of a fresh
        network; its input shape and class count must match the data.
      adversarial: ``adversarial.make_settings(...)``: train on adversarial batches (behind
        the purifier when ``purifier_dir``); ``metrics.json`` then also holds
        ``provenance.ADVERSARIAL_KEY`` and ``held_out_adversarial_accuracy``. A collapse of
        the per-epoch PGD accuracy raises ``adversarial.CatastrophicOverfitting``.

    Returns:
      ``(classifier, metrics)``.

    Raises:
      ValueError: unlabelled data, bad settings, an unsupported strategy, a purifier or
        initial classifier that does not fit the data, or ``purified_input`` without a named
        purifier (or with ``adversarial``). run_state.NonFiniteTraining: the loss or a weight
        became NaN or infinite (the checkpoints and any previous model file stay).
        run_state.TrainingError: the directory holds a run with other settings (another
        purifier, initial classifier or adversarial recipe included).
    """
    if not image_data.num_classes:
        raise ValueError(f"dataset {image_data.name!r} has no labels; a classifier needs labels")
    if (epochs < 1 or batch_size < 1 or not 0 < learning_rate < float("inf")
            or checkpoint_every_steps < 1):
        raise ValueError(f"epochs, batch_size and checkpoint_every_steps must be >= 1 and "
                         f"learning_rate > 0, got {epochs}, {batch_size}, "
                         f"{checkpoint_every_steps}, {learning_rate}")
    if strategy == "multi_worker" or isinstance(strategy,
                                                tf.distribute.MultiWorkerMirroredStrategy):
        raise ValueError("classifier training supports the default and mirrored strategies; "
                         "Keras 3 fit fails under MultiWorkerMirroredStrategy "
                         "(keras-team/keras#20585)")
    if adversarial is not None:
        adversarial = adversarial.for_run(purifier_dir is not None, purified_input)
    if isinstance(strategy, str):
        strategy = strategies.make_strategy(strategy)
    keras.utils.set_random_seed(seed)
    os.makedirs(model_dir, exist_ok=True)
    if init_classifier_dir is None:
        architecture = choose_architecture(image_data.image_shape, architecture)
    batches_per_pass, steps_per_epoch = stream.plan_steps(image_data, batch_size,
                                                            steps_per_epoch)
    total_steps = epochs * steps_per_epoch
    with strategy.scope():
        # The purifier is built in the scope too: its variables (weights and the noise
        # generator's state) are then replicated like the classifier's.
        purifier, purifier_info = _purifier_provenance(image_data, purifier_dir, purified_input,
                                                       purify_manifest, seed)
        if init_classifier_dir is not None:
            classifier = load_classifier(init_classifier_dir)
            _check_fits(classifier, image_data, init_classifier_dir)
            architecture = classifier.name
            init_info = {"path": os.path.abspath(init_classifier_dir),
                         "fingerprint": provenance.weights_fingerprint(classifier)}
        else:
            classifier = build_classifier(image_data.image_shape, image_data.num_classes,
                                          architecture, weights_path=weights_path)
            init_info = None
        model = classifier if purifier is None else PurifiedClassifier(purifier, classifier)
        if adversarial is not None:
            model = adversarial_lib.AdversarialTrainer(classifier, adversarial, purifier, seed,
                                                       steps_per_epoch)
        _compile(model, learning_rate)
        if model is not classifier:
            model(tf.zeros((1,) + tuple(image_data.image_shape)))
        model.optimizer.build(model.trainable_variables)
    purifier_weights = None if purifier is None else [np.array(w) for w in purifier.weights]
    settings = {"kind": "classifier", "architecture": architecture, "dataset": image_data.name,
                "image_shape": list(image_data.image_shape),
                "num_classes": image_data.num_classes, "weights_path": weights_path,
                "batch_size": batch_size, "seed": seed, "steps_per_epoch": steps_per_epoch,
                "epochs": epochs, "learning_rate": learning_rate}
    # Only runs behind a purifier or from a saved classifier carry these keys, so a plain run's
    # settings (and its resumability) are unchanged.
    if purifier_info is not None:
        settings["purifier"] = {key: purifier_info[key] for key in ("fingerprint", "purified")}
        settings["purifier"]["inference"] = {
            key: (purifier_info["config"] or {}).get(key)
            for key in ("inference_noise_std", "inference_mode")}
    if init_info is not None:
        settings["init_classifier_fingerprint"] = init_info["fingerprint"]
    if adversarial is not None:
        settings["adversarial"] = adversarial.settings()
    state = run_state.RunState(model_dir, model, model.optimizer, settings, strategy)
    state.restore()
    state.check_finished_run_unchanged(total_steps)
    progress = run_state.Progress(model_dir, total_steps, steps_per_epoch)

    def make_stream(start_step):
        return stream.training_stream(image_data.train, batch_size, seed, start_step,
                                        total_steps, batches_per_pass)

    test = data_lib.batched(image_data.test, batch_size)
    # The overfitting check adds its values to the logs before TensorBoard reads them.
    checks = [] if adversarial is None else [adversarial_lib.OverfittingCheck.on_held_out(
        model, image_data.test, state, model_dir)]
    callbacks = checks + [keras.callbacks.TensorBoard(os.path.join(
        model_dir, run_state.LOG_SUBDIR), profile_batch=0)] + list(extra_callbacks or [])
    start = time.perf_counter()
    history = run_state.fit_resumable(model, make_stream, test, state, progress, epochs,
                                     steps_per_epoch, checkpoint_every_steps, callbacks, verbose,
                                     batch_size)
    seconds = time.perf_counter() - start
    held_out = model.evaluate(test, verbose=0, return_dict=True)
    metrics = {
        "held_out_accuracy": float(held_out["accuracy"]),
        "held_out_loss": float(held_out["loss"]),
        "num_held_out": image_data.num_test,
        "architecture": architecture, "dataset": image_data.name,
        "image_shape": list(image_data.image_shape), "num_classes": image_data.num_classes,
        "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
        "steps_per_epoch": steps_per_epoch, "steps": state.step, "seed": seed,
        "train_seconds": seconds, "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync, "history": history,
        provenance.PURIFIER_KEY: purifier_info,
        "init_classifier": init_info,
    }
    if adversarial is not None:
        metrics.update(adversarial_lib.run_metrics(checks[0], history, purifier_info))
    if purifier is not None:
        # The purified accuracy above; the clean images through the classifier alone beside it.
        metrics["held_out_accuracy_unpurified"] = _dataset_accuracy(classifier, test)
        if any(not np.array_equal(before, np.asarray(after))
               for before, after in zip(purifier_weights, purifier.weights)):
            raise run_state.TrainingError("the purifier's weights changed during training; "
                                         "no classifier was written")
    if not run_state.all_finite(classifier.variables):
        progress.update(step=state.step, state="diverged")
        raise run_state.NonFiniteTraining(state.non_finite_message(state.step, "a weight"),
                                         state.step, state.checkpoint_step)
    save_classifier(classifier, model_dir, metrics)
    progress.update(step=state.step, checkpoint_step=state.checkpoint_step, state="done")
    return classifier, metrics


def _check_fits(classifier, image_data, path):
    expected = tuple(classifier.input_shape[1:])
    if None not in expected and expected != tuple(image_data.image_shape):
        raise ValueError(f"the classifier {path!r} takes images of shape {expected} but dataset "
                         f"{image_data.name!r} gives {tuple(image_data.image_shape)}")
    if classifier.output_shape[-1] != image_data.num_classes:
        raise ValueError(f"the classifier {path!r} has {classifier.output_shape[-1]} outputs but "
                         f"dataset {image_data.name!r} has {image_data.num_classes} classes")


def _dataset_accuracy(classifier, batches) -> float:
    correct = total = 0
    for images, labels in batches:
        predictions = np.argmax(np.asarray(classifier(images, training=False)), axis=-1)
        correct += int(np.sum(predictions == np.asarray(labels)))
        total += len(predictions)
    return correct / max(total, 1)


def save_classifier(classifier: keras.Model, model_dir: str, metrics: dict | None = None) -> str:
    """Writes ``model_dir/classifier.keras`` and ``metrics.json`` through temporary files and
    renames, so an interrupted save never leaves a truncated model. Returns the ``.keras`` path."""
    os.makedirs(model_dir, exist_ok=True)
    keras_path = os.path.join(model_dir, KERAS_FILENAME)
    with atomic_path(keras_path) as partial:
        classifier.save(partial)
    write_json_atomic(os.path.join(model_dir, METRICS_FILENAME), metrics or {})
    return keras_path


def load_classifier(path: str) -> keras.Model:
    """Loads a ``.keras`` classifier file, or ``classifier.keras`` inside a model directory.

    Raises:
      FileNotFoundError: naming the path, when neither exists.
      ValueError: when the file cannot be loaded or its output is not 2-D logits.
    """
    if os.path.isdir(path):
        path = os.path.join(path, KERAS_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no classifier at {path!r} (expected a .keras file or a "
                                f"directory holding {KERAS_FILENAME}; train one with "
                                "python -m train.train_classifier)")
    try:
        classifier = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # keras raises many types for a corrupt zip
        raise ValueError(f"cannot load a Keras model from {path!r}: {error}") from error
    if len(classifier.output_shape) != 2:
        raise ValueError(f"{path!r} outputs shape {classifier.output_shape}, not logits "
                         "[batch, num_classes]")
    return classifier
