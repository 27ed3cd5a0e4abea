"""Shared fixtures: a tiny random BERT (built from a config, no downloads) and small data files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    hh_pairs,
    moderation_rows,
    tiny_config,
    tiny_moderation_config,
    write_jsonl,
)

WORDS = (  # noqa: SIM905 (a word list reads better as one string)
    "the a an to of and or is are was be it i you we they he she this that what how why can do not no yes "
    "please help me with my your kill hurt bomb make build steal hack safe sure sorry cannot here is some "
    "recipe cake bread python code process terminate human assistant good bad great terrible thanks"
).split()


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide BERT with a small WordPiece vocabulary, saved as an HF directory."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = specials + sorted(set(WORDS)) + letters + [f"##{c}" for c in letters] + list(".,?!:'\"-0123456789")
    # (transformers 5 ignores a vocab_file argument and would make a tokenizer of the 5 special tokens alone)
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.save_pretrained(directory)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    # Seeded: on some random inits int8 quantisation of so small a model moves scores by 0.5, on most by 0.02.
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture
def pair_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(40))


@pytest.fixture
def rating_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"question {i}", "response": ["great thanks", "terrible bad"][i % 2], "score": [1.0, -1.0][i % 2]}
            for i in range(24)]
    return write_jsonl(tmp_path / "ratings.jsonl", rows)


@pytest.fixture
def other_precision():
    """Lets a test train in another precision: accelerate keeps one precision per process (the tiny configs' fp32)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tiny_reward_model(tiny_backbone: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete Keel model directory (weights, ONNX fp32/int8, keel.json) trained on the tiny backbone."""
    from keel.training.data import DataSource
    from keel.training.reward.train import train_reward

    root = tmp_path_factory.mktemp("tiny-rm")
    pairs = write_jsonl(root / "pairs.jsonl", hh_pairs(40))
    ratings = write_jsonl(root / "ratings.jsonl", [
        {"text": ["great thanks", "terrible bad"][i % 2], "score": [1.0, -1.0][i % 2]} for i in range(16)])
    output = root / "model"
    config = tiny_config(tiny_backbone, pairs, ratings)
    config.heads[0].guard, config.heads[0].guard_false_flags = [DataSource(str(pairs), limit=12)], 0.25
    train_reward(config, output, progress=False)
    return output


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide Llama with a small byte-level BPE and a ChatML template, saved as an HF directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(WORDS)] * 20 + ["user assistant system"] * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def long_policy(tiny_policy: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny policy with room for long replies (RoPE has no learned positions to outgrow), so a chat lasts
    long enough to disconnect from or shut down under."""
    directory = tmp_path_factory.mktemp("long-policy") / "policy"
    shutil.copytree(tiny_policy, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    return str(directory)


@pytest.fixture(scope="session")
def tiny_moderation_model(tiny_backbone: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete Keel moderation-model directory (weights, ONNX fp32/int8, keel.json) on the tiny backbone."""
    from keel.training.moderation.train import train_moderation

    root = tmp_path_factory.mktemp("tiny-moderation")
    data = write_jsonl(root / "labelled.jsonl", moderation_rows(48))
    output = root / "model"
    train_moderation(tiny_moderation_config(tiny_backbone, data), output, progress=False)
    return output


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server (tests.helpers.ThrowawayPostgres), stopped and deleted after the session."""
    from tests.helpers import ThrowawayPostgres

    try:
        server = ThrowawayPostgres()
    except FileNotFoundError as missing:
        pytest.skip(f"{missing}: the database tier needs it")
    try:
        yield server.url
    finally:
        server.remove()
