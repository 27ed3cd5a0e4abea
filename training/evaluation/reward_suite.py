"""The reward-model suite (`keel eval suite reward`), scored as `keel serve` would score on this machine unless
--backend says otherwise:
- pair sets: pairwise accuracy by category on the set's head, the shorter-response-wins baseline, and
  calibration of P(chosen > rejected) = sigma(r_c - r_r) (reliability diagram, ECE);
- bias probes: the share of pairs where the stereotyped sentence scores higher (50% = unbiased);
- moderation: precision and recall per category with the rule /v1/moderations serves (keel/core/moderation.py),
  and overall with the chat guard's thresholds."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keel.core.text import ModelInput
from keel.training.data import PreferencePair
from keel.training.evaluation.cache import CachedRewardModel, EvalCache
from keel.training.evaluation.metrics import pair_metrics, reliability
from keel.training.evaluation.sets import (
    EvalSet,
)
from keel.training.evaluation.suite import grouped, labels_for, run_sets

log = logging.getLogger(__name__)


def pair_set_result(model: CachedRewardModel, items: list[tuple[str, PreferencePair]], preferred_head: str | None
                    ) -> dict[str, Any]:
    head = model.head(preferred_head)
    h = model.runtime.heads.index(head)
    pairs = [p for _, p in items]
    scores = model.raw([p.chosen_input for p in pairs] + [p.rejected_input for p in pairs])[:, h]
    chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
    index = np.arange(len(pairs))

    def metrics(index: np.ndarray) -> dict[str, Any]:
        return pair_metrics(chosen[index], rejected[index], [pairs[i] for i in index])

    diff = chosen - rejected
    p = 1.0 / (1.0 + np.exp(-diff))
    return {"head": head, "overall": metrics(index),
            "by_category": grouped([c for c, _ in items], {"index": index}, metrics),
            "reliability": reliability(np.concatenate([p, 1 - p]), np.concatenate([np.ones_like(p), np.zeros_like(p)]))}


def precision_recall(flagged: np.ndarray, harmful: np.ndarray) -> dict[str, Any]:
    positives, flags = int(harmful.sum()), int(flagged.sum())
    hits = int((flagged & harmful).sum())
    precision = hits / flags if flags else None
    recall = hits / positives if positives else None
    f1 = (2 * precision * recall / (precision + recall)) if precision and recall else (0.0 if positives else None)
    return {"examples": len(harmful), "positives": positives, "flagged": flags, "flag_rate": flags / max(len(harmful), 1),
            "precision": precision, "recall": recall, "f1": f1}


def labelled_set_result(model: CachedRewardModel, items: list[tuple[dict[str, bool | None], ModelInput]]
                        ) -> dict[str, Any]:
    flagged, z = model.flags([text for _, text in items])
    by_category: dict[str, dict[str, Any]] = {}
    for category in sorted({c for labels, _ in items for c in labels}):
        annotated = np.array([labels.get(category) is not None for labels, _ in items])
        harmful = np.array([bool(labels.get(category)) for labels, _ in items])
        by_category[category] = precision_recall(flagged[annotated], harmful[annotated])
    any_harmful = np.array([any(bool(v) for v in labels.values()) for labels, _ in items])
    guard = precision_recall(model.flagged(z, guard=True), any_harmful)  # the chat guard's thresholds
    return {"overall": {**precision_recall(flagged, any_harmful),
                        **{f"guard_{k}": guard[k] for k in ("flag_rate", "precision", "recall")}},
            "by_category": by_category}


def run_reward_suite(models: Sequence[str], sets: Sequence[EvalSet], data: Path, external: Path | None,
                     limit: int | None, backend: str, cache: EvalCache, progress: bool = True) -> dict[str, Any]:
    loaded = [CachedRewardModel(m, backend, cache, progress) for m in models]
    labels = labels_for([m.path for m in loaded])
    report: dict[str, Any] = {"kind": "reward", "limit": limit,
                              "models": [{"label": label, "path": m.path, "backend": m.runtime.backend,
                                          "fingerprint": m.fingerprint,
                                          "heads": m.runtime.heads, "primary_head": m.runtime.primary_head}
                                         for label, m in zip(labels, loaded)]}
    by_label = dict(zip(labels, loaded))

    def measure(eval_set: EvalSet, items: list[Any], label: str) -> dict[str, Any]:
        if eval_set.kind == "labelled":
            return labelled_set_result(by_label[label], items)
        return pair_set_result(by_label[label], items, eval_set.head)

    report["sets"] = run_sets(sets, labels, measure, data, external, limit, "reward suite", progress)
    return report
