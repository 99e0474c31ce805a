"""cleverhans 4.0.0's Carlini-Wagner L2 and SPSA, made to run under Keras 3, without
monkeypatching cleverhans.

cleverhans 4.0.0 (installed with ``pip install --no-deps cleverhans==4.0.0``; see
``../shared/STACK_NOTES.md``) was written against the ``tf.keras`` 2 optimizers:

* ``CarliniWagnerL2`` resets its Adam state at every binary-search step with
  ``self.optimizer.variables()``; in Keras 3 ``variables`` is a property (``TypeError: 'list'
  object is not callable``). Returning the property's list is a trap: Keras 3 lists the
  learning-rate variable there, cleverhans zeroes it, and the attack silently returns the clean
  images. ``CarliniWagnerL2`` below gives it an optimizer whose ``variables()`` leaves the
  learning rate out, builds a fresh optimizer per batch (a Keras 3 optimizer is bound to the
  variables it was built with) and slices the true labels per batch for an untargeted attack
  (upstream treats any given ``y`` as a target).
* ``spsa`` builds ``SPSAAdam(lr=...)``, which Keras 3 rejects (``Argument(s) not recognized:
  {'lr': 0.01}``). ``SPSAAdam`` below accepts ``lr`` and ``spsa`` uses it with upstream's
  ``projected_optimization`` and ``margin_logit_loss``.

Everything else is upstream code, imported, not copied.
"""

from __future__ import annotations

import keras
import numpy as np
from cleverhans.tf2.attacks import carlini_wagner_l2 as _cw
from cleverhans.tf2.attacks import spsa as _spsa


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
            self.optimizer = _AdamWithVariablesMethod(self.learning_rate)
            adversarial[start:stop] = np.asarray(self._attack(x[start:stop]))
        return adversarial


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
         spsa_iters=1, is_debug=False):
    """Upstream's ``spsa`` (Uesato et al. 2018, L-inf, gradient-free) with ``SPSAAdam`` above.

    ``x``: float32 tensor ``[1, H, W, C]`` (SPSA works on one image at a time); ``y``: int
    ``[1]`` true label (or target when ``targeted``). Returns the adversarial image tensor,
    within ``eps`` of ``x`` in L-inf and inside ``[clip_min, clip_max]``.
    """
    if x.get_shape().as_list()[0] != 1:
        raise ValueError("SPSA works on one image at a time: x must have batch size 1")
    optimizer = SPSAAdam(lr=learning_rate, delta=delta, num_samples=spsa_samples,
                         num_iters=spsa_iters)

    def loss_fn(images, label):
        logits = model_fn(images)
        sign = 1 if targeted else -1
        return sign * _spsa.margin_logit_loss(logits, label, nb_classes=logits.shape[-1])

    return _spsa.projected_optimization(loss_fn, x, y, eps, nb_iter, optimizer, clip_min,
                                        clip_max, early_stop_loss_threshold, is_debug=is_debug)
