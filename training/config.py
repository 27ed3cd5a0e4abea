"""YAML configs with `--set key.sub=value` overrides, read into typed dataclasses (unknown keys are errors)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from keel.core.artifact import KeelError
from keel.core.bundled import bundled
from keel.training.data import DataSource

T = TypeVar("T")
CONFIGS = bundled("configs")
BUNDLED_DATA = bundled("data")  # the permissively licensed sets Keel ships (data/README.md)
DEFAULT_REWARD_CONFIG = CONFIGS / "reward.yaml"
DEFAULT_MODERATION_CONFIG = CONFIGS / "moderation.yaml"


class ConfigError(KeelError, ValueError):
    pass


REWARD_BACKENDS = ("auto", "onnx-int8", "onnx", "torch")  # as keel serve's --backend (service/settings.py)
HEAD_ROLES = ("train", "validation", "test", "moderation", "guard")  # a head's lists of data sources


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
    """Apply one `key.sub.0.name=value` override; the value is parsed as YAML. `key+=value` appends to the list
    at `key` (a list value appends each item), so a source is added without repeating the others."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE or KEY+=VALUE, got {assignment!r}")
    append = key.endswith("+")
    key = key.removesuffix("+")
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
    if append:
        target = node[int(last)] if isinstance(node, list) else node.get(last)
        if not isinstance(target, list):
            raise ConfigError(f"--set {key}+=...: {key} is {target!r}, not a list to append to")
        target.extend(parsed if isinstance(parsed, list) else [parsed])
    elif isinstance(node, list):
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
        fields = {key: build(hints[key], item, f"{where}.{key}") for key, item in value.items()}
        try:
            return cast(Any, cls)(**fields)
        except ConfigError:
            raise  # already names what to fix
        except (TypeError, ValueError) as error:  # a missing key, or a check in the dataclass's __post_init__
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
    if isinstance(config, DataSource) and not Path(config.path).is_absolute():
        config.path = _from_config_folder(config.path, base)
    if isinstance(config, (list, dict)):
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
