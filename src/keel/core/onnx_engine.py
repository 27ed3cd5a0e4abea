"""A reward or moderation model's exported graph in ONNX Runtime: raw scores of tokenised texts, no torch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from keel.core.hardware import usable_cpus

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
# Recorded in keel.json, so a model whose int8 graph was made by an older recipe can be told apart and re-exported.
INT8_RECIPE = "dynamic per-channel int8, feed-forward down-projections fp32"


def int8_outdated(onnx_info: dict[str, Any]) -> bool:
    """Whether a manifest's int8 graph was made by another recipe than this Keel's (`keel export reward` remakes it)."""
    return bool(onnx_info.get("int8")) and onnx_info.get("int8_recipe") != INT8_RECIPE


def onnx_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # On x86 CPUs without VNNI, ONNX Runtime's int8 x int8 kernels can saturate 16-bit sums; this option makes
    # them compute exactly there (no effect elsewhere), at the same speed (bench/int8_bench.py).
    options.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def pad_batch(items: Sequence[dict[str, list[int]]], names: Sequence[str], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad token lists into int64 arrays (ONNX Runtime's input, and torch's through from_numpy)."""
    length = max(len(item["input_ids"]) for item in items)
    out = {name: np.zeros((len(items), length), dtype=np.int64) for name in names}
    out["input_ids"].fill(pad_id)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        out["input_ids"][row, :n] = item["input_ids"]
        out["attention_mask"][row, :n] = 1
        if "token_type_ids" in out:
            out["token_type_ids"][row, :n] = item.get("token_type_ids", [0] * n)
    return out


class OnnxEngine:
    """An exported model in ONNX Runtime: raw scores [items, heads] of tokenised texts.

    Keel's int8 graph is dynamic int8: it quantises each activation tensor with one scale for the whole batch,
    so in a batch a text's score would depend on the other texts in it. That graph runs one text at a time, so
    a text always gets one score; on a CPU that is not slower (bench/int8_bench.py).
    """

    def __init__(self, path: str | Path, pad_id: int, threads: int | None = None):
        self.session = onnx_session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.heads: int = self.session.get_outputs()[0].shape[1] or 1
        self.pad_id = pad_id
        self.one_at_a_time = Path(path).name == INT8_FILE

    def run(self, items: Sequence[dict[str, list[int]]]) -> np.ndarray:
        batches = [[item] for item in items] if self.one_at_a_time else [items]
        return np.concatenate([self.session.run(["scores"], pad_batch(batch, self.input_names, self.pad_id))[0]
                               for batch in batches])
