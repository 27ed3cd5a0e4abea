"""keel.core's pieces that must agree with training's: tokenisation without transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.core.tokenizer import PairTokenizer
from keel.training.encoder.optim import load_tokenizer
from keel.training.encoder.scoring import encode

PAIRS = [("", "hi"), ("Human: " + "word " * 400, "reply " * 50), ("Human: x", "y " * 300),
         ("ünïcödé 中文 😀", "Tab\there  \n new"), ("", ""), ("Human: a\n\nAssistant: b\n\nHuman: c", "d")]


def test_the_serving_tokenizer_gives_trainings_ids(tiny_reward_model: Path):
    for side in ("left", "right"):
        served = PairTokenizer.from_directory(tiny_reward_model, 64, side)
        trained = load_tokenizer(str(tiny_reward_model), 64, side)
        assert served.encode(PAIRS) == [{"input_ids": e["input_ids"], "token_type_ids": e["token_type_ids"]}
                                        for e in encode(trained, PAIRS, 64)]
        assert served.pad_token_id == trained.pad_token_id


def test_typed_manifests_write_back_exactly_what_they_read(tiny_reward_model: Path, tmp_path: Path):
    import json

    from keel.core.artifact import ArtifactError, PolicyManifest, RewardManifest, read_manifest

    manifest = RewardManifest.read(tiny_reward_model)
    assert manifest.heads == ["harmless", "quality"] and manifest.moderation["quality"].threshold is None
    assert manifest.guard_threshold("harmless") == manifest.moderation["harmless"].guard.threshold
    manifest.write(tmp_path)
    assert read_manifest(tmp_path) == read_manifest(tiny_reward_model)
    assert PolicyManifest.find(tmp_path / "not-a-keel-policy") is None
    (tmp_path / "keel.json").write_text(json.dumps({"format_version": 2, "kind": "policy", "algorithm": "rloo"}))
    with pytest.raises(ArtifactError, match="is incomplete"):
        PolicyManifest.read(tmp_path)


@pytest.mark.subprocess
@pytest.mark.skipif(Path("/proc/driver/nvidia").exists() or not Path("/proc").is_dir(),
                    reason="with an NVIDIA driver the auto backend rightly asks torch for CUDA")
def test_onnx_scoring_does_not_import_torch_even_where_it_is_installed(tiny_reward_model: Path):
    import subprocess
    import sys

    code = ("import sys; from keel.core.runtime import RewardRuntime; "
            f"runtime = RewardRuntime({str(tiny_reward_model)!r}); runtime.warm_up(); "
            "print(runtime.backend, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split(maxsplit=1)[1].strip() == "[]", run.stdout  # ~180 MB of torch not loaded to serve ONNX


def test_usable_cpus_follow_the_cgroup_quota(tmp_path: Path):
    import os

    from keel.core.hardware import usable_cpus

    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == affinity  # no limit
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(tmp_path) == 1  # half a CPU: one thread
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")  # cgroup v1, 1.5 CPUs: two
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == min(2, affinity)
