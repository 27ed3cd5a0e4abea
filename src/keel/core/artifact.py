"""Self-describing model directories: the `keel.json` manifest (read, checked, typed) and atomic publication."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

from keel import __version__

MANIFEST = "keel.json"
T = TypeVar("T")
# 3: a reward model's directory is a Hugging Face sequence-classification model of model_type "keel" (config.json
# with id2label, auto_map and the encoder's config, one model.safetensors, modeling_keel.py). 2: the same, but
# config.json is the encoder's own, which transformers loaded as the encoder's classifier, with random weights,
# unless trust_remote_code was given. 1: a bare backbone plus reward_heads.safetensors. Older formats are still read
# (keel.core.reward_model.RewardModel.load), and `keel export reward` rewrites such a directory as format 3.
FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """Where Keel keeps models it builds for itself: $XDG_CACHE_HOME/keel (default ~/.cache/keel)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "keel"


class KeelError(Exception):
    """An error the user can fix from its message alone: the command line prints it in one line, no traceback.
    Each layer's errors (ArtifactError here, ConfigError, DataError, SettingsError, ...) derive from it."""


class ArtifactError(KeelError, RuntimeError):
    """A model directory that cannot be read, published or served; the message says which and why."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside the target, then rename: readers never see half a file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{directory} is not a Keel model directory: {MANIFEST} is missing") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path} is unreadable or corrupt: {error}") from error
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a Keel manifest: it holds a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format_version") not in READABLE_FORMATS:
        raise ArtifactError(f"{path}: format_version {manifest.get('format_version')} is not one this Keel reads "
                            f"{READABLE_FORMATS}; a newer Keel wrote it")
    return manifest


def check_reward_manifest(manifest: dict[str, Any], path: str | Path) -> None:
    """Raise ArtifactError, saying why, if a reward model's manifest cannot be served: missing heads, a primary
    head that is not one of them, or normalisation statistics that would turn scores into NaN or infinity."""
    heads = manifest.get("heads")
    if not isinstance(heads, list) or not heads or not all(isinstance(h, str) for h in heads):
        raise ArtifactError(f"{path}: 'heads' must be a non-empty list of names")
    if manifest.get("primary_head") not in heads:
        raise ArtifactError(f"{path}: primary_head {manifest.get('primary_head')!r} is not one of the heads {heads}")
    length = manifest.get("max_length")
    if not isinstance(length, int) or length < 1:
        raise ArtifactError(f"{path}: max_length must be a whole number >= 1, not {length!r}")
    stats, moderation = manifest.get("normalization"), manifest.get("moderation")
    for head in heads:
        head_stats = stats.get(head) if isinstance(stats, dict) else None
        if not isinstance(head_stats, dict):
            raise ArtifactError(f"{path}: no normalization statistics for head {head!r}")
        mean, std = head_stats.get("mean"), head_stats.get("std")
        if not (_finite(mean) and _finite(std) and std > 0):
            raise ArtifactError(f"{path}: head {head!r} has unusable normalization statistics (mean {mean!r}, std "
                                f"{std!r}; std must be finite and > 0)")
        entry = moderation.get(head) if isinstance(moderation, dict) else None
        if not isinstance(entry, dict) or "threshold" not in entry:
            raise ArtifactError(f"{path}: no moderation entry (threshold) for head {head!r}")
        guard = entry.get("guard", {})
        for threshold in (entry["threshold"], guard.get("threshold") if isinstance(guard, dict) else "not an object"):
            if threshold is not None and not (_finite(threshold) and 0.0 <= threshold <= 1.0):
                raise ArtifactError(f"{path}: head {head!r} has a moderation threshold {threshold!r}, not in [0, 1]")


def _finite(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- typed manifests ------------------------------------------------------------------------------------
# keel.json as dataclasses: code reads `manifest.moderation[head].guard` rather than chains of dict lookups.
# to_json() writes the same JSON shape as from_json() reads; optional figures that are absent stay absent.


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _json(value: Any) -> Any:
    """A dataclass tree as JSON values, leaving out optional fields (default None) that are None; a required
    field that is None stays (a threshold of None means "never flags")."""
    if dataclasses.is_dataclass(value):
        return {f.name: _json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None or f.default is not None}
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


def _known(cls: type, value: dict[str, Any]) -> dict[str, Any]:
    """The keys of a JSON object that are fields of cls (a newer Keel may add others)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in value.items() if k in names}


def _construct(cls: type[T], values: dict[str, Any], directory: str | Path) -> T:
    try:
        return cls(**values)
    except TypeError as error:  # a required field is missing
        raise ArtifactError(f"{Path(directory) / MANIFEST} is incomplete: {error}") from None


@dataclass(kw_only=True)
class HeadStats:
    """A head's raw-score mean and standard deviation on its validation data: z = (raw - mean) / std."""

    mean: float
    std: float


@dataclass(kw_only=True)
class GuardThreshold:
    """The chat guard's threshold for a head: the lowest that flags at most a set share of benign replies."""

    threshold: float | None
    chosen_on: str = ""
    false_flags: float | None = None
    examples: int | None = None


@dataclass(kw_only=True)
class ModerationThreshold:
    """A head's /v1/moderations threshold (None: not a moderation category) and how it was chosen."""

    threshold: float | None
    chosen_on: str = ""
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    examples: int | None = None
    guard: GuardThreshold | None = None

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ModerationThreshold:
        guard = value.get("guard")
        return cls(**{**_known(cls, value), "guard": GuardThreshold(**_known(GuardThreshold, guard)) if guard else None})


@dataclass(kw_only=True)
class Manifest:
    """What every keel.json begins with; each kind of model directory adds its own fields."""

    format_version: int = FORMAT_VERSION
    kind: str
    keel_version: str = __version__
    created_at: str = dataclasses.field(default_factory=_now)

    def to_json(self) -> dict[str, Any]:
        """keel.json's content, as write() writes it."""
        content: dict[str, Any] = _json(self)
        return content

    def write(self, directory: Path) -> None:
        write_json_atomic(directory / MANIFEST, self.to_json())


@dataclass(kw_only=True)
class RewardManifest(Manifest):
    """keel.json of a reward-model directory."""

    kind: str = "reward-model"
    base_model: str
    base_model_path: str
    heads: list[str]
    primary_head: str
    max_length: int
    truncation_side: str
    input_names: list[str]
    normalization: dict[str, HeadStats]
    moderation: dict[str, ModerationThreshold]
    onnx: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    exported: dict[str, Any] | None = None  # set by `keel export reward`

    @classmethod
    def read(cls, directory: str | Path) -> RewardManifest:
        """The checked manifest of a reward-model directory (ArtifactError, saying why, if it cannot be served)."""
        raw = read_manifest(directory)
        if raw.get("kind") == "moderation-model":
            raise ArtifactError(f"{directory} is a moderation model, not a reward model: serve it with "
                                "--moderation-model")
        check_reward_manifest(raw, Path(directory) / MANIFEST)
        values = _known(cls, raw)
        values["normalization"] = {h: HeadStats(**_known(HeadStats, s)) for h, s in raw["normalization"].items()}
        values["moderation"] = {h: ModerationThreshold.from_json(m) for h, m in raw["moderation"].items()}
        values.setdefault("base_model", "")
        values.setdefault("base_model_path", "")
        values.setdefault("input_names", [])
        values.setdefault("truncation_side", "left")
        return _construct(cls, values, directory)

    def guard_threshold(self, head: str) -> float | None:
        """The chat guard's threshold for a head: its own where the model has one, else the moderation one."""
        rule = self.moderation[head]
        return rule.guard.threshold if rule.guard else rule.threshold


@dataclass(kw_only=True)
class CategoryThreshold:
    """A moderation category's threshold on its probability (None: scored but never flagged) and how it was
    chosen on validation data, with the precision and recall it had there."""

    threshold: float | None
    rule: str  # "precision >= 0.8", "best F1", or why there is no threshold
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    positives: int | None = None  # labelled validation positives
    examples: int | None = None  # labelled validation examples


@dataclass(kw_only=True)
class ModerationManifest(Manifest):
    """keel.json of a moderation-model directory: one sigmoid output per category, flagged at its threshold."""

    kind: str = "moderation-model"
    base_model: str
    base_model_path: str
    categories: list[str]
    max_length: int
    truncation_side: str
    input_names: list[str]
    thresholds: dict[str, CategoryThreshold]
    onnx: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The chat guard's margin over the thresholds, in log-odds, chosen on validation (None: chosen by no rule)
    guard_margin: float | None = None
    guard_margin_rule: str = ""

    @property
    def heads(self) -> list[str]:  # the model's outputs, as a reward model's heads
        return self.categories

    @classmethod
    def read(cls, directory: str | Path) -> ModerationManifest:
        """The checked manifest of a moderation-model directory (ArtifactError, saying why, if unusable)."""
        raw = read_manifest(directory)
        path = Path(directory) / MANIFEST
        if raw.get("kind") != "moderation-model":
            raise ArtifactError(f"{path} is not a moderation model's manifest (kind {raw.get('kind')!r})")
        categories, thresholds = raw.get("categories"), raw.get("thresholds")
        if not isinstance(categories, list) or not categories or not all(isinstance(c, str) for c in categories):
            raise ArtifactError(f"{path}: 'categories' must be a non-empty list of names")
        if not isinstance(thresholds, dict) or any(not isinstance(thresholds.get(c), dict) for c in categories):
            raise ArtifactError(f"{path}: 'thresholds' needs an entry for every category")
        for category in categories:
            threshold = thresholds[category].get("threshold")
            if threshold is not None and not (_finite(threshold) and 0.0 <= threshold <= 1.0):
                raise ArtifactError(f"{path}: category {category!r} has a threshold {threshold!r}, not in [0, 1]")
        margin = raw.get("guard_margin")
        if margin is not None and not (_finite(margin) and margin >= 0):
            raise ArtifactError(f"{path}: guard_margin {margin!r} must be a number >= 0 (log-odds) or null")
        values = _known(cls, raw)
        values["thresholds"] = {c: _construct(CategoryThreshold, _known(CategoryThreshold, thresholds[c]), directory)
                                for c in categories}
        return _construct(cls, values, directory)


def read_model_manifest(directory: str | Path) -> RewardManifest | ModerationManifest:
    """The checked manifest of a servable model directory, of whichever kind it is."""
    kind = read_manifest(directory).get("kind")
    return ModerationManifest.read(directory) if kind == "moderation-model" else RewardManifest.read(directory)


@dataclass(kw_only=True)
class PolicyManifest(Manifest):
    """keel.json of a policy directory (written by every policy algorithm)."""

    kind: str = "policy"
    algorithm: str
    base_policy: str
    base_policy_path: str
    lora: dict[str, Any] | None
    steps: int
    stopped_early: str | None
    warnings: list[str]
    train_seconds: float
    precision: str
    final_evaluation: dict[str, Any]
    chat: dict[str, Any]
    reward: dict[str, Any]
    config: dict[str, Any]
    data: list[dict[str, Any]]
    # training.restarts: every attempt's seed, training-log shares and verdict; this directory holds the kept one
    attempts: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @classmethod
    def read(cls, directory: str | Path) -> PolicyManifest:
        raw = read_manifest(directory)
        if raw.get("kind") != "policy":
            raise ArtifactError(f"{Path(directory) / MANIFEST} is not a policy's manifest (kind {raw.get('kind')!r})")
        return _construct(cls, _known(cls, raw), directory)

    @classmethod
    def find(cls, policy: str | Path) -> PolicyManifest | None:
        """The manifest of a Keel-trained policy; None for any other (a Hugging Face name or directory)."""
        return cls.read(policy) if (Path(policy) / MANIFEST).exists() else None


@contextmanager
def staged(output: Path, overwrite: bool) -> Iterator[Path]:
    """Every atomic publish: the block writes into a fresh staging directory beside output, which then replaces
    output (a rename; an existing output only with overwrite). On any failure, an interrupt too, the staging
    directory is removed and output is left as it was."""
    staging = staging_directory(output)
    try:
        yield staging
        publish(staging, output, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def staging_directory(output: Path) -> Path:
    """A fresh directory on the same filesystem as output, so publishing is a rename."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.staging-"))


def publish(staging: Path, output: Path, overwrite: bool) -> None:
    """Move a finished staging directory to output. An existing output is replaced only with overwrite."""
    # mkdtemp and some writers create owner-only files; a served model must be readable by the service user.
    staging.chmod(0o755)
    for path in staging.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    if output.exists():
        if not overwrite:
            raise ArtifactError(f"{output} already exists; pass --overwrite to replace it")
        retired = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
        os.replace(output, retired / output.name)
        os.replace(staging, output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, output)
