"""Model versions: a store of model directories, /v1/models, reload by endpoint and by SIGHUP, failed reloads."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.test_batcher_and_server import keel_server


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


def test_store_lists_versions_and_reloads_without_restart(tiny_reward_model: Path, tmp_path: Path):
    store = make_store(tiny_reward_model, tmp_path)
    broken = store / "v3-broken"
    shutil.copytree(tiny_reward_model, broken)
    for graph in ("model.onnx", "model.int8.onnx"):  # whichever the `auto` backend picks on this CPU
        (broken / graph).write_bytes(b"truncated")
    auth = {"Authorization": "Bearer k"}
    with TestClient(create_app(Settings(model=store, api_keys=["k"]))) as client:
        listed = client.get("/v1/models", headers=auth).json()["data"]
        assert [(m["id"], m["active"]) for m in listed][:1] == [("v1", True)]
        assert {m["id"] for m in listed} >= {"v1", "v2"}
        assert score_version(client, auth) == "2026-01-01T00:00:00Z"

        assert client.post("/v1/admin/reload", json={"version": "v2"}).status_code == 401
        reloaded = client.post("/v1/admin/reload", json={"version": "v2"}, headers=auth)
        assert reloaded.status_code == 200 and reloaded.json()["model"] == "v2"
        assert score_version(client, auth) == "2026-02-01T00:00:00Z"
        moderation = client.post("/v1/moderations", json={"input": "hi"}, headers=auth).json()
        assert moderation["model"] == "v2"

        for version, reason in (("v3-broken", "cannot load"), ("nope", "no version"), ("../v1", "bad version")):
            failed = client.post("/v1/admin/reload", json={"version": version}, headers=auth)
            assert failed.status_code == 409 and reason in failed.json()["error"]["message"]
            assert "still serving v2" in failed.json()["error"]["message"]
            assert score_version(client, auth) == "2026-02-01T00:00:00Z"  # the old model keeps serving
        metrics = client.get("/metrics").text
        assert 'keel_model_reloads_total{outcome="failed"} 3.0' in metrics


def test_reload_refuses_a_model_with_other_heads(tiny_reward_model: Path, tmp_path: Path):
    store = make_store(tiny_reward_model, tmp_path)
    manifest = json.loads((store / "v2" / "keel.json").read_text())
    (store / "v2" / "keel.json").write_text(json.dumps({**manifest, "heads": ["quality", "harmless"]}))
    with TestClient(create_app(Settings(model=store))) as client:
        failed = client.post("/v1/admin/reload", json={"version": "v2"})
        assert failed.status_code == 409 and "restart" in failed.json()["error"]["message"]


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
