"""The model card (README.md) each reward-model directory carries, written from its manifest: what the model is,
how to load it, the data it saw, its held-out metrics with 95% intervals, and what it is not for."""

from __future__ import annotations

from pathlib import Path

from keel.core.artifact import RewardManifest
from keel.training.reward.objectives import OBJECTIVES

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
tokenizer = AutoTokenizer.from_pretrained("{directory}", trust_remote_code=True)
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
        lines += [row for objective in OBJECTIVES.values() if (row := objective.card_row(head, metrics))]
    lines += ["", LIMITS.format(max_length=manifest.max_length)]
    return "\n".join(lines)
