"""Model versions: a model store is a directory of Keel model directories, one per version. The service serves
the version named in the store's CURRENT file, else the newest valid one by creation time, and can switch
versions without a restart: POST /v1/admin/reload or SIGHUP (keel.service.serving.Serving.reload). A failed
reload keeps the old model serving.

A version is invalid when its manifest is missing, corrupt or unusable (check_reward_manifest), or when it
is a symbolic link leading out of the store (unless --allow-store-symlinks). Invalid versions are listed with
the reason and never served; one named by CURRENT or by a reload is refused with that reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.core.artifact import MANIFEST, ArtifactError, read_model_manifest
from keel.core.runtime import (
    BatchLimits,
    ModelRuntime,
    ModerationRuntime,
    RewardRuntime,
    choose_backend,
    service_batch_limits,
)
from keel.service.metrics import Metrics
from keel.service.settings import Settings

log = logging.getLogger(__name__)
CURRENT = "CURRENT"


@dataclass
class Version:
    directory: Path
    created_at: str
    heads: list[str]
    problem: str | None  # why it cannot be served; None for a valid version


def is_store(location: Path) -> bool:
    return location.is_dir() and not (location / MANIFEST).exists()


def inspect_version(store: Path, directory: Path, allow_symlinks: bool) -> Version:
    try:
        if not allow_symlinks:
            root = store.resolve()
            for path in (directory, *directory.rglob("*")):
                if not path.resolve().is_relative_to(root):
                    raise ArtifactError(f"{path} leads out of the model store {store} (a symbolic link); "
                                        "--allow-store-symlinks serves such versions")
        manifest = read_model_manifest(directory)
        return Version(directory, manifest.created_at, manifest.heads, None)
    except ArtifactError as error:
        return Version(directory, "", [], str(error))


def store_versions(location: Path, allow_symlinks: bool = False) -> list[Version]:
    """Every version in a store, valid or not, oldest first (invalid ones, whose age is unknown, first)."""
    found = [inspect_version(location, directory, allow_symlinks) for directory in location.iterdir()
             if directory.is_dir() and not directory.name.startswith(".") and (directory / MANIFEST).exists()]
    return sorted(found, key=lambda v: (v.problem is None, v.created_at, v.directory.name))


def model_directory(location: Path, version: str | None = None, allow_symlinks: bool = False) -> Path:
    """The model directory to serve: `location` itself, or a version of the store at `location`: the one asked
    for, else CURRENT's, else the newest valid one (with a warning for each newer invalid one)."""
    if not location.exists():
        raise ArtifactError(f"no model directory or model store at {location}")
    if not is_store(location):
        if version is not None and version != location.name:
            raise ArtifactError(f"{location} is a single model, not a store: it has no version {version!r}")
        return location
    named_by = "requested"
    if version is None and (location / CURRENT).exists():
        version, named_by = (location / CURRENT).read_text().strip(), f"named by {location / CURRENT}"
    if version is not None:
        if "/" in version or version.startswith(".") or not version:
            raise ArtifactError(f"bad version name {version!r}")
        if not (location / version / MANIFEST).exists():
            raise ArtifactError(f"the model store {location} has no version {version!r}")
        chosen = inspect_version(location, location / version, allow_symlinks)
        if chosen.problem:
            raise ArtifactError(f"version {version!r} ({named_by}) is invalid: {chosen.problem}")
        return chosen.directory
    versions = store_versions(location, allow_symlinks)
    valid = [v for v in versions if v.problem is None]
    for invalid in (v for v in versions if v.problem is not None):
        log.warning("model store: skipping invalid version %s: %s", invalid.directory.name, invalid.problem)
    if not valid:
        raise ArtifactError(f"the model store {location} holds no valid model directories")
    return valid[-1].directory


def describe_store(active: ModelRuntime, location: Path, allow_symlinks: bool) -> list[dict[str, Any]]:
    """The served model first, then its store's other versions, the invalid ones with the reason."""
    listed = [{**active.describe(), "active": True, "valid": True}]
    if is_store(location):
        for version in store_versions(location, allow_symlinks):
            if version.directory.resolve() != active.directory.resolve():
                entry = {"id": version.directory.name, "object": "model", "owned_by": "keel", "active": False,
                         "valid": version.problem is None}
                if version.problem is None:
                    entry.update(version=version.created_at, heads=version.heads)
                else:
                    entry["problem"] = version.problem
                listed.append(entry)
    return listed


@dataclass(frozen=True)
class Served:
    """A kind of model the service serves: its runtime class and the setting naming its directory or store."""

    kind: str
    runtime_class: type[ModelRuntime]
    setting: str


REWARD = Served("reward", RewardRuntime, "model")
MODERATION = Served("moderation", ModerationRuntime, "moderation_model")
SERVED = (REWARD, MODERATION)


def load_runtime(settings: Settings, metrics: Metrics, directory: Path, which: Served = REWARD) -> ModelRuntime:
    """A model directory loaded as the settings say (backend, threads, batch limits, workers) and warmed up."""
    backend = choose_backend(directory) if settings.backend == "auto" else settings.backend
    defaults = service_batch_limits(backend)
    limits = BatchLimits(settings.max_batch_size or defaults.max_batch_size,
                         settings.max_batch_tokens or defaults.max_batch_tokens)
    runtime = which.runtime_class(directory, backend, settings.threads, limits, metrics.observe_batch,
                                  settings.inference_workers(backend))
    runtime.warm_up()
    return runtime
