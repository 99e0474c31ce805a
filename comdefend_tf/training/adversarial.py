"""Adversarial training of a classifier, alone or behind a frozen purifier: the one home of the
attack in the training loop, the eps ramp and the catastrophic-overfitting check.

* ``pgd`` (Madry et al. 2018): every batch is replaced by a PGD attack on the current weights,
  started uniformly in the eps ball (L2: on its sphere), ``steps`` steps of ``step_size`` along
  the sign (L-inf) or the normalised gradient (L2), each projected onto the ball and [0, 1].
* ``fgsm_rs`` (Wong et al. 2020, "fast" training): the same with one step of ``1.25 eps`` from
  the random start.

``AdversarialTrainer`` (a ``keras.Model``) crafts the batch in its ``train_step`` (inside the
compiled step, gradients with respect to the images only, no layer state changed: the
classifier runs in inference mode while attacked) and trains with cross-entropy on logits on
it; ``accuracy`` is measured on the adversarial batch, ``clean_accuracy`` on the clean one.
Behind a purifier the attack differentiates the frozen purifier with BPDA (``bpda_purify``:
hard bits forward and ``sigmoid(noisy logits / T)`` backward, or the identity backward through
the whole purifier), averaging the input gradient over ``eot`` noise draws; the classifier then
trains on ``purifier(x_adv)`` through the deployed purifier.

Attack randomness is stateless: the random start of global step ``g`` on replica ``r`` is
drawn from ``fold_in(fold_in((seed, 0), g), r)``, so a resumed run crafts exactly the batches
the interrupted one would have and nothing needs checkpointing. Eps ramps linearly per step
from 0 to ``eps`` over ``eps_warmup_epochs`` (``eps_at``); the step size follows it.

``OverfittingCheck`` runs a 10-step PGD (full eps) on the first 256 held-out images after every
epoch, records ``pgd_accuracy`` and ``epoch_cpu_seconds`` in the history and TensorBoard, and
stops the run with ``CatastrophicOverfitting`` when that accuracy collapses (``collapse``),
keeping the last good epoch's classifier in ``MODEL_DIR/last_good_epoch``
(docs/adversarial_training.md).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from comdefend_tf import bpda
from comdefend_tf.attacks import apgd_steps
from comdefend_tf.io.atomic import atomic_path
from comdefend_tf.io.datasets import take_arrays
from comdefend_tf.training import provenance, run_state

METHODS = ("none", "pgd", "fgsm_rs")
NORMS = apgd_steps.NORMS
GRADIENTS = ("bpda_smooth", "bpda_identity")
# Madry et al.'s CIFAR-10 recipe uses 7 steps; their MNIST recipe is --adv_steps=40
# --adv_step_size=0.01 at eps 0.3.
DEFAULT_PGD_STEPS = 7
PGD_STEP_SIZE_FACTOR = 2.5  # step_size = 2.5 eps / steps (Madry et al.)
FGSM_RS_STEP_SIZE_FACTOR = 1.25  # step_size = 1.25 eps (Wong et al.)
DEFAULT_TEMPERATURE = 10.0
DEFAULT_NORM, DEFAULT_EOT, DEFAULT_WARMUP_EPOCHS = "linf", 1, 0.0
# The catastrophic-overfitting check: PGD steps and held-out images per epoch. A collapse is a
# PGD accuracy below COLLAPSE_SHARE_OF_BEST of the best epoch so far, below COLLAPSE_ABSOLUTE,
# and at least COLLAPSE_DROP under the best (Wong et al.'s early stop: a 0.2 drop).
CHECK_STEPS, CHECK_IMAGES = 10, 256
COLLAPSE_SHARE_OF_BEST, COLLAPSE_ABSOLUTE, COLLAPSE_DROP = 0.3, 0.2, 0.2
PGD_ACCURACY, EPOCH_CPU_SECONDS = "pgd_accuracy", "epoch_cpu_seconds"
GOOD_SUBDIR = "last_good_epoch"
_FINAL_CHECK_KEY = 999_999  # the end-of-run PGD draws its starts apart from every epoch's
TRAIN_SEED_KEY, CHECK_SEED_KEY = 0, 1


class CatastrophicOverfitting(run_state.TrainingError):
    """The PGD accuracy of an adversarially trained classifier collapsed (Wong et al. 2020)."""


@dataclasses.dataclass(frozen=True)
class AdversarialSettings:
    """One adversarial training recipe (build it with ``make_settings``, which validates)."""

    method: str
    eps: float
    norm: str = DEFAULT_NORM
    steps: int = DEFAULT_PGD_STEPS
    step_size: float = 0.0
    eps_warmup_epochs: float = DEFAULT_WARMUP_EPOCHS
    eot: int = DEFAULT_EOT
    gradient: str | None = None
    temperature: float | None = None

    def for_run(self, behind_purifier: bool, purified_input: bool = False):
        """These settings for a run (behind a purifier run on the fly or not): the BPDA gradient
        defaults to ``bpda_smooth`` at T = 10 behind a purifier and is refused without one."""
        if purified_input:
            raise ValueError("adversarial training attacks the images before the purifier; "
                             "with purified_input the purifier does not run. Train behind it "
                             "on the fly (purifier_dir without purified_input)")
        if not behind_purifier:
            if self.gradient is not None or self.temperature is not None:
                raise ValueError("adv_gradient and adv_temperature choose how the attack "
                                 "differentiates a purifier; give purifier_dir with them")
            if self.eot > 1:
                raise ValueError(f"adv_eot {self.eot} averages gradients over purifier noise "
                                 "draws; without purifier_dir the classifier is deterministic")
            return self
        gradient = self.gradient or "bpda_smooth"
        temperature = self.temperature
        if gradient == "bpda_smooth" and temperature is None:
            temperature = DEFAULT_TEMPERATURE
        return dataclasses.replace(self, gradient=gradient, temperature=temperature)

    def settings(self) -> dict:
        """The run settings (``run.json``): a changed one refuses to resume."""
        return dataclasses.asdict(self)

    def gradient_name(self) -> str | None:
        """``bpda_smooth(T=10)``, ``bpda_identity`` or None (no purifier)."""
        if self.gradient == "bpda_smooth":
            return f"bpda_smooth(T={self.temperature:g})"
        return self.gradient


def make_settings(method: str = "none", eps: float | None = None, norm: str = DEFAULT_NORM,
                  steps: int | None = None, step_size: float | None = None,
                  eps_warmup_epochs: float = DEFAULT_WARMUP_EPOCHS, eot: int = DEFAULT_EOT,
                  gradient: str | None = None,
                  temperature: float | None = None) -> AdversarialSettings | None:
    """Validated settings, or None for ``method='none'`` (clean training).

    Defaults: ``steps`` 7 for ``pgd`` (``fgsm_rs`` is one step); ``step_size`` 2.5 eps / steps
    for ``pgd``, 1.25 eps for ``fgsm_rs``; ``gradient``/``temperature`` see ``for_run``.

    Raises:
      ValueError: naming the bad setting (``adv_*`` like the binary's flags), what was expected
        and what came.
    """
    if method not in METHODS:
        raise ValueError(f"adversarial must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "none":
        given = {"adv_eps": eps, "adv_steps": steps, "adv_step_size": step_size,
                 "adv_gradient": gradient, "adv_temperature": temperature}
        given = [name for name, value in given.items() if value is not None]
        if eps_warmup_epochs != DEFAULT_WARMUP_EPOCHS:
            given.append("adv_eps_warmup_epochs")
        if eot != DEFAULT_EOT:
            given.append("adv_eot")
        if norm != DEFAULT_NORM:
            given.append("adv_norm")
        if given:
            raise ValueError(f"{', '.join(given)} set without adversarial training; add "
                             "adversarial=pgd or fgsm_rs")
        return None
    if eps is None or not 0 < eps < float("inf"):
        raise ValueError(f"adversarial={method} needs adv_eps > 0 (the attack radius in [0, 1] "
                         f"pixel units), got {eps}")
    if norm not in NORMS:
        raise ValueError(f"adv_norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if method == "fgsm_rs":
        if steps not in (None, 1):
            raise ValueError(f"fgsm_rs takes one step by definition; adv_steps {steps} is for "
                             "pgd")
        steps = 1
    steps = DEFAULT_PGD_STEPS if steps is None else steps
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"adv_steps must be an integer >= 1, got {steps!r}")
    if step_size is None:
        step_size = (FGSM_RS_STEP_SIZE_FACTOR * eps if method == "fgsm_rs"
                     else PGD_STEP_SIZE_FACTOR * eps / steps)
    if not 0 < step_size < float("inf"):
        raise ValueError(f"adv_step_size must be > 0, got {step_size}")
    if not 0 <= eps_warmup_epochs < float("inf"):
        raise ValueError(f"adv_eps_warmup_epochs must be >= 0 epochs, got {eps_warmup_epochs}")
    if not isinstance(eot, (int, np.integer)) or eot < 1:
        raise ValueError(f"adv_eot must be an integer >= 1 (gradient draws per attack step), "
                         f"got {eot!r}")
    if gradient is not None and gradient not in GRADIENTS:
        raise ValueError(f"adv_gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
    if temperature is not None:
        if gradient == "bpda_identity":
            raise ValueError("adv_temperature is the smoothed binarizer's; bpda_identity has "
                             "none")
        if not 0 < temperature < float("inf"):
            raise ValueError(f"adv_temperature must be > 0, got {temperature}")
    return AdversarialSettings(method, float(eps), norm, int(steps), float(step_size),
                               float(eps_warmup_epochs), int(eot), gradient,
                               None if temperature is None else float(temperature))


def eps_at(step, eps: float, warmup_steps: int):
    """The radius at global step ``step`` (0-based): ``eps * min(1, step / warmup_steps)``, the
    full ``eps`` without a warm-up. Works on Python numbers and tensors."""
    if warmup_steps <= 0:
        return ops.convert_to_tensor(eps, "float32")
    return eps * ops.minimum(1.0, ops.cast(step, "float32") / float(warmup_steps))


def bpda_purify(purifier, gradient: str, temperature: float | None = None):
    """``images -> purified``: the deployed purification forward (hard bits, inference noise),
    with a BPDA backward pass (``comdefend_tf.bpda``): ``bpda_smooth`` through
    ``sigmoid(noisy logits / T)`` at the binarizer, ``bpda_identity`` the identity through the
    whole purifier."""
    if gradient == "bpda_identity":
        return bpda.identity_backward(lambda images: purifier(images, training=False))
    if gradient != "bpda_smooth" or not temperature or temperature <= 0:
        raise ValueError(f"bpda_purify needs bpda_identity or bpda_smooth with a temperature "
                         f"> 0, got {gradient!r}, {temperature!r}")
    return bpda.smoothed_purify(purifier, temperature)


class _StatelessDraws:
    """The ``uniform``/``normal`` face of a ``tf.random.Generator`` (what
    ``apgd_steps.random_start`` takes), drawn with stateless ops from one seed ``int64 [2]``."""

    def __init__(self, seed):
        self.seed = seed

    def uniform(self, shape, minval, maxval):
        return tf.random.stateless_uniform(shape, self.seed, minval, maxval)

    def normal(self, shape):
        return tf.random.stateless_normal(shape, self.seed)


def attack_seed(seed: int, key: int, counter):
    """The random-start seed int64 ``[2]`` of one attack: ``fold_in(fold_in((seed, key),
    counter), replica)`` (``key`` ``TRAIN_SEED_KEY`` with the global step as ``counter`` in
    training, ``CHECK_SEED_KEY`` for the checks), distinct per step and replica."""
    base = tf.constant([seed, key], tf.int64)
    folded = tf.random.experimental.stateless_fold_in(base, tf.cast(counter, tf.int64))
    context = tf.distribute.get_replica_context()
    replica = 0 if context is None else context.replica_id_in_sync_group
    return tf.random.experimental.stateless_fold_in(folded, tf.cast(replica, tf.int64))


class AdversarialTrainer(keras.Model):
    """Trains ``classifier`` (behind the frozen ``purifier`` when given) on adversarial batches.

    ``call``: images float32 ``[B, H, W, C]`` in [0, 1] -> logits, through the deployed
    pipeline ``classifier(purifier(images))``. ``train_step`` crafts ``craft(images, labels)``
    against the current weights and trains on it. Never saved: the classifier is.

    Args:
      classifier: images -> logits. settings: ``AdversarialSettings.for_run``'s result.
      purifier: a ComDefend model (set ``trainable=False``) or None.
      seed: keys the attack's random starts. steps_per_epoch: sizes the eps ramp.
    """

    def __init__(self, classifier, settings: AdversarialSettings, purifier=None, seed: int = 0,
                 steps_per_epoch: int = 1, **kwargs):
        super().__init__(**kwargs)
        if purifier is not None:
            purifier.trainable = False
            settings = settings.for_run(True)
        self.classifier, self.purifier, self.settings = classifier, purifier, settings
        self.seed = int(seed)
        self.warmup_steps = int(round(settings.eps_warmup_epochs * steps_per_epoch))
        self.clean_accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(
            name="clean_accuracy")
        self._surrogate = (None if purifier is None else
                           bpda_purify(purifier, settings.gradient, settings.temperature))
        self._training_step = False
        self._check = tf.function(self._pgd_correct, reduce_retracing=True)

    def call(self, images, training=None):
        if self.purifier is not None:
            images = self.purifier(images, training=False)
        return self.classifier(images, training=training)

    def attacked_logits(self, images):
        """What the attack differentiates: the classifier in inference mode, behind the
        purifier's BPDA surrogate when there is one."""
        if self._surrogate is not None:
            images = self._surrogate(images)
        return self.classifier(images, training=False)

    def craft(self, images, labels, eps, step_size, steps: int, seed):
        """Adversarial images float32 ``[B, H, W, C]`` in [0, 1] within ``eps`` of ``images``
        (``settings.norm``): a random start (``seed``, int64 ``[2]``), then ``steps`` projected
        steps of ``step_size`` on the EOT-averaged cross-entropy gradient. No gradient flows
        out of the result."""
        norm = self.settings.norm
        images = tf.convert_to_tensor(images, tf.float32)
        start = apgd_steps.random_start(images, eps, norm, _StatelessDraws(seed))

        def step(index, current):
            _, _, _, gradient = apgd_steps.eot_gradient(self.attacked_logits, current, labels,
                                                        "ce", self.settings.eot)
            moved = current + step_size * apgd_steps.step_direction(gradient, norm)
            return index + 1, apgd_steps.project(moved, images, eps, norm)

        _, adversarial = tf.while_loop(lambda index, _: index < steps, step,
                                       (tf.constant(0), start))
        return tf.stop_gradient(adversarial)

    def train_step(self, data):
        images, labels = data[0], data[1]
        step = self.optimizer.iterations
        ramp = eps_at(step, 1.0, self.warmup_steps)
        adversarial = self.craft(images, labels, self.settings.eps * ramp,
                                 self.settings.step_size * ramp, self.settings.steps,
                                 attack_seed(self.seed, TRAIN_SEED_KEY, step))
        # The clean batch through the weights the attack saw, before the update.
        self.clean_accuracy_tracker.update_state(labels, self(images, training=False))
        self._training_step = True  # at trace time: compute_metrics sees adversarial logits
        try:  # Keras' step: loss scaling, the update, and every metric's result (ours too)
            return super().train_step((adversarial, labels))
        finally:
            self._training_step = False

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if not self._training_step:  # evaluation: the predictions are the clean ones
            self.clean_accuracy_tracker.update_state(y, y_pred)
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def _pgd_correct(self, images, labels, seed):
        settings = self.settings
        adversarial = self.craft(images, labels, settings.eps,
                                 PGD_STEP_SIZE_FACTOR * settings.eps / CHECK_STEPS, CHECK_STEPS,
                                 seed)
        predictions = tf.argmax(self(adversarial, training=False), axis=-1)
        return tf.reduce_sum(tf.cast(predictions == tf.cast(labels, predictions.dtype),
                                     tf.int32))

    def pgd_accuracy(self, images, labels, key: int = 0, batch_size: int = 128) -> float:
        """Accuracy in [0, 1] of the deployed pipeline on a ``CHECK_STEPS``-step PGD (full eps,
        step 2.5 eps / steps, random start keyed by ``(seed, key)``) of ``images`` float32
        ``[n, H, W, C]`` in [0, 1] with int ``labels [n]``."""
        correct = 0
        for start in range(0, len(images), batch_size):
            seed = attack_seed(self.seed, CHECK_SEED_KEY, key * 1_000_003 + start)
            correct += int(self._check(images[start:start + batch_size],
                                       labels[start:start + batch_size], seed))
        return correct / max(len(images), 1)


def collapse(pgd_accuracies) -> str | None:
    """Why the last of ``pgd_accuracies`` (one per epoch, in [0, 1]) is a catastrophic
    overfitting, or None: below ``COLLAPSE_SHARE_OF_BEST`` of the best earlier epoch, below
    ``COLLAPSE_ABSOLUTE`` and at least ``COLLAPSE_DROP`` under that best."""
    values = [float(value) for value in pgd_accuracies]
    if len(values) < 2:
        return None
    best_epoch = int(np.argmax(values[:-1]))
    best, last = values[best_epoch], values[-1]
    if (last < COLLAPSE_SHARE_OF_BEST * best and last < COLLAPSE_ABSOLUTE
            and best - last >= COLLAPSE_DROP):
        return (f"catastrophic overfitting at epoch {len(values) - 1}: PGD accuracy on the "
                f"held-out check batch fell from {best:.3f} (epoch {best_epoch}) to {last:.3f}")
    return None


class OverfittingCheck(keras.callbacks.Callback):
    """After every epoch: ``pgd_accuracy`` on the held-out check batch and ``epoch_cpu_seconds``
    (process CPU time of the epoch, the check included) into the logs (so the history and
    TensorBoard, placed after this callback, record them); a collapse (``collapse``) warns and
    raises ``CatastrophicOverfitting``. A non-collapsed epoch's classifier is written to
    ``model_dir/last_good_epoch/classifier.keras``; a resumed run that had collapsed is refused
    at once.

    Args:
      trainer: the ``AdversarialTrainer``. images, labels: the check batch (numpy).
      state: the run's ``RunState`` (its history holds the earlier epochs' values).
      model_dir: where ``last_good_epoch`` goes (None: nowhere).
    """

    def __init__(self, trainer, images, labels, state, model_dir=None):
        super().__init__()
        self.trainer, self.images, self.labels = trainer, images, labels
        self.state, self.model_dir = state, model_dir

    @classmethod
    def on_held_out(cls, trainer, held_out, state, model_dir=None):
        """The check on the first ``CHECK_IMAGES`` examples of ``held_out`` (an ``(image,
        label)`` dataset)."""
        return cls(trainer, *take_arrays(held_out, CHECK_IMAGES), state, model_dir)

    def on_train_begin(self, logs=None):
        refuse_collapsed(self.state.history(), self.state.backup_dir)

    def on_epoch_begin(self, epoch, logs=None):
        self._cpu_start = time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logs[PGD_ACCURACY] = self.trainer.pgd_accuracy(self.images, self.labels, key=epoch)
        logs[EPOCH_CPU_SECONDS] = time.process_time() - self._cpu_start
        # The step checkpointer recorded this epoch before the value existed: record it again
        # (record_epoch replaces an epoch's entry).
        self.state.record_epoch(epoch, logs)
        history = self.state.history().get(PGD_ACCURACY, [])
        message = collapse(history)
        if message is not None:
            good = (f"; the classifier of the last good epoch is in "
                    f"{os.path.join(self.model_dir, GOOD_SUBDIR)}" if self.model_dir
                    and os.path.isdir(os.path.join(self.model_dir, GOOD_SUBDIR)) else "")
            message += (f"{good}; no classifier was written (use pgd, a smaller "
                        f"adv_step_size or an eps warm-up)")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            raise CatastrophicOverfitting(message)
        if self.model_dir and self.state.is_chief:
            path = os.path.join(self.model_dir, GOOD_SUBDIR, "classifier.keras")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_path(path) as partial:
                self.trainer.classifier.save(partial)


def refuse_collapsed(history: dict, where: str = "the run"):
    """Raises ``CatastrophicOverfitting`` when ``history``'s last epoch collapsed (a resumed or
    finished run must not write its classifier)."""
    message = collapse(history.get(PGD_ACCURACY, []))
    if message is not None:
        raise CatastrophicOverfitting(f"{message} (recorded in {where}); no classifier was "
                                      "written. Start afresh in another model directory")


def run_metrics(check: OverfittingCheck, history: dict, purifier_info) -> dict:
    """The ``metrics.json`` entries of an adversarial run: ``adversarial_training`` (the recipe,
    ``pgd_accuracy_per_epoch``, ``train_cpu_seconds`` summed over the recorded epochs) and
    ``held_out_adversarial_accuracy`` (the check's PGD on the held-out batch now). Raises
    ``CatastrophicOverfitting`` when the history ends in a collapse."""
    refuse_collapsed(history)
    trainer, images, labels = check.trainer, check.images, check.labels
    settings = trainer.settings
    record = {"method": settings.method, "norm": settings.norm, "eps": settings.eps,
              "steps": settings.steps, "step_size": settings.step_size,
              "eps_warmup_epochs": settings.eps_warmup_epochs, "eot": settings.eot,
              "gradient": settings.gradient_name(),
              "behind_purifier": trainer.purifier is not None,
              "purifier_fingerprint": (purifier_info or {}).get("fingerprint"),
              "pgd_accuracy_per_epoch": [float(v) for v in history.get(PGD_ACCURACY, [])],
              "train_cpu_seconds": float(sum(history.get(EPOCH_CPU_SECONDS, []))),
              "check": {"attack": "pgd", "steps": CHECK_STEPS, "num_images": len(images),
                        "step_size": PGD_STEP_SIZE_FACTOR * settings.eps / CHECK_STEPS}}
    return {provenance.ADVERSARIAL_KEY: record,
            "held_out_adversarial_accuracy": trainer.pgd_accuracy(images, labels,
                                                                    key=_FINAL_CHECK_KEY)}
