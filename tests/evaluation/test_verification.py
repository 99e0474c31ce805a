"""The adaptive protocol on a randomized toy defense whose failure rates are known: candidates
are verified over many draws, an example is broken when its failure rate is significantly above
zero, and the cascade gives the same worst case as every attack on every example."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf.evaluation import adaptive, cascade, convergence, scoring


@dataclasses.dataclass
class _Config:
    inference_noise_std: float


class NoisyPurifier:
    """Adds one ``N(0, std^2)`` shift per example and call to every pixel: randomized (its
    ``config.inference_noise_std`` > 0), like ComDefend with inference noise."""

    def __init__(self, std, seed=0):
        self.config = _Config(std)
        self.generator = tf.random.Generator.from_seed(seed)

    def __call__(self, images):
        images = tf.convert_to_tensor(images, tf.float32)
        shape = tf.concat([tf.shape(images)[:1], [1, 1, 1]], axis=0)
        return images + self.config.inference_noise_std * self.generator.normal(shape)


class MeanClassifier:
    """Logits ``[scale * (mean(x) - centre), 0, -10, -10]``: class 0 while the mean is high."""

    def __init__(self, scale=20.0, centre=0.3):
        self.scale, self.centre = scale, centre

    def __call__(self, images, training=False):
        mean = tf.reduce_mean(tf.convert_to_tensor(images, tf.float32), axis=[1, 2, 3])
        first = self.scale * (mean - self.centre)
        rest = tf.zeros_like(first)
        return tf.stack([first, rest, rest - 10.0, rest - 10.0], axis=-1)


def constant_images(values, size=2):
    return np.stack([np.full((size, size, 1), v, np.float32) for v in values])


def evaluation(values, attacks, per_attack_rows=False, verify_draws=20, std=0.025, seed=0):
    """An ``adaptive.Evaluation`` of the toy pipeline (base margin noise std = 20 * std) whose
    cascade is ``attacks(evaluation)``: a list of ``CascadeAttack``."""
    protocol = adaptive.Protocol(eps={"linf": [0.7]}, headline_eps=0.7, defenses=["comdefend"],
                                 threat_models=["bpda_eot"], ablation_steps=[], ablation_eot=[],
                                 ablation_restarts=[], per_attack_rows=per_attack_rows,
                                 verify_draws=verify_draws)
    images = constant_images(values)
    result = adaptive.Evaluation(
        adaptive.Models(MeanClassifier(), purifier=NoisyPurifier(std, seed)), images,
        np.zeros(len(values), np.int64), protocol)
    result.cascade = lambda defense, norm, eps, full: attacks(result)
    return result


def shifted(evaluation_, indices, size):
    return np.clip(evaluation_.images[indices] - size, 0.0, 1.0).astype(np.float32)


def test_a_candidate_with_a_known_failure_rate_is_verified_and_counts():
    # Clean base 14, std 0.5: never wrong. The attack's final point is the clean image; its
    # candidate (shifted by 0.675) has base 0.5, one std: failure rate Phi(-1) = 0.16.
    def attacks(evaluation_):
        def run(indices):
            return [evaluation_.images[indices].copy(), shifted(evaluation_, indices, 0.675)]
        return [cascade.CascadeAttack("bpda_eot", "toy", 1, 1, 1, run)]

    results = evaluation([1.0, 1.0, 1.0], attacks).run()
    (worst,) = results["worst_case"]
    assert results["clean"]["comdefend"]["strict_acc"] == 1.0
    # One wrong draw in 20 is a failure: P(missed) = 0.84 ** 20 = 3 %, per example; seeded.
    assert worst["robust_acc_strict"] == 0.0
    assert worst["verify_draws"] == 20
    rates = np.array(worst["failure_rates"])
    assert np.all((rates > 0) & (rates < 0.6))  # about 0.16, not 1: the rate is reported
    assert worst["failed_under"] == ["bpda_eot/toy"] * 3
    (row,) = results["rows"]
    assert row["broken_by_candidates"] == 3
    # Without the candidates (final points only) every example stands.
    only_final = evaluation([1.0, 1.0, 1.0], lambda e: [cascade.CascadeAttack(
        "bpda_eot", "toy", 1, 1, 1, lambda indices: [e.images[indices].copy()])]).run()
    assert only_final["worst_case"][0]["robust_acc_strict"] == 1.0


def test_the_verdict_is_any_wrong_draw_and_the_rate_is_per_example():
    correct = np.ones((20, 3), bool)
    correct[0, 1] = False  # 1 of 20 wrong
    correct[:10, 2] = False  # 10 of 20
    failures = scoring.failure_counts(correct)
    np.testing.assert_array_equal(failures, [0, 1, 10])
    np.testing.assert_array_equal(scoring.significantly_failing(failures, 20),
                                  [False, True, True])
    np.testing.assert_array_equal(scoring.significantly_failing(np.arange(21), 20),
                                  np.arange(21) >= 1)
    # Of several points the one wrong in the most draws counts.
    second = np.ones((20, 3), bool)
    second[:15, 0] = False
    choice, chosen = scoring.strongest_point([correct, second])
    np.testing.assert_array_equal(choice, [1, 0, 0])
    np.testing.assert_array_equal(chosen[:, 0], second[:, 0])


def _ladder(evaluation_):
    # Bases (std 0.5): clean 14, 8.1, 5.1, 2.1 (v = 1, 0.705, 0.555, 0.405); shifts 3, 6, 9.
    # Each (example, attack) is either never wrong (base >= 2: 4 std) or almost always
    # (base <= -0.75: 1.5 std, wrong in ~93% of draws), so both senses are exact.
    return [cascade.CascadeAttack(
        "bpda_eot", f"shift-{size}", 1, 1, 1,
        lambda indices, size=size: [shifted(evaluation_, indices, size)])
        for size in (0.15, 0.3, 0.45)]


def test_cascade_equals_every_attack_on_every_example_on_a_randomized_defense():
    values = [1.0, 0.705, 0.555, 0.405, 1.0, 0.705]
    cascaded = evaluation(values, _ladder).run()
    full = evaluation(values, _ladder, per_attack_rows=True, seed=1).run()
    (worst_cascade,), (worst_full,) = cascaded["worst_case"], full["worst_case"]
    assert worst_cascade["robust_examples"] == worst_full["robust_examples"] == [0, 4]
    assert worst_cascade["robust_acc_majority"] == worst_full["robust_acc_majority"]
    assert [row["n"] for row in full["rows"]] == [6, 6, 6]
    assert [row["n"] for row in cascaded["rows"]] == [6, 5, 4]
    assert worst_cascade["broken_first"] == {"bpda_eot/shift-0.15": 1,
                                             "bpda_eot/shift-0.3": 1,
                                             "bpda_eot/shift-0.45": 2}


def test_convergence_verdict_counts_the_last_rungs_changes():
    protocol = adaptive.Protocol(eps={"linf": [0.1]}, headline_eps=0.1, steps=50,
                                 eot_samples=5, ablation_steps=(50, 100, 200),
                                 ablation_eot=(5, 20), ablation_restarts=(1, 3))
    ladders = convergence.rungs(protocol, randomized=True)
    assert ladders == {"steps": [(50, 5, 1), (100, 5, 1), (200, 5, 1)],
                       "eot": [(50, 5, 1), (50, 20, 1)], "restarts": [(50, 5, 1), (50, 5, 3)]}
    assert "eot" not in convergence.rungs(protocol, randomized=False)
    n = 200
    robust = {setting: np.ones(n, bool) for rungs in ladders.values() for setting in rungs}
    robust[(100, 5, 1)][:10] = False  # 50 -> 100 steps changed 10 examples
    robust[(200, 5, 1)][:11] = False  # 100 -> 200 changed 1 (0.5 %): plateaued
    robust[(50, 20, 1)][:2] = False  # 5 -> 20 draws changed 2 (1 %): not plateaued
    verdict = convergence.verdict(ladders, robust, adaptive.PLATEAU_SHARE)
    assert verdict["ladders"]["steps"]["last_changed"] == 1
    assert verdict["ladders"]["steps"]["plateaued"]
    assert not verdict["ladders"]["eot"]["plateaued"]
    assert verdict["ladders"]["restarts"]["plateaued"]
    assert not verdict["plateaued"]
    robust[(50, 20, 1)][:2] = True
    assert convergence.verdict(ladders, robust, adaptive.PLATEAU_SHARE)["plateaued"]


def test_verification_settings_are_checked():
    with pytest.raises(ValueError, match="verify_draws"):
        adaptive.Protocol(eps={"linf": [0.1]}, headline_eps=0.1, verify_draws=0)
    with pytest.raises(ValueError, match="temperatures"):
        adaptive.Protocol(eps={"linf": [0.1]}, headline_eps=0.1, temperatures=(10, 0))
    with pytest.raises(ValueError, match="restarts"):
        adaptive.Protocol(eps={"linf": [0.1]}, headline_eps=0.1, ablation_restarts=(0,))
