"""The chat guard's operating point, chosen on validation only: the share of each validation set the guard would
flag if it demanded a margin m (log-odds) over the moderation thresholds, and the margin the rule picks.

    python bench/guard_margin_bench.py --model DIR [--config configs/moderation.yaml] [--recall 0.9]

Rule: the widest margin on the grid that keeps at least --recall of the harmful validation requests flagged
(every request source, pooled) and at least --recall of GPTFuzz's complying replies: the rule training applies
(`guard` in configs/moderation.yaml, choose_guard_margin), here on the served scores (int8 where auto picks
it). XSTest and every test split stay out. CoCoNot's preference-set look-alikes (validation split, never trained
on by the default config) are shown beside the configured sets when the shared data holds them (--look-alikes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.abuse_bench import cpu
from bench.moderation_bench import Judge
from keel.training.config import DEFAULT_MODERATION_CONFIG, load_config
from keel.training.moderation.config import GuardRule, ModerationConfig, ModerationSource
from keel.training.moderation.data import Labelled, any_harm_labels, load_labelled
from keel.training.moderation.train import choose_guard_margin, margins_over_thresholds

GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
REQUESTS = ("advbench", "harmbench", "simplesafetytests", "catqa", "dangerousqa", "gptfuzz", "harmfulqa")
REPLIES = "gptfuzz-replies"
SKIPPED = ("openai-moderation", "jigsaw-bias-madlibs", "davidson-hate-offensive")  # not chat requests or replies


def margins(judge: Judge, items: list[Labelled]) -> np.ndarray:
    """Each text's largest log-odds margin over its flaggable categories' thresholds, as served."""
    runtime = judge.runtime
    return margins_over_thresholds(judge(items)[2], runtime.categories, runtime.manifest.thresholds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="moderation-model directory")
    parser.add_argument("--config", type=Path, default=DEFAULT_MODERATION_CONFIG, help="the model's training "
                        "config (its validation splits)")
    parser.add_argument("--recall", type=float, default=0.9, help="share of harmful requests and of complying "
                        "replies the guard must still flag")
    parser.add_argument("--look-alikes", type=Path, default=ROOT.parent / "shared/data/coconot/coconot_pref.jsonl.gz",
                        help="CoCoNot's preference set, shown for its look-alikes (skipped if absent)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()
    config = load_config(ModerationConfig, args.config)
    judge = Judge(args.model)
    sources = [s for s in config.validation if s.name not in SKIPPED]
    if args.look_alikes.exists():
        where = {"category": "Requests with safety concerns"}
        sources += [ModerationSource(name="coconot-pref", path=str(args.look_alikes), text="prompt",
                                     split="validation", where=where, rest=0),
                    ModerationSource(name="coconot-pref-replies", path=str(args.look_alikes), text="chosen",
                                     context="prompt", split="validation", where=where, rest=0)]
    groups: dict[str, list[Labelled]] = {}
    for source in sources:
        groups.setdefault(source.name, []).extend(load_labelled(source, config, "validation"))
    rows: dict[str, np.ndarray] = {}
    margin_of = {name: margins(judge, items) for name, items in groups.items()}  # each set scored once
    for name, items in groups.items():
        margin, labels = margin_of[name], any_harm_labels(items)
        for kind, mask in (("harmful", labels == 1), ("benign", labels == 0)):
            if mask.any():
                rows[f"{name} ({kind})"] = margin[mask]
    rows["harmful requests, pooled"] = np.concatenate([rows[f"{n} (harmful)"] for n in REQUESTS
                                                       if f"{n} (harmful)" in rows])
    table = {name: {"n": len(m), **{str(g): round(float((m >= g).mean()), 3) for g in GRID}}
             for name, m in rows.items()}
    rule = GuardRule(requests=list(REQUESTS), replies=[REPLIES], recall=args.recall, grid=list(GRID))
    named = [name for name in (*REQUESTS, REPLIES) if name in groups]
    chosen, why = choose_guard_margin(np.concatenate([margin_of[name] for name in named]),
                                      [item for name in named for item in groups[name]], rule)
    report = {"cpu": cpu(), "rule_recall": args.recall, "chosen_margin": chosen, "rule": why, "validation": table}
    print(f"{'validation set':40s} {'n':>5s} " + " ".join(f"{g:>6}" for g in GRID))
    for name, entry in table.items():
        print(f"{name:40s} {entry['n']:5d} " + " ".join(f"{entry[str(g)]:6.3f}" for g in GRID))
    print("chosen margin:", report["chosen_margin"])
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
