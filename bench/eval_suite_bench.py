"""Time the evaluation suites on the default models, cold (empty cache) and re-run (everything cached), and print
their headline figures.

    python bench/eval_suite_bench.py [--external-data ../shared/data] [--policy-limit 50] [--output runs/suite]

Targets (issue 7): the full reward-model suite in <= 20 min, the policy suite with --limit 50 in <= 30 min.
Each suite runs as `keel eval suite ...` in its own process; reports land in OUTPUT/reward and OUTPUT/policy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run_suite(arguments: list[str]) -> float:
    began = time.time()
    subprocess.run([sys.executable, "-m", "keel", "eval", "suite", *arguments, "--no-progress"], check=True)
    return time.time() - began


def headline(report: dict) -> dict[str, dict[str, float]]:
    """The overall figures of every set, for the first model."""
    label = report["models"][0]["label"]
    return {name: entry["models"][label]["overall"] for name, entry in report["sets"].items() if entry["models"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/suite"), help="folder for both reports")
    parser.add_argument("--external-data", type=Path, default=None, help="folder of the NC/SA sets")
    parser.add_argument("--policy-limit", type=int, default=50, help="--limit of the policy suite (default 50)")
    parser.add_argument("--only", choices=["reward", "policy"], default=None, help="run one suite")
    args = parser.parse_args()
    extra = ["--external-data", str(args.external_data)] if args.external_data else []
    cache = args.output / "cache.sqlite"
    cache.unlink(missing_ok=True)
    results = {}
    suites = {"reward": [], "policy": ["--limit", str(args.policy_limit)]}
    for suite, options in suites.items():
        if args.only not in (None, suite):
            continue
        arguments = [suite, *options, *extra, "--cache", str(cache), "--output", str(args.output / suite)]
        cold = run_suite(arguments)
        warm = run_suite(arguments)
        report = json.loads((args.output / suite / "report.json").read_text())
        results[suite] = {"cold_seconds": round(cold, 1), "cached_rerun_seconds": round(warm, 1),
                          "figures": headline(report)}
        print(f"{suite} suite: {cold / 60:.1f} min cold, {warm:.0f} s re-run from the cache")
        for name, figures in results[suite]["figures"].items():
            shown = ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if isinstance(v, float))
            print(f"  {name:<24} {shown}")
    (args.output / "bench.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
