"""Where Keel's bundled configs/ and data/ are: beside the sources in a clone (or an editable install), inside
the `keel` package of an installed wheel (pyproject.toml maps them there as package data)."""

from __future__ import annotations

from pathlib import Path

_INSTALL_ROOT = Path(__file__).resolve().parent.parent  # the clone, or site-packages


def bundled(name: str) -> Path:
    """The bundled folder `name` ("configs" or "data"). Configs name data files relative to themselves
    (../data/...), which both layouts keep."""
    for candidate in (_INSTALL_ROOT / "keel" / name, _INSTALL_ROOT / name):
        if candidate.is_dir():
            return candidate
    return _INSTALL_ROOT / name  # absent (a serving install has no training data): errors name this path
