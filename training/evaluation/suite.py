"""`keel eval suite reward|policy`: one or two models measured on the public safety, bias and truthfulness sets
(training/evaluation/sets.py), written as report.json and a self-contained report.html with PNG charts.

The suites themselves are training/reward_suite.py and training/policy_suite.py, over the cache in
training/evaluation/cache.py; this module runs a chosen list of sets for each model and reports what is missing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from keel.training.evaluation.sets import (
    EvalSet,
    MissingData,
    load_set,
)

log = logging.getLogger(__name__)


def labels_for(names: Sequence[str]) -> list[str]:
    """Short, distinct labels for the compared models (directory names, numbered when they clash)."""
    base = [Path(n.rstrip("/")).name or n for n in names]
    return [b if base.count(b) == 1 else f"{b} ({i + 1})" for i, b in enumerate(base)]


def run_sets(sets: Sequence[EvalSet], labels: list[str], measure: Callable[[EvalSet, list[Any], str], dict[str, Any]],
             data: Path, external: Path | None, limit: int | None, desc: str, progress: bool) -> dict[str, Any]:
    """Load each set and measure every model on it; a set whose files are absent is recorded as skipped."""
    results: dict[str, Any] = {}
    for eval_set in tqdm(sets, desc=desc, unit="set", disable=not progress):
        entry: dict[str, Any] = {"kind": eval_set.kind, "about": eval_set.about, "models": {}}
        results[eval_set.name] = entry
        try:
            items = load_set(eval_set, data, external, limit)
        except MissingData as error:
            entry["skipped"] = str(error)
            log.warning("skipping %s: %s", eval_set.name, error)
            continue
        entry["items"] = len(items)
        began = time.perf_counter()
        for label in labels:
            entry["models"][label] = measure(eval_set, items, label)
        entry["seconds"] = round(time.perf_counter() - began, 2)
    return results


def grouped(categories: Sequence[str], values: dict[str, np.ndarray], metric: Callable[..., dict[str, Any]]
            ) -> dict[str, dict[str, Any]]:
    """metric(**values restricted to each category), by category."""
    labels = np.array(categories)
    return {c: metric(**{k: v[labels == c] for k, v in values.items()}) for c in sorted(set(labels.tolist()))}
