"""Head types: what a reward head learns from, and everything that follows from it: how a data row is read, the
loss, the held-out metrics and the one that sums a head up, moderation labels, and the model card's row.

Every example a head trains on is of one type, and each type has an objective here, found by the example's
class. A new head type is one class in this module plus one entry in OBJECTIVES (tests/test_train_reward.py
trains a model with a third one defined in the test).

An objective scores `columns` texts per example, laid out column by column: for pairs, every chosen reply,
then every rejected one. Its loss and metrics read scores in that layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from keel.core.text import ModelInput
from keel.training.data import Example, PreferencePair, Rating, parse_pair, parse_rating
from keel.training.encoder.scoring import Scorer
from keel.training.evaluation.metrics import pair_metrics, rating_metrics


@dataclass(frozen=True)
class Headline:
    """The held-out metric that sums up a head of this type (it picks the weights to keep), and its direction."""

    name: str
    higher_is_better: bool


class Objective(Protocol):
    columns: int  # texts scored per example
    headline: Headline

    def parse(self, row: dict[str, Any]) -> Any | None:
        """The row as an example of this type, or None when the row is not of this type (ValueError when it is
        one, malformed)."""

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

    def moderation_labels(self, examples: Sequence[Any]) -> tuple[list[ModelInput], list[float]]:
        """Labels (1 = should be flagged) of a head's labelled moderation data of this type."""

    def card_row(self, head: str, metrics: dict[str, Any]) -> str | None:
        """The model card's row for a head's held-out metrics, when it has this type's metrics."""


class BradleyTerry:
    """Preference pairs: the chosen reply should score higher than the rejected one."""

    columns = 2
    headline = Headline("accuracy", higher_is_better=True)

    def parse(self, row: dict[str, Any]) -> PreferencePair | None:
        return parse_pair(row) if "chosen" in row and "rejected" in row else None

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

    moderation_labels = flag_labels

    def card_row(self, head: str, metrics: dict[str, Any]) -> str | None:
        if "accuracy" not in metrics:
            return None
        low, high = metrics["accuracy_ci95"]
        return f"| {head} | {metrics['pairs']} pairs | pairwise accuracy | {metrics['accuracy']:.3f} [{low:.3f}, {high:.3f}] |"


class Regression:
    """Scalar ratings of single texts: the score should match the rating."""

    columns = 1
    headline = Headline("mse", higher_is_better=False)

    def parse(self, row: dict[str, Any]) -> Rating | None:
        return parse_rating(row) if "score" in row else None

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

    def moderation_labels(self, ratings: Sequence[Rating]) -> tuple[list[ModelInput], list[float]]:
        """A score of at least 0.5 is a flag."""
        return self.texts(ratings), [float(r.score >= 0.5) for r in ratings]

    def card_row(self, head: str, metrics: dict[str, Any]) -> str | None:
        if "mse" not in metrics:
            return None
        return (f"| {head} | {metrics['ratings']} ratings | MSE / Pearson r | {metrics['mse']:.3f} / "
                f"{metrics['pearson']:.3f} |")


OBJECTIVES: dict[type, Objective] = {PreferencePair: BradleyTerry(), Rating: Regression()}


def parse_example(row: dict[str, Any]) -> Example:
    """A data row as an example of the first head type that takes it."""
    for objective in OBJECTIVES.values():
        example = objective.parse(row)
        if example is not None:
            return example
    raise ValueError(f"row has neither chosen/rejected nor score, nor the fields of another head type (fields: "
                     f"{sorted(row)}); map columns with the source's `rename`")


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


def flag_examples(examples: Sequence[Example], labelled: bool = False) -> tuple[list[ModelInput], list[float]]:
    """Moderation labels: of labelled moderation data (labelled=True), else stand-ins from preference data
    (rejected replies and below-mean ratings are flagged)."""
    texts: list[ModelInput] = []
    labels: list[float] = []
    for objective, group in by_objective(examples):
        group_texts, group_labels = (objective.moderation_labels if labelled else objective.flag_labels)(group)
        texts += group_texts
        labels += group_labels
    return texts, labels
