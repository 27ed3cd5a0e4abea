"""A non-editable `pip install ".[serve]"` into a fresh venv: no torch, and it serves scoring and moderation."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import httpx
import numpy as np
import pytest

from keel.core.runtime import RewardRuntime
from tests.helpers import keel_server

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def serving_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A venv with only the serve extra, installed from a built wheel (not editable, not this checkout's path)."""
    home = tmp_path_factory.mktemp("serve-venv")
    venv.create(home, with_pip=True)
    python = str(home / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              f"{ROOT}[serve]"], capture_output=True, text=True, timeout=900)
    if install.returncode != 0 and "No matching distribution" in install.stderr + install.stdout:
        pytest.skip(f"no package index reachable to install the serve extra: {install.stderr[-300:]}")
    assert install.returncode == 0, install.stderr[-3000:]
    return python


def test_the_serve_extra_has_no_torch_and_serves_scores_and_moderation(serving_python: str, tiny_reward_model: Path,
                                                                       tiny_moderation_model: Path, tmp_path: Path):
    run = subprocess.run([serving_python, "-c", "import torch"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode != 0 and "No module named 'torch'" in run.stderr
    # Package data: the default configs and the bundled data come with a non-editable install.
    code = ("from keel.training.config import DEFAULT_REWARD_CONFIG, BUNDLED_DATA; print(DEFAULT_REWARD_CONFIG.is_file(), "
            "(BUNDLED_DATA / 'README.md').is_file(), DEFAULT_REWARD_CONFIG)")
    run = subprocess.run([serving_python, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.stdout.split()[:2] == ["True", "True"] and "site-packages" in run.stdout, run.stdout + run.stderr

    texts = [{"prompt": "How do I bake bread?", "response": "Knead, proof, bake."}, {"response": "Hello there"}]
    with keel_server(tiny_reward_model, "--backend", "onnx", python=serving_python, cwd=tmp_path,
                     moderation=tiny_moderation_model) as (base, _):
        scored = httpx.post(f"{base}/v1/score", json={"input": texts}, timeout=30)
        moderated = httpx.post(f"{base}/v1/moderations", json={"input": "Hello there"}, timeout=30)
    assert scored.status_code == 200 and moderated.status_code == 200, scored.text + moderated.text
    runtime = RewardRuntime(tiny_reward_model, backend="onnx")
    expected = runtime.transform(runtime.score([("Human: How do I bake bread?", "Knead, proof, bake."), ("", "Hello there")]))
    served = np.array([[item["scores"][h] for h in runtime.heads] for item in scored.json()["data"]])
    np.testing.assert_allclose(served, expected, atol=1e-5)
    from keel.core.runtime import ModerationRuntime

    moderator = ModerationRuntime(tiny_moderation_model, backend="onnx")
    expected = moderator.scored([("", "Hello there")]).values[0]
    served = [moderated.json()["results"][0]["category_scores"][c] for c in moderator.categories]
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_without_torch_serve_needs_a_model_and_chat_needs_the_chat_extra(serving_python: str, tiny_reward_model: Path,
                                                                         tmp_path: Path):
    import os

    # an empty cache: where the README's main job has run, the default models sit in ~/.cache and serve would start
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = subprocess.run([serving_python, "-m", "keel", "serve"], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--model" in run.stderr and "keel-rlhf[train]" in run.stderr
    run = subprocess.run([serving_python, "-m", "keel", "serve", "--model", str(tiny_reward_model), "--policy", "x"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert run.returncode == 2 and "keel-rlhf[chat]" in run.stderr and "Traceback" not in run.stderr


def test_the_distribution_has_a_name_of_its_own():
    """`keel` on PyPI is another project: `pip install "keel[serve]"` installed it. The distribution is
    keel-rlhf everywhere a user copies an install line from."""
    import re

    root = Path(__file__).resolve().parent.parent
    assert re.search(r'^name = "keel-rlhf"', (root / "pyproject.toml").read_text(), re.MULTILINE)
    for path in [root / "README.md", root / "Dockerfile", *(root / "docs").glob("*.md")]:
        assert not re.search(r"\bkeel\[", path.read_text()), f"{path.name} installs `keel[...]`, not keel-rlhf"
    assert 'pip install "keel-rlhf[serve]"' in (root / "README.md").read_text()


def test_the_serving_install_serves_the_default_models_it_finds_in_the_cache(
        serving_python: str, tiny_reward_model: Path, tiny_moderation_model: Path, tmp_path: Path):
    import os
    import shutil
    import time

    from tests.helpers import free_port

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    where = subprocess.run([serving_python, "-c", "from keel.core.bundled import default_model_dir as d; "
                            "print(d('reward')); print(d('moderation'))"], capture_output=True, text=True, env=env,
                           cwd=tmp_path)
    reward_dir, moderation_dir = (Path(line) for line in where.stdout.split())
    absent = subprocess.run([serving_python, "-m", "keel", "serve"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=60)
    assert absent.returncode == 2 and str(reward_dir) in absent.stderr  # says where it looked and what to do
    shutil.copytree(tiny_reward_model, reward_dir)  # as a training install (or an earlier run) leaves them
    shutil.copytree(tiny_moderation_model, moderation_dir)
    port = free_port()
    process = subprocess.Popen([serving_python, "-m", "keel", "serve", "--port", str(port)], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline
            time.sleep(0.2)
        moderated = httpx.post(f"http://127.0.0.1:{port}/v1/moderations", json={"input": "hi"}, timeout=30).json()
        assert moderated["model"] == moderation_dir.name
    finally:
        process.kill()
        process.wait(10)
