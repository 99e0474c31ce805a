"""Versioned, atomic SavedModel exports in the layout TF Serving watches: ``EXPORT_BASE/VERSION/``.

A version is written into a hidden ``.partial-VERSION-pidPID-*`` folder beside it, flushed to
disk and renamed into place, so a crash or kill never leaves a half-written numeric version;
the next export removes the hidden folders of exports that died. Each version holds the
SavedModel of ``signatures.ComDefendServing`` and ``comdefend_export.json`` (its metadata).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile

import keras

from comdefend_tf.io.atomic import write_json_atomic
from comdefend_tf.model import ComDefend
from comdefend_tf.serving import classifier_spec
from comdefend_tf.serving import signatures as signatures_lib
from comdefend_tf.serving.settings import ExportSettings, effective_noise_std
from comdefend_tf.training import provenance

EXPORT_METADATA_FILENAME = "comdefend_export.json"
_TEMP_PREFIXES = (".partial-", ".retired-")
_TEMP_NAME = re.compile(r"^\.(?:partial|retired)-\d+-pid(\d+)-")


def build_export_archive(purifier: ComDefend, classifier: keras.Model | None = None,
                         settings: ExportSettings = ExportSettings()) -> keras.export.ExportArchive:
    """A ``keras.export.ExportArchive`` holding the signatures of ``ComDefendServing``.

    Endpoints are registered in ``ComDefendServing.signatures`` order; the first becomes
    ``serving_default`` (``classify`` when a classifier is given, else ``purify``).
    """
    module = signatures_lib.ComDefendServing(purifier, classifier, settings)
    archive = keras.export.ExportArchive()
    archive.track(module.purifier)
    if classifier is not None:
        archive.track(classifier)
    for name, function in module.signatures.items():
        function.get_concrete_function()
        archive.add_endpoint(name, function)
    return archive


def list_versions(export_base: str) -> list[int]:
    """Numeric version folders under ``export_base`` (what TF Serving loads), ascending."""
    if not os.path.isdir(export_base):
        return []
    return sorted(int(name) for name in os.listdir(export_base)
                  if name.isdigit() and os.path.isdir(os.path.join(export_base, name)))


def next_version(export_base: str) -> int:
    """One more than the highest existing version, or 1."""
    versions = list_versions(export_base)
    return versions[-1] + 1 if versions else 1


def export_metadata(purifier: ComDefend, classifier: keras.Model | None,
                    settings: ExportSettings, version: int,
                    classifier_record: dict | None = None,
                    provenance_warnings=(), adversarial_record: dict | None = None) -> dict:
    """The ``comdefend_export.json`` contents. ``defense_mode``: ``test_time`` (a classifier
    trained on clean images), ``train_and_test_time`` (one trained behind a purifier:
    ``classifier_record``, ``provenance.read_classifier_purifier``) or ``purify_only`` (no
    classifier); ``provenance_warnings``: the purifier mismatches found at export;
    ``classifier_adversarial_training``: the classifier's adversarial-training record
    (``provenance.adversarial_record``), None when it was not adversarially trained."""
    signatures = ([signatures_lib.SIGNATURE_CLASSIFY] if classifier is not None else []) + [
        signatures_lib.SIGNATURE_PURIFY, signatures_lib.SIGNATURE_PURIFY_BYTES,
        signatures_lib.SIGNATURE_PURIFY_EXAMPLES]
    noise_std = effective_noise_std(purifier, settings)
    return {"version": version, "comdefend_config": purifier.config.to_dict(),
            "settings": dataclasses.asdict(settings),
            "effective_inference_noise_std": noise_std,
            "noise_source": ("none" if noise_std == 0.0 else
                             "os_entropy_per_process" if settings.noise_seed is None else
                             "fixed_seed_reproducible_per_process"),
            "patch_overlap": settings.overlap_for(purifier.config),
            "chunk_pixels": settings.chunk_pixels_for(purifier.config),
            "limits": {"max_pixels_per_request": settings.max_pixels,
                       "max_batch_size": settings.max_batch_size,
                       "image_bytes_formats": ["png", "jpeg"]},
            "signatures": signatures, "serving_default": signatures[0],
            "classifier": None if classifier is None else classifier.name,
            "classifier_height_width": (None if classifier is None
                                        else classifier_spec.classifier_height_width(classifier)),
            "defense_mode": ("purify_only" if classifier is None
                             else provenance.defense_mode(classifier_record, purifier)),
            "purifier_fingerprint": provenance.weights_fingerprint(purifier),
            "classifier_trained_behind_purifier": classifier_record,
            "classifier_adversarial_training": adversarial_record,
            "provenance_warnings": list(provenance_warnings)}


def _write_version(archive, folder: str, metadata: dict) -> None:
    archive.write_out(folder, verbose=False)
    write_json_atomic(os.path.join(folder, EXPORT_METADATA_FILENAME), metadata)


def _fsync_tree(folder: str) -> None:
    """Flushes every file and folder under ``folder`` (and itself) to disk, so that the rename
    that publishes it cannot outlive its contents in a power loss."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(root)


def _fsync_dir(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _temp_name(kind: str, version: int) -> str:
    return f"{kind}{version}-pid{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(export_base: str) -> list[str]:
    """Removes the hidden temporary folders of exports that died (killed, crashed) under
    ``export_base`` and returns their names.

    A folder is stale when its name does not carry a process id or carries the id of a process
    that no longer runs on this machine; folders of exports still running are kept. (Exports
    into one folder from several machines would need a lock instead.) Numeric versions are
    never touched. TF Serving ignores these folders anyway: it only loads numeric names.
    """
    if not os.path.isdir(export_base):
        return []
    removed = []
    for name in sorted(os.listdir(export_base)):
        if not name.startswith(_TEMP_PREFIXES):
            continue
        match = _TEMP_NAME.match(name)
        if match and _process_alive(int(match.group(1))):
            continue
        shutil.rmtree(os.path.join(export_base, name), ignore_errors=True)
        removed.append(name)
    return removed


def export_savedmodel(purifier: ComDefend, export_base: str, classifier: keras.Model | None = None,
                      settings: ExportSettings = ExportSettings(), version: int | None = None,
                      overwrite: bool = False, classifier_record: dict | None = None,
                      purifier_path: str | None = None,
                      adversarial_record: dict | None = None) -> str:
    """Writes ``export_base/VERSION/`` (a SavedModel TF Serving can load) atomically.

    The version is built in a hidden temporary folder beside it (``.partial-VERSION-pidPID-*``,
    a name TF Serving ignores), flushed to disk (fsync) and renamed into place; on any error
    the temporary folder is removed and no version folder appears. A process killed mid-write
    (SIGKILL, power loss) leaves only its hidden folder, which the next export removes
    (``remove_stale_temporaries``). Besides the SavedModel, the folder holds
    ``comdefend_export.json`` (config, settings, limits, signature names).

    Args:
      purifier, classifier, settings: see ``signatures.ComDefendServing``.
      export_base: the folder TF Serving's ``--model_base_path`` points at.
      version: a positive integer; None takes one more than the highest existing version.
      overwrite: replace an existing version (otherwise ``FileExistsError``). The old folder
        is moved aside and the new one renamed in: in between, for two renames, the version is
        absent (never partial).
      classifier_record: the purifier the classifier was trained behind
        (``provenance.read_classifier_purifier``; None: trained on clean images). A record
        naming another purifier than ``purifier`` (weights or inference settings) is warned
        about (``provenance.PurifierMismatchWarning``) and listed in the metadata's
        ``provenance_warnings``; the metadata's ``defense_mode`` follows from it.
      purifier_path: where ``purifier`` came from (named in those warnings).
      adversarial_record: the classifier's adversarial-training record
        (``provenance.adversarial_record``), kept in the metadata.

    Returns:
      the absolute path of the written version folder.

    Raises:
      ValueError: ``version`` is not a positive integer; bad settings or classifier.
      FileExistsError: the version exists and ``overwrite`` is False.
    """
    export_base = os.path.abspath(export_base)
    if version is None:
        version = next_version(export_base)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"version must be a positive integer, got {version!r}")
    final = os.path.join(export_base, str(version))
    if os.path.exists(final) and not overwrite:
        raise FileExistsError(f"export version {final} already exists; pass overwrite=True "
                              f"(--overwrite) to replace it or choose another version")
    mismatches = (provenance.check_composition(classifier_record, purifier, purifier_path)
                  if classifier is not None else [])
    archive = build_export_archive(purifier, classifier, settings)
    os.makedirs(export_base, exist_ok=True)
    remove_stale_temporaries(export_base)
    partial = tempfile.mkdtemp(prefix=_temp_name(".partial-", version), dir=export_base)
    try:
        _write_version(archive, partial,
                       export_metadata(purifier, classifier, settings, version,
                                       classifier_record, mismatches,
                                       adversarial_record))
        _fsync_tree(partial)
        if os.path.exists(final):
            if not overwrite:
                raise FileExistsError(f"export version {final} appeared while writing; "
                                      "not overwriting it")
            retired = tempfile.mkdtemp(prefix=_temp_name(".retired-", version), dir=export_base)
            os.rename(final, os.path.join(retired, "old"))
            os.rename(partial, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(partial, final)
        _fsync_dir(export_base)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final
