"""cleverhans 4.0.0's Carlini-Wagner L2 and SPSA, made to run under Keras 3, without
monkeypatching cleverhans (installed with ``pip install --no-deps cleverhans==4.0.0``).

* ``CarliniWagnerL2``: upstream's attack with a Keras 3 optimizer (one per batch shape, reset
  for every batch and binary-search step), true labels sliced per batch for an untargeted
  attack, and the trade-off constant, its bounds and the early abort kept per example
  (``[batch]``): every example is attacked as if it were alone, so the result does not depend
  on the batch size.
* ``SPSAAdam`` accepts ``lr``; ``spsa`` runs upstream's projected SPSA-Adam steps and returns
  the iterate with the lowest loss seen (the random start included), not the last one.

Images are float32 ``[B, H, W, C]`` within the clip range; upstream's losses, gradients,
optimizer updates and projections are imported, not copied. What broke upstream, and why each
change: docs/internals/evaluation.md.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from comdefend_tf import optional

# Without cleverhans, importing this module (and comdefend_tf.attacks) raises
# optional.MissingExtra, one line naming `pip install --no-deps cleverhans==4.0.0`.
_CLEVERHANS_FEATURE = "comdefend_tf.attacks"
_cw = optional.require("cleverhans.tf2.attacks.carlini_wagner_l2", None, _CLEVERHANS_FEATURE)
_spsa = optional.require("cleverhans.tf2.attacks.spsa", None, _CLEVERHANS_FEATURE)


class _AdamWithVariablesMethod:
    """A Keras 3 Adam with the face cleverhans' C&W expects: ``variables()`` is a method and
    returns the optimizer state to reset (iteration count, moments), never the learning rate."""

    def __init__(self, learning_rate: float):
        self._adam = keras.optimizers.Adam(learning_rate)

    def variables(self):
        return [variable for variable in self._adam.variables
                if variable.name != "learning_rate"]

    def apply_gradients(self, grads_and_vars):
        return self._adam.apply_gradients(grads_and_vars)


class CarliniWagnerL2(_cw.CarliniWagnerL2):
    """cleverhans' ``CarliniWagnerL2`` running under Keras 3 (see the module docstring).

    Same arguments as upstream, plus ``targeted``: with ``targeted=False`` and labels ``y``
    (int ``[n]``) the attack pushes each image away from its true label instead of the model's
    guess. ``attack(x)`` takes numpy float32 ``[n, H, W, C]`` in ``[clip_min, clip_max]`` and
    returns numpy adversarial images of the same shape: the smallest-L2 successful image found
    for each example, or the clean image where none was found.
    """

    def __init__(self, model_fn, y=None, targeted=False, **kwargs):
        super().__init__(model_fn, y=None, **kwargs)
        if targeted and y is None:
            raise ValueError("a targeted C&W attack needs target labels y")
        self._labels = None if y is None else np.asarray(y)
        self.targeted = bool(targeted)

    def attack(self, x):
        x = np.asarray(x, dtype=np.float32)
        adversarial = np.zeros_like(x)
        for start in range(0, len(x), self.batch_size):
            stop = start + self.batch_size
            self.y = None if self._labels is None else self._labels[start:stop]
            adversarial[start:stop] = np.asarray(self._attack(x[start:stop]))
        return adversarial

    def _attack(self, x):
        """One batch: numpy or tensor ``[B, H, W, C]`` in ``[clip_min, clip_max]`` -> the
        smallest-L2 successful image per example (the input where none was found)."""
        original = tf.cast(x, tf.float32)
        if np.any(original.numpy() < self.clip_min) or np.any(original.numpy() > self.clip_max):
            raise _cw.CarliniWagnerL2Exception(
                f"the input must lie in [{self.clip_min}, {self.clip_max}]")
        y, _ = _cw.get_or_guess_labels(self.model_fn, original, y=self.y,
                                       targeted=self.targeted)
        y = tf.cast(y, tf.float32)
        batch = int(original.shape[0])
        scaled = tf.clip_by_value((original - self.clip_min) / (self.clip_max - self.clip_min),
                                  0.0, 1.0)
        tanh_x = tf.atanh((scaled * 2.0 - 1.0) * 0.999999)
        # Per-example binary-search state: [batch], never the image shape (upstream's bug).
        lower = np.zeros(batch)
        upper = np.full(batch, 1e10)
        const = np.full(batch, float(self.initial_const))
        best_l2 = np.full(batch, np.inf)
        best_attack = original.numpy().copy()
        modifier, step = self._state_for(tuple(tanh_x.shape))
        check_every = (self.max_iterations // 10) or 1
        for outer_step in range(self.binary_search_steps):
            modifier.assign(tf.zeros_like(tanh_x))
            for variable in self.optimizer.variables():
                variable.assign(tf.zeros(variable.shape, dtype=variable.dtype))
            if self.binary_search_steps >= 10 and outer_step == self.binary_search_steps - 1:
                const = upper.copy()
            succeeded = np.zeros(batch, bool)
            running = np.ones(batch, bool)
            previous_loss = np.full(batch, np.inf)
            const_tensor = tf.constant(const, tf.float32)
            for iteration in range(self.max_iterations):
                x_new, logits, l2_dist = step(tanh_x, y, const_tensor, tf.constant(running))
                margin = self._margin(logits.numpy(), y.numpy())
                l2_dist = l2_dist.numpy()
                success = running & (margin > self.confidence)
                succeeded |= success
                better = success & (l2_dist < best_l2)
                if better.any():
                    best_l2[better] = l2_dist[better]
                    best_attack[better] = x_new.numpy()[better]
                if self.abort_early and iteration % check_every == 0:
                    loss = l2_dist + const * np.maximum(0.0, self.confidence - margin)
                    running &= ~(loss > previous_loss * 0.9999)
                    previous_loss = np.where(running, loss, previous_loss)
                    if not running.any():
                        break
            upper = np.where(succeeded, np.minimum(upper, const), upper)
            lower = np.where(succeeded, lower, np.maximum(lower, const))
            bounded = upper < 1e9
            const = np.where(bounded, (lower + upper) / 2.0,
                             np.where(succeeded, const, const * 10.0))
        return best_attack

    def _state_for(self, shape):
        """The modifier variable, optimizer and compiled step for batches of ``shape``, made
        once per shape (every batch resets them), so batches after the first never retrace."""
        if not hasattr(self, "_per_shape"):
            self._per_shape = {}
        if shape not in self._per_shape:
            modifier = tf.Variable(tf.zeros(shape, tf.float32), trainable=True)
            optimizer = _AdamWithVariablesMethod(self.learning_rate)
            self._per_shape[shape] = (optimizer, modifier,
                                      self._compiled_step(modifier, optimizer))
        self.optimizer, modifier, step = self._per_shape[shape]
        return modifier, step

    def _compiled_step(self, modifier, optimizer):
        """One Adam step on ``modifier`` as a single ``tf.function``: upstream's ``gradient``
        (loss and its gradient at the current point) then the update; examples whose
        ``running`` flag is off keep their modifier (Adam still sees them, but their point
        never moves again, so each example is attacked as if alone). Returns the point the
        gradient was taken at, its logits and squared L2 distance."""
        adam = optimizer._adam
        adam.build([modifier])

        @tf.function
        def step(tanh_x, y, const, running):
            before = tf.identity(modifier)
            x_new, gradient, _, logits, l2_dist = self.gradient(tanh_x, y, modifier, const)
            adam.apply_gradients([(gradient, modifier)])
            keep = tf.reshape(tf.logical_not(running), [-1, 1, 1, 1])
            modifier.assign(tf.where(keep, before, modifier))
            return x_new, logits, l2_dist

        return step

    def _margin(self, logits, one_hot):
        """How far each example is past the decision boundary (> 0: adversarial): the best
        other logit minus the label's (untargeted) or the target's minus the best other."""
        label_logit = np.sum(one_hot * logits, axis=1)
        other = np.max(np.where(one_hot > 0.5, -np.inf, logits), axis=1)
        return label_logit - other if self.targeted else other - label_logit


def carlini_wagner_l2(model_fn, x, **kwargs):
    """Function interface, as upstream: ``CarliniWagnerL2(model_fn, **kwargs).attack(x)``."""
    return CarliniWagnerL2(model_fn, **kwargs).attack(x)


class SPSAAdam(_spsa.SPSAAdam):
    """Upstream's SPSA optimizer, built through the Keras 3 ``learning_rate`` argument."""

    def __init__(self, lr=0.01, delta=0.01, num_samples=128, num_iters=1,
                 compare_to_analytic_grad=False):
        keras.optimizers.Adam.__init__(self, learning_rate=lr)
        if num_samples % 2:
            raise ValueError(f"spsa_samples must be even, got {num_samples}")
        # Upstream's update rule reads these plain attributes.
        self.lr = lr
        self._delta = delta
        self._num_samples = num_samples // 2  # mirrored +/- delta samples
        self._num_iters = num_iters
        self._compare_to_analytic_grad = compare_to_analytic_grad


def spsa(model_fn, x, y, eps, nb_iter, clip_min=None, clip_max=None, targeted=False,
         early_stop_loss_threshold=None, learning_rate=0.01, delta=0.01, spsa_samples=128,
         spsa_iters=1, is_debug=False, seed=None):
    """SPSA (Uesato et al. 2018, L-inf, gradient-free) with upstream's ``SPSAAdam`` steps and
    projection, returning the best iterate.

    ``x``: float32 tensor ``[1, H, W, C]`` (SPSA works on one image at a time); ``y``: int
    ``[1]`` true label (or target when ``targeted``). The loss is upstream's margin loss (the
    label's logit minus the best other one untargeted; negative = misclassified). Starting from
    a uniform random point of the eps ball, ``nb_iter`` steps are taken; the returned image is
    the iterate with the lowest loss seen (so a misclassified iterate is never traded for a
    later, correctly classified one), within ``eps`` of ``x`` in L-inf and inside
    ``[clip_min, clip_max]``. ``early_stop_loss_threshold``: stop once the loss is below it.
    ``seed``: seed of the random start (None: TensorFlow's global generator). ``is_debug``
    prints the loss per step.
    """
    if x.get_shape().as_list()[0] != 1:
        raise ValueError("SPSA works on one image at a time: x must have batch size 1")
    optimizer = SPSAAdam(lr=learning_rate, delta=delta, num_samples=spsa_samples,
                         num_iters=spsa_iters)

    def loss_fn(images, label):
        logits = model_fn(images)
        sign = 1 if targeted else -1
        return sign * _spsa.margin_logit_loss(logits, label, nb_classes=logits.shape[-1])

    if seed is None:
        start = tf.random.uniform(tf.shape(x), -eps, eps, dtype=x.dtype)
    else:
        start = tf.random.Generator.from_seed(seed).uniform(tf.shape(x), -eps, eps,
                                                             dtype=x.dtype)
    perturbation = _spsa._project_perturbation(start, eps, x, clip_min=clip_min,
                                               clip_max=clip_max)
    state = optimizer.init_state([perturbation])
    best = perturbation
    best_loss = float(tf.reduce_mean(loss_fn(x + perturbation, y)))
    for step in range(nb_iter):
        updated, state = optimizer.minimize(lambda p: loss_fn(x + p, y), [perturbation], state)
        perturbation = _spsa._project_perturbation(updated[0], eps, x, clip_min=clip_min,
                                                   clip_max=clip_max)
        loss = float(tf.reduce_mean(loss_fn(x + perturbation, y)))
        if is_debug:
            print(f"spsa step {step}: loss {loss:.6g} (best {min(loss, best_loss):.6g})")
        if loss < best_loss:
            best, best_loss = perturbation, loss
        if early_stop_loss_threshold is not None and loss < early_stop_loss_threshold:
            break
    return x + best
