"""Where Keel's bundled configs/ and data/ are: inside the installed `keel` package, where pyproject.toml maps
them as package data (a wheel copies them there; the editable install links them there)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).parent.parent  # the installed `keel` package (not resolved: the editable install links)


def bundled(name: str) -> Path:
    """The bundled folder `name` ("configs" or "data"); a serving install has no training data, and errors then
    name this path. Configs name data files relative to themselves (../data/...), which the package keeps."""
    return _PACKAGE / name
