"""TensorBoard pictures of a ComDefend training run, so a collapse or a good run shows at a
glance beside the loss curves.

``HeldOutImages`` is a Keras callback: at the end of every epoch it purifies the same few
held-out images (chosen once, before training) and writes three pictures with
``tf.summary.image`` to ``LOG_DIR/images`` (``MODEL_DIR/logs/images`` for the training binary),
at the epoch number as step, like Keras' epoch scalars:

* ``held_out/originals``: the images, one per column;
* ``held_out/purified``: the purifier's output for the same images, same columns;
* ``held_out/code_bits``: their code bits, one row per code channel under each image's column
  (white = 1, black = 0).

A collapsed purifier shows the same (often black) picture in every column and code bits that
ignore the image; a good run shows purified digits or photos that match the originals.

The pictures are drawn without code noise (the noise-free code ``logits > 0`` and its
reconstruction in the model's inference mode), so they change only when the weights do, and
the callback never draws from the model's noise generator: a run's training noise, and so its
weights, are the same with or without it.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from comdefend_tf.io.images import to_uint8

IMAGES_SUBDIR = "images"
TAG_ORIGINALS = "held_out/originals"
TAG_PURIFIED = "held_out/purified"
TAG_CODE_BITS = "held_out/code_bits"
TAGS = (TAG_ORIGINALS, TAG_PURIFIED, TAG_CODE_BITS)
DEFAULT_NUM_IMAGES = 8
# Grey lines between the cells of a grid: visible against 0/1 code bits and most images.
SEPARATOR_PIXELS = 1
SEPARATOR_VALUE = 0.5


def tile(cells, separator: int = SEPARATOR_PIXELS, value: float = SEPARATOR_VALUE) -> np.ndarray:
    """One picture from a grid of equally sized cells.

    Args:
      cells: float ``[rows, columns, height, width, channels]`` in [0, 1].
      separator: pixels of ``value`` between neighbouring cells (none around the border).

    Returns:
      float32 ``[rows * (height + separator) - separator, columns * (width + separator) -
      separator, channels]``.
    """
    cells = np.asarray(cells, np.float32)
    if cells.ndim != 5:
        raise ValueError(f"cells must be [rows, columns, height, width, channels], got shape "
                         f"{cells.shape}")
    rows, columns, height, width, channels = cells.shape
    picture = np.full((rows * (height + separator) - separator,
                       columns * (width + separator) - separator, channels), value, np.float32)
    for row in range(rows):
        for column in range(columns):
            top, left = row * (height + separator), column * (width + separator)
            picture[top:top + height, left:left + width] = cells[row, column]
    return picture


def held_out_examples(dataset: tf.data.Dataset, count: int = DEFAULT_NUM_IMAGES) -> np.ndarray:
    """The first ``count`` images of an ``(image, label)`` or image dataset, as float32
    ``[n, height, width, channels]`` in [0, 1] (``n <= count``: fewer when the dataset is
    shorter). Images of different sizes are centre-cropped to the smallest height and width
    among them, so they share one grid.

    Raises:
      ValueError: ``count`` < 1 or the dataset is empty.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    images = []
    for example in dataset.take(count).as_numpy_iterator():
        images.append(np.asarray(example[0] if isinstance(example, tuple) else example,
                                 np.float32))
    if not images:
        raise ValueError("the held-out dataset yielded no images")
    height = min(image.shape[0] for image in images)
    width = min(image.shape[1] for image in images)
    cropped = []
    for image in images:
        top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
        cropped.append(image[top:top + height, left:left + width])
    return np.stack(cropped)


def pictures(model, images) -> dict:
    """The three pictures of ``images`` through ``model`` (a ``ComDefend``), keyed by tag.

    Args:
      model: a ComDefend model.
      images: float32 ``[n, height, width, channels]`` in [0, 1].

    Returns:
      ``{TAG_ORIGINALS, TAG_PURIFIED: float32 [height, n * (width + 1) - 1, channels],
      TAG_CODE_BITS: float32 [code_channels * (height + 1) - 1, n * (width + 1) - 1, 1]}``,
      all in [0, 1] (code bits exactly 0 or 1 inside the cells).
    """
    images = np.asarray(images, np.float32)
    # noise=0: the noise-free code, and no draw from the model's noise generator.
    outputs = model.forward(images, training=False, noise=0.0)
    purified = np.asarray(keras.ops.convert_to_numpy(outputs["purified"]), np.float32)
    logits = np.asarray(keras.ops.convert_to_numpy(outputs["code_logits"]), np.float32)
    bits = (logits > 0).astype(np.float32)
    # [n, h, w, k] -> rows = code channels, columns = images: [k, n, h, w, 1].
    bit_cells = np.transpose(bits, (3, 0, 1, 2))[..., None]
    return {TAG_ORIGINALS: tile(images[None]),
            TAG_PURIFIED: tile(np.clip(purified, 0.0, 1.0)[None]),
            TAG_CODE_BITS: tile(bit_cells)}


_DESCRIPTIONS = {
    TAG_ORIGINALS: "Held-out images, one per column (the same images at every epoch).",
    TAG_PURIFIED: "The purifier's output for the images above, same columns (no code noise). "
                  "The same picture in every column means the purifier collapsed.",
    TAG_CODE_BITS: "Noise-free code bits (logits > 0) of the images above: one row per code "
                   "channel under each image's column; white 1, black 0.",
}


class HeldOutImages(keras.callbacks.Callback):
    """Writes the ``pictures`` of fixed held-out images at the end of every epoch.

    Args:
      images: float32 ``[n, height, width, channels]`` in [0, 1], chosen once (for example
        ``held_out_examples(image_data.test)``); copied.
      log_dir: TensorBoard log folder; the pictures go to ``log_dir/images``.

    Usable across several ``fit`` calls (a resumed run): the writer is opened on first use and
    kept; steps are the epoch numbers ``fit`` reports.
    """

    def __init__(self, images, log_dir: str):
        super().__init__()
        images = np.array(images, np.float32)
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"images must be [n >= 1, height, width, channels], got shape "
                             f"{images.shape}")
        if not (np.all(images >= 0.0) and np.all(images <= 1.0)):
            raise ValueError("images must be in [0, 1]")
        self.images = images
        self.log_dir = os.path.join(log_dir, IMAGES_SUBDIR)
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        drawn = pictures(self.model, self.images)
        with self._writer.as_default():
            for tag in TAGS:
                # Rounded here (tf.summary.image would truncate float pixels).
                tf.summary.image(tag, to_uint8(drawn[tag])[None], step=epoch, max_outputs=1,
                                 description=_DESCRIPTIONS[tag])
        self._writer.flush()
