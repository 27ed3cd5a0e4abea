"""How far can more runs of one reward config go? Each model's pairwise accuracy beside their ensemble's.

    python bench/seed_ensemble_bench.py --model runs/seed0 --model runs/seed1 [--model ...]
        [--config configs/reward.yaml] [--splits validation,test] [--json PATH]

Every preference head's pairs of each split (the config's data) are scored by each model's fp32 ONNX graph.
The ensemble averages the models' margins r_chosen - r_rejected, each in its own model's standard deviations
(the manifest's normalisation), so no model outweighs another. Also reported: the mean correlation of the
models' margins and the share of pairs on which every model picks the same reply. When models trained with
different seeds agree closely, their ensemble is little better than one of them, and the config's accuracy
is limited by its data and backbone rather than by the seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from keel.core.artifact import read_manifest
from keel.core.onnx_engine import FP32_FILE
from keel.training.config import load_config
from keel.training.data import PreferencePair
from keel.training.encoder.onnx_export import onnx_scorer
from keel.training.encoder.optim import load_tokenizer
from keel.training.evaluation.metrics import wilson_interval
from keel.training.reward.config import RewardConfig
from keel.training.reward.data import HeadData, load_head_data
from keel.training.reward.objectives import example_inputs


def margins(model: Path, heads: list[HeadData], splits: list[str]) -> dict[tuple[str, str], np.ndarray]:
    """(split, head) -> each pair's r_chosen - r_rejected in the model's standard deviations."""
    manifest = read_manifest(model)
    tokenizer = load_tokenizer(str(model), manifest["max_length"], manifest["truncation_side"])
    score = onnx_scorer(model / FP32_FILE, tokenizer, manifest["max_length"])
    out = {}
    for head in heads:
        column = manifest["heads"].index(head.name)
        for split in splits:
            pairs = [e for e in getattr(head, split) if isinstance(e, PreferencePair)]
            if not pairs:
                continue
            scores = score(example_inputs(pairs))[:, column]  # chosen, rejected, chosen, rejected, ...
            out[(split, head.name)] = (scores[0::2] - scores[1::2]) / manifest["normalization"][head.name]["std"]
    return out


def summarise(per_model: list[np.ndarray]) -> dict[str, object]:
    stacked = np.stack(per_model)
    ensemble = stacked.mean(0)
    accuracy = float((ensemble > 0).mean())
    correlations = np.corrcoef(stacked)[np.triu_indices(len(per_model), k=1)]
    return {
        "pairs": int(stacked.shape[1]),
        "models": [round(float((m > 0).mean()), 4) for m in stacked],
        "mean_of_models": round(float((stacked > 0).mean()), 4),
        "ensemble": round(accuracy, 4),
        "ensemble_ci95": [round(v, 4) for v in wilson_interval(accuracy, stacked.shape[1])],
        "mean_margin_correlation": round(float(correlations.mean()), 3),
        "all_agree": round(float(((stacked > 0) == (stacked[0] > 0)).all(0).mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", type=Path, required=True,
                        help="a Keel reward-model directory with model.onnx; give two or more")
    parser.add_argument("--config", default="configs/reward.yaml", help="reward config whose data is scored")
    parser.add_argument("--splits", default="validation,test", help="comma-separated splits to score")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    if len(args.model) < 2:
        parser.error("give at least two --model directories")
    heads = load_head_data(load_config(RewardConfig, args.config), skip_bad_rows=False)  # read once for all models
    splits = args.splits.split(",")
    scored = [margins(model, heads, splits) for model in args.model]
    report = {f"{split}/{head}": summarise([m[(split, head)] for m in scored]) for split, head in scored[0]}
    print(f"{'split/head':22} {'pairs':>5} {'each model':>28} {'mean':>6} {'ensemble (95% interval)':>24} "
          f"{'corr':>5} {'agree':>6}")
    for key, row in report.items():
        each = " ".join(f"{a:.3f}" for a in row["models"])
        low, high = row["ensemble_ci95"]
        print(f"{key:22} {row['pairs']:5} {each:>28} {row['mean_of_models']:6.3f} "
              f"{row['ensemble']:.3f} ({low:.3f}-{high:.3f}){'':5} {row['mean_margin_correlation']:5.2f} "
              f"{row['all_agree']:6.3f}")
    if args.json:
        args.json.write_text(json.dumps({"models": [str(m) for m in args.model], **report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
