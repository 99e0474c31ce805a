"""What a purify pipeline run leaves under ``--output_dir``, and how it gets there.

Layout: ``purified-SSSSS-of-NNNNN.tfrecord`` (``io.examples``' ``tf.train.Example`` schema),
``dead_letter-SSSSS-of-NNNNN.jsonl`` (one ``refusals.Refusal`` JSON line per refused input),
optionally ``pngs/`` mirroring the input keys (``KEY`` without its extension, ``.png``: two
keys that would share a name are refused with the request, ``colliding_png_keys``), and
``manifest.json`` written last. ``EncodePurified`` rounds with ``io.images.to_uint8`` and
encodes PNG exactly as ``io.images.write_png`` does, so at noise 0 the bytes equal the purify
command's files; an image the model refused, or whose PNG cannot be written, becomes a
``refusals.Refusal`` instead (tag ``refused``), and ``CountPurified`` counts the rest. Local
files are published atomically (``io.atomic``), PNGs without replacing anything; remote ones
through Beam's ``FileSystems`` (an object appears when its upload completes).
``prepare_output_dir`` with ``overwrite`` also removes what a killed run left (Beam's
``beam-temp-*`` folders, ``io.atomic``'s ``.partial.*`` files).
"""

from __future__ import annotations

import json
import os
import shutil


from comdefend_tf import optional
from comdefend_tf.io import images as image_io
from comdefend_tf.io.atomic import PARTIAL_PREFIX, write_bytes_atomic, write_json_atomic
from comdefend_tf.io.examples import PurifiedImage
from comdefend_tf.purification import counters, refusals
from comdefend_tf.purification.plan import is_remote

beam = optional.require("apache_beam", "beam", "dataset purification on Apache Beam")
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.ml.inference.base import PredictionResult  # noqa: E402

PURIFIED_PREFIX = "purified"
PURIFIED_SUFFIX = ".tfrecord"
DEAD_LETTER_PREFIX = "dead_letter"
DEAD_LETTER_SUFFIX = ".jsonl"
PNG_SUBDIR = "pngs"
MANIFEST_FILENAME = "manifest.json"
BEAM_TEMP_PREFIX = "beam-temp-"  # where Beam's file sinks stage shards until the run ends
OUR_OUTPUTS = (PURIFIED_PREFIX, DEAD_LETTER_PREFIX, MANIFEST_FILENAME, PNG_SUBDIR)
# What a killed run of this pipeline leaves beside its outputs.
OUR_TEMPORARIES = (BEAM_TEMP_PREFIX + PURIFIED_PREFIX, BEAM_TEMP_PREFIX + DEAD_LETTER_PREFIX,
                   PARTIAL_PREFIX)


class OutputDirError(ValueError):
    """The output folder holds something and ``overwrite`` was not given."""


# --------------------------------------------------------------------------------- files
def match_files(pattern: str) -> list[str]:
    """The files ``pattern`` matches, sorted (``FileSystems.match``: local or remote). For this
    module's own outputs, not for inputs (``plan.list_files`` lists those)."""
    try:
        result = FileSystems.match([pattern])[0]
    except Exception:  # BeamIOError when nothing matches or the bucket is unreachable
        return []
    return sorted(metadata.path for metadata in result.metadata_list)


def read_text(path: str) -> str:
    """A UTF-8 file's text, local or remote."""
    with FileSystems.open(path) as handle:
        return handle.read().decode("utf-8")


def write_output(path: str, data: bytes, replace: bool = True) -> None:
    """Publishes ``data`` at ``path`` whole: atomically beside it when local (creating its
    folder; ``replace=False`` raises ``FileExistsError`` if anything is there), through
    ``FileSystems.create`` when remote."""
    if is_remote(path):
        with FileSystems.create(path) as handle:
            handle.write(data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_bytes_atomic(path, data, replace=replace)


def write_manifest(output_dir: str, manifest: dict) -> None:
    """Writes ``OUTPUT_DIR/manifest.json`` (indented, keys sorted), whole, last."""
    path = FileSystems.join(output_dir, MANIFEST_FILENAME)
    if is_remote(path):
        text = json.dumps(manifest, indent=2, sort_keys=True, default=float) + "\n"
        write_output(path, text.encode("utf-8"))
    else:
        write_json_atomic(path, manifest)


def _output_entries(output_dir: str) -> list[str]:
    if is_remote(output_dir):
        return sorted({path[len(output_dir.rstrip("/")) + 1:].split("/")[0]
                       for path in match_files(FileSystems.join(output_dir, "**"))})
    if not os.path.isdir(output_dir):
        return []
    return sorted(os.listdir(output_dir))


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuses an output folder that holds anything unless ``overwrite``; with ``overwrite``
    removes this pipeline's previous outputs and a killed run's temporaries (``OUR_OUTPUTS``,
    ``OUR_TEMPORARIES``, nothing else).

    Raises:
      OutputDirError: the folder is not empty and ``overwrite`` is False, or it cannot be
        created (a file stands there or above it).
    """
    entries = _output_entries(output_dir)
    if entries and not overwrite:
        raise OutputDirError(f"output folder {output_dir!r} is not empty ({len(entries)} "
                             f"entries, first {entries[0]!r}); pass --overwrite to replace "
                             f"a previous run's outputs")
    if is_remote(output_dir):
        stale = [path for path in match_files(FileSystems.join(output_dir, "**"))
                 if path[len(output_dir.rstrip("/")) + 1:].startswith(
                     OUR_OUTPUTS + OUR_TEMPORARIES)]
        if stale:
            FileSystems.delete(stale)
        return
    for entry in entries:
        if not entry.startswith(OUR_OUTPUTS + OUR_TEMPORARIES):
            continue
        path = os.path.join(output_dir, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:  # a file where the folder or one above it should be
        raise OutputDirError(f"cannot create the output folder {output_dir!r}: "
                             f"{error.strerror or error}") from error


def output_files(output_dir: str, prefix: str, suffix: str) -> list[str]:
    """Base names of a finished run's sharded outputs ``PREFIX*SUFFIX``, sorted."""
    return [os.path.basename(path)
            for path in match_files(FileSystems.join(output_dir, prefix + "*" + suffix))]


def read_dead_letter(output_dir: str) -> list[dict]:
    """The refusals of a finished run, ``{"key", "reason", "detail"}`` each, sorted by key."""
    entries = []
    for name in output_files(output_dir, DEAD_LETTER_PREFIX, DEAD_LETTER_SUFFIX):
        text = read_text(FileSystems.join(output_dir, name))
        entries += [refusals.Refusal.from_json(line)._asdict()
                    for line in text.splitlines() if line.strip()]
    return sorted(entries, key=lambda entry: entry["key"])


# -------------------------------------------------------------------------- purified images
REFUSED = "refused"


class _Refuses(beam.DoFn):
    """A DoFn that may turn an element into a ``Refusal`` (tag ``REFUSED``), counted."""

    def __init__(self):
        super().__init__()
        self._refused = {reason: counters.counter(counters.refused_name(reason))
                         for reason in refusals.REASONS}

    def _refuse(self, key: str, reason: str, detail: str):
        self._refused[reason].inc()
        return beam.pvalue.TaggedOutput(REFUSED, refusals.Refusal(key, reason, detail))


class EncodePurified(_Refuses):
    """``PredictionResult`` -> ``PurifiedImage`` (rounded with ``image_io.to_uint8``), or a
    ``model_refused`` refusal for an image the model refused (``handler``)."""

    def process(self, result: PredictionResult):
        if "refused" in result.inference:
            yield self._refuse(result.example.key, refusals.MODEL_REFUSED,
                               f"the exported model refused it: {result.inference['refused']}")
            return
        pixels = image_io.to_uint8(result.inference["purified"])
        png = image_io.encode_png(pixels)
        yield PurifiedImage(result.example.key, result.example.label, png,
                            result.inference["code_bits"], pixels.shape)


class CountPurified(beam.DoFn):
    """Counts a ``PurifiedImage`` whose outputs are all written (``purified``,
    ``output_bytes``) and passes it on."""

    def __init__(self):
        super().__init__()
        self._purified = counters.counter(counters.PURIFIED)
        self._output_bytes = counters.counter(counters.OUTPUT_BYTES)

    def process(self, item: PurifiedImage):
        self._purified.inc()
        self._output_bytes.inc(len(item.png))
        yield item


def png_relative(key: str) -> str:
    """A key's PNG under ``pngs/``: its relative path, extension replaced by ``.png``."""
    stem, _ = os.path.splitext(key)
    return stem + ".png"


def png_path(png_root: str, key: str) -> str:
    """Where ``--write_pngs`` puts a key's PNG (``png_relative`` under ``png_root``)."""
    return FileSystems.join(png_root, *png_relative(key).split(os.sep))


def colliding_png_keys(keys) -> tuple[str, str, str] | None:
    """The first two keys whose PNGs would share a name (``same.png`` and ``same.jpg``) and
    that name, in the order of ``keys``; None when every name is unique."""
    claimed = {}
    for key in keys:
        name = png_relative(key)
        if name in claimed:
            return claimed[name], key, name
        claimed[name] = key
    return None


class WritePng(_Refuses):
    """Writes one purified PNG under ``png_root`` (``write_output``, never replacing a file)
    and passes the image on, or refuses it (``cannot_write``) when the file system will not
    take the file; the image then appears in no other output."""

    def __init__(self, png_root: str):
        super().__init__()
        self._png_root = png_root

    def process(self, item: PurifiedImage):
        target = png_path(self._png_root, item.key)
        try:
            write_output(target, item.png, replace=False)
        except FileExistsError:
            yield self._refuse(item.key, refusals.CANNOT_WRITE,
                               f"its PNG {png_relative(item.key)!r} already exists under "
                               f"{PNG_SUBDIR}/ (another input's, or a case-insensitive file "
                               f"system's match); nothing is replaced")
            return
        except OSError as error:
            yield self._refuse(item.key, refusals.CANNOT_WRITE,
                               f"cannot write its PNG {png_relative(item.key)!r}: "
                               f"{error.strerror or error}")
            return
        yield item
