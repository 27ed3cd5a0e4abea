"""Reward training under `accelerate launch` with two CPU processes (DDP over gloo)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import hh_pairs, write_jsonl


def test_accelerate_launch_two_processes(tiny_backbone: str, tmp_path: Path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(32))
    config = {
        "base_model": tiny_backbone, "max_length": 48,
        "heads": [{"name": "harmless", "train": [str(pairs)], "validation": [{"path": str(pairs), "limit": 8}]}],
        "training": {"epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "eval_every": 0, "checkpoint_every": 2,
                     "log_every": 1},
        "export": {"int8": False},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    result = subprocess.run(
        # `--cpu` would start a single process; the torchrun launcher (--multi_gpu) on a machine without CUDA
        # starts two CPU processes that train together over gloo.
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "training.cli", "train", "reward", "--config", str(tmp_path / "tiny.yaml"),
         "--output", str(tmp_path / "model"), "--no-progress"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "model" / "keel.json").read_text())
    # 32 pairs in batches of 4 is 8 batches, shared by two processes: 4 optimiser steps.
    assert manifest["metrics"]["steps"] == 4
    assert (tmp_path / "model" / "model.onnx").is_file()
    assert not (tmp_path / "model.work").exists()
