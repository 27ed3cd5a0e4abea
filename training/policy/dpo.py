"""DPO: direct preference optimisation (Rafailov et al. 2023), offline on preference pairs, no reward model.

The policy's implicit reward is beta * log(pi(y | x) / ref(y | x)); the loss is Bradley-Terry on it:
L = -log sigma(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]).
With label_smoothing e (conservative DPO) each label is assumed flipped with probability e.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from keel.training.config import ConfigError
from keel.training.data import PreferencePair, read_sources
from keel.training.policy.common import response_logprobs, teacher_forced
from keel.training.policy.config import PolicyConfig
from keel.training.policy.run import PolicyRun, steps_for_epochs


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair loss and implicit-reward margin from sequence log-probs [B]."""
    # margin = beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]
    margin = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    # L = -(1 - e) log sigma(margin) - e log sigma(-margin)
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss, margin


def load_pairs(sources: list, skip_bad_rows: bool, training: bool = False) -> list[PreferencePair]:
    pairs = [e for e in read_sources(sources, skip_bad_rows, training) if isinstance(e, PreferencePair)]
    if sources and not pairs:
        raise ConfigError("DPO needs preference pairs (chosen/rejected); the data files hold only ratings")
    return pairs


def train_dpo(config: PolicyConfig, output: Path, skip_bad_rows: bool = False, **run_options: Any) -> dict[str, Any]:
    t, p = config.training, config.policy
    pairs = load_pairs(config.data, skip_bad_rows, training=True)
    if not pairs:
        raise ConfigError("DPO needs preference pairs: set data to one or more pair files")
    validation = load_pairs(config.validation, skip_bad_rows)
    run = PolicyRun(config, output, "dpo", on_policy=False, skip_bad_rows=skip_bad_rows, **run_options)
    run.total_steps = t.steps or steps_for_epochs(len(pairs), t.prompts_per_step, t.epochs,
                                                  run.accelerator.num_processes)
    response_length = max(1, config.dpo.max_length - p.max_prompt_length)

    def sequence_logprobs(batch: list[PreferencePair], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy, reference) log-probs of each pair's chosen or rejected response, summed over its tokens."""
        sequences = teacher_forced(run.tokenizer, [pair.context for pair in batch],
                                   [getattr(pair, side) for pair in batch], p.max_prompt_length,
                                   response_length).to(run.device)
        mask = sequences.response_mask
        with run.autocast():
            policy = (response_logprobs(run.policy, sequences)[0] * mask).sum(1)
        return policy, (run.reference_logprobs(sequences) * mask).sum(1)

    def loss_of(batch: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        loss, margin = dpo_loss(*sequence_logprobs(batch, "chosen"), *sequence_logprobs(batch, "rejected"),
                                beta=config.dpo.beta, label_smoothing=config.dpo.label_smoothing)
        return loss.mean(), margin

    @torch.no_grad()
    def validate() -> dict[str, float]:
        margins = torch.cat([loss_of(validation[i : i + t.prompts_per_step])[1]
                             for i in range(0, len(validation), t.prompts_per_step)])
        return {"validation_accuracy": float((margins > 0).float().mean()), "validation_margin": float(margins.mean())}

    for step in run.steps():
        loss, margin = loss_of(run.take(pairs, step, t.prompts_per_step))
        run.optimize(loss)
        metrics = {"loss": loss.item(), "accuracy": float((margin > 0).float().mean()), "margin": margin.mean().item()}
        if validation and run.is_eval_step():
            metrics.update(validate())
        run.end_step(metrics)
    return run.finish([s.path for s in [*config.data, *config.validation]], validate() if validation else {})
