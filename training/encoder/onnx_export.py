"""Export a reward model to ONNX: TorchScript export, ONNX Runtime's BERT fusions, per-channel int8.

The dynamo exporter's graph is not fused by ONNX Runtime, so the TorchScript path (dynamo=False) is used.
Plain (per-tensor) int8 loses about 2 points of pairwise accuracy; per-channel keeps it within ~1, and keeping
the feed-forward down-projections in fp32 halves what remains.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from transformers import PreTrainedTokenizerBase

from keel.core.onnx_engine import FP32_FILE, INT8_FILE, OnnxEngine
from keel.core.reward_model import RewardModel
from keel.training.encoder.scoring import Scorer, length_sorted_scorer

log = logging.getLogger(__name__)
def onnx_input_names(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    names = ["input_ids", "attention_mask"]
    return names + (["token_type_ids"] if "token_type_ids" in tokenizer.model_input_names else [])


class ScoresOnly(torch.nn.Module):
    """The model with its raw scores as the one output (the graph's `scores`), not a ModelOutput."""

    def __init__(self, model: RewardModel):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        scores: torch.Tensor = self.model(*inputs).logits
        return scores


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
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            ScoresOnly(model), tuple(sample[n] for n in names), str(raw_path), input_names=names, output_names=["scores"],
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

    Their inputs, GELU outputs, have outlier features that one int8 scale per batch tensor cannot resolve.
    Keeping them in fp32 more than halved the mean |int8 - fp32| of the default model, where keeping any other
    group of weights barely moved it (bench/int8_bench.py; docs/experiments.md, "int8").
    """
    return [name for name, shape in matmul_weight_shapes(model).items() if len(shape) == 2 and shape[0] > shape[1]]


def onnx_scorer(path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int, batch_size: int = 64,
                windowed: bool = False) -> Scorer:
    engine = OnnxEngine(path, tokenizer.pad_token_id)
    return length_sorted_scorer(tokenizer, max_length, batch_size, engine.heads, engine.run, windowed)
