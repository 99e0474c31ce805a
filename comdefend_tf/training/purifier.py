"""Training ComDefend on clean images, on one device or under ``tf.distribute``, so that no
fault loses more than a few steps and no broken model is ever written.

Two paths share the model, the loss, the resumable state and the saved artefacts:

* ``default`` and ``mirrored`` strategies train with Keras ``fit`` (``TensorBoard`` logs, a
  progress bar, held-out validation each epoch).
* ``multi_worker`` uses a custom loop, because ``fit`` fails under
  ``MultiWorkerMirroredStrategy`` in Keras 3 (keras-team/keras#20585).

Resumable state (``RunState``, in ``MODEL_DIR/backup``): a ``tf.train.CheckpointManager`` over
every model and optimizer variable (the code-noise seed state included), numbered by the global
step and written every ``checkpoint_every_steps`` steps, at the end of every epoch and after
the last step. TensorFlow writes
the checkpoint files first and then replaces the small ``checkpoint`` state file atomically, so
a kill at any moment leaves the state pointing at a complete checkpoint. Keras'
``BackupAndRestore`` is not used: in Keras 3.15 it restores only the epoch (a mid-epoch
``save_freq`` backup restarts its epoch from the first batch), writes its weights file in place
(a kill during the write leaves a file that cannot be loaded) and deletes the backup when
``TerminateOnNaN`` stops a run.

The data order is a function of the seed and the global step alone (pass ``p`` of the training
set is shuffled with a seed derived from ``seed`` and ``p``; ``training_stream``), so a run
restarted with the same ``model_dir`` continues at the checkpointed step with the batches it had
not seen, and its result equals the uninterrupted run's. A run whose last step is checkpointed
but whose model was not yet written only evaluates and writes the model.

Nothing broken is written: a non-finite loss or weight stops the run with
``NonFiniteTraining`` (the checkpoints and any previous model file stay), and a purifier whose
held-out PSNR is not ``collapse_margin_db`` better than predicting the mean image raises
``CollapsedModel`` (checkpoints kept, ``metrics.json`` records the verdict, the model file is not
replaced). The model file is written under a temporary name and renamed into place.

``MODEL_DIR/progress.json`` says where a run is (global step, last checkpoint, state); it is
replaced atomically after every step.

This module is TensorFlow by nature (``tf.distribute``, ``tf.data``); the model itself is not.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from comdefend_tf.io import datasets as data_lib
from comdefend_tf.config import ComDefendConfig
from comdefend_tf.io.atomic import write_json_atomic
from comdefend_tf.model import METRICS_FILENAME, ComDefend, psnr, save_comdefend

STRATEGIES = ("default", "mirrored", "multi_worker")
BACKUP_SUBDIR = "backup"
LOG_SUBDIR = "logs"
PROGRESS_FILENAME = "progress.json"
RUN_FILENAME = "run.json"
HISTORY_FILENAME = "history.json"
DEFAULT_CHECKPOINT_EVERY_STEPS = 50
# A purifier must beat "predict the mean held-out image" by this much held-out PSNR (dB).
DEFAULT_COLLAPSE_MARGIN_DB = 1.0
# Run settings a resumed run may change: the rest must match the checkpointed run's.
RESUMABLE_CHANGES = ("learning_rate", "epochs")
# At most this many separately seeded passes are chained; longer runs reshuffle one seeded
# dataset per repetition (same determinism, but resuming re-reads the skipped batches).
_MAX_CHAINED_PASSES = 32
_SHUFFLE_BUFFER = 10_000


class TrainingError(RuntimeError):
    """A run that must not produce a model (or cannot resume); the message says why and what
    was kept."""


class NonFiniteTraining(TrainingError):
    """The loss or a weight became NaN or infinite. ``step``: the step that produced it;
    ``checkpoint_step``: the last finite checkpoint (None when there is none)."""

    def __init__(self, message, step=None, checkpoint_step=None):
        super().__init__(message)
        self.step, self.checkpoint_step = step, checkpoint_step


class CollapsedModel(TrainingError):
    """The trained purifier reconstructs no better than the mean image (constant output).
    ``psnr_db``: its held-out PSNR; ``mean_image_psnr_db``: the mean image's; ``margin_db``."""

    def __init__(self, message, psnr_db, mean_image_psnr_db, margin_db):
        super().__init__(message)
        self.psnr_db, self.mean_image_psnr_db, self.margin_db = (psnr_db, mean_image_psnr_db,
                                                                 margin_db)


def plan_steps(image_data, batch_size: int, steps_per_epoch: int | None):
    """``(batches_per_pass, steps_per_epoch)`` for a run over ``image_data``'s training split.

    ``batches_per_pass`` is None when the dataset does not know its size; ``steps_per_epoch``
    defaults to one pass. Raises ValueError when the batch is larger than the training set, or
    the size is unknown and no ``steps_per_epoch`` is given.
    """
    batches_per_pass = image_data.num_train // batch_size if image_data.num_train else None
    if batches_per_pass == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {image_data.num_train} training "
                         "images")
    steps_per_epoch = steps_per_epoch or batches_per_pass
    if not steps_per_epoch:
        raise ValueError(f"dataset {image_data.name!r} does not know its size; give "
                         "steps_per_epoch")
    return batches_per_pass, steps_per_epoch


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


# ------------------------------------------------------------------------------ evaluation
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
    psnrs, mses, abs_logits, ones, flips = [], [], [], [], []
    for batch in _image_batches(images, batch_size):
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


def mean_image_psnr(images: tf.data.Dataset | np.ndarray, batch_size: int = 64) -> float:
    """Held-out PSNR (dB, mean over images) of the best constant purifier: one that outputs the
    mean of ``images`` whatever its input. A purifier that ignores its input (a collapsed one)
    scores at most this.

    Args:
      images: float32 ``[n, H, W, C]`` in [0, 1], or a dataset of such batches (or of
        ``(images, labels)`` batches). Images of different sizes are compared with their mean
        colour instead of a mean image.
    """
    image_sum, colour_sum, count, pixels, shapes = None, 0.0, 0, 0, set()
    for batch in _image_batches(images, batch_size):
        batch = np.asarray(batch, np.float64)
        shapes.add(batch.shape[1:])
        if len(shapes) == 1:
            image_sum = batch.sum(axis=0) + (0.0 if image_sum is None else image_sum)
        colour_sum = colour_sum + batch.sum(axis=(0, 1, 2))
        count += len(batch)
        pixels += len(batch) * batch.shape[1] * batch.shape[2]
    if not count:
        raise ValueError("mean_image_psnr needs at least one image")
    mean = image_sum / count if len(shapes) == 1 else colour_sum / pixels
    psnrs = []
    for batch in _image_batches(images, batch_size):
        batch = np.asarray(batch, np.float32)
        constant = np.broadcast_to(mean.astype(np.float32), batch.shape)
        psnrs.append(np.asarray(psnr(batch, constant)))
    return float(np.mean(np.concatenate(psnrs)))


def collapse_verdict(psnr_db: float, mean_image_psnr_db: float,
                     margin_db: float = DEFAULT_COLLAPSE_MARGIN_DB) -> str:
    """``"ok"`` when a purifier's held-out PSNR beats the mean image's by at least
    ``margin_db`` dB, else ``"collapsed"`` (also for a NaN PSNR)."""
    if not (np.isfinite(psnr_db) and psnr_db >= mean_image_psnr_db + margin_db):
        return "collapsed"
    return "ok"


def _image_batches(images, batch_size):
    if isinstance(images, np.ndarray):
        images = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    for batch in images:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _erfc(values):
    from scipy.special import erfc

    return erfc(values)


def all_finite(variables) -> bool:
    """Whether every floating-point value in ``variables`` (Keras or TF variables) is finite."""
    for variable in variables:
        value = tf.convert_to_tensor(variable)
        if value.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(value))):
            return False
    return True


# ---------------------------------------------------------------------------- data order
def training_stream(dataset: tf.data.Dataset, batch_size: int, seed: int, start_step: int = 0,
                    total_steps: int | None = None, batches_per_pass: int | None = None,
                    images_only: bool = False) -> tf.data.Dataset:
    """The training batches from global step ``start_step`` on, in an order fixed by ``seed``.

    Batch ``g`` of the stream is the same whatever ``start_step`` a process starts from, so a
    resumed run sees exactly the batches the interrupted one had not reached. Each pass over
    ``dataset`` is shuffled (buffer 10,000 examples) and batched with ``drop_remainder``.

    Args:
      dataset: ``(image, label)`` examples in a deterministic order.
      batch_size: global batch size.
      seed: fixes the order.
      start_step: the number of batches already consumed.
      total_steps: batches the whole run consumes (bounds the stream; None: endless).
      batches_per_pass: full batches per pass over ``dataset``, when known. With it and at most
        32 passes in the run, pass ``p`` is shuffled with its own seed and resuming skips whole
        passes without reading them; otherwise one seeded shuffle reshuffles every repetition
        and resuming reads and drops the ``start_step`` consumed batches.
      images_only: drop the labels.

    Returns:
      a dataset of batches ``[batch_size, H, W, C]`` (or ``(images, labels)`` batches).
    """
    if images_only:
        dataset = dataset.map(lambda image, label: image, num_parallel_calls=tf.data.AUTOTUNE)
    chained = (batches_per_pass and total_steps is not None
               and math.ceil(total_steps / batches_per_pass) <= _MAX_CHAINED_PASSES)
    if chained:
        first_pass, offset = divmod(start_step, batches_per_pass)
        last_pass = max(first_pass, math.ceil(total_steps / batches_per_pass) - 1)
        stream = None
        for pass_index in range(first_pass, last_pass + 1):
            # Distinct seeds for every (seed, pass) pair: chained runs have at most 32 passes.
            one_pass = dataset.shuffle(_SHUFFLE_BUFFER, seed=seed * 1_000_003 + pass_index,
                                       reshuffle_each_iteration=False)
            one_pass = one_pass.batch(batch_size, drop_remainder=True)
            if pass_index == first_pass:
                one_pass = one_pass.skip(offset)
            stream = one_pass if stream is None else stream.concatenate(one_pass)
    else:
        stream = dataset.shuffle(_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
        stream = stream.batch(batch_size, drop_remainder=True).repeat().skip(start_step)
    if total_steps is not None:
        stream = stream.take(max(total_steps - start_step, 0))
    return stream.prefetch(tf.data.AUTOTUNE)


# ------------------------------------------------------------------------- resumable state
class RunState:
    """The resumable state of one training run, in ``MODEL_DIR/backup``.

    * ``ckpt-STEP.*`` and ``checkpoint``: ``tf.train.CheckpointManager`` checkpoints of every
      model and optimizer variable, numbered by global step (the last two are kept);
    * ``run.json``: the settings of the run, compared on resume (``RESUMABLE_CHANGES`` may
      change, nothing else);
    * ``history.json``: per-epoch metrics of the epochs finished so far.

    Non-chief workers of a multi-worker run write their (identical) checkpoints to
    ``MODEL_DIR/.workerN`` and restore from the chief's ``backup`` (the model directory must be
    shared, as for TensorFlow's own fault tolerance).

    Args:
      model_dir: the run's directory.
      model: a built Keras model; optimizer: its built optimizer.
      settings: JSON-serialisable run settings (``epochs`` and ``learning_rate`` among them).
      strategy: the distribution strategy (decides chief and worker directories).
    """

    def __init__(self, model_dir: str, model: keras.Model, optimizer, settings: dict,
                 strategy: tf.distribute.Strategy | None = None):
        self.model_dir = model_dir
        self.model, self.optimizer, self.settings = model, optimizer, dict(settings)
        self.is_chief = is_chief(strategy)
        self.backup_dir = os.path.join(model_dir, BACKUP_SUBDIR)
        save_dir = self.backup_dir
        if not self.is_chief:
            save_dir = os.path.join(model_dir, f".worker{strategy.cluster_resolver.task_id}")
        self._checkpoint = tf.train.Checkpoint(
            model_variables=list(model.variables), optimizer_variables=list(optimizer.variables))
        self._manager = tf.train.CheckpointManager(self._checkpoint, save_dir, max_to_keep=2)
        self._restore_manager = (self._manager if self.is_chief else tf.train.CheckpointManager(
            tf.train.Checkpoint(), self.backup_dir, max_to_keep=2))
        self.checkpoint_step = None

    @property
    def step(self) -> int:
        """The optimizer's global step (steps applied so far)."""
        return int(self.optimizer.iterations.numpy())

    def restore(self) -> int:
        """Restores the latest readable checkpoint (falling back to the one before when the
        latest cannot be read), checks the settings and returns the global step (0 when the
        run is new).

        Raises:
          TrainingError: the checkpointed run used other settings, or no checkpoint is readable.
        """
        previous = self._read_json(RUN_FILENAME)
        if previous is not None:
            self._check_settings(previous)
        paths = list(self._restore_manager.checkpoints)
        if not paths and self._restore_manager.latest_checkpoint:
            paths = [self._restore_manager.latest_checkpoint]
        errors = []
        for path in reversed(paths):
            try:
                self._checkpoint.restore(path).assert_existing_objects_matched()
            except (tf.errors.OpError, ValueError, AssertionError) as error:
                errors.append(f"{path}: {str(error).splitlines()[0]}")
                continue
            self.checkpoint_step = self.step
            break
        else:
            if errors:
                raise TrainingError(f"no checkpoint in {self.backup_dir} can be read ("
                                    + "; ".join(errors) + "); move the directory away to start "
                                    "the run afresh")
        self._remove_partial_writes()
        # The learning rate is an optimizer variable: a resumed run uses the one asked for now.
        self.optimizer.learning_rate.assign(self.settings["learning_rate"])
        if self.is_chief:
            os.makedirs(self.backup_dir, exist_ok=True)
            write_json_atomic(os.path.join(self.backup_dir, RUN_FILENAME), self.settings)
        return self.step

    def _remove_partial_writes(self):
        """Deletes the temporary shard folders (``ckpt-N_temp``) of checkpoint writes that a
        kill interrupted; a later save of the same step would otherwise leave them behind."""
        save_dir = self._manager.directory
        if not os.path.isdir(save_dir):
            return
        for name in os.listdir(save_dir):
            path = os.path.join(save_dir, name)
            if name.endswith("_temp") and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)

    def _check_settings(self, previous: dict):
        fixed = sorted(key for key in set(previous) | set(self.settings)
                       if key not in RESUMABLE_CHANGES
                       and previous.get(key) != self.settings.get(key))
        if fixed:
            changes = ", ".join(f"{key}: {previous.get(key)!r} -> {self.settings.get(key)!r}"
                                for key in fixed)
            raise TrainingError(
                f"{self.model_dir} holds a run with other settings ({changes}); only "
                f"{' and '.join(RESUMABLE_CHANGES)} may change when a run resumes. Use another "
                f"model directory, or delete {self.backup_dir} to start afresh there")
        self._previous_settings = previous

    def check_finished_run_unchanged(self, total_steps: int):
        """Refuses a changed learning rate for a run that has no steps left (it would change
        nothing, which is never what the user meant)."""
        previous = getattr(self, "_previous_settings", None)
        if (previous is not None and self.step >= total_steps
                and previous.get("learning_rate") != self.settings["learning_rate"]):
            raise TrainingError(
                f"the run in {self.model_dir} already finished its {total_steps} steps with "
                f"learning rate {previous.get('learning_rate')}; a new learning rate would "
                f"change nothing. Train in another model directory, or delete "
                f"{self.backup_dir} to start afresh there")

    def save(self, step: int | None = None) -> str:
        """Checkpoints the current variables as ``ckpt-STEP`` after checking they are finite.

        Raises:
          NonFiniteTraining: a variable holds NaN or infinity (nothing is written).
        """
        step = self.step if step is None else step
        if not all_finite(self.model.variables):
            raise NonFiniteTraining(self.non_finite_message(step, "a weight"), step,
                                    self.checkpoint_step)
        path = self._manager.save(checkpoint_number=step)
        self.checkpoint_step = step
        return path

    def non_finite_message(self, step: int, what: str) -> str:
        kept = (f"the last finite checkpoint, step {self.checkpoint_step}, stays in "
                f"{self.backup_dir}" if self.checkpoint_step is not None else
                "no checkpoint had been written yet")
        return (f"training diverged: {what} became NaN or infinite at step {step}; {kept} and "
                f"no model file was written (a previous one is untouched). Resume from the "
                f"checkpoint with the same command and a lower learning rate")

    def history(self) -> dict:
        """Per-epoch metrics of the finished epochs: ``{name: [value per epoch]}``."""
        return self._read_json(HISTORY_FILENAME) or {}

    def record_epoch(self, epoch: int, logs: dict):
        """Adds epoch ``epoch``'s metrics to ``history.json`` (chief only; atomic)."""
        if not self.is_chief:
            return
        history = self.history()
        epochs = history.setdefault("epoch", [])
        if epoch in epochs:  # an epoch re-finished after a resume replaces its entry
            index = epochs.index(epoch)
            for values in history.values():
                del values[index:]
        for key, value in dict(logs or {}, epoch=epoch).items():
            history.setdefault(key, []).append(float(value))
        os.makedirs(self.backup_dir, exist_ok=True)
        write_json_atomic(os.path.join(self.backup_dir, HISTORY_FILENAME), history)

    def _read_json(self, name):
        path = os.path.join(self.backup_dir, name)
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            return json.load(handle)


class Progress:
    """``MODEL_DIR/progress.json``: ``step``, ``total_steps``, ``epoch``, ``checkpoint_step``,
    ``resumed_from_step`` and ``state`` (``training``, ``evaluating``, ``done``, ``diverged``,
    ``collapsed``), replaced atomically (chief only)."""

    def __init__(self, model_dir: str, total_steps: int, steps_per_epoch: int, enabled=True):
        self.path = os.path.join(model_dir, PROGRESS_FILENAME)
        self.fields = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch}
        self.enabled = enabled

    def update(self, **fields):
        self.fields.update(fields, time=time.time())
        if "step" in fields:
            self.fields["epoch"] = fields["step"] // self.fields["steps_per_epoch"]
        if self.enabled:
            write_json_atomic(self.path, self.fields)


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


class _StepCheckpoint(keras.callbacks.Callback):
    """Stops on a non-finite loss, reports progress after every step, checkpoints every
    ``every`` steps and after the last one, and records each finished epoch."""

    def __init__(self, state: RunState, progress: Progress, every: int, steps_per_epoch: int,
                 total_steps: int):
        super().__init__()
        self.state, self.progress = state, progress
        self.every, self.steps_per_epoch, self.total_steps = every, steps_per_epoch, total_steps

    def on_train_batch_end(self, batch, logs=None):
        step = self.state.step
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            self.progress.update(step=step, state="diverged")
            raise NonFiniteTraining(self.state.non_finite_message(step, "the loss"), step,
                                    self.state.checkpoint_step)
        if _checkpoint_due(step, self.every, self.steps_per_epoch, self.total_steps):
            self._save(step)
        self.progress.update(step=step, checkpoint_step=self.state.checkpoint_step)

    def _save(self, step):
        try:
            self.state.save(step)
        except NonFiniteTraining:
            self.progress.update(step=step, state="diverged")
            raise

    def on_epoch_end(self, epoch, logs=None):
        self.state.record_epoch(epoch, logs)


def _checkpoint_due(step, every, steps_per_epoch, total_steps):
    """Checkpoint every ``every`` steps, at the end of every epoch and after the last step."""
    return step % every == 0 or step % steps_per_epoch == 0 or step >= total_steps


def fit_resumable(model: keras.Model, make_stream, validation_data, state: RunState,
                  progress: Progress, epochs: int, steps_per_epoch: int,
                  checkpoint_every_steps: int, callbacks: list, verbose="auto",
                  images_per_step: int | None = None) -> dict:
    """Keras ``fit`` from the restored global step to ``epochs * steps_per_epoch`` steps.

    A run restored in the middle of an epoch first finishes that epoch (``fit`` with the
    remaining steps), then runs the later epochs; the data come from ``make_stream(start_step)``
    (a ``training_stream``). Checkpoints and progress as ``RunState``/``Progress`` describe.

    Returns:
      the history of all finished epochs (this process's and earlier ones'), ``{name: [..]}``.

    Raises:
      NonFiniteTraining: a non-finite loss or weight (the last finite checkpoint stays).
    """
    total_steps = epochs * steps_per_epoch
    step = state.step
    progress.update(step=step, resumed_from_step=step, checkpoint_step=state.checkpoint_step,
                    state="training")
    checkpointer = _StepCheckpoint(state, progress, checkpoint_every_steps, steps_per_epoch,
                                   total_steps)
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        # Finish a partly done epoch alone; otherwise run every remaining epoch in one call.
        last_epoch = epoch + 1 if offset else epochs
        steps = steps_per_epoch - offset
        timer = _EpochTimer(steps * images_per_step if images_per_step else None)
        model.fit(make_stream(step), validation_data=validation_data, initial_epoch=epoch,
                  epochs=last_epoch, steps_per_epoch=steps, shuffle=False,
                  callbacks=[timer, checkpointer] + list(callbacks), verbose=verbose)
        if state.step == step:
            raise TrainingError(f"the training data ran out at step {step} of {total_steps}")
        step = state.step
    if state.checkpoint_step != step:
        state.save(step)
    progress.update(step=step, checkpoint_step=state.checkpoint_step, state="evaluating")
    return state.history()


# ------------------------------------------------------------------------------ ComDefend
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


def is_chief(strategy) -> bool:
    """Whether this process writes the run's files (always, except non-chief workers)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "cluster_spec", None):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0
                                            and "chief" not in resolver.cluster_spec().jobs)


def _train_custom_loop(model, optimizer, state, progress, make_stream, epochs, steps_per_epoch,
                       batch_size, strategy, checkpoint_every_steps):
    total_steps = epochs * steps_per_epoch
    step = state.step
    lowest, highest = _agree_on_step(strategy, step)
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
        if _checkpoint_due(step, checkpoint_every_steps, steps_per_epoch, total_steps):
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


def _agree_on_step(strategy, step):
    """The lowest and highest restored step over all workers (one collective each)."""

    @tf.function
    def gather_steps():
        per_replica = strategy.run(lambda: tf.constant([step], tf.int64))
        return strategy.gather(per_replica, axis=0)

    steps = gather_steps().numpy()
    return int(steps.min()), int(steps.max())
