"""Publishing an encoder classifier (reward and moderation models alike): save the Hugging Face model and its
tokenizer, export and check the ONNX graphs, let the kind measure itself, then write metrics.jsonl, the training
curves, keel.json and the model card into a staging directory that replaces the output atomically."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from keel.core.artifact import ModerationManifest, RewardManifest, staged, write_text_atomic
from keel.core.onnx_engine import FP32_FILE, INT8_FILE, INT8_RECIPE
from keel.core.reward_model import RewardModel
from keel.core.text import ModelInput
from keel.training.encoder import onnx_export
from keel.training.encoder.config import ExportConfig
from keel.training.encoder.scoring import Scorer, cached, torch_scorer
from keel.training.plots import plot_curves
from keel.training.runs import read_metrics

M = TypeVar("M", RewardManifest, ModerationManifest)


@dataclass
class Exported:
    """What a kind measures itself with: the served fp32 graph's scorer (each text scored once; torch when
    there is no ONNX export), the int8 graph's (None without one) and the manifest's onnx info."""

    scorer: Scorer
    int8: Scorer | None
    onnx: dict[str, Any]


def export_onnx(model: RewardModel, tokenizer: Any, sample: list[ModelInput], export: ExportConfig, max_length: int,
                directory: Path, torch_scores: Scorer, windowed: bool = False
                ) -> tuple[dict[str, Any], Scorer, Scorer | None]:
    """Write model.onnx (and model.int8.onnx) into directory and measure max |ONNX - torch| on the sample texts
    for each graph; returns the manifest's onnx info and the scorers of the fp32 and int8 (or None) graphs."""
    onnx_export.export(model, tokenizer, directory, export.opset, export.int8)
    expected = torch_scores(sample)
    info: dict[str, Any] = {"fp32": FP32_FILE, "int8": INT8_FILE if export.int8 else None}
    if export.int8:
        info["int8_recipe"] = INT8_RECIPE
    fp32 = onnx_export.onnx_scorer(directory / FP32_FILE, tokenizer, max_length, windowed=windowed)
    info["fp32_max_abs_diff_vs_torch"] = float(np.abs(fp32(sample) - expected).max())
    int8 = None
    if export.int8:
        int8 = onnx_export.onnx_scorer(directory / INT8_FILE, tokenizer, max_length, windowed=windowed)
        info["int8_max_abs_diff_vs_torch"] = float(np.abs(int8(sample) - expected).max())
    return info, fp32, int8


def publish(model: RewardModel, tokenizer: Any, output: Path, overwrite: bool, *, max_length: int,
            export: ExportConfig, eval_batch_size: int, sample: list[ModelInput], metrics_path: Path, title: str,
            describe: Callable[[Exported], M], card: Callable[[M, Path], str], windowed: bool = False) -> M:
    """Publish the model directory. `describe` measures the exported model and returns its manifest (its
    metrics gain eval_seconds here); `card` writes the model card from it. A `windowed` model (moderation) is
    measured as served: a long text in overlapping windows."""
    t0 = time.time()
    with staged(output, overwrite) as staging:
        model.to("cpu").save(staging)
        tokenizer.save_pretrained(staging)
        scorer = torch_scorer(model, tokenizer, max_length, eval_batch_size, windowed=windowed)
        onnx_info: dict[str, Any] = {}
        int8: Scorer | None = None
        if export.onnx:
            onnx_info, scorer, int8 = export_onnx(model, tokenizer, sample, export, max_length, staging, scorer,
                                                  windowed)
        manifest = describe(Exported(cached(scorer), int8, onnx_info))
        manifest.metrics["eval_seconds"] = round(time.time() - t0, 1)
        rows = read_metrics(metrics_path)
        (staging / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot_curves(rows, staging / "training_curves.png", title)
        manifest.write(staging)
        write_text_atomic(staging / "README.md", card(manifest, output))
    return manifest
