"""The `keel` command line: train and evaluate models, serve them."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args, get_origin

import training
from training.algorithms import ALGORITHMS
from training.artifact import cache_root
from training.config import CONFIGS, DEFAULT_REWARD_CONFIG, REWARD_BACKENDS
from training.eval_sets import BUNDLED_DATA, POLICY_SETS, REWARD_SETS, EvalSet


def positive_int(text: str) -> int:
    """argparse type for counts: a whole number >= 1, else a usage error naming the option."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return int(text)


def config_help(default: Path, example: str) -> str:
    return ("Configs are YAML (`extends: OTHER.yaml` inherits one); every key can be overridden with --set "
            f"KEY=VALUE (dotted paths, list items by index, values parsed as YAML), e.g. {example}. "
            f"The default config, {default}, documents every key.")


def add_train_common(parser: argparse.ArgumentParser, default_config: Path) -> None:
    parser.add_argument("--config", type=Path, default=default_config,
                        help=f"YAML config file (default: {default_config})")
    parser.add_argument("--output", type=Path, required=True,
                        help="model directory to write; written atomically when training finishes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key; repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in OUTPUT.work/ instead of starting over")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it already exists")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="skip malformed data rows with a warning (default: stop at the first, naming file:line)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_suite_arguments(parser: argparse.ArgumentParser, sets: Sequence[EvalSet]) -> None:
    parser.add_argument("--output", type=Path, required=True,
                        help="folder for report.html, report.json and the PNG charts (created if absent)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="at most N items per set, spread evenly over the set (default: all)")
    parser.add_argument("--sets", default=None,
                        help="comma-separated sets to run (default: all): " + ", ".join(s.name for s in sets))
    parser.add_argument("--data", type=Path, default=BUNDLED_DATA,
                        help=f"folder of the bundled, permissively licensed sets (default: {BUNDLED_DATA})")
    parser.add_argument("--external-data", type=Path, default=None,
                        help="folder laid out like the upstream data bundle holding the non-commercial or "
                        "share-alike sets Keel does not ship (AlpacaEval, CrowS-Pairs, StereoSet, Do-Not-Answer, "
                        "BOLD); without it those sets are skipped and the report says so")
    add_cache_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", type=Path, default=cache_root() / "eval-cache.sqlite",
                        help="sqlite cache of scores, generations and likelihoods, keyed by model fingerprints "
                        f"(default: {cache_root() / 'eval-cache.sqlite'})")
    parser.add_argument("--no-cache", action="store_true", help="compute everything afresh and store nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keel", description="Keel: reward models, RLHF and reward scoring.")
    parser.add_argument("--version", action="version", version=f"keel {training.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the INFO lines of the libraries Keel uses")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model").add_subparsers(dest="what", required=True)
    reward = train.add_parser(
        "reward", help="train a reward model from preference pairs and ratings",
        description="Train a multi-head reward model: Bradley-Terry loss on preference pairs, mean-squared "
        "error on scalar ratings. Writes HF weights, tokenizer, keel.json, ONNX (fp32 and int8), "
        "metrics.jsonl and training_curves.png. "
        + config_help(DEFAULT_REWARD_CONFIG, "--set training.epochs=1 --set heads.0.train.0.limit=200"))
    add_train_common(reward, DEFAULT_REWARD_CONFIG)
    for name, algorithm in ALGORITHMS.items():
        command = train.add_parser(
            name, help=algorithm.summary,
            description=f"{algorithm.summary}. Tunes the policy (default: SmolLM2-135M-Instruct, LoRA) and writes a "
            "policy directory: merged HF weights, tokenizer, keel.json, metrics.jsonl, training_curves.png and "
            "samples.md (greedy responses before and after). Runs under `accelerate launch` unchanged. "
            + config_help(algorithm.default_config, "--set training.steps=10 --set policy.lora=null"))
        add_train_common(command, algorithm.default_config)

    evaluate = commands.add_parser("eval", help="evaluate a model").add_subparsers(dest="what", required=True)
    eval_reward = evaluate.add_parser(
        "reward", help="pairwise accuracy, calibration and rating fit of a reward model on data files",
        description="Score data files (pairs and/or ratings, any format `keel train reward` reads) with a "
        "reward model and print, per head: pairwise accuracy with its 95% Wilson interval (a few hundred pairs "
        "measure accuracy to about +-6 points), the shorter-response-wins baseline, expected "
        "calibration error, and for ratings MSE and Pearson correlation.")
    eval_reward.add_argument("--model", type=Path, required=True, help="a Keel reward-model directory")
    eval_reward.add_argument("--data", nargs="+", required=True, help="data files to evaluate on")
    eval_reward.add_argument("--split", default="all", choices=["all", "train", "validation", "test"],
                             help="keep only this hash split of each file (default: all rows)")
    eval_reward.add_argument("--limit", type=positive_int, default=None, help="at most N rows per file")
    eval_reward.add_argument("--backend", default="torch", choices=["torch", "onnx", "onnx-int8"],
                             help="torch weights, model.onnx or model.int8.onnx (default: torch; the names are "
                             "keel serve's)")
    eval_reward.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows with a warning")
    eval_reward.add_argument("--json", action="store_true", help="print JSON instead of a table")

    eval_policy = evaluate.add_parser(
        "policy", help="held-out reward, KL, refusal of harmful requests and over-refusal of a policy",
        description="Compare a tuned policy with its reference on held-out prompts: mean reward (and its size "
        "in standard deviations of the reference's rewards), KL(policy || reference) per response, refusal rate "
        "on harmful requests (AdvBench, HarmBench, SimpleSafetyTests) and compliance on XSTest's safe prompts. "
        "Refusals are detected by the phrase list in training/refusals.py. Greedy replies are cached with the "
        "evaluation suite's, so the reference's are generated once, not at every evaluation.")
    eval_policy.add_argument("--policy", required=True, help="the tuned policy directory (or HF name/path)")
    eval_policy.add_argument("--reference", default=None,
                             help="the reference policy (default: the base_policy in the tuned policy's keel.json)")
    eval_policy.add_argument("--reward-model", default="default",
                             help="Keel reward-model directory (default: the default reward model)")
    eval_policy.add_argument("--config", type=Path, default=CONFIGS / "eval_policy.yaml",
                             help=f"YAML naming the prompt sets (default: {CONFIGS / 'eval_policy.yaml'})")
    eval_policy.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config key; repeatable")
    eval_policy.add_argument("--limit", type=positive_int, default=None, help="at most N prompts per set")
    eval_policy.add_argument("--output", type=Path, default=None, help="also write the report as JSON here")
    eval_policy.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_cache_arguments(eval_policy)

    suite = evaluate.add_parser(
        "suite", help="the public safety, bias and truthfulness sets, with an HTML report",
        description="Measure one model, or two side by side (before/after), on the public evaluation sets and "
        "write report.html (self-contained, PNG charts embedded), report.json (every figure) and the charts. "
        "Sets that are not bundled (non-commercial or share-alike licences) need --external-data. Results are "
        "cached, so a re-run only computes what changed.").add_subparsers(dest="suite", required=True)
    suite_reward = suite.add_parser(
        "reward", help="pairwise accuracy and calibration, bias probes, moderation precision/recall",
        description="Reward-model suite: pairwise accuracy by category and reliability diagrams on HH, LLMBar, "
        "MT-Bench human judgments, PandaLM, ETHICS utilitarianism and AlpacaEval; the share of CrowS-Pairs and "
        "StereoSet pairs where the stereotype scores higher (0.5 = unbiased); moderation precision and recall per "
        "category on OpenAI's moderation samples (test split) and XSTest's labelled completions.")
    suite_reward.add_argument("--model", action="append", default=None,
                              help="Keel reward-model directory, or 'default'; give it twice to compare two models "
                              "(default: the default reward model)")
    suite_reward.add_argument("--backend", default="auto", choices=REWARD_BACKENDS,
                              help="which weights score: int8 ONNX, fp32 ONNX or torch; auto (default) picks as "
                              "`keel serve` does on this machine")
    suite_policy = suite.add_parser(
        "policy", help="refusal, over-refusal, toxicity, truthfulness and bias of a policy",
        description="Policy suite (greedy decoding): refusal on AdvBench, HarmBench, SimpleSafetyTests and "
        "Do-Not-Answer; XSTest compliance (safe) and refusal (unsafe); toxicity of RealToxicityPrompts and ToxiGen "
        "continuations as the reward model's moderation rule judges it; TruthfulQA MC1/MC2 and BBQ accuracy and bias "
        "by answer likelihood; BOLD flag rates and harmless scores per group.")
    suite_policy.add_argument("--policy", action="append", default=None,
                              help="policy directory, HF name or 'default'; give it twice to compare before and "
                              "after (default: the default policy)")
    suite_policy.add_argument("--reward-model", default="default",
                              help="the Keel reward model that judges toxicity (default: the default reward model)")
    suite_policy.add_argument("--max-new-tokens", type=positive_int, default=48,
                              help="tokens per response (default: 48)")
    suite_policy.add_argument("--max-prompt-length", type=positive_int, default=256,
                              help="prompt tokens kept, oldest dropped first (default: 256)")
    suite_policy.add_argument("--batch-size", type=positive_int, default=16,
                              help="prompts per generation batch (default: 16)")
    for parser_ in (suite_reward, suite_policy):
        add_suite_arguments(parser_, REWARD_SETS if parser_ is suite_reward else POLICY_SETS)

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

    serve = commands.add_parser(
        "serve", help="serve reward scoring and moderation over HTTP", allow_abbrev=False,
        description="Serve /v1/score, /v1/moderations, /v1/models, /healthz, /readyz and /metrics. Every option "
        "is also read from a KEEL_* environment variable (e.g. --max-items from KEEL_MAX_ITEMS); flags win. "
        "Without --model, the default reward model is used, trained first if it is absent. Secrets have no flag, "
        "which `ps` would show: API keys come from --api-keys-file or KEEL_API_KEYS, the upstream's key from "
        "KEEL_UPSTREAM_API_KEY.")
    add_settings_arguments(serve)
    return parser


def train_policy(args: argparse.Namespace) -> int:
    from training.config import PolicyConfig, load_config

    config = load_config(PolicyConfig, args.config, args.overrides)
    manifest = ALGORITHMS[args.what].load()(config, args.output, resume=args.resume, overwrite=args.overwrite,
                     skip_bad_rows=args.skip_bad_rows, progress=not args.no_progress)
    if manifest:
        print(json.dumps(manifest["final_evaluation"], indent=2))
        if manifest["stopped_early"]:
            print(f"stopped early: {manifest['stopped_early']}")
        print(f"policy written to {args.output}")
    return 0


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per service setting, with the setting's description; unset flags fall back to KEEL_* or defaults."""
    from service.settings import Settings

    for name, field in Settings.model_fields.items():
        if (field.json_schema_extra or {}).get("env_only"):
            continue  # secrets: never on a command line, where `ps` shows them
        flag = "--" + name.replace("_", "-")
        env = f"KEEL_{name.upper()}"
        # A default of None is described in the field's own text ("default: one per CPU core ...").
        default = "" if field.default_factory or field.default is None else f"; default: {field.default}"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{field.description} (env {env}{default})")
        else:
            choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
            parser.add_argument(flag, default=None, choices=choices, help=f"{field.description} (env {env}{default})")


def run_eval_reward(args: argparse.Namespace) -> int:
    from training.artifact import read_manifest
    from training.data import DataSource, load_source
    from training.evaluate import evaluate_examples, torch_scorer
    from training.onnx_export import FP32_FILE, INT8_FILE, onnx_scorer
    from training.reward_model import RewardModel, load_tokenizer

    manifest = read_manifest(args.model)
    tokenizer = load_tokenizer(str(args.model), manifest["max_length"], manifest["truncation_side"])
    if args.backend == "torch":
        scorer = torch_scorer(RewardModel.load(args.model, manifest["heads"]), tokenizer, manifest["max_length"])
    else:
        onnx_file = args.model / (FP32_FILE if args.backend == "onnx" else INT8_FILE)
        scorer = onnx_scorer(onnx_file, tokenizer, manifest["max_length"])
    report = {}
    for path in args.data:
        examples = load_source(DataSource(path, split=args.split, limit=args.limit), args.skip_bad_rows)
        report[path] = evaluate_examples(scorer, examples, manifest["heads"])
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for path, heads in report.items():
        print(path)
        for head, metrics in heads.items():
            print(f"  {head:>12}: " + "  ".join(f"{k}={format_metric(v)}" for k, v in metrics.items()))
    return 0


def format_metric(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):  # an interval
        return "[" + ", ".join(format_metric(v) for v in value) + "]"
    return str(value)


KEEL_LOGGERS = ("training", "service", "keel")  # module loggers (training.*, service.*) and keel.service


def discard_unstarted_run(args: argparse.Namespace) -> None:
    """A training run that failed before its first checkpoint leaves no OUTPUT.work behind: nothing to resume."""
    if args.command == "train" and getattr(args, "output", None) is not None:
        from training.runs import discard_work_without_checkpoints

        discard_work_without_checkpoints(Path(args.output))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Keel's own progress at INFO; other libraries' INFO lines (ONNX Runtime's quantiser logs every tensor it
    # skips, accelerate every checkpoint file) only with --verbose.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in KEEL_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from training.artifact import ArtifactError
    from training.config import ConfigError
    from training.data import DataError
    from training.rewards import RewardError

    try:
        if args.command == "train" and args.what == "reward":
            from training.config import RewardConfig, load_config
            from training.train_reward import train_reward

            config = load_config(RewardConfig, args.config, args.overrides)
            manifest = train_reward(config, args.output, resume=args.resume, overwrite=args.overwrite,
                                    skip_bad_rows=args.skip_bad_rows, progress=not args.no_progress)
            if manifest:
                print(json.dumps(manifest["metrics"], indent=2))
                print(f"reward model written to {args.output}")
            return 0
        if args.command == "train":
            return train_policy(args)
        if args.command == "eval" and args.what == "reward":
            return run_eval_reward(args)
        if args.command == "export":
            from training.train_reward import reexport

            manifest = reexport(args.model, args.int8, args.skip_bad_rows, args.data)
            print(json.dumps(manifest["onnx"], indent=2))
            print(f"ONNX graphs of {args.model} re-exported")
            return 0
        if args.command == "eval" and args.what == "policy":
            from training.eval_policy import run_eval_policy

            return run_eval_policy(args)
        if args.command == "eval" and args.what == "suite":
            if args.suite == "reward":
                args.model = args.model or ["default"]
            else:
                args.policy = args.policy or ["default"]
            from training.eval_suite import run_suite_command

            return run_suite_command(args)
        if args.command == "serve":
            from pydantic import ValidationError

            from service.server import serve
            from service.settings import Settings, SettingsError

            given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
            try:
                settings = Settings(**given)
            except ValidationError as error:  # checked before any model is loaded or trained
                for problem in error.errors():
                    if not problem["loc"]:  # a rule between settings: its message names them
                        print(f"keel serve: error: {problem['msg'].removeprefix('Value error, ')}", file=sys.stderr)
                        continue
                    name = str(problem["loc"][0])
                    print(f"keel serve: error: --{name.replace('_', '-')} (or KEEL_{name.upper()}): {problem['msg']}",
                          file=sys.stderr)
                return 2
            try:
                serve(settings)
            except SettingsError as error:
                print(f"keel serve: error: {error}", file=sys.stderr)
                return 2
            return 0
    except (ConfigError, DataError, ArtifactError, RewardError, FileExistsError, FileNotFoundError) as error:
        discard_unstarted_run(args)
        print(f"keel: error: {error}", file=sys.stderr)
        return 2
    except BaseException:
        discard_unstarted_run(args)
        raise
    raise AssertionError(f"unhandled command {args}")


if __name__ == "__main__":
    sys.exit(main())
