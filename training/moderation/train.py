"""Train a moderation model: a pretrained encoder with one sigmoid output per category (OpenAI's taxonomy),
trained on labelled harm data whose sources each label only some categories.

Read top to bottom: the masked loss (over each text's windows) -> model -> data -> the shared encoder loop
(keel.training.encoder.fit: checkpointed, resumable, best weights kept) -> thresholds and the guard's margin on
validation -> held-out metrics -> publishing
(keel.training.encoder.publish: ONNX fp32 and int8, keel.json, model card). The model is Keel's RewardModel class
(keel/core/reward_model.py) with categories as its heads, so it serves through the same runtime, batcher and
model store as a reward model.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from keel.core.artifact import CategoryThreshold, ModerationManifest
from keel.core.moderation import flags, logit, probabilities
from keel.core.reward_model import RewardModel, resolve_base_model
from keel.training.config import to_dict
from keel.training.encoder import onnx_export
from keel.training.encoder.fit import Run, Selection, Step, fit
from keel.training.encoder.optim import freeze, load_tokenizer
from keel.training.encoder.publish import Exported, publish
from keel.training.encoder.scoring import Scorer, collate, encode, encode_windows, torch_scorer
from keel.training.evaluation.metrics import average_precision, expected_calibration_error, operating_threshold
from keel.training.moderation.config import GuardRule, ModerationConfig
from keel.training.moderation.data import (
    Labelled,
    any_harm_labels,
    any_of_matrix,
    data_provenance,
    label_matrix,
    load_moderation_data,
)
from keel.training.moderation.model_card import moderation_model_card
from keel.training.runs import start_run

log = logging.getLogger(__name__)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy over the labelled (row, category) cells, plus one term per "at least one of" group.
    NaN marks a category the row's source does not label: it contributes no loss and no gradient. A group G is
    a set of categories of which at least one applies (CatQA's "hate, harassment or violence", a reply that
    complies with a harmful request); with the heads independent, P(at least one) = 1 - prod_G (1 - sigma(s_c)),
    and 1 - sigma(s) = exp(-softplus(s)), so

        L = [ sum_ic m_ic * BCE(s_ic, y_ic) + sum_i -log(1 - exp(-sum_{c in G_i} softplus(s_ic))) ]
            / (sum_ic m_ic + number of groups),   m_ic = 1 where y_ic is labelled, else 0
    """
    groups = torch.zeros_like(logits) if groups is None else groups
    mask = ~torch.isnan(labels)
    cells = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(labels, nan=0.0), reduction="none")
    has_group = groups.sum(dim=1) > 0
    none_apply = (F.softplus(logits) * groups).sum(dim=1)  # -log P(no category of the group applies)
    group_losses = -torch.log((-torch.expm1(-none_apply[has_group])).clamp(min=1e-7))
    return ((cells * mask).sum() + group_losses.sum()) / (mask.sum() + has_group.sum()).clamp(min=1)


def max_over_windows(window_logits: torch.Tensor, owners: torch.Tensor, texts: int) -> torch.Tensor:
    """[texts, categories] logits of texts read in windows, as served (keel.core.runtime): a text's logit for
    category c is its highest over its windows W_i,

        s_ic = max_{w in W_i} s_wc

    so a harmful text trains the window that looks most harmful (harm may sit in one window of many), and a
    harmless one pushes down its highest window, whichever that is at each step. A text that fits is one window:
    s_ic is its own logit."""
    index = owners.unsqueeze(1).expand_as(window_logits)
    start = torch.full((texts, window_logits.shape[1]), -torch.inf, device=window_logits.device)
    return start.scatter_reduce(0, index, window_logits, reduce="amax")


def category_probabilities(scorer: Scorer, items: list[Labelled]) -> np.ndarray:
    """[items, categories] sigmoid probabilities."""
    return probabilities(scorer([item.input for item in items])) if items else np.zeros((0, 0))


def category_auprc(scores: np.ndarray, labels: np.ndarray, categories: list[str], min_positives: int) -> dict[str, float]:
    """AUPRC of every category with at least min_positives labelled positives among the labelled rows."""
    out = {}
    for c, name in enumerate(categories):
        labelled = ~np.isnan(labels[:, c])
        if labels[labelled, c].sum() >= min_positives:
            out[name] = average_precision(scores[labelled, c], labels[labelled, c])
    return out


def validation_score(scorer: Scorer, items: list[Labelled], config: ModerationConfig) -> float:
    """What picks the weights to keep: the mean validation AUPRC over the categories with enough positives and
    harm at all (any category; the highest probability), which "at least one of" rows label."""
    scores = category_probabilities(scorer, items)
    auprc = list(category_auprc(scores, label_matrix(items), config.categories, config.min_positives).values())
    harmful = any_harm_labels(items)
    known = ~np.isnan(harmful)
    if harmful[known].sum() >= config.min_positives and not harmful[known].all():
        auprc.append(average_precision(scores[known].max(axis=1), harmful[known]))
    return float(np.mean(auprc)) if auprc else float("nan")


def train_moderation(config: ModerationConfig, output: Path, resume: bool = False, overwrite: bool = False,
                     skip_bad_rows: bool = False, progress: bool = True) -> dict[str, Any]:
    t = config.training
    output, work, accelerator = start_run(output, resume, overwrite, t.precision, t.seed)

    # ---- model: a head per category, each starting at the prior probability -------------------------------
    model = RewardModel.from_base(config.base_model, config.categories, problem_type="multi_label_classification")
    torch.nn.init.constant_(model.heads.bias, math.log(config.prior / (1 - config.prior)))
    freeze(model, t)

    # ---- data -----------------------------------------------------------------------------------------------
    data = load_moderation_data(config, skip_bad_rows)
    train, validation = data["train"], data["validation"]
    labels = torch.from_numpy(label_matrix(train))
    groups = torch.from_numpy(any_of_matrix(train, len(config.categories)))
    tokenizer = load_tokenizer(config.base_model, config.max_length, config.truncation_side)
    inputs = [item.input for item in train]
    if config.train_in_windows:
        windows, owners = encode_windows(tokenizer, inputs, config.max_length)
    else:  # each text's first max_length tokens: one window per text
        windows, owners = encode(tokenizer, inputs, config.max_length), list(range(len(inputs)))
    windows_of: list[list[int]] = [[] for _ in train]
    for window, owner in enumerate(owners):
        windows_of[owner].append(window)

    # ---- training: one group of items, each read in its windows, the masked loss -----------------------------
    def step_loss(training: torch.nn.Module, group: int, indices: list[int]) -> Step:
        batch = collate(tokenizer, [windows[w] for i in indices for w in windows_of[i]])
        window_logits = training(**{k: v.to(accelerator.device) for k, v in batch.items()}).logits.float()
        text_of_window = torch.tensor([k for k, i in enumerate(indices) for _ in windows_of[i]],
                                      device=window_logits.device)
        logits = max_over_windows(window_logits, text_of_window, len(indices))
        return Step(masked_bce(logits, labels[indices].to(logits.device), groups[indices].to(logits.device)))

    scorer = torch_scorer(model, tokenizer, config.max_length, t.eval_batch_size, windowed=True)
    tokens_of = [sum(len(windows[w]["input_ids"]) for w in text) for text in windows_of]  # for length grouping
    fitted = fit(model, [tokens_of], step_loss,
                 lambda: {"val_mean_auprc": validation_score(scorer, validation, config)},
                 Selection("val_mean_auprc"), t, Run(work, accelerator, resume), "train moderation", progress)

    manifest: dict[str, Any] = {}
    if accelerator.is_main_process:
        manifest = publish_moderation_model(config, fitted.model, tokenizer, data, output, overwrite,
                                            work / "metrics.jsonl",
                                            {"train_seconds": round(fitted.train_seconds, 1), "steps": fitted.steps,
                                             "kept_step": fitted.kept_step, "precision": accelerator.mixed_precision,
                                             "train_examples": len(train)}).to_json()
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return manifest


# ---- thresholds and held-out metrics --------------------------------------------------------------------------

def choose_thresholds(scores: np.ndarray, labels: np.ndarray, config: ModerationConfig, trained: np.ndarray,
                      any_harm: np.ndarray | None = None) -> dict[str, CategoryThreshold]:
    """Per category, on validation, a threshold that a dozen positives cannot push to 0.99:

    1. a shared any-harm threshold t*: over the rows known to be harmful or not (`any_harm`: 1, 0, NaN; by
       default, any labelled category 1 against all labelled 0), score = the highest probability among the
       trained categories, the lowest threshold with precision >= min_precision (else the best F1);
    2. each category's own threshold t_c by the same rule on its labelled rows, if it has min_positives;
    3. the two averaged in log-odds by the category's evidence, n_c validation positives:

           logit t = w logit t_c + (1 - w) logit t*,   w = n_c / (n_c + threshold_shrinkage)

    A category without positive training labels is scored, never flagged (its rule says so)."""
    flaggable = np.flatnonzero(trained)
    if any_harm is None:
        positive = np.nan_to_num(labels, nan=0.0).max(axis=1) == 1
        any_harm = np.where(positive, 1.0, np.where((~np.isnan(labels)).any(axis=1), 0.0, np.nan))
    known = ~np.isnan(any_harm)
    shared = None
    if flaggable.size and any_harm[known].sum() >= config.min_positives:
        shared = operating_threshold(scores[known][:, flaggable].max(axis=1), any_harm[known], config.min_precision)
    out = {}
    for c, name in enumerate(config.categories):
        labelled = ~np.isnan(labels[:, c])
        positives = int(labels[labelled, c].sum())
        counts = {"positives": positives, "examples": int(labelled.sum())}
        if not trained[c]:
            out[name] = CategoryThreshold(threshold=None, rule="no positive training labels: scored, never flagged")
            continue
        own = (operating_threshold(scores[labelled, c], labels[labelled, c], config.min_precision)
               if positives >= config.min_positives and positives < labelled.sum() else None)
        if shared is None and own is None:
            out[name] = CategoryThreshold(threshold=None, **counts,
                                          rule=f"{positives} validation positives (< {config.min_positives}) and "
                                               "no shared any-harm threshold: scored, never flagged")
            continue
        if own is None and shared is not None:
            threshold = shared["threshold"]
            rule = f"shared any-harm threshold ({shared['rule']}); {positives} validation positives"
        elif own is not None and shared is None:
            threshold = own["threshold"]
            rule = f"own threshold ({own['rule']}); no shared threshold"
        elif own is not None and shared is not None:
            weight = positives / (positives + config.threshold_shrinkage)
            threshold = 1 / (1 + math.exp(-(weight * logit(own["threshold"])
                                            + (1 - weight) * logit(shared["threshold"]))))
            rule = (f"own ({own['rule']}, {own['threshold']:.3f}) and shared any-harm ({shared['threshold']:.3f}) "
                    f"thresholds in log-odds, weight {weight:.2f} on own ({positives} validation positives)")
        hits = scores[labelled, c] >= threshold
        truth = labels[labelled, c] == 1
        precision = float((hits & truth).sum() / max(hits.sum(), 1))
        recall = float((hits & truth).sum() / max(truth.sum(), 1))
        out[name] = CategoryThreshold(threshold=float(threshold), rule=rule, precision=precision, recall=recall,
                                      f1=2 * precision * recall / max(precision + recall, 1e-12), **counts)
    return out


def margins_over_thresholds(scores: np.ndarray, categories: list[str], thresholds: dict[str, CategoryThreshold]
                            ) -> np.ndarray:
    """[texts]: each text's largest margin, in log-odds, by which a category's probability passes its threshold
    (negative: flagged by none; -inf when no category can flag). A guard with margin m flags where it is >= m."""
    limits = [(c, t) for c, name in enumerate(categories) if (t := thresholds[name].threshold) is not None]
    if not limits:
        return np.full(len(scores), -np.inf)
    probabilities = np.clip(scores[:, [c for c, _ in limits]].astype(np.float64), 1e-6, 1 - 1e-6)  # as logit()
    log_odds = np.log(probabilities) - np.log1p(-probabilities)
    return (log_odds - np.array([logit(t) for _, t in limits])).max(axis=1)


def choose_guard_margin(margins: np.ndarray, items: list[Labelled], rule: GuardRule) -> tuple[float | None, str]:
    """The widest margin on the rule's grid at which at least `recall` of the harmful validation rows of the
    request sources (pooled) and of the reply sources stay flagged; None when either has no harmful rows."""
    harmful = any_harm_labels(items) == 1
    kept = {}
    for kind, names in (("requests", rule.requests), ("replies", rule.replies)):
        rows = harmful & np.array([item.source in names for item in items], dtype=bool)
        if not rows.any():
            return None, f"no harmful validation rows among the guard's {kind} ({', '.join(names) or 'none named'})"
        kept[kind] = {margin: float((margins[rows] >= margin).mean()) for margin in rule.grid}
    passing = [m for m in rule.grid if min(kept["requests"][m], kept["replies"][m]) >= rule.recall]
    chosen = max(passing, default=min(rule.grid))
    shares = (f"{kept['requests'][chosen]:.3f} of harmful validation requests and {kept['replies'][chosen]:.3f} "
              "of replies")
    if not passing:
        return chosen, f"no margin of {rule.grid} keeps {rule.recall} flagged; the smallest: {shares} at {chosen}"
    return chosen, f"the widest margin of {rule.grid} keeping >= {rule.recall} flagged: {shares} at {chosen}"


def held_out_metrics(scores: np.ndarray, items: list[Labelled], config: ModerationConfig,
                     thresholds: dict[str, CategoryThreshold]) -> dict[str, Any]:
    """Per category: AUPRC, calibration error (ECE), and precision and recall at the served threshold. Per
    source: how many texts are flagged, and the any-category AUPRC (positive = any category applies, a labelled
    1 or an "at least one of" group; score = the highest category probability) where the source has both."""
    labels = label_matrix(items)
    limits = [thresholds[c].threshold for c in config.categories]
    flagged = flags(scores, limits)
    per_category = {}
    for c, name in enumerate(config.categories):
        labelled = ~np.isnan(labels[:, c])
        positives = labels[labelled, c] == 1
        entry: dict[str, Any] = {"examples": int(labelled.sum()), "positives": int(positives.sum())}
        if positives.any() and not positives.all():
            entry["auprc"] = average_precision(scores[labelled, c], positives)
            entry["ece"] = expected_calibration_error(scores[labelled, c], positives.astype(np.float64))
        if limits[c] is not None and positives.any():
            hits = flagged[labelled, c]
            entry["precision"] = float((hits & positives).sum() / max(hits.sum(), 1))
            entry["recall"] = float((hits & positives).sum() / positives.sum())
        per_category[name] = entry
    per_source = {}
    harmful = any_harm_labels(items)
    for source in dict.fromkeys(item.source for item in items):
        rows = np.array([item.source == source for item in items])
        any_harm = harmful[rows] == 1
        entry = {"examples": int(rows.sum()), "positives": int(any_harm.sum()),
                 "flagged": float(flagged[rows].any(axis=1).mean())}
        if any_harm.any() and not any_harm.all():
            entry["any_auprc"] = average_precision(scores[rows].max(axis=1), any_harm)
            entry["flagged_positives"] = float(flagged[rows][any_harm].any(axis=1).mean())
            entry["flagged_negatives"] = float(flagged[rows][~any_harm].any(axis=1).mean())
        per_source[source] = entry
    return {"categories": per_category, "sources": per_source}


def publish_moderation_model(config: ModerationConfig, model: RewardModel, tokenizer: Any,
                             data: dict[str, list[Labelled]], output: Path, overwrite: bool, metrics_path: Path,
                             run: dict[str, Any]) -> ModerationManifest:
    """Export ONNX, choose thresholds on validation, measure on test, and publish the model directory."""

    def describe(exported: Exported) -> ModerationManifest:
        train = data["train"]
        trained = (label_matrix(train) == 1).any(axis=0) | (any_of_matrix(train, len(config.categories)) == 1).any(axis=0)
        validation_scores = category_probabilities(exported.scorer, data["validation"])
        thresholds = choose_thresholds(validation_scores, label_matrix(data["validation"]), config, trained,
                                       any_harm_labels(data["validation"]))
        metrics: dict[str, Any] = {**run, "validation": held_out_metrics(validation_scores, data["validation"],
                                                                         config, thresholds)}
        guard_margin, guard_rule = None, ""
        if config.guard is not None:
            margins = margins_over_thresholds(validation_scores, config.categories, thresholds)
            guard_margin, guard_rule = choose_guard_margin(margins, data["validation"], config.guard)
        if data["test"]:
            test_scores = category_probabilities(exported.scorer, data["test"])
            metrics["test"] = held_out_metrics(test_scores, data["test"], config, thresholds)
            if exported.int8 is not None:
                int8_scores = category_probabilities(exported.int8, data["test"])
                metrics["test_int8"] = held_out_metrics(int8_scores, data["test"], config, thresholds)
        return ModerationManifest(
            base_model=config.base_model if config.base_model != "default" else "all-MiniLM-L6-v2",
            base_model_path=resolve_base_model(config.base_model), categories=config.categories,
            max_length=config.max_length, truncation_side=config.truncation_side,
            input_names=onnx_export.onnx_input_names(tokenizer), thresholds=thresholds, onnx=exported.onnx,
            data=data_provenance(config), config=to_dict(config), metrics=metrics, guard_margin=guard_margin,
            guard_margin_rule=guard_rule)

    sample = [item.input for item in data["validation"][:: max(1, len(data["validation"]) // 64)]]
    return publish(model, tokenizer, output, overwrite, max_length=config.max_length, export=config.export,
                   eval_batch_size=config.training.eval_batch_size, sample=sample, metrics_path=metrics_path,
                   title="moderation model", describe=describe, card=moderation_model_card, windowed=True)
