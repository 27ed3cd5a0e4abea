"""Train the default reward model and report wall time and accuracy per split and head.

    python bench/train_reward_bench.py [--output DIR] [--set KEY=VALUE ...]

Runs `keel train reward` in a subprocess (timed end to end, evaluation and ONNX export included), then
prints a table from the model's keel.json and writes it as JSON beside the model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from keel.core.hardware import describe, pick_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/bench-reward"), help="model directory to write")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    args = parser.parse_args()
    command = [sys.executable, "-m", "keel", "train", "reward", "--output", str(args.output), "--overwrite",
               "--no-progress"] + [f"--set={o}" for o in args.overrides]
    began = time.time()
    subprocess.run(command, check=True)
    wall = time.time() - began
    manifest = json.loads((args.output / "keel.json").read_text())
    metrics = manifest["metrics"]
    hardware = describe(pick_device())
    report = {"wall_seconds": round(wall, 1), "train_seconds": metrics["train_seconds"], "steps": metrics["steps"],
              "precision": metrics["precision"], "hardware": hardware, "accuracy": {}, "onnx": manifest["onnx"],
              "moderation": manifest["moderation"]}
    print(f"wall time {wall / 60:.1f} min (training {metrics['train_seconds'] / 60:.1f} min, {metrics['steps']} steps "
          f"at {metrics['train_seconds'] / metrics['steps']:.1f} s, precision {metrics['precision']}, {hardware})")
    print(f"{'split':<11}{'head':<10}{'pairs':>6}{'accuracy':>10}{'95% interval':>15}{'shorter':>9}{'ECE':>7}")
    for split in ("validation", "test"):
        for head, m in metrics[split].items():
            if "accuracy" in m:
                report["accuracy"][f"{split}/{head}"] = m["accuracy"]
                low, high = m["accuracy_ci95"]
                print(f"{split:<11}{head:<10}{m['pairs']:>6}{m['accuracy']:>10.3f}{f'{low:.3f}-{high:.3f}':>15}"
                      f"{m['shorter_wins_accuracy']:>9.3f}{m['ece']:>7.3f}")
    for head, acc in manifest["onnx"].get("accuracy", {}).items():
        print(f"ONNX {acc['split']} {head}: fp32 {acc['fp32']:.3f}  int8 {acc['int8']:.3f}  "
              f"(int8 - fp32 = {100 * (acc['int8'] - acc['fp32']):+.1f} points)")
    (args.output.parent / f"{args.output.name}-bench.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
