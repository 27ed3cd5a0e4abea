"""Pieces of training an encoder with heads (reward and moderation models) that only training needs: what to
freeze, the optimiser and its schedule, and the transformers tokenizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from keel.core.reward_model import RewardModel, resolve_base_model
from keel.training.config import ConfigError
from keel.training.encoder.config import TrainingConfig


def freeze(model: RewardModel, training: TrainingConfig) -> None:
    """Fix what the training config says: the word embeddings, and the lowest `freeze_layers` layers."""
    if training.freeze_embeddings:
        model.backbone.get_input_embeddings().requires_grad_(False)
    if training.freeze_layers:
        freeze_lower_layers(model.backbone, training.freeze_layers)


def optimiser(model: RewardModel, training: TrainingConfig, total_steps: int
              ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with the backbone's trainable weights at learning_rate and the fresh heads at the faster
    head_learning_rate, under linear warm-up and decay over total_steps."""
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": training.learning_rate},
         {"params": model.heads.parameters(), "lr": training.head_learning_rate}], weight_decay=training.weight_decay)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(training.warmup_ratio * total_steps), total_steps)


def freeze_lower_layers(backbone: Any, count: int) -> None:
    """Fix the embeddings and the lowest `count` transformer layers. Nothing below layer `count` then needs a
    gradient, so backward stops there: with 2 of MiniLM's 6 layers fixed a step is a quarter faster."""
    layers = next((m for m in backbone.modules()
                   if isinstance(m, nn.ModuleList) and len(m) == backbone.config.num_hidden_layers), None)
    if layers is None:
        raise ConfigError("training.freeze_layers: this backbone has no list of its transformer layers; set it to 0")
    if count >= len(layers):
        raise ConfigError(f"training.freeze_layers={count}: the backbone has {len(layers)} layers; freeze fewer layers")
    first_trained = next(layers[count].parameters())
    for parameter in backbone.parameters():  # in definition order: embeddings, then layers, then the rest
        if parameter is first_trained:
            break
        parameter.requires_grad_(False)


def load_tokenizer(path: str, max_length: int, truncation_side: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(path))
    tokenizer.truncation_side = truncation_side
    tokenizer.model_max_length = max_length
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
