"""Model versions: a model store is a directory of Keel model directories, one per version. The service serves
the version named in the store's CURRENT file (else the newest by creation time) and can switch versions
without a restart: POST /v1/admin/reload or SIGHUP. A failed reload keeps the old model serving."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from service.runtime import BatchLimits, RewardRuntime, choose_backend, service_batch_limits
from service.state import ApiError, ServiceState
from training.artifact import MANIFEST, ArtifactError, read_manifest

log = logging.getLogger(__name__)
CURRENT = "CURRENT"


def is_store(location: Path) -> bool:
    return location.is_dir() and not (location / MANIFEST).exists()


def store_versions(location: Path) -> list[Path]:
    """Model directories in a store, oldest first (by their manifests' creation time)."""
    found = []
    for directory in location.iterdir():
        if directory.is_dir() and not directory.name.startswith(".") and (directory / MANIFEST).exists():
            try:
                found.append((read_manifest(directory).get("created_at", ""), directory))
            except ArtifactError as error:
                log.warning("skipping %s in the model store: %s", directory, error)
    return [directory for _, directory in sorted(found)]


def model_directory(location: Path, version: str | None = None) -> Path:
    """The model directory to serve: `location` itself, or a version of the store at `location`."""
    if not is_store(location):
        if version is not None and version != location.name:
            raise ArtifactError(f"{location} is a single model, not a store: it has no version {version!r}")
        return location
    if version is None and (location / CURRENT).exists():
        version = (location / CURRENT).read_text().strip()
    if version is not None:
        if "/" in version or version.startswith("."):
            raise ArtifactError(f"bad version name {version!r}")
        if not (location / version / MANIFEST).exists():
            raise ArtifactError(f"the model store {location} has no version {version!r}")
        return location / version
    versions = store_versions(location)
    if not versions:
        raise ArtifactError(f"the model store {location} holds no model directories")
    return versions[-1]


def describe_versions(state: ServiceState) -> list[dict[str, Any]]:
    """The served model first (active), then the store's other versions."""
    active = state.runtime
    listed = [{**active.describe(), "active": True}]
    location = Path(state.settings.model)
    if is_store(location):
        for directory in store_versions(location):
            if directory.resolve() != active.directory.resolve():
                manifest = read_manifest(directory)
                listed.append({"id": directory.name, "object": "model", "owned_by": "keel", "active": False,
                               "version": manifest.get("created_at"), "heads": manifest.get("heads")})
    return listed


def load_runtime(state: ServiceState, directory: Path) -> RewardRuntime:
    settings = state.settings
    backend = choose_backend(directory) if settings.backend == "auto" else settings.backend
    defaults = service_batch_limits(backend)
    limits = BatchLimits(settings.max_batch_size or defaults.max_batch_size,
                         settings.max_batch_tokens or defaults.max_batch_tokens)
    runtime = RewardRuntime(directory, backend, settings.threads, limits, state.metrics,
                            settings.inference_workers(backend))
    runtime.warm_up()
    return runtime


async def reload_model(state: ServiceState, version: str | None = None) -> RewardRuntime:
    """Load, check and warm the new version beside the old one, then switch; on any failure keep the old."""
    async with state.reload_lock:
        old = state.runtime
        try:
            directory = model_directory(Path(state.settings.model), version)
            new = await asyncio.to_thread(load_runtime, state, directory)
        except (ArtifactError, OSError, ValueError) as error:
            state.metrics.reloads.labels("failed").inc()
            log.error("reload failed, still serving %s (%s): %s", old.name, old.version, error)
            raise ApiError(409, f"reload failed, still serving {old.name} ({old.version}): {error}",
                           code="reload_failed") from error
        if new.heads != old.heads:
            state.metrics.reloads.labels("failed").inc()
            raise ApiError(409, f"reload refused, still serving {old.name}: the new model's heads {new.heads} "
                           f"differ from {old.heads}; restart the service to change heads", code="reload_failed")
        state.runtime = new
        state.metrics.reloads.labels("ok").inc()
        log.info("reloaded: now serving %s (%s), was %s (%s)", new.name, new.version, old.name, old.version)
        return new
