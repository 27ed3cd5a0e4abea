"""Self-describing model directories: the `keel.json` manifest and atomic publication."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "keel.json"
# 2: a reward model's directory is a Hugging Face sequence-classification model (config.json with id2label and
# auto_map, one model.safetensors, modeling_keel.py). 1: a bare backbone plus reward_heads.safetensors; still read
# (keel_core.reward_model.RewardModel.load), and `keel export reward` rewrites such a directory as format 2.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)


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


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
