"""Does a standard classifier's pooling cost accuracy? Train the default reward model with the features read
from the [CLS] token's final hidden state, as transformers' standard sequence classifiers do, instead of Keel's
mean over the response's tokens, and print both validation accuracies.

    python bench/pooling_bench.py --baseline runs/bench-reward [--output runs/bench-cls] [--set KEY=VALUE ...]

--baseline is a model of the same config trained with Keel's pooling (bench/train_reward_bench.py writes one).
The standard BERT head also passes the [CLS] state through its pretrained pooler (dense + tanh) before the
linear layer; reading the state directly, as here, gives the head the same information.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from keel.core import reward_model
from keel.training.config import DEFAULT_REWARD_CONFIG, load_config
from keel.training.reward.config import RewardConfig
from keel.training.reward.train import train_reward


def cls_pool(self: reward_model.RewardModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    return self.backbone(**inputs).last_hidden_state[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="model trained with Keel's pooling")
    parser.add_argument("--output", type=Path, default=Path("runs/bench-cls"), help="model directory to write")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    args = parser.parse_args()
    reward_model.RewardModel.pool = cls_pool
    config = load_config(RewardConfig, DEFAULT_REWARD_CONFIG, ["export.onnx=false", *args.overrides])
    began = time.time()
    cls = train_reward(config, args.output, overwrite=True, progress=False)["metrics"]
    baseline = json.loads((args.baseline / "keel.json").read_text())["metrics"]
    report = {"wall_seconds": round(time.time() - began, 1)}
    for split in ("validation", "test"):
        for head, metrics in cls[split].items():
            if "accuracy" in metrics:
                keel = baseline[split][head]["accuracy"]
                report[f"{split}/{head}"] = {"keel_response_mean": keel, "cls": metrics["accuracy"],
                                             "cls_minus_keel_points": round(100 * (metrics["accuracy"] - keel), 1)}
                print(f"{split:<11}{head:<10} response-mean {keel:.3f}  [CLS] {metrics['accuracy']:.3f}  "
                      f"({100 * (metrics['accuracy'] - keel):+.1f} points)")
    (args.output.parent / f"{args.output.name}-pooling.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
