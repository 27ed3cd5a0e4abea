"""RLOO: REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024).

Each prompt gets k sampled responses (k may differ by prompt source). A response's return is its reward minus
the KL penalty to the reference, R = r(x, y) - beta * KL(x, y), and its baseline is the mean return of the
prompt's other k - 1 responses: an unbiased, prompt-specific baseline that needs no value network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from keel.training.config import ConfigError
from keel.training.policy.config import PolicyConfig
from keel.training.policy.run import PolicyRun, rollout_metrics


def leave_one_out_advantages(returns: torch.Tensor, group_sizes: Sequence[int]) -> torch.Tensor:
    """Returns [B], grouped by prompt (consecutive rows; a source may give its prompts more samples);
    A_i = R_i - 1/(k-1) * sum_{j != i} R_j within each prompt's group of k."""
    return torch.cat([group - (group.sum() - group) / (len(group) - 1)
                      for group in returns.split(list(group_sizes))])


def train_rloo(config: PolicyConfig, output: Path, **run_options: Any) -> dict[str, Any]:
    t = config.training
    k = t.samples_per_prompt
    if min(k, *(source.samples or k for source in config.prompts.train)) < 2:
        raise ConfigError("RLOO needs training.samples_per_prompt >= 2 and every prompt source's samples >= 2 (the "
                          "baseline is the other samples' mean)")
    run = PolicyRun(config, output, "rloo", **run_options)
    for step in run.steps():
        rollout = run.rollout(run.take(run.train_prompts, step, t.prompts_per_step), samples=k)
        logprobs, entropy, kl, returns = run.sequence_returns(rollout)
        advantages = leave_one_out_advantages(returns, rollout.group_sizes)
        # L = -mean_i A_i * sum_t log pi(y_i,t | x, y_i,<t)
        loss = -(advantages * (logprobs * rollout.sequences.response_mask).sum(1)).mean()
        run.optimize(loss)
        run.end_step({"loss": loss.item(), **rollout_metrics(rollout, run.reward_function.heads, entropy)},
                     kl=kl.mean().item(), responses=len(rollout.responses))
    return run.finish()
