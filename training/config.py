"""YAML configs with `--set key.sub=value` overrides, read into typed dataclasses (unknown keys are errors)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from keel_core.artifact import KeelError
from keel_core.bundled import bundled
from training.data import DataSource, PromptSource

T = TypeVar("T")
CONFIGS = bundled("configs")
BUNDLED_DATA = bundled("data")  # the permissively licensed sets Keel ships (data/README.md)
DEFAULT_REWARD_CONFIG = CONFIGS / "reward.yaml"


class ConfigError(KeelError, ValueError):
    pass


REWARD_BACKENDS = ("auto", "onnx-int8", "onnx", "torch")  # as keel serve's --backend (service/settings.py)
HEAD_ROLES = ("train", "validation", "test", "moderation", "guard")  # a head's lists of data sources


@dataclasses.dataclass
class HeadConfig:
    """One reward head (a principle such as `harmless`), trained on its own data."""

    name: str
    train: list[DataSource]
    validation: list[DataSource]
    test: list[DataSource] = dataclasses.field(default_factory=list)
    # Labelled texts (score 1 = should be flagged) for choosing the moderation threshold on this head;
    # without them the threshold is chosen to separate rejected from chosen validation responses.
    moderation: list[DataSource] = dataclasses.field(default_factory=list)
    moderate: bool = True  # a /v1/moderations category: flagged below its threshold (False: never flagged there)
    # Benign conversations (every reply of a pair, or the rated texts) the chat output guard should pass: its
    # threshold is set to flag at most `guard_false_flags` of them (whether or not the head is a /v1/moderations
    # category). Without them the guard uses the moderation threshold, which is tuned for F1 on flag-heavy data
    # and so flags many ordinary replies.
    guard: list[DataSource] = dataclasses.field(default_factory=list)
    guard_false_flags: float = 0.01
    weight: float = 1.0  # loss weight of this head
    # Fit this head after training as a linear probe on the trained backbone's features, so its data never
    # changes the backbone: a judgement added at no cost to the other heads' accuracy (a task unlike theirs
    # sharing the backbone can lower it)
    detach: bool = False
    margin: float = 0.0  # Bradley-Terry margin added to every pair's own margin

    def sources(self) -> list[tuple[str, DataSource]]:
        """Every data source of this head with its role."""
        return [(role, source) for role in HEAD_ROLES for source in getattr(self, role)]


@dataclasses.dataclass
class TrainingConfig:
    epochs: int = 1
    batch_size: int = 16  # pairs (or ratings) per optimiser step
    learning_rate: float = 1e-4
    head_learning_rate: float = 1e-3  # the freshly initialised heads learn faster than the backbone
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_steps: int | None = None  # stop early after this many steps (None: run all epochs)
    freeze_embeddings: bool = True  # the word-embedding matrix is half of MiniLM; freezing it speeds steps
    freeze_layers: int = 0  # also fix the embeddings and the lowest N transformer layers: backward stops above them
    precision: str = "auto"  # auto | bf16 | fp16 | no: mixed-precision autocast (auto: bf16 where it is fast)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # validation accuracy every N steps (0: only at the end)
    keep_best: bool = True  # publish the weights with the best primary-head validation metric, not the last
    checkpoint_every: int = 100  # resumable checkpoint every N steps (0: never)
    eval_batch_size: int = 64


@dataclasses.dataclass
class ExportConfig:
    onnx: bool = True  # write model.onnx (ONNX Runtime-optimised fp32)
    int8: bool = True  # write model.int8.onnx (dynamic, per-channel int8)
    opset: int = 17


@dataclasses.dataclass
class RewardConfig:
    heads: list[HeadConfig]
    base_model: str = "default"  # HF name or path; "default" is all-MiniLM-L6-v2 from its wheel
    max_length: int = 256  # tokens; longer conversations lose their oldest turns
    truncation_side: str = "left"  # left keeps the final response
    attention_dropout: float = 0.0  # 0 trains 1.5-2x faster on CPU
    primary_head: str | None = None  # the head reported as `score`; default: the first
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        names = [head.name for head in self.heads]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"heads need unique names, got {names}")
        if self.primary_head is None:
            self.primary_head = names[0]
        if self.primary_head not in names:
            raise ConfigError(f"primary_head {self.primary_head!r} is not one of the heads {names}")
        check_precision(self.training.precision)
        check_numbers("", self, positive=["max_length"], below_1=["attention_dropout"])
        check_numbers("training", self.training, below_1=["warmup_ratio"],
                      positive=["epochs", "batch_size", "learning_rate", "head_learning_rate", "max_grad_norm",
                                "max_steps", "log_every", "eval_batch_size"],
                      at_least_0=["weight_decay", "freeze_layers", "eval_every", "checkpoint_every"])
        check_numbers("export", self.export, positive=["opset"])
        if self.truncation_side not in ("left", "right"):
            raise ConfigError("truncation_side must be left or right")
        if next(head for head in self.heads if head.name == self.primary_head).detach:
            raise ConfigError(f"primary_head {self.primary_head!r} has detach: true, but its validation accuracy "
                              "during training picks the weights to keep; make a trained head primary")
        for head in self.heads:
            check_numbers(f"heads.{head.name}", head, at_least_0=["weight"], below_1=["guard_false_flags"])


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
class RewardSourceConfig:
    """Where rewards come from: a Keel reward-model directory, or a running Keel service."""

    model: str | None = "default"  # model directory; "default": the default reward model (trained if absent)
    url: str | None = None  # a Keel service base URL (used instead of model), e.g. http://localhost:8000
    api_key_env: str = "KEEL_API_KEY"  # environment variable holding the service's API key, if it needs one
    backend: str = "auto"  # auto | onnx-int8 | onnx | torch, for a model directory (auto: as `keel serve` picks)
    heads: dict[str, float] = dataclasses.field(default_factory=lambda: {"harmless": 1.0})  # weights of z-scores
    clip: float = 5.0  # rewards are clipped to [-clip, clip] after weighting


@dataclasses.dataclass
class PromptsConfig:
    train: list[PromptSource] = dataclasses.field(default_factory=list)
    evaluation: list[PromptSource] = dataclasses.field(default_factory=list)  # held-out prompts for eval rows
    samples: int = 6  # evaluation prompts whose generations are shown before/after in samples.md


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
    baseline_momentum: float = 0.9  # REINFORCE: b = moving average of past rewards with this momentum
    max_length: int = 256  # SFT/DPO: prompt + response tokens


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


@dataclasses.dataclass
class PolicyConfig:
    policy: PolicyModelConfig = dataclasses.field(default_factory=PolicyModelConfig)
    reward: RewardSourceConfig = dataclasses.field(default_factory=RewardSourceConfig)
    prompts: PromptsConfig = dataclasses.field(default_factory=PromptsConfig)
    data: list[DataSource] = dataclasses.field(default_factory=list)  # SFT demonstrations / DPO pairs
    validation: list[DataSource] = dataclasses.field(default_factory=list)
    training: PolicyTrainingConfig = dataclasses.field(default_factory=PolicyTrainingConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
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
        check_numbers("training", self.training, below_1=["baseline_momentum"],
                      positive=["epochs", "prompts_per_step", "samples_per_prompt", "learning_rate", "max_grad_norm",
                                "log_every", "kl_target", "kl_horizon", "kl_budget", "max_length"],
                      at_least_0=["steps", "weight_decay", "warmup_steps", "eval_every", "checkpoint_every", "kl_coef",
                                  "unfinished_penalty"])
        check_numbers("ppo", self.ppo, positive=["clip_range", "value_clip", "epochs", "minibatch_size"],
                      at_least_0=["value_coef", "gamma", "lam"], up_to_1=["gamma", "lam"])
        check_numbers("dpo", self.dpo, positive=["beta"], below_1=["label_smoothing"])


@dataclasses.dataclass
class EvalPolicyConfig:
    """`keel eval policy`: which prompts, how to sample, and where rewards come from."""

    reward_prompts: list[PromptSource] = dataclasses.field(default_factory=list)  # held-out reward and KL
    harmful: dict[str, PromptSource] = dataclasses.field(default_factory=dict)  # refusal should be high
    safe: dict[str, PromptSource] = dataclasses.field(default_factory=dict)  # compliance should stay high
    reward: RewardSourceConfig = dataclasses.field(default_factory=RewardSourceConfig)
    max_prompt_length: int = 128
    max_new_tokens: int = 48
    temperature: float = 1.0  # for the reward/KL samples; refusal sets are decoded greedily
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        check_numbers("", self, positive=["max_prompt_length", "max_new_tokens", "temperature", "batch_size"])
        check_numbers("reward", self.reward, positive=["clip"])


def check_numbers(section: str, config: object, *, positive: Sequence[str] = (), at_least_0: Sequence[str] = (),
                  below_1: Sequence[str] = (), up_to_1: Sequence[str] = ()) -> None:
    """A clear error for a setting out of its range; unset (None) settings pass. below_1 is [0, 1)."""
    rules = ((positive, lambda v: v > 0, "> 0"), (at_least_0, lambda v: v >= 0, ">= 0"),
             (below_1, lambda v: 0 <= v < 1, "in [0, 1)"), (up_to_1, lambda v: v <= 1, "<= 1"))
    for names, valid, wanted in rules:
        for name in names:
            value = getattr(config, name)
            if value is not None and not valid(value):
                raise ConfigError(f"{section + '.' if section else ''}{name} must be {wanted}, not {value}")


def check_precision(precision: str) -> None:
    if precision not in ("auto", "bf16", "fp16", "no"):
        raise ConfigError(f"training.precision must be auto, bf16, fp16 or no, not {precision!r}")


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `key.sub.0.name=value` override; the value is parsed as YAML."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {assignment!r}")
    *parents, last = key.split(".")
    node: Any = raw
    for depth, part in enumerate([*parents, last]):
        here = ".".join([*parents, last][:depth]) or "the config"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{here} is a list of {len(node)}; {part!r} is not an index in it")
        elif not isinstance(node, dict):
            raise ConfigError(f"{here} is a value ({node!r}), not a section with a key {part!r}")
        if depth < len(parents):
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    parsed = yaml.safe_load(value)
    if isinstance(node, list):
        node[int(last)] = parsed
    else:
        node[last] = parsed


def load_config(cls: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read a YAML config, apply overrides, resolve data and model paths relative to the config file."""
    path = Path(path)
    raw = read_yaml(path)
    for assignment in overrides:
        try:
            apply_override(raw, assignment)
        except (IndexError, ValueError, TypeError) as error:
            raise ConfigError(f"--set {assignment}: {error}") from error
    config = build(cls, raw, "config")
    _resolve_paths(config, path.resolve().parent)
    return config


SOURCE_LISTS = (*HEAD_ROLES, "evaluation", "data")  # config keys that hold lists of data sources
MODEL_KEYS = ("model", "base_model")  # a model: "default", a hub name, or a path


def _from_config_folder(path: str, base: Path) -> str:
    return str((base / path).resolve())


def config_relative_model(value: str, base: Path) -> str:
    """A relative model path that exists next to the config file names that file; anything else (a hub name,
    "default", a path from the working directory) is kept as written."""
    if Path(value).is_absolute() or not (base / value).exists():
        return value
    return _from_config_folder(value, base)


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; `extends: OTHER.yaml` (relative to this file) is read first and overridden key by key."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a YAML mapping")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    parent_path = (path.parent / parent).resolve()
    if parent_path in seen:
        raise ConfigError(f"{path}: `extends` loops back to {parent_path}")
    inherited = read_yaml(parent_path, (*seen, path.resolve()))
    return deep_merge(_anchor_paths(inherited, parent_path.parent), raw)


def _anchor_paths(raw: Any, base: Path, key: str = "") -> Any:
    """Make the data paths of an extended file absolute, so they stay relative to the file that names them."""
    if isinstance(raw, dict):
        return {k: (_from_config_folder(v, base) if k == "path" and isinstance(v, str)
                    else config_relative_model(v, base) if k in MODEL_KEYS and isinstance(v, str)
                    else _anchor_paths(v, base, k)) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_from_config_folder(item, base) if isinstance(item, str) and key in SOURCE_LISTS
                else _anchor_paths(item, base)
                for item in raw]
    return raw


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def build(cls: Any, value: Any, where: str) -> Any:
    """Build a dataclass (or list/optional of one) from plain YAML values, naming the key on error."""
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(cls) if arg is not type(None)]
        return None if value is None else build(options[0], value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        value_type = typing.get_args(cls)[1]
        return {key: build(value_type, item, f"{where}.{key}") for key, item in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [build(typing.get_args(cls)[0], item, f"{where}.{i}") for i, item in enumerate(value)]
    if isinstance(cls, type) and issubclass(cls, DataSource) and isinstance(value, str):
        return cls(path=value)
    if dataclasses.is_dataclass(cls):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
        try:
            return cls(**{key: build(hints[key], item, f"{where}.{key}") for key, item in value.items()})
        except TypeError as error:
            raise ConfigError(f"{where}: {error}") from error
    if cls is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if cls in (int, float, str, bool) and not isinstance(value, cls):
        raise ConfigError(f"{where}: expected {cls.__name__}, got {value!r}")
    return value


def _resolve_paths(config: Any, base: Path) -> None:
    """Make every data path relative to the config file absolute, and model paths that exist there."""
    if isinstance(config, DataSource):
        if not Path(config.path).is_absolute():
            config.path = _from_config_folder(config.path, base)
    elif isinstance(config, (list, dict)):
        for item in config.values() if isinstance(config, dict) else config:
            _resolve_paths(item, base)
    elif dataclasses.is_dataclass(config):
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            if field.name in MODEL_KEYS and isinstance(value, str):
                setattr(config, field.name, config_relative_model(value, base))
            else:
                _resolve_paths(value, base)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
