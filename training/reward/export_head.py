"""`keel export head`: one head of a Keel reward or moderation model as a one-label Hugging Face sequence
classifier, the shape TRL's reward-model loading expects (`AutoModelForSequenceClassification.from_pretrained(OUT,
num_labels=1)`, reading `logits[:, 0]`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from keel.core.artifact import ArtifactError, read_manifest, staged, write_text_atomic
from keel.core.reward_model import RewardModel, label_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

CARD = """\
# {head}: one head of {source}

The `{head}` head of the Keel model in `{source}`, alone, as a one-label sequence classifier
(`keel export head`). Loading needs `trust_remote_code=True`: the class in `modeling_keel.py` mean-pools over
the reply's tokens, which no standard class does.

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained("{out}", num_labels=1, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{out}", trust_remote_code=True)
batch = tokenizer(["Human: How do I bake bread?"], ["Knead, proof, bake."], return_tensors="pt")
raw = model(**batch).logits[:, 0]  # the raw score Keel serves for this head
```

{meaning} A reward trainer that passes one text per completion (TRL's GRPOTrainer does) has no reply segment, so
the model pools over prompt and reply together.
"""
REWARD_MEANING = "A raw score: `/v1/score` serves this head's score as (raw - {mean}) / {std}."
MODERATION_MEANING = ("A logit: sigmoid(raw) is the probability `/v1/moderations` reports as this category's score, "
                      "flagged at {threshold}.")


def export_head(directory: Path, head: str, output: Path, overwrite: bool = False) -> None:
    manifest = read_manifest(directory)
    heads: list[str] = manifest.get("heads") or manifest["categories"]  # a reward or a moderation model
    if head not in heads:
        raise ArtifactError(f"{directory} has no head {head!r}; its heads are {', '.join(heads)}")
    index = heads.index(head)
    model = RewardModel.load(directory)
    single = RewardModel(label_config(model.backbone.config, [head], model.config.problem_type), model.backbone)
    with torch.no_grad():
        single.heads.weight.copy_(model.heads.weight[index:index + 1])
        single.heads.bias.copy_(model.heads.bias[index:index + 1])
    if "thresholds" in manifest:
        meaning = MODERATION_MEANING.format(threshold=manifest["thresholds"][head].get("threshold"))
    else:
        meaning = REWARD_MEANING.format(**manifest["normalization"][head])
    with staged(output, overwrite) as staging:
        single.save(staging)
        for name in TOKENIZER_FILES:
            if (directory / name).exists():
                shutil.copy2(directory / name, staging / name)
        write_text_atomic(staging / "README.md", CARD.format(
            head=head, source=directory, out=output, meaning=meaning))
