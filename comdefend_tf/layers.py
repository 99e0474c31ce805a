"""The two layers that make ComDefend's code binary: noise on the code logits, and a
straight-through binarizer.

Both are written with ``keras.ops`` only, so they run on the TensorFlow, JAX and PyTorch
backends, inside ``tf.function``, under ``GradientTape`` and in SavedModels. Both are registered
Keras serializables and round-trip through ``.keras`` files with ``safe_mode=True``.
"""

from __future__ import annotations

import secrets

import keras
from keras import ops

GRADIENTS = ("identity", "sigmoid")


@keras.saving.register_keras_serializable(package="comdefend_tf")
class CodeNoise(keras.layers.Layer):
    """Subtracts Gaussian noise from the code logits: ``logits - N(0, std**2)``.

    The noise standard deviation is set separately for training (the release: 20.0, which
    forces the encoder to push its logits far from 0) and inference (the release: 1.0; 0 gives a
    deterministic purifier and skips the random draw entirely). Fresh noise per element and call.

    Call args:
      code_logits: float tensor ``[batch, height, width, code_channels]``, any real values.
      training: selects ``train_std`` (True) or ``inference_std`` (False/None).
      noise: optional tensor broadcastable to ``code_logits`` used instead of a fresh draw (an
        attacker who knows the draw, or a test). It is subtracted as given, not scaled.
      std_scale: optional scalar multiplying the training std (a warm-up schedule raises it
        from 0 to 1 inside a compiled training step); ignored at inference.

    Returns:
      ``code_logits`` minus the noise, same shape and dtype.

    Unpredictable noise: with ``seed=None`` (the default) the draws come from a generator seeded
    from the operating system's entropy, at construction and again whenever saved weights are
    loaded. A seed is never saved with the layer and one found in an older file is ignored:
    otherwise every process loading one ``.keras`` file would replay the same draws, which
    anyone holding the file could compute. An integer ``seed`` given in code makes the draws
    reproducible in this process (tests, training runs); ask for it again after loading
    (``load_comdefend(..., seed=N)``) if reproducible purification is wanted.
    """

    def __init__(self, train_std: float = 20.0, inference_std: float = 0.0,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if train_std < 0 or inference_std < 0:
            raise ValueError(f"noise standard deviations must be >= 0, got train_std={train_std}, "
                             f"inference_std={inference_std}")
        self.train_std = float(train_std)
        self.inference_std = float(inference_std)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(
            _entropy_seed() if seed is None else seed)

    def load_own_variables(self, store):
        super().load_own_variables(store)
        if self.seed is None:
            self.reseed_from_entropy()

    def reseed_from_entropy(self):
        """Restarts the noise generator from a fresh OS-entropy seed (counter 0)."""
        state = self.seed_generator.state
        state.assign(ops.cast(ops.convert_to_tensor([_entropy_seed(), 0]), state.dtype))

    def call(self, code_logits, training=None, noise=None, std_scale=None):
        if noise is not None:
            return code_logits - ops.cast(noise, code_logits.dtype)
        std = self.train_std if training else self.inference_std
        if std == 0.0:
            return code_logits
        draw = keras.random.normal(ops.shape(code_logits), stddev=1.0,
                                   dtype=code_logits.dtype, seed=self.seed_generator)
        if training and std_scale is not None:
            std = std * ops.cast(std_scale, code_logits.dtype)
        return code_logits - std * draw

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        # No seed in the file (see the class docstring): a loaded layer is entropy-seeded.
        config = super().get_config()
        config.update(train_std=self.train_std, inference_std=self.inference_std, seed=None)
        return config

    @classmethod
    def from_config(cls, config):
        # Files written before the seed was left out may carry one; it is ignored, so no file
        # decides the draws.
        return cls(**{**config, "seed": None})


def _entropy_seed() -> int:
    """A seed in [1, 2**31) from the operating system's entropy (``secrets``), never from
    Python's or Keras' global seeded state."""
    return 1 + secrets.randbelow(2 ** 31 - 1)


def hard_threshold(code_logits):
    """0/1 code bits, ``code_logits > 0`` (equal to ``sigmoid(code_logits) > 0.5``), same dtype.

    No gradient flows through this function; use ``StraightThroughBinarize`` in a model.
    """
    return ops.cast(ops.greater(code_logits, 0), code_logits.dtype)


@keras.saving.register_keras_serializable(package="comdefend_tf")
class StraightThroughBinarize(keras.layers.Layer):
    """Hard 0/1 code bits in the forward pass, a straight-through gradient in the backward pass.

    Forward: ``bits = 1 where code_logits > 0 else 0`` (exactly 0.0 or 1.0, never rounded).
    Backward (``gradient``):
      * ``identity``: d bits / d logits = 1 (BPDA's straight-through estimator);
      * ``sigmoid``: d bits / d logits = sigmoid'(logits) (the soft code's gradient).

    The identity is written ``bits + (surrogate - stop_gradient(surrogate))``: the bracket is
    exactly 0 in the forward pass, so the bits are exact, and its gradient is the surrogate's.

    Call args:
      code_logits: float tensor of any shape (noisy logits).

    Returns:
      float tensor of the same shape and dtype holding 0.0/1.0.
    """

    def __init__(self, gradient: str = "identity", **kwargs):
        super().__init__(**kwargs)
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
        self.gradient = gradient

    def call(self, code_logits):
        bits = hard_threshold(code_logits)
        surrogate = code_logits if self.gradient == "identity" else ops.sigmoid(code_logits)
        return bits + (surrogate - ops.stop_gradient(surrogate))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(gradient=self.gradient)
        return config
