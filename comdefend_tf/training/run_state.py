"""Resumable training runs: step checkpoints, progress and the non-finite guard, for any Keras
model trained with ``fit`` (ComDefend and the classifiers).

* ``RunState`` (``MODEL_DIR/backup``): ``tf.train.CheckpointManager`` checkpoints of every model
  and optimizer variable, numbered by the global step; ``run.json`` (the run's settings, checked
  on resume: only ``RESUMABLE_CHANGES`` may change) and ``history.json`` (per-epoch metrics).
  ``save`` refuses non-finite variables with ``NonFiniteTraining``.
* ``Progress``: ``MODEL_DIR/progress.json`` (step, epoch, checkpoint step, state), replaced
  atomically after every step.
* ``fit_resumable``: Keras ``fit`` from the restored step to ``epochs * steps_per_epoch``,
  checkpointing every ``checkpoint_every_steps`` steps, at every epoch end and after the last.

A kill at any moment leaves ``backup/checkpoint`` naming a complete checkpoint; why Keras'
``BackupAndRestore`` is not used is in docs/internals/training.md.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from comdefend_tf.io.atomic import write_json_atomic
from comdefend_tf.training.strategies import is_chief

BACKUP_SUBDIR = "backup"
LOG_SUBDIR = "logs"
PROGRESS_FILENAME = "progress.json"
RUN_FILENAME = "run.json"
HISTORY_FILENAME = "history.json"
DEFAULT_CHECKPOINT_EVERY_STEPS = 50
# Run settings a resumed run may change: the rest must match the checkpointed run's.
RESUMABLE_CHANGES = ("learning_rate", "epochs")


class TrainingError(RuntimeError):
    """A run that must not produce a model (or cannot resume); the message says why and what
    was kept."""


class NonFiniteTraining(TrainingError):
    """The loss or a weight became NaN or infinite. ``step``: the step that produced it;
    ``checkpoint_step``: the last finite checkpoint (None when there is none)."""

    def __init__(self, message, step=None, checkpoint_step=None):
        super().__init__(message)
        self.step, self.checkpoint_step = step, checkpoint_step


def all_finite(variables) -> bool:
    """Whether every floating-point value in ``variables`` (Keras or TF variables) is finite."""
    for variable in variables:
        value = tf.convert_to_tensor(variable)
        if value.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(value))):
            return False
    return True


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
        if checkpoint_due(step, self.every, self.steps_per_epoch, self.total_steps):
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


def checkpoint_due(step, every, steps_per_epoch, total_steps):
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

