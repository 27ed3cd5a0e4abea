"""LoRA adapters for policy training, and the frozen reference model beside them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel


def add_lora(model: PreTrainedModel, rank: int, alpha: float, dropout: float, targets: list[str]) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@contextlib.contextmanager
def reference_mode(policy: Any, reference: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """The frozen reference model: a separate copy when given, else the LoRA policy with its adapter off."""
    if reference is not None:
        yield reference
        return
    with policy.disable_adapter():
        yield policy
