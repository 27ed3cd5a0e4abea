"""Faults: a disk that fills while a model is written, and API keys that must never reach the logs."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.helpers import hh_pairs, tiny_config, tiny_policy_config, write_jsonl


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def leftovers(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}."))


def test_disk_full_while_writing_a_reward_model(tiny_backbone: str, tmp_path: Path, monkeypatch):
    from keel.core import reward_model
    from keel.training.reward.train import train_reward

    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(24))
    config = tiny_config(tiny_backbone, pairs, epochs=1, checkpoint_every=1)
    monkeypatch.setattr(reward_model, "copyfile", disk_full)  # the model's class file, after the weights
    with pytest.raises(OSError, match="No space left"):
        train_reward(config, tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists() and leftovers(tmp_path, "model") == []  # nothing half-written
    monkeypatch.undo()
    manifest = train_reward(config, tmp_path / "model", resume=True, progress=False)  # space freed: resume
    assert manifest["metrics"]["steps"] == 3 and (tmp_path / "model" / "keel.json").exists()


def test_disk_full_while_writing_a_policy(tiny_policy: str, tiny_reward_model: Path, tmp_path: Path, monkeypatch):
    from keel.training.policy import run as policy_run
    from keel.training.policy.reinforce import train_reinforce

    config = tiny_policy_config(tiny_policy, tiny_reward_model, tmp_path)
    monkeypatch.setattr(policy_run, "samples_markdown", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train_reinforce(config, tmp_path / "policy", progress=False)
    assert not (tmp_path / "policy").exists() and leftovers(tmp_path, "policy") == []
    assert (tmp_path / "policy.work" / "checkpoints").is_dir()  # the run can resume


def test_api_keys_never_reach_the_logs(tiny_reward_model: Path, caplog):
    from fastapi.testclient import TestClient

    from keel.service.app import create_app
    from keel.service.settings import Settings

    key = "sk-very-secret-key-123"
    with caplog.at_level("DEBUG"), TestClient(create_app(Settings(model=tiny_reward_model, api_keys=[key]))) as client:
        for path in ("/v1/score", "/v1/moderations", "/v1/admin/reload"):
            assert client.post(path, json={}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong-key-456"}).status_code == 401
        ok = client.post("/v1/score", json={"input": [{"text": "hi"}]}, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
                           ).status_code == 401
        assert client.get("/openapi.json").status_code == 200  # the schema is public; the data is not
    assert key not in caplog.text and "wrong-key-456" not in caplog.text


def test_staged_publishes_whole_or_not_at_all(tmp_path: Path):
    from keel.core.artifact import ArtifactError, staged

    output = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt), staged(output, overwrite=False) as staging:
        (staging / "weights").write_text("half")
        raise KeyboardInterrupt  # interrupted mid-write: nothing appears
    assert not output.exists() and leftovers(tmp_path, "model") == []
    with staged(output, overwrite=False) as staging:
        (staging / "weights").write_text("v1")
    assert (output / "weights").read_text() == "v1"
    with pytest.raises(ArtifactError, match="--overwrite"), staged(output, overwrite=False) as staging:
        (staging / "weights").write_text("v2")
    assert (output / "weights").read_text() == "v1" and leftovers(tmp_path, "model") == []
    with staged(output, overwrite=True) as staging:
        (staging / "weights").write_text("v2")
    assert (output / "weights").read_text() == "v2" and leftovers(tmp_path, "model") == []
