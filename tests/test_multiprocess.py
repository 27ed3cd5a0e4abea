
"""Reward and policy training under `accelerate launch` with two CPU processes (DDP over gloo)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import hh_pairs, write_jsonl

pytestmark = pytest.mark.multiprocess


def launch_two_processes(what: str, config: Path, output: Path) -> None:
    """`keel train WHAT` under `accelerate launch` with two CPU processes."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    result = subprocess.run(
        # `--cpu` would start a single process; the torchrun launcher (--multi_gpu) on a machine without CUDA
        # starts two CPU processes that train together over gloo.
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "keel", "train", what, "--config", str(config),
         "--output", str(output), "--no-progress"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # The launcher's summary fills the end of stderr; the failing rank's own error lines come first (a rank killed
    # by SIGABRT says why only in a C++ `terminate called ... what():` pair).
    markers = ("Error", "error:", "Exception", "terminate called", "what():")
    errors = [line for line in result.stderr.splitlines() if any(marker in line for marker in markers)]
    assert result.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + result.stderr[-2000:]


def test_accelerate_launch_two_processes(tiny_backbone: str, tmp_path: Path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(32))
    config = {
        "base_model": tiny_backbone, "max_length": 48,
        "heads": [{"name": "harmless", "train": [str(pairs)], "validation": [{"path": str(pairs), "limit": 8}]}],
        "training": {"epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "eval_every": 0, "checkpoint_every": 2,
                     "log_every": 1, "precision": "no"},
        "export": {"int8": False},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    launch_two_processes("reward", tmp_path / "tiny.yaml", tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / "keel.json").read_text())
    # 32 pairs in batches of 4 is 8 batches, shared by two processes: 4 optimiser steps.
    assert manifest["metrics"]["steps"] == 4
    assert (tmp_path / "model" / "model.onnx").is_file()
    assert not (tmp_path / "model.work").exists()


def test_policy_training_under_accelerate_launch(tiny_policy: str, tiny_reward_model: Path, tmp_path: Path):
    from tests.helpers import prompt_rows

    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(16))
    config = {
        "policy": {"model": tiny_policy, "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
                   "max_prompt_length": 32, "max_new_tokens": 6},
        "reward": {"model": str(tiny_reward_model), "backend": "onnx", "heads": {"harmless": 1.0}},
        "prompts": {"train": [str(prompts)], "evaluation": [{"path": str(prompts), "limit": 2}], "samples": 1},
        "training": {"steps": 2, "prompts_per_step": 2, "samples_per_prompt": 2, "eval_every": 0,
                     "checkpoint_every": 1, "precision": "no"},
    }
    (tmp_path / "rloo.yaml").write_text(yaml.safe_dump(config))
    launch_two_processes("rloo", tmp_path / "rloo.yaml", tmp_path / "policy")
    manifest = json.loads((tmp_path / "policy" / "keel.json").read_text())
    assert manifest["algorithm"] == "rloo" and manifest["steps"] == 2
    assert (tmp_path / "policy" / "model.safetensors").is_file()
