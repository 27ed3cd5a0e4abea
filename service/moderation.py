"""Moderation results from normalised scores: one rule for /v1/moderations and the chat output guard."""

from __future__ import annotations

from service.runtime import Scored
from service.schemas import ModerationResult
from training.evaluate import category_scores


def moderate(scored: Scored, overrides: dict[str, float] | None = None) -> list[ModerationResult]:
    """A category's score is sigma(-z); it is flagged at or above its threshold (the scoring model's, or an
    override). Heads without a threshold (moderate: false) are never flagged."""
    heads = scored.runtime.heads
    thresholds = {**scored.runtime.thresholds, **(overrides or {})}
    results = []
    for row in category_scores(scored.z):
        categories = {h: thresholds[h] is not None and bool(row[i] >= thresholds[h]) for i, h in enumerate(heads)}
        results.append(ModerationResult(flagged=any(categories.values()), categories=categories,
                                        category_scores={h: float(v) for h, v in zip(heads, row)}))
    return results
