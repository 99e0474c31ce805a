"""What a purification run reads and where it writes, decided before any work starts.

``list_files`` is the one listing of local inputs, shared by the purify command and the Beam
pipeline: the ``io`` lister's rules (no link followed outside the input folder, no ``**`` loop,
FIFOs and devices refused by name) and its ``max_files`` cap. ``plan_inputs`` turns the Beam
pipeline's ``--input`` (a folder, a glob, ``tfrecord:GLOB``, ``tfds:NAME``; remote paths through
Beam's ``FileSystems``) into an ``InputPlan``; ``plan_outputs`` pairs the command's inputs with
safe output paths. Errors: ``InputPlanError`` and ``OutputPlanError`` (both ``ValueError``),
raised before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from comdefend_tf import optional
from comdefend_tf.io import listing

TFRECORD_PREFIX = "tfrecord:"
TFDS_PREFIX = "tfds:"
DEFAULT_MAX_FILES = listing.DEFAULT_MAX_FILES

# Feature names of a tensorflow-datasets image dataset's records.
TFDS_IMAGE_FEATURE = "image"
TFDS_LABEL_FEATURE = "label"


class InputPlanError(ValueError):
    """The input names no file, too many files, or a dataset that is not there."""


class OutputPlanError(ValueError):
    """The requested outputs would overwrite files, collide, or land in an input folder."""


def is_remote(path: str) -> bool:
    """Whether ``path`` has a scheme (``gs://``, ``s3://``, ``hdfs://``): Beam's FileSystems."""
    return "://" in path


# ---------------------------------------------------------------------------- listing files
@dataclasses.dataclass
class FileListing:
    """The files an input names: ``paths`` to read, sorted, and ``refused`` ``(path, detail)``
    pairs, sorted, for files the listing will not let anyone open."""

    paths: list[str]
    refused: list[tuple[str, str]]


def list_files(input_spec: str, max_files: int = DEFAULT_MAX_FILES) -> FileListing:
    """The local files of ``input_spec``: a file, a folder (its PNG/JPEG files, not recursive)
    or a glob (``**`` never follows links to folders).

    Raises:
      InputPlanError: nothing matches, or more than ``max_files`` entries do.
    """
    try:
        found = listing.list_images(input_spec, max_files)
    except (FileNotFoundError, listing.TooManyFilesError) as error:
        raise InputPlanError(str(error)) from error
    return FileListing(list(found.paths), list(found.refused))


def _list_local(pattern: str, max_files: int) -> FileListing:
    """``list_files``, but an empty listing when nothing matches (the cap still raises), so each
    caller words its own "nothing matches" error."""
    try:
        return list_files(pattern, max_files)
    except InputPlanError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            return FileListing([], [])
        raise


def match_remote(pattern: str, max_files: int = DEFAULT_MAX_FILES) -> list[str]:
    """The files a remote glob matches, sorted (Beam's ``FileSystems.match``; none when the
    bucket is unreachable).

    Raises:
      InputPlanError: more than ``max_files`` matches.
    """
    optional.require("apache_beam", "beam", "remote inputs of the Beam pipeline")
    from apache_beam.io.filesystems import FileSystems

    try:
        result = FileSystems.match([pattern])[0]
    except Exception:  # BeamIOError when nothing matches or the bucket is unreachable
        return []
    if len(result.metadata_list) > max_files:
        raise InputPlanError(f"{pattern!r} matches more than {max_files:,} files; split the "
                             f"input or raise the limit (--max_files)")
    return sorted(metadata.path for metadata in result.metadata_list)


# -------------------------------------------------------------------- the pipeline's inputs
@dataclasses.dataclass(frozen=True)
class InputPlan:
    """What the Beam pipeline reads, resolved once on the machine that builds the pipeline.

    Attributes:
      kind: ``files`` (image files) or ``tfrecord`` (``tf.train.Example`` records).
      description: the ``--input`` value as given.
      files: for ``files``: ``(key, path, label)`` triples, ``key`` the path relative to
        ``root``, label -1 when none; for ``tfrecord``: the record file paths.
      root: the folder keys are relative to (``files`` only).
      class_names: label index -> class name (empty when unlabelled).
      image_feature, label_feature: feature names of the encoded image and label (``tfrecord``).
      refused: ``(key, detail)`` of the files the listing refused (dead letters, never read).
    """

    kind: str
    description: str
    files: tuple
    root: str | None = None
    class_names: tuple = ()
    image_feature: str = "image/encoded"
    label_feature: str = "image/class/label"
    refused: tuple = ()


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard component ("." when none)."""
    fixed = []
    for part in pattern.split(os.sep)[:-1]:
        if any(char in part for char in "*?["):
            break
        fixed.append(part)
    return os.sep.join(fixed) or "."


def _relative(path: str, root: str) -> str:
    if is_remote(root):
        return path[len(root.rstrip("/")) + 1:]
    return os.path.relpath(path, root)


def _class_folders(root: str) -> list[str]:
    """Sorted subfolder names of ``root``: the classes of ``io.datasets``' ``folder:`` source."""
    return sorted(entry for entry in os.listdir(root) if os.path.isdir(os.path.join(root, entry)))


def plan_inputs(input_spec: str, data_dir: str | None = None, tfds_split: str = "train",
                max_files: int = DEFAULT_MAX_FILES) -> InputPlan:
    """Resolves the pipeline's ``--input``: a folder, a glob, ``tfrecord:GLOB`` or ``tfds:NAME``.

    * A folder with class subfolders: their image files (``FOLDER/*/*``), labelled by the
      sorted subfolder names, as ``io.datasets``' ``folder:`` source labels them. A folder
      without subfolders: its image files, unlabelled (-1).
    * A glob (``photos/*/*.png``): the matching image files; the first folder below the glob's
      fixed part is the class (sorted names give the labels); files directly there are
      unlabelled.
    * ``tfrecord:GLOB``: files of ``tf.train.Example`` records (``image/encoded``, optionally
      ``image/class/label``).
    * ``tfds:NAME``: a tensorflow-datasets dataset already prepared under ``data_dir`` (never
      downloaded here); its TFRecord files of ``tfds_split``, features ``image`` and ``label``.

    Local files are listed by ``list_files`` (its refusals become ``refused``, its cap is
    ``max_files``); remote ones by ``match_remote``. Only ``.png``/``.jpg``/``.jpeg`` names count
    as image files.

    Raises:
      InputPlanError: nothing matches, too many files, or the tfds dataset is not prepared.
    """
    if input_spec.startswith(TFRECORD_PREFIX):
        pattern = input_spec[len(TFRECORD_PREFIX):]
        if is_remote(pattern):
            files, refused = match_remote(pattern, max_files), []
        else:
            found = _list_local(pattern, max_files)
            files, refused = found.paths, found.refused
        if not files and not refused:
            raise InputPlanError(f"no TFRecord file matches {pattern!r}")
        root = _glob_root(pattern)
        return InputPlan("tfrecord", input_spec, tuple(files),
                         refused=tuple((_relative(path, root), detail)
                                       for path, detail in refused))
    if input_spec.startswith(TFDS_PREFIX):
        return _plan_tfds(input_spec, input_spec[len(TFDS_PREFIX):], data_dir, tfds_split)
    return _plan_image_files(input_spec, max_files)


def _plan_image_files(input_spec: str, max_files: int) -> InputPlan:
    import glob

    class_names = None
    if not is_remote(input_spec) and os.path.isdir(input_spec):
        root = input_spec
        class_names = _class_folders(root)
        pattern = (os.path.join(glob.escape(root), "*", "*") if class_names
                   else os.path.join(glob.escape(root), "*"))
    else:
        root, pattern = _glob_root(input_spec), input_spec
    empty = (f"no {'/'.join(listing.IMAGE_EXTENSIONS)} file matches {input_spec!r} (expected "
             f"a folder, a glob, {TFRECORD_PREFIX}GLOB or {TFDS_PREFIX}NAME)")
    found = (FileListing(match_remote(pattern, max_files), []) if is_remote(pattern)
             else _list_local(pattern, max_files))

    def is_image(path):
        return path.lower().endswith(listing.IMAGE_EXTENSIONS)

    paths = [path for path in found.paths if is_image(path)]
    refused = [(path, detail) for path, detail in found.refused if is_image(path)]
    if not paths and not refused:
        raise InputPlanError(empty)
    relative = [_relative(path, root) for path in paths]
    if class_names is None:
        class_names = sorted({rel.split(os.sep)[0] for rel in relative if os.sep in rel})
    index = {name: label for label, name in enumerate(class_names)}
    triples = tuple((rel, path, index.get(rel.split(os.sep)[0], -1) if os.sep in rel else -1)
                    for rel, path in zip(relative, paths))
    return InputPlan("files", input_spec, triples, root, tuple(class_names),
                     refused=tuple((_relative(path, root), detail) for path, detail in refused))


def _plan_tfds(input_spec: str, name: str, data_dir: str | None, split: str) -> InputPlan:
    tfds = optional.require("tensorflow_datasets", "data", f"the tensorflow-datasets input "
                            f"{name!r}")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # tfds raises several types for unknown or broken names
        raise InputPlanError(f"tensorflow-datasets has no dataset {name!r}: {error}") from error
    if not builder.is_prepared():
        raise InputPlanError(
            f"tensorflow-datasets dataset {name!r} is not prepared under {builder.data_dir!r}; "
            f"prepare it first (tfds build {name} --data_dir=...): this pipeline never "
            f"downloads")
    if split not in builder.info.splits:
        raise InputPlanError(f"{name!r} has no split {split!r}; it has "
                             f"{sorted(builder.info.splits)}")
    files = tuple(str(path) for path in builder.info.splits[split].filepaths)
    features = builder.info.features
    if TFDS_IMAGE_FEATURE not in features:
        raise InputPlanError(f"{name!r} has no {TFDS_IMAGE_FEATURE!r} feature (features: "
                             f"{sorted(features)})")
    class_names = ()
    if TFDS_LABEL_FEATURE in features and hasattr(features[TFDS_LABEL_FEATURE], "names"):
        class_names = tuple(features[TFDS_LABEL_FEATURE].names)
    return InputPlan("tfrecord", input_spec, files, None, class_names,
                     image_feature=TFDS_IMAGE_FEATURE, label_feature=TFDS_LABEL_FEATURE)


# ------------------------------------------------------------------- the command's outputs
def check_output_folder(output_dir: str) -> None:
    """Refuses an ``output_dir`` that is not a folder and cannot become one: something other
    than a folder is there (a file, a link to a file, a dangling link), or the nearest existing
    path above it is not a folder (``file.txt/sub``).

    Raises:
      OutputPlanError: naming ``output_dir`` and what stands in the way.
    """
    if os.path.lexists(output_dir):
        if not os.path.isdir(output_dir):
            raise OutputPlanError(f"output folder {output_dir!r} is not a folder (a file or a "
                                  f"link to one is there); choose a folder")
        return
    above = os.path.dirname(os.path.abspath(output_dir))
    while not os.path.lexists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise OutputPlanError(f"output folder {output_dir!r} cannot be created: {above!r} is "
                              f"not a folder")


def plan_outputs(input_paths: Sequence[str], output_dir: str,
                 overwrite: bool = False) -> list[tuple[str, str]]:
    """Pairs each input with ``OUTPUT_DIR/<stem>.png`` after checking the plan is safe.

    Raises:
      OutputPlanError: ``output_dir`` is not a folder (a file, a link to one, or a path below
        a file), holds an input image, an output would be an input file or land outside
        ``output_dir``, two inputs share an output name, or (without ``overwrite``) an output
        file or link already exists. Nothing has been written.
    """
    check_output_folder(output_dir)
    output_real = os.path.realpath(output_dir)
    output_folder = os.path.normpath(os.path.abspath(output_dir))
    input_folders = {os.path.realpath(os.path.dirname(os.path.abspath(p))) for p in input_paths}
    if output_real in input_folders:
        raise OutputPlanError(f"output folder {output_dir!r} holds input images; choose another "
                              f"folder (purified images are never written into an input folder)")
    input_files = {os.path.realpath(p) for p in input_paths}
    pairs, claimed = [], {}
    for path in input_paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        target = os.path.join(output_dir, stem + ".png")
        if (os.path.dirname(os.path.normpath(os.path.abspath(target))) != output_folder
                or stem in ("", ".", "..")):
            raise OutputPlanError(f"the output name for {path!r} would leave {output_dir!r}")
        if os.path.realpath(target) in input_files:
            raise OutputPlanError(f"{target!r} is an input file (or a link to one); purified "
                                  f"images never replace inputs")
        if target in claimed:
            raise OutputPlanError(f"{claimed[target]!r} and {path!r} would both be written to "
                                  f"{target!r}; purify them into different folders")
        claimed[target] = path
        pairs.append((path, target))
    if not overwrite:
        existing = [target for _, target in pairs if os.path.lexists(target)]
        if existing:
            raise OutputPlanError(f"{len(existing)} output file(s) already exist (first: "
                                  f"{existing[0]!r}); pass --overwrite (overwrite=True) to "
                                  f"replace them")
    return pairs
