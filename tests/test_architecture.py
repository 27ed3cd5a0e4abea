"""The layers import downward only (docs/architecture.md): keel (the command line) -> service, training ->
keel_core. Read from the sources' import statements, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Which first-party packages each package may import.
ALLOWED = {
    "keel_core": {"keel_core"},
    "service": {"service", "keel_core"},
    "training": {"training", "keel_core"},
    "keel": {"keel", "service", "training", "keel_core"},
}
# Modules a torch-free serving install runs: they must not import torch or transformers at module level.
SERVING_MODULES = ["keel_core/artifact.py", "keel_core/hardware.py", "keel_core/moderation.py",
                   "keel_core/onnx_engine.py", "keel_core/runtime.py", "keel_core/text.py", "keel_core/tokenizer.py",
                   "keel_core/bundled.py", *(str(p.relative_to(ROOT)) for p in (ROOT / "service").glob("*.py")
                                            if p.name != "generation.py"),
                   "keel/cli.py", "keel/serve.py", "keel/options.py"]


def imported_packages(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(package: str):
    first_party = set(ALLOWED)
    wrong = {f"{path.relative_to(ROOT)} imports {name}"
             for path in (ROOT / package).glob("*.py")
             for name in imported_packages(path) & first_party - ALLOWED[package]}
    assert not wrong, sorted(wrong)


def test_the_serving_path_imports_no_torch_at_module_level():
    heavy = {"torch", "transformers", "accelerate", "onnx", "safetensors"}
    wrong = {f"{module} imports {name}" for module in SERVING_MODULES
             for name in imported_packages(ROOT / module, top_level_only=True) & heavy}
    assert not wrong, sorted(wrong)
