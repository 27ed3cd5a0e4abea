"""Precision and dtype follow the hardware: bf16 only where it is fast."""

import logging

import pytest
import torch

from keel.core import hardware as core_hardware
from keel.service.generation import PolicyRuntime
from keel.training import accelerator as hardware
from keel.training.config import DEFAULT_REWARD_CONFIG, ConfigError, load_config
from keel.training.reward.config import RewardConfig

CPU = torch.device("cpu")


@pytest.mark.parametrize("fast, expected", [(True, "bf16"), (False, "no")])
def test_auto_precision_is_bf16_only_where_it_is_fast(monkeypatch, fast: bool, expected: str):
    monkeypatch.setattr(hardware, "bf16_is_fast", lambda device: fast)
    monkeypatch.setattr(core_hardware, "bf16_is_fast", lambda device: fast)
    assert hardware.resolve_precision("auto", CPU) == expected
    assert core_hardware.fast_dtype(CPU) == (torch.bfloat16 if fast else torch.float32)


def test_an_explicit_precision_is_kept_and_slow_bf16_is_named(monkeypatch, caplog):
    monkeypatch.setattr(hardware, "bf16_is_fast", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="keel.training.accelerator"):
        assert hardware.resolve_precision("no", CPU) == "no"
        assert not caplog.records
        assert hardware.resolve_precision("bf16", CPU) == "bf16"
    assert "slower than fp32" in caplog.text and "auto or no" in caplog.text


def test_this_cpu_gets_an_answer_that_matches_its_capability():
    # AVX-512 (or better) CPUs have oneDNN's native bf16 path; AVX2 and older ones do not.
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "DEFAULT", "NO AVX"):
        assert not core_hardware.bf16_is_fast(CPU)
    elif capability.startswith("AVX512"):
        assert core_hardware.bf16_is_fast(CPU)


def test_precision_defaults_to_auto_and_is_checked():
    assert load_config(RewardConfig, DEFAULT_REWARD_CONFIG).training.precision == "auto"
    with pytest.raises(ConfigError, match="auto, bf16, fp16 or no"):
        load_config(RewardConfig, DEFAULT_REWARD_CONFIG, ["training.precision=fp8"])


@pytest.mark.parametrize("fast, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_served_policy_weights_follow_the_hardware(monkeypatch, tiny_policy: str, fast: bool, dtype: torch.dtype):
    monkeypatch.setattr(core_hardware, "bf16_is_fast", lambda device: fast)
    assert PolicyRuntime(tiny_policy).model.dtype == dtype
    assert PolicyRuntime(tiny_policy, dtype="float32").model.dtype == torch.float32


def test_auto_trains_a_reward_model_in_bf16_where_bf16_is_fast(monkeypatch, tiny_backbone: str, tmp_path,
                                                             other_precision):
    from keel.training.reward.train import train_reward
    from tests.helpers import hh_pairs, tiny_config, write_jsonl

    monkeypatch.setattr(hardware, "bf16_is_fast", lambda device: True)
    config = tiny_config(tiny_backbone, write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(40)), onnx=False,
                         precision="auto", checkpoint_every=0)
    manifest = train_reward(config, tmp_path / "model", progress=False)
    assert manifest["metrics"]["precision"] == "bf16"
    assert manifest["metrics"]["validation"]["harmless"]["accuracy"] >= 0.9  # it learns under bf16 autocast
