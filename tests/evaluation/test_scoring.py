"""The one scorer: Wilson intervals, draws, mean / majority / strict, worst case, seeds and the
CPU clock."""

import numpy as np
import pytest

from comdefend_tf.evaluation import cpu_time, scoring, seeds


@pytest.mark.parametrize("successes,total,low,high", [
    (50, 100, 0.4038, 0.5962),   # textbook values for p = 0.5, n = 100
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (81, 100, 0.7222, 0.8749),
])
def test_wilson_interval_known_counts(successes, total, low, high):
    got_low, got_high = scoring.wilson_interval(successes, total)
    assert got_low == pytest.approx(low, abs=5e-4)
    assert got_high == pytest.approx(high, abs=5e-4)


def test_wilson_interval_rejects_bad_counts():
    with pytest.raises(ValueError, match="total"):
        scoring.wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        scoring.wilson_interval(11, 10)


def test_strict_majority_and_mean_differ_on_a_constructed_matrix():
    # 3 draws x 5 examples: right 3/3, 2/3, 2/3, 1/3, 0/3 times.
    correct = np.array([[1, 1, 1, 1, 0],
                        [1, 1, 0, 0, 0],
                        [1, 0, 1, 0, 0]], bool)
    summary = scoring.summarize(correct)
    assert summary["n"] == 5 and summary["draws"] == 3
    assert summary["mean_acc"] == pytest.approx(8 / 15)
    # Majority counts examples 0, 1 and 2; strict only example 0.
    assert scoring.robust_by_majority(correct).tolist() == [True, True, True, False, False]
    assert scoring.robust_strictly(correct).tolist() == [True, False, False, False, False]
    assert summary["majority_acc"] == pytest.approx(3 / 5)
    assert summary["strict_acc"] == pytest.approx(1 / 5)
    assert summary["strict_ci"] == pytest.approx(list(scoring.wilson_interval(1, 5)))
    assert summary["majority_ci"] == pytest.approx(list(scoring.wilson_interval(3, 5)))
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx(scoring.wilson_interval(1, 5))
    # An even number of draws: a 1-1 tie is not a majority, and not strict either.
    tie = np.array([[1, 1], [0, 1]], bool)
    assert scoring.robust_by_majority(tie).tolist() == [False, True]
    assert scoring.robust_strictly(tie).tolist() == [False, True]


def test_strict_never_exceeds_majority_per_example():
    generator = np.random.default_rng(0)
    correct = generator.random((5, 200)) < 0.8
    strict = scoring.robust_strictly(correct)
    majority = scoring.robust_by_majority(correct)
    assert not np.any(strict & ~majority)
    assert np.sum(majority & ~strict) > 50  # and they really differ here


def test_correct_per_draw_calls_the_defense_once_per_draw():
    calls = []

    def predict(images):
        calls.append(len(images))
        logits = np.zeros((len(images), 3))
        logits[:, len(calls) % 3] = 1.0  # the prediction changes with every call
        return logits

    images = np.zeros((5, 2, 2, 1), np.float32)
    correct = scoring.correct_per_draw(predict, images, np.full(5, 1), draws=3, batch_size=5)
    assert calls == [5, 5, 5]
    assert correct.shape == (3, 5)
    assert correct.all(axis=1).tolist() == [True, False, False]


def test_worst_case_on_a_hand_made_table():
    survived = {
        "clean": np.array([1, 1, 1, 1, 1, 0], bool),
        "bpda_eot/apgd-ce": np.array([1, 0, 1, 1, 0, 1], bool),
        "gradient_free/square": np.array([1, 1, 0, 1, 0, 1], bool),
    }
    worst = scoring.worst_case(survived)
    assert worst["robust"].tolist() == [True, False, False, True, False, False]
    assert worst["acc"] == pytest.approx(2 / 6)
    # Example 1 only BPDA breaks, example 2 only Square, example 5 only the clean image.
    assert worst["decisive"] == {"clean": 1, "bpda_eot/apgd-ce": 1, "gradient_free/square": 1}


def test_worst_case_rejects_mismatched_entries():
    with pytest.raises(ValueError, match="one length"):
        scoring.worst_case({"a": np.ones(3, bool), "b": np.ones(4, bool)})
    with pytest.raises(ValueError, match="at least one"):
        scoring.worst_case({})


def test_gradient_check_verdicts():
    assert scoring.gradient_check(0.0, 0)["ok"]
    assert not scoring.gradient_check(0.0, 3)["ok"]
    assert not scoring.gradient_check(0.2, 0)["ok"]


def test_seeds_are_stable_and_differ_across_attack_loss_threat_model_eps_and_defense():
    base = ("apgd-ce", "ce", "bpda_eot", "linf", 0.3, "comdefend")
    seed = seeds.attack_seed(0, *base)
    assert seed == seeds.attack_seed(0, *base)
    assert seed == seeds.attack_seed(0, "apgd-ce", "ce", "bpda_eot", "linf",
                                     0.1 + 0.2, "comdefend")  # 0.30000000000000004
    variants = [("apgd-dlr", "dlr", "bpda_eot", "linf", 0.3, "comdefend"),
                ("apgd-t", "t", "bpda_eot", "linf", 0.3, "comdefend"),
                ("apgd-ce", "ce", "bpda_identity", "linf", 0.3, "comdefend"),
                ("apgd-ce", "ce", "soft_path", "linf", 0.3, "comdefend"),
                ("apgd-ce", "ce", "bpda_eot", "l2", 0.3, "comdefend"),
                ("apgd-ce", "ce", "bpda_eot", "linf", 0.2, "comdefend"),
                ("apgd-ce", "ce", "bpda_eot", "linf", 0.3, "jpeg"),
                ("square", None, "gradient_free", "linf", 0.3, "comdefend")]
    every = {seed} | {seeds.attack_seed(0, *variant) for variant in variants}
    assert len(every) == len(variants) + 1
    assert seeds.attack_seed(1, *base) != seed
    assert all(0 <= value < 2 ** 31 for value in every)


def test_cpu_clock_counts_this_process():
    clock = cpu_time.CpuClock()
    total = 0
    for value in range(2_000_000):
        total += value * value
    assert clock.seconds() > 0.01
    assert cpu_time.process_cpu_seconds() >= clock.seconds()
