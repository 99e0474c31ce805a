"""Input-transformation defenses with the purifier's face: images in [0, 1] -> images in [0, 1].

Every defense is a serializable Keras layer: ``defended = defense(images)`` with images float32
``[batch, height, width, channels]`` in [0, 1] and ``defended`` of the same shape and range, so
the evaluation harness treats ComDefend and the baselines alike (``classifier(defense(x))``).

Gradients, which adaptive attacks need:

* ``NoDefense``: identity.
* ``JpegDefense`` and ``BitDepthReduction`` are piecewise constant (quantisers), so their true
  gradient is zero almost everywhere. They use the straight-through form
  ``images + stop_gradient(transformed - images)``: exact transformed values forward, identity
  backward (BPDA, Athalye et al. 2018), like ComDefend's binarizer.
* ``MedianFilter`` keeps its real (sub)gradient: the median selects one input pixel per output
  pixel, and the gradient flows to that pixel.
* ComDefend itself (``make_defense("comdefend", purifier=model)``) is the purifier model: its
  straight-through binarizer already gives BPDA gradients.

``is_randomized(defense)`` says whether a defense draws fresh noise per call (ComDefend with
``inference_noise_std > 0``), which is when attacks need EOT.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

DEFENSE_NAMES = ("none", "comdefend", "jpeg", "bit_depth", "median")


def straight_through(images, transformed):
    """``transformed`` in the forward pass, the identity's gradient in the backward pass."""
    return images + ops.stop_gradient(transformed - images)


@keras.saving.register_keras_serializable(package="comdefend_tf")
class NoDefense(keras.layers.Layer):
    """The undefended baseline: returns its images unchanged (float ``[B, H, W, C]``)."""

    def call(self, images):
        return ops.convert_to_tensor(images)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="comdefend_tf")
class JpegDefense(keras.layers.Layer):
    """JPEG re-encoding at ``quality`` (1..100; lower removes more), straight-through gradient.

    Images float ``[B, H, W, C]`` in [0, 1] with C = 1 or 3 are quantised to 8 bits, encoded
    and decoded by TensorFlow's JPEG codec (Guo et al. 2018's input transformation), and come
    back float in [0, 1] with the same shape. TensorFlow by nature (``tf.image``).
    """

    def __init__(self, quality: int = 75, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        self.quality = int(quality)

    def call(self, images):
        images = tf.convert_to_tensor(images, tf.float32)
        channels = images.shape[-1]
        if channels not in (1, 3):
            raise ValueError(f"JPEG needs 1 or 3 channels, got {channels}")
        clipped = tf.clip_by_value(images, 0.0, 1.0)
        encoded_decoded = tf.map_fn(
            lambda image: tf.image.adjust_jpeg_quality(image, self.quality), clipped,
            fn_output_signature=tf.TensorSpec(clipped.shape[1:], tf.float32))
        encoded_decoded = tf.ensure_shape(encoded_decoded, images.shape)
        return straight_through(images, encoded_decoded)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(quality=self.quality)
        return config


@keras.saving.register_keras_serializable(package="comdefend_tf")
class BitDepthReduction(keras.layers.Layer):
    """Feature squeezing's colour-depth reduction (Xu et al. 2018) to ``bits`` bits per channel,
    straight-through gradient.

    ``round(images * (2**bits - 1)) / (2**bits - 1)``: float ``[B, H, W, C]`` in [0, 1] ->
    same shape, values on the ``2**bits`` levels of [0, 1]. ``bits`` in 1..8.
    """

    def __init__(self, bits: int = 4, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= int(bits) <= 8:
            raise ValueError(f"bit depth must be in [1, 8], got {bits}")
        self.bits = int(bits)

    def call(self, images):
        images = ops.convert_to_tensor(images)
        levels = float(2 ** self.bits - 1)
        squeezed = ops.round(ops.clip(images, 0.0, 1.0) * levels) / levels
        return straight_through(images, squeezed)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(bits=self.bits)
        return config


@keras.saving.register_keras_serializable(package="comdefend_tf")
class MedianFilter(keras.layers.Layer):
    """Feature squeezing's spatial smoothing: a ``size`` x ``size`` median per channel.

    Borders are reflected (no dark frame from zero padding). For an even ``size`` the window
    extends one pixel further down/right and the upper of the two middle values is taken.
    Float ``[B, H, W, C]`` in [0, 1] -> same shape and range. Differentiable as is: each output
    pixel's gradient goes to the input pixel the median selected.
    """

    def __init__(self, size: int = 3, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= int(size) <= 15:
            raise ValueError(f"median filter size must be in [1, 15], got {size}")
        self.size = int(size)

    def call(self, images):
        images = tf.convert_to_tensor(images, tf.float32)
        if self.size == 1:
            return images
        before, after = (self.size - 1) // 2, self.size // 2
        if min(images.shape[1], images.shape[2]) <= after:
            raise ValueError(f"median filter size {self.size} is too large for "
                             f"{images.shape[1]}x{images.shape[2]} images")
        padded = tf.pad(images, [[0, 0], [before, after], [before, after], [0, 0]],
                        mode="REFLECT")
        channels = images.shape[-1]
        window = self.size * self.size
        # extract_patches orders each patch as (row, column, channel).
        patches = tf.image.extract_patches(padded, sizes=[1, self.size, self.size, 1],
                                           strides=[1, 1, 1, 1], rates=[1, 1, 1, 1],
                                           padding="VALID")
        patches = tf.reshape(patches, tf.concat([tf.shape(images)[:3], [window, channels]], 0))
        patches = tf.transpose(patches, [0, 1, 2, 4, 3])
        # top_k sorts descending and has a gradient; element window // 2 is the median.
        top = tf.math.top_k(patches, k=window // 2 + 1).values
        return top[..., window // 2]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(size=self.size)
        return config


def make_defense(name: str, purifier=None, jpeg_quality: int = 75, bit_depth: int = 4,
                 median_size: int = 3):
    """The defense called ``name`` (one of ``DEFENSE_NAMES``), as a layer images -> images.

    Args:
      name: ``none``, ``comdefend`` (returns ``purifier`` itself), ``jpeg``, ``bit_depth`` or
        ``median``.
      purifier: a ``comdefend_tf.model.ComDefend`` (needed for ``comdefend``).
      jpeg_quality, bit_depth, median_size: the baselines' settings.

    Raises:
      ValueError: an unknown name, a missing purifier or a bad setting.
    """
    if name == "none":
        return NoDefense(name="none")
    if name == "comdefend":
        if purifier is None:
            raise ValueError("defense comdefend needs a trained ComDefend purifier")
        return purifier
    if name == "jpeg":
        return JpegDefense(jpeg_quality, name="jpeg")
    if name == "bit_depth":
        return BitDepthReduction(bit_depth, name="bit_depth")
    if name == "median":
        return MedianFilter(median_size, name="median")
    raise ValueError(f"unknown defense {name!r}; choose from {', '.join(DEFENSE_NAMES)}")


def describe_defense(name: str, defense) -> str:
    """A short label with the defense's setting, e.g. ``jpeg(q=75)``, for tables."""
    if isinstance(defense, JpegDefense):
        return f"jpeg(q={defense.quality})"
    if isinstance(defense, BitDepthReduction):
        return f"bit_depth({defense.bits} bits)"
    if isinstance(defense, MedianFilter):
        return f"median({defense.size}x{defense.size})"
    return name


def is_randomized(defense) -> bool:
    """True when ``defense`` draws fresh noise at each call: a layer's own ``randomized``
    attribute when it has one (a LiteRT purifier), else ComDefend with inference noise."""
    randomized = getattr(defense, "randomized", None)
    if isinstance(randomized, bool):
        return randomized
    config = getattr(defense, "config", None)
    return bool(config is not None and getattr(config, "inference_noise_std", 0.0) > 0.0)
