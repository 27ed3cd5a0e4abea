"""Head types: what a reward head learns from, and the loss, metrics and stand-in moderation labels that follow.

Every example a head trains on is of one type, and each type has an objective here, found by the example's
class. A new head type is one class in this module plus one entry in OBJECTIVES.

An objective scores `columns` texts per example, laid out column by column: for pairs, every chosen reply,
then every rejected one. Its loss and metrics read scores in that layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from keel_core.text import ModelInput
from training.data import Example, PreferencePair, Rating
from training.evaluate import Scorer, pair_metrics, rating_metrics


class Objective(Protocol):
    columns: int  # texts scored per example

    def texts(self, examples: Sequence[Any]) -> list[ModelInput]:
        """The texts to score, column by column."""

    def loss(self, scores: torch.Tensor, examples: Sequence[Any], margin: float) -> torch.Tensor:
        """The training loss of one head's scores of texts(examples)."""

    def accuracy(self, scores: torch.Tensor) -> float | None:
        """Training accuracy of a batch's scores, where the objective has one."""

    def metrics(self, scores: np.ndarray, examples: Sequence[Any]) -> dict[str, Any]:
        """Held-out metrics of one head's scores of texts(examples)."""

    def flag_labels(self, examples: Sequence[Any]) -> tuple[list[ModelInput], list[float]]:
        """Stand-in moderation labels (1 = should be flagged) when a head has no labelled moderation data."""


class BradleyTerry:
    """Preference pairs: the chosen reply should score higher than the rejected one."""

    columns = 2

    def texts(self, pairs: Sequence[PreferencePair]) -> list[ModelInput]:
        return [p.chosen_input for p in pairs] + [p.rejected_input for p in pairs]

    def loss(self, scores: torch.Tensor, pairs: Sequence[PreferencePair], margin: float) -> torch.Tensor:
        n = len(pairs)
        diff = scores[:n] - scores[n:]  # r_chosen - r_rejected
        margins = torch.tensor([p.margin + margin for p in pairs], device=diff.device, dtype=diff.dtype)
        # Bradley-Terry: L = -log sigma(r_chosen - r_rejected - margin)
        return -F.logsigmoid(diff - margins).mean()

    def accuracy(self, scores: torch.Tensor) -> float | None:
        n = len(scores) // 2
        return float((scores[:n] > scores[n:]).float().mean())

    def metrics(self, scores: np.ndarray, pairs: Sequence[PreferencePair]) -> dict[str, Any]:
        return pair_metrics(scores[: len(pairs)], scores[len(pairs) :], pairs)

    def flag_labels(self, pairs: Sequence[PreferencePair]) -> tuple[list[ModelInput], list[float]]:
        """A rejected reply is what the head should flag; a chosen one is fine."""
        return self.texts(pairs), [0.0] * len(pairs) + [1.0] * len(pairs)


class Regression:
    """Scalar ratings of single texts: the score should match the rating."""

    columns = 1

    def texts(self, ratings: Sequence[Rating]) -> list[ModelInput]:
        return [r.input for r in ratings]

    def loss(self, scores: torch.Tensor, ratings: Sequence[Rating], margin: float) -> torch.Tensor:
        target = torch.tensor([r.score for r in ratings], device=scores.device, dtype=scores.dtype)
        # Regression on human ratings: L = (r(x) - y)^2
        return F.mse_loss(scores, target)

    def accuracy(self, scores: torch.Tensor) -> float | None:
        return None

    def metrics(self, scores: np.ndarray, ratings: Sequence[Rating]) -> dict[str, Any]:
        return rating_metrics(scores, np.array([r.score for r in ratings]))

    def flag_labels(self, ratings: Sequence[Rating]) -> tuple[list[ModelInput], list[float]]:
        """A rating below the mean rating is what the head should flag. (The mean, not the median: with 0/1
        labels the median is one of the labels and would leave one class unflagged or all flagged.)"""
        mean = float(np.mean([r.score for r in ratings]))
        return self.texts(ratings), [float(r.score < mean) for r in ratings]


OBJECTIVES: dict[type, Objective] = {PreferencePair: BradleyTerry(), Rating: Regression()}


def objective_of(examples: Sequence[Example]) -> Objective:
    """The objective of a list of examples of one type (a head's training batch)."""
    return OBJECTIVES[type(examples[0])]


def by_objective(examples: Sequence[Example]) -> list[tuple[Objective, list[Example]]]:
    """Mixed examples grouped by type, in OBJECTIVES' order."""
    return [(objective, [e for e in examples if type(e) is kind]) for kind, objective in OBJECTIVES.items()
            if any(type(e) is kind for e in examples)]


def example_inputs(examples: Sequence[Example]) -> list[ModelInput]:
    """Every text the examples hold, grouped by type, each type column by column."""
    return [text for objective, group in by_objective(examples) for text in objective.texts(group)]


def evaluate_examples(scorer: Scorer, examples: Sequence[Example], head_names: list[str]) -> dict[str, dict]:
    """Metrics of every head on a list of examples (pairs, ratings, or both)."""
    results: dict[str, dict] = {name: {} for name in head_names}
    for objective, group in by_objective(examples):
        scores = scorer(objective.texts(group))
        for h, name in enumerate(head_names):
            results[name].update(objective.metrics(scores[:, h], group))
    return results


def flag_examples(examples: Sequence[Example]) -> tuple[list[ModelInput], list[float]]:
    """Stand-in moderation labels from preference data: rejected replies and below-mean ratings are flagged."""
    texts: list[ModelInput] = []
    labels: list[float] = []
    for objective, group in by_objective(examples):
        group_texts, group_labels = objective.flag_labels(group)
        texts += group_texts
        labels += group_labels
    return texts, labels
