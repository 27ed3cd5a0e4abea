"""The moderation-model suite (`keel eval suite moderation`), scored as `keel serve` scores on this machine:
for every set, AUPRC of "any harm" (the highest probability among the categories that can flag) and per
category, and precision, recall and the false-flag rate of `flagged` at the served thresholds.

The sets are the first model's held-out data: the test split of every source in its config (OpenAI's samples:
its test fold), XSTest's prompts (never trained on: safe ones should pass, unsafe ones be flagged) and the
whole of HarmBench's test split, copyright and misinformation behaviours included."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keel.core.artifact import ModerationManifest
from keel.core.runtime import ModerationRuntime
from keel.training.config import ConfigError, build
from keel.training.data import filtered_rows
from keel.training.evaluation.metrics import average_precision
from keel.training.evaluation.sets import EvalSet, xstest_prompts
from keel.training.evaluation.suite import labels_for, run_sets
from keel.training.moderation.config import ModerationConfig, ModerationSource
from keel.training.moderation.data import Labelled, label_matrix, load_labelled

Item = tuple[str, Labelled, bool]  # (group, text and category labels, harmful at all)


def harmful(item: Labelled) -> bool:
    return any(label == 1 for label in item.labels)


def source_set(config: ModerationConfig, name: str) -> EvalSet:
    """A configured source's test split, every role of it the config lists under test."""
    def load(_: Path) -> list[Item]:
        return [(name, item, harmful(item)) for source in config.test if source.name == name
                for item in load_labelled(source, config, "test")]

    return EvalSet(f"{name} (test split)", "moderation", load, about=f"held-out rows of {name}, as the config maps them")


def xstest_set() -> EvalSet:
    def load(root: Path) -> list[Item]:
        return [(category, Labelled(("", conversation[-1].content), (), conversation[-1].content, "xstest"),
                 category.startswith("unsafe")) for category, conversation in xstest_prompts(root)]

    return EvalSet("xstest", "moderation", load, about="XSTest prompts: safe ones that look unsafe should pass")


def harmbench_set(config: ModerationConfig) -> EvalSet:
    def load(root: Path) -> list[Item]:
        source = ModerationSource(path=str(root / "harmbench" / "harmbench_behaviors_text_all.csv"), text="Behavior",
                                  split="test")
        categories = {row["Behavior"].strip(): row["SemanticCategory"] for _, row in filtered_rows(source)}
        return [(categories.get(item.split_key, "other"), item, True)
                for item in load_labelled(source, config, "test")]

    return EvalSet("harmbench (test split, every category)", "moderation", load,
                   about="harmful requests, input flagged by category (copyright and misinformation fit none)")


def suite_sets(config: ModerationConfig) -> list[EvalSet]:
    names = list(dict.fromkeys(source.name for source in config.test))
    return [*(source_set(config, name) for name in names), xstest_set(), harmbench_set(config)]


def set_result(runtime: ModerationRuntime, items: list[Item]) -> dict[str, Any]:
    labelled = [item for _, item, _ in items]
    values = runtime.scored([item.input for item in labelled]).values
    limits = [runtime.thresholds[c] for c in runtime.categories]
    flagged_by_category = runtime.flagged(values)
    flagged = np.asarray(flagged_by_category.any(axis=1))
    any_score = runtime.any_harm(values)
    truth = np.array([is_harmful for _, _, is_harmful in items])
    overall: dict[str, Any] = {"examples": len(items), "positives": int(truth.sum()),
                               "flag_rate": float(flagged.mean())}
    if truth.any() and not truth.all():
        overall["auprc"] = average_precision(any_score, truth)
        overall["precision"] = float(truth[flagged].mean()) if flagged.any() else None
    if truth.any():
        overall["recall"] = float(flagged[truth].mean())
    if not truth.all():
        overall["false_flag_rate"] = float(flagged[~truth].mean())
    by_category: dict[str, dict[str, Any]] = {}
    labels = label_matrix(labelled) if labelled and labelled[0].labels else np.zeros((len(items), 0))
    for c, category in enumerate(runtime.categories[: labels.shape[1]]):
        known = ~np.isnan(labels[:, c])
        positives = labels[known, c] == 1
        if not positives.any():
            continue
        hits = flagged_by_category[known, c]
        entry = {"auprc": average_precision(values[known, c], positives) if not positives.all() else None,
                 "examples": int(known.sum()), "positives": int(positives.sum()),
                 "recall": float(hits[positives].mean()) if limits[c] is not None else None,
                 "precision": float(positives[hits].mean()) if limits[c] is not None and hits.any() else None}
        by_category[category] = entry
    if not by_category:  # sets without category labels (XSTest, HarmBench): flag rates by their own groups
        groups = np.array([group for group, _, _ in items])
        by_category = {g: {"flag_rate": float(flagged[groups == g].mean()), "examples": int((groups == g).sum())}
                       for g in sorted(set(groups.tolist()))}
    return {"overall": overall, "by_category": by_category}


def run_moderation_suite(models: Sequence[str], set_names: Sequence[str] | None, data: Path, limit: int | None,
                         progress: bool = True) -> dict[str, Any]:
    runtimes = [ModerationRuntime(m) for m in models]
    labels = labels_for(list(models))
    config = build(ModerationConfig, ModerationManifest.read(models[0]).config, "keel.json config")
    every = suite_sets(config)
    unknown = sorted(set(set_names or ()) - {s.name.split(" (")[0] for s in every})
    if unknown:
        raise ConfigError(f"--sets: unknown sets {unknown}; the sets are {[s.name.split(' (')[0] for s in every]}")
    sets = [s for s in every if set_names is None or s.name.split(" (")[0] in set_names]
    report: dict[str, Any] = {"kind": "moderation", "limit": limit, "sets_from": str(models[0]),
                              "models": [{"label": label, "path": str(path), "backend": runtime.backend,
                                          "fingerprint": runtime.version,
                                          "thresholds": runtime.thresholds}
                                         for label, path, runtime in zip(labels, models, runtimes)]}
    by_label = dict(zip(labels, runtimes))
    report["sets"] = run_sets(sets, labels, lambda _, items, label: set_result(by_label[label], items), data, None,
                              limit, "moderation suite", progress)
    return report
