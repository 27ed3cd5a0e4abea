"""Model versions: a store of model directories, /v1/models, reload by endpoint and by SIGHUP, failed reloads."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from keel.service.app import create_app
from keel.service.settings import Settings
from tests.helpers import keel_server


def make_store(tiny_reward_model: Path, root: Path) -> Path:
    store = root / "store"
    for version, created in (("v1", "2026-01-01T00:00:00Z"), ("v2", "2026-02-01T00:00:00Z")):
        shutil.copytree(tiny_reward_model, store / version)
        manifest = json.loads((store / version / "keel.json").read_text())
        (store / version / "keel.json").write_text(json.dumps({**manifest, "created_at": created}))
    (store / "CURRENT").write_text("v1\n")
    return store


def score_version(client: TestClient, headers: dict | None = None) -> str:
    response = client.post("/v1/score", json={"input": [{"text": "hello"}]}, headers=headers or {})
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def test_store_lists_versions_and_reloads_without_restart(tiny_reward_model: Path, tiny_moderation_model: Path,
                                                          tmp_path: Path):
    store = make_store(tiny_reward_model, tmp_path)
    moderation_store = make_store(tiny_moderation_model, tmp_path / "moderation")
    broken = store / "v3-broken"
    shutil.copytree(tiny_reward_model, broken)
    for graph in ("model.onnx", "model.int8.onnx"):  # whichever the `auto` backend picks on this CPU
        (broken / graph).write_bytes(b"truncated")
    auth = {"Authorization": "Bearer k"}
    admin_keys = tmp_path / "admin-keys"
    admin_keys.write_text("# operators\nadmin-secret\n")
    admin = {"Authorization": "Bearer admin-secret"}
    with TestClient(create_app(Settings(model=store, moderation_model=moderation_store, api_keys=["k"],
                                        admin_keys_file=admin_keys))) as client:
        listed = client.get("/v1/models", headers=auth).json()["data"]
        assert [(m["id"], m["active"]) for m in listed][:1] == [("v1", True)]
        assert {m["id"] for m in listed} >= {"v1", "v2"}
        # Each store is listed: the reward model's versions, then the moderation model's.
        assert [m.get("kind") for m in listed if m["active"]] == ["reward-model", "moderation-model"]
        assert score_version(client, auth) == "2026-01-01T00:00:00Z"

        assert client.post("/v1/admin/reload", json={"version": "v2"}).status_code == 401
        refused = client.post("/v1/admin/reload", json={"version": "v2"}, headers=auth)  # a client key
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
        assert score_version(client, admin) == "2026-01-01T00:00:00Z"  # an admin key is a client key too
        reloaded = client.post("/v1/admin/reload", json={"version": "v2"}, headers=admin)
        assert reloaded.status_code == 200 and reloaded.json()["model"] == "v2"
        assert score_version(client, auth) == "2026-02-01T00:00:00Z"
        moderation = client.post("/v1/moderations", json={"input": "hi"}, headers=auth).json()
        assert moderation["model"] == "v1" and moderation["model_version"] == "2026-01-01T00:00:00Z"
        reloaded = client.post("/v1/admin/reload", json={"version": "v2", "model": "moderation"}, headers=admin)
        assert reloaded.status_code == 200 and reloaded.json()["model"] == "v2"
        moderation = client.post("/v1/moderations", json={"input": "hi"}, headers=auth).json()
        assert moderation["model_version"] == "2026-02-01T00:00:00Z"
        assert score_version(client, auth) == "2026-02-01T00:00:00Z"  # the reward model is untouched

        for version, reason in (("v3-broken", "cannot load"), ("nope", "no version"), ("../v1", "bad version")):
            failed = client.post("/v1/admin/reload", json={"version": version}, headers=admin)
            assert failed.status_code == 409 and reason in failed.json()["error"]["message"]
            assert "still serving v2" in failed.json()["error"]["message"]
            assert score_version(client, auth) == "2026-02-01T00:00:00Z"  # the old model keeps serving
        metrics = client.get("/metrics").text
        assert 'keel_model_reloads_total{outcome="failed"} 3.0' in metrics
        assert 'keel_model_info{kind="reward",name="v2",version="2026-02-01T00:00:00Z"} 1.0' in metrics
        info = [line for line in metrics.splitlines() if line.startswith("keel_model_info{")]
        assert not [line for line in info if 'name="v1"' in line]  # both models moved to v2: v1 is gone


def test_admin_routes_need_an_admin_key(tiny_reward_model: Path, tmp_path: Path):
    store = make_store(tiny_reward_model, tmp_path)
    # Client keys and no admin keys: the admin routes are refused to every key, not open.
    with TestClient(create_app(Settings(model=store, api_keys=["k"]))) as client:
        refused = client.post("/v1/admin/reload", headers={"Authorization": "Bearer k"})
        assert refused.status_code == 403 and "none is configured" in refused.json()["error"]["message"]
    # Admin keys only: the other routes stay open, the admin routes need one of them.
    admin_keys = tmp_path / "admin-keys"
    admin_keys.write_text("a1\n")
    with TestClient(create_app(Settings(model=store, admin_keys_file=admin_keys))) as client:
        assert score_version(client)
        assert client.post("/v1/admin/reload").status_code == 401
        assert client.post("/v1/admin/reload", headers={"Authorization": "Bearer a1"}).status_code == 200


def test_reload_refuses_a_model_with_other_heads(tiny_reward_model: Path, tmp_path: Path):
    store = make_store(tiny_reward_model, tmp_path)
    manifest = json.loads((store / "v2" / "keel.json").read_text())
    (store / "v2" / "keel.json").write_text(json.dumps({**manifest, "heads": ["quality", "harmless"]}))
    with TestClient(create_app(Settings(model=store))) as client:
        failed = client.post("/v1/admin/reload", json={"version": "v2"})
        assert failed.status_code == 409 and "restart" in failed.json()["error"]["message"]


@pytest.mark.subprocess
def test_sighup_reloads_the_current_version(tiny_reward_model: Path, tmp_path: Path):
    store = make_store(tiny_reward_model, tmp_path)
    with keel_server(store) as (url, process):
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "v1"
        (store / "CURRENT").write_text("v2\n")
        process.send_signal(signal.SIGHUP)
        deadline = time.time() + 30
        while httpx.get(f"{url}/v1/models").json()["data"][0]["id"] != "v2":
            assert time.time() < deadline, "SIGHUP did not reload"
            time.sleep(0.2)
        assert httpx.post(f"{url}/v1/score", json={"input": [{"text": "x"}]}).json()["model_version"].startswith("2026-02")


def test_single_model_directory_still_works(tiny_reward_model: Path):
    with TestClient(create_app(Settings(model=tiny_reward_model))) as client:
        [model] = client.get("/v1/models").json()["data"]
        assert model["active"] is True
        assert client.post("/v1/admin/reload", json={"version": "other"}).status_code == 409
        assert client.post("/v1/admin/reload").status_code == 200


def break_version(store: Path, tiny_reward_model: Path, name: str, how: str, created: str) -> None:
    """A version that must not be served: a manifest that is not an object, or a zero std."""
    shutil.copytree(tiny_reward_model, store / name)
    manifest = json.loads((store / name / "keel.json").read_text())
    if how == "list":
        (store / name / "keel.json").write_text("[]")
    else:
        manifest["normalization"][manifest["heads"][0]]["std"] = 0.0
        (store / name / "keel.json").write_text(json.dumps({**manifest, "created_at": created}))


def test_invalid_versions_are_listed_with_the_reason_and_refused(tiny_reward_model: Path, tmp_path: Path):
    store = make_store(tiny_reward_model, tmp_path)
    break_version(store, tiny_reward_model, "v3-list", "list", "")
    break_version(store, tiny_reward_model, "v4-std0", "std", "2026-04-01T00:00:00Z")
    outside = tmp_path / "outside"
    shutil.copytree(store / "v2", outside)
    (store / "v5-link").symlink_to(outside, target_is_directory=True)
    with TestClient(create_app(Settings(model=store))) as client:
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert listed["v1"]["active"] and listed["v2"]["valid"]
        assert "not a Keel manifest" in listed["v3-list"]["problem"] and not listed["v3-list"]["valid"]
        assert "std" in listed["v4-std0"]["problem"] and "leads out of the model store" in listed["v5-link"]["problem"]
        for version, reason in (("v3-list", "not a Keel manifest"), ("v4-std0", "std"), ("v5-link", "leads out")):
            failed = client.post("/v1/admin/reload", json={"version": version})
            assert failed.status_code == 409 and reason in failed.json()["error"]["message"], failed.text
        assert client.post("/v1/score", json={"input": [{"text": "x"}]}).json()["data"][0]["score"] is not None
        (store / "CURRENT").unlink()
        newest_valid = client.post("/v1/admin/reload")  # not v4-std0, though it is newer
        assert newest_valid.status_code == 200 and newest_valid.json()["model"] == "v2"
        assert (store / "CURRENT").exists() is False  # a reload does not rewrite CURRENT unless asked to
    with TestClient(create_app(Settings(model=store, allow_store_symlinks=True, persist_reload=True))) as client:
        assert client.post("/v1/admin/reload", json={"version": "v5-link"}).status_code == 200
        assert (store / "CURRENT").read_text() == "v5-link\n"  # so a restart serves the same version


@pytest.mark.subprocess
def test_start_serves_the_newest_valid_version_unless_current_names_an_invalid_one(tiny_reward_model: Path,
                                                                                     tmp_path: Path):
    import subprocess
    import sys

    store = make_store(tiny_reward_model, tmp_path)
    (store / "CURRENT").unlink()
    break_version(store, tiny_reward_model, "v3-std0", "std", "2026-03-01T00:00:00Z")
    with keel_server(store) as (url, process):
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "v2"
        process.kill()
        assert "skipping invalid version v3-std0" in process.stdout.read()
    (store / "CURRENT").write_text("v3-std0\n")
    refused = subprocess.run([sys.executable, "-m", "keel", "serve", "--model", str(store)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "v3-std0" in refused.stderr and "CURRENT" in refused.stderr and "std" in refused.stderr


def test_scoring_reports_usage_truncation_and_model_info(tiny_reward_model: Path, tiny_moderation_model: Path):
    long_text = " ".join(["good"] * 200)  # far over the tiny model's 48 tokens
    with TestClient(create_app(Settings(model=tiny_reward_model, moderation_model=tiny_moderation_model))) as client:
        scored = client.post("/v1/score", json={"input": [{"text": "hello"}, {"text": long_text}]}).json()
        assert [item["truncated"] for item in scored["data"]] == [False, True]
        assert scored["usage"]["prompt_tokens"] == scored["usage"]["total_tokens"] > 48
        moderated = client.post("/v1/moderations", json={"input": [long_text]}).json()
        assert moderated["usage"]["prompt_tokens"] > 200  # every window of the long text is read
        metrics = client.get("/metrics").text
        assert "process_resident_memory_bytes" in metrics and "process_cpu_seconds_total" in metrics
        version = scored["model_version"]
        assert f'keel_model_info{{kind="reward",name="{tiny_reward_model.name}",version="{version}"}} 1.0' in metrics
        assert 'keel_model_info{kind="moderation"' in metrics
