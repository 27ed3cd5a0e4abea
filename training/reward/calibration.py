"""After training: each head's normalisation statistics and its moderation and chat-guard thresholds."""

from __future__ import annotations

import numpy as np

from keel.core.artifact import (
    GuardThreshold,
    HeadStats,
    ModerationThreshold,
)
from keel.core.moderation import category_scores
from keel.core.text import ModelInput
from keel.training.encoder.scoring import Scorer
from keel.training.evaluation.metrics import best_f1_threshold, false_flag_threshold
from keel.training.reward.config import RewardConfig
from keel.training.reward.data import HeadData
from keel.training.reward.objectives import example_inputs, flag_examples


def normalization_and_thresholds(scorer: Scorer, heads: list[HeadData], config: RewardConfig
                                 ) -> tuple[dict[str, HeadStats], dict[str, ModerationThreshold]]:
    """Per head: mean/std of raw scores on its validation data, the /v1/moderations threshold with the best F1
    (None for heads that are not moderation categories) and, given guard data, the chat guard's threshold."""
    normalization, moderation = {}, {}

    def category(texts: list[ModelInput], h: int, stats: HeadStats) -> np.ndarray:
        return category_scores((scorer(texts)[:, h] - stats.mean) / stats.std)

    for h, (head, head_config) in enumerate(zip(heads, config.heads)):
        raw = scorer(example_inputs(head.validation))[:, h]
        stats = normalization[head.name] = HeadStats(mean=float(raw.mean()), std=float(raw.std() or 1.0))
        if not head_config.moderate:
            moderation[head.name] = ModerationThreshold(threshold=None,
                                                        chosen_on="not a moderation category (moderate: false)")
        else:
            if head.moderation:
                texts, labels = flag_examples(head.moderation, labelled=True)
                basis = "labelled moderation data (score >= 0.5 = flag)"
            else:
                texts, labels = flag_examples(head.validation)
                basis = "validation data (rejected responses and below-mean ratings = flag)"
            moderation[head.name] = ModerationThreshold(
                **best_f1_threshold(category(texts, h, stats), np.array(labels)), chosen_on=basis)
        if head.guard:  # the chat guard may use a head /v1/moderations does not
            moderation[head.name].guard = GuardThreshold(
                **false_flag_threshold(category(example_inputs(head.guard), h, stats), head_config.guard_false_flags),
                chosen_on=f"benign replies (at most {head_config.guard_false_flags:.1%} flagged)")
    return normalization, moderation
