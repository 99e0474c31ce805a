"""Provenance: weight fingerprints identify weights (not files or noise state), the record a
classifier keeps of its purifier and of its adversarial training, the purify manifest's record,
and the mismatch warnings."""

import json
import os
import warnings

import keras
import numpy as np
import pytest

from comdefend_tf.training import provenance
from comdefend_tf.config import get_config
from comdefend_tf.model import ComDefend, load_comdefend, save_comdefend


@pytest.fixture(scope="module")
def purifier_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("purifier"))
    save_comdefend(ComDefend(get_config("tiny", input_channels=1, inference_noise_std=1.0),
                             seed=0), directory)
    return directory


def test_fingerprint_identifies_the_weights_not_the_file_or_the_noise_state(purifier_dir):
    first = load_comdefend(purifier_dir, seed=1)
    second = load_comdefend(purifier_dir, seed=2)
    fingerprint = provenance.weights_fingerprint(first)
    assert fingerprint.startswith("sha256:") and len(fingerprint) == len("sha256:") + 64
    assert provenance.weights_fingerprint(second) == fingerprint
    # Drawing noise advances the seed generator's state; the fingerprint does not move.
    first(np.random.RandomState(0).rand(2, 8, 8, 1).astype(np.float32))
    assert provenance.weights_fingerprint(first) == fingerprint
    # Other inference settings share the weights: same fingerprint.
    assert provenance.weights_fingerprint(first.with_inference(noise_std=0.0)) == fingerprint
    # One changed value changes it.
    kernel = second.encoder.weights[0]
    kernel.assign(np.asarray(kernel) + np.float32(1e-3) * (np.arange(kernel.shape[-1]) == 0))
    assert provenance.weights_fingerprint(second) != fingerprint
    # A freshly initialised purifier of the same config is another purifier.
    other = ComDefend(get_config("tiny", input_channels=1), seed=5)
    assert provenance.weights_fingerprint(other) != fingerprint


def test_adversarial_record_is_read_from_the_metrics_beside_the_classifier(tmp_path):
    record = {"method": "pgd", "norm": "linf", "eps": 0.3, "steps": 7, "step_size": 0.107,
              "eps_warmup_epochs": 0.0, "eot": 1, "gradient": None, "behind_purifier": False,
              "purifier_fingerprint": None, "pgd_accuracy_per_epoch": [0.5],
              "train_cpu_seconds": 12.0}
    assert provenance.adversarial_record(str(tmp_path)) is None  # no metrics.json
    (tmp_path / "metrics.json").write_text(json.dumps({provenance.ADVERSARIAL_KEY: record,
                                                       "held_out_accuracy": 0.9}))
    assert provenance.adversarial_record(str(tmp_path)) == record
    assert provenance.adversarial_record(str(tmp_path / "classifier.keras")) == record
    assert provenance.read_classifier_purifier(str(tmp_path)) is None
    (tmp_path / "metrics.json").write_text(json.dumps({"held_out_accuracy": 0.9}))
    assert provenance.adversarial_record(str(tmp_path)) is None
    (tmp_path / "metrics.json").write_text(json.dumps({provenance.ADVERSARIAL_KEY: "pgd"}))
    with pytest.raises(ValueError, match="not a JSON object"):
        provenance.adversarial_record(str(tmp_path))
    (tmp_path / "metrics.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        provenance.adversarial_record(str(tmp_path))


def test_record_and_the_classifier_metrics_it_lives_in(purifier_dir, tmp_path):
    purifier = load_comdefend(purifier_dir)
    record = provenance.purifier_record(purifier, purifier_dir)
    assert record["path"] == os.path.abspath(purifier_dir)
    assert record["config"]["inference_noise_std"] == 1.0 and record["purified"] == "on_the_fly"
    assert record["fingerprint"] == provenance.weights_fingerprint(purifier)
    (tmp_path / "metrics.json").write_text(json.dumps({provenance.PURIFIER_KEY: record}))
    assert provenance.read_classifier_purifier(str(tmp_path)) == record
    assert provenance.read_classifier_purifier(str(tmp_path / "classifier.keras")) == record
    (tmp_path / "metrics.json").write_text(json.dumps({"held_out_accuracy": 0.9}))
    assert provenance.read_classifier_purifier(str(tmp_path)) is None
    (tmp_path / "metrics.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        provenance.read_classifier_purifier(str(tmp_path))
    with pytest.raises(ValueError, match="purified must be"):
        provenance.purifier_record(purifier, purifier_dir, purified="sometimes")


def test_mismatches_are_named_and_warned(purifier_dir):
    purifier = load_comdefend(purifier_dir)
    record = provenance.purifier_record(purifier, purifier_dir)
    # The matching composition and a clean-trained classifier behind any purifier: silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert provenance.check_composition(record, load_comdefend(purifier_dir)) == []
        assert provenance.check_composition(None, purifier) == []
        assert provenance.check_composition(None, None) == []
    other = ComDefend(get_config("tiny", input_channels=1), seed=7)
    with pytest.warns(provenance.PurifierMismatchWarning, match="whose weights differ"):
        problems = provenance.check_composition(record, other, "runs/other")
    assert len(problems) == 1 and "runs/other" in problems[0]
    with pytest.warns(provenance.PurifierMismatchWarning, match="without a purifier"):
        provenance.check_composition(record, None)
    with pytest.warns(provenance.PurifierMismatchWarning, match="inference_noise_std 1.0"):
        provenance.check_composition(record, purifier.with_inference(noise_std=0.0))
    unknown = dict(record, fingerprint=None)
    assert "not fingerprinted" in provenance.composition_problems(unknown, purifier)[0]


def test_defense_modes(purifier_dir):
    purifier = load_comdefend(purifier_dir)
    record = provenance.purifier_record(purifier, purifier_dir)
    assert provenance.defense_mode(None, None) == "undefended"
    assert provenance.defense_mode(None, purifier) == "test_time"
    assert provenance.defense_mode(record, purifier) == "train_and_test_time"
    assert provenance.defense_mode(record, None) == "undefended"


def test_purify_manifest_names_the_purifier(purifier_dir, tmp_path):
    records = tmp_path / "purified"
    records.mkdir()
    (records / "manifest.json").write_text(json.dumps({"model": purifier_dir, "purified": 3}))
    found = provenance.find_purify_manifest(f"tfrecord:{records}/purified-*.tfrecord")
    assert found == str(records / "manifest.json")
    assert provenance.find_purify_manifest("folder:" + str(records)) is None
    assert provenance.find_purify_manifest(f"tfrecord:{tmp_path}/*.tfrecord") is None
    record = provenance.manifest_record(str(records))
    assert record["purified"] == "in_advance" and record["manifest"] == found
    assert record["fingerprint"] == provenance.weights_fingerprint(load_comdefend(purifier_dir))
    (records / "manifest.json").write_text(json.dumps({"model": "gs://bucket/export/1"}))
    remote = provenance.manifest_record(found)
    assert remote["path"] == "gs://bucket/export/1" and remote["fingerprint"] is None
    (records / "manifest.json").write_text(json.dumps({"inputs": 3}))
    with pytest.raises(ValueError, match="names no model"):
        provenance.manifest_record(found)
    with pytest.raises(FileNotFoundError, match="no purify manifest"):
        provenance.manifest_record(str(tmp_path / "nowhere"))


def test_an_evaluations_compositions_are_all_checked(purifier_dir, tmp_path):
    purifier = load_comdefend(purifier_dir)
    record = provenance.purifier_record(purifier, purifier_dir)
    clean_dir, purified_dir = tmp_path / "clean", tmp_path / "purified"
    clean_dir.mkdir()
    purified_dir.mkdir()
    (clean_dir / "metrics.json").write_text(json.dumps({"held_out_accuracy": 0.9}))
    (purified_dir / "metrics.json").write_text(json.dumps({provenance.PURIFIER_KEY: record}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert provenance.evaluation_problems(str(clean_dir), purifier, purifier_dir,
                                              str(purified_dir)) == ([], record)
    other = ComDefend(get_config("tiny", input_channels=1), seed=3)
    with pytest.warns(provenance.PurifierMismatchWarning):
        messages, _ = provenance.evaluation_problems(str(clean_dir), other, "other",
                                                     str(purified_dir))
    assert len(messages) == 1 and "the purified classifier" in messages[0]
    # The purified classifier passed as the main one: without a purifier (undefended and
    # baseline rows) is a mismatch, behind its own purifier is not.
    with pytest.warns(provenance.PurifierMismatchWarning, match="without a purifier"):
        messages, _ = provenance.evaluation_problems(str(purified_dir), purifier, purifier_dir)
    assert len(messages) == 1
    with pytest.warns(provenance.PurifierMismatchWarning, match="records no purifier"):
        messages, found = provenance.evaluation_problems(str(clean_dir), purifier, purifier_dir,
                                                         str(clean_dir))
    assert found is None and len(messages) == 1


def test_export_metadata_names_the_mode_and_warns_on_another_purifier(purifier_dir, tmp_path):
    from comdefend_tf.training import classifier as classifiers
    from comdefend_tf.serving import export as serving_export
    from comdefend_tf.serving.settings import ExportSettings

    purifier = load_comdefend(purifier_dir)
    classifier = classifiers.build_classifier((8, 8, 1), 10, seed=0)
    record = provenance.purifier_record(purifier, purifier_dir)
    settings = ExportSettings()
    with warnings.catch_warnings():
        warnings.simplefilter("error", provenance.PurifierMismatchWarning)
        matching = serving_export.export_metadata(purifier, classifier, settings, 1, record)
        clean = serving_export.export_metadata(purifier, classifier, settings, 1, None)
        alone = serving_export.export_metadata(purifier, None, settings, 1, None)
    assert matching["defense_mode"] == "train_and_test_time"
    assert matching["classifier_trained_behind_purifier"] == record
    assert matching["purifier_fingerprint"] == record["fingerprint"]
    assert clean["defense_mode"] == "test_time" and alone["defense_mode"] == "purify_only"
    assert matching["provenance_warnings"] == [] == clean["provenance_warnings"]
    # ComDefend's seed is its noise seed; its initial weights follow Keras' global seed, which
    # earlier tests leave in a state that can reproduce the fixture's weights: set it apart.
    keras.utils.set_random_seed(11)
    other = ComDefend(get_config("tiny", input_channels=1), seed=11)
    assert provenance.weights_fingerprint(other) != record["fingerprint"]
    with pytest.warns(provenance.PurifierMismatchWarning, match="whose weights differ"):
        version_dir = serving_export.export_savedmodel(other, str(tmp_path / "export"), classifier,
                                                       classifier_record=record,
                                                       purifier_path="runs/other")
    with open(os.path.join(version_dir, serving_export.EXPORT_METADATA_FILENAME)) as handle:
        metadata = json.load(handle)
    assert metadata["defense_mode"] == "train_and_test_time"
    assert len(metadata["provenance_warnings"]) == 1
    assert "runs/other" in metadata["provenance_warnings"][0]
