"""Scoring of a randomized defense: Wilson intervals, draws, majority vote, worst case."""

import numpy as np
import pytest

from comdefend_tf import scoring


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


def test_summarize_mean_and_majority_vote():
    # 3 draws x 4 examples: right 3/3, 2/3, 1/3, 0/3 times.
    correct = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
    summary = scoring.summarize(correct)
    assert summary["n"] == 4 and summary["draws"] == 3
    assert summary["mean_acc"] == pytest.approx(6 / 12)
    assert summary["majority_acc"] == pytest.approx(2 / 4)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx(
        scoring.wilson_interval(2, 4))
    # An even number of draws: a 1-1 tie counts as wrong (not robust).
    assert scoring.robust_by_majority(np.array([[1, 1], [0, 1]], bool)).tolist() == [False, True]


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
        "oblivious/apgd-ce": np.array([1, 1, 1, 1, 0, 1], bool),
        "bpda_eot/apgd-ce": np.array([1, 0, 1, 1, 0, 1], bool),
        "gradient_free/square": np.array([1, 1, 0, 1, 0, 1], bool),
    }
    worst = scoring.worst_case(survived)
    # Robust only if it survives every attack: examples 0, 3 and 5.
    assert worst["robust"].tolist() == [True, False, False, True, False, True]
    assert worst["acc"] == pytest.approx(0.5)
    assert worst["n"] == 6
    # Example 1 is broken only by BPDA, example 2 only by Square; example 4 by all of them.
    assert worst["decisive"] == {"oblivious/apgd-ce": 0, "bpda_eot/apgd-ce": 1,
                                 "gradient_free/square": 1}
    assert worst["acc"] <= min(v.mean() for v in survived.values())


def test_worst_case_rejects_mismatched_entries():
    with pytest.raises(ValueError, match="one length"):
        scoring.worst_case({"a": np.ones(3, bool), "b": np.ones(4, bool)})
    with pytest.raises(ValueError, match="at least one"):
        scoring.worst_case({})


def test_gradient_check_verdicts():
    assert scoring.gradient_check(0.0, 0)["ok"]
    assert not scoring.gradient_check(0.0, 3)["ok"]
    assert not scoring.gradient_check(0.2, 0)["ok"]
