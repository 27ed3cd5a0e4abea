"""`keel export reward` remakes a reward model's ONNX graphs with this version of Keel; `keel export head` writes one
head as a model of its own."""

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
    export_head = export.add_parser(
        "head", help="one head of a reward or moderation model as a one-label model (a TRL reward model)",
        description="Write one head of a Keel reward or moderation model as a one-label Hugging Face sequence "
        "classifier: AutoModelForSequenceClassification.from_pretrained(OUT, num_labels=1, trust_remote_code=True) "
        "loads it, as TRL does for reward_funcs given as a path, and logits[:, 0] is the head's raw score.")
    export_head.add_argument("model", type=Path, help="a Keel reward- or moderation-model directory")
    export_head.add_argument("out", type=Path, help="the directory to write (must not exist, unless --overwrite)")
    export_head.add_argument("--head", required=True, help="the head (reward) or category (moderation) to export")
    export_head.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    export_head.set_defaults(func=run_export_head)


def run_export_reward(args: argparse.Namespace) -> int:
    from keel.training.reward.reexport import reexport

    manifest = reexport(args.model, args.int8, args.skip_bad_rows, args.data)
    print(json.dumps(manifest["onnx"], indent=2))
    print(f"ONNX graphs of {args.model} re-exported")
    return 0


def run_export_head(args: argparse.Namespace) -> int:
    from keel.training.reward.export_head import export_head

    export_head(args.model, args.head, args.out, args.overwrite)
    print(f"head {args.head!r} of {args.model} written to {args.out}")
    return 0
