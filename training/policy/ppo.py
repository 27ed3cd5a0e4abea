"""PPO with a per-token KL penalty to a frozen reference (Schulman et al. 2017; Ziegler et al. 2019).

Per rollout batch: every response token t earns r_t = -beta * (log pi(y_t) - log ref(y_t)), and the last token
also earns the reward model's score (minus a penalty when the response never ended). A value head on the
policy's last hidden state estimates returns; GAE turns rewards and values into advantages; then a few epochs
of minibatch updates of the clipped surrogate plus a clipped value loss. beta is fixed or adapted toward a
target KL (training.kl_target).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from keel.training.policy.common import masked_mean, response_logprobs, sequence_kl, whiten
from keel.training.policy.config import PolicyConfig
from keel.training.policy.run import PolicyRun, rollout_metrics


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens [B, T] (masked positions hold no reward/value).
    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns_t = A_t + V_t."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, reference_logprobs: torch.Tensor,
                  mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -beta * (log pi(y_t) - log ref(y_t)), plus the sequence score on the response's last token."""
    rewards = -kl_coef * (logprobs - reference_logprobs) * mask
    last = mask.sum(1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def train_ppo(config: PolicyConfig, output: Path, **run_options: Any) -> dict[str, Any]:
    t, ppo, temperature = config.training, config.ppo, config.policy.temperature
    run = PolicyRun(config, output, "ppo", value_head=True, **run_options)
    value_head = run.value_head
    assert value_head is not None  # PolicyRun(value_head=True)
    for step in run.steps():
        rollout = run.rollout(run.take(run.train_prompts, step, t.prompts_per_step), samples=t.samples_per_prompt)
        sequences, mask = rollout.sequences, rollout.sequences.response_mask
        with torch.no_grad(), run.autocast():
            old_logprobs, _, hidden = response_logprobs(run.policy, sequences, temperature, with_hidden=True)
            old_values = value_head(hidden).squeeze(-1).float()
        scores = whiten(rollout.rewards, shift_mean=False) if t.whiten_rewards else rollout.rewards
        rewards = token_rewards(scores, old_logprobs, rollout.reference_logprobs, mask, run.kl_coef)
        advantages, returns = gae(rewards, old_values, mask, ppo.gamma, ppo.lam)
        advantages = whiten(advantages, mask)

        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "approx_kl": []}
        entropies = []
        for _ in range(ppo.epochs):
            for batch in torch.randperm(len(rollout.responses)).split(ppo.minibatch_size):
                m = mask[batch]
                with run.autocast():
                    logprobs, entropy, hidden = response_logprobs(run.policy, sequences.select(batch), temperature,
                                                                  with_entropy=True, with_hidden=True)
                    values = value_head(hidden).squeeze(-1).float()
                assert entropy is not None  # asked for
                ratio = torch.exp(logprobs - old_logprobs[batch])
                # L_clip = -E_t[min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t)]
                surrogate = torch.max(-advantages[batch] * ratio,
                                      -advantages[batch] * ratio.clamp(1 - ppo.clip_range, 1 + ppo.clip_range))
                policy_loss = masked_mean(surrogate, m)
                # L_V = 1/2 E_t[max((V_t - G_t)^2, (V_old,t + clip(V_t - V_old,t, -c, c) - G_t)^2)]
                clipped = old_values[batch] + (values - old_values[batch]).clamp(-ppo.value_clip, ppo.value_clip)
                value_loss = 0.5 * masked_mean(torch.max((values - returns[batch]) ** 2,
                                                         (clipped - returns[batch]) ** 2), m)
                run.optimize(policy_loss + ppo.value_coef * value_loss)
                with torch.no_grad():
                    stats["policy_loss"].append(policy_loss.item())
                    stats["value_loss"].append(value_loss.item())
                    stats["clip_fraction"].append(masked_mean(((ratio - 1).abs() > ppo.clip_range).float(), m).item())
                    stats["approx_kl"].append(masked_mean(old_logprobs[batch] - logprobs, m).item())
                    entropies.append(masked_mean(entropy, m).item())
        kl = sequence_kl(old_logprobs, rollout.reference_logprobs, mask)
        metrics = {key: sum(values) / len(values) for key, values in stats.items()}
        metrics.update(rollout_metrics(rollout, run.reward_function.heads), entropy=sum(entropies) / len(entropies))
        run.end_step(metrics, kl=kl.mean().item(), responses=len(rollout.responses))
    return run.finish()
