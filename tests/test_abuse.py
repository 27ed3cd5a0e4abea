"""Hostile and unlucky clients against a real server on loopback (tiny models): one client's input never fails
another's, fair sharing, cancelled work stops, clean shutdown, slow and oversized headers, secrets.
(Model-store layouts: tests/test_model_store.py; manifests: tests/test_deployment.py.)"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from keel.service.app import create_app
from keel.service.batcher import Batcher, Client
from keel.service.server import DrainingServer, uvicorn_config
from keel.service.settings import Settings
from tests.helpers import free_port, keel_server

CLEAN = {"input": [{"text": "how can i bake bread"}]}
POISONED = '{"input": [{"text": "\\ud800"}]}'  # a lone surrogate, as JSON allows


@contextmanager
def in_process_server(settings: Settings) -> Iterator[tuple[str, DrainingServer]]:
    """The app on uvicorn as `keel serve` runs it, in a thread of this process, so a test can reach its state."""
    settings.port = free_port()
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), settings.drain_seconds)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{settings.port}", server
    finally:
        server.should_exit = True
        thread.join(30)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(f"{name}{{{selector}}}" if labels else name) + r" ([0-9.e+-]+)"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def raw_exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one HTTP/1.1 request on an open socket and read one response (Content-Length bodies)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, "connection closed before a response"
        data += piece
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def post(path: str, body: bytes, port: int, headers: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{headers}\r\n").encode() + body


# ---- 1. one client's text never fails another's -----------------------------------------------------------------

@pytest.mark.subprocess
def test_text_that_cannot_be_encoded_is_a_400_and_clean_requests_beside_it_succeed(tiny_reward_model: Path,
                                                                                   tiny_policy: str):
    with keel_server(tiny_reward_model, "--policy", tiny_policy, "--guard", "off") as (url, process):
        chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
        poisoned_chat = json.dumps({**chat, "messages": [{"role": "user", "content": "x"}]}).replace('"x"', '"\\udcff"')

        def send(kind: str) -> tuple[str, int, dict]:
            with httpx.Client(timeout=60) as http:
                if kind == "score":
                    response = http.post(f"{url}/v1/score", json=CLEAN)
                elif kind == "poison":
                    response = http.post(f"{url}/v1/score", content=POISONED,
                                         headers={"content-type": "application/json"})
                elif kind == "bytes":  # invalid UTF-8 in the body itself
                    body = '{"input": [{"text": "\udcff"}]}'.encode("utf-8", "surrogatepass")
                    response = http.post(f"{url}/v1/score", content=body, headers={"content-type": "application/json"})
                elif kind == "chat":
                    response = http.post(f"{url}/v1/chat/completions", json=chat)
                else:
                    response = http.post(f"{url}/v1/chat/completions", content=poisoned_chat,
                                         headers={"content-type": "application/json"})
                return kind, response.status_code, response.json()

        kinds = ["poison"] * 10 + ["bytes"] * 3 + ["score"] * 40 + ["chat_poison"] * 3 + ["chat"] * 9
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(send, kinds))
        for kind, status, body in results:
            if kind in ("score", "chat"):
                assert status == 200, (kind, body)
            else:
                assert status == 400, (kind, body)
                assert "surrogate" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
        params = {body["error"]["param"] for kind, _, body in results if kind in ("poison", "bytes")}
        assert params == {"input.0.text"}
    log = process.stdout.read()
    assert len(log.splitlines()) < 30, log  # not a traceback per poisoned request


def test_a_failing_batch_is_retried_so_only_the_request_that_caused_it_fails(tiny_reward_model: Path, caplog):
    settings = Settings(model=tiny_reward_model, max_batch_size=8, max_wait_ms=50)
    with caplog.at_level(logging.ERROR), in_process_server(settings) as (url, server):
        state = server.config.app.state.keel
        real = type(state.runtime).scored

        def scored(texts, worker=0):  # an engine fault that only some inputs trigger
            if any("engine-breaker" in response for _, response in texts):
                raise RuntimeError("engine fault")
            return real(state.runtime, texts, worker)

        state.runtime.scored = scored

        def send(text: str) -> tuple[str, int, dict]:
            response = httpx.post(f"{url}/v1/score", json={"input": [{"text": text}]}, timeout=30)
            return text, response.status_code, response.json()

        texts = ["engine-breaker"] * 6 + [f"clean text {i}" for i in range(30)]
        with ThreadPoolExecutor(36) as pool:
            results = list(pool.map(send, texts))
        for text, status, body in results:
            if text == "engine-breaker":
                assert status == 500 and body["error"]["type"] == "server_error"
                assert "request id" in body["error"]["message"]
            else:
                assert status == 200, body
        assert metric(httpx.get(f"{url}/metrics").text, "keel_batch_size_count") > 0
    failures = [r for r in caplog.records if "failed for one request" in r.getMessage()]
    assert 1 <= len(failures) <= 2, [r.getMessage() for r in failures]  # the burst: once, then once with a count
    assert any("more times" in r.getMessage() for r in failures) or len(failures) == 1


def test_the_batcher_fails_only_the_poisoned_request():
    async def main() -> list[object]:
        def score(texts, worker=0):
            if "poison" in texts:
                raise ValueError("cannot encode")
            return np.array([[float(len(t))] for t in texts], dtype=np.float32)

        batcher = Batcher(score, max_batch_texts=64, max_wait_s=0.05, max_queue_texts=100)
        batcher.start()
        requests = [batcher.submit(["ok", "fine"], 5, Client("a")), batcher.submit(["poison"], 5, Client("b")),
                    batcher.submit(["good"], 5, Client("c"))]
        results = await asyncio.gather(*requests, return_exceptions=True)
        await batcher.close()
        return results

    clean_a, poisoned, clean_c = asyncio.run(main())
    assert clean_a.tolist() == [[2.0], [4.0]] and clean_c.tolist() == [[4.0]]
    assert isinstance(poisoned, ValueError)


def test_a_request_larger_than_the_clients_share_is_refused_not_crashed():
    from keel.service.batcher import QueueFull

    async def main() -> None:
        batcher = Batcher(lambda texts, worker=0: np.zeros((len(texts), 1)), max_batch_texts=4, max_wait_s=0,
                          max_queue_texts=100, max_client_texts=2)
        batcher.start()
        with pytest.raises(QueueFull, match="has 0 texts waiting and may have 2"):
            await batcher.submit(["a", "b", "c"], 5, Client("empty-handed"))
        await batcher.close()

    asyncio.run(main())


# ---- 2. error responses reach the client, and the connection stays usable -------------------------------------

def test_a_500_keeps_the_keep_alive_connection_usable(tiny_reward_model: Path):
    with in_process_server(Settings(model=tiny_reward_model)) as (url, server):
        state = server.config.app.state.keel
        real = type(state.runtime).scored
        calls = iter([True, False])
        state.runtime.scored = lambda texts, worker=0: (_ for _ in ()).throw(RuntimeError("boom")) if next(
            calls, False) else real(state.runtime, texts, worker)
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps(CLEAN).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            status, headers, first = raw_exchange(sock, post("/v1/score", body, port, "X-Request-Id: req-42\r\n"))
            assert status == 500 and headers.get("connection") != "close"
            error = json.loads(first)["error"]
            assert error["type"] == "server_error" and "req-42" in error["message"]
            assert headers["x-request-id"] == "req-42"
            status, _, second = raw_exchange(sock, post("/v1/score", body, port))  # same connection
            assert status == 200 and json.loads(second)["data"][0]["index"] == 0


@pytest.mark.subprocess
def test_an_oversized_body_gets_a_413_the_client_can_read(tiny_reward_model: Path):
    with keel_server(tiny_reward_model) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        big = b'{"input": [{"text": "' + b"x" * (2 * 1024 * 1024 + 10) + b'"}]}'
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            status, _, body = raw_exchange(sock, post("/v1/score", big, port))
            assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
            status, _, _ = raw_exchange(sock, post("/v1/score", json.dumps(CLEAN).encode(), port))
            assert status == 200  # the body was read, so the connection is still good
        response = httpx.post(f"{url}/v1/score", content=big, headers={"content-type": "application/json"})
        assert response.status_code == 413  # what httpx and the openai client see: the answer, not a reset


# ---- 3. one client cannot crowd out the rest ------------------------------------------------------------------

@pytest.mark.subprocess
def test_a_flooding_client_does_not_crowd_out_another(tiny_reward_model: Path, tmp_path: Path):
    keys = tmp_path / "keys"
    keys.write_text("flood-key\nsmall-key\n")
    with keel_server(tiny_reward_model, "--api-keys-file", str(keys)) as (url, _):
        flood = {"Authorization": "Bearer flood-key"}
        small = {"Authorization": "Bearer small-key"}
        heavy_body = {"input": [{"text": f"a long enough text to score, number {i}"} for i in range(256)]}
        stop = time.time() + 4
        flood_statuses: list[int] = []
        heavy_seconds: list[float] = []

        def flooder() -> None:
            with httpx.Client(timeout=60, headers=flood) as http:
                while time.time() < stop:
                    began = time.perf_counter()
                    status = http.post(f"{url}/v1/score", json=heavy_body).status_code
                    flood_statuses.append(status)
                    if status == 200:
                        heavy_seconds.append(time.perf_counter() - began)

        threads = [threading.Thread(target=flooder) for _ in range(12)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        small_statuses, small_seconds = [], []
        with httpx.Client(timeout=60, headers=small) as http:
            while time.time() < stop - 0.5:
                began = time.perf_counter()
                small_statuses.append(http.post(f"{url}/v1/score", json=CLEAN).status_code)
                small_seconds.append(time.perf_counter() - began)
            metrics = http.get(f"{url}/metrics").text
        for thread in threads:
            thread.join(60)
    assert set(flood_statuses) == {200, 429}  # the flood is held to its share...
    assert small_statuses and set(small_statuses) == {200}  # ...and the other client is never refused
    # It waits about a batch, not behind the flood's backlog of hundreds of texts.
    assert statistics.median(small_seconds) < 0.25 * statistics.median(heavy_seconds), (small_seconds, heavy_seconds)
    assert 'keel_client_queue_items{client="key-1",queue="scoring"}' in metrics
    assert "flood-key" not in metrics


@pytest.mark.subprocess
def test_chat_cost_limit_and_generation_rows_held_to_the_running_batch_size(tiny_reward_model: Path, tiny_policy: str):
    with keel_server(tiny_reward_model, "--policy", tiny_policy, "--guard", "off", "--max-generation-rows", "4",
                     "--max-request-tokens", "4096") as (url, _):
        message = [{"role": "user", "content": "hello"}]
        costly = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                            json={"messages": message, "n": 4, "best_of": 8, "max_tokens": 512})
        assert costly.status_code == 400 and costly.json()["error"]["code"] == "request_too_costly"
        assert "4096" in costly.json()["error"]["message"]
        before = metric(httpx.get(f"{url}/metrics").text, "keel_generation_request_seconds_count")
        ok = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                        json={"messages": message, "n": 2, "best_of": 6, "max_tokens": 8})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
        batches = metric(httpx.get(f"{url}/metrics").text, "keel_generation_request_seconds_count") - before
        assert batches >= 3  # 12 candidates, at most 4 rows in the running batch: 3 or more hand-overs


# ---- 4. work for a client that has gone is dropped ------------------------------------------------------------

@pytest.mark.subprocess
def test_an_abandoned_stream_stops_generating(tiny_reward_model: Path, long_policy: str):
    with keel_server(tiny_reward_model, "--policy", long_policy, "--guard", "off", "--max-tokens-limit", "4096",
                     "--max-request-tokens", "32768", "--max-prompt-tokens", "64") as (url, _):
        body = {"messages": [{"role": "user", "content": "hello"}], "n": 8, "max_tokens": 4096, "stream": True,
                "temperature": 0}
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            received = [next(lines) for _ in range(12)]  # a few chunks, then the client goes
        assert any('"content"' in line for line in received)
        time.sleep(1.0)
        first = httpx.get(f"{url}/metrics").text
        time.sleep(1.0)
        second = httpx.get(f"{url}/metrics").text
    tokens = metric(second, "keel_generated_tokens_total")
    assert tokens == metric(first, "keel_generated_tokens_total")  # stopped growing
    assert tokens < 8 * 4096 / 4  # far from what the request asked for
    assert metric(second, "keel_cancelled_items_total", queue="generation", stage="running") == 8


@pytest.mark.subprocess
def test_a_client_that_gives_up_on_a_chat_cancels_its_generation(tiny_reward_model: Path, long_policy: str):
    with keel_server(tiny_reward_model, "--policy", long_policy, "--guard", "off", "--max-tokens-limit", "4096",
                     "--max-request-tokens", "65536", "--max-prompt-tokens", "64", "--max-generation-rows", "8") as (
                         url, _):
        # 16 candidates, 8 in the running batch: some are cancelled while running, the others while queued
        body = {"messages": [{"role": "user", "content": "hello"}], "n": 4, "best_of": 4, "max_tokens": 4096,
                "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.0)
        time.sleep(1.5)
        metrics = httpx.get(f"{url}/metrics").text
        assert metric(metrics, "keel_cancelled_items_total", queue="generation", stage="running") >= 1
        assert metric(metrics, "keel_cancelled_items_total", queue="generation", stage="queued") >= 1
        assert metric(metrics, "keel_generation_queue_rows") == 0
        assert metric(metrics, "keel_requests_total", endpoint="/v1/chat/completions", status="499") == 1


# ---- 5. shutdown -------------------------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_sigterm_lets_a_chat_longer_than_the_scoring_timeout_finish(tiny_reward_model: Path, long_policy: str):
    with keel_server(tiny_reward_model, "--policy", long_policy, "--guard", "off", "--request-timeout-s", "1",
                     "--drain-seconds", "0.2", "--max-tokens-limit", "2048", "--max-request-tokens", "32768",
                     "--max-prompt-tokens", "64") as (url, process):
        result: dict[str, object] = {}

        def chat() -> None:
            # Outlives --request-timeout-s (about 4 s on an idle 2-core VM); the client waits long enough for a
            # busy one (about 100 s beside a training run)
            body = {"messages": [{"role": "user", "content": "hello"}], "n": 4, "best_of": 2, "max_tokens": 2048,
                    "temperature": 0}
            began = time.perf_counter()
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
            result.update(status=response.status_code, body=response.json(), seconds=time.perf_counter() - began)

        thread = threading.Thread(target=chat)
        thread.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        thread.join(300)
    assert result["status"] == 200, result
    assert result["seconds"] > 1.5  # it outlived --request-timeout-s, which used to bound the shutdown


def test_a_request_cut_at_shutdown_gets_an_openai_503(tiny_reward_model: Path):
    settings = Settings(model=tiny_reward_model, drain_seconds=0)
    with in_process_server(settings) as (url, server):
        state = server.config.app.state.keel
        real = type(state.runtime).scored

        def slow(texts, worker=0):
            time.sleep(3)
            return real(state.runtime, texts, worker)

        state.runtime.scored = slow
        server.config.timeout_graceful_shutdown = 0.3  # a window shorter than the request, as if misconfigured
        answer: dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: answer.update(r=httpx.post(f"{url}/v1/score", json=CLEAN,
                                                                            timeout=30)))
        thread.start()
        time.sleep(0.5)
        server.handle_exit(signal.SIGTERM, None)
        thread.join(30)
    response = answer["r"]
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "shutting_down"


@pytest.mark.subprocess
def test_keep_alive_clients_are_told_to_close_before_the_listener_goes(tiny_reward_model: Path):
    # Each client reuses one keep-alive connection until a response says `Connection: close`, then goes to
    # another replica, as a load balancer does once /readyz fails. None may see its connection cut.
    with keel_server(tiny_reward_model) as (url, process):  # the default drain
        outcomes: list[str] = []
        told_to_close: list[bool] = []

        def client() -> None:
            with httpx.Client(timeout=10, limits=httpx.Limits(max_connections=1)) as http:
                while True:
                    try:
                        response = http.post(f"{url}/v1/score", json=CLEAN)
                    except httpx.HTTPError as error:
                        outcomes.append(type(error).__name__)
                        told_to_close.append(False)
                        return
                    outcomes.append(str(response.status_code))
                    if response.headers.get("connection") == "close":
                        told_to_close.append(True)
                        return

        threads = [threading.Thread(target=client) for _ in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        assert process.wait(30) in (0, -signal.SIGTERM)
    assert set(outcomes) == {"200"}, outcomes
    assert told_to_close == [True] * 6


# ---- 7. slow and oversized headers ----------------------------------------------------------------------------

@pytest.mark.subprocess
def test_slow_and_oversized_headers_are_cut_off(tiny_reward_model: Path):
    with keel_server(tiny_reward_model, "--header-timeout-s", "1", "--max-header-bytes", "8192") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        began = time.time()
        for sock in slow:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        closed: set[int] = set()
        while len(closed) < len(slow) and time.time() - began < 6:
            for i, sock in enumerate(slow):  # a byte at a time, as a slowloris client sends
                if i in closed:
                    continue
                try:
                    sock.sendall(b"X")
                    sock.setblocking(False)
                    if sock.recv(1) == b"":
                        closed.add(i)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    closed.add(i)
                finally:
                    sock.setblocking(True)
            time.sleep(0.2)
        assert len(closed) == len(slow) and time.time() - began < 4
        for sock in slow:
            sock.close()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # an unfinished header grows...
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536)
            answer = b""
            while piece := sock.recv(4096):  # ...until it is cut off: answered and closed
                answer += piece
            assert answer.startswith(b"HTTP/1.1 400") and b"Connection: close" in answer
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # a whole one, in one piece
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
            status, _, body = raw_exchange(sock, b"")
        assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large"
        assert httpx.get(f"{url}/healthz").status_code == 200  # and the server is fine


# ---- 8. secrets ------------------------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_keys_stay_out_of_the_process_list_and_are_checked_before_the_body(tiny_reward_model: Path, tmp_path: Path):
    import subprocess
    import sys

    refused = subprocess.run([sys.executable, "-m", "keel", "serve", "--api-keys", "k"],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "unrecognized arguments: --api-keys" in refused.stderr
    keys = tmp_path / "keys"
    keys.write_text("secret-one\n")
    with keel_server(tiny_reward_model, "--api-keys-file", str(keys)) as (url, process):
        assert "secret-one" not in Path(f"/proc/{process.pid}/cmdline").read_text()
        invalid = httpx.post(f"{url}/v1/score", content=b"{not json", headers={"content-type": "application/json"})
        assert invalid.status_code == 401 and invalid.json()["error"]["code"] == "invalid_api_key"
        schema = httpx.get(f"{url}/openapi.json").json()
        schemes = schema["components"]["securitySchemes"]
        assert any(s == {"type": "http", "scheme": "bearer", **{k: s[k] for k in s if k == "description"}}
                   for s in schemes.values())
        assert all(schema["paths"]["/v1/score"]["post"].get("security") for _ in [0])
        assert "security" not in schema["paths"]["/healthz"]["get"]
    missing = subprocess.run([sys.executable, "-m", "keel", "serve", "--model", str(tiny_reward_model),
                              "--api-keys-file", str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "--api-keys-file" in missing.stderr

