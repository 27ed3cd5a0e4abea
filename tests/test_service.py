"""API tests on the tiny model: every endpoint and every error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from keel.core.runtime import RewardRuntime, choose_backend, service_batch_limits
from keel.service.app import create_app
from keel.service.settings import Settings


@pytest.fixture
def make_client(tiny_reward_model: Path, tiny_moderation_model: Path):
    clients = []

    def make(**overrides) -> TestClient:
        settings = {"model": tiny_reward_model, "moderation_model": tiny_moderation_model, **overrides}
        client = TestClient(create_app(Settings(**settings)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def test_score_every_item_shape(client: TestClient):
    body = {"input": [
        {"prompt": "how do i bake bread?", "response": "sure, here is a recipe"},
        {"messages": [{"role": "user", "content": "how do i bake bread?"},
                      {"role": "assistant", "content": "sure, here is a recipe"}]},
        {"text": "sure, here is a recipe"},
        {"response": "no prompt at all"},
    ]}
    response = client.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == "model" and data["model_version"]
    assert [d["index"] for d in data["data"]] == [0, 1, 2, 3]
    first = data["data"][0]
    assert set(first["scores"]) == {"harmless", "quality"} and first["score"] == first["scores"]["harmless"]
    # Two spellings of one conversation are the same input to the model; without the prompt it differs.
    assert data["data"][0]["scores"] == pytest.approx(data["data"][1]["scores"], abs=1e-5)
    assert data["data"][0]["scores"] != pytest.approx(data["data"][2]["scores"], abs=1e-5)
    assert response.headers["x-request-id"]


def test_scores_are_normalised_with_manifest_statistics(client: TestClient):
    runtime = client.app.state.keel.runtime  # the served engine's raw scores: the check is exact on any CPU
    text = "sorry, i cannot help with that."
    raw = runtime.score([("", text)])[0]
    stats = runtime.manifest.normalization
    expected = {h: (raw[i] - stats[h].mean) / stats[h].std for i, h in enumerate(runtime.heads)}
    got = client.post("/v1/score", json={"input": [{"text": text}]}).json()["data"][0]["scores"]
    assert got == pytest.approx(expected, abs=1e-5)


def test_moderation_input_forms_of_openais_api(client: TestClient):
    def moderate(value: object):
        return client.post("/v1/moderations", json={"input": value})

    joined = moderate("How do I\nbake bread?").json()["results"]
    parts = moderate([{"type": "text", "text": "How do I"}, {"type": "text", "text": "bake bread?"}])
    assert parts.status_code == 200 and parts.json()["results"] == joined  # text parts are one input
    for edge in ("", "x", ["", "x"]):  # empty and one-character texts are ordinary input
        assert moderate(edge).status_code == 200
    image = moderate([{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}])
    assert image.status_code == 400 and "image inputs are not supported" in image.json()["error"]["message"]
    surrogate = client.post("/v1/moderations", content='{"input": [{"type": "text", "text": "\\ud800"}]}',
                            headers={"Content-Type": "application/json"})
    for response in (surrogate, *(moderate(bad) for bad in (["text", {"type": "text", "text": "p"}], [1, 2], []))):
        assert response.status_code == 400 and response.json()["error"]["param"].startswith("input"), response.text


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/score", {"input": []}, 400, "input"),
    ("/v1/score", {"input": "text"}, 400, "input"),
    ("/v1/score", {"input": [{"text": 5}]}, 400, "input.0.text"),
    ("/v1/score", {"input": [{"prompt": "p"}]}, 400, "input.0"),
    ("/v1/score", {"input": [{"text": "a", "response": "b"}]}, 400, "input.0"),
    ("/v1/score", {"input": [{"messages": [{"role": "robot", "content": "x"}]}]}, 400, "input.0.messages.0.role"),
    ("/v1/score", {"input": [{"messages": []}]}, 400, "input.0.messages"),
    ("/v1/score", {"inputs": [{"text": "a"}]}, 400, "input"),
    ("/v1/moderations", {"input": []}, 400, "input"),
    ("/v1/moderations", {"input": [1, 2]}, 400, "input"),  # one message for any list of the wrong kind
    ("/v1/moderations", {"input": "a", "thresholds": {"harmless": 0.5}}, 400, "thresholds"),
    ("/v1/moderations", {"input": "a", "thresholds": {"hate": 2}}, 400, "thresholds.hate"),
])
def test_bad_requests_get_openai_style_4xx(client: TestClient, path, body, status, param):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"] or "").startswith(param)


def test_limits(make_client):
    client = make_client(max_items=3, max_chars=50, max_body_bytes=2000)
    too_many = client.post("/v1/score", json={"input": [{"text": "a"}] * 4})
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_items"
    too_long = client.post("/v1/moderations", json={"input": ["ok", "x" * 51]})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "input.1"
    too_big = client.post("/v1/score", json={"input": [{"text": "x" * 3000}]})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"

    def chunks():
        yield b'{"input": [{"text": "'
        yield b"x" * 3000
        yield b'"}]}'

    chunked = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413


def test_malformed_bodies(client: TestClient):
    for content in (b"{not json", b'{"input": [{"text": "caf\xe9"}]}', b""):
        response = client.post("/v1/score", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, content
        assert "error" in response.json()
    assert client.get("/nowhere").status_code == 404
    assert client.get("/nowhere").json()["error"]["code"] == "http_404"
    assert client.get("/v1/score").status_code == 405


def test_api_keys(make_client):
    client = make_client(api_keys="k1,k2")
    body = {"input": [{"text": "hi"}]}
    assert client.post("/v1/score", json=body).status_code == 401
    assert client.post("/v1/score", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/models").status_code == 401
    assert client.post("/v1/moderations", json={"input": "x"}).json()["error"]["type"] == "authentication_error"
    assert client.post("/v1/score", json=body, headers={"Authorization": "Bearer k2"}).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200


def test_api_keys_from_environment(monkeypatch):
    monkeypatch.setenv("KEEL_API_KEYS", " a , b ")
    monkeypatch.setenv("KEEL_MAX_ITEMS", "7")
    settings = Settings()
    assert settings.api_keys == ["a", "b"] and settings.max_items == 7


def test_models_health_ready_metrics(client: TestClient, tiny_reward_model: Path):
    models = client.get("/v1/models").json()
    assert models["data"][0]["heads"] == ["harmless", "quality"]
    assert models["data"][0]["backend"] == choose_backend(tiny_reward_model)  # what `auto` runs, not "auto"
    assert models["data"][1]["kind"] == "moderation-model"
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    client.post("/v1/moderations", json={"input": "x", "thresholds": {"hate": 0.0}})
    client.post("/v1/score", json={"input": [{"text": "x"}]})
    text = client.get("/metrics").text
    for name in ('keel_requests_total{endpoint="/v1/moderations",status="200"}', "keel_batch_size_bucket",
                 "keel_batch_tokens_bucket", "keel_inference_seconds_bucket", 'keel_score_bucket{head="harmless"',
                 'keel_flagged_total{category="hate"}', "keel_queue_texts", "keel_moderation_queue_texts",
                 "keel_ready 1.0"):
        assert name in text, name


def test_every_route_is_its_own_metric_label_and_unknown_paths_are_other(client: TestClient):
    from keel.service import routes

    paths = [route.path for router in (routes.health, routes.api) for route in router.routes]
    for path in paths:
        client.get(path)  # whatever the status (405 for POST routes): the label is what is checked
    client.get("/no/such/path/123")
    text = client.get("/metrics").text
    for path in paths:
        assert f'keel_requests_total{{endpoint="{path}"' in text, path
    assert 'endpoint="other"' in text and "/no/such/path" not in text


def test_request_id_is_echoed_when_safe(client: TestClient):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert client.get("/healthz", headers={"X-Request-ID": "bad id\n"}).headers["x-request-id"] != "bad id\n"


def test_request_text_is_not_logged(make_client, caplog):
    client = make_client()
    with caplog.at_level("DEBUG"):
        client.post("/v1/score", json={"input": [{"text": "secret-user-text-42"}]})
    assert "secret-user-text-42" not in caplog.text
    logging_client = make_client(log_bodies=True)
    with caplog.at_level("INFO"):
        logging_client.post("/v1/score", json={"input": [{"text": "secret-user-text-43"}]})
    assert "secret-user-text-43" in caplog.text


def test_broken_model_directory_fails_clearly(tmp_path: Path, tiny_reward_model: Path):
    import shutil

    from keel.core.artifact import ArtifactError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_reward_model, broken)
    (broken / "model.int8.onnx").write_bytes(b"truncated")
    with pytest.raises(ArtifactError, match="cannot load onnx-int8 model"):
        RewardRuntime(broken, backend="onnx-int8")
    (broken / "keel.json").write_text("{")
    with pytest.raises(ArtifactError, match="corrupt"):
        RewardRuntime(broken)
    with pytest.raises(ArtifactError, match="keel.json is missing"):
        RewardRuntime(tmp_path)


def test_onnx_that_does_not_match_its_manifest(tmp_path: Path, tiny_reward_model: Path):
    import shutil

    from keel.core.artifact import ArtifactError

    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_reward_model, mismatched)
    manifest = json.loads((mismatched / "keel.json").read_text())
    manifest["heads"].append("extra")
    manifest["normalization"]["extra"] = {"mean": 0.0, "std": 1.0}
    manifest["moderation"]["extra"] = {"threshold": 0.5}
    (mismatched / "keel.json").write_text(json.dumps(manifest))
    runtime = RewardRuntime(mismatched)
    with pytest.raises(ArtifactError, match="does not match keel.json"):
        runtime.warm_up()


def test_auto_backend_runs_int8_only_where_it_is_faster(tmp_path: Path, tiny_reward_model: Path, monkeypatch):
    import shutil

    monkeypatch.setattr("keel.core.runtime.has_cuda", lambda: False)
    monkeypatch.setattr("keel.core.runtime.int8_is_fast", lambda: True)
    assert RewardRuntime(tiny_reward_model).backend == "onnx-int8"
    monkeypatch.setattr("keel.core.runtime.int8_is_fast", lambda: False)
    assert RewardRuntime(tiny_reward_model).backend == "onnx"
    monkeypatch.setattr("keel.core.runtime.int8_is_fast", lambda: True)
    model = tmp_path / "fp32-only"
    shutil.copytree(tiny_reward_model, model)
    (model / "model.int8.onnx").unlink()
    assert RewardRuntime(model).backend == "onnx"
    (model / "model.onnx").unlink()
    assert RewardRuntime(model).backend == "torch"
    monkeypatch.setattr("keel.core.runtime.has_cuda", lambda: True)  # a GPU machine
    assert choose_backend(tiny_reward_model) == "torch"


def test_service_batch_limits_follow_the_engine_unless_set(make_client, monkeypatch):
    monkeypatch.setattr("keel.core.runtime.has_cuda", lambda: False)
    limits = make_client().app.state.keel.runtime.limits
    assert (limits.max_batch_size, limits.max_batch_tokens) == (1, 512)  # CPU: one text at a time
    limits = make_client(max_batch_size=8, max_batch_tokens=2048).app.state.keel.runtime.limits
    assert (limits.max_batch_size, limits.max_batch_tokens) == (8, 2048)
    monkeypatch.setattr("keel.core.runtime.has_cuda", lambda: True)  # a GPU machine
    assert service_batch_limits("torch").max_batch_size == 64 and service_batch_limits("onnx").max_batch_size == 1


def test_torch_backend_agrees_with_onnx(tiny_reward_model: Path):
    texts = [("Human: hi", "hello there"), ("", "sure, here is how to hack code")]
    onnx = RewardRuntime(tiny_reward_model, backend="onnx").score(texts)
    torch_scores = RewardRuntime(tiny_reward_model, backend="torch").score(texts)
    assert abs(onnx - torch_scores).max() < 1e-4
