"""The purify pipeline's inputs: an ``InputPlan`` in, checked images or refusals out.

``ReadSourceImages``: ``InputPlan`` -> ``SourceImage`` (files only named, records parsed).
``DecodeImages``: ``SourceImage`` -> ``DecodedImage`` (float32 ``[H, W, C]`` in [0, 1], read by
``io.images`` with the purify command's rules and limits) or, under the tag ``refused``, a
``refusals.Refusal``. Every check (listing refusal, byte size, format, declared pixels, colour
kind) runs before a pixel is decoded, and every input counts once in the counters.
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import numpy as np

from comdefend_tf import optional
from comdefend_tf.io import headers
from comdefend_tf.io import images as image_io
from comdefend_tf.purification import counters, refusals
from comdefend_tf.purification.plan import InputPlan, is_remote

beam = optional.require("apache_beam", "beam", "dataset purification on Apache Beam")
from apache_beam.io.filesystems import FileSystems  # noqa: E402


class SourceImage(NamedTuple):
    """One input: ``key`` (unique, stable), label (-1: none), and either ``path`` (a file,
    read by ``DecodeImages`` within the byte limit) or ``encoded`` (bytes from a record), or
    ``refused`` (the listing's reason; the input is never opened)."""

    key: str
    encoded: bytes | None
    label: int
    path: str
    refused: str | None = None


class ReadSourceImages(beam.PTransform):
    """``InputPlan`` -> PCollection of ``SourceImage`` (files are only named here; their bytes
    are read by ``DecodeImages``, after the size check)."""

    def __init__(self, plan: InputPlan):
        super().__init__()
        self._plan = plan

    def expand(self, pipeline):
        plan = self._plan
        listed = [SourceImage(key, None, -1, "", detail) for key, detail in plan.refused]
        if plan.kind == "files":
            listed += [SourceImage(key, None, int(label), path) for key, path, label in plan.files]
            return pipeline | "ListFiles" >> beam.Create(listed)
        records = (pipeline
                   | "ListRecordFiles" >> beam.Create(list(plan.files))
                   | "ReadRecords" >> beam.io.ReadAllFromTFRecord(with_filename=True)
                   | "ParseRecords" >> beam.Map(parse_record, plan.image_feature,
                                                plan.label_feature))
        if not listed:
            return records
        return ((records, pipeline | "ListRefused" >> beam.Create(listed))
                | "WithRefused" >> beam.Flatten())


def parse_record(filename_and_record, image_feature: str, label_feature: str) -> SourceImage:
    """``(record file name, serialized tf.train.Example)`` -> ``SourceImage``; the key is the
    record's ``image/source_key`` or ``FILE@SHA256[:16]`` of the record. A record that is no
    Example gets empty bytes (refused as ``unreadable`` by ``DecodeImages``)."""
    import tensorflow as tf

    from comdefend_tf.io.examples import FEATURE_KEY

    filename, record = filename_and_record
    digest = hashlib.sha256(record).hexdigest()[:16]
    try:
        example = tf.train.Example.FromString(record)
    except Exception:  # protobuf's DecodeError: not an Example at all
        return SourceImage(f"{os.path.basename(filename)}@{digest}", b"", -1, "")
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


class DecodedImage(NamedTuple):
    """A checked input: ``image`` float32 ``[H, W, C]`` in [0, 1] as ``image_io`` reads it."""

    key: str
    label: int
    image: np.ndarray
    input_bytes: int


class DecodeImages(beam.DoFn):
    """``SourceImage`` -> ``DecodedImage`` (main output) or ``Refusal`` (tag ``refused``).

    In order, each before any pixel is decoded: the listing's refusal (``unsafe_file``); the
    encoded size (<= ``max_bytes``, checked before a file is read); the header (PNG or JPEG,
    not corrupt); the declared pixels (<= ``max_pixels``); the declared colour kind against
    ``channels`` (grey is 1 channel, colour 3). Then the pixels are decoded (corrupt data ->
    ``unreadable``).
    """

    REFUSED = "refused"

    def __init__(self, channels: int, max_pixels: int, max_bytes: int):
        super().__init__()
        self._channels = channels
        self._max_pixels = max_pixels
        self._max_bytes = max_bytes
        self._inputs = counters.counter(counters.INPUTS)
        self._input_bytes = counters.counter(counters.INPUT_BYTES)
        self._refused = {reason: counters.counter(counters.refused_name(reason))
                         for reason in refusals.REASONS}

    def _refuse(self, key, reason, error):
        self._refused[reason].inc()
        return beam.pvalue.TaggedOutput(
            self.REFUSED, refusals.Refusal(key, reason, refusals.detail_of(error, key)))

    def process(self, source: SourceImage):
        self._inputs.inc()
        if source.refused is not None:
            yield self._refuse(source.key, refusals.UNSAFE_FILE, source.refused)
            return
        try:
            data = read_source_bytes(source, self._max_bytes)
        except (image_io.ImageReadError, OSError) as error:
            yield self._refuse(source.key, refusals.reason_of(error), error)
            return
        self._input_bytes.inc(len(data))
        if not data:
            yield self._refuse(source.key, refusals.UNREADABLE, "empty or missing image data")
            return
        try:
            header = headers.read_header(data, source.key)
        except image_io.ImageReadError as error:
            yield self._refuse(source.key, refusals.UNREADABLE, error)
            return
        pixels = header.height * header.width
        if pixels > self._max_pixels:
            yield self._refuse(source.key, refusals.TOO_LARGE,
                               f"declares {header.width}x{header.height} = {pixels:,} pixels, "
                               f"more than the limit of {self._max_pixels:,}")
            return
        native_channels = 1 if header.grey else 3
        if native_channels != self._channels:
            yield self._refuse(source.key, refusals.WRONG_CHANNELS,
                               f"{'grey' if header.grey else 'colour'} {header.format} "
                               f"({native_channels} channel(s)); the model takes "
                               f"{self._channels}")
            return
        try:
            image = image_io.decode_image(data, channels=None, max_pixels=self._max_pixels,
                                          name=source.key)
        except image_io.ImageReadError as error:
            yield self._refuse(source.key, refusals.reason_of(error), error)
            return
        yield DecodedImage(source.key, source.label, image, len(data))


def shape_key(image: DecodedImage) -> str:
    """``HxWxC``: images of one key can share a network call."""
    height, width, channels = image.image.shape
    return f"{height}x{width}x{channels}"
