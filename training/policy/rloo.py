"""RLOO: REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024).

Each prompt gets k sampled responses. A response's return is its reward minus the KL penalty to the reference,
R = r(x, y) - beta * KL(x, y), and its baseline is the mean return of the prompt's other k - 1 responses: an
unbiased, prompt-specific baseline that needs no value network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from keel.training.config import ConfigError
from keel.training.policy.config import PolicyConfig
from keel.training.policy.run import PolicyRun, rollout_metrics


def leave_one_out_advantages(returns: torch.Tensor, k: int) -> torch.Tensor:
    """Returns [P * k], grouped by prompt; A_i = R_i - 1/(k-1) * sum_{j != i} R_j within each prompt's group."""
    grouped = returns.view(-1, k)
    return (grouped - (grouped.sum(1, keepdim=True) - grouped) / (k - 1)).view(-1)


def train_rloo(config: PolicyConfig, output: Path, **run_options: Any) -> dict[str, Any]:
    t = config.training
    k = t.samples_per_prompt
    if k < 2:
        raise ConfigError("RLOO needs training.samples_per_prompt >= 2 (the baseline is the other samples' mean)")
    run = PolicyRun(config, output, "rloo", **run_options)
    for step in run.steps():
        rollout = run.rollout(run.take(run.train_prompts, step, t.prompts_per_step), samples=k)
        logprobs, entropy, kl, returns = run.sequence_returns(rollout)
        advantages = leave_one_out_advantages(returns, k)
        # L = -mean_i A_i * sum_t log pi(y_i,t | x, y_i,<t)
        loss = -(advantages * (logprobs * rollout.sequences.response_mask).sum(1)).mean()
        run.optimize(loss)
        run.end_step({"loss": loss.item(), **rollout_metrics(rollout, run.reward_function.heads, entropy)},
                     kl=kl.mean().item(), responses=len(rollout.responses))
    return run.finish()
