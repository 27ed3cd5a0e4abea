"""The layers import downward only (docs/architecture.md): keel.cli (the command line) -> keel.service,
keel.training -> keel.core. Read from the sources' import statements, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Each layer's folder, and which layers it may import (the root package `keel` holds only the version).
FOLDERS = {"keel.core": ROOT / "src/keel/core", "keel.service": ROOT / "service", "keel.training": ROOT / "training",
           "keel.cli": ROOT / "src/keel/cli"}
ALLOWED = {
    "keel.core": {"keel.core"},
    "keel.service": {"keel.service", "keel.core"},
    "keel.training": {"keel.training", "keel.core"},
    "keel.cli": {"keel.cli", "keel.service", "keel.training", "keel.core"},
}
# Modules a torch-free serving install runs: they must not import torch or transformers at module level.
SERVING_MODULES = [*(ROOT / "src/keel/core" / name for name in (
                       "artifact.py", "hardware.py", "moderation.py", "onnx_engine.py", "runtime.py", "text.py",
                       "tokenizer.py", "bundled.py")),
                   *(path for path in (ROOT / "service").glob("*.py") if path.name != "generation.py"),
                   *(ROOT / "src/keel/cli" / name for name in ("main.py", "serve.py", "options.py"))]


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def layer_of(module: str) -> str | None:
    """The layer a first-party module belongs to (`keel` itself, the version, belongs to none)."""
    return next((layer for layer in FOLDERS if module == layer or module.startswith(layer + ".")), None)


def test_every_module_belongs_to_a_layer():
    """Nothing but the package's own files sits beside the layers, so the rule below covers every module."""
    stray = sorted(path.name for path in (ROOT / "src/keel").glob("*.py")
                   if path.name not in ("__init__.py", "__main__.py"))
    assert not stray


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer: str):
    wrong = {f"{path.relative_to(ROOT)} imports {module}"
             for path in FOLDERS[layer].rglob("*.py")
             for module in imported_modules(path)
             if (target := layer_of(module)) is not None and target not in ALLOWED[layer]}
    assert not wrong, sorted(wrong)


def test_nothing_installs_outside_the_keel_namespace():
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = pyproject.split("packages = [", 1)[1].split("]", 1)[0]
    names = [name.strip().strip('"') for name in packages.replace("\n", ",").split(",") if name.strip()]
    assert names and all(name == "keel" or name.startswith("keel.") for name in names), names


def test_the_serving_path_imports_no_torch_at_module_level():
    heavy = {"torch", "transformers", "accelerate", "onnx", "safetensors"}
    wrong = {f"{path.relative_to(ROOT)} imports {module}" for path in SERVING_MODULES
             for module in imported_modules(path, top_level_only=True) if module.split(".")[0] in heavy}
    assert not wrong, sorted(wrong)
