"""A Keel reward model is a Hugging Face sequence classifier: AutoModelForSequenceClassification and
pipeline("text-classification") load it (with its class from the directory) and give the scores Keel serves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from keel.cli.main import main
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


@pytest.mark.subprocess
def test_outside_keel_loading_without_trust_remote_code_fails_and_says_to_pass_it(tiny_reward_model: Path):
    """Not the encoder's standard classifier with random weights: transformers does not know model_type "keel".
    (In a process that has imported Keel, the class is registered and the directory loads without the flag.)"""
    load = ("from transformers import AutoModelForSequenceClassification as A; import sys; "
            "A.from_pretrained(sys.argv[1])")
    result = subprocess.run([sys.executable, "-c", load, str(tiny_reward_model)], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode != 0 and "Please pass the argument `trust_remote_code=True`" in result.stderr
    assert "BertForSequenceClassification" not in result.stderr


def test_inside_keel_a_directory_loads_with_keels_registered_class(tiny_reward_model: Path):
    from keel.core.reward_model import RewardModel

    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model)
    assert type(model) is RewardModel  # the installed class, not the directory's copy


def test_an_exported_head_loads_as_trl_loads_a_reward_model_and_gives_the_served_raw_score(
        tiny_reward_model: Path, tmp_path: Path):
    heads = json.loads((tiny_reward_model / "keel.json").read_text())["heads"]
    out = tmp_path / "head"
    assert main(["export", "head", str(tiny_reward_model), str(out), "--head", heads[-1]]) == 0
    # TRL's loading call for reward_funcs given as a path (GRPOTrainer), with the model's class from the directory.
    model = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1, trust_remote_code=True).eval()
    assert model.config.id2label == {0: heads[-1]}
    tokenizer = AutoTokenizer.from_pretrained(out)
    contexts, responses = zip(*INPUTS)
    batch = tokenizer(list(contexts), list(responses), padding=True, truncation="longest_first",
                      max_length=json.loads((tiny_reward_model / "keel.json").read_text())["max_length"],
                      return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (len(INPUTS), 1)
    served = RewardRuntime(tiny_reward_model, backend="torch").score(INPUTS)[:, -1]
    assert np.abs(logits[:, 0].numpy() - served).max() <= 1e-4
    assert main(["export", "head", str(tiny_reward_model), str(tmp_path / "x"), "--head", "nonexistent"]) != 0
