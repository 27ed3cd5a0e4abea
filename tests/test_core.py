"""keel_core's pieces that must agree with training's: tokenisation without transformers."""

from __future__ import annotations

from pathlib import Path

from keel_core.tokenizer import PairTokenizer
from training.evaluate import encode
from training.reward_model import load_tokenizer

PAIRS = [("", "hi"), ("Human: " + "word " * 400, "reply " * 50), ("Human: x", "y " * 300),
         ("ünïcödé 中文 😀", "Tab\there  \n new"), ("", ""), ("Human: a\n\nAssistant: b\n\nHuman: c", "d")]


def test_the_serving_tokenizer_gives_trainings_ids(tiny_reward_model: Path):
    for side in ("left", "right"):
        served = PairTokenizer(tiny_reward_model, 64, side)
        trained = load_tokenizer(str(tiny_reward_model), 64, side)
        assert served.encode(PAIRS) == [{"input_ids": e["input_ids"], "token_type_ids": e["token_type_ids"]}
                                        for e in encode(trained, PAIRS, 64)]
        assert served.pad_token_id == trained.pad_token_id
