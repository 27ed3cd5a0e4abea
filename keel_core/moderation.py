"""The moderation rule, shared by the service (/v1/moderations, the chat guard) and the evaluation suite."""

from __future__ import annotations

import numpy as np


def category_scores(z: np.ndarray) -> np.ndarray:
    """Moderation score of a head from its normalised score z: sigma(-z), near 1 when a text scores far
    below the validation mean, i.e. likely fails the principle."""
    return 1.0 / (1.0 + np.exp(z))


def flags(scores: np.ndarray, thresholds: list[float | None]) -> np.ndarray:
    """[texts, heads] booleans: a category is flagged at or above its threshold; None never flags."""
    limits = np.array([np.inf if t is None else t for t in thresholds], dtype=np.float64)
    return scores >= limits
