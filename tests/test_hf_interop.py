"""A Keel reward model is a Hugging Face sequence classifier: AutoModelForSequenceClassification and
pipeline("text-classification") load it (with its class from the directory) and give the scores Keel serves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from keel.core.runtime import RewardRuntime

INPUTS = [("Human: How do I bake bread?", "Mix flour, water, yeast and salt, then bake it."),
          ("", "A bare reply with no context."), ("Human: " + "long context " * 80, "short reply")]


def test_auto_model_loads_with_heads_as_labels_and_gives_the_served_raw_scores(tiny_reward_model: Path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model, trust_remote_code=True).eval()
    manifest = json.loads((tiny_reward_model / "keel.json").read_text())
    assert [model.config.id2label[i] for i in range(model.config.num_labels)] == manifest["heads"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)
    contexts, responses = zip(*INPUTS)
    batch = tokenizer(list(contexts), list(responses), padding=True, truncation="longest_first",
                      max_length=manifest["max_length"], return_tensors="pt")
    with torch.no_grad():
        hf = model(**batch).logits.numpy()
    served = RewardRuntime(tiny_reward_model, backend="torch").score(INPUTS)
    assert np.abs(hf - served).max() <= 1e-4
    again = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model(**batch).logits)  # no randomly initialised weights


def test_text_classification_pipeline_returns_every_head_raw(tiny_reward_model: Path):
    classify = pipeline("text-classification", model=str(tiny_reward_model), trust_remote_code=True, top_k=None)
    context, response = INPUTS[0]
    scores = {r["label"]: r["score"] for r in classify({"text": context, "text_pair": response})}
    served = RewardRuntime(tiny_reward_model, backend="torch").score([INPUTS[0]])[0]
    heads = json.loads((tiny_reward_model / "keel.json").read_text())["heads"]
    assert set(scores) == set(heads)
    assert max(abs(scores[h] - served[i]) for i, h in enumerate(heads)) <= 1e-4
