"""Train a multi-head reward model: each head on its own data, with its objective's loss (objectives.py:
Bradley-Terry on preference pairs, regression on ratings).

Read top to bottom: model -> data -> the shared encoder loop (keel.training.encoder.fit: checkpointed, resumable,
best weights kept) over each head's batches with its objective's loss -> detached heads -> publishing
(publish.py). Runs on CPU, on CUDA when present, and under `accelerate launch` with several processes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from keel.core.artifact import ArtifactError, read_manifest
from keel.core.reward_model import RewardModel
from keel.training.config import ConfigError
from keel.training.data import Example
from keel.training.encoder.fit import Run, Selection, Step, fit
from keel.training.encoder.optim import freeze, load_tokenizer
from keel.training.encoder.scoring import Scorer, collate, encode, torch_scorer
from keel.training.reward.config import RewardConfig
from keel.training.reward.data import HeadData, load_head_data
from keel.training.reward.objectives import evaluate_examples, objective_of
from keel.training.reward.publish import publish_reward_model
from keel.training.runs import start_run


def batch_loss(model: torch.nn.Module, tokenizer: Any, head: int, examples: list[Example],
               encoded: list[list[dict]], margin: float, device: torch.device) -> tuple[torch.Tensor, float | None]:
    """Loss of one single-head batch (its objective's), and its training accuracy (None for ratings)."""
    objective = objective_of(examples)
    batch = collate(tokenizer, [item[column] for column in range(objective.columns) for item in encoded])
    scores = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, head]
    return objective.loss(scores, examples, margin), objective.accuracy(scores)


def fit_detached_heads(model: RewardModel, tokenizer: Any, heads: list[HeadData], config: RewardConfig) -> None:
    """Fit each `detach` head as a linear probe on the trained backbone's features of its training data; the
    backbone is left as it is."""
    features_of = torch_scorer(model, tokenizer, config.max_length, config.training.eval_batch_size, features=True)
    for h, (head, head_config) in enumerate(zip(heads, config.heads)):
        if head_config.detach:
            features = torch.from_numpy(features_of(objective_of(head.train).texts(head.train)))
            weight, bias = fit_linear_probe(features, head.train, head_config.margin, model.heads.weight[h],
                                            model.heads.bias[h])
            with torch.no_grad():
                model.heads.weight[h].copy_(weight)  # copy_ moves it to the model's device
                model.heads.bias[h].copy_(bias)


def fit_linear_probe(features: torch.Tensor, examples: list[Example], margin: float, weight: torch.Tensor,
                     bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) minimising the head's training loss on fixed features (of objective.texts(examples)) plus a
    small L2 penalty, full batch with L-BFGS, from the given starting point."""
    objective = objective_of(examples)
    weight = weight.detach().float().cpu().clone().requires_grad_()
    bias = bias.detach().float().cpu().clone().requires_grad_()
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective.loss(features @ weight + bias, examples, margin) + 1e-4 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def starting_model(config: RewardConfig, names: list[str]) -> RewardModel:
    """Fresh heads on base_model, or the `init_from` model to fine-tune (the same heads and backbone)."""
    if config.init_from is None:
        return RewardModel.from_base(config.base_model, names, config.attention_dropout)
    try:
        manifest = read_manifest(config.init_from)
    except ArtifactError as error:
        raise ConfigError(f"init_from {config.init_from}: not a Keel reward model directory ({error})") from None
    if manifest.get("heads") != names:
        raise ConfigError(f"init_from {config.init_from} has heads {manifest.get('heads')}, the config {names}: "
                          "fine-tuning keeps every head, so give the config the same heads in the same order")
    if manifest.get("base_model") != config.base_model_name:
        raise ConfigError(f"init_from {config.init_from} was trained on {manifest.get('base_model')}, not "
                          f"base_model {config.base_model_name}: set base_model to it")
    return RewardModel.load(config.init_from)


def encode_examples(tokenizer: Any, examples: list[Example], max_length: int) -> list[list[dict]]:
    """Each example's tokenised texts, one per column of its objective (a pair: chosen, rejected)."""
    objective = objective_of(examples)
    encoded = encode(tokenizer, objective.texts(examples), max_length)
    n = len(examples)
    return [[encoded[column * n + i] for column in range(objective.columns)] for i in range(n)]


def sequence_lengths(item: list[dict]) -> int:
    return sum(len(part["input_ids"]) for part in item)


def validation_accuracy(scorer: Scorer, heads: list[HeadData], names: list[str]) -> dict[str, float]:
    """Each head's headline validation metric (its objective's), as `val_<head>_<metric>`."""
    out = {}
    for head in heads:
        metrics = evaluate_examples(scorer, head.validation, names)[head.name]
        headline = objective_of(head.validation).headline
        out[f"val_{head.name}_{headline.name}"] = metrics[headline.name]
    return out


def train_reward(config: RewardConfig, output: Path, resume: bool = False, overwrite: bool = False,
                 skip_bad_rows: bool = False, progress: bool = True) -> dict[str, Any]:
    t = config.training
    output, work, accelerator = start_run(output, resume, overwrite, t.precision, t.seed)
    names = [h.name for h in config.heads]

    # ---- model (first, so a config the backbone cannot take fails before the data is read) --------------
    model = starting_model(config, names)
    freeze(model, t)

    # ---- data -------------------------------------------------------------------------------------------
    heads = load_head_data(config, skip_bad_rows)
    tokenizer = load_tokenizer(config.base_model, config.max_length, config.truncation_side)
    # Detached heads are fitted after training: no batches, no validation while training.
    detached = {head.name for head in config.heads if head.detach}
    trained = [head for head in heads if head.name not in detached]
    encoded = [[] if head.name in detached else encode_examples(tokenizer, head.train, config.max_length)
               for head in heads]

    # ---- training: each batch is one head's, with that head's objective -----------------------------------
    def step_loss(training: torch.nn.Module, head: int, indices: list[int]) -> Step:
        examples = [heads[head].train[i] for i in indices]
        loss, accuracy = batch_loss(training, tokenizer, head, examples, [encoded[head][i] for i in indices],
                                    config.heads[head].margin, accelerator.device)
        return Step(loss, config.heads[head].weight, accuracy)

    scorer = torch_scorer(model, tokenizer, config.max_length, t.eval_batch_size)
    primary = next(head for head in heads if head.name == config.primary_head)
    headline = objective_of(primary.train).headline
    fitted = fit(model, [[sequence_lengths(item) for item in items] for items in encoded], step_loss,
                 lambda: validation_accuracy(scorer, trained, names),
                 Selection(f"val_{primary.name}_{headline.name}", headline.higher_is_better), t,
                 Run(work, accelerator, resume), "train reward", progress)

    manifest: dict[str, Any] = {}
    if accelerator.is_main_process:
        fit_detached_heads(fitted.model, tokenizer, heads, config)
        manifest = publish_reward_model(config, fitted.model, tokenizer, heads, output, overwrite,
                                        work / "metrics.jsonl",
                                        {"train_seconds": round(fitted.train_seconds, 1), "steps": fitted.steps,
                                         "kept_step": fitted.kept_step,
                                         "precision": accelerator.mixed_precision}).to_json()
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return manifest
