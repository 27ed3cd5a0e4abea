"""The training loop of an encoder classifier (reward and moderation models alike), readable top to bottom:
optimiser -> resume -> steps over length-grouped batches (logged, validated, checkpointed) -> the best
weights kept. What differs between the two kinds is passed in: the loss of one batch and the validation metrics.

Runs on CPU, on CUDA when present, and under `accelerate launch` with several processes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from keel.core.artifact import write_json_atomic
from keel.core.reward_model import RewardModel
from keel.training.encoder.config import TrainingConfig
from keel.training.encoder.optim import optimiser
from keel.training.runs import append_metrics, resume_from, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One batch's loss (its backward pass is weighted by `weight`) and, where the objective has one, its
    training accuracy."""

    loss: torch.Tensor
    weight: float = 1.0
    accuracy: float | None = None


# (the model being trained, the batch's group, the indices of its items in that group) -> the batch's Step
StepLoss = Callable[[torch.nn.Module, int, list[int]], Step]
Validate = Callable[[], dict[str, float]]  # validation metrics of the model as it is now


@dataclass(frozen=True)
class Selection:
    """The validation metric that picks the weights to keep, and which way is better."""

    metric: str
    higher_is_better: bool = True

    def better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than


@dataclass
class Run:
    """A started run (keel.training.runs.start_run): where it works and the Accelerator it runs under."""

    work: Path
    accelerator: Any
    resume: bool

    @property
    def metrics_path(self) -> Path:
        return self.work / "metrics.jsonl"


@dataclass
class Fitted:
    model: RewardModel  # unwrapped, fp32, with the kept weights loaded (on the main process)
    steps: int
    kept_step: int
    train_seconds: float


def make_batches(lengths: list[list[int]], batch_size: int, seed: int) -> list[tuple[int, list[int]]]:
    """Length-grouped batches: shuffle each group's items, sort windows of 50 batches by length, cut into
    batches, then shuffle the batches of all groups together. Returns (group index, item indices)."""
    rng = np.random.default_rng(seed)
    batches: list[tuple[int, list[int]]] = []
    window = batch_size * 50
    for group, group_lengths in enumerate(lengths):
        order = rng.permutation(len(group_lengths))
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: group_lengths[i])
            batches += [(group, chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def fit(model: RewardModel, lengths: list[list[int]], step_loss: StepLoss, validate: Validate, selection: Selection,
        config: TrainingConfig, run: Run, description: str, progress: bool = True) -> Fitted:
    """Train `model` on groups of items (a group's batches hold only its items: a reward head's examples; one
    group for moderation), given each item's token count for length grouping, and return the weights to keep:
    the final ones, or (keep_best) the ones with the best `selection` metric among the validations."""
    t, accelerator = config, run.accelerator
    batches_per_epoch = sum(math.ceil(len(group) / t.batch_size) for group in lengths) // accelerator.num_processes
    total_steps = t.epochs * batches_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)

    optimizer, scheduler = optimiser(model, t, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    start_step = resume_from(accelerator, run.work, run.metrics_path, run.resume)["step"]
    if start_step:
        log.info("resumed at step %d of %d", start_step, total_steps)

    unwrapped = accelerator.unwrap_model(model)
    bar = tqdm(total=total_steps, initial=start_step, desc=description, unit="step",
               disable=not (progress and accelerator.is_main_process))
    started, window_losses, window_accuracies = time.time(), [], []
    epoch_plan: tuple[int, list[tuple[int, list[int]]]] = (-1, [])
    model.train()
    for step in range(start_step, total_steps):
        epoch = step // batches_per_epoch
        if epoch_plan[0] != epoch:  # every process draws the same plan and takes its own share of it
            plan = make_batches(lengths, t.batch_size, t.seed + epoch)
            epoch_plan = (epoch, plan[accelerator.process_index :: accelerator.num_processes])
        group, indices = epoch_plan[1][step % batches_per_epoch]
        result = step_loss(model, group, indices)
        accelerator.backward(result.loss * result.weight)
        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

        window_losses.append(result.loss.item())
        if result.accuracy is not None:
            window_accuracies.append(result.accuracy)
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
            row.update(validate())
            if t.keep_best:
                remember_if_best(unwrapped, run.work, done, selection, row[selection.metric])
            model.train()
        if row and accelerator.is_main_process:
            append_metrics(run.metrics_path, {"step": done, "epoch": epoch,
                                              "elapsed_s": round(time.time() - started, 1), **row})
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done != total_steps:
            save_checkpoint(accelerator, run.work, done)
    bar.close()
    accelerator.wait_for_everyone()
    train_seconds = time.time() - started

    # Without the mixed-precision wrapper: evaluation and export run in fp32.
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    kept_step = total_steps
    if t.keep_best and accelerator.is_main_process:
        kept_step = restore_best(unwrapped, run.work, lambda: validate()[selection.metric], selection, total_steps)
    return Fitted(unwrapped, total_steps, kept_step, train_seconds)


def remember_if_best(model: RewardModel, work: Path, step: int, selection: Selection, value: float) -> None:
    """Keep the weights with the best validation metric so far."""
    record = work / "best.json"
    best = json.loads(record.read_text()) if record.exists() else None
    if best is None or selection.better(value, best["value"]):
        torch.save(model.state_dict(), work / "best.pt.tmp")
        (work / "best.pt.tmp").replace(work / "best.pt")
        write_json_atomic(record, {"step": step, "metric": selection.metric, "value": value})


def restore_best(model: RewardModel, work: Path, final_value: Callable[[], float], selection: Selection,
                 final_step: int) -> int:
    """Compare the final weights with the best kept ones (remember_if_best) on the same validation metric, and
    load the better; return its step."""
    record = work / "best.json"
    if not record.exists():
        return final_step
    best = json.loads(record.read_text())
    final = final_value()
    if not selection.better(best["value"], final):
        return final_step
    log.info("keeping the weights of step %d (%s %.4f) over the final ones (%.4f)", best["step"], selection.metric,
             best["value"], final)
    model.load_state_dict(torch.load(work / "best.pt", map_location="cpu", weights_only=True))
    return int(best["step"])
