"""What a Keras classifier takes and emits, read from its static input and output shapes.

Used to compose a classifier behind the purifier in the ``classify`` signature and to describe
it in the export metadata. A classifier maps float32 ``[batch, height, width, C]`` in [0, 1]
to logits or probabilities ``[batch, num_classes]``; unknown dimensions read as None.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _input_shape(classifier: keras.Model) -> tuple | None:
    try:
        return tuple(classifier.inputs[0].shape)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def classifier_emits_probabilities(classifier: keras.Model) -> bool:
    """True when the classifier's last layer is a softmax (an ``Activation``/``Softmax`` layer
    or a layer with ``activation=softmax``)."""
    last = classifier.layers[-1] if getattr(classifier, "layers", None) else classifier
    if isinstance(last, keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


def classifier_channels(classifier: keras.Model) -> int | None:
    """The classifier's static input channels, or None when unknown."""
    shape = _input_shape(classifier)
    if shape is None:
        return None
    return int(shape[-1]) if len(shape) == 4 and shape[-1] is not None else None


def classifier_height_width(classifier: keras.Model) -> tuple[int, int] | None:
    """The classifier's static input (height, width), or None when it accepts any size."""
    shape = _input_shape(classifier)
    if shape is None:
        return None
    if len(shape) == 4 and shape[1] is not None and shape[2] is not None:
        return int(shape[1]), int(shape[2])
    return None


def classifier_num_classes(classifier: keras.Model, height_width, channels: int) -> int:
    """The classifier's static number of classes (its output's last dimension); a classifier
    without static outputs is called once on zeros of ``height_width`` to find it.

    Raises:
      ValueError: the number of classes cannot be known statically.
    """
    try:
        num_classes = classifier.outputs[0].shape[-1]
    except (AttributeError, IndexError, TypeError, ValueError):
        num_classes = None
    if num_classes is None and height_width is not None:
        num_classes = classifier(tf.zeros([1, *height_width, channels])).shape[-1]
    if num_classes is None:
        raise ValueError("the classifier's output must have a static number of classes")
    return int(num_classes)
