"""The model card (README.md) each reward-model directory carries, written from its manifest: what the model is,
how to load it, the data it saw, its held-out metrics with 95% intervals, and what it is not for."""

from __future__ import annotations

from pathlib import Path

from keel_core.artifact import ModerationManifest, RewardManifest

USE = """\
## How to use

Serve it with Keel (`/v1/score`, `/v1/moderations`):

```bash
keel serve --model {directory}
```

Load it with transformers. The model class ships in this directory (`modeling_keel.py`, named by `auto_map`),
so loading needs `trust_remote_code=True`. Give the conversation so far and the reply as a text pair: the model
pools over the reply's tokens. A bare text is `("", text)`. The outputs are raw scores, one per head.

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

model = AutoModelForSequenceClassification.from_pretrained("{directory}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{directory}")
batch = tokenizer(["Human: How do I bake bread?"], ["Knead, proof, bake."], return_tensors="pt",
                  truncation="longest_first", max_length={max_length})
scores = model(**batch).logits  # [texts, heads]: {heads}

classify = pipeline("text-classification", model="{directory}", trust_remote_code=True, top_k=None)
classify({{"text": "Human: How do I bake bread?", "text_pair": "Knead, proof, bake."}})
```

Keel renders a conversation as Anthropic HH transcripts do (`Human: ...\\n\\nAssistant: ...`). `keel serve`
also reports normalised scores, z = (raw - mean) / std with the validation statistics in `keel.json`.
docs/reward-training.md (in Keel) shows how to use the model as a TRL reward model or reward function.
"""

LIMITS = """\
## Intended use and limits

- Ranking candidate replies (best-of-n, RLHF rewards) and flagging replies for review, on English chat.
- The heads learned what the human raters of their data preferred. They are not calibrated probabilities of
  harm, and they are not a content-moderation classifier.
- Scores drift on text unlike the training data: other languages, code, very long conversations. Beyond
  {max_length} tokens, the oldest turns are cut.
- A pairwise accuracy of a means about 1 - a of such pairs are ranked the wrong way: read the metrics above.
"""


def reward_model_card(manifest: RewardManifest, directory: Path) -> str:
    heads = manifest.heads
    summary = (f"One linear head per principle ({', '.join(heads)}) on the {manifest.base_model} encoder, trained "
               f"by Keel {manifest.keel_version} on {manifest.created_at}. The primary head, served as `score`, is "
               f"`{manifest.primary_head}`.")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-classification",
             "tags: [keel, reward-model]", f"base_model: {manifest.base_model}", "---", "",
             f"# Keel reward model: {', '.join(heads)}", "",
             summary, "",
             USE.format(directory=directory.name, max_length=manifest.max_length, heads=", ".join(heads)),
             "## Data", "", "| file | sha256 | used for |", "|---|---|---|"]
    for entry in manifest.data:
        uses = "; ".join(f"{u['head']} {u['role']} ({u['split']} split)" for u in entry["uses"])
        path = Path(entry["path"])
        lines.append(f"| {path.parent.name}/{path.name} | {entry['sha256'][:12]} | {uses} |")
    lines += ["", "Splits are by a hash of the first human turn, so no conversation opening is in two splits.", "",
              "## Metrics", "", "Held-out test split; 95% Wilson intervals for accuracies.", "",
              "| head | examples | metric | value |", "|---|---|---|---|"]
    for head, metrics in manifest.metrics.get("test", {}).items():
        if "accuracy" in metrics:
            low, high = metrics["accuracy_ci95"]
            lines.append(f"| {head} | {metrics['pairs']} pairs | pairwise accuracy | {metrics['accuracy']:.3f} "
                         f"[{low:.3f}, {high:.3f}] |")
        else:
            lines.append(f"| {head} | {metrics['ratings']} ratings | MSE / Pearson r | {metrics['mse']:.3f} / "
                         f"{metrics['pearson']:.3f} |")
    lines += ["", LIMITS.format(max_length=manifest.max_length)]
    return "\n".join(lines)


MODERATION_USE = """\
## How to use

Serve it with Keel: `keel serve --moderation-model {directory}` answers `/v1/moderations` in OpenAI's shape and
guards chat. Or load it with transformers (the model class ships here as `modeling_keel.py`). A text on its own
is the pair `("", text)`; a reply is judged in its conversation as `(conversation so far, reply)`.

```python
from transformers import pipeline

moderate = pipeline("text-classification", model="{directory}", trust_remote_code=True, top_k=None)
moderate({{"text": "", "text_pair": "some text"}})  # a probability per category
```

A category is flagged when its probability reaches its threshold in `keel.json` (`thresholds`); a category
without a threshold is scored but never flagged.
"""


def moderation_model_card(manifest: ModerationManifest, directory: Path) -> str:
    test = manifest.metrics.get("test", {})
    lines = ["---", "library_name: transformers", "pipeline_tag: text-classification",
             "tags: [keel, moderation]", f"base_model: {manifest.base_model}", "---", "",
             "# Keel moderation model", "",
             (f"One sigmoid output per OpenAI moderation category on the {manifest.base_model} encoder, trained by "
             f"Keel {manifest.keel_version} on {manifest.created_at} with a masked loss: each source labels only "
             "some categories."), "", MODERATION_USE.format(directory=directory.name),
             "## Categories", "",
             ("Thresholds were chosen on validation data; AUPRC, precision and recall are on the held-out test "
             "split, at the threshold."), "",
             "| category | threshold | chosen by | test positives | test AUPRC | precision | recall |",
             "|---|---|---|---|---|---|---|"]
    for name, rule in manifest.thresholds.items():
        m = test.get("categories", {}).get(name, {})
        cells = [f"{m[k]:.3f}" if k in m else "" for k in ("auprc", "precision", "recall")]
        threshold = "never flagged" if rule.threshold is None else f"{rule.threshold:.3f}"
        lines.append(f"| {name} | {threshold} | {rule.rule} | {m.get('positives', 0)} | {' | '.join(cells)} |")
    lines += ["", "## Data", "", "| source | file | sha256 | categories labelled |", "|---|---|---|---|"]
    for entry in manifest.data:
        path = Path(entry["path"])
        labelled = sorted({c for use in entry["uses"] for c in use["labels"]})
        rest = {use["rest"] for use in entry["uses"]} - {None}
        names = ", ".join(dict.fromkeys(use["source"] for use in entry["uses"]))
        lines.append(f"| {names} | {path.parent.name}/{path.name} | {entry['sha256'][:12]} | "
                     f"{', '.join(labelled) or ''}{' (every category: ' + str(rest.pop()) + ')' if rest else ''} |")
    lines += ["", "## Limits", "",
              ("- English text. Categories with few labelled examples (see the table) are weak, and a category "
              "without a threshold is never flagged."),
              f"- Texts beyond {manifest.max_length} tokens are cut.",
              ("- The thresholds are an operating point for a review queue (precision >= 0.8 where the "
              "validation data allow it); choose your own per request (`thresholds`) or per deployment."), ""]
    return "\n".join(lines)
