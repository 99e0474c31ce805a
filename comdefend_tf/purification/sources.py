"""The purify pipeline's inputs: an ``InputPlan`` in, checked images or refusals out.

``ReadSourceImages``: ``InputPlan`` -> ``SourceImage`` (files only named, records read by
``read_records``, which checks every record's checksums and length, so a damaged record file
ends as a refusal of the damage, not of the run). ``DecodeImages``: ``SourceImage`` ->
``DecodedImage`` (float32 ``[H, W, C]`` in [0, 1], read by ``io.images`` with the purify
command's rules and limits) or, under the tag ``refused``, a ``refusals.Refusal``. Every check
(listing refusal, a name that is not UTF-8, byte size, format, declared pixels, colour kind)
runs before a pixel is decoded, and every input counts once in the counters.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Iterator, NamedTuple

import numpy as np

from comdefend_tf import optional
from comdefend_tf.io import headers
from comdefend_tf.io import images as image_io
from comdefend_tf.purification import counters, refusals
from comdefend_tf.purification.plan import InputPlan, is_remote

beam = optional.require("apache_beam", "beam", "dataset purification on Apache Beam")
from apache_beam.io.filesystems import FileSystems  # noqa: E402


class SourceImage(NamedTuple):
    """One input: ``key`` (unique, stable, valid UTF-8), label (-1: none), and either ``path``
    (a file, read by ``DecodeImages`` within the byte limit) or ``encoded`` (bytes from a
    record), or ``refused`` (why it is refused before it is opened: the listing's or the
    record reader's detail) with ``reason``, a word of ``refusals.REASONS``."""

    key: str
    encoded: bytes | None
    label: int
    path: str
    refused: str | None = None
    reason: str = refusals.UNSAFE_FILE


def refused_source(key: str, detail: str, reason: str = refusals.UNSAFE_FILE) -> SourceImage:
    """An input refused before it is opened (key and detail escaped to valid UTF-8)."""
    return SourceImage(refusals.escaped_name(key), None, -1, "", refusals.escaped_name(detail),
                       reason)


NOT_UTF8 = ("its name is not valid UTF-8 (the bytes that are not are shown as \\xNN); rename "
            "it to purify it")


class ReadSourceImages(beam.PTransform):
    """``InputPlan`` -> PCollection of ``SourceImage`` (files are only named here; their bytes
    are read by ``DecodeImages``, after the size check; records are read by
    ``ReadRecordFile``, none longer than ``max_record_bytes``). A planned path whose name is
    not UTF-8 is refused (``unsafe_file``) under its escaped name."""

    def __init__(self, plan: InputPlan, max_record_bytes: int):
        super().__init__()
        self._plan = plan
        self._max_record_bytes = max_record_bytes

    def expand(self, pipeline):
        plan = self._plan
        listed = [refused_source(key, detail) for key, detail in plan.refused]
        if plan.kind == "files":
            for key, path, label in plan.files:
                if refusals.escaped_name(path) != path:
                    listed.append(refused_source(key, NOT_UTF8))
                else:
                    listed.append(SourceImage(key, None, int(label), path))
            return pipeline | "ListFiles" >> beam.Create(listed)
        record_files = []
        for path in plan.files:
            if refusals.escaped_name(path) != path:
                listed.append(refused_source(path, NOT_UTF8))
            else:
                record_files.append(path)
        records = (pipeline
                   | "ListRecordFiles" >> beam.Create(record_files)
                   | "ReadRecords" >> beam.ParDo(ReadRecordFile(
                       self._max_record_bytes, plan.image_feature, plan.label_feature)))
        if not listed:
            return records
        return ((records, pipeline | "ListRefused" >> beam.Create(listed))
                | "WithRefused" >> beam.Flatten())


# ------------------------------------------------------------------------------ TFRecords
RECORD_HEADER_BYTES = 12  # uint64 length, uint32 masked CRC-32C of those 8 bytes
RECORD_FOOTER_BYTES = 4  # uint32 masked CRC-32C of the data
_SKIP_CHUNK_BYTES = 1 << 20


def masked_crc32c(data: bytes) -> int:
    """The TFRecord format's masked CRC-32C of ``data``."""
    google_crc32c = optional.require("google_crc32c", "beam", "checking TFRecord inputs")

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class RecordProblem(NamedTuple):
    """A part of a record file that yields no record: where, why (a ``refusals`` reason) and
    ``final`` when nothing after it in the file can be read."""

    offset: int
    reason: str
    detail: str
    final: bool


def read_records(handle, max_record_bytes: int) -> Iterator[tuple[int, bytes] | RecordProblem]:
    """The records of an open TFRecord file, in order: ``(offset, data)`` for each intact one,
    a ``RecordProblem`` for each damaged or oversized one.

    Never reads more than ``max_record_bytes`` + 16 bytes at once. A header whose checksum
    fails, or a file that ends inside a record, ends the file (its length cannot be trusted, so
    the next record cannot be found); a record whose data fails its checksum is skipped, as is
    a record longer than ``max_record_bytes`` (read past in bounded chunks, never held).
    """
    offset = 0
    while True:
        header = handle.read(RECORD_HEADER_BYTES)
        if not header:
            return
        if len(header) < RECORD_HEADER_BYTES:
            yield RecordProblem(offset, refusals.UNREADABLE,
                                f"damaged TFRecord file: it ends {len(header)} byte(s) into "
                                f"the record header at byte {offset:,}", True)
            return
        length, length_crc = struct.unpack("<QI", header)
        if masked_crc32c(header[:8]) != length_crc:
            yield RecordProblem(offset, refusals.UNREADABLE,
                                f"damaged TFRecord file: the record header at byte {offset:,} "
                                f"fails its checksum; the rest of the file is not read", True)
            return
        if length > max_record_bytes:
            remaining = length + RECORD_FOOTER_BYTES
            while remaining:
                chunk = handle.read(min(remaining, _SKIP_CHUNK_BYTES))
                if not chunk:
                    break
                remaining -= len(chunk)
            final = remaining > 0
            yield RecordProblem(offset, refusals.TOO_LARGE,
                                f"the TFRecord record at byte {offset:,} holds {length:,} "
                                f"bytes, more than the limit of {max_record_bytes:,} bytes"
                                + ("; the file ends inside it" if final else ""), final)
            if final:
                return
            offset += RECORD_HEADER_BYTES + length + RECORD_FOOTER_BYTES
            continue
        body = handle.read(length + RECORD_FOOTER_BYTES)
        if len(body) < length + RECORD_FOOTER_BYTES:
            yield RecordProblem(offset, refusals.UNREADABLE,
                                f"damaged TFRecord file: the record at byte {offset:,} declares "
                                f"{length:,} bytes but the file ends {len(body):,} byte(s) "
                                f"into it (truncated)", True)
            return
        data = body[:length]
        if masked_crc32c(data) != struct.unpack("<I", body[length:])[0]:
            yield RecordProblem(offset, refusals.UNREADABLE,
                                f"damaged TFRecord file: the record at byte {offset:,} fails "
                                f"its data checksum", False)
        else:
            yield offset, data
        offset += RECORD_HEADER_BYTES + length + RECORD_FOOTER_BYTES


class ReadRecordFile(beam.DoFn):
    """A TFRecord file's path -> a ``SourceImage`` per record (``parse_record``) and a refused
    one, keyed ``FILE@byte OFFSET``, per ``RecordProblem`` or for a file that cannot be opened.
    Files are opened through Beam's ``FileSystems`` (local or remote; compression from the
    extension, as ``ReadFromTFRecord`` reads them); a file is one unit of work (Beam's own
    TFRecord source does not split files either)."""

    def __init__(self, max_record_bytes: int, image_feature: str, label_feature: str):
        super().__init__()
        self._max_record_bytes = max_record_bytes
        self._features = (image_feature, label_feature)

    def process(self, path: str):
        name = os.path.basename(path)
        try:
            handle = FileSystems.open(path)
        except Exception as error:  # BeamIOError, OSError: vanished or unreadable
            yield refused_source(name, f"cannot open the TFRecord file: {error}",
                                 refusals.UNREADABLE)
            return
        with handle:
            try:
                for item in read_records(handle, self._max_record_bytes):
                    if isinstance(item, RecordProblem):
                        yield refused_source(f"{name}@byte {item.offset}", item.detail,
                                             item.reason)
                    else:
                        yield parse_record((path, item[1]), *self._features)
            except OSError as error:  # an I/O error part-way: the rest is not read
                yield refused_source(f"{name}@read error", f"cannot read the TFRecord file "
                                     f"to its end: {error}", refusals.UNREADABLE)


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

    In order, each before any pixel is decoded: a refusal made before opening (the listing's,
    a name that is not UTF-8, a damaged record: the source's ``reason``); the encoded size
    (<= ``max_bytes``, checked before a file is read); the header (PNG or JPEG, not corrupt);
    the declared pixels (<= ``max_pixels``, and <= ``model_max_pixels``, an exported model's
    pixels per request, when given); the declared colour kind against
    ``channels`` (grey is 1 channel, colour 3). Then the pixels are decoded (corrupt data ->
    ``unreadable``).
    """

    REFUSED = "refused"

    def __init__(self, channels: int, max_pixels: int, max_bytes: int,
                 model_max_pixels: int | None = None):
        super().__init__()
        self._channels = channels
        self._max_pixels = max_pixels
        self._max_bytes = max_bytes
        self._model_max_pixels = model_max_pixels
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
            yield self._refuse(source.key, source.reason, source.refused)
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
        if self._model_max_pixels is not None and pixels > self._model_max_pixels:
            yield self._refuse(source.key, refusals.TOO_LARGE,
                               f"declares {header.width}x{header.height} = {pixels:,} pixels, "
                               f"more than the exported model accepts in one request "
                               f"({self._model_max_pixels:,}, its max_pixels_per_request)")
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
