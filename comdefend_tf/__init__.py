"""comdefend-tf: ComDefend (Jia et al., CVPR 2019, arXiv 1811.12673) in TensorFlow 2 / Keras 3.

ComCNN compresses every pixel of an image to a short binary code (4 bits per input channel);
ResCNN reconstructs the image from it. Placed in front of a classifier, the round trip removes
much of an adversarial perturbation. Importing this package has no side effects beyond
registering its Keras layers.
"""

from comdefend_tf.config import ComDefendConfig, get_config, CONFIG_NAMES
from comdefend_tf.layers import CodeNoise, StraightThroughBinarize
from comdefend_tf.model import (ComDefend, build_comcnn, build_rescnn, load_comdefend,
                               save_comdefend)

__all__ = [
    "ComDefendConfig", "get_config", "CONFIG_NAMES",
    "CodeNoise", "StraightThroughBinarize",
    "ComDefend", "build_comcnn", "build_rescnn", "load_comdefend", "save_comdefend",
]
