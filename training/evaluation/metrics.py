"""The metrics Keel reports on scores: pairwise and rating accuracy, average precision, operating thresholds,
calibration (reliability, ECE) and Wilson intervals. Pure numpy: used by training (model selection, thresholds,
model cards), the evaluation suites and the benches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from keel.training.data import PreferencePair

Z_95 = 1.96  # standard normal quantile of a two-sided 95% interval


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict[str, float | None]]:
    """Equal-width probability bins: how many predictions fell in each, their mean probability and the observed
    frequency of the label (a reliability diagram; perfectly calibrated when the two agree)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    return [{"low": float(edges[b]), "high": float(edges[b + 1]), "count": int((which == b).sum()),
             "mean_probability": float(probabilities[which == b].mean()) if (which == b).any() else None,
             "frequency": float(labels[which == b].mean()) if (which == b).any() else None} for b in range(bins)]


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """ECE = sum_b |B_b|/N * |mean(label in b) - mean(p in b)| over equal-width probability bins."""
    error = 0.0
    for b in reliability(probabilities, labels, bins):
        frequency, mean = b["frequency"], b["mean_probability"]
        if b["count"] and frequency is not None and mean is not None:
            error += float(b["count"]) / len(labels) * abs(frequency - mean)
    return error


def wilson_interval(proportion: float, count: int, z: float = Z_95) -> list[float]:
    """95% Wilson score interval of a proportion measured on `count` trials: how far an accuracy on a few hundred
    pairs may sit from the model's accuracy on the whole distribution."""
    if count == 0:
        return [0.0, 1.0]
    scale = 1.0 + z * z / count
    centre = (proportion + z * z / (2 * count)) / scale
    half_width = z / scale * math.sqrt(proportion * (1.0 - proportion) / count + z * z / (4 * count * count))
    return [max(0.0, centre - half_width), min(1.0, centre + half_width)]


def pair_metrics(chosen: np.ndarray, rejected: np.ndarray, pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """Pairwise accuracy (ties count half) with its 95% interval, the shorter-response-wins baseline, and
    calibration of P(chosen > rejected) = sigma(r_c - r_r), measured on both orderings of every pair so labels
    are balanced."""
    diff = chosen - rejected
    accuracy = float(np.mean((diff > 0) + 0.5 * (diff == 0)))
    chosen_len = np.array([len(p.chosen) for p in pairs])
    rejected_len = np.array([len(p.rejected) for p in pairs])
    shorter = float(np.mean((chosen_len < rejected_len) + 0.5 * (chosen_len == rejected_len)))
    p = 1.0 / (1.0 + np.exp(-diff))
    ece = expected_calibration_error(np.concatenate([p, 1 - p]), np.concatenate([np.ones_like(p), np.zeros_like(p)]))
    return {"pairs": len(pairs), "accuracy": accuracy, "accuracy_ci95": wilson_interval(accuracy, len(pairs)),
            "shorter_wins_accuracy": shorter, "ece": ece, "mean_margin": float(diff.mean())}


def rating_metrics(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    defined = len(target) > 1 and target.std() > 0 and predicted.std() > 0
    pearson = float(np.corrcoef(predicted, target)[0, 1]) if defined else float("nan")
    return {"ratings": len(target), "mse": float(np.mean((predicted - target) ** 2)), "pearson": pearson}


def best_f1_threshold(category_scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The flagging threshold on category scores (flag when score >= t) with the best F1 on labelled data."""
    order = np.argsort(-category_scores)
    sorted_scores, sorted_labels = category_scores[order], labels[order]
    true_positives = np.cumsum(sorted_labels)
    flagged = np.arange(1, len(labels) + 1)
    precision = true_positives / flagged
    recall = true_positives / max(labels.sum(), 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    # Only cut between distinct scores, so every text with the threshold's score is flagged.
    distinct = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    best = int(np.argmax(np.where(distinct, f1, -1)))
    return {"threshold": float(sorted_scores[best]), "precision": float(precision[best]),
            "recall": float(recall[best]), "f1": float(f1[best]), "examples": len(labels)}


def false_flag_threshold(category_scores: np.ndarray, rate: float) -> dict[str, Any]:
    """The lowest threshold (flag when score >= t) that flags at most `rate` of texts that should all pass."""
    scores = np.asarray(category_scores, dtype=np.float64)
    passed = np.sort(scores)[::-1][int(rate * len(scores))]  # the highest score that must still pass
    greater = scores[scores > passed]
    threshold = float((passed + greater.min()) / 2 if greater.size else np.nextafter(passed, np.inf))
    return {"threshold": threshold, "false_flags": float(np.mean(scores >= threshold)), "examples": len(scores)}


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision: AP = sum_k P(k) * 1[k-th is positive] / P,
    over texts ranked by score (what scikit-learn's average_precision_score computes, without ties handling)."""
    labels = np.asarray(labels, dtype=np.float64)
    if labels.sum() == 0:
        return float("nan")
    ranked = labels[np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")]
    precision_at_k = np.cumsum(ranked) / np.arange(1, len(ranked) + 1)
    return float((precision_at_k * ranked).sum() / ranked.sum())


def operating_threshold(scores: np.ndarray, labels: np.ndarray, min_precision: float) -> dict[str, Any]:
    """The threshold (flag when score >= t) with the most recall among those whose precision is at least
    min_precision; where none reaches it, the best-F1 threshold. Says which rule chose it."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    true_positives = np.cumsum(sorted_labels)
    precision = true_positives / np.arange(1, len(labels) + 1)
    distinct = np.append(sorted_scores[1:] != sorted_scores[:-1], True)  # cut only between distinct scores
    reaching = np.flatnonzero(distinct & (precision >= min_precision) & (sorted_labels > 0))
    if reaching.size == 0:
        return {**best_f1_threshold(scores, labels), "rule": "best F1"}
    k = int(reaching[-1])  # the lowest such threshold flags the most
    recall = float(true_positives[k] / labels.sum())
    return {"threshold": float(sorted_scores[k]), "precision": float(precision[k]), "recall": recall,
            "f1": 2 * float(precision[k]) * recall / max(float(precision[k]) + recall, 1e-12),
            "examples": len(labels), "rule": f"precision >= {min_precision:g}"}
