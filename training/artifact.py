"""Self-describing model directories: the `keel.json` manifest and atomic publication."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MANIFEST = "keel.json"
FORMAT_VERSION = 1


def cache_root() -> Path:
    """Where Keel keeps models it builds for itself: $XDG_CACHE_HOME/keel (default ~/.cache/keel)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "keel"


class ArtifactError(RuntimeError):
    pass


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to a temp file beside the target, then rename: readers never see half a file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        json.dump(value, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{directory} is not a Keel model directory: {MANIFEST} is missing") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path} is unreadable or corrupt: {error}") from error
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    return manifest


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
