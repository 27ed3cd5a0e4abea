"""Where Keel's bundled configs/ and data/ are: inside the installed `keel` package, where pyproject.toml maps
them as package data (a wheel copies them there; the editable install links them there)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).parent.parent  # the installed `keel` package (not resolved: the editable install links)


def default_model_dir(kind: str = "reward") -> Path:
    """Where the default reward (or moderation) model lives in the cache, named after its config's content: a
    new default config trains a new model instead of serving one trained by an older config. Torch-free, so a
    serving install finds a default model trained elsewhere (or by an earlier training install)."""
    from keel.core.artifact import cache_root, file_sha256

    config = bundled("configs") / ("moderation.yaml" if kind == "moderation" else "reward.yaml")
    return cache_root() / "models" / f"{kind}-default-{file_sha256(config)[:8]}"


def bundled(name: str) -> Path:
    """The bundled folder `name` ("configs" or "data"); a serving install has no training data, and errors then
    name this path. Configs name data files relative to themselves (../data/...), which the package keeps."""
    return _PACKAGE / name
