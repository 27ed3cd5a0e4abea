"""Compare int8 recipes of a reward model with its fp32 graph, and measure what batching does to int8 scores.

    python bench/int8_bench.py --model runs/bench-reward [--config configs/reward.yaml] [--split validation]
        [--recipes NAME,...] [--no-timing]

Each recipe's int8 graph is made afresh from the model's model.onnx. Every head's preference pairs of the
chosen split (the config's data) are scored one text at a time, as Keel runs int8, and compared with fp32:
mean and 99th percentile of |int8 - fp32| in that head's standard deviations, pairs whose preferred reply
flips, and the change in pairwise accuracy. Then, for the export's recipe: the same texts in length-sorted
batches of 64 against one at a time (int8 quantises each activation tensor with one scale per batch), and the
time of fp32 and int8 on 200 texts in the service's batches of 4 on one thread (median of 3).
Choose recipes on validation; the test split is for reporting.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from keel.core.onnx_engine import FP32_FILE, OnnxEngine
from keel.training.config import load_config
from keel.training.data import PreferencePair
from keel.training.encoder.onnx_export import down_projections, matmul_weight_shapes, quantize
from keel.training.encoder.optim import load_tokenizer
from keel.training.encoder.scoring import encode, length_sorted_scorer
from keel.training.reward.config import RewardConfig
from keel.training.reward.data import load_head_data


def attention_qkv(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Attention"]


def attention_outputs(model: onnx.ModelProto) -> list[str]:
    return [name for name, shape in matmul_weight_shapes(model).items() if len(shape) == 2 and shape[0] == shape[1]]


def up_projections(model: onnx.ModelProto) -> list[str]:
    return [name for name, shape in matmul_weight_shapes(model).items() if len(shape) == 2 and shape[0] < shape[1]]


# Which nodes each recipe leaves in fp32, by the shape of their weights (names differ between architectures).
ALL_WEIGHTS, EXPORT_RECIPE = "all weights int8", "down-projections fp32 (export)"
RECIPES: dict[str, Callable[[onnx.ModelProto], list[str]]] = {
    ALL_WEIGHTS: lambda model: [],
    EXPORT_RECIPE: down_projections,
    "attention QKV fp32": attention_qkv,
    "attention output fp32": attention_outputs,
    "up-projections fp32": up_projections,
    "down-projections + attention output fp32": lambda model: down_projections(model) + attention_outputs(model),
    "down-projections + QKV fp32": lambda model: down_projections(model) + attention_qkv(model),
    "feed-forward fp32 (down + up)": lambda model: down_projections(model) + up_projections(model),
}
Pairs = dict[str, tuple[np.ndarray, np.ndarray]]  # head -> (chosen scores, rejected scores)


def score_pairs(engine: OnnxEngine, tokenizer, max_length: int, pairs: dict[int, tuple[str, list]]) -> Pairs:
    """Scores of every head's chosen and rejected replies, in length-sorted batches of 64."""
    score = length_sorted_scorer(tokenizer, max_length, 64, engine.heads, engine.run)
    out = {}
    for column, (head, examples) in pairs.items():
        scores = score([e.chosen_input for e in examples] + [e.rejected_input for e in examples])[:, column]
        out[head] = (scores[: len(examples)], scores[len(examples) :])
    return out


def compare(fp32: Pairs, int8: Pairs) -> dict[str, dict[str, float]]:
    report = {}
    for head, (chosen, rejected) in fp32.items():
        chosen8, rejected8 = int8[head]
        std = np.concatenate([chosen, rejected]).std()
        diff = np.abs(np.concatenate([chosen8 - chosen, rejected8 - rejected])) / std
        report[head] = {"mean_abs_diff_std": round(float(diff.mean()), 4),
                        "p99_abs_diff_std": round(float(np.quantile(diff, 0.99)), 3),
                        "flipped_pairs": int(((chosen > rejected) != (chosen8 > rejected8)).sum()),
                        "accuracy_change_points": round(100 * float((chosen8 > rejected8).mean()
                                                                   - (chosen > rejected).mean()), 1)}
    return report


def service_seconds(path: Path, items: list[dict], pad_id: int) -> float:
    engine = OnnxEngine(path, pad_id, threads=1)
    times = []
    for _ in range(3):
        began = time.perf_counter()
        for start in range(0, len(items), 4):
            engine.run(items[start : start + 4])
        times.append(time.perf_counter() - began)
    return round(float(np.median(times)), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="Keel reward-model directory with model.onnx")
    parser.add_argument("--config", type=Path, default=Path("configs/reward.yaml"), help="config naming the data")
    parser.add_argument("--split", choices=["validation", "test"], default="validation", help="pairs to compare on")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help="comma-separated recipes to compare (default: all): " + ", ".join(RECIPES))
    parser.add_argument("--no-timing", action="store_true",
                        help="compare recipes only: skip batched-vs-alone and the speed of fp32 and int8")
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    if unknown := set(recipes) - set(RECIPES):
        parser.error(f"unknown recipes {sorted(unknown)}; known: {', '.join(RECIPES)}")
    manifest = json.loads((args.model / "keel.json").read_text())
    tokenizer = load_tokenizer(str(args.model), manifest["max_length"], manifest["truncation_side"])
    max_length, pad_id = manifest["max_length"], tokenizer.pad_token_id
    config = load_config(RewardConfig, args.config)
    pairs = {manifest["heads"].index(head.name): (head.name, examples) for head in load_head_data(config, False)
             if (examples := [e for e in getattr(head, args.split) if isinstance(e, PreferencePair)])}
    fp32_path = args.model / FP32_FILE
    fp32 = score_pairs(OnnxEngine(fp32_path, pad_id), tokenizer, max_length, pairs)
    fp32_model = onnx.load(str(fp32_path))
    report: dict[str, dict] = {"recipes": {}}
    with tempfile.TemporaryDirectory() as scratch:
        paths = {name: Path(scratch) / f"{number}.onnx" for number, name in enumerate(RECIPES)}
        for name in recipes:
            quantize(fp32_path, paths[name], RECIPES[name](fp32_model))
            engine = OnnxEngine(paths[name], pad_id)
            report["recipes"][name] = compare(fp32, score_pairs(engine, tokenizer, max_length, pairs))
            print(f"{name:<32}" + "  ".join(f"{head}: {m}" for head, m in report["recipes"][name].items()), flush=True)
        if not args.no_timing:
            report.update(batching_and_speed(fp32_path, paths, fp32_model, tokenizer, max_length, pairs))
    report_path = args.model.parent / f"{args.model.name}-int8-bench-{args.split}.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")


def batching_and_speed(fp32_path: Path, paths: dict[str, Path], fp32_model: onnx.ModelProto, tokenizer,
                       max_length: int, pairs: dict[int, tuple[str, list]]) -> dict[str, dict]:
    """The export recipe's scores in batches of 64 against one at a time, and fp32 vs int8 speed."""
    pad_id = tokenizer.pad_token_id
    for name in (EXPORT_RECIPE, ALL_WEIGHTS):
        if not paths[name].exists():
            quantize(fp32_path, paths[name], RECIPES[name](fp32_model))
    engine = OnnxEngine(paths[EXPORT_RECIPE], pad_id)
    alone = score_pairs(engine, tokenizer, max_length, pairs)
    engine.one_at_a_time = False  # batched, as int8 ran before: each text's score depends on its batch
    report: dict[str, dict] = {"batched_vs_alone": compare(alone, score_pairs(engine, tokenizer, max_length, pairs))}
    print("int8 in batches of 64 vs one at a time: " + str(report["batched_vs_alone"]), flush=True)
    texts = [e.chosen_input for e in next(iter(pairs.values()))[1]][:200]
    items = sorted(encode(tokenizer, texts, max_length), key=lambda item: len(item["input_ids"]))
    report["service_batches_seconds"] = {"fp32": service_seconds(fp32_path, items, pad_id),
                                         "int8 (export)": service_seconds(paths[EXPORT_RECIPE], items, pad_id),
                                         "int8 (all weights)": service_seconds(paths[ALL_WEIGHTS], items, pad_id)}
    print(f"{len(items)} texts in batches of 4, one thread, median of 3 (s): {report['service_batches_seconds']}")
    return report


if __name__ == "__main__":
    main()
