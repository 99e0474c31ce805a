"""``LiteRTPurifierDefense``: a LiteRT purifier with the face of the baseline defenses.

``defense(images)`` takes float32 ``[batch, height, width, channels]`` in [0, 1] and returns
the LiteRT model's purified images (same shape, in [0, 1]): what a device would output. Its
gradient is BPDA through the float ComDefend purifier that the file was converted from:

    output = float_purifier(images) + stop_gradient(litert(images) - float_purifier(images))

so the forward values are the LiteRT forward pass exactly and the backward pass is the float
purifier's deployed gradient (its straight-through binarizer). Attacks that need gradients
then attack the quantized purifier through the float model's gradients and are scored on the
LiteRT output; gradient-free attacks see only the LiteRT output. ``randomized`` is True when
the file draws code noise (``evaluation.baselines.is_randomized`` reads it: attacks use EOT).
The LiteRT call runs in ``tf.numpy_function`` (eager or inside a ``tf.function``; not in a
SavedModel). Input the runtime refuses raises its ``LiteRTInputError`` through TensorFlow.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from comdefend_tf.litert.runtime import LiteRTPurifier
from comdefend_tf.model import ComDefend


class LiteRTPurifierDefense(keras.layers.Layer):
    """Images -> the LiteRT purifier's output, with BPDA gradients (module docstring).

    Args:
      litert_purifier: a ``LiteRTPurifier`` (or anything it accepts: a path or bytes).
      float_purifier: the float32 ComDefend the file was converted from, with the deployed
        inference settings; it gives the gradients.

    Raises:
      ValueError: the two purifiers take different numbers of channels.
    """

    def __init__(self, litert_purifier, float_purifier: ComDefend, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        if not isinstance(litert_purifier, LiteRTPurifier):
            litert_purifier = LiteRTPurifier(litert_purifier)
        if litert_purifier.channels != float_purifier.config.input_channels:
            raise ValueError(f"the LiteRT purifier takes {litert_purifier.channels}-channel "
                             f"images but the float purifier "
                             f"{float_purifier.config.input_channels}-channel images")
        self.litert = litert_purifier
        self.float_purifier = float_purifier
        self.randomized = bool(litert_purifier.randomized)

    def _litert_forward(self, images: np.ndarray) -> np.ndarray:
        return self.litert.purify(np.asarray(images, np.float32))

    def litert_output(self, images) -> tf.Tensor:
        """The LiteRT purified images alone (no gradient), float32 like ``images``."""
        images = tf.convert_to_tensor(images, tf.float32)
        purified = tf.numpy_function(self._litert_forward, [images], tf.float32, stateful=True)
        return tf.ensure_shape(purified, images.shape)

    def call(self, images):
        images = tf.convert_to_tensor(images, tf.float32)
        float_output = tf.cast(self.float_purifier(images, training=False), tf.float32)
        return float_output + tf.stop_gradient(self.litert_output(images) - float_output)

    def compute_output_shape(self, input_shape):
        return input_shape

    def describe(self) -> str:
        """A label for tables: the file, its noise, and where the gradients come from."""
        height, width = self.litert.image_size
        return (f"litert({len(self.litert.model_bytes) / 1024:.0f} KiB, {height}x{width}, "
                f"noise {'per call' if self.randomized else 'off'}; BPDA through the float "
                "purifier)")
