"""Supervised fine-tuning on demonstrations: L = -mean_t log pi(y_t | x, y_<t) over response tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from keel.training.config import ConfigError
from keel.training.data import load_demonstrations, read_sources
from keel.training.policy.common import masked_mean, response_logprobs, teacher_forced
from keel.training.policy.config import PolicyConfig
from keel.training.policy.run import PolicyRun, steps_for_epochs


def train_sft(config: PolicyConfig, output: Path, skip_bad_rows: bool = False, **run_options: Any) -> dict[str, Any]:
    t, p = config.training, config.policy
    if not config.data:
        raise ConfigError("SFT needs demonstrations: set data to one or more files")
    demonstrations = read_sources(config.data, skip_bad_rows, training=True, load=load_demonstrations)
    validation = read_sources(config.validation, skip_bad_rows, load=load_demonstrations)
    run = PolicyRun(config, output, "sft", on_policy=False, skip_bad_rows=skip_bad_rows, **run_options)
    run.total_steps = t.steps or steps_for_epochs(len(demonstrations), t.prompts_per_step, t.epochs,
                                                  run.accelerator.num_processes)
    response_length = max(1, config.sft.max_length - p.max_prompt_length)

    def loss_of(batch: list[tuple[Any, str]]) -> torch.Tensor:
        sequences = teacher_forced(run.tokenizer, [c for c, _ in batch], [r for _, r in batch],
                                   p.max_prompt_length, response_length).to(run.device)
        with run.autocast():
            logprobs = response_logprobs(run.policy, sequences)[0]
        # L = -mean over response tokens of log pi(y_t | x, y_<t)
        return -masked_mean(logprobs, sequences.response_mask)

    for step in run.steps():
        loss = loss_of(run.take(demonstrations, step, t.prompts_per_step))
        run.optimize(loss)
        metrics = {"loss": loss.item()}
        if validation and run.is_eval_step():
            metrics["validation_loss"] = validation_loss(loss_of, validation, t.prompts_per_step)
        run.end_step(metrics)
    final = {"validation_loss": validation_loss(loss_of, validation, t.prompts_per_step)} if validation else {}
    return run.finish([s.path for s in [*config.data, *config.validation]], final)


@torch.no_grad()
def validation_loss(loss_of: Any, items: list, batch_size: int) -> float:
    losses = [loss_of(items[i : i + batch_size]).item() for i in range(0, len(items), batch_size)]
    return sum(losses) / len(losses)
