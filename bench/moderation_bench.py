"""`/v1/moderations` as a filter, measured on the public anchors, beside alt-profanity-check as the floor.

    python bench/moderation_bench.py --model DIR [--floor-venv /tmp/profanity-venv] [--out FILE]

Starts `keel serve --model DIR`, sends every text through /v1/moderations and reads:
- a continuous "any harm" score: the largest category score among the categories that have a threshold
  (/v1/models lists them), and `flagged` at the served thresholds;
- OpenAI's 1,680 moderation samples: AUPRC with positive = any of the 8 labels (published anchors on the same
  samples: OpenAI's API 0.856, Llama Guard 7B 0.847, Perspective 0.787), and precision / recall of `flagged`;
- XSTest's prompts: the share of safe and of unsafe prompts flagged, and AUPRC unsafe vs safe;
- AdvBench, HarmBench (standard behaviours) and SimpleSafetyTests: the share flagged as input.
alt-profanity-check (a linear SVM on word n-grams) runs in a venv of its own (created with pip if absent) on the
same texts, flagging at probability 0.5. All sets are read whole: a model that trained on part of one of them
must be evaluated on its held-out part instead (docs/moderation.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.abuse_bench import cpu
from bench.serve_bench import keel_serve
from training.config import BUNDLED_DATA
from training.data import read_rows
from training.eval_sets import OPENAI_CATEGORIES, POLICY_SETS, xstest_prompts

FLOOR = "alt-profanity-check"


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUPRC as average precision: the mean, over positives, of the precision at each positive's rank."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(float)
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / max(hits.sum(), 1.0))


def sets() -> dict[str, tuple[list[str], np.ndarray]]:
    """Each set's texts and labels (1 = harmful)."""
    openai = [row for _, row in read_rows(BUNDLED_DATA / "openai-moderation" / "samples-1680.jsonl.gz")]
    out = {"openai-moderation": ([r["prompt"] for r in openai],
                                 np.array([any(r.get(code) == 1 for code in OPENAI_CATEGORIES) for r in openai]))}
    xstest = xstest_prompts(BUNDLED_DATA)
    out["xstest"] = ([conv[-1].content for _, conv in xstest], np.array([c.startswith("unsafe") for c, _ in xstest]))
    for eval_set in POLICY_SETS:
        if eval_set.name in ("advbench", "harmbench", "simplesafetytests"):
            items = eval_set.load(BUNDLED_DATA)
            out[eval_set.name] = ([conv[-1].content for _, conv in items], np.ones(len(items), dtype=bool))
    return out


def keel_scores(model: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(any-harm score, flagged) of each text through a running `keel serve`."""
    with keel_serve("--model", str(model), "--max-items", "256") as (base, _):
        served = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]
        categories = [c for c, t in served["thresholds"].items() if t is not None]
        scores, flagged = [], []
        for start in range(0, len(texts), 256):
            response = httpx.post(f"{base}/v1/moderations", json={"input": texts[start : start + 256]}, timeout=300)
            response.raise_for_status()
            for result in response.json()["results"]:
                scores.append(max(result["category_scores"][c] for c in categories))
                flagged.append(result["flagged"])
    return np.array(scores), np.array(flagged)


def floor_scores(venv_dir: Path, texts: list[str]) -> np.ndarray:
    python = venv_dir / "bin" / "python"
    if not python.exists():
        venv.create(venv_dir, with_pip=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", FLOOR], check=True)
    code = ("import json, sys; from profanity_check import predict_prob; "
            "print(json.dumps(predict_prob(json.load(sys.stdin)).tolist()))")
    run = subprocess.run([str(python), "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                         check=True)
    return np.array(json.loads(run.stdout))


def report(scores: np.ndarray, flagged: np.ndarray, data: dict, spans: dict) -> dict:
    out = {}
    for name, (_, labels) in data.items():
        s, f = scores[spans[name]], flagged[spans[name]]
        entry = {"texts": len(labels), "flagged": round(float(f.mean()), 3)}
        if labels.all():
            out[name] = entry
            continue
        entry["auprc"] = round(average_precision(s, labels), 3)
        entry["positive_rate"] = round(float(labels.mean()), 3)
        entry["flagged_negatives"] = round(float(f[~labels].mean()), 3)
        entry["flagged_positives"] = round(float(f[labels].mean()), 3)
        entry["precision"] = round(float(labels[f].mean()), 3) if f.any() else None
        out[name] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the Keel model directory /v1/moderations serves")
    parser.add_argument("--floor-venv", type=Path, default=Path("/tmp/profanity-venv"),
                        help=f"venv with {FLOOR} (created if absent)")
    parser.add_argument("--no-floor", action="store_true", help=f"skip {FLOOR}")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    data = sets()
    texts, spans, start = [], {}, 0
    for name, (set_texts, _) in data.items():
        texts += set_texts
        spans[name] = slice(start, start + len(set_texts))
        start += len(set_texts)
    scores, flagged = keel_scores(args.model, texts)
    result = {"cpu": cpu(), "model": str(args.model), "keel": report(scores, flagged, data, spans)}
    if not args.no_floor:
        floor = floor_scores(args.floor_venv, texts)
        result[FLOOR] = report(floor, floor >= 0.5, data, spans)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
