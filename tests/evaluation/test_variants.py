"""Defenses that are another classifier (adversarial training, alone and behind ComDefend) in the
adaptive protocol, their provenance checks, and a LiteRT-like purifier as a defense: its
verification draws follow its ``randomized`` attribute and only the threat models that do not
need ComDefend's forward options attack it."""

import functools
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf.evaluation import adaptive, modes, report, scoring
from comdefend_tf.evaluation import threat_models as threat_models_lib
from comdefend_tf.training import classifier as classifiers
from comdefend_tf.training import provenance
from tests.fixtures import attack_models as attack_fixtures

RECORD = {"method": "pgd", "norm": "linf", "eps": 0.3, "steps": 7, "step_size": 0.1,
          "eps_warmup_epochs": 1, "eot": 1, "gradient": None, "behind_purifier": False,
          "purifier_fingerprint": None, "pgd_accuracy_per_epoch": [0.5],
          "train_cpu_seconds": 12.0}


@functools.lru_cache(maxsize=None)
def other_classifier():
    """The tiny classifier with perturbed weights: a different classifier, same recipe."""
    classifier, _ = attack_fixtures.tiny_classifier()
    other = keras.models.clone_model(classifier)
    other.set_weights([w * 1.05 for w in classifier.get_weights()])
    return other


def small_protocol(**changes):
    settings = dict(eps={"linf": [0.2]}, headline_eps=0.2, steps=2, eot_samples=2,
                    losses=("ce",), threat_models=("oblivious", "bpda_eot", "gradient_free"),
                    defenses=("none", "comdefend"), ablation_steps=(), ablation_eot=(),
                    ablation_restarts=(), square_queries=5, batch_size=64, verify_draws=3)
    settings.update(changes)
    return adaptive.Protocol(**settings)


@pytest.fixture(scope="module")
def adversarial_results():
    classifier, _ = attack_fixtures.tiny_classifier()
    purifier, _ = attack_fixtures.tiny_comdefend()
    images, labels = attack_fixtures.attack_batch()
    variants = [modes.adversarial_variant(other_classifier(), RECORD, False),
                modes.adversarial_variant(other_classifier(),
                                          dict(RECORD, behind_purifier=True), True)]
    results = modes.run_adaptive_variants(adaptive.Models(classifier, purifier), variants,
                                          images[:8], labels[:8], small_protocol())
    return results, images[:8], labels[:8]


def test_adversarial_classifiers_are_defenses_with_their_own_rows(adversarial_results):
    results, images, labels = adversarial_results
    assert list(results["clean"]) == ["none", "adv_training", "comdefend",
                                      "comdefend_adv_training"]
    purifier, _ = attack_fixtures.tiny_comdefend()
    alone = scoring.summarize(scoring.correct_per_draw(
        threat_models_lib.classifier_fn(other_classifier()), images, labels, 1))
    behind = scoring.summarize(scoring.correct_per_draw(
        threat_models_lib.pipeline_fn(other_classifier(), purifier), images, labels, 1))
    # The clean rows are the adversarial classifier's own, not the original's.
    assert results["clean"]["adv_training"]["mean_acc"] == alone["mean_acc"]
    assert results["clean"]["comdefend_adv_training"]["mean_acc"] == behind["mean_acc"]
    worst = {row["defense"]: row for row in results["worst_case"]}
    assert set(worst) == set(results["clean"])
    for label in ("adv_training", "comdefend_adv_training"):
        assert set(worst[label]) == set(worst["comdefend"])
        assert worst[label]["robust_acc_strict"] <= results["clean"][label]["strict_acc"]
    by_defense = {}
    for row in results["rows"]:
        by_defense.setdefault(row["defense"], set()).add((row["threat_model"],
                                                          row["classifier"]))
    # Alone: attacked like the undefended classifier; behind ComDefend: like comdefend.
    assert by_defense["adv_training"] == {("white_box", "adversarial"),
                                          ("gradient_free", "adversarial")}
    assert {t for t, _ in by_defense["comdefend_adv_training"]} == {
        t for t, _ in by_defense["comdefend"]}
    assert {c for _, c in by_defense["comdefend_adv_training"]} == {"adversarial_purified"}
    assert any(c["attack"] == "oblivious/classifier/adv_training"
               for c in results["gradient_checks"])
    variants = results["settings"]["variants"]
    assert variants["adv_training"]["record"]["eps"] == 0.3
    assert variants["comdefend_adv_training"]["classifier_without_purifier"] == alone["mean_acc"]
    assert "modes" not in results["settings"]


def test_report_states_each_adversarial_defense_and_its_provenance(adversarial_results,
                                                                   tmp_path):
    results, _, _ = adversarial_results
    paths = report.write_robustness_report(results, str(tmp_path), {"dataset": "digits"})
    text = paths["text"]
    assert ("`adv_training`: an adversarially trained classifier, no purifier; pgd adversarial "
            "training, linf eps 0.3, 7 steps of 0.1") in text
    assert "| linf | 0.2 | comdefend_adv_training | 8 |" in text
    with open(paths["json"]) as handle:
        payload = json.load(handle)
    assert payload["settings"]["variants"]["comdefend_adv_training"]["record"][
        "behind_purifier"] is True
    with open(paths["plot"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def _save_with_record(folder, record):
    classifiers.save_classifier(other_classifier(), str(folder))
    metrics = {} if record is None else {modes.ADVERSARIAL_KEY: record}
    (folder / provenance.METRICS_FILENAME).write_text(json.dumps(metrics))
    return str(folder)


def test_adversarial_provenance_problems_are_named(tmp_path):
    purifier, purifier_dir = attack_fixtures.tiny_comdefend()
    here = provenance.weights_fingerprint(purifier)
    none_dir = _save_with_record(tmp_path / "plain", None)
    messages, record = modes.adversarial_problems(none_dir, False)
    assert record is None and "records no adversarial training" in messages[0]
    alone_dir = _save_with_record(tmp_path / "alone", RECORD)
    assert modes.adversarial_problems(alone_dir, False) == ([], RECORD)
    messages, _ = modes.adversarial_problems(alone_dir, True, purifier, purifier_dir)
    assert "trained without a purifier but is evaluated behind one" in messages[0]
    behind = dict(RECORD, behind_purifier=True, purifier_fingerprint=here)
    behind_dir = _save_with_record(tmp_path / "behind", behind)
    assert modes.adversarial_problems(behind_dir, True, purifier, purifier_dir) == ([], behind)
    other_dir = _save_with_record(tmp_path / "other",
                                  dict(behind, purifier_fingerprint="sha256:" + "0" * 64))
    messages, _ = modes.adversarial_problems(other_dir, True, purifier, purifier_dir)
    assert "whose weights differ" in messages[0] and here in messages[0]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / provenance.METRICS_FILENAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        modes.adversarial_problems(str(tmp_path / "broken"), False)


def test_a_variant_needs_its_defense_in_the_protocol():
    classifier, _ = attack_fixtures.tiny_classifier()
    images, labels = attack_fixtures.attack_batch()
    with pytest.raises(ValueError, match="comdefend_adv_training needs the 'comdefend'"):
        modes.run_adaptive_variants(
            adaptive.Models(classifier), [modes.adversarial_variant(classifier, None, True)],
            images[:2], labels[:2], small_protocol(defenses=("none",)))


class LiteRTStandIn(keras.layers.Layer):
    """The face of ``LiteRTPurifierDefense``: a forward pass unlike the float model's (here
    the float purifier plus fresh noise, as a quantized file would differ) and the float
    purifier's gradient backward (BPDA)."""

    def __init__(self, float_purifier, randomized=True, **kwargs):
        super().__init__(**kwargs)
        self.float_purifier = float_purifier
        self.randomized = randomized

    def call(self, images):
        images = tf.convert_to_tensor(images, tf.float32)
        purified = self.float_purifier(images)
        deployed = purified
        if self.randomized:
            deployed = tf.clip_by_value(
                purified + tf.random.normal(tf.shape(purified), stddev=0.2), 0.0, 1.0)
        return purified + tf.stop_gradient(deployed - purified)

    def describe(self):
        return "stand-in.tflite (float32)"


def test_a_randomized_litert_purifier_gets_draws_and_only_its_threat_models():
    classifier, _ = attack_fixtures.tiny_classifier()
    purifier, _ = attack_fixtures.tiny_comdefend()  # deterministic: 1 draw
    images, labels = attack_fixtures.attack_batch()
    protocol = small_protocol(defenses=("none", "comdefend", adaptive.LITERT),
                              threat_models=adaptive.THREAT_MODELS[:-2] + ("gradient_free",),
                              temperatures=(10.0,))
    models = adaptive.Models(classifier, purifier,
                             extra={adaptive.LITERT: LiteRTStandIn(purifier)})
    evaluation = adaptive.Evaluation(models, images[:6], labels[:6], protocol)
    assert evaluation.draws(adaptive.LITERT) == protocol.verify_draws
    assert evaluation.attack_draws(adaptive.LITERT) == protocol.eot_samples
    assert evaluation.draws("comdefend") == 1 and evaluation.draws("none") == 1
    litert = {a.threat_model for a in evaluation.cascade(adaptive.LITERT, "linf", 0.2, True)}
    assert litert == {"oblivious", "bpda_eot", "bpda_identity", "gradient_free"}
    comdefend = {a.threat_model for a in evaluation.cascade("comdefend", "linf", 0.2, True)}
    assert {"soft_path", "bpda_smooth"} <= comdefend
    results = evaluation.run()
    worst = {row["defense"]: row for row in results["worst_case"]}
    assert worst[adaptive.LITERT]["verify_draws"] == protocol.verify_draws
    assert worst["comdefend"]["verify_draws"] == 1
    assert results["clean"][adaptive.LITERT]["n"] == 6
    # A deterministic file: one draw, like a noise-free ComDefend.
    models.extra[adaptive.LITERT] = LiteRTStandIn(purifier, randomized=False)
    assert adaptive.Evaluation(models, images[:2], labels[:2], protocol).draws(
        adaptive.LITERT) == 1


def test_the_litert_defense_needs_its_layer():
    classifier, _ = attack_fixtures.tiny_classifier()
    with pytest.raises(ValueError, match="comdefend_litert.*--litert_purifier"):
        adaptive.Evaluation(adaptive.Models(classifier), np.zeros((2, 8, 8, 1), np.float32),
                            np.zeros(2), small_protocol(defenses=("none", adaptive.LITERT)))


def test_one_worst_case_line_per_radius_names_every_defense(adversarial_results):
    results, _, _ = adversarial_results
    lines = modes.worst_case_lines(results)
    assert len(lines) == 1
    worst = {row["defense"]: row for row in results["worst_case"]}
    expected = ", ".join(
        f"{label} {100 * worst[name]['robust_acc_strict']:.1f} % "
        f"[{100 * worst[name]['ci_low']:.1f}, {100 * worst[name]['ci_high']:.1f}]"
        for name, label in (("none", "undefended"), ("adv_training", "adversarial training"),
                            ("comdefend", "ComDefend at test time"),
                            ("comdefend_adv_training", "ComDefend + adversarial training")))
    assert lines[0] == f"Strict worst case, linf eps=0.2 (N = 8): {expected}"


MODEL_METADATA = {"dataset": "tiny", "classifier_dir": "c", "comdefend_dir": "p",
                  "second_classifier_dir": None, "inference_noise_std": 1.0,
                  "purifier_precision": "float32"}


def test_a_reused_main_report_gives_the_merged_report_of_a_full_run(adversarial_results,
                                                                    tmp_path):
    full, images, labels = adversarial_results
    classifier, _ = attack_fixtures.tiny_classifier()
    purifier, _ = attack_fixtures.tiny_comdefend()
    main = adaptive.Evaluation(adaptive.Models(classifier, purifier), images, labels,
                               small_protocol()).run()
    paths = report.write_robustness_report(main, str(tmp_path / "main"),
                                           dict(MODEL_METADATA, cpu_seconds=5.0))
    reused = modes.reusable_main_report(paths["json"], small_protocol(), len(images),
                                        MODEL_METADATA)
    variants = [modes.adversarial_variant(other_classifier(), RECORD, False),
                modes.adversarial_variant(other_classifier(),
                                          dict(RECORD, behind_purifier=True), True)]
    merged = modes.run_adaptive_variants(adaptive.Models(classifier, purifier), variants,
                                         images, labels, small_protocol(), main=reused)
    strict = lambda results: {(row["defense"], row["norm"], row["eps"]):
                              row["robust_acc_strict"] for row in results["worst_case"]}
    # The attacks are seeded per (attack, defense, eps): the same numbers as the full run.
    assert strict(merged) == strict(full)
    assert list(merged["clean"]) == list(full["clean"])
    report.write_robustness_report(merged, str(tmp_path / "merged"),
                                   dict(MODEL_METADATA, cpu_seconds=1.0))


@pytest.mark.parametrize("change, message", [
    (dict(n=7), "scored N = 8 examples, this run N = 7"),
    (dict(protocol=dict(steps=3)), "ran another protocol: steps 2 there, 3 here"),
    (dict(metadata=dict(comdefend_dir="other")), "has comdefend_dir 'p', this run 'other'"),
])
def test_a_main_report_of_other_examples_protocol_or_models_is_refused(adversarial_results,
                                                                       tmp_path, change,
                                                                       message):
    _, images, labels = adversarial_results
    payload = {"n": 8, "rows": [], "settings": adaptive.settings_of(small_protocol()),
               "metadata": MODEL_METADATA}
    path = tmp_path / "robustness_report.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=message):
        modes.reusable_main_report(str(path), small_protocol(**change.get("protocol", {})),
                                   change.get("n", 8),
                                   dict(MODEL_METADATA, **change.get("metadata", {})))
    path.write_text(json.dumps(dict(payload, settings=dict(payload["settings"],
                                                           variants={}))))
    with pytest.raises(ValueError, match="already holds variants"):
        modes.reusable_main_report(str(path), small_protocol(), 8, MODEL_METADATA)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable robustness report"):
        modes.reusable_main_report(str(path), small_protocol(), 8, MODEL_METADATA)
