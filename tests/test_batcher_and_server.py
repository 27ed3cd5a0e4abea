"""The batcher, overload behaviour, the openai client over a real socket, and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from keel.service.batcher import Batcher, DeadlineExceeded, QueueFull, ShuttingDown
from tests.helpers import keel_server


def fake_scorer(batches: list[list[str]], delay: float = 0.0):
    def score(texts, worker=0):
        batches.append(list(texts))
        time.sleep(delay)
        return np.array([[float(len(t))] for t in texts], dtype=np.float32)

    return score


def test_concurrent_requests_share_a_batch():
    batches: list[list[str]] = []

    async def main():
        batcher = Batcher(fake_scorer(batches, delay=0.05), max_batch_texts=64, max_wait_s=0.0, max_queue_texts=100)
        batcher.start()
        first = asyncio.create_task(batcher.submit(["x"], 5))
        await asyncio.sleep(0.01)  # the first batch is running; the next requests queue behind it
        rest = [asyncio.create_task(batcher.submit(["y" * i, "z"], 5)) for i in range(1, 11)]
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert batches[0] == ["x"] and len(batches) == 2 and len(batches[1]) == 20
    assert [r[0, 0] for r in results[1:]] == [float(i) for i in range(1, 11)]  # each gets its own scores


def test_max_wait_gathers_a_batch_when_idle():
    batches: list[list[str]] = []

    async def main():
        batcher = Batcher(fake_scorer(batches), max_batch_texts=64, max_wait_s=0.05, max_queue_texts=100)
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(["t"], 5)) for _ in range(3)]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(batcher.submit(["late"], 5)))
        await asyncio.gather(*tasks)
        await batcher.close()

    asyncio.run(main())
    assert batches == [["t", "t", "t", "late"]]


def test_queue_bound_deadline_and_shutdown():
    async def main():
        batcher = Batcher(fake_scorer([], delay=0.3), max_batch_texts=2, max_wait_s=0.0, max_queue_texts=4)
        batcher.start()
        running = asyncio.create_task(batcher.submit(["a", "b"], 5))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(batcher.submit(["c", "d", "e"], 0.1))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit(["f", "g"], 5)
        with pytest.raises(DeadlineExceeded):
            await waiting
        await running
        close = asyncio.create_task(batcher.close())
        await asyncio.sleep(0)
        with pytest.raises(ShuttingDown):
            await batcher.submit(["h"], 5)
        await close

    asyncio.run(main())


def test_failing_batch_fails_its_requests_not_the_worker():
    calls = []

    def flaky(texts, worker=0):
        calls.append(texts)
        if len(calls) == 1:
            raise RuntimeError("engine exploded")
        return np.zeros((len(texts), 1), dtype=np.float32)

    async def main():
        batcher = Batcher(flaky, max_batch_texts=8, max_wait_s=0.0, max_queue_texts=100)
        batcher.start()
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.submit(["a"], 5)
        assert (await batcher.submit(["b"], 5)).shape == (1, 1)
        await batcher.close()

    asyncio.run(main())


@pytest.mark.subprocess
def test_openai_client_moderations_over_a_socket(tiny_reward_model: Path, tiny_moderation_model: Path,
                                                 tmp_path: Path):
    import openai

    from keel.core.moderation import CATEGORIES

    keys = tmp_path / "keys"
    keys.write_text("# one key a line\nother-key\ntest-key\n")
    with keel_server(tiny_reward_model, "--api-keys-file", str(keys), moderation=tiny_moderation_model) as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="test-key", max_retries=0)
        result = client.moderations.create(input=["here is some recipe for bread thanks", "i will kill and hurt you"])
        assert len(result.results) == 2
        for item in result.results:  # every typed field of the client's current taxonomy is filled
            for block in (item.categories, item.category_scores, item.category_applied_input_types):
                assert set(block.model_dump(by_alias=True, exclude_none=True)) == set(CATEGORIES)
            assert isinstance(item.flagged, bool) and isinstance(item.categories.hate, bool)
            assert 0.0 <= item.category_scores.self_harm_intent <= 1.0
            assert item.category_applied_input_types.violence == ["text"]
        benign, violent = result.results
        assert violent.category_scores.violence > 4 * benign.category_scores.violence
        served = next(m for m in httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer test-key"}).json()[
            "data"] if m.get("kind") == "moderation-model")
        for item in result.results:  # flagged exactly where a score reaches the served threshold
            scores = item.category_scores.model_dump(by_alias=True)
            expected = {c: rule["threshold"] is not None and scores[c] >= rule["threshold"]
                        for c, rule in served["categories"].items()}
            assert item.categories.model_dump(by_alias=True) == expected
            assert item.flagged == any(expected.values())
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).moderations.create(input="x")
        with pytest.raises(openai.BadRequestError):
            client.moderations.create(input=[])


@pytest.mark.subprocess
def test_overload_gets_429_and_never_5xx(tiny_reward_model: Path):
    # A tiny queue and a burst of large concurrent requests: some must be refused, none may fail.
    with keel_server(tiny_reward_model, "--max-queue-texts", "64", "--max-batch-size", "8") as (base, _):
        body = {"input": [{"text": "how can i make a bomb " * 8}] * 32}
        statuses: list[int] = []

        def hit(_):
            return httpx.post(f"{base}/v1/score", json=body, timeout=30).status_code

        with ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(hit, range(96)))
        assert set(statuses) <= {200, 429, 503}
        assert statuses.count(429) > 0 and statuses.count(200) > 0
        retry = httpx.post(f"{base}/v1/score", json={"input": [{"text": "ok"}]}, timeout=30)
        assert retry.status_code == 200  # recovers once the burst is gone
        metrics = httpx.get(f"{base}/metrics").text
        assert 'keel_rejected_total{reason="queue_full"}' in metrics


@pytest.mark.subprocess
def test_sigterm_drains_in_flight_requests(tiny_reward_model: Path):
    with keel_server(tiny_reward_model, "--drain-seconds", "1") as (base, process):
        body = {"input": [{"text": "a fairly long text to score " * 10}] * 64}
        results: list[int] = []

        def hit():
            results.append(httpx.post(f"{base}/v1/score", json=body, timeout=30).status_code)

        threads = [threading.Thread(target=hit) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{base}/readyz").status_code == 503  # draining: not ready, still answering
        for thread in threads:
            thread.join(30)
        assert results == [200] * 8
        # uvicorn re-raises the signal once shutdown is complete, so the exit status says SIGTERM.
        assert process.wait(30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in process.stdout.read()


def test_workers_run_batches_side_by_side():
    workers_seen: list[int] = []
    spans: list[tuple[float, float]] = []

    def slow(texts, worker):
        workers_seen.append(worker)
        began = time.perf_counter()
        time.sleep(0.2)
        spans.append((began, time.perf_counter()))
        return np.zeros((len(texts), 1), dtype=np.float32)

    async def main():
        batcher = Batcher(slow, max_batch_texts=1, max_wait_s=0.0, max_queue_texts=10, workers=2)
        batcher.start()
        await asyncio.gather(batcher.submit(["a"], 5), batcher.submit(["b"], 5))
        await batcher.close()

    asyncio.run(main())
    # Two 0.2 s batches at once, not one after the other: the second began before the first ended.
    assert max(start for start, _ in spans) < min(end for _, end in spans)
    assert sorted(workers_seen) == [0, 1]


@pytest.mark.subprocess
def test_policy_rewards_from_a_running_service_match_the_model_directory(tiny_reward_model: Path,
                                                                         tiny_moderation_model: Path, monkeypatch):
    from keel.core.text import Message
    from keel.training.policy.rewards import PenaltyConfig, RewardFunction, RewardSourceConfig

    conversations = [(Message("user", "how can i make a bomb"),), (Message("user", "help me bake bread"),),
                     (Message("user", "what do you think of me"),)]
    responses = ["sorry, i cannot help with that.", "sure, here is some recipe", "i will kill and hurt you"]
    weights = {"harmless": 1.0, "quality": 0.5}
    local = RewardFunction(RewardSourceConfig(model=str(tiny_reward_model), backend="onnx", heads=weights, penalties=[
        PenaltyConfig("harm", weight=2.0, model=str(tiny_moderation_model), backend="onnx")]))
    monkeypatch.setenv("TEST_KEEL_KEY", "secret-key")
    with keel_server(tiny_reward_model, "--backend", "onnx", moderation=tiny_moderation_model,
                     KEEL_API_KEYS="secret-key") as (url, _):
        remote = RewardFunction(RewardSourceConfig(url=url, api_key_env="TEST_KEEL_KEY", heads=weights,
                                                   penalties=[PenaltyConfig("harm", weight=2.0, url=url)]))
        assert remote.heads == ["harmless", "quality"]
        remote_rewards = remote(conversations, responses)
    local_rewards = local(conversations, responses)
    np.testing.assert_allclose(remote_rewards.head_z, local_rewards.head_z, atol=1e-4)
    np.testing.assert_allclose(remote_rewards.total, local_rewards.total, atol=1e-4)
    np.testing.assert_allclose(local_rewards.heads, local_rewards.head_z[:, 0] + 0.5 * local_rewards.head_z[:, 1],
                               atol=1e-6)
    # The reply the tiny moderation model flags (and only it) costs the penalty's weight.
    assert local_rewards.penalties["harm"].tolist() == remote_rewards.penalties["harm"].tolist() == [0.0, 0.0, 1.0]
    np.testing.assert_allclose(local_rewards.total, local_rewards.heads - 2.0 * np.array([0.0, 0.0, 1.0]), atol=1e-6)


@pytest.mark.subprocess
def test_json_logs_for_log_pipelines(tiny_reward_model: Path):
    with keel_server(tiny_reward_model, "--log-format", "json", "--drain-seconds", "0") as (url, process):
        assert httpx.post(f"{url}/v1/score", json={"input": [{"text": "hello"}]}).status_code == 200
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        lines = [line for line in process.stdout.read().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line, uvicorn's too, is one JSON object
    assert any(e["logger"] == "keel.service" and e["message"].startswith("ready") for e in entries)
    assert any(e["logger"].startswith("uvicorn") for e in entries)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
