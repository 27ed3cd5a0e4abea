"""Moderation results from normalised scores: one rule for /v1/moderations and the chat output guard."""

from __future__ import annotations

from keel_core.moderation import category_scores, flags
from keel_core.runtime import Scored
from service.schemas import ModerationResult


def moderate(scored: Scored, overrides: dict[str, float] | None = None) -> list[ModerationResult]:
    """A category's score is sigma(-z); it is flagged at or above its threshold (the scoring model's, or an
    override). Heads without a threshold (moderate: false) are never flagged."""
    heads = scored.runtime.heads
    thresholds = {**scored.runtime.thresholds, **(overrides or {})}
    scores = category_scores(scored.z)
    flagged = flags(scores, [thresholds[h] for h in heads])
    return [ModerationResult(flagged=bool(row_flags.any()),
                             categories={h: bool(f) for h, f in zip(heads, row_flags)},
                             category_scores={h: float(v) for h, v in zip(heads, row)})
            for row, row_flags in zip(scores, flagged)]
