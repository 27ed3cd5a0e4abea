"""`keel train reward` and `keel train <algorithm>` (one subcommand per entry of keel.training.policy.algorithms)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from keel.cli.options import add_overrides, config_help
from keel.training.config import DEFAULT_MODERATION_CONFIG, DEFAULT_REWARD_CONFIG
from keel.training.policy.algorithms import ALGORITHMS


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = commands.add_parser("train", help="train a model").add_subparsers(dest="what", required=True)
    reward = train.add_parser(
        "reward", help="train a reward model from preference pairs and ratings",
        description="Train a multi-head reward model: Bradley-Terry loss on preference pairs, mean-squared "
        "error on scalar ratings. Writes HF weights, tokenizer, keel.json, ONNX (fp32 and int8), "
        "metrics.jsonl and training_curves.png. "
        + config_help(DEFAULT_REWARD_CONFIG, "--set training.epochs=1 --set heads.0.train.0.limit=200"))
    add_train_common(reward, DEFAULT_REWARD_CONFIG)
    reward.set_defaults(func=run_reward)
    moderation = train.add_parser(
        "moderation", help="train a moderation model (OpenAI's categories) from labelled harm data",
        description="Train a multi-label moderation classifier: one sigmoid output per category, binary "
        "cross-entropy masked to the categories each source labels. Chooses each category's threshold on "
        "validation data (precision >= min_precision, else best F1). Writes HF weights, tokenizer, keel.json, "
        "ONNX (fp32 and int8), metrics.jsonl and training_curves.png. "
        + config_help(DEFAULT_MODERATION_CONFIG, "--set training.epochs=1 --set cross_validation.test_fold=3"))
    add_train_common(moderation, DEFAULT_MODERATION_CONFIG)
    moderation.set_defaults(func=run_moderation)
    for name, algorithm in ALGORITHMS.items():
        command = train.add_parser(
            name, help=algorithm.summary,
            description=f"{algorithm.summary}. Tunes the policy (default: SmolLM2-135M-Instruct, LoRA) and writes a "
            "policy directory: merged HF weights, tokenizer, keel.json, metrics.jsonl, training_curves.png and "
            "samples.md (greedy responses before and after). Runs under `accelerate launch` unchanged. "
            + config_help(algorithm.default_config, "--set training.steps=10 --set policy.lora=null"))
        add_train_common(command, algorithm.default_config)
        command.set_defaults(func=run_policy)


def add_train_common(parser: argparse.ArgumentParser, default_config: Path) -> None:
    parser.add_argument("--config", type=Path, default=default_config,
                        help=f"YAML config file (default: {default_config})")
    parser.add_argument("--output", type=Path, required=True,
                        help="model directory to write; written atomically when training finishes")
    add_overrides(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in OUTPUT.work/ instead of starting over")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it already exists")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="skip malformed data rows with a warning (default: stop at the first, naming file:line)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(cleanup=discard_unstarted_run, finish=end_training_run)


def run_reward(args: argparse.Namespace) -> int:
    from keel.training.config import load_config
    from keel.training.reward.config import RewardConfig
    from keel.training.reward.train import train_reward

    config = load_config(RewardConfig, args.config, args.overrides)
    manifest = train_reward(config, args.output, resume=args.resume, overwrite=args.overwrite,
                            skip_bad_rows=args.skip_bad_rows, progress=not args.no_progress)
    if manifest:
        print(json.dumps(manifest["metrics"], indent=2))
        print(f"reward model written to {args.output}")
    return 0


def run_moderation(args: argparse.Namespace) -> int:
    from keel.training.config import load_config
    from keel.training.moderation.config import ModerationConfig
    from keel.training.moderation.train import train_moderation

    config = load_config(ModerationConfig, args.config, args.overrides)
    manifest = train_moderation(config, args.output, resume=args.resume, overwrite=args.overwrite,
                                skip_bad_rows=args.skip_bad_rows, progress=not args.no_progress)
    if manifest:
        print(json.dumps(manifest["metrics"].get("test", manifest["metrics"]["validation"])["sources"], indent=2))
        print(f"moderation model written to {args.output}")
    return 0


def run_policy(args: argparse.Namespace) -> int:
    from keel.training.config import load_config
    from keel.training.policy.config import PolicyConfig
    from keel.training.policy.restarts import train_policy

    config = load_config(PolicyConfig, args.config, args.overrides)
    manifest = train_policy(args.what, config, args.output, resume=args.resume, overwrite=args.overwrite,
                            skip_bad_rows=args.skip_bad_rows, progress=not args.no_progress)
    if manifest:
        print(json.dumps(manifest["final_evaluation"], indent=2))
        if manifest["stopped_early"]:
            print(f"stopped early: {manifest['stopped_early']}")
        for number, attempt in enumerate(manifest["attempts"], 1):
            print(f"attempt {number} (seed {attempt['seed']}): evasive on harmful prompts "
                  f"{attempt['evasive_harmful']:.3f}, on others {attempt['evasive_ordinary']:.3f}, "
                  f"{'passed' if attempt['accepted'] else 'missed'}{', kept' if attempt['kept'] else ''}")
        print(f"policy written to {args.output}")
    return 0


def discard_unstarted_run(args: argparse.Namespace) -> None:
    """A training run that failed before its first checkpoint leaves no OUTPUT.work behind: nothing to resume."""
    from keel.training.runs import discard_work_without_checkpoints

    discard_work_without_checkpoints(Path(args.output))


def end_training_run(args: argparse.Namespace) -> None:
    from keel.training.runs import end_run

    end_run()
