"""Moderation results from category probabilities: one rule for /v1/moderations and the chat guard."""

from __future__ import annotations

from keel.core.moderation import flags, raised
from keel.core.runtime import ModerationRuntime, Scored
from keel.service.schemas import ModerationResult


def moderate(scored: Scored[ModerationRuntime], deployment: dict[str, float], request: dict[str, float] | None = None,
             margin: float = 0.0) -> list[ModerationResult]:
    """A category is flagged when its probability reaches its threshold: the request's, else the deployment's
    (--moderation-thresholds), else the model's, raised by `margin` in log-odds (the chat guard's
    --guard-margin). A category without any threshold is never flagged."""
    categories = scored.runtime.heads
    thresholds = {**scored.runtime.thresholds, **deployment, **(request or {})}
    limits = [None if (threshold := thresholds[c]) is None else raised(threshold, margin) for c in categories]
    flagged = flags(scored.values, limits)
    text_only = {c: ["text"] for c in categories}
    return [ModerationResult(flagged=bool(row_flags.any()),
                             categories={c: bool(f) for c, f in zip(categories, row_flags)},
                             category_scores={c: float(v) for c, v in zip(categories, row)},
                             category_applied_input_types=text_only)
            for row, row_flags in zip(scored.values, flagged)]
