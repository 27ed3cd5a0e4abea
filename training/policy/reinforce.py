"""REINFORCE with a baseline (Williams 1992): grad J = E[(R - b) * grad log pi(y | x)].

The return is the reward minus the KL penalty to the reference, R = r(x, y) - beta * KL(x, y). Baseline choice:
b is an exponential moving average of the mean return of earlier batches (momentum `baseline_momentum`). It does
not depend on the sampled response, so the gradient stays unbiased; it lags the current batch, so no response
lowers its own advantage. (RLOO, in rloo.py, replaces it with a per-prompt leave-one-out mean.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keel.training.policy.config import PolicyConfig
from keel.training.policy.run import PolicyRun, rollout_metrics


def moving_average_baseline(previous: float | None, batch_mean: float, momentum: float) -> float:
    """b <- m * b + (1 - m) * mean(R); the first batch sets b to its mean."""
    return batch_mean if previous is None else momentum * previous + (1.0 - momentum) * batch_mean


def train_reinforce(config: PolicyConfig, output: Path, **run_options: Any) -> dict[str, Any]:
    t = config.training
    run = PolicyRun(config, output, "reinforce", **run_options)
    for step in run.steps():
        rollout = run.rollout(run.take(run.train_prompts, step, t.prompts_per_step), samples=t.samples_per_prompt)
        logprobs, entropy, kl, returns = run.sequence_returns(rollout)
        baseline = run.algorithm_state.get("baseline")
        # A = R - b, with b from earlier batches only (the first batch: its own mean)
        advantages = returns - (returns.mean() if baseline is None else baseline)
        # L = -mean A * sum_t log pi(y_t | x, y_<t)
        loss = -(advantages * (logprobs * rollout.sequences.response_mask).sum(1)).mean()
        run.optimize(loss)
        run.algorithm_state["baseline"] = moving_average_baseline(baseline, returns.mean().item(),
                                                                  config.reinforce.baseline_momentum)
        run.end_step({"loss": loss.item(), "baseline": run.algorithm_state["baseline"],
                      **rollout_metrics(rollout, run.reward_function.heads, entropy)},
                     kl=kl.mean().item(), responses=len(rollout.responses))
    return run.finish()
