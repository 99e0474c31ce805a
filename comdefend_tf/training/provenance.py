"""Which purifier a classifier was trained behind, and whether a composition matches it.

ComDefend defends in two modes (the paper's Figure 4): at **test time** (purify, then a
classifier trained on clean images) and at **training and test time** (the classifier was
trained on purified images and sees purified images when deployed). A classifier of the second
mode is tied to one purifier: composed with another purifier, or with none, it sees images
unlike its training images. This module records that tie and checks it.

* ``weights_fingerprint(model)``: ``"sha256:HEX"``, a SHA-256 over the model's floating-point
  weights in their tracking order (each weight's shape, then its float32 little-endian bytes).
  It identifies the weights, not the file: the same weights saved twice, or shared by
  ``ComDefend.with_inference``, give the same fingerprint; the code-noise seed state is not a
  weight and does not enter it.
* ``purifier_record(purifier, path)``: what a classifier's ``metrics.json`` stores under
  ``PURIFIER_KEY``: the purifier's path, config (inference settings included) and fingerprint.
* ``manifest_record(path)``: the record of images purified in advance, from the purify
  command's ``manifest.json`` (``find_purify_manifest`` finds it beside ``tfrecord:GLOB``).
* ``read_classifier_purifier(classifier_dir)``: that record, or None for a classifier trained
  on clean images.
* ``composition_problems(record, purifier)`` / ``check_composition``: the mismatches in words
  (another purifier's weights, other inference settings, no purifier at all), the latter also
  emitting each as a ``PurifierMismatchWarning``.
* ``defense_mode(record, purifier)``: ``undefended``, ``test_time`` or ``train_and_test_time``.
* ``adversarial_record(classifier_path)``: the adversarial-training recipe stored under
  ``ADVERSARIAL_KEY`` (method, norm, eps, steps, step size, eps warm-up, EOT, BPDA gradient,
  behind which purifier, PGD accuracy per epoch, training CPU seconds), or None for a classifier
  trained on clean images (docs/adversarial_training.md).

Nothing here runs a model: a fingerprint reads weights only (``manifest_record`` loads the
named purifier to read them).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np

PURIFIER_KEY = "trained_behind_purifier"
ADVERSARIAL_KEY = "adversarial_training"
METRICS_FILENAME = "metrics.json"
MANIFEST_FILENAME = "manifest.json"
FINGERPRINT_PREFIX = "sha256:"
# How the classifier's training images were purified.
ON_THE_FLY = "on_the_fly"
IN_ADVANCE = "in_advance"
MODE_UNDEFENDED = "undefended"
MODE_TEST_TIME = "test_time"
MODE_TRAIN_AND_TEST_TIME = "train_and_test_time"
MODES = (MODE_UNDEFENDED, MODE_TEST_TIME, MODE_TRAIN_AND_TEST_TIME)
# Inference settings compared when the weights match: either changes the purified images.
_INFERENCE_KEYS = ("inference_noise_std", "inference_mode")


class PurifierMismatchWarning(UserWarning):
    """A classifier trained behind one purifier is composed with another one, or with none."""


def weights_fingerprint(model) -> str:
    """``"sha256:HEX"`` over ``model``'s floating-point weights, in order.

    Each weight contributes its shape (as text) and its values cast to float32 little-endian,
    so the fingerprint does not depend on the variables' names or the file they came from.

    Raises:
      ValueError: the model has no floating-point weights (nothing to identify).
    """
    digest = hashlib.sha256()
    count = 0
    for weight in model.weights:
        values = np.asarray(weight)
        if not np.issubdtype(values.dtype, np.floating):
            continue
        digest.update(repr(tuple(values.shape)).encode())
        digest.update(np.ascontiguousarray(values, dtype="<f4").tobytes())
        count += 1
    if not count:
        raise ValueError(f"{getattr(model, 'name', model)!r} has no floating-point weights to "
                         "fingerprint")
    return FINGERPRINT_PREFIX + digest.hexdigest()


def purifier_record(purifier, path: str | None, purified: str = ON_THE_FLY,
                    manifest: str | None = None) -> dict:
    """The provenance a classifier trained behind ``purifier`` stores.

    Args:
      purifier: a ComDefend model (its ``config`` and weights are recorded).
      path: where it was loaded from (made absolute), or None.
      purified: ``on_the_fly`` (the purifier ran inside the training graph) or ``in_advance``
        (the training images were purified beforehand).
      manifest: for ``in_advance``, the purify command's manifest, if any.

    Returns:
      ``{"path", "config", "fingerprint", "purified", "manifest"}`` (JSON-serialisable).
    """
    if purified not in (ON_THE_FLY, IN_ADVANCE):
        raise ValueError(f"purified must be {ON_THE_FLY!r} or {IN_ADVANCE!r}, got {purified!r}")
    return {"path": None if path is None else os.path.abspath(path),
            "config": purifier.config.to_dict(),
            "fingerprint": weights_fingerprint(purifier),
            "purified": purified,
            "manifest": None if manifest is None else os.path.abspath(manifest)}


def find_purify_manifest(dataset_name: str) -> str | None:
    """The purify command's ``manifest.json`` beside the records of a ``tfrecord:GLOB`` source
    (in the glob's folder), or None (other sources, or no manifest there)."""
    prefix = "tfrecord:"
    if not dataset_name.startswith(prefix):
        return None
    path = os.path.join(os.path.dirname(dataset_name[len(prefix):]) or ".", MANIFEST_FILENAME)
    return path if os.path.isfile(path) else None


def manifest_record(manifest_path: str) -> dict:
    """The purifier record of images purified in advance, from the purify command's
    ``manifest.json`` (or the folder holding it): its ``model`` path, fingerprinted (and its
    config read) when it is a local ComDefend model, else recorded with fingerprint None.

    Raises:
      FileNotFoundError: no manifest there; ValueError: a manifest without a ``model``.
    """
    if os.path.isdir(manifest_path):
        manifest_path = os.path.join(manifest_path, MANIFEST_FILENAME)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"no purify manifest at {manifest_path!r} (the purify_dataset "
                                f"command writes {MANIFEST_FILENAME} into its output folder)")
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    model_path = manifest.get("model") if isinstance(manifest, dict) else None
    if not model_path:
        raise ValueError(f"{manifest_path!r} names no model (expected a purify_dataset "
                         "manifest with a 'model' entry)")
    from comdefend_tf.model import KERAS_FILENAME, load_comdefend

    keras_path = (os.path.join(model_path, KERAS_FILENAME) if os.path.isdir(model_path)
                  else model_path)
    if os.path.isfile(keras_path):
        return purifier_record(load_comdefend(model_path), model_path, IN_ADVANCE, manifest_path)
    # An exported SavedModel or a remote path: recorded by name only.
    return {"path": model_path, "config": None, "fingerprint": None, "purified": IN_ADVANCE,
            "manifest": os.path.abspath(manifest_path)}


def _classifier_metrics(classifier_path: str) -> dict:
    """The ``metrics.json`` object beside a classifier (its directory or ``.keras`` file), or
    ``{}`` when there is none. Raises ValueError when it is not a JSON object."""
    directory = (classifier_path if os.path.isdir(classifier_path)
                 else os.path.dirname(os.path.abspath(classifier_path)))
    path = os.path.join(directory, METRICS_FILENAME)
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        try:
            metrics = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(metrics, dict):
        raise ValueError(f"{path} holds a {type(metrics).__name__}, not a JSON object")
    return metrics


def read_classifier_purifier(classifier_path: str) -> dict | None:
    """The purifier record in the ``metrics.json`` beside a classifier (``classifier_path``: its
    model directory or its ``.keras`` file), or None when it was trained on clean images or
    has no ``metrics.json``.

    Raises:
      ValueError: ``metrics.json`` exists but is not a JSON object.
    """
    return _classifier_metrics(classifier_path).get(PURIFIER_KEY)


def adversarial_record(classifier_path: str) -> dict | None:
    """The adversarial-training record in the ``metrics.json`` beside a classifier (its model
    directory or ``.keras`` file), or None for a classifier trained on clean images (or one
    without ``metrics.json``).

    Keys: ``method`` (``pgd``, ``fgsm_rs``), ``norm``, ``eps``, ``steps``, ``step_size``,
    ``eps_warmup_epochs``, ``eot``, ``gradient`` (None, ``bpda_identity`` or
    ``bpda_smooth(T=...)``), ``behind_purifier``, ``purifier_fingerprint`` (or None),
    ``pgd_accuracy_per_epoch``, ``train_cpu_seconds`` and ``check`` (the per-epoch PGD).

    Raises:
      ValueError: ``metrics.json`` is not a JSON object, or its record is not one.
    """
    record = _classifier_metrics(classifier_path).get(ADVERSARIAL_KEY)
    if record is not None and not isinstance(record, dict):
        raise ValueError(f"the {ADVERSARIAL_KEY} entry beside {classifier_path!r} is a "
                         f"{type(record).__name__}, not a JSON object")
    return record


def defense_mode(record: dict | None, purifier) -> str:
    """``undefended`` (no purifier), ``test_time`` (a purifier before a classifier trained on
    clean images) or ``train_and_test_time`` (before a classifier trained behind a
    purifier; whether it is the same purifier is ``composition_problems``' question)."""
    if purifier is None:
        return MODE_UNDEFENDED
    return MODE_TEST_TIME if record is None else MODE_TRAIN_AND_TEST_TIME


def composition_problems(record: dict | None, purifier, purifier_path: str | None = None,
                         classifier_name: str = "the classifier") -> list[str]:
    """Why composing a classifier (trained behind ``record``'s purifier, or on clean images
    when ``record`` is None) with ``purifier`` (or with no purifier) is not what it was trained
    for. Empty when the composition matches, and for a clean-trained classifier (the test-time
    mode is a deliberate choice).

    Checks: no purifier in front of a classifier trained behind one; other weights (by
    fingerprint); the same weights with other inference noise or code mode.
    """
    if record is None:
        return []
    trained = record.get("path") or "an unrecorded path"
    if purifier is None:
        return [f"{classifier_name} was trained on images purified by {trained} "
                f"({record.get('fingerprint')}) but is used without a purifier: it sees images "
                f"unlike its training images (compose it with that purifier, or use a "
                f"classifier trained on clean images)"]
    fingerprint = weights_fingerprint(purifier)
    here = purifier_path or getattr(purifier, "name", "the purifier")
    if record.get("fingerprint") is None:
        return [f"{classifier_name} was trained on images purified by {trained}, whose weights "
                f"were not fingerprinted: cannot confirm that {here} ({fingerprint}) is that "
                f"purifier"]
    if fingerprint != record.get("fingerprint"):
        return [f"{classifier_name} was trained behind the purifier {trained} "
                f"({record.get('fingerprint')}) but is composed with {here} ({fingerprint}), "
                f"whose weights differ: the train-and-test-time defense needs the purifier it "
                f"was trained behind"]
    problems = []
    trained_config = record.get("config") or {}
    for key in _INFERENCE_KEYS:
        if key in trained_config and trained_config[key] != getattr(purifier.config, key):
            problems.append(f"{classifier_name} was trained behind {trained} with {key} "
                            f"{trained_config[key]!r} but the composed purifier (same weights) "
                            f"uses {getattr(purifier.config, key)!r}")
    return problems


def check_composition(record: dict | None, purifier, purifier_path: str | None = None,
                      classifier_name: str = "the classifier") -> list[str]:
    """``composition_problems``, each also emitted as a ``PurifierMismatchWarning``; returns
    the messages (for a report's or an export's metadata)."""
    problems = composition_problems(record, purifier, purifier_path, classifier_name)
    for problem in problems:
        warnings.warn(problem, PurifierMismatchWarning, stacklevel=2)
    return problems


def evaluation_problems(classifier_path: str, purifier, purifier_path: str | None = None,
                        purified_classifier_path: str | None = None) -> tuple[list[str],
                                                                               dict | None]:
    """The purifier mismatches of an evaluation that composes the classifier at
    ``classifier_path`` with no purifier (the undefended and baseline rows) and with
    ``purifier`` (the ``comdefend`` rows), and the classifier at ``purified_classifier_path``
    with ``purifier`` (the ``comdefend_train_test`` rows), each also warned
    (``PurifierMismatchWarning``).

    Returns:
      ``(messages, record)``: the messages (empty when everything matches; a clean-trained
      main classifier is the test-time mode, not a mismatch) and the purified classifier's
      record (None without one, or when it records no purifier, which is a mismatch too).
    """
    messages = []
    main_record = read_classifier_purifier(classifier_path)
    if main_record is not None:
        messages += check_composition(main_record, None, None, "--classifier_dir")
        if purifier is not None:
            messages += check_composition(main_record, purifier, purifier_path,
                                          "--classifier_dir")
    record = None
    if purified_classifier_path is not None:
        record = read_classifier_purifier(purified_classifier_path)
        if record is None:
            message = (f"the purified classifier {purified_classifier_path} records no purifier "
                       "(it was trained on clean images): its comdefend_train_test rows are "
                       "another test-time defense")
            warnings.warn(message, PurifierMismatchWarning, stacklevel=2)
            messages.append(message)
        else:
            messages += check_composition(record, purifier, purifier_path,
                                          "the purified classifier")
    return messages, record
