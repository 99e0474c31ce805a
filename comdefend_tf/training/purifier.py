"""Training ComDefend on clean images, on one device or under ``tf.distribute``.

``train_comdefend(config, image_data, model_dir, ...) -> (model, metrics)`` trains on
``image_data.train`` (float32 images in [0, 1]) and writes ``MODEL_DIR/comdefend.keras``,
``config.json`` and ``metrics.json`` (the held-out ``reconstruction_report``, the mean-image
PSNR, the ``verdict`` and the per-epoch history). ``default`` and ``mirrored`` strategies train
with Keras ``fit``; ``multi_worker`` with a custom loop (``fit`` fails under
``MultiWorkerMirroredStrategy`` in Keras 3, keras-team/keras#20585). Either way the run resumes
from its step checkpoints (``run_state``) with the batches it had not seen (``stream``).

Nothing broken is written: a non-finite loss or weight raises ``NonFiniteTraining``, a purifier
no ``collapse_margin_db`` better than the mean image raises ``CollapsedModel`` (checkpoints
kept, the model file not written or replaced). docs/internals/training.md has the details.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from comdefend_tf.config import ComDefendConfig
from comdefend_tf.io import datasets as data_lib
from comdefend_tf.io.atomic import write_json_atomic
from comdefend_tf.model import METRICS_FILENAME, ComDefend, save_comdefend
from comdefend_tf.training.reconstruction import (DEFAULT_COLLAPSE_MARGIN_DB, collapse_verdict,
                                                  mean_image_psnr, reconstruction_report)
from comdefend_tf.training.run_state import (DEFAULT_CHECKPOINT_EVERY_STEPS, LOG_SUBDIR,
                                             NonFiniteTraining, Progress, RunState,
                                             TrainingError, all_finite, checkpoint_due,
                                             fit_resumable)
from comdefend_tf.training.stream import plan_steps, training_stream
from comdefend_tf.training.strategies import agree_on_step, make_strategy


class CollapsedModel(TrainingError):
    """The trained purifier reconstructs no better than the mean image (constant output).
    ``psnr_db``: its held-out PSNR; ``mean_image_psnr_db``: the mean image's; ``margin_db``."""

    def __init__(self, message, psnr_db, mean_image_psnr_db, margin_db):
        super().__init__(message)
        self.psnr_db, self.mean_image_psnr_db, self.margin_db = (psnr_db, mean_image_psnr_db,
                                                                 margin_db)


def train_comdefend(config: ComDefendConfig, image_data: data_lib.ImageData, model_dir: str,
                    epochs: int = 1, batch_size: int = 20, learning_rate: float = 1e-3,
                    strategy: str | tf.distribute.Strategy = "default", seed: int = 0,
                    steps_per_epoch: int | None = None, verbose: int | str = "auto",
                    extra_callbacks: list | None = None,
                    checkpoint_every_steps: int = DEFAULT_CHECKPOINT_EVERY_STEPS,
                    collapse_margin_db: float | None = DEFAULT_COLLAPSE_MARGIN_DB,
                    ) -> tuple[ComDefend, dict]:
    """Trains a ComDefend model on ``image_data.train`` and saves it to ``model_dir``.

    Writes ``model_dir/comdefend.keras``, ``config.json`` and ``metrics.json`` (the held-out
    ``reconstruction_report``, the mean-image PSNR, ``verdict`` and the per-epoch history),
    TensorBoard logs under ``model_dir/logs``, ``progress.json`` and the resumable state under
    ``model_dir/backup`` (kept after the run: the same command again only rewrites the model).

    Args:
      config: the model configuration (its noise, loss weight and modes apply).
      image_data: a source from ``comdefend_tf.io.datasets.load_dataset``.
      model_dir: output directory; an unfinished run there is resumed at its last checkpoint.
      epochs: training epochs of ``steps_per_epoch`` steps.
      batch_size: global batch size (split across replicas).
      learning_rate: Adam learning rate (the paper: 1e-3).
      strategy: a strategy name from ``STRATEGIES`` or a strategy object.
      seed: seeds Keras/TF/NumPy, the data order and the code noise.
      steps_per_epoch: steps per epoch (None: one full pass, ``num_train // batch_size``).
      verbose: Keras progress-bar verbosity.
      extra_callbacks: more Keras callbacks (``fit`` strategies only).
      checkpoint_every_steps: global steps between checkpoints (the last step is always
        checkpointed).
      collapse_margin_db: the held-out PSNR gain over the mean image below which the model
        counts as collapsed (None: no check).

    Returns:
      ``(model, metrics)``.

    Raises:
      NonFiniteTraining: the loss or weights became non-finite; CollapsedModel: see above
        (``metrics.json`` records it; the model file is not written); TrainingError: the
        directory holds a run with other settings.
    """
    if config.input_channels != image_data.channels:
        raise ValueError(f"config {config.name!r} expects {config.input_channels}-channel images "
                         f"but dataset {image_data.name!r} has {image_data.channels} channels; "
                         f"build the config with input_channels={image_data.channels}")
    if (epochs < 1 or batch_size < 1 or not 0 < learning_rate < float("inf")
            or checkpoint_every_steps < 1):
        raise ValueError(f"epochs, batch_size and checkpoint_every_steps must be >= 1 and "
                         f"learning_rate > 0, got {epochs}, {batch_size}, "
                         f"{checkpoint_every_steps}, {learning_rate}")
    keras.utils.set_random_seed(seed)
    if isinstance(strategy, str):
        strategy = make_strategy(strategy)
    os.makedirs(model_dir, exist_ok=True)
    batches_per_pass, steps_per_epoch = plan_steps(image_data, batch_size, steps_per_epoch)
    total_steps = epochs * steps_per_epoch

    def make_stream(start_step):
        return training_stream(image_data.train, batch_size, seed, start_step, total_steps,
                               batches_per_pass, images_only=True)

    test = data_lib.batched(image_data.test, batch_size, images_only=True)
    settings = {"kind": "comdefend", "config": config.to_dict(), "dataset": image_data.name,
                "batch_size": batch_size, "seed": seed, "steps_per_epoch": steps_per_epoch,
                "epochs": epochs, "learning_rate": learning_rate}
    # The inference settings only shape the saved model: a resumed run may change them.
    for key in ("inference_noise_std", "inference_mode", "name"):
        settings["config"].pop(key)
    with strategy.scope():
        model = ComDefend(config, seed=seed)
        optimizer = keras.optimizers.Adam(learning_rate)
        model(tf.zeros((1,) + tuple(_static_image_shape(image_data))))
        optimizer.build(model.trainable_variables)
    state = RunState(model_dir, model, optimizer, settings, strategy)
    state.restore()
    state.check_finished_run_unchanged(total_steps)
    progress = Progress(model_dir, total_steps, steps_per_epoch, state.is_chief)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        history = _train_custom_loop(model, optimizer, state, progress, make_stream, epochs,
                                     steps_per_epoch, batch_size, strategy,
                                     checkpoint_every_steps)
    else:
        with strategy.scope():
            model.compile(optimizer=optimizer)
        callbacks = [keras.callbacks.TensorBoard(os.path.join(model_dir, LOG_SUBDIR),
                                                 profile_batch=0)] + list(extra_callbacks or [])
        history = fit_resumable(model, make_stream, test, state, progress, epochs,
                                steps_per_epoch, checkpoint_every_steps, callbacks, verbose,
                                batch_size)
    report = reconstruction_report(model, test)
    baseline = mean_image_psnr(test)
    verdict = ("ok" if collapse_margin_db is None
               else collapse_verdict(report["psnr_db"], baseline, collapse_margin_db))
    metrics = {"held_out": report, "mean_image_psnr_db": baseline,
               "collapse_margin_db": collapse_margin_db, "verdict": verdict,
               "history": history, "epochs": epochs, "batch_size": batch_size,
               "learning_rate": learning_rate, "steps_per_epoch": steps_per_epoch,
               "steps": state.step, "dataset": image_data.name,
               "strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
               "seed": seed}
    if verdict == "collapsed":
        if state.is_chief:
            write_json_atomic(os.path.join(model_dir, METRICS_FILENAME), metrics)
        progress.update(step=state.step, checkpoint_step=state.checkpoint_step,
                        state="collapsed")
        raise CollapsedModel(
            f"the trained purifier collapsed: its held-out PSNR {report['psnr_db']:.2f} dB is not "
            f"{collapse_margin_db:g} dB better than predicting the mean image "
            f"({baseline:.2f} dB), so its output ignores its input. Its checkpoints stay in "
            f"{state.backup_dir} and metrics.json records the verdict; no model file was "
            f"written (a previous one is untouched). Train again in a new model directory with "
            f"a lower learning rate and the training noise ramped in (noise_warmup_steps)",
            report["psnr_db"], baseline, collapse_margin_db)
    if state.is_chief:
        _save_finite(model, model_dir, metrics, state)
    progress.update(step=state.step, checkpoint_step=state.checkpoint_step, state="done")
    return model, metrics


def _static_image_shape(image_data):
    shape = tuple(image_data.image_shape)
    if any(size is None for size in shape[:2]):
        # Fully convolutional: any size builds the same variables.
        shape = (8, 8) + shape[2:]
    return shape


def _save_finite(model, model_dir, metrics, state):
    """``save_comdefend`` (temporary name, then rename) after checking every weight is finite."""
    if not all_finite(model.variables):
        raise NonFiniteTraining(state.non_finite_message(state.step, "a weight"), state.step,
                                state.checkpoint_step)
    save_comdefend(model, model_dir, metrics)


def _train_custom_loop(model, optimizer, state, progress, make_stream, epochs, steps_per_epoch,
                       batch_size, strategy, checkpoint_every_steps):
    total_steps = epochs * steps_per_epoch
    step = state.step
    lowest, highest = agree_on_step(strategy, step)
    if lowest != highest:
        raise TrainingError(f"workers restored different steps ({lowest} to {highest}); every "
                            f"worker must read the chief's {state.backup_dir} (a shared "
                            "model directory)")
    progress.update(step=step, resumed_from_step=step, checkpoint_step=state.checkpoint_step,
                    state="training")
    distributed = iter(strategy.experimental_distribute_dataset(make_stream(step)))

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

    names = ("loss", "mse", "code_penalty")
    sums = {key: 0.0 for key in names}
    counted = 0
    bar = None
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        if bar is None:
            bar = keras.utils.Progbar(steps_per_epoch, stateful_metrics=list(names))
        values = {key: float(v) for key, v in train_step(distributed).items()}
        step += 1
        if not np.isfinite(values["loss"]):
            progress.update(step=step, state="diverged")
            raise NonFiniteTraining(state.non_finite_message(step, "the loss"), step,
                                    state.checkpoint_step)
        for key in names:
            sums[key] += values[key]
        counted += 1
        bar.update(offset + 1, list(values.items()))
        if checkpoint_due(step, checkpoint_every_steps, steps_per_epoch, total_steps):
            try:
                state.save(step)
            except NonFiniteTraining:
                progress.update(step=step, state="diverged")
                raise
        progress.update(step=step, checkpoint_step=state.checkpoint_step)
        if step % steps_per_epoch == 0:
            # A resumed epoch averages the steps this process ran.
            state.record_epoch(epoch, {key: sums[key] / counted for key in names})
            sums, counted, bar = {key: 0.0 for key in names}, 0, None
    if state.checkpoint_step != step:
        state.save(step)
    progress.update(step=step, checkpoint_step=state.checkpoint_step, state="evaluating")
    return state.history()
