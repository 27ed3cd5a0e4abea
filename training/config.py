"""YAML configs with `--set key.sub=value` overrides, read into typed dataclasses (unknown keys are errors)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from training.data import DataSource

T = TypeVar("T")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REWARD_CONFIG = PACKAGE_ROOT / "configs" / "reward.yaml"


class ConfigError(ValueError):
    pass


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
    moderate: bool = True  # a moderation category: flagged below its threshold (False: scored, never flagged)
    weight: float = 1.0  # loss weight of this head
    margin: float = 0.0  # Bradley-Terry margin added to every pair's own margin


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
    precision: str = "bf16"  # bf16 | fp16 | no: mixed-precision autocast (bf16 is ~1.5x faster on AVX512-BF16 CPUs)
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
        if self.training.precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"training.precision must be no, bf16 or fp16, not {self.training.precision!r}")
        if self.truncation_side not in ("left", "right"):
            raise ConfigError("truncation_side must be left or right")


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `key.sub.0.name=value` override; the value is parsed as YAML."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {assignment!r}")
    *parents, last = key.split(".")
    node: Any = raw
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    parsed = yaml.safe_load(value)
    if isinstance(node, list):
        node[int(last)] = parsed
    else:
        node[last] = parsed


def load_config(cls: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read a YAML config, apply overrides, resolve data paths relative to the config file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error}") from error
    for assignment in overrides:
        try:
            apply_override(raw, assignment)
        except (IndexError, ValueError, TypeError) as error:
            raise ConfigError(f"--set {assignment}: {error}") from error
    config = build(cls, raw, "config")
    _resolve_paths(config, path.resolve().parent)
    return config


def build(cls: Any, value: Any, where: str) -> Any:
    """Build a dataclass (or list/optional of one) from plain YAML values, naming the key on error."""
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(cls) if arg is not type(None)]
        return None if value is None else build(options[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [build(typing.get_args(cls)[0], item, f"{where}.{i}") for i, item in enumerate(value)]
    if cls is DataSource and isinstance(value, str):
        return DataSource(path=value)
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
    for head in getattr(config, "heads", []):
        for source in [*head.train, *head.validation, *head.test, *head.moderation]:
            if not Path(source.path).is_absolute():
                source.path = str((base / source.path).resolve())


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
