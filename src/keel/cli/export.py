"""`keel export reward`: remake a reward model's ONNX graphs with this version of Keel."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = commands.add_parser("export", help="remake a model's exported files").add_subparsers(
        dest="what", required=True)
    export_reward = export.add_parser(
        "reward", help="remake model.onnx and model.int8.onnx of a reward-model directory",
        description="Re-export a reward model's ONNX graphs with this version of Keel (a model trained by an older "
        "one keeps the int8 recipe it was made with; keel.json's onnx.int8_recipe names it), re-check them against "
        "the weights on the model's own validation and test data (the paths in its keel.json), and update keel.json. "
        "Weights, thresholds and metrics are kept; the directory is replaced atomically.")
    export_reward.add_argument("--model", type=Path, required=True, help="a Keel reward-model directory")
    export_reward.add_argument("--int8", action=argparse.BooleanOptionalAction, default=None,
                               help="write model.int8.onnx, or not (default: as the model's config says)")
    export_reward.add_argument("--skip-bad-rows", action="store_true", help="skip malformed data rows with a warning")
    export_reward.add_argument("--data", type=Path, default=None, metavar="DIR",
                               help="where to look for data files no longer at the paths in keel.json (a moved clone, "
                               "another machine): a file under DIR with the same name and SHA-256 is used, and "
                               "keel.json records its new path")
    export_reward.set_defaults(func=run_export_reward)


def run_export_reward(args: argparse.Namespace) -> int:
    from keel.training.reward.reexport import reexport

    manifest = reexport(args.model, args.int8, args.skip_bad_rows, args.data)
    print(json.dumps(manifest["onnx"], indent=2))
    print(f"ONNX graphs of {args.model} re-exported")
    return 0
