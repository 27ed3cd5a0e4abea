"""Clients of a busy server: the HTTP reward function and the guard proxy's upstream client try again on 429,
5xx and dropped connections (honouring Retry-After, within a bounded time), send the API key, and split a batch
the server finds too large."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from keel.core.retry import RetryPolicy
from keel.core.text import Message
from keel.service.errors import ApiError
from keel.service.sampling import Sampling
from keel.service.upstream import UpstreamClient
from keel.training.policy.rewards import RewardError, RewardFunction, RewardSourceConfig


def test_retry_policy_honours_retry_after_and_bounds():
    policy = RetryPolicy(attempts=3, base_s=0.5, max_delay_s=4.0, total_s=5.0)
    assert policy.delay(1, "2") == 2.0 and policy.delay(1, "60") == 4.0  # Retry-After, capped
    assert 0 <= policy.delay(3) <= 2.0  # backoff with jitter: at most base * 2^(3-1)
    assert policy.allows(2, 1.0, 1.0) and not policy.allows(3, 1.0, 1.0) and not policy.allows(1, 4.5, 1.0)


class FakeKeel:
    """A reward service that is busy twice, drops a connection once, limits items to 2 and wants a key."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.busy = 2
        self.dropped = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization") != "Bearer secret":
            return httpx.Response(401, json={"error": {"code": "invalid_api_key"}})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"heads": ["harmless"]}]})
        if self.busy:
            self.busy -= 1
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {}})
        if not self.dropped:
            self.dropped = True
            raise httpx.ConnectError("connection reset")
        items = json.loads(request.content)["input"]
        self.calls.append((request.url.path, len(items)))
        if len(items) > 2:
            return httpx.Response(400, json={"error": {"code": "too_many_items"}})
        return httpx.Response(200, json={"data": [{"index": i, "scores": {"harmless": float(len(it["messages"]))}}
                                                  for i, it in enumerate(items)]})


def test_the_http_reward_function_retries_and_splits(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KEEL_API_KEY", "secret")
    server = FakeKeel()
    rewards = RewardFunction(RewardSourceConfig(url="http://keel.test"), transport=httpx.MockTransport(server))
    assert rewards.service is not None
    rewards.service.retry = RetryPolicy(base_s=0.0)
    conversations = [(Message("user", "hi"),)] * 5
    scores = rewards.head_scores(conversations, ["ok"] * 5)
    assert scores.shape == (5, 1) and (scores[:, 0] == 2).all()  # user + assistant message
    assert [n for _, n in server.calls] == [5, 2, 2, 1]  # busy twice, dropped once, then 5 is too many: halved
    assert rewards.chunk == 2
    monkeypatch.setenv("KEEL_API_KEY", "wrong")
    with pytest.raises(RewardError, match="HTTP 401"):
        rewards.head_scores(conversations, ["ok"] * 5)


def test_the_upstream_client_retries_then_gives_a_clear_502():
    attempts: list[int] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) < 3:
            return httpx.Response(429, headers={"Retry-After": "0"})
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {"content": "hello"},
                                                      "finish_reason": "stop"}], "usage": {}})

    async def run(handler):  # type: ignore[no-untyped-def]
        client = UpstreamClient("http://upstream.test", "k", None, timeout_s=10)
        client.client = httpx.AsyncClient(base_url="http://upstream.test", transport=httpx.MockTransport(handler))
        client.retry = RetryPolicy(base_s=0.0, attempts=4)
        try:
            return await client.generate((Message("user", "hi"),), [Sampling(max_tokens=4)])
        finally:
            await client.close()

    [reply] = asyncio.run(run(flaky))
    assert reply.text == "hello" and len(attempts) == 3

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.raises(ApiError) as error:
        asyncio.run(run(down))
    assert error.value.status == 502 and error.value.code == "upstream_unreachable"
