"""Purifying whole datasets with Apache Beam: the same pipeline on one machine or a cluster.

A batch job (purify a training set for the training-and-test-time defense, or an archive before
it reaches a model) built from Beam transforms, so it runs locally on the FnApiRunner (the
engine behind Beam's DirectRunner, with ``--direct_running_mode=multi_processing``) and
unchanged on Dataflow, Flink or Spark (docs/beam.md):

1. **Read** ``(key, encoded image bytes, label)`` from an image folder or glob (class
   subfolders become labels, as in ``comdefend_tf.io.datasets``'s ``folder:`` source), from TFRecords
   of ``tf.train.Example`` (``image/encoded``, ``image/class/label``) or from a prepared
   tensorflow-datasets dataset (its TFRecord files; features ``image`` and ``label``).
2. **Check, then decode** (``DecodeImages``) with ``comdefend_tf.io.images``, the purify
   command's reader, its rules and its limits: byte size, format, declared pixels and colour
   kind are checked *before* any pixel is decoded. Refusals go to a dead-letter output with a
   reason:
   ``unreadable``, ``too_large`` or ``wrong_channels`` (an image whose own channel count is not
   the model's: a grey picture in an RGB dataset is refused, not silently converted).
3. **Batch by shape**: images are keyed by ``HxWxC`` and grouped with ``GroupIntoBatches``
   (Beam's ``BatchElements`` stacks whatever arrives together and cannot mix sizes), so any
   image size works and same-size images share network calls.
4. **Infer** with Beam's ``RunInference`` and ``PurifierModelHandler`` (ours): it loads either
   the ``purify`` signature of an exported SavedModel (``comdefend_tf.serving.signatures``) or a ``.keras``
   ComDefend. Beam's own TensorFlow handlers load with ``tf.keras`` (which refuses Keras 3
   SavedModels, apache/beam issue 30616) and import ``tensorflow_hub``; ours needs neither.
5. **Encode and write**: purified images are rounded to uint8 with ``image_io.to_uint8`` and
   encoded as PNG exactly as ``image_io.write_png`` writes them, so with noise 0 the bytes
   equal the purify command's output file. Sharded TFRecords of ``tf.train.Example`` (see
   ``FEATURE_*``), JSON lines of refusals and, optionally, PNG files mirroring the input tree
   go through Beam's file sinks (written to temporary files, renamed when the stage commits).

Paths with a scheme (``gs://``, ``s3://``, ``hdfs://``) go through Beam's ``FileSystems``
(listing, reading, model metadata, sinks, manifest); local paths through ``os`` and ``glob``.

Counts are Beam metrics (namespace ``METRICS_NAMESPACE``): ``inputs``, ``purified``,
``refused_<reason>``, ``input_bytes``, ``output_bytes``; ``run_purify_pipeline`` queries them
when the pipeline is done and writes them, with the run time, to ``manifest.json`` last.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import tempfile
import time
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from comdefend_tf import optional
from comdefend_tf.io import images as image_io

# Without the [beam] extra, importing this module raises optional.MissingExtra (one line).
beam = optional.require("apache_beam", "beam", "dataset purification on Apache Beam")
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.metrics import Metrics  # noqa: E402
from apache_beam.metrics.metric import MetricsFilter  # noqa: E402
from apache_beam.ml.inference.base import (ModelHandler, PredictionResult,  # noqa: E402
                                           RunInference)

METRICS_NAMESPACE = "comdefend_purify"
REFUSAL_REASONS = ("unreadable", "too_large", "wrong_channels")
TFRECORD_PREFIX = "tfrecord:"
TFDS_PREFIX = "tfds:"

# Output layout under --output_dir.
PURIFIED_PREFIX = "purified"
PURIFIED_SUFFIX = ".tfrecord"
DEAD_LETTER_PREFIX = "dead_letter"
DEAD_LETTER_SUFFIX = ".jsonl"
PNG_SUBDIR = "pngs"
MANIFEST_FILENAME = "manifest.json"

# Features of the output tf.train.Example (the first two are what training reads).
FEATURE_ENCODED = "image/encoded"
FEATURE_LABEL = "image/class/label"
FEATURE_FORMAT = "image/format"
FEATURE_KEY = "image/source_key"
FEATURE_HEIGHT = "image/height"
FEATURE_WIDTH = "image/width"
FEATURE_CHANNELS = "image/channels"
FEATURE_CODE_BITS = "image/code_bits"          # np.packbits of uint8 [H, W, code_channels]
FEATURE_CODE_CHANNELS = "image/code_channels"



class PurifyPipelineError(ValueError):
    """A bad pipeline request: no inputs, an output folder in use, a missing model."""


# Paths: local ones go through os/glob (``**`` recursion, folders); paths with a scheme
# (``gs://``, ``s3://``, ``hdfs://``) through Beam's FileSystems, so the same request works
# on a cluster whose workers share no disk with the machine that builds the pipeline.
def is_remote(path: str) -> bool:
    return "://" in path


def match_files(pattern: str) -> list[str]:
    """The files ``pattern`` matches, sorted (local glob, or Beam's FileSystems.match)."""
    if is_remote(pattern):
        try:
            result = FileSystems.match([pattern])[0]
        except Exception:  # BeamIOError when nothing matches or the bucket is unreachable
            return []
        return sorted(metadata.path for metadata in result.metadata_list)
    return sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))


def _read_text(path: str) -> str:
    with FileSystems.open(path) as handle:
        return handle.read().decode("utf-8")


# --------------------------------------------------------------------------------- inputs
@dataclasses.dataclass(frozen=True)
class InputPlan:
    """What the pipeline reads, resolved once on the machine that builds the pipeline.

    Attributes:
      kind: ``files`` (image files), ``tfrecord`` (``tf.train.Example`` records).
      description: the ``--input`` value as given.
      files: for ``files``: ``(key, path, label)`` triples, ``key`` the path relative to
        ``root``; for ``tfrecord``: the record file paths.
      root: the folder keys are relative to (``files`` only).
      class_names: label index -> class subfolder name (empty when unlabelled).
      image_feature, label_feature: feature names of encoded image and label (``tfrecord``).
    """

    kind: str
    description: str
    files: tuple
    root: str | None = None
    class_names: tuple = ()
    image_feature: str = FEATURE_ENCODED
    label_feature: str = FEATURE_LABEL


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard component."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if any(char in part for char in "*?["):
            break
        fixed.append(part)
    return os.sep.join(fixed) or "."


def plan_inputs(input_spec: str, data_dir: str | None = None,
                tfds_split: str = "train") -> InputPlan:
    """Resolves ``--input``: a folder, a glob, ``tfrecord:GLOB`` or ``tfds:NAME``.

    * A folder with class subfolders: the layout of ``data``'s ``folder:`` source and the same
      labels (sorted subfolder names; ``data.list_image_folder``). A folder without subfolders:
      its image files, unlabelled (-1).
    * A glob (``photos/*/*.png``): the matching files; the first folder below the glob's fixed
      part is the class (sorted names give the labels); files directly there are unlabelled.
    * ``tfrecord:GLOB``: ``tf.train.Example`` records with ``image/encoded`` and, optionally,
      ``image/class/label``.
    * ``tfds:NAME``: a tensorflow-datasets dataset already prepared under ``data_dir`` (never
      downloaded here); its TFRecord files for ``tfds_split``, features ``image`` and ``label``.

    Raises:
      PurifyPipelineError: nothing matches, or the tfds dataset is not prepared.
    """
    from comdefend_tf.io import datasets as data_lib

    if input_spec.startswith(TFRECORD_PREFIX):
        pattern = input_spec[len(TFRECORD_PREFIX):]
        files = tuple(match_files(pattern))
        if not files:
            raise PurifyPipelineError(f"no TFRecord file matches {pattern!r}")
        return InputPlan("tfrecord", input_spec, files)
    if input_spec.startswith(TFDS_PREFIX):
        return _plan_tfds(input_spec, input_spec[len(TFDS_PREFIX):], data_dir, tfds_split)
    if not is_remote(input_spec) and os.path.isdir(input_spec):
        root = input_spec
        has_subfolders = any(os.path.isdir(os.path.join(root, entry))
                             for entry in os.listdir(root))
        if has_subfolders:
            try:
                paths, labels, class_names = data_lib.list_image_folder(root)
            except data_lib.DataError as error:
                raise PurifyPipelineError(str(error)) from error
            triples = tuple((os.path.relpath(path, root), path, int(label))
                            for path, label in zip(paths, labels))
            return InputPlan("files", input_spec, triples, root, tuple(class_names))
        pattern = os.path.join(root, "*")
    else:
        root, pattern = _glob_root(input_spec), input_spec
    paths = [path for path in match_files(pattern)
             if path.lower().endswith(image_io.IMAGE_EXTENSIONS)]
    if not paths:
        raise PurifyPipelineError(f"no {'/'.join(image_io.IMAGE_EXTENSIONS)} file matches "
                                  f"{input_spec!r} (expected a folder, a glob, "
                                  f"{TFRECORD_PREFIX}GLOB or {TFDS_PREFIX}NAME)")
    relative = [path[len(root.rstrip("/")) + 1:] if is_remote(root)
                else os.path.relpath(path, root) for path in paths]
    class_names = sorted({rel.split(os.sep)[0] for rel in relative if os.sep in rel})
    index = {name: label for label, name in enumerate(class_names)}
    triples = tuple((rel, path, index[rel.split(os.sep)[0]] if os.sep in rel else -1)
                    for rel, path in zip(relative, paths))
    return InputPlan("files", input_spec, triples, root, tuple(class_names))


def _plan_tfds(input_spec, name, data_dir, split) -> InputPlan:
    tfds = optional.require("tensorflow_datasets", "data", f"the tensorflow-datasets input "
                            f"{name!r}")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # tfds raises several types for unknown or broken names
        raise PurifyPipelineError(f"tensorflow-datasets has no dataset {name!r}: {error}") \
            from error
    if not builder.is_prepared():
        raise PurifyPipelineError(
            f"tensorflow-datasets dataset {name!r} is not prepared under {builder.data_dir!r}; "
            f"prepare it first (tfds build {name} --data_dir=...): this pipeline never "
            f"downloads")
    if split not in builder.info.splits:
        raise PurifyPipelineError(f"{name!r} has no split {split!r}; it has "
                                  f"{sorted(builder.info.splits)}")
    files = tuple(str(path) for path in builder.info.splits[split].filepaths)
    features = builder.info.features
    if "image" not in features:
        raise PurifyPipelineError(f"{name!r} has no 'image' feature (features: "
                                  f"{sorted(features)})")
    class_names = ()
    if "label" in features and hasattr(features["label"], "names"):
        class_names = tuple(features["label"].names)
    return InputPlan("tfrecord", input_spec, files, None, class_names, image_feature="image",
                     label_feature="label")


class SourceImage(NamedTuple):
    """One input: ``key`` (unique, stable), label (-1: none), and either ``path`` (a file,
    read by ``DecodeImages`` within the byte limit) or ``encoded`` (bytes from a record)."""

    key: str
    encoded: bytes | None
    label: int
    path: str


class ReadSourceImages(beam.PTransform):
    """``InputPlan`` -> PCollection of ``SourceImage`` (files are only named here; their bytes
    are read by ``DecodeImages``, after the size check)."""

    def __init__(self, plan: InputPlan):
        super().__init__()
        self._plan = plan

    def expand(self, pipeline):
        plan = self._plan
        if plan.kind == "files":
            return (pipeline
                    | "ListFiles" >> beam.Create(list(plan.files))
                    | "NameFiles" >> beam.MapTuple(
                        lambda key, path, label: SourceImage(key, None, int(label), path)))
        return (pipeline
                | "ListRecordFiles" >> beam.Create(list(plan.files))
                | "ReadRecords" >> beam.io.ReadAllFromTFRecord(with_filename=True)
                | "ParseRecords" >> beam.Map(_parse_record, plan.image_feature,
                                             plan.label_feature))


def read_source_bytes(source: SourceImage, max_bytes: int) -> bytes:
    """The encoded bytes of an input, refusing more than ``max_bytes`` before reading them.

    Local files go through ``image_io.read_bounded`` (size from ``fstat``, regular files only),
    files on other file systems through Beam's ``FileSystems`` (size from their metadata).

    Raises:
      image_io.ImageTooLargeError: over the limit.
      image_io.ImageReadError, FileNotFoundError: missing or unreadable.
    """
    if source.encoded is not None:
        if len(source.encoded) > max_bytes:
            raise image_io.ImageTooLargeError(f"{len(source.encoded):,} bytes, more than the "
                                              f"limit of {max_bytes:,} bytes")
        return source.encoded
    if not is_remote(source.path):
        return image_io.read_bounded(source.path, max_bytes)
    try:
        size = FileSystems.match([source.path])[0].metadata_list[0].size_in_bytes
        if size > max_bytes:
            raise image_io.ImageTooLargeError(f"{size:,} bytes, more than the limit of "
                                              f"{max_bytes:,} bytes")
        with FileSystems.open(source.path) as handle:
            data = handle.read(max_bytes + 1)
    except image_io.ImageReadError:
        raise
    except Exception as error:  # BeamIOError, IOError: missing or unreadable
        raise image_io.ImageReadError(f"cannot read {source.path!r}: {error}") from error
    if len(data) > max_bytes:
        raise image_io.ImageTooLargeError(f"{source.path!r} grew past {max_bytes:,} bytes")
    return data


def _parse_record(filename_and_record, image_feature: str, label_feature: str) -> SourceImage:
    import hashlib

    import tensorflow as tf

    filename, record = filename_and_record
    digest = hashlib.sha256(record).hexdigest()[:16]
    try:
        example = tf.train.Example.FromString(record)
    except Exception:  # protobuf's DecodeError: not an Example at all
        return SourceImage(f"{os.path.basename(filename)}@{digest}", b"", -1, "")  # refused
    features = example.features.feature
    encoded = (features[image_feature].bytes_list.value[0]
               if image_feature in features and features[image_feature].bytes_list.value
               else b"")
    label = (int(features[label_feature].int64_list.value[0])
             if label_feature in features and features[label_feature].int64_list.value else -1)
    if FEATURE_KEY in features and features[FEATURE_KEY].bytes_list.value:
        key = features[FEATURE_KEY].bytes_list.value[0].decode("utf-8", "replace")
    else:
        key = f"{os.path.basename(filename)}@{digest}"
    return SourceImage(key, encoded, label, "")


# ----------------------------------------------------------------------- decode and check
class DecodedImage(NamedTuple):
    """A checked input: ``image`` float32 ``[H, W, C]`` in [0, 1] as ``image_io`` reads it."""

    key: str
    label: int
    image: np.ndarray
    input_bytes: int


class Refusal(NamedTuple):
    """A dead-letter entry: the input's key, one of ``REFUSAL_REASONS`` and a detail."""

    key: str
    reason: str
    detail: str

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "reason": self.reason, "detail": self.detail},
                          sort_keys=True)


class DecodeImages(beam.DoFn):
    """``SourceImage`` -> ``DecodedImage`` (main output) or ``Refusal`` (tag ``refused``).

    Everything goes through ``comdefend_tf.io.images``, the purify command's reader, with its
    rules and limits. In order, each before any pixel is decoded: the encoded size (<=
    ``max_bytes``, checked before a file is read); the header (PNG or JPEG, not corrupt); the
    declared pixels (<= ``max_pixels``); the declared colour kind against ``channels`` (grey is
    1 channel, colour 3). Then the pixels are decoded (corrupt data -> ``unreadable``).
    """

    REFUSED = "refused"

    def __init__(self, channels: int, max_pixels: int, max_bytes: int):
        super().__init__()
        self._channels = channels
        self._max_pixels = max_pixels
        self._max_bytes = max_bytes
        self._inputs = Metrics.counter(METRICS_NAMESPACE, "inputs")
        self._input_bytes = Metrics.counter(METRICS_NAMESPACE, "input_bytes")
        self._refused = {reason: Metrics.counter(METRICS_NAMESPACE, f"refused_{reason}")
                         for reason in REFUSAL_REASONS}

    def _refuse(self, key, reason, error):
        self._refused[reason].inc()
        # image_io's messages start with the quoted name, which the entry's key already gives.
        detail = str(error).removeprefix(repr(key)).lstrip(": ") or str(error)
        return beam.pvalue.TaggedOutput(self.REFUSED, Refusal(key, reason, detail))

    def process(self, source: SourceImage):
        self._inputs.inc()
        try:
            data = read_source_bytes(source, self._max_bytes)
        except image_io.ImageTooLargeError as error:
            yield self._refuse(source.key, "too_large", error)
            return
        except (image_io.ImageReadError, OSError) as error:
            yield self._refuse(source.key, "unreadable", error)
            return
        self._input_bytes.inc(len(data))
        if not data:
            yield self._refuse(source.key, "unreadable", "empty or missing image data")
            return
        try:
            header = image_io.read_header(data, source.key)
        except image_io.ImageReadError as error:
            yield self._refuse(source.key, "unreadable", error)
            return
        pixels = header.height * header.width
        if pixels > self._max_pixels:
            yield self._refuse(source.key, "too_large",
                               f"declares {header.width}x{header.height} = {pixels:,} pixels, "
                               f"more than the limit of {self._max_pixels:,}")
            return
        native_channels = 1 if header.grey else 3
        if native_channels != self._channels:
            yield self._refuse(source.key, "wrong_channels",
                               f"{'grey' if header.grey else 'colour'} {header.format} "
                               f"({native_channels} channel(s)); the model takes "
                               f"{self._channels}")
            return
        try:
            image = image_io.decode_image(data, channels=None, max_pixels=self._max_pixels,
                                          name=source.key)
        except image_io.ImageTooLargeError as error:
            yield self._refuse(source.key, "too_large", error)
            return
        except image_io.ImageReadError as error:
            yield self._refuse(source.key, "unreadable", error)
            return
        yield DecodedImage(source.key, source.label, image, len(data))


def shape_key(image: DecodedImage) -> str:
    height, width, channels = image.image.shape
    return f"{height}x{width}x{channels}"


# ------------------------------------------------------------------------------ inference
class PurifierModelHandler(ModelHandler):
    """Beam ``ModelHandler`` for ComDefend: batches of same-shape ``DecodedImage``s in,
    ``PredictionResult(example, {"purified": float32 [H, W, C], "code_bits": uint8 [H, W, K]})``
    out.

    Exactly one of ``saved_model_dir`` (an export version folder; its ``purify`` signature) and
    ``keras_path`` (a ``.keras`` file or a model directory holding ``comdefend.keras``) is given.
    ``inference_noise_std``/``seed`` apply to the ``.keras`` model (None: its own settings); an
    export carries its noise settings from export time. With the ``.keras`` model, images
    above ``tile_above_pixels`` are purified in exact tiles as the purify command does
    (``purify_files.automatic_tiling``; None: the model's default budget, 0: never); an export
    tiles inside its graph. Use with ``with_no_batching()``: the pipeline forms the batches
    itself, by shape.
    """

    def __init__(self, saved_model_dir: str | None = None, keras_path: str | None = None,
                 inference_noise_std: float | None = None, seed: int | None = None,
                 tile_above_pixels: int | None = None):
        if (saved_model_dir is None) == (keras_path is None):
            raise PurifyPipelineError("give exactly one of saved_model_dir and keras_path")
        self._saved_model_dir = saved_model_dir
        self._keras_path = keras_path
        self._inference_noise_std = inference_noise_std
        self._seed = seed
        self._tile_above_pixels = tile_above_pixels

    def load_model(self):
        """A callable float32 ``[n, H, W, C]`` -> ``(purified float32, code_bits uint8)``."""
        if self._saved_model_dir is not None:
            import tensorflow as tf

            from comdefend_tf.serving import signatures as serving

            loaded = tf.saved_model.load(self._saved_model_dir)
            if serving.SIGNATURE_PURIFY not in loaded.signatures:
                raise PurifyPipelineError(
                    f"{self._saved_model_dir!r} has no {serving.SIGNATURE_PURIFY!r} signature "
                    f"(signatures: {sorted(loaded.signatures)})")
            signature = loaded.signatures[serving.SIGNATURE_PURIFY]

            def purify(images):
                outputs = signature(**{serving.INPUT_IMAGES: tf.constant(images)})
                return (outputs["purified"].numpy(),
                        outputs["code_bits"].numpy().astype(np.uint8))

            purify.keep_alive = loaded  # the signature needs its SavedModel object alive
            return purify

        from keras import ops

        from comdefend_tf.model import load_comdefend

        keras_path = self._keras_path
        if is_remote(keras_path):
            # Keras reads local files only: copy the model file next to the worker first.
            from comdefend_tf.model import KERAS_FILENAME

            if not keras_path.endswith(".keras"):
                keras_path = FileSystems.join(keras_path, KERAS_FILENAME)
            local = os.path.join(tempfile.mkdtemp(prefix="comdefend-"), KERAS_FILENAME)
            with FileSystems.open(keras_path) as source, open(local, "wb") as target:
                target.write(source.read())
            keras_path = local
        model = load_comdefend(keras_path, inference_noise_std=self._inference_noise_std,
                               seed=self._seed)

        from comdefend_tf.patches import purify_patchwise
        from comdefend_tf.purification.files import automatic_tiling

        channels = model.config.input_channels
        tile_above_pixels = self._tile_above_pixels

        def purified_and_bits(images):
            outputs = model.forward(images, training=False)
            return ops.concatenate([ops.cast(outputs["purified"], "float32"),
                                    ops.cast(outputs["noisy_logits"] > 0, "float32")], axis=-1)

        def purify(images):
            tiling = automatic_tiling(model, images.shape[1], images.shape[2], tile_above_pixels)
            if tiling is None:
                both = purified_and_bits(images)
            else:  # exact tiles, the geometry the purify command uses for this size
                both = purify_patchwise(purified_and_bits, images, patch_size=tiling.patch_size,
                                        overlap=tiling.overlap, batch_size=tiling.batch_size)
            both = np.asarray(ops.convert_to_numpy(both))
            return both[..., :channels], both[..., channels:].astype(np.uint8)

        return purify

    def run_inference(self, batch: Sequence[DecodedImage], model, inference_args=None
                      ) -> Iterable[PredictionResult]:
        batch = list(batch)
        shapes = {item.image.shape for item in batch}
        if len(shapes) != 1:
            raise ValueError(f"a batch must hold images of one shape, got {sorted(shapes)}")
        purified, code_bits = model(np.stack([item.image for item in batch]))
        return [PredictionResult(item, {"purified": purified[i], "code_bits": code_bits[i]})
                for i, item in enumerate(batch)]

    def get_num_bytes(self, batch: Sequence[DecodedImage]) -> int:
        return sum(item.image.nbytes for item in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE


# --------------------------------------------------------------------------- encode, write
def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 ``[H, W, 1 or 3]`` -> PNG bytes, the bytes ``image_io.write_png`` writes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer,
                                                                              format="PNG")
    return buffer.getvalue()


class PurifiedImage(NamedTuple):
    key: str
    label: int
    png: bytes
    code_bits: np.ndarray
    shape: tuple


class EncodePurified(beam.DoFn):
    """``PredictionResult`` -> ``PurifiedImage`` (rounded with ``image_io.to_uint8``)."""

    def __init__(self):
        super().__init__()
        self._purified = Metrics.counter(METRICS_NAMESPACE, "purified")
        self._output_bytes = Metrics.counter(METRICS_NAMESPACE, "output_bytes")

    def process(self, result: PredictionResult):
        pixels = image_io.to_uint8(result.inference["purified"])
        png = encode_png(pixels)
        self._purified.inc()
        self._output_bytes.inc(len(png))
        yield PurifiedImage(result.example.key, result.example.label, png,
                            result.inference["code_bits"], pixels.shape)


def to_example(item: PurifiedImage, include_code_bits: bool) -> bytes:
    """A serialized ``tf.train.Example`` of one purified image (features ``FEATURE_*``)."""
    import tensorflow as tf

    def ints(*values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))

    def strings(*values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))

    height, width, channels = item.shape
    feature = {FEATURE_ENCODED: strings(item.png), FEATURE_FORMAT: strings(b"png"),
               FEATURE_LABEL: ints(item.label), FEATURE_KEY: strings(item.key.encode("utf-8")),
               FEATURE_HEIGHT: ints(height), FEATURE_WIDTH: ints(width),
               FEATURE_CHANNELS: ints(channels)}
    if include_code_bits:
        feature[FEATURE_CODE_BITS] = strings(np.packbits(item.code_bits.astype(np.uint8))
                                             .tobytes())
        feature[FEATURE_CODE_CHANNELS] = ints(item.code_bits.shape[-1])
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def unpack_code_bits(example: bytes) -> np.ndarray:
    """The uint8 0/1 code bits ``[H, W, K]`` stored in a purified ``tf.train.Example``."""
    import tensorflow as tf

    features = tf.train.Example.FromString(example).features.feature
    shape = (features[FEATURE_HEIGHT].int64_list.value[0],
             features[FEATURE_WIDTH].int64_list.value[0],
             features[FEATURE_CODE_CHANNELS].int64_list.value[0])
    packed = np.frombuffer(features[FEATURE_CODE_BITS].bytes_list.value[0], np.uint8)
    return np.unpackbits(packed)[:int(np.prod(shape))].reshape(shape)


def png_path(png_root: str, key: str) -> str:
    """Where ``--write_pngs`` puts a key's PNG: the key's relative path, extension ``.png``."""
    stem, _ = os.path.splitext(key)
    return FileSystems.join(png_root, *(stem + ".png").split(os.sep))


class WritePng(beam.DoFn):
    """Writes one purified PNG under ``png_root``: a temporary name, renamed when complete."""

    def __init__(self, png_root: str):
        super().__init__()
        self._png_root = png_root

    def process(self, item: PurifiedImage):
        target = png_path(self._png_root, item.key)
        folder = os.path.dirname(target)
        partial = FileSystems.join(folder, ".partial." + os.path.basename(target))
        if not FileSystems.exists(folder):
            try:
                FileSystems.mkdirs(folder)
            except IOError:  # another worker created it first
                pass
        with FileSystems.create(partial) as handle:
            handle.write(item.png)
        if FileSystems.exists(target):
            FileSystems.delete([target])
        FileSystems.rename([partial], [target])
        yield target


# ----------------------------------------------------------------------------- the pipeline
@dataclasses.dataclass(frozen=True)
class PurifyOptions:
    """Settings of one pipeline run (the binary's flags; see ``export/purify_dataset.py``)."""

    input: str
    output_dir: str
    model_dir: str | None = None
    saved_model_dir: str | None = None
    batch_size: int = 32
    num_shards: int = 0
    max_pixels: int = image_io.DEFAULT_MAX_PIXELS
    max_bytes: int = image_io.DEFAULT_MAX_BYTES
    tile_above_pixels: int | None = None
    inference_noise_std: float | None = None
    seed: int | None = None
    include_code_bits: bool = False
    write_pngs: bool = False
    overwrite: bool = False
    data_dir: str | None = None
    tfds_split: str = "train"

    def __post_init__(self):
        if (self.model_dir is None) == (self.saved_model_dir is None):
            raise PurifyPipelineError("give exactly one of --model_dir and --saved_model_dir")
        for name in ("batch_size", "max_pixels", "max_bytes"):
            if getattr(self, name) < 1:
                raise PurifyPipelineError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tile_above_pixels is not None and self.tile_above_pixels < 0:
            raise PurifyPipelineError(f"tile_above_pixels must be >= 0, got "
                                      f"{self.tile_above_pixels}")
        if self.num_shards < 0:
            raise PurifyPipelineError(f"num_shards must be >= 0, got {self.num_shards}")
        if self.saved_model_dir is not None and (self.inference_noise_std is not None
                                                 or self.seed is not None
                                                 or self.tile_above_pixels is not None):
            raise PurifyPipelineError("an exported SavedModel carries its own noise and tiling "
                                      "settings; inference_noise_std, seed and "
                                      "tile_above_pixels apply to --model_dir only")


def model_channels(options: PurifyOptions) -> int:
    """The purifier's input channels, read from the model's metadata (no weights loaded)."""
    from comdefend_tf.serving import signatures as serving
    from comdefend_tf.config import ComDefendConfig
    from comdefend_tf.model import CONFIG_FILENAME, KERAS_FILENAME

    if options.saved_model_dir is not None:
        metadata = FileSystems.join(options.saved_model_dir, serving.EXPORT_METADATA_FILENAME)
        if not FileSystems.exists(metadata):
            raise PurifyPipelineError(f"{options.saved_model_dir!r} is not a comdefend export "
                                      f"version folder (no {serving.EXPORT_METADATA_FILENAME})")
        return int(json.loads(_read_text(metadata))["comdefend_config"]["input_channels"])
    folder = options.model_dir
    if folder.endswith(".keras"):
        folder = os.path.dirname(folder)
    config_path = FileSystems.join(folder, CONFIG_FILENAME)
    if not FileSystems.exists(FileSystems.join(folder, KERAS_FILENAME)) or not \
            FileSystems.exists(config_path):
        raise PurifyPipelineError(f"{options.model_dir!r} is not a model directory (expected "
                                  f"{KERAS_FILENAME} and {CONFIG_FILENAME})")
    return ComDefendConfig.from_dict(json.loads(_read_text(config_path))).input_channels


_OUR_OUTPUTS = (PURIFIED_PREFIX, DEAD_LETTER_PREFIX, MANIFEST_FILENAME, PNG_SUBDIR)


def _output_entries(output_dir: str) -> list[str]:
    if is_remote(output_dir):
        return sorted({path[len(output_dir.rstrip("/")) + 1:].split("/")[0]
                       for path in match_files(FileSystems.join(output_dir, "**"))})
    if not os.path.isdir(output_dir):
        return []
    return sorted(os.listdir(output_dir))


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuses an output folder that holds anything unless ``overwrite``; with ``overwrite``
    removes this pipeline's previous outputs (and nothing else)."""
    import shutil

    entries = _output_entries(output_dir)
    if entries and not overwrite:
        raise PurifyPipelineError(f"output folder {output_dir!r} is not empty ({len(entries)} "
                                  f"entries, first {entries[0]!r}); pass --overwrite to replace "
                                  f"a previous run's outputs")
    if is_remote(output_dir):
        stale = [path for path in match_files(FileSystems.join(output_dir, "**"))
                 if path[len(output_dir.rstrip("/")) + 1:].startswith(_OUR_OUTPUTS)]
        if stale:
            FileSystems.delete(stale)
        return
    for entry in entries:
        if not entry.startswith(_OUR_OUTPUTS):
            continue
        path = os.path.join(output_dir, entry)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    os.makedirs(output_dir, exist_ok=True)


def build_pipeline(pipeline: beam.Pipeline, options: PurifyOptions, plan: InputPlan,
                   channels: int):
    """Adds the purify transforms to ``pipeline``; returns the dict of terminal PCollections."""
    output_dir = options.output_dir
    sources = pipeline | "Read" >> ReadSourceImages(plan)
    decoded = sources | "CheckAndDecode" >> beam.ParDo(
        DecodeImages(channels, options.max_pixels, options.max_bytes)).with_outputs(
            DecodeImages.REFUSED, main="images")
    if options.saved_model_dir is not None:
        handler = PurifierModelHandler(saved_model_dir=options.saved_model_dir)
    else:
        handler = PurifierModelHandler(keras_path=options.model_dir,
                                       inference_noise_std=options.inference_noise_std,
                                       seed=options.seed,
                                       tile_above_pixels=options.tile_above_pixels)
    purified = (decoded["images"]
                | "KeyByShape" >> beam.Map(lambda image: (shape_key(image), image))
                | "BatchByShape" >> beam.GroupIntoBatches(options.batch_size)
                | "DropShapeKey" >> beam.Map(lambda shape_and_batch: list(shape_and_batch[1]))
                | "Purify" >> RunInference(handler.with_no_batching())
                | "EncodePng" >> beam.ParDo(EncodePurified()))
    written = (purified
               | "ToExample" >> beam.Map(to_example, options.include_code_bits)
               | "WriteTFRecords" >> beam.io.WriteToTFRecord(
                   FileSystems.join(output_dir, PURIFIED_PREFIX), file_name_suffix=PURIFIED_SUFFIX,
                   num_shards=options.num_shards))
    refused = (decoded[DecodeImages.REFUSED]
               | "RefusalToJson" >> beam.Map(Refusal.to_json)
               | "WriteDeadLetter" >> beam.io.WriteToText(
                   FileSystems.join(output_dir, DEAD_LETTER_PREFIX),
                   file_name_suffix=DEAD_LETTER_SUFFIX, num_shards=1))
    outputs = {"tfrecords": written, "dead_letter": refused}
    if options.write_pngs:
        outputs["pngs"] = purified | "WritePngs" >> beam.ParDo(
            WritePng(FileSystems.join(output_dir, PNG_SUBDIR)))
    return outputs


def read_counters(result) -> dict:
    """The pipeline's ``METRICS_NAMESPACE`` counters (committed values), zero when absent."""
    names = ("inputs", "purified", "input_bytes", "output_bytes") + tuple(
        f"refused_{reason}" for reason in REFUSAL_REASONS)
    values = dict.fromkeys(names, 0)
    query = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    for counter in query["counters"]:
        name = counter.key.metric.name
        if name in values:
            value = counter.committed if counter.committed is not None else counter.attempted
            values[name] += int(value or 0)
    return values


def unknown_pipeline_flags(pipeline_args: Sequence[str]) -> list[str]:
    """The arguments that are no Beam pipeline option (a typo of ours would otherwise be
    passed to Beam, which only logs that it discards it)."""
    from apache_beam.options import pipeline_options

    def subclasses(cls):
        for subclass in cls.__subclasses__():
            yield subclass
            yield from subclasses(subclass)

    # The parser Beam itself builds from every registered options class.
    parser = pipeline_options._BeamArgumentParser(allow_abbrev=False, conflict_handler="resolve")
    for options_class in set(subclasses(pipeline_options.PipelineOptions)):
        options_class._add_argparse_args(parser)
    actions = parser._option_string_actions
    unknown, expects_value = [], False
    for argument in pipeline_args:
        if expects_value and not argument.startswith("--"):
            expects_value = False  # the value of "--option value"
            continue
        name = argument.split("=", 1)[0]
        action = actions.get(name)
        if action is None and name.startswith("--no") and "--" + name[4:] in actions:
            action = actions["--" + name[4:]]
        if action is None:
            unknown.append(argument)
        expects_value = action is not None and "=" not in argument and action.nargs != 0
    return unknown


def run_purify_pipeline(options: PurifyOptions, pipeline_args: Sequence[str] = ()) -> dict:
    """Checks the request, runs the pipeline to completion and writes the manifest.

    Args:
      options: what to purify and where.
      pipeline_args: Beam pipeline options (``--runner=...``, ``--direct_num_workers=2``...).
        ``--runner=DirectRunner`` (Beam's default) first tries the Prism runner, which downloads
        its binary; the runner is therefore pinned to ``FnApiRunner`` (the engine DirectRunner
        falls back to, same options) unless another runner is named.

    Returns:
      the manifest dict (also written to ``OUTPUT_DIR/manifest.json`` after every other output
      is committed): counts, bytes, seconds, the request and the output files.

    Raises:
      PurifyPipelineError: an argument that is no Beam option, bad inputs, model or output
        folder (nothing has been written).
    """
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from comdefend_tf.io.atomic import write_json_atomic

    unknown = unknown_pipeline_flags(pipeline_args)
    if unknown:
        raise PurifyPipelineError(f"unknown flag(s) {' '.join(unknown)}: neither this program's "
                                  f"nor a Beam pipeline option")
    plan = plan_inputs(options.input, options.data_dir, options.tfds_split)
    if options.write_pngs and plan.kind != "files":
        raise PurifyPipelineError("--write_pngs mirrors an input folder tree; it needs a folder "
                                  "or glob input, not records")
    channels = model_channels(options)
    if options.saved_model_dir is None and not is_remote(options.model_dir):
        from comdefend_tf.model import load_comdefend

        load_comdefend(options.model_dir)  # fail here, not in a worker, on a broken model
    prepare_output_dir(options.output_dir, options.overwrite)
    pipeline_options = PipelineOptions(list(pipeline_args))
    standard = pipeline_options.view_as(StandardOptions)
    if standard.runner in (None, "DirectRunner", "SwitchingDirectRunner"):
        standard.runner = "FnApiRunner"
    start = time.perf_counter()
    pipeline = beam.Pipeline(options=pipeline_options)
    build_pipeline(pipeline, options, plan, channels)
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - start
    counts = read_counters(result)
    refused = {reason: counts.pop(f"refused_{reason}") for reason in REFUSAL_REASONS}
    manifest = {
        "inputs": counts["inputs"], "purified": counts["purified"],
        "refused": sum(refused.values()), "refused_by_reason": refused,
        "input_bytes": counts["input_bytes"], "output_bytes": counts["output_bytes"],
        "seconds": round(seconds, 3),
        "runner": standard.runner,
        "input": options.input, "input_kind": plan.kind,
        "class_names": list(plan.class_names),
        "model": options.saved_model_dir or options.model_dir,
        "settings": {key: value for key, value in dataclasses.asdict(options).items()
                     if key not in ("input", "output_dir", "model_dir", "saved_model_dir")},
        "outputs": {
            "tfrecords": [os.path.basename(p) for p in match_files(FileSystems.join(
                options.output_dir, PURIFIED_PREFIX + "*" + PURIFIED_SUFFIX))],
            "dead_letter": [os.path.basename(p) for p in match_files(FileSystems.join(
                options.output_dir, DEAD_LETTER_PREFIX + "*" + DEAD_LETTER_SUFFIX))],
            "pngs": PNG_SUBDIR if options.write_pngs else None},
    }
    manifest_path = FileSystems.join(options.output_dir, MANIFEST_FILENAME)
    if is_remote(manifest_path):
        # An object store publishes an object only when its upload completes.
        with FileSystems.create(manifest_path) as handle:
            handle.write((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    else:
        write_json_atomic(manifest_path, manifest)
    return manifest


def read_dead_letter(output_dir: str) -> list[dict]:
    """The refusals of a finished run, ``{"key", "reason", "detail"}`` each, sorted by key."""
    entries = []
    for path in match_files(FileSystems.join(output_dir,
                                             DEAD_LETTER_PREFIX + "*" + DEAD_LETTER_SUFFIX)):
        entries += [json.loads(line) for line in _read_text(path).splitlines() if line.strip()]
    return sorted(entries, key=lambda entry: entry["key"])

