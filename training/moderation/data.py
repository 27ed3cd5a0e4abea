"""Labelled moderation data: rows of any source read as (text, label per category), with NaN where the source
does not label a category, split into train, validation and test (80/10/10 by hash, or hash folds for
cross-validation)."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from keel.core.artifact import file_sha256
from keel.core.text import Message, ModelInput, parse_transcript, render
from keel.training.data import filtered_rows, read_source, read_sources, split_of
from keel.training.moderation.config import ANY, LabelRule, ModerationConfig, ModerationSource, Surroundings

UNLABELLED = math.nan


@dataclass(frozen=True)
class Labelled:
    input: ModelInput  # ("", text) for a text on its own; (rendered context, reply) for a reply in context
    labels: tuple[float, ...]  # per category: 1, 0, or NaN (not labelled by this source)
    split_key: str
    source: str
    any_of: tuple[int, ...] = ()  # categories of which at least one applies (each unlabelled on its own)


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
    value = row.get(rule.column or "")
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


def words(text: str) -> frozenset[str]:
    return frozenset("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


class SourceReader:
    """Reads one source's rows as Labelled items: its labels (`labels`, `rest`, `any_of`, then `by`; then
    `rest_if_clean`), its context (a column, or a key into `context_file`), and the near copies of `exclude` left
    out."""

    def __init__(self, source: ModerationSource, categories: list[str]):
        self.source = source
        self.categories = categories
        self.contexts = ({str(row.get(source.context_file.key)): str(row.get(source.context_file.text, ""))
                          for _, row in filtered_rows(source.context_file)} if source.context_file else {})
        self.excluded = [(words(str(row.get(near.text, ""))), near.jaccard)
                         for near in source.exclude for _, row in filtered_rows(near)]

    def labels(self, row: dict[str, Any]) -> tuple[tuple[float, ...], tuple[int, ...]] | None:
        """Per category 1, 0 or NaN, and the categories of which at least one applies; None: the row is left
        out (a `by` mapping maps its value to null)."""
        source = self.source
        labels = {c: label_of(source.labels[c], row) if c in source.labels
                  else (UNLABELLED if source.rest is None else float(source.rest)) for c in self.categories}
        group = set(source.any_of)
        for by in source.by:
            value = str(row.get(by.column))
            if value in by.values and by.values[value] is None:
                return None
            for category, label in (by.values.get(value) or {}).items():
                if label == ANY:
                    group.add(category)
                else:
                    labels[category] = UNLABELLED if label is None else float(label)
        if any(labels[c] == 1 for c in group):
            group = set()  # already satisfied
        for category in group:
            labels[category] = UNLABELLED  # which of the group applies is not known
        values = labels.values()
        if source.rest_if_clean is not None and not group and 1 not in values and 0 in values:
            filled = source.clean_categories or self.categories
            labels = {c: float(source.rest_if_clean) if math.isnan(v) and c in filled else v
                      for c, v in labels.items()}
        return (tuple(labels[c] for c in self.categories),
                tuple(i for i, c in enumerate(self.categories) if c in group))

    def near_copy(self, text: str) -> bool:
        mine = words(text)
        return any(len(mine & other) >= jaccard * len(mine | other) for other, jaccard in self.excluded)

    def __call__(self, row: dict[str, Any]) -> Labelled | None:
        source = self.source
        text = row.get(source.text)
        if not isinstance(text, str):
            raise TypeError(f"no text in column {source.text!r} (fields: {sorted(row)})")
        if source.hh_first_turn:
            text = next((m.content for m in parse_transcript(text) if m.role == "user"), "")
        text = text.strip()
        if not text:
            raise ValueError(f"empty text in column {source.text!r}")
        labelled = self.labels(row)
        if labelled is None or self.near_copy(text):
            return None
        labels, any_of = labelled
        if source.context is None:
            return Labelled(("", text), labels, text, source.name, any_of)
        context = row.get(source.context)
        if source.context_file is not None:
            context = self.contexts.get(str(context))
        if not isinstance(context, str) or not context.strip():
            raise ValueError(f"no context in column {source.context!r}")
        return Labelled((render([Message("user", context.strip())]), text), labels, context, source.name, any_of)


def parse_labelled(row: dict[str, Any], source: ModerationSource, categories: list[str]) -> Labelled | None:
    """One row of a source (None: left out by its `by` mapping or its `exclude` list)."""
    return SourceReader(source, categories)(row)


def load_labelled(source: ModerationSource, config: ModerationConfig, role: str,
                  skip_bad_rows: bool = False) -> list[Labelled]:
    """A source's rows in its split (`split`, or the role under cross-validation), sampled by `fraction`."""
    folds = config.cross_validation

    def in_split(item: Labelled | None) -> bool:
        if item is None or _bucket(item.split_key, "sample:") >= source.fraction * 100:
            return False
        if source.folds:
            return fold_split(item.split_key, folds.folds, folds.test_fold) == role
        return source.split == "all" or split_of(item.split_key) == source.split

    whole = ModerationSource(**{**source.__dict__, "split": "all"})  # read_source's own split filter is off
    reader: Callable[[dict[str, Any]], Labelled | None] = SourceReader(source, config.categories)
    rows = read_source(whole, reader, lambda e: e.split_key if e else "", skip_bad_rows, "labelled rows",
                       keep=in_split)
    return [row for row in rows if row is not None]


def load_moderation_data(config: ModerationConfig, skip_bad_rows: bool = False) -> dict[str, list[Labelled]]:
    """Each role's rows; a training source's rows `repeat` times (held-out rows are never repeated), and the
    training texts placed in ordinary surroundings (`surroundings`)."""
    def rows(role: str) -> list[Labelled]:
        return read_sources(getattr(config, role), skip_bad_rows, training=role == "train",
                            load=lambda source, skip: load_labelled(source, config, role, skip))

    data = {role: rows(role) for role in ("train", "validation", "test")}
    if config.surroundings is not None:
        data["train"] += surrounded(data["train"], config.surroundings, len(config.categories))
    return data


def surrounded(items: list[Labelled], surroundings: Surroundings, categories: int) -> list[Labelled]:
    """Copies of a hash `fraction` of the texts judged on their own, each between two pieces of ordinary
    conversation (the file's train split): the one before `chars` characters long, the one after up to its
    lower bound. Labels are kept: harm anywhere in the window is harm, and ordinary text around a harmless one
    is still harmless. This is what lets windows over a long text find harm among ordinary text. Then
    `ordinary` excerpts of the conversation alone, every category 0, so that the conversation itself is not
    taken for harm (without them, 17% of ordinary HH conversations were flagged as illicit)."""
    filler = [text for _, row in filtered_rows(surroundings)
              if isinstance(text := row.get(surroundings.text), str)
              and split_of(next((m.content for m in parse_transcript(text) if m.role == "user"), text)) == "train"]
    if not filler:
        raise ValueError(f"surroundings: no train-split text in column {surroundings.text!r} of {surroundings.path}")
    low, high = surroundings.chars
    out = []
    for item in dict.fromkeys(items):  # once each, however often a source repeats
        if item.input[0] or _bucket(item.split_key, "surroundings:") >= surroundings.fraction * 100:
            continue
        rng = random.Random(item.split_key)
        before, after = (rng.choice(filler).strip() for _ in range(2))
        text = f"{before[-rng.randint(low, high):]}\n\n{item.input[1]}\n\n{after[:rng.randint(0, low)]}".strip()
        out.append(replace(item, input=("", text)))
    harmless = (0.0,) * categories
    rng = random.Random(0)
    for _ in range(surroundings.ordinary):  # excerpts a window long or longer, starting anywhere in a conversation
        conversation = rng.choice(filler).strip()
        start = rng.randrange(max(1, len(conversation) - high))
        excerpt = conversation[start:start + rng.randint(high, 2 * high)].strip()
        out.append(Labelled(("", excerpt), harmless, excerpt, "ordinary-conversation"))
    return out


def label_matrix(items: list[Labelled]) -> np.ndarray:
    """[items, categories] of 1, 0 and NaN."""
    return np.array([item.labels for item in items], dtype=np.float32).reshape(len(items), -1)


def any_of_matrix(items: list[Labelled], categories: int) -> np.ndarray:
    """[items, categories]: 1 where the category is in the item's "at least one of" group."""
    groups = np.zeros((len(items), categories), dtype=np.float32)
    for row, item in enumerate(items):
        groups[row, list(item.any_of)] = 1
    return groups


def any_harm_labels(items: list[Labelled]) -> np.ndarray:
    """Per item: 1 if any category applies (a labelled 1 or an "at least one of" group), 0 if every category is
    labelled 0, NaN otherwise."""
    labels = label_matrix(items)
    positive = (labels == 1).any(axis=1) | np.array([bool(item.any_of) for item in items])
    negative = ~positive & (~np.isnan(labels)).any(axis=1)
    return np.where(positive, 1.0, np.where(negative, 0.0, np.nan)).astype(np.float32)


def data_provenance(config: ModerationConfig) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for role, source in config.sources():
        entry = seen.setdefault(source.path, {"path": source.path, "sha256": file_sha256(source.path), "uses": []})
        entry["uses"].append({"source": source.name, "role": role, "split": "folds" if source.folds else source.split,
                              "labels": sorted(source.labels), "rest": source.rest})
    return list(seen.values())
