"""The policy trainers' config (configs/policy.yaml and one file per algorithm): the policy, its rewards,
prompts, and each algorithm's settings."""

from __future__ import annotations

import dataclasses

from keel.training.config import REWARD_BACKENDS, ConfigError, check_numbers, check_precision
from keel.training.data import DataSource, PromptSource
from keel.training.policy.rewards import RewardSourceConfig


@dataclasses.dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = dataclasses.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclasses.dataclass
class PolicyModelConfig:
    model: str = "default"  # HF causal-LM name or path, a .gguf file, or "default" (SmolLM2-135M-Instruct)
    lora: LoraConfig | None = dataclasses.field(default_factory=LoraConfig)  # null: full fine-tuning
    max_prompt_length: int = 128  # tokens after the chat template; longer prompts lose their oldest tokens
    max_new_tokens: int = 48
    temperature: float = 1.0  # sampling temperature of rollouts (log-probs use the same temperature)
    top_p: float = 1.0


@dataclasses.dataclass
class PromptsConfig:
    train: list[PromptSource] = dataclasses.field(default_factory=list)
    evaluation: list[PromptSource] = dataclasses.field(default_factory=list)  # held-out prompts for eval rows
    samples: int = 6  # evaluation prompts whose generations are shown before/after in samples.md


@dataclasses.dataclass
class RestartConfig:
    """Train again with another seed when an attempt's own training log misses these shares (training.restarts;
    keel.training.policy.restarts). Each share is a refusal-or-hedge rate of the policy's samples of train prompts,
    averaged over the last `last_steps` steps."""

    attempts: int = 2  # at most; attempt k trains with seed + 1000 k
    last_steps: int = 8
    min_evasive_harmful: float = 0.0  # on prompts marked harmful: a refusal being learnt
    max_evasive_ordinary: float = 1.0  # on the other prompts: a refusal spreading to what should be answered


@dataclasses.dataclass
class PolicyTrainingConfig:
    steps: int = 100  # optimiser steps (SFT/DPO: None-like 0 means epochs over the data)
    epochs: int = 1  # SFT/DPO passes over the data when steps is 0
    prompts_per_step: int = 8  # on-policy: prompts per rollout batch (SFT/DPO: examples per step)
    samples_per_prompt: int = 1  # on-policy: responses per prompt (RLOO needs >= 2)
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto | bf16 | fp16 | no: mixed-precision autocast (auto: bf16 where it is fast)
    seed: int = 0
    log_every: int = 1
    eval_every: int = 25  # held-out reward and KL every N steps (0: only at start and end)
    checkpoint_every: int = 25  # resumable checkpoint every N steps (0: never)
    kl_coef: float = 0.05  # beta of the KL penalty to the reference
    kl_target: float | None = None  # adaptive controller's target KL per response (null: fixed beta)
    kl_horizon: int = 1000  # adaptive controller's horizon in responses
    kl_budget: float | None = 6.0  # stop early when the mean KL per response passes this (nats; null: never)
    unfinished_penalty: float = 0.0  # subtracted from the reward of responses that hit max_new_tokens
    whiten_rewards: bool = False  # whiten rewards across the batch before computing advantages
    restarts: RestartConfig | None = None  # on-policy algorithms: retry a run whose training log misses a check


# Each algorithm's own settings, in its own section (as TRL's trainers each have their config).
@dataclasses.dataclass
class ReinforceConfig:
    baseline_momentum: float = 0.9  # b = moving average of past rewards with this momentum


@dataclasses.dataclass
class SFTConfig:
    max_length: int = 256  # prompt + response tokens


@dataclasses.dataclass
class PPOConfig:
    clip_range: float = 0.2  # epsilon of the clipped surrogate
    value_clip: float = 0.2
    value_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95  # GAE lambda
    epochs: int = 2  # passes over each rollout batch
    minibatch_size: int = 8


@dataclasses.dataclass
class DPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO: assumed probability that a label is flipped
    max_length: int = 256  # prompt + response tokens


@dataclasses.dataclass
class PolicyConfig:
    policy: PolicyModelConfig = dataclasses.field(default_factory=PolicyModelConfig)
    reward: RewardSourceConfig = dataclasses.field(default_factory=RewardSourceConfig)
    prompts: PromptsConfig = dataclasses.field(default_factory=PromptsConfig)
    data: list[DataSource] = dataclasses.field(default_factory=list)  # SFT demonstrations / DPO pairs
    validation: list[DataSource] = dataclasses.field(default_factory=list)
    training: PolicyTrainingConfig = dataclasses.field(default_factory=PolicyTrainingConfig)
    reinforce: ReinforceConfig = dataclasses.field(default_factory=ReinforceConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)

    def __post_init__(self) -> None:
        check_precision(self.training.precision)
        if self.reward.backend not in REWARD_BACKENDS:
            raise ConfigError(f"reward.backend must be one of {', '.join(REWARD_BACKENDS)}, "
                              f"not {self.reward.backend!r}")
        if not self.reward.heads:
            raise ConfigError("reward.heads needs at least one head weight, e.g. {harmless: 1.0}")
        check_numbers("policy", self.policy, positive=["max_prompt_length", "max_new_tokens", "temperature", "top_p"],
                      up_to_1=["top_p"])
        if self.policy.lora:
            check_numbers("policy.lora", self.policy.lora, positive=["rank", "alpha"], below_1=["dropout"])
        check_numbers("reward", self.reward, positive=["clip"])
        check_numbers("training", self.training,
                      positive=["epochs", "prompts_per_step", "samples_per_prompt", "learning_rate", "max_grad_norm",
                                "log_every", "kl_target", "kl_horizon", "kl_budget"],
                      at_least_0=["steps", "weight_decay", "warmup_steps", "eval_every", "checkpoint_every", "kl_coef",
                                  "unfinished_penalty"])
        check_numbers("ppo", self.ppo, positive=["clip_range", "value_clip", "epochs", "minibatch_size"],
                      at_least_0=["value_coef", "gamma", "lam"], up_to_1=["gamma", "lam"])
        check_numbers("dpo", self.dpo, positive=["beta", "max_length"], below_1=["label_smoothing"])
        check_numbers("reinforce", self.reinforce, below_1=["baseline_momentum"])
        check_numbers("sft", self.sft, positive=["max_length"])
        if self.training.restarts:
            restarts = self.training.restarts
            check_numbers("training.restarts", restarts, positive=["attempts", "last_steps"],
                          up_to_1=["min_evasive_harmful", "max_evasive_ordinary"],
                          at_least_0=["min_evasive_harmful", "max_evasive_ordinary"])
            if restarts.min_evasive_harmful > 0 and not any(source.harmful for source in self.prompts.train):
                raise ConfigError("training.restarts.min_evasive_harmful needs a prompt source marked harmful: true "
                                  "in prompts.train")
        for source in self.prompts.train:
            if source.samples is not None and source.samples < 1:
                raise ConfigError(f"prompts.train {source.path}: samples must be at least 1, not {source.samples}")
