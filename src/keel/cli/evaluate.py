"""`keel eval reward`, `keel eval policy` and `keel eval suite reward|policy`."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from keel.cli.options import add_cache_arguments, add_overrides, positive_int
from keel.training.config import BUNDLED_DATA, CONFIGS, REWARD_BACKENDS
from keel.training.evaluation.sets import POLICY_SETS, REWARD_SETS, EvalSet


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    eval_reward.set_defaults(func=run_eval_reward)

    eval_policy = evaluate.add_parser(
        "policy", help="held-out reward, KL, refusal of harmful requests and over-refusal of a policy",
        description="Compare a tuned policy with its reference on held-out prompts: mean reward (and its size "
        "in standard deviations of the reference's rewards), KL(policy || reference) per response, refusal rate "
        "on harmful requests (AdvBench, HarmBench, SimpleSafetyTests) and compliance on XSTest's safe prompts. "
        "Refusals are detected by the phrase list in training/evaluation/refusals.py. Greedy replies are cached with the "
        "evaluation suite's, so the reference's are generated once, not at every evaluation.")
    eval_policy.add_argument("--policy", required=True, help="the tuned policy directory (or HF name/path)")
    eval_policy.add_argument("--reference", default=None,
                             help="the reference policy (default: the base_policy in the tuned policy's keel.json)")
    eval_policy.add_argument("--reward-model", default="default",
                             help="Keel reward-model directory (default: the default reward model)")
    eval_policy.add_argument("--config", type=Path, default=CONFIGS / "eval_policy.yaml",
                             help=f"YAML naming the prompt sets (default: {CONFIGS / 'eval_policy.yaml'})")
    add_overrides(eval_policy)
    eval_policy.add_argument("--limit", type=positive_int, default=None, help="at most N prompts per set")
    eval_policy.add_argument("--output", type=Path, default=None, help="also write the report as JSON here")
    eval_policy.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_cache_arguments(eval_policy)
    eval_policy.set_defaults(func=run_eval_policy)

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
    suite_moderation = suite.add_parser(
        "moderation", help="AUPRC, precision, recall and false flags of a moderation model",
        description="Moderation-model suite: on the held-out test split of every source in the (first) model's "
        "config, XSTest's prompts and HarmBench's test split: AUPRC of any harm and per category, and "
        "precision, recall and false-flag rate of `flagged` at the served thresholds.")
    suite_moderation.add_argument("--model", action="append", default=None,
                                  help="Keel moderation-model directory, or 'default'; give it twice to compare two "
                                  "(default: the default moderation model)")
    add_suite_arguments(suite_reward, REWARD_SETS)
    add_suite_arguments(suite_policy, POLICY_SETS)
    add_suite_arguments(suite_moderation, [])
    suite_reward.set_defaults(func=run_suite)
    suite_policy.set_defaults(func=run_suite)
    suite_moderation.set_defaults(func=run_suite)


def add_suite_arguments(parser: argparse.ArgumentParser, sets: Sequence[EvalSet]) -> None:
    parser.add_argument("--output", type=Path, required=True,
                        help="folder for report.html, report.json and the PNG charts (created if absent)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="at most N items per set, spread evenly over the set (default: all)")
    parser.add_argument("--sets", default=None,
                        help="comma-separated sets to run (default: all): " + (", ".join(s.name for s in sets) or
                                                                              "the config's source names, xstest, harmbench"))
    parser.add_argument("--data", type=Path, default=BUNDLED_DATA,
                        help=f"folder of the bundled, permissively licensed sets (default: {BUNDLED_DATA})")
    parser.add_argument("--external-data", type=Path, default=None,
                        help="folder laid out like the upstream data bundle holding the non-commercial or "
                        "share-alike sets Keel does not ship (AlpacaEval, CrowS-Pairs, StereoSet, Do-Not-Answer, "
                        "BOLD); without it those sets are skipped and the report says so")
    add_cache_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_eval_reward(args: argparse.Namespace) -> int:
    from keel.core.artifact import RewardManifest
    from keel.core.onnx_engine import FP32_FILE, INT8_FILE
    from keel.core.reward_model import RewardModel
    from keel.training.data import DataSource, load_source
    from keel.training.encoder.onnx_export import onnx_scorer
    from keel.training.encoder.optim import load_tokenizer
    from keel.training.encoder.scoring import torch_scorer
    from keel.training.reward.objectives import evaluate_examples

    manifest = RewardManifest.read(args.model)
    tokenizer = load_tokenizer(str(args.model), manifest.max_length, manifest.truncation_side)
    if args.backend == "torch":
        scorer = torch_scorer(RewardModel.load(args.model), tokenizer, manifest.max_length)
    else:
        onnx_file = args.model / (FP32_FILE if args.backend == "onnx" else INT8_FILE)
        scorer = onnx_scorer(onnx_file, tokenizer, manifest.max_length)
    report = {}
    for path in args.data:
        examples = load_source(DataSource(path, split=args.split, limit=args.limit), args.skip_bad_rows)
        report[path] = evaluate_examples(scorer, examples, manifest.heads)
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


def run_eval_policy(args: argparse.Namespace) -> int:
    from keel.core.artifact import write_json_atomic
    from keel.training.config import load_config
    from keel.training.evaluation.cache import EvalCache
    from keel.training.evaluation.policy_eval import EvalPolicyConfig, evaluate_policy, format_report

    config = load_config(EvalPolicyConfig, args.config, args.overrides)
    if args.reward_model:
        config.reward.model = args.reward_model
    cache = EvalCache(None if args.no_cache else args.cache)
    report = evaluate_policy(config, args.policy, args.reference, args.limit, progress=not args.no_progress,
                             cache=cache)
    report["cache"] = {"hits": cache.hits, "misses": cache.misses}
    if args.output:
        write_json_atomic(Path(args.output), report)
    print(format_report(report))
    return 0


def run_suite(args: argparse.Namespace) -> int:
    from keel.training.config import ConfigError
    from keel.training.evaluation.cache import EvalCache
    from keel.training.evaluation.policy_suite import run_policy_suite
    from keel.training.evaluation.report import write_report
    from keel.training.evaluation.reward_suite import run_reward_suite

    if args.external_data is not None and not args.external_data.is_dir():
        raise ConfigError(f"--external-data {args.external_data} is not a folder")
    cache = EvalCache(None if args.no_cache else args.cache)
    began = time.perf_counter()
    if args.suite == "moderation":
        from keel.core.bundled import default_model_dir
        from keel.training.default_models import ensure_default_moderation_model
        from keel.training.evaluation.moderation_suite import run_moderation_suite

        models = [str(ensure_default_moderation_model(default_model_dir("moderation"))) if m == "default" else m
                  for m in args.model or ["default"]]
        if len(models) > 2:
            raise ConfigError("compare at most two moderation models (--model A --model B)")
        report = run_moderation_suite(models, args.sets.split(",") if args.sets else None, args.data, args.limit,
                                      progress=not args.no_progress)
    elif args.suite == "reward":
        args.model = args.model or ["default"]
        if len(args.model) > 2:
            raise ConfigError("compare at most two reward models (--model A --model B)")
        report = run_reward_suite(args.model, selected_sets(args.sets, REWARD_SETS), args.data, args.external_data,
                                  args.limit, args.backend, cache, progress=not args.no_progress)
    else:
        args.policy = args.policy or ["default"]
        if len(args.policy) > 2:
            raise ConfigError("compare at most two policies (--policy BEFORE --policy AFTER)")
        report = run_policy_suite(args.policy, args.reward_model, selected_sets(args.sets, POLICY_SETS), args.data,
                                  args.external_data, args.limit, cache, args.max_prompt_length,
                                  args.max_new_tokens, args.batch_size, progress=not args.no_progress)
    report["seconds"] = round(time.perf_counter() - began, 1)
    cached = args.suite != "moderation"  # a moderation model scores its sets in seconds: nothing is cached
    if cached:
        report["cache"] = {"hits": cache.hits, "misses": cache.misses}
    html = write_report(report, args.output)
    print(f"{report['kind']} suite: {len(report['sets'])} sets in {report['seconds']} s"
          + (f" (cache: {cache.hits} reused, {cache.misses} computed)" if cached else "") + f"; report: {html}")
    return 0


def selected_sets(names: str | None, sets: Sequence[EvalSet]) -> list[EvalSet]:
    from keel.training.config import ConfigError

    if names is None:
        return list(sets)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {s.name: s for s in sets}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ConfigError(f"unknown sets {unknown}; choose from {sorted(known)}")
    return [known[n] for n in wanted]
