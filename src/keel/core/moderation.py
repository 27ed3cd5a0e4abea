"""The moderation taxonomy and rule, shared by the service (/v1/moderations, the chat guard), the moderation
trainer and the evaluation suites."""

from __future__ import annotations

import math

import numpy as np

# OpenAI's moderation categories (omni-moderation), in the order its API lists them.
CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)


def probabilities(raw: np.ndarray) -> np.ndarray:
    """A moderation model's category probabilities from its raw outputs (logits): sigma(raw)."""
    out: np.ndarray = 1.0 / (1.0 + np.exp(-raw))
    return out


def category_scores(z: np.ndarray) -> np.ndarray:
    """A reward head's stand-in moderation score from its normalised score z: sigma(-z), near 1 when a text
    scores far below the validation mean (used to evaluate reward heads as filters, not served)."""
    out: np.ndarray = 1.0 / (1.0 + np.exp(z))
    return out


def logit(p: float) -> float:
    """log(p / (1 - p)), with p kept inside [1e-6, 1 - 1e-6] so that 0 and 1 stay finite."""
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def raised(threshold: float, margin: float) -> float:
    """A threshold made stricter by `margin` in log-odds: sigma(logit(t) + margin). The chat guard's operating
    point: the same model and thresholds, a wider margin of evidence before a chat is refused."""
    if margin == 0 or threshold <= 0 or threshold >= 1:
        return threshold
    return 1.0 / (1.0 + math.exp(-(logit(threshold) + margin)))


def flags(scores: np.ndarray, thresholds: list[float | None]) -> np.ndarray:
    """[texts, categories] booleans: a category is flagged at or above its threshold; None never flags."""
    limits = np.array([np.inf if t is None else t for t in thresholds], dtype=np.float64)
    return scores >= limits
