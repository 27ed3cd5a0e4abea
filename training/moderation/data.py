"""Labelled moderation data: rows of any source read as (text, label per category), with NaN where the source
does not label a category, split into train, validation and test (80/10/10 by hash, or hash folds for
cross-validation)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from keel.core.text import Message, ModelInput, parse_transcript, render
from keel.training.data import file_sha256, read_source, split_of
from keel.training.moderation.config import LabelRule, ModerationConfig, ModerationSource

UNLABELLED = math.nan


@dataclass(frozen=True)
class Labelled:
    input: ModelInput  # ("", text) for a text on its own; (rendered context, reply) for a reply in context
    labels: tuple[float, ...]  # per category: 1, 0, or NaN (not labelled by this source)
    split_key: str
    source: str


def _bucket(key: str, salt: str = "") -> int:
    normalised = " ".join(key.lower().split())
    return int(hashlib.sha256((salt + normalised).encode()).hexdigest()[:8], 16) % 100


def fold_split(key: str, folds: int, test_fold: int) -> str:
    """Hash folds: test is fold `test_fold`; of the other folds' rows, a hash 15% are validation."""
    bucket = _bucket(key)
    if bucket * folds // 100 == test_fold:
        return "test"
    return "validation" if _bucket(key, "validation:") < 15 else "train"


def label_of(rule: LabelRule, row: dict[str, Any]) -> float:
    if rule.value is not None:
        return float(rule.value)
    value = row.get(rule.column)
    if value is None or value == "":
        return UNLABELLED
    text = str(value).strip()
    if rule.positive or rule.negative:
        return 1.0 if text in rule.positive else 0.0 if text in rule.negative else UNLABELLED
    try:
        return float(float(text) >= 0.5)
    except ValueError:
        raise ValueError(f"column {rule.column!r} holds {value!r}, not a number; give the label's `positive` and "
                         "`negative` values") from None


def parse_labelled(row: dict[str, Any], source: ModerationSource, categories: list[str]) -> Labelled:
    text = row.get(source.text)
    if not isinstance(text, str):
        raise TypeError(f"no text in column {source.text!r} (fields: {sorted(row)})")
    if source.hh_first_turn:
        text = next((m.content for m in parse_transcript(text) if m.role == "user"), "")
    text = text.strip()
    if not text:
        raise ValueError(f"empty text in column {source.text!r}")
    labels = tuple(label_of(source.labels[c], row) if c in source.labels
                   else (UNLABELLED if source.rest is None else float(source.rest)) for c in categories)
    if source.context is None:
        return Labelled(("", text), labels, text, source.name)
    context = row.get(source.context)
    if not isinstance(context, str) or not context.strip():
        raise ValueError(f"no context in column {source.context!r}")
    return Labelled((render([Message("user", context.strip())]), text), labels, context, source.name)


def load_labelled(source: ModerationSource, config: ModerationConfig, role: str,
                  skip_bad_rows: bool = False) -> list[Labelled]:
    """A source's rows in its split (`split`, or the role under cross-validation), sampled by `fraction`."""
    folds = config.cross_validation

    def in_split(item: Labelled) -> bool:
        if _bucket(item.split_key, "sample:") >= source.fraction * 100:
            return False
        if source.folds:
            return fold_split(item.split_key, folds.folds, folds.test_fold) == role
        return source.split == "all" or split_of(item.split_key) == source.split

    whole = ModerationSource(**{**source.__dict__, "split": "all"})  # read_source's own split filter is off
    return read_source(whole, lambda row: parse_labelled(row, source, config.categories), lambda e: e.split_key,
                       skip_bad_rows, "labelled rows", keep=in_split)


def load_moderation_data(config: ModerationConfig, skip_bad_rows: bool = False) -> dict[str, list[Labelled]]:
    """Each role's rows; a training source's rows `repeat` times (held-out rows are never repeated)."""
    return {role: [item for source in getattr(config, role)
                   for item in load_labelled(source, config, role, skip_bad_rows) * (source.repeat if role == "train" else 1)]
            for role in ("train", "validation", "test")}


def label_matrix(items: list[Labelled]) -> np.ndarray:
    """[items, categories] of 1, 0 and NaN."""
    return np.array([item.labels for item in items], dtype=np.float32).reshape(len(items), -1)


def data_provenance(config: ModerationConfig) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for role, source in config.sources():
        entry = seen.setdefault(source.path, {"path": source.path, "sha256": file_sha256(source.path), "uses": []})
        entry["uses"].append({"source": source.name, "role": role, "split": "folds" if source.folds else source.split,
                              "labels": sorted(source.labels), "rest": source.rest})
    return list(seen.values())
