"""Train a multi-head reward model: each head on its own data, with its objective's loss (training/objectives.py:
Bradley-Terry on preference pairs, regression on ratings).

Read top to bottom: model -> data -> batches -> training loop (checkpointed, resumable) -> the best weights ->
detached heads -> publishing (training/packaging.py). Runs on CPU, on CUDA when present, and under
`accelerate launch` with several processes.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from keel_core.artifact import (
    write_json_atomic,
)
from keel_core.reward_model import RewardModel
from training.data import Example
from training.evaluate import Scorer, collate, encode, torch_scorer
from training.objectives import evaluate_examples, objective_of
from training.packaging import build_artifact
from training.reward_config import RewardConfig
from training.reward_data import HeadData, load_head_data
from training.reward_model import freeze, load_tokenizer, optimiser
from training.runs import append_metrics, resume_from, save_checkpoint, start_run

log = logging.getLogger(__name__)


def make_batches(lengths: list[list[int]], batch_size: int, seed: int) -> list[tuple[int, list[int]]]:
    """Length-grouped batches: shuffle each head's examples, sort windows of 50 batches by length, cut
    into batches, then shuffle the batches of all heads together. Returns (head index, example indices)."""
    rng = np.random.default_rng(seed)
    batches: list[tuple[int, list[int]]] = []
    window = batch_size * 50
    for head, head_lengths in enumerate(lengths):
        order = rng.permutation(len(head_lengths))
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: head_lengths[i])
            batches += [(head, chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


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


def encode_examples(tokenizer: Any, examples: list[Example], max_length: int) -> list[list[dict]]:
    """Each example's tokenised texts, one per column of its objective (a pair: chosen, rejected)."""
    objective = objective_of(examples)
    encoded = encode(tokenizer, objective.texts(examples), max_length)
    n = len(examples)
    return [[encoded[column * n + i] for column in range(objective.columns)] for i in range(n)]


def sequence_lengths(item: list[dict]) -> int:
    return sum(len(part["input_ids"]) for part in item)


def validation_accuracy(scorer: Scorer, heads: list[HeadData], names: list[str]) -> dict[str, float]:
    out = {}
    for head in heads:
        metrics = evaluate_examples(scorer, head.validation, names)[head.name]
        out[f"val_{head.name}_" + ("accuracy" if "accuracy" in metrics else "mse")] = metrics.get(
            "accuracy", metrics.get("mse"))
    return out


def train_reward(config: RewardConfig, output: Path, resume: bool = False, overwrite: bool = False,
                 skip_bad_rows: bool = False, progress: bool = True) -> dict[str, Any]:
    t = config.training
    output, work, accelerator = start_run(output, resume, overwrite, t.precision, t.seed)
    metrics_path = work / "metrics.jsonl"
    names = [h.name for h in config.heads]

    # ---- model (first, so a config the backbone cannot take fails before the data is read) --------------
    model = RewardModel.from_base(config.base_model, names, config.attention_dropout)
    freeze(model, t)

    # ---- data -------------------------------------------------------------------------------------------
    heads = load_head_data(config, skip_bad_rows)
    tokenizer = load_tokenizer(config.base_model, config.max_length, config.truncation_side)
    # Detached heads are fitted after training: no batches, no validation while training.
    detached = {head.name for head in config.heads if head.detach}
    trained = [head for head in heads if head.name not in detached]
    encoded = [[] if head.name in detached else encode_examples(tokenizer, head.train, config.max_length)
               for head in heads]
    lengths = [[sequence_lengths(item) for item in head_items] for head_items in encoded]
    batches_per_epoch = sum(math.ceil(len(items) / t.batch_size) for items in encoded) // accelerator.num_processes
    total_steps = t.epochs * batches_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)

    # ---- optimiser --------------------------------------------------------------------------------------
    optimizer, scheduler = optimiser(model, t, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    device = accelerator.device

    start_step = resume_from(accelerator, work, metrics_path, resume)["step"]
    if start_step:
        log.info("resumed at step %d of %d", start_step, total_steps)

    # ---- training loop -----------------------------------------------------------------------------------
    primary_prefix = f"val_{config.primary_head}_"
    unwrapped = accelerator.unwrap_model(model)
    scorer = torch_scorer(unwrapped, tokenizer, config.max_length, t.eval_batch_size)
    bar = tqdm(total=total_steps, initial=start_step, desc="train reward", unit="step",
               disable=not (progress and accelerator.is_main_process))
    started, window_losses, window_accuracies = time.time(), [], []
    epoch_plan: tuple[int, list] = (-1, [])
    model.train()
    for step in range(start_step, total_steps):
        epoch = step // batches_per_epoch
        if epoch_plan[0] != epoch:
            plan = make_batches(lengths, t.batch_size, t.seed + epoch)
            epoch_plan = (epoch, plan[accelerator.process_index :: accelerator.num_processes])
        head, indices = epoch_plan[1][step % batches_per_epoch]
        examples = [heads[head].train[i] for i in indices]
        loss, accuracy = batch_loss(model, tokenizer, head, examples, [encoded[head][i] for i in indices],
                                    config.heads[head].margin, device)
        accelerator.backward(loss * config.heads[head].weight)
        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

        window_losses.append(loss.item())
        if accuracy is not None:
            window_accuracies.append(accuracy)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(window_losses):.3f}", epoch=epoch)
        row: dict[str, Any] = {}
        if done % t.log_every == 0 or done == total_steps:
            row = {"train_loss": float(np.mean(window_losses)), "lr": scheduler.get_last_lr()[0]}
            if window_accuracies:
                row["train_accuracy"] = float(np.mean(window_accuracies))
            window_losses, window_accuracies = [], []
        if t.eval_every and done % t.eval_every == 0 and done != total_steps and accelerator.is_main_process:
            row.update(validation_accuracy(scorer, trained, names))
            if t.keep_best:
                metric = next(key for key in row if key.startswith(primary_prefix))
                remember_if_best(unwrapped, work, done, metric, row[metric])
            model.train()
        if row and accelerator.is_main_process:
            append_metrics(metrics_path, {"step": done, "epoch": epoch, "elapsed_s": round(time.time() - started, 1), **row})
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done != total_steps:
            save_checkpoint(accelerator, work, done)
    bar.close()
    accelerator.wait_for_everyone()
    train_seconds = time.time() - started

    manifest: dict[str, Any] = {}
    if accelerator.is_main_process:
        # Without the mixed-precision wrapper: evaluation and export run in fp32.
        unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        kept_step = (restore_best(unwrapped, work, lambda metric: validation_accuracy(scorer, trained, names)[metric],
                                  total_steps) if t.keep_best else total_steps)
        fit_detached_heads(unwrapped, tokenizer, heads, config)
        manifest = build_artifact(config, unwrapped, tokenizer, heads, output, overwrite, work, metrics_path,
                                  train_seconds, total_steps, kept_step, accelerator.mixed_precision)
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return manifest


def remember_if_best(model: RewardModel, work: Path, step: int, metric: str, value: float) -> None:
    """Keep the weights with the best validation metric of the primary head (accuracy up, MSE down)."""
    record = work / "best.json"
    best = json.loads(record.read_text()) if record.exists() else None
    if best is None or is_better(metric, value, best["value"]):
        torch.save(model.state_dict(), work / "best.pt.tmp")
        (work / "best.pt.tmp").replace(work / "best.pt")
        write_json_atomic(record, {"step": step, "metric": metric, "value": value})


def is_better(metric: str, value: float, than: float) -> bool:
    return value < than if metric.endswith("mse") else value > than


def restore_best(model: RewardModel, work: Path, final_metric: Callable[[str], float], final_step: int) -> int:
    """Compare the final weights with the best kept ones (remember_if_best) on the same validation metric, given
    by final_metric(name), and load the better; return its step."""
    record = work / "best.json"
    if not record.exists():
        return final_step
    best = json.loads(record.read_text())
    metric = best["metric"]
    final_value = final_metric(metric)
    if not is_better(metric, best["value"], final_value):
        return final_step
    log.info("keeping the weights of step %d (%s %.4f) over the final ones (%.4f)", best["step"], metric,
             best["value"], final_value)
    model.load_state_dict(torch.load(work / "best.pt", map_location="cpu", weights_only=True))
    return best["step"]
