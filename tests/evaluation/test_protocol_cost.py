"""What the adaptive protocol spends its work on: APGD-T's threat models, Square's scoring
draws on a randomized defense, and the bfloat16 search copy whose points the deployed purifier
still judges."""

import numpy as np
import pytest

from comdefend_tf.evaluation import adaptive
from comdefend_tf.model import load_comdefend
from comdefend_tf.training import precision
from tests.fixtures import attack_models as attack_fixtures


def _plan(purifier=None, **settings):
    classifier, _ = attack_fixtures.tiny_classifier()
    if purifier is None:
        purifier, _ = attack_fixtures.tiny_comdefend()
    images, labels = attack_fixtures.attack_batch()
    options = dict(eps={"linf": [0.1]}, headline_eps=0.1, defenses=["comdefend"],
                   threat_models=["bpda_eot", "bpda_identity", "bpda_smooth", "gradient_free"],
                   temperatures=(5, 10), ablation_steps=[], ablation_eot=[],
                   ablation_restarts=[])
    options.update(settings)
    protocol = adaptive.Protocol(**options)
    return adaptive.Evaluation(adaptive.Models(classifier, purifier), images[:8], labels[:8],
                               protocol)


def _noisy_purifier():
    _, model_dir = attack_fixtures.tiny_comdefend()
    return load_comdefend(model_dir, inference_noise_std=1.0, seed=3)


def _targeted_labels(plan):
    return [a.label.split("/")[0] for a in plan.cascade("comdefend", "linf", 0.1, True)
            if a.attack == "apgd-t"]


def test_apgd_t_runs_under_bpda_eot_and_the_lowest_temperature_by_default():
    plan = _plan()
    assert plan.protocol.targeted_threat_models == [
        "white_box", "oblivious", "transfer", "bpda_eot", "bpda_smooth(T=5)"]
    assert _targeted_labels(plan) == ["bpda_eot", "bpda_smooth(T=5)"]
    # CE and DLR still run under every threat model and temperature.
    labels = [a.label for a in plan.cascade("comdefend", "linf", 0.1, True)]
    for loss in ("apgd-ce", "apgd-dlr"):
        assert [label for label in labels if label.endswith(loss)] == [
            f"{t}/{loss}" for t in ("bpda_eot", "bpda_identity", "bpda_smooth(T=5)",
                                    "bpda_smooth(T=10)")]


@pytest.mark.parametrize("chosen, expected", [
    (["all"], ["bpda_eot", "bpda_identity", "bpda_smooth(T=5)", "bpda_smooth(T=10)"]),
    (["bpda_smooth"], ["bpda_smooth(T=5)", "bpda_smooth(T=10)"]),
    (["bpda_smooth(T=10.0)", "bpda_identity"], ["bpda_identity", "bpda_smooth(T=10)"]),
    ([], []),
])
def test_targeted_threat_models_choose_where_apgd_t_runs(chosen, expected):
    assert _targeted_labels(_plan(targeted_threat_models=chosen)) == expected


@pytest.mark.parametrize("chosen, message", [
    (["bpda_magic"], "not one of"),
    (["bpda_eot(T=5)"], "only bpda_smooth takes a temperature"),
    (["bpda_smooth(T=7)"], "T=7 is not one of the temperatures"),
    (["bpda_smooth(5)"], "written bpda_smooth"),
])
def test_targeted_threat_models_are_checked_before_any_attack(chosen, message):
    with pytest.raises(ValueError, match=message):
        _plan(targeted_threat_models=chosen)


def test_square_scores_one_draw_and_confirms_over_the_verification_draws(monkeypatch):
    from comdefend_tf.attacks import square as square_lib

    seen = {}

    def fake_square(model, images, labels, eps, **options):
        seen.update(options)
        return square_lib.SquareResult(
            adversarial=images, margin=np.ones(len(images)), broken=np.zeros(len(images), bool),
            queries=np.ones(len(images), np.int64), accepted=np.zeros(len(images), np.int64),
            model_calls=0)

    monkeypatch.setattr(square_lib, "square", fake_square)
    plan = _plan(_noisy_purifier(), verify_draws=7, eot_samples=3)
    square = [a for a in plan.cascade("comdefend", "linf", 0.1, True)
              if a.attack == "square"][0]
    assert square.eot == 1
    square.run(np.arange(4))
    assert seen["eot_draws"] == 1 and seen["confirm_draws"] == 7
    # --square_eot still buys more draws per candidate.
    plan = _plan(_noisy_purifier(), verify_draws=7, eot_samples=3, square_eot=4)
    [a for a in plan.cascade("comdefend", "linf", 0.1, True) if a.attack == "square"][0].run(
        np.arange(4))
    assert seen["eot_draws"] == 4


def test_bfloat16_search_attacks_a_reseeded_copy_and_the_deployed_purifier_judges(
        monkeypatch):
    from comdefend_tf.evaluation import threat_models as threat_models_lib

    pipelines = []  # the defense of every pipeline made (scoring, attacks), in order
    real_logits_fn = threat_models_lib.logits_fn
    monkeypatch.setattr(threat_models_lib, "logits_fn", lambda classifier, defense=None, **kw: (
        pipelines.append(defense), real_logits_fn(classifier, defense, **kw))[1])
    deployed = _noisy_purifier()
    plan = _plan(deployed, search_precision="bfloat16", threat_models=["bpda_eot",
                                                                       "gradient_free"],
                 losses=["ce"], steps=3, eot_samples=2, square_queries=4, verify_draws=4)
    search = plan.search_defense("comdefend")
    assert search is not deployed and plan.defense("comdefend") is deployed
    assert precision.model_precision(search) == "bfloat16"
    assert precision.model_precision(deployed) == "float32"
    assert search.seed != deployed.seed  # never the deployed purifier's draws
    for mine, theirs in zip(search.get_weights(), deployed.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    assert plan.search_defense("comdefend") is search  # made once
    results = plan.run()
    assert adaptive.settings_of(plan.protocol)["search_precision"] == "bfloat16"
    assert {row["threat_model"] for row in results["rows"]} == {"bpda_eot", "gradient_free"}
    # Square queried the copy; the verdicts came from the deployed float32 purifier.
    assert pipelines[0] is deployed  # the clean scoring, before any attack: every verdict
    assert sum(defense is deployed for defense in pipelines) == 1
    assert sum(defense is search for defense in pipelines) == 2  # bpda_eot, Square


def test_float32_search_attacks_the_deployed_purifier_itself():
    deployed = _noisy_purifier()
    assert _plan(deployed).search_defense("comdefend") is deployed


def test_an_unknown_search_precision_is_refused():
    with pytest.raises(ValueError, match="search precision"):
        _plan(search_precision="float16")


@pytest.mark.parametrize("strict, given, expected", [
    ({0.1: 0.8, 0.2: 0.35, 0.3: 0.0}, None, 0.2),  # 0.3 shows nothing: everything broken
    ({0.1: 0.8, 0.2: 0.05, 0.3: 0.0}, None, 0.1),
    ({0.1: 0.05, 0.2: 0.0, 0.3: 0.0}, None, 0.3),  # none informative: the headline
    ({0.1: 0.8, 0.2: 0.35, 0.3: 0.0}, 0.3, 0.3),  # --ablation_eps wins
])
def test_convergence_ladders_run_where_examples_still_stand(strict, given, expected):
    plan = _plan(eps={"linf": [0.1, 0.2, 0.3]}, headline_eps=0.3, ablation_eps=given)
    plan.worst = [{"defense": "comdefend", "norm": "linf", "eps": eps,
                   "robust_acc_strict": value} for eps, value in strict.items()]
    plan.worst.append({"defense": "none", "norm": "linf", "eps": 0.3, "robust_acc_strict": 1.0})
    assert plan.ablation_radius() == expected


def test_the_ablation_runs_and_reports_at_its_radius():
    plan = _plan(eps={"linf": [0.05]}, headline_eps=0.3, threat_models=["bpda_eot"],
                 losses=["ce"], steps=2, eot_samples=1, ablation_steps=(2, 3),
                 ablation_examples=4, verify_draws=2)
    results = plan.run()
    assert results["settings"]["ablation_eps"] is None
    worst = [w for w in results["worst_case"] if w["defense"] == "comdefend"][0]
    expected = 0.05 if worst["robust_acc_strict"] >= adaptive.ABLATION_MIN_ROBUST else 0.3
    assert {row["eps"] for row in results["ablation"]} == {expected}
    from comdefend_tf.evaluation import report

    markdown = report.format_robustness_markdown(results, {})
    assert f"### Convergence at L-inf eps = {expected:g}" in markdown


def test_an_ablation_radius_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="ablation eps"):
        _plan(ablation_eps=1.5)
