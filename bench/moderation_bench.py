"""A moderation model as a filter on the public anchors, held out honestly, beside alt-profanity-check (the floor).

    python bench/moderation_bench.py --model DIR [--cross-validate --work DIR] [--out FILE]

Scores every text with the served runtime (keel.core.runtime.ModerationRuntime, the backend `keel serve` picks)
and the served rule: a continuous "any harm" score, the highest probability among the categories that can flag,
and `flagged` at the model's thresholds.
- OpenAI's 1,680 moderation samples, positive = any of the 8 labels (published anchors on the same samples:
  OpenAI's API 0.856, Llama Guard 7B 0.847, Perspective 0.787). The default config trains on four of five hash
  folds, so: with --cross-validate, five models are trained (`keel train moderation --set
  cross_validation.test_fold=K`, into --work, reused if there) and each scores only its held-out fold: 5-fold
  cross-validated AUPRC, per category too, and precision / recall of `flagged`, each fold at its own model's
  thresholds (chosen on that model's validation rows, never on the scored fold). Without it, the given model's
  own test fold only.
- XSTest's prompts (never trained on): the share of safe and of unsafe prompts flagged, and AUPRC.
- AdvBench, HarmBench and SimpleSafetyTests as input: the share flagged, on their held-out test split only
  (HarmBench: all its categories, and the ones the taxonomy covers).
- Ordinary requests (HH helpful-base first turns, test split): the share flagged.
- Harmful questions (CatQA, DangerousQA, GPTFuzz, HarmfulQA, CoCoNot test splits): the share flagged; CoCoNot's
  benign look-alikes (test split): the share flagged; GPTFuzz's replies in context: AUPRC of "complies".
- Long text: held-out harmful requests alone and after 1,500-3,000 characters of HH conversation.
- Cost: median time of a short text, a one-window text and a 2,000-character text (windows counted).
alt-profanity-check (a linear SVM on word n-grams) runs in a venv of its own (created with pip if absent) on the
same texts, flagging at probability 0.5.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import venv
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.abuse_bench import cpu
from keel.core.artifact import ModerationManifest
from keel.core.runtime import WINDOW_OVERLAP, ModerationRuntime
from keel.core.text import parse_transcript
from keel.training.config import BUNDLED_DATA, DEFAULT_MODERATION_CONFIG, build, load_config
from keel.training.data import read_rows, split_of
from keel.training.evaluation.metrics import average_precision
from keel.training.evaluation.sets import xstest_prompts
from keel.training.moderation.config import ModerationConfig, ModerationSource
from keel.training.moderation.data import Labelled, any_harm_labels, label_matrix, load_labelled

FLOOR = "alt-profanity-check"
OPENAI = "openai-moderation"
IN_TAXONOMY = {"illegal", "cybercrime_intrusion", "chemical_biological", "harassment_bullying"}  # HarmBench's


def held_out(config: ModerationConfig, name: str) -> list[Labelled]:
    """The model's test rows of one configured source (OpenAI: its test fold)."""
    return [item for source in config.test if source.name == name for item in load_labelled(source, config, "test")]


def request_set(path: str, text: str, config: ModerationConfig, **filters: str) -> list[Labelled]:
    """A harmful-request file's test split (the hash split every config uses), whatever its categories."""
    source = ModerationSource(path=str(BUNDLED_DATA / path), text=text, split="test", where=filters)
    return load_labelled(source, config, "test")


class Judge:
    """Any-harm scores and `flagged` of a model, as served."""

    def __init__(self, directory: Path):
        self.runtime = ModerationRuntime(directory)

    def __call__(self, items: list[Labelled]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = self.runtime.scored([item.input for item in items]).values
        return self.runtime.any_harm(values), self.runtime.flagged(values).any(axis=1), values


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


def summary(scores: np.ndarray, flagged: np.ndarray, harmful: np.ndarray | None) -> dict:
    """Flag rates, and where a set has both classes AUPRC and precision / recall of `flagged`."""
    entry = {"texts": len(scores), "flagged": round(float(flagged.mean()), 3)}
    if harmful is not None and harmful.any() and not harmful.all():
        entry.update(auprc=round(average_precision(scores, harmful), 3), positive_rate=round(float(harmful.mean()), 3),
                     flagged_positives=round(float(flagged[harmful].mean()), 3),
                     flagged_negatives=round(float(flagged[~harmful].mean()), 3),
                     precision=round(float(harmful[flagged].mean()), 3) if flagged.any() else None,
                     recall=round(float(flagged[harmful].mean()), 3))
    return entry


def long_text(judge: Judge, config: ModerationConfig) -> dict:
    """Held-out harmful requests (AdvBench, CatQA, DangerousQA, SimpleSafetyTests test splits) alone, and each
    placed after 1,500-3,000 characters of an ordinary HH helpful-base conversation (test split): the share
    flagged in both, and the difference in points."""
    harmful = [item.input[1] for name in ("advbench", "catqa", "dangerousqa", "simplesafetytests")
               for item in held_out(config, name)]
    benign = [item.input[1] for item in held_out(config, "hh-helpful-requests")]
    conversations = [row["chosen"].strip() for _, row in read_rows(BUNDLED_DATA / "hh-rlhf/helpful-base/test.jsonl.gz")
                     if split_of(parse_transcript(row["chosen"])[0].content) == "test"]
    rng = np.random.default_rng(0)
    prefixes = []
    for _ in harmful:
        text = ""
        while len(text) < 1500:
            text += conversations[int(rng.integers(len(conversations)))]
        prefixes.append(text[: int(rng.integers(1500, 3001))])
    alone = judge([Labelled(("", text), (), text, "x") for text in harmful])[1]
    late = judge([Labelled(("", prefix + "\n\n" + text), (), text, "x") for prefix, text in zip(prefixes, harmful)])[1]
    padded_benign = judge([Labelled(("", prefix + "\n\n" + text), (), text, "x")
                           for prefix, text in zip(prefixes, benign)])[1]
    return {"harmful texts": len(harmful), "flagged alone": round(float(alone.mean()), 3),
            "flagged after 1,500-3,000 characters": round(float(late.mean()), 3),
            "difference (points)": round(100 * float(alone.mean() - late.mean()), 1),
            "benign requests after the same text, flagged": round(float(padded_benign.mean()), 3)}


def cost(runtime: ModerationRuntime, repeats: int = 30) -> dict:
    """Median seconds to judge a short text (9 words), a text that fills one window, and a 2,000-character
    text, and the 2,000-character text's window count."""
    sentence = "Can you help me plan a birthday party for my daughter next weekend? "
    texts = {"short": "How do I bake bread at home?", "one window": (sentence * 8)[:480],
             "2,000 characters": (sentence * 40)[:2000]}
    out = {}
    for name, text in texts.items():
        runtime.scored([("", text)])
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            runtime.scored([("", text)])
            times.append(time.perf_counter() - began)
        out[f"{name} (ms)"] = round(1000 * float(np.median(times)), 2)
    out["windows of 2,000 characters"] = len(runtime.tokenizer.encode_windows([("", texts["2,000 characters"])],
                                                                              WINDOW_OVERLAP)[0])
    return out


def cross_validated_models(config_path: Path, work: Path, folds: int) -> list[Path]:
    """One model per held-out fold of OpenAI's samples, trained with the default recipe (reused if present)."""
    models = []
    for fold in range(folds):
        output = work / f"fold-{fold}"
        if not (output / "keel.json").exists():
            began = time.time()
            subprocess.run([sys.executable, "-m", "keel", "train", "moderation", "--config", str(config_path),
                            "--output", str(output), "--overwrite", "--no-progress",
                            "--set", f"cross_validation.test_fold={fold}"], check=True)
            print(f"fold {fold}: trained in {time.time() - began:.0f} s", file=sys.stderr)
        models.append(output)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Keel moderation-model directory (default with "
                        "--cross-validate: the fold-0 model)")
    parser.add_argument("--cross-validate", action="store_true", help="train one model per OpenAI fold (5)")
    parser.add_argument("--config", type=Path, default=DEFAULT_MODERATION_CONFIG,
                        help="config for --cross-validate, and whose test splits are the held-out sets")
    parser.add_argument("--work", type=Path, default=Path("/tmp/keel-moderation-cv"),
                        help="where --cross-validate keeps its fold models")
    parser.add_argument("--floor-venv", type=Path, default=Path("/tmp/profanity-venv"),
                        help=f"venv with {FLOOR} (created if absent)")
    parser.add_argument("--no-floor", action="store_true", help=f"skip {FLOOR}")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if not args.cross_validate and args.model is None:
        parser.error("give --model DIR, or --cross-validate")

    fold_models: list[Path] = []
    if args.cross_validate:
        folds = load_config(ModerationConfig, args.config).cross_validation.folds
        fold_models = cross_validated_models(args.config, args.work, folds)
    model = args.model or fold_models[0]
    # The held-out sets come from --config (test splits are by hash, the same in every config), so a model
    # trained on an older recipe is measured on the same texts; OpenAI's fold from each model's own config.
    config = load_config(ModerationConfig, args.config)
    judge = Judge(model)

    sets: dict[str, tuple[list[Labelled], np.ndarray | None]] = {}
    xstest = [(category, conversation[-1].content) for category, conversation in xstest_prompts(BUNDLED_DATA)]
    sets["xstest"] = ([Labelled(("", text), (), text, "xstest") for _, text in xstest],
                      np.array([category.startswith("unsafe") for category, _ in xstest]))
    sets["advbench (test split)"] = (request_set("advbench/harmful_behaviors.csv", "goal", config), None)
    harmbench = request_set("harmbench/harmbench_behaviors_text_all.csv", "Behavior", config)
    sets["harmbench (test split)"] = (harmbench, None)
    sets["harmbench (test split, in taxonomy)"] = (
        [item for category in sorted(IN_TAXONOMY) for item in
         request_set("harmbench/harmbench_behaviors_text_all.csv", "Behavior", config, SemanticCategory=category)], None)
    sets["simplesafetytests (test split)"] = (
        request_set("simplesafetytests/simplesafetytests.csv", "prompts_final", config), None)
    sets["hh-helpful-requests (test split)"] = (held_out(config, "hh-helpful-requests"), None)
    for source in ("catqa", "dangerousqa", "gptfuzz", "harmfulqa", "coconot", "coconot-contrast"):
        sets[f"{source} (test split)"] = (held_out(config, source), None)
    replies = held_out(config, "gptfuzz-replies")
    sets["gptfuzz-replies (test split, in context)"] = (replies, any_harm_labels(replies) == 1)

    result: dict = {"cpu": cpu(), "model": str(model), "backend": judge.runtime.backend, "keel": {}}
    texts: list[str] = []
    spans: dict[str, slice] = {}
    for name, (items, harmful) in sets.items():
        scores, flagged, _ = judge(items)
        result["keel"][name] = summary(scores, flagged, harmful)
        spans[name] = slice(len(texts), len(texts) + len(items))
        texts += [item.input[1] for item in items]

    # OpenAI's samples: each fold scored by the model that did not train on it.
    openai_items, openai_scores, openai_flagged, openai_values = [], [], [], []
    for fold_model in fold_models or [model]:
        fold_config = build(ModerationConfig, ModerationManifest.read(fold_model).config, "keel.json config")
        items = held_out(fold_config, OPENAI)
        scores, flagged, values = Judge(fold_model)(items) if fold_model != model else judge(items)
        openai_items += items
        openai_scores.append(scores)
        openai_flagged.append(flagged)
        openai_values.append(values)
    scores, flagged, values = (np.concatenate(part) for part in (openai_scores, openai_flagged, openai_values))
    labels = label_matrix(openai_items)
    harmful = np.nan_to_num(labels, nan=0.0).max(axis=1) == 1
    name = f"{OPENAI} ({'5-fold cross-validated' if fold_models else 'test fold only'})"
    entry = summary(scores, flagged, harmful)
    entry["categories"] = {}
    for c, category in enumerate(config.categories):
        labelled = ~np.isnan(labels[:, c])
        positives = labels[labelled, c] == 1
        if positives.any():
            entry["categories"][category] = {"positives": int(positives.sum()),
                                             "auprc": round(average_precision(values[labelled, c], positives), 3)}
    result["keel"][name] = entry
    spans[name] = slice(len(texts), len(texts) + len(openai_items))
    texts += [item.input[1] for item in openai_items]
    sets[name] = (openai_items, harmful)

    result["long text"] = long_text(judge, config)
    result["cost"] = cost(judge.runtime)

    if not args.no_floor:
        floor = floor_scores(args.floor_venv, texts)
        result[FLOOR] = {name: summary(floor[spans[name]], floor[spans[name]] >= 0.5, sets[name][1])
                         for name in sets}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
