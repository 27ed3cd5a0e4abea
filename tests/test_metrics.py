import numpy as np
import pytest

from keel.core.moderation import category_scores
from keel.training.data import PreferencePair
from keel.training.evaluation.metrics import (
    best_f1_threshold,
    expected_calibration_error,
    false_flag_threshold,
    pair_metrics,
    wilson_interval,
)


def test_ece_by_hand():
    # Bin [0.2,0.3): p=0.25 twice, labels 1,0 -> |0.5-0.25| ; bin [0.9,1]: p=0.95, label 1 -> |1-0.95|
    p = np.array([0.25, 0.25, 0.95])
    y = np.array([1.0, 0.0, 1.0])
    assert expected_calibration_error(p, y) == pytest.approx(2 / 3 * 0.25 + 1 / 3 * 0.05)
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == pytest.approx(0.0)


def test_pair_metrics_accuracy_ties_and_shorter_baseline():
    pairs = [PreferencePair((), "short", "much longer"), PreferencePair((), "a longer reply", "tiny"),
             PreferencePair((), "same", "same")]
    metrics = pair_metrics(np.array([1.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.5]), pairs)
    assert metrics["accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert metrics["shorter_wins_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert metrics["pairs"] == 3
    low, high = metrics["accuracy_ci95"]
    assert low < metrics["accuracy"] < high


def test_wilson_interval_by_hand():
    # 5 of 10: centre (0.5 + 1.96^2/20) / (1 + 1.96^2/10) = 0.5; half-width 1.96/1.38416 * sqrt(0.025 + 0.009604)
    assert wilson_interval(0.5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    # 0 of 20: the interval still has width (a normal approximation would give [0, 0]).
    assert wilson_interval(0.0, 20) == pytest.approx([0.0, 0.1611], abs=1e-4)
    # The default model's harmless test split: 238 pairs at 0.626 cannot tell 0.60 from 0.66.
    low, high = wilson_interval(0.626, 238)
    assert low < 0.60 and high > 0.66
    assert wilson_interval(0.7, 0) == [0.0, 1.0]


def test_best_f1_threshold_separates_and_flags_ties():
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.1])
    labels = np.array([1, 1, 0, 0, 0])
    best = best_f1_threshold(scores, labels)
    # Cutting at 0.8 flags both 0.8s: precision 2/3, recall 1 -> F1 0.8; at 0.9: F1 2/3.
    assert best["threshold"] == 0.8 and best["f1"] == pytest.approx(0.8)


def test_false_flag_threshold_flags_at_most_the_rate():
    scores = np.array([0.95, 0.9, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    # 20% of 10 may be flagged: cut halfway between the 2nd (0.9, flagged) and the 3rd (0.7, passed).
    assert false_flag_threshold(scores, 0.2) == {"threshold": pytest.approx(0.8), "false_flags": 0.2, "examples": 10}
    none = false_flag_threshold(scores, 0.0)
    assert none["threshold"] > 0.95 and none["false_flags"] == 0.0  # just above the highest
    # Ties cannot be split: 0.9 x3 with 2 allowed flags none of them, only what lies above.
    tied = false_flag_threshold(np.array([0.99, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]), 0.2)
    assert tied["threshold"] == pytest.approx(0.945) and tied["false_flags"] == 0.1
    everything_tied = false_flag_threshold(np.full(4, 0.7), 0.5)
    assert everything_tied["threshold"] > 0.7 and everything_tied["false_flags"] == 0.0


def test_category_scores_rise_as_reward_falls():
    scores = category_scores(np.array([-2.0, 0.0, 2.0]))
    assert scores[1] == pytest.approx(0.5) and scores[0] > 0.5 > scores[2]


def test_rating_heads_flag_below_mean_ratings_even_with_binary_labels():
    from keel.training.data import Rating
    from keel.training.reward.objectives import flag_examples

    ratings = [Rating(("", f"t{i}"), score, f"t{i}") for i, score in enumerate([0, 0, 0, 1, 1])]
    _, labels = flag_examples(ratings)
    assert labels == [1.0, 1.0, 1.0, 0.0, 0.0]  # the median (0) would have flagged none of them
