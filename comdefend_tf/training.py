"""Training ComDefend on clean images, on one device or under ``tf.distribute``.

Two paths share the model, the loss and the saved artefacts:

* ``default`` and ``mirrored`` strategies train with Keras ``fit`` and the
  ``BackupAndRestore``, ``TensorBoard`` and ``TerminateOnNaN`` callbacks: a killed run restarted
  with the same ``model_dir`` resumes at the start of the epoch it was in.
* ``multi_worker`` uses a custom loop, because ``fit`` fails under
  ``MultiWorkerMirroredStrategy`` in Keras 3 (keras-team/keras#20585). Its fault tolerance is a
  ``tf.train.CheckpointManager`` written at the end of every epoch.

This module is TensorFlow by nature (``tf.distribute``, ``tf.data``); the model itself is not.
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import tensorflow as tf

from comdefend_tf import data as data_lib
from comdefend_tf.config import ComDefendConfig
from comdefend_tf.model import ComDefend, psnr, save_comdefend

STRATEGIES = ("default", "mirrored", "multi_worker")
BACKUP_SUBDIR = "backup"
LOG_SUBDIR = "logs"


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``default`` (one device), ``mirrored`` (all local GPUs, or logical CPU devices) or
    ``multi_worker`` (reads the cluster from the ``TF_CONFIG`` environment variable).

    Create a ``multi_worker`` strategy before TensorFlow runs any op (collective ops are
    configured at program start-up).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy multi_worker needs the TF_CONFIG environment variable "
                             "describing the cluster and this worker's task")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


def reconstruction_report(model: ComDefend, images: tf.data.Dataset | np.ndarray,
                          batch_size: int = 64) -> dict:
    """Inference-time quality and code statistics on held-out images.

    Args:
      model: a ComDefend model (its inference noise and mode apply).
      images: float32 ``[n, H, W, C]`` in [0, 1], or a dataset of such batches (or of
        ``(images, labels)`` batches).

    Returns:
      dict: ``psnr_db`` (mean over images of per-image PSNR, dB), ``mse``,
      ``near_zero_fraction`` (share of code logits with |logit| < 1: 0 means a perfectly
      binary code), ``median_abs_logit``, ``ones_fraction`` (share of code bits equal to 1),
      ``noise1_flip_rate`` (expected share of bits that inference noise of std 1 flips),
      ``bits_per_pixel`` and ``num_images``.
    """
    if isinstance(images, np.ndarray):
        images = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    psnrs, mses, abs_logits, ones, flips = [], [], [], [], []
    for batch in images:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        outputs = model.forward(batch, training=False)
        purified = outputs["purified"]
        psnrs.append(np.asarray(psnr(batch, purified)))
        mses.append(np.mean(np.square(np.asarray(purified) - np.asarray(batch)), axis=(1, 2, 3)))
        logits = np.asarray(outputs["code_logits"], np.float64)
        abs_logits.append(np.abs(logits).ravel())
        ones.append(np.mean(logits > 0))
        # P(sign flip) for logit l under N(0, 1) noise is Phi(-|l|).
        flips.append(np.mean(0.5 * _erfc(np.abs(logits) / np.sqrt(2.0))))
    abs_logits = np.concatenate(abs_logits)
    return {
        "psnr_db": float(np.mean(np.concatenate(psnrs))),
        "mse": float(np.mean(np.concatenate(mses))),
        "near_zero_fraction": float(np.mean(abs_logits < 1.0)),
        "median_abs_logit": float(np.median(abs_logits)),
        "ones_fraction": float(np.mean(ones)),
        "noise1_flip_rate": float(np.mean(flips)),
        "bits_per_pixel": int(model.config.code_channels),
        "num_images": int(sum(len(p) for p in psnrs)),
    }


def _erfc(values):
    from scipy.special import erfc

    return erfc(values)


class _EpochTimer(keras.callbacks.Callback):
    """Records wall seconds and images/s per epoch in the history."""

    def __init__(self, images_per_epoch):
        super().__init__()
        self.images_per_epoch = images_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        if logs is not None:
            logs["epoch_seconds"] = seconds
            if self.images_per_epoch:
                logs["images_per_second"] = self.images_per_epoch / seconds


def train_comdefend(config: ComDefendConfig, image_data: data_lib.ImageData, model_dir: str,
                    epochs: int = 1, batch_size: int = 20, learning_rate: float = 1e-3,
                    strategy: str | tf.distribute.Strategy = "default", seed: int = 0,
                    steps_per_epoch: int | None = None, verbose: int | str = "auto",
                    extra_callbacks: list | None = None) -> tuple[ComDefend, dict]:
    """Trains a ComDefend model on ``image_data.train`` and saves it to ``model_dir``.

    Writes ``model_dir/comdefend.keras``, ``config.json`` and ``metrics.json`` (final held-out
    ``reconstruction_report`` plus the per-epoch history), TensorBoard logs under
    ``model_dir/logs`` and, while running, resumable state under ``model_dir/backup``.

    Args:
      config: the model configuration (its noise, loss weight and modes apply).
      image_data: a source from ``comdefend_tf.data.load_dataset``.
      model_dir: output directory; an unfinished run there is resumed.
      epochs: passes over the training images.
      batch_size: global batch size (split across replicas).
      learning_rate: Adam learning rate (the paper: 1e-3).
      strategy: a strategy name from ``STRATEGIES`` or a strategy object.
      seed: seeds Keras/TF/NumPy, the shuffling and the code noise.
      steps_per_epoch: cap on steps per epoch (None: one full pass).
      verbose: Keras progress-bar verbosity.
      extra_callbacks: more Keras callbacks (``fit`` strategies only).

    Returns:
      ``(model, metrics)``.
    """
    if config.input_channels != image_data.channels:
        raise ValueError(f"config {config.name!r} expects {config.input_channels}-channel images "
                         f"but dataset {image_data.name!r} has {image_data.channels} channels; "
                         f"build the config with input_channels={image_data.channels}")
    if epochs < 1 or batch_size < 1 or learning_rate <= 0:
        raise ValueError(f"epochs and batch_size must be >= 1 and learning_rate > 0, got "
                         f"{epochs}, {batch_size}, {learning_rate}")
    keras.utils.set_random_seed(seed)
    if isinstance(strategy, str):
        strategy = make_strategy(strategy)
    os.makedirs(model_dir, exist_ok=True)
    train = data_lib.batched(image_data.train, batch_size, shuffle=True, seed=seed,
                             images_only=True, drop_remainder=True)
    test = data_lib.batched(image_data.test, batch_size, images_only=True)
    if steps_per_epoch is None and image_data.num_train:
        steps_per_epoch = image_data.num_train // batch_size
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        model, history = _train_custom_loop(config, train, model_dir, epochs, batch_size,
                                            learning_rate, strategy, seed, steps_per_epoch)
    else:
        model, history = _train_fit(config, train, test, model_dir, epochs, learning_rate,
                                    strategy, seed, steps_per_epoch, batch_size, verbose,
                                    extra_callbacks or [])
    metrics = {"held_out": reconstruction_report(model, test), "history": history,
               "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
               "steps_per_epoch": steps_per_epoch, "dataset": image_data.name,
               "strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
               "seed": seed}
    if _is_chief(strategy):
        save_comdefend(model, model_dir, metrics)
    return model, metrics


def _train_fit(config, train, test, model_dir, epochs, learning_rate, strategy, seed,
               steps_per_epoch, batch_size, verbose, extra_callbacks):
    with strategy.scope():
        model = ComDefend(config, seed=seed)
        model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    callbacks = [
        keras.callbacks.BackupAndRestore(os.path.join(model_dir, BACKUP_SUBDIR)),
        keras.callbacks.TensorBoard(os.path.join(model_dir, LOG_SUBDIR), profile_batch=0),
        keras.callbacks.TerminateOnNaN(),
        _EpochTimer(steps_per_epoch * batch_size if steps_per_epoch else None),
    ] + list(extra_callbacks)
    if steps_per_epoch:
        train = train.repeat()
    history = model.fit(train, validation_data=test, epochs=epochs,
                        steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=verbose)
    return model, {key: [float(v) for v in values] for key, values in history.history.items()}


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "cluster_spec", None):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0
                                            and "chief" not in resolver.cluster_spec().jobs)


def _train_custom_loop(config, train, model_dir, epochs, batch_size, learning_rate, strategy,
                       seed, steps_per_epoch):
    if not steps_per_epoch:
        raise ValueError("multi_worker training needs a known steps_per_epoch")
    with strategy.scope():
        model = ComDefend(config, seed=seed)
        optimizer = keras.optimizers.Adam(learning_rate)
        optimizer.build(model.trainable_variables)
        epoch_counter = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_counter)
    # Every worker must write (collective ops), but only the chief's directory is kept.
    backup_dir = os.path.join(model_dir, BACKUP_SUBDIR)
    if not _is_chief(strategy):
        backup_dir = os.path.join(model_dir, f".worker{strategy.cluster_resolver.task_id}")
    manager = tf.train.CheckpointManager(checkpoint, backup_dir, max_to_keep=1)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint)
    distributed = iter(strategy.experimental_distribute_dataset(train.repeat()))

    def replica_step(images):
        with tf.GradientTape() as tape:
            outputs = model.forward(images, training=True,
                                    noise_scale=model.noise_warmup_scale(optimizer.iterations))
            terms = model.loss_terms(images, outputs)
            loss = tf.nn.compute_average_loss(terms["loss"], global_batch_size=batch_size)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return {"loss": loss,
                "mse": tf.nn.compute_average_loss(terms["mse"], global_batch_size=batch_size),
                "code_penalty": tf.nn.compute_average_loss(terms["code_penalty"],
                                                           global_batch_size=batch_size)}

    @tf.function
    def train_step(iterator):
        per_replica = strategy.run(replica_step, args=(next(iterator),))
        return {key: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                for key, value in per_replica.items()}

    history = {"loss": [], "mse": [], "code_penalty": []}
    while int(epoch_counter.numpy()) < epochs:
        epoch = int(epoch_counter.numpy())
        progress = keras.utils.Progbar(steps_per_epoch, stateful_metrics=list(history))
        sums = {key: 0.0 for key in history}
        for step in range(steps_per_epoch):
            values = {key: float(v) for key, v in train_step(distributed).items()}
            for key in sums:
                sums[key] += values[key]
            progress.update(step + 1, list(values.items()))
        for key in history:
            history[key].append(sums[key] / steps_per_epoch)
        epoch_counter.assign_add(1)
        manager.save(checkpoint_number=epoch + 1)
    return model, history
