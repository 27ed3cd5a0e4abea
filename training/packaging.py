"""Publish a trained reward model: ONNX export and its checks, held-out metrics, calibration, keel.json and the
model card, written into a staging directory that replaces the output atomically."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from keel_core.artifact import (
    RewardManifest,
    staged,
    write_text_atomic,
)
from keel_core.onnx_engine import FP32_FILE, INT8_FILE, INT8_RECIPE
from keel_core.reward_model import RewardModel, resolve_base_model
from keel_core.text import ModelInput
from training import onnx_export
from training.calibration import normalization_and_thresholds
from training.config import to_dict
from training.evaluate import Scorer, cached, torch_scorer
from training.model_card import reward_model_card
from training.objectives import evaluate_examples, example_inputs
from training.plots import plot_curves
from training.reward_config import ExportConfig, RewardConfig
from training.reward_data import HeadData, data_provenance
from training.runs import read_metrics


def build_artifact(config: RewardConfig, model: RewardModel, tokenizer: Any, heads: list[HeadData], output: Path,
                   overwrite: bool, work: Path, metrics_path: Path, train_seconds: float, steps: int,
                   kept_step: int, precision: str) -> dict[str, Any]:
    """Export ONNX, evaluate, choose normalisation and thresholds, and publish the model directory."""
    names = [h.name for h in config.heads]
    t0 = time.time()
    with staged(output, overwrite) as staging:
        model.to("cpu").save(staging)
        tokenizer.save_pretrained(staging)
        onnx_info: dict[str, Any] = {}
        int8_scorer: Scorer | None = None
        scorer = torch_scorer(model, tokenizer, config.max_length, config.training.eval_batch_size)
        if config.export.onnx:
            onnx_info, scorer, int8_scorer = export_onnx(model, tokenizer, validation_sample(heads), config.export,
                                                         config.max_length, staging, scorer)
        # Every metric below is computed with the served fp32 graph (faster than torch), each text scored once.
        scorer = cached(scorer)
        normalization, moderation = normalization_and_thresholds(scorer, heads, config)
        metrics: dict[str, Any] = {"train_seconds": round(train_seconds, 1), "steps": steps, "kept_step": kept_step,
                                    "precision": precision}
        for split in ("validation", "test"):
            metrics[split] = {head.name: evaluate_examples(scorer, getattr(head, split), names)[head.name]
                              for head in heads if getattr(head, split)}
        if int8_scorer is not None:
            onnx_info["accuracy"] = int8_accuracy(scorer, int8_scorer, heads, names)
        metrics["eval_seconds"] = round(time.time() - t0, 1)
        rows = read_metrics(metrics_path)
        (staging / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot_curves(rows, staging / "training_curves.png", f"reward model: {', '.join(names)}")
        manifest = RewardManifest(
            base_model=config.base_model if config.base_model != "default" else "all-MiniLM-L6-v2",
            base_model_path=resolve_base_model(config.base_model), heads=names, primary_head=config.primary_head,
            max_length=config.max_length, truncation_side=config.truncation_side,
            input_names=onnx_export.onnx_input_names(tokenizer), normalization=normalization, moderation=moderation,
            onnx=onnx_info, data=data_provenance(config), config=to_dict(config), metrics=metrics)
        manifest.write(staging)
        write_text_atomic(staging / "README.md", reward_model_card(manifest, output))
    return manifest.to_json()


def validation_sample(heads: list[HeadData]) -> list[ModelInput]:
    """The texts ONNX graphs are checked against torch on: up to 32 validation examples of every head."""
    return example_inputs([e for head in heads for e in head.validation[:32]])


def export_onnx(model: RewardModel, tokenizer: Any, sample: list[ModelInput], export: ExportConfig, max_length: int,
                directory: Path, torch_scores: Scorer) -> tuple[dict[str, Any], Scorer, Scorer | None]:
    """Write model.onnx (and model.int8.onnx) into directory and measure max |ONNX - torch| on the sample texts
    for each graph; returns the manifest's onnx info and the scorers of the fp32 and int8 (or None) graphs."""
    onnx_export.export(model, tokenizer, directory, export.opset, export.int8)
    expected = torch_scores(sample)
    info: dict[str, Any] = {"fp32": FP32_FILE, "int8": INT8_FILE if export.int8 else None}
    if export.int8:
        info["int8_recipe"] = INT8_RECIPE
    fp32 = onnx_export.onnx_scorer(directory / FP32_FILE, tokenizer, max_length)
    info["fp32_max_abs_diff_vs_torch"] = float(np.abs(fp32(sample) - expected).max())
    int8 = None
    if export.int8:
        int8 = onnx_export.onnx_scorer(directory / INT8_FILE, tokenizer, max_length)
        info["int8_max_abs_diff_vs_torch"] = float(np.abs(int8(sample) - expected).max())
    return info, fp32, int8


def int8_accuracy(fp32: Scorer, int8: Scorer, heads: list[HeadData], names: list[str]) -> dict[str, Any]:
    """Pairwise accuracy of the int8 graph beside fp32, on each head's test pairs (validation if no test)."""
    out = {}
    for head in heads:
        evaluated = head.test or head.validation
        fp32_metrics = evaluate_examples(fp32, evaluated, names)[head.name]
        if "accuracy" in fp32_metrics:
            out[head.name] = {"split": "test" if head.test else "validation", "fp32": fp32_metrics["accuracy"],
                              "int8": evaluate_examples(int8, evaluated, names)[head.name]["accuracy"]}
    return out
