"""Continuous batching and streaming under the guard: a row that joins a running batch gets the tokens it would
alone; a stream read with the openai client equals the whole reply; a reply that turns harmful late is stopped
mid-stream with content_filter; a short request does not wait behind long ones."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from keel.core.text import Message
from keel.service.sampling import Row, Sampling
from tests.helpers import keel_server


def greedy(text: str, max_tokens: int, on_text=None) -> Row:
    return Row((Message("user", text),), Sampling(temperature=0.0, max_tokens=max_tokens), on_text)


def test_a_row_that_joins_a_running_batch_gets_the_tokens_it_would_alone(tiny_policy: str):
    from keel.service.generation import PolicyRuntime

    runtime = PolicyRuntime(tiny_policy, dtype="float32")
    prompts = ["hello", "a much longer prompt than the first one, with many more tokens in it", "hi there"]
    alone = [runtime.generate([greedy(p, 24)])[0] for p in prompts]
    started = threading.Event()
    running: list = []
    # The long rows run first; the others join once the long ones have produced text (mid-batch).
    long_rows = threading.Thread(target=lambda: running.extend(runtime.generate(
        [greedy(prompts[0], 200, lambda text, finish: started.set()), greedy(prompts[1], 24)])))
    long_rows.start()
    assert started.wait(30)
    joined = runtime.generate([greedy(prompts[2], 24), greedy(prompts[1], 24)])
    still_running = long_rows.is_alive()
    long_rows.join(60)
    assert still_running, "the joining rows finished after the batch they joined"
    assert [r.text for r in joined] == [alone[2].text, alone[1].text]
    assert running[1].text == alone[1].text
    assert running[0].text.startswith(alone[0].text) or alone[0].finish_reason == "stop"


def test_a_failing_request_fails_alone_and_the_loop_goes_on(tiny_policy: str):
    from keel.service.generation import PolicyRuntime

    def broken(text: str, finish: str | None) -> None:
        raise ZeroDivisionError("a callback that fails")

    runtime = PolicyRuntime(tiny_policy, dtype="float32")
    with pytest.raises(ZeroDivisionError):
        runtime.generate([greedy("hello", 4, broken)])
    assert runtime.generate([greedy("hello", 4)])[0].completion_tokens > 0


# ---- over a socket ---------------------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_a_guarded_stream_read_with_the_openai_client_equals_the_whole_reply(
        tiny_reward_model: Path, tiny_moderation_model: Path, tiny_policy: str):
    import openai

    with keel_server(tiny_reward_model, "--policy", tiny_policy, "--guard", "refuse",
                     moderation=tiny_moderation_model) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        messages = [{"role": "user", "content": "Tell me about bread."}]
        whole = client.chat.completions.create(model="keel", messages=messages, temperature=0, max_tokens=40, n=2)
        pieces: dict[int, list[str]] = {0: [], 1: []}
        finishes = {}
        for chunk in client.chat.completions.create(model="keel", messages=messages, temperature=0, max_tokens=40,
                                                    n=2, stream=True):
            for choice in chunk.choices:
                pieces[choice.index].append(choice.delta.content or "")
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
        for choice in whole.choices:
            assert "".join(pieces[choice.index]) == choice.message.content
            assert finishes[choice.index] == choice.finish_reason != "content_filter"
        assert sum(1 for p in pieces[0] if p) > 2  # it came in pieces, not at once
        metrics = httpx.get(f"{url}/metrics").text
    assert 'keel_time_to_first_token_seconds_count{mode="guarded_stream"} 1.0' in metrics
    assert 'keel_time_to_first_token_seconds_count{mode="whole"} 1.0' in metrics
    assert 'keel_generation_queue_wait_seconds_count{mode="guarded_stream"} 2.0' in metrics


SAFE = "here is some recipe for bread thanks "


class ScriptedUpstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that streams a fixed reply word by word: harmless for a while, then the
    words the tiny moderation model flags."""

    pieces = SAFE.split() * 6 + ["i will kill and hurt you"] * 3
    reply = " ".join(pieces)
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        if not body.get("stream"):
            choices = [{"index": i, "message": {"role": "assistant", "content": self.reply}, "finish_reason": "stop"}
                       for i in range(body.get("n", 1))]
            payload = json.dumps({"choices": choices, "usage": {"prompt_tokens": 3, "completion_tokens": 9}}).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for word in self.pieces:
                for index in range(body.get("n", 1)):
                    piece = {"choices": [{"index": index, "delta": {"content": word + " "}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(piece)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.01)
            end = {"choices": [{"index": i, "delta": {}, "finish_reason": "stop"} for i in range(body.get("n", 1))]}
            self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # Keel hung up once the guard had stopped every choice

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def scripted_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.subprocess
def test_a_reply_that_turns_harmful_late_is_stopped_mid_stream_with_content_filter(
        tiny_reward_model: Path, tiny_moderation_model: Path):
    import openai

    with scripted_upstream() as upstream, keel_server(
            tiny_reward_model, "--upstream", upstream, "--guard", "regenerate", "--stream-guard-tokens", "4",
            "--guard-margin", "0", moderation=tiny_moderation_model) as (url, _):  # the tiny model's own verdict
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        received, finish = [], None
        for chunk in client.chat.completions.create(model="keel", messages=[{"role": "user", "content": "Hi"}],
                                                    stream=True, max_tokens=100):
            for choice in chunk.choices:
                received.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        whole = client.chat.completions.create(model="keel", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=100)
    text = "".join(received)
    assert finish == "content_filter"
    assert "bread" in text and "kill" not in text  # what passed was sent; nothing flagged reached the client
    assert text.endswith("I'm sorry, but I can't help with that.")
    assert sum(1 for piece in received if "bread" in piece) >= 3  # streamed before the stop, not at the end
    assert whole.choices[0].finish_reason == "content_filter"  # the whole reply is judged the same way


@pytest.mark.subprocess
def test_a_short_request_does_not_wait_behind_long_ones(tiny_reward_model: Path, long_policy: str):
    small = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    hog = {"messages": [{"role": "user", "content": "write a lot"}], "n": 2, "best_of": 4, "max_tokens": 1500,
           "temperature": 0}
    with keel_server(tiny_reward_model, "--policy", long_policy, "--guard", "off", "--max-tokens-limit", "2048",
                     "--max-request-tokens", "16384", "--generation-timeout-s", "300") as (url, _):
        def latency() -> float:
            began = time.perf_counter()
            assert httpx.post(f"{url}/v1/chat/completions", json=small, timeout=120).status_code == 200
            return time.perf_counter() - began

        idle = min(latency() for _ in range(3))
        hogs_seconds: list[float] = []

        def run_hog() -> None:
            began = time.perf_counter()
            httpx.post(f"{url}/v1/chat/completions", json=hog, timeout=300)
            hogs_seconds.append(time.perf_counter() - began)

        hogs = [threading.Thread(target=run_hog) for _ in range(3)]
        for thread in hogs:
            thread.start()
        time.sleep(1.0)  # the hogs are generating
        busy = latency()
        for thread in hogs:
            thread.join(300)
    assert busy <= 3 * idle + 1.0, (busy, idle)
    assert min(hogs_seconds) > 2 * busy, (hogs_seconds, busy)  # it did not just come after them
