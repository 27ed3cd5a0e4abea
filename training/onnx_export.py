"""Export a reward model to ONNX: TorchScript export, ONNX Runtime's BERT fusions, per-channel int8.

The dynamo exporter's graph is not fused by ONNX Runtime, so the TorchScript path (dynamo=False) is used.
Plain (per-tensor) int8 loses about 2 points of pairwise accuracy; per-channel keeps it within ~1, and keeping
the feed-forward down-projections in fp32 halves what remains.
"""

from __future__ import annotations

import logging
import os
import platform
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import PreTrainedTokenizerBase

from training.evaluate import Scorer, length_sorted_scorer
from training.reward_model import RewardModel

log = logging.getLogger(__name__)
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
# Recorded in keel.json, so a model whose int8 graph was made by an older recipe can be told apart and re-exported.
INT8_RECIPE = "dynamic per-channel int8, feed-forward down-projections fp32"


def int8_outdated(onnx_info: dict[str, Any]) -> bool:
    """Whether a manifest's int8 graph was made by another recipe than this Keel's (`keel export reward` remakes it)."""
    return bool(onnx_info.get("int8")) and onnx_info.get("int8_recipe") != INT8_RECIPE


def onnx_input_names(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    names = ["input_ids", "attention_mask"]
    return names + (["token_type_ids"] if "token_type_ids" in tokenizer.model_input_names else [])


def export(model: RewardModel, tokenizer: PreTrainedTokenizerBase, directory: Path, opset: int, int8: bool) -> None:
    """Write model.onnx (optimised fp32) and optionally model.int8.onnx into directory."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = model.to("cpu").eval()
    # ONNX Runtime's optimizer fuses the eager attention pattern into its Attention kernel, not the SDPA one.
    attention = model.backbone.config._attn_implementation
    model.backbone.set_attn_implementation("eager")
    names = onnx_input_names(tokenizer)
    sample = tokenizer(["a short context", "a second, somewhat longer context"], ["a reply", "another reply"],
                       padding=True, return_tensors="pt")
    raw_path = directory / "model.raw.onnx"
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    with torch.no_grad(), warnings.catch_warnings():
        # Two warnings the TorchScript exporter prints for every BERT, about shapes it fixes while tracing and
        # about indexing with negative indices; neither bites here, and every export is checked against torch on
        # real texts of many lengths right after (keel.json: onnx.fp32_max_abs_diff_vs_torch).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            model, tuple(sample[n] for n in names), str(raw_path), input_names=names, output_names=["scores"],
            dynamic_axes={**axes, "scores": {0: "batch"}}, opset_version=opset, dynamo=False,
        )
    model.backbone.set_attn_implementation(attention)
    config = model.backbone.config
    model_type = "bert" if config.model_type in ("bert", "roberta", "distilbert", "xlm-roberta") else config.model_type
    optimized = optimize_model(str(raw_path), model_type=model_type, num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
    optimized.save_model_to_file(str(directory / FP32_FILE))
    raw_path.unlink()
    if int8:
        quantize(directory / FP32_FILE, directory / INT8_FILE, down_projections(optimized.model))


def quantize(fp32_path: Path, int8_path: Path, keep_fp32: Sequence[str]) -> None:
    """Dynamic per-channel int8 of an fp32 graph, leaving the named nodes in fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # ONNX Runtime advises its pre-processing (shape inference, graph optimisation) on every call, as a root-logger
    # warning; the graph is already optimised and its fused ops defeat shape inference, so it does not apply.
    def not_the_advice(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    logging.getLogger().addFilter(not_the_advice)
    try:  # Fused (com.microsoft) ops defeat shape inference, so name the float type explicitly.
        quantize_dynamic(fp32_path, int8_path, per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_exclude=list(keep_fp32), extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        logging.getLogger().removeFilter(not_the_advice)


def matmul_weight_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Node name -> shape of the constant weight of each MatMul node."""
    shapes = {weight.name: tuple(weight.dims) for weight in model.graph.initializer}
    return {node.name: shapes[node.input[1]] for node in model.graph.node
            if node.op_type == "MatMul" and node.input[1] in shapes}


def down_projections(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose weight narrows the width (the feed-forward down-projections), left in fp32 by int8.

    Their inputs, GELU outputs, have outlier features that one int8 scale per batch tensor cannot resolve. On
    the default model's 914 validation texts (2 AVX2 cores, bench/int8_bench.py), excluding them cut the mean
    |int8 - fp32| from 0.066 to 0.029 standard deviations (harmless head; helpful 0.054 -> 0.029); excluding
    the attention, attention-output or up-projection weights instead moved it by 0.011 at most.
    """
    return [name for name, shape in matmul_weight_shapes(model).items() if len(shape) == 2 and shape[0] > shape[1]]


def onnx_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # On x86 CPUs without VNNI, ONNX Runtime's int8 x int8 kernels can saturate 16-bit sums; this option makes
    # them compute exactly there (no effect elsewhere). On the default model, 2 AVX2 cores: mean |int8 - fp32|
    # 0.077 -> 0.066 (harmless) and 0.075 -> 0.054 (helpful) validation standard deviations, same speed.
    options.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# CPU features with which ONNX Runtime's int8 kernels are both exact and fast: VNNI or AMX on x86, the
# dot-product extension on Arm (/proc/cpuinfo names).
INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})


def int8_is_fast(cpuinfo: str | None = None) -> bool:
    """Whether the int8 graph should outrun the fp32 one on this CPU.

    Without VNNI, `session.x64quantprecision` (see onnx_session) trades the x86 u8 x s8 kernels, whose 16-bit
    sums saturate, for exact u8 x u8 ones, and those gain nothing: on 2 AVX2 cores the default model scored
    200 texts in 17.06 s in int8 and 17.09 s in fp32 (bench/int8_bench.py, medians of 3).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: Apple silicon has the dot-product extension; elsewhere fp32 is the safe guess
            return platform.machine() == "arm64"
    flags = {flag for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))
             for flag in line.partition(":")[2].split()}
    return bool(flags & INT8_DOT_PRODUCT_FLAGS)


def quantizes_activations(path: str | Path) -> bool:
    """Whether the graph quantises activations at run time (dynamic int8), with one scale per batch tensor."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type == "DynamicQuantizeLinear" for node in graph.node)


def pad_batch(items: Sequence[dict[str, list[int]]], names: Sequence[str], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad token lists into int64 arrays for ONNX Runtime."""
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
    """An exported reward model in ONNX Runtime: raw scores [items, heads] of tokenised texts.

    Dynamic int8 quantises each activation tensor with one scale for the whole batch, so in a batch a text's
    score would depend on the other texts in it (default model: 0.05 standard deviations on average, 0.2 at
    most, between batch sizes 1 and 64). Such graphs run one text at a time, so a text always gets one score;
    on 2 CPU cores that is not slower (914 texts: 47.9 s one at a time, 51.7 s in length-sorted batches of 64).
    """

    def __init__(self, path: str | Path, pad_id: int, threads: int | None = None):
        self.session = onnx_session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.heads: int = self.session.get_outputs()[0].shape[1] or 1
        self.pad_id = pad_id
        self.one_at_a_time = quantizes_activations(path)

    def run(self, items: Sequence[dict[str, list[int]]]) -> np.ndarray:
        batches = [[item] for item in items] if self.one_at_a_time else [items]
        return np.concatenate([self.session.run(["scores"], pad_batch(batch, self.input_names, self.pad_id))[0]
                               for batch in batches])


def onnx_scorer(path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int, batch_size: int = 64) -> Scorer:
    engine = OnnxEngine(path, tokenizer.pad_token_id)
    return length_sorted_scorer(tokenizer, max_length, batch_size, engine.heads, engine.run)
