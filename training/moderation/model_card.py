"""The model card (README.md) each moderation-model directory carries, written from its manifest: how to use it,
each category's threshold and held-out quality, the data it saw, and its limits."""

from __future__ import annotations

from pathlib import Path

from keel.core.artifact import ModerationManifest

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
              (f"- The model reads {manifest.max_length} tokens; `keel serve` judges a longer text in overlapping "
               "windows (each category's highest score), a plain `pipeline` cuts it."),
              ("- The thresholds are an operating point (precision >= 0.8 on the pooled validation data, shrunk "
               "toward a shared any-harm threshold where a category has few positives); choose your own per "
               "request (`thresholds`) or per deployment."), ""]
    return "\n".join(lines)
