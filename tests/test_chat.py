"""Chat completions: the openai client over a socket (plain and streaming), best-of-n, the guard, the guard
proxy, and bad requests, on the tiny policy and tiny reward model."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from keel.core.moderation import raised
from keel.core.runtime import Scored
from keel.core.text import Message
from keel.service.app import create_app
from keel.service.chat import ChatAligner, GuardSettings
from keel.service.generation import Generated, Sampling
from keel.service.schemas import ModerationResult
from keel.service.settings import Settings
from tests.helpers import keel_server

HEADS = ["harmless", "helpful"]


def scripted_aligner(replies: list[str], scores: dict[str, tuple[float, float]], mode: str = "regenerate",
                     retries: int = 1) -> tuple[ChatAligner, list[int]]:
    """An aligner whose policy answers from a script (in order) and whose reward model scores from a table."""
    calls: list[int] = []
    script = iter(replies)

    async def generate(conversation, samplings):
        calls.append(len(samplings))
        return [Generated(next(script), "stop", 3, 2, 0.0) for _ in samplings]

    reward_model = SimpleNamespace(heads=HEADS)

    async def score(inputs):
        return Scored(np.array([scores[response] for _, response in inputs], dtype=np.float32), reward_model)

    # The scripted moderation model: a reply whose harmless score is at most 0 is violent; a request is violent
    # when it says "bomb".
    async def moderate(inputs):
        flagged = [scores[text][0] <= 0 if context else "bomb" in text for context, text in inputs]
        return [ModerationResult(flagged=f, categories={"violence": f}, category_scores={"violence": float(f)},
                                 category_applied_input_types={"violence": ["text"]}) for f in flagged]

    backend = SimpleNamespace(generate=generate, score=score, moderate=moderate, moderates=True)
    aligner = ChatAligner(backend, HEADS, {"harmless": 1.0, "helpful": 1.0},
                          GuardSettings(mode, retries, "I can't help with that."))
    return aligner, calls


def complete(aligner: ChatAligner, n: int, best_of: int, request: str = "hi"):
    return asyncio.run(aligner.complete((Message("user", request),), Sampling(max_tokens=4), n, best_of))


def test_best_of_n_picks_the_highest_reward():
    aligner, calls = scripted_aligner(["ok", "great", "fine", "meh"],
                                      {"ok": (1, 0), "great": (1, 2), "fine": (0.5, 0.6), "meh": (0.2, 0)})
    [chosen] = complete(aligner, n=1, best_of=4)
    assert calls == [4]
    assert chosen.reply.text == "great"
    assert chosen.audit.reward == pytest.approx(3.0) and chosen.audit.rank == 0
    assert chosen.audit.guard == "passed" and chosen.audit.candidates == 4


def test_guard_skips_a_flagged_best_candidate():
    aligner, _ = scripted_aligner(["harmful", "safe"], {"harmful": (-2, 5), "safe": (1, 0)})
    [chosen] = complete(aligner, n=1, best_of=2)
    assert chosen.reply.text == "safe" and chosen.audit.rank == 1 and not chosen.audit.moderation.flagged


def test_guard_regenerates_then_refuses():
    aligner, calls = scripted_aligner(["bad1", "good"], {"bad1": (-1, 0), "good": (2, 0)})
    [chosen] = complete(aligner, n=1, best_of=1)
    assert (chosen.reply.text, chosen.audit.guard, chosen.audit.attempts, chosen.audit.candidates) == (
        "good", "regenerated", 2, 2)

    aligner, calls = scripted_aligner(["bad1", "bad2"], {"bad1": (-1, 0), "bad2": (-3, 0)})
    [chosen] = complete(aligner, n=1, best_of=1)
    assert calls == [1, 1]
    assert chosen.reply.text == "I can't help with that." and chosen.reply.finish_reason == "content_filter"
    assert chosen.audit.guard == "refused" and chosen.audit.moderation.flagged


def test_guard_modes_refuse_and_off():
    aligner, calls = scripted_aligner(["bad"], {"bad": (-1, 0)}, mode="refuse")
    [chosen] = complete(aligner, n=1, best_of=1)
    assert calls == [1] and chosen.audit.guard == "refused"
    aligner, _ = scripted_aligner(["bad"], {"bad": (-1, 0)}, mode="off")
    [chosen] = complete(aligner, n=1, best_of=1)
    assert chosen.reply.text == "bad" and chosen.audit.guard == "off" and chosen.audit.moderation.flagged


def test_guard_refuses_a_flagged_request_without_generating():
    aligner, calls = scripted_aligner(["never"], {"never": (1, 0)})
    chosen = complete(aligner, n=2, best_of=1, request="how do i build a bomb")
    assert calls == [] and [c.reply.text for c in chosen] == ["I can't help with that."] * 2
    assert chosen[0].reply.finish_reason == "content_filter" and chosen[0].audit.guard == "request_refused"
    assert chosen[0].audit.moderation.flagged and chosen[0].audit.reward is None
    aligner, calls = scripted_aligner(["fine"], {"fine": (1, 0)}, mode="off")  # off: audit only
    assert complete(aligner, n=1, best_of=1, request="how do i build a bomb")[0].reply.text == "fine"


def test_several_choices_share_one_generation_call():
    aligner, calls = scripted_aligner(["a", "b", "c", "d"], {"a": (1, 0), "b": (2, 0), "c": (3, 0), "d": (0.5, 0)})
    chosen = complete(aligner, n=2, best_of=2)
    assert calls == [4] and [c.reply.text for c in chosen] == ["b", "c"]


@pytest.mark.subprocess
def test_openai_client_plain_and_streaming_over_a_socket(tiny_reward_model: Path, tiny_policy: str):
    import openai

    with keel_server(tiny_reward_model, "--policy", tiny_policy, "--guard", "off", KEEL_API_KEYS="k1") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k1", max_retries=0)
        messages = [{"role": "user", "content": "how can i bake a cake"}]
        completion = client.chat.completions.create(model="keel", messages=messages, max_tokens=5, n=2, seed=7)
        assert len(completion.choices) == 2 and completion.usage.completion_tokens <= 10
        assert all(c.finish_reason in ("stop", "length") for c in completion.choices)
        audit = completion.model_extra["keel"]
        assert len(audit["choices"]) == 2 and set(audit["choices"][0]["scores"]) == {"harmless", "quality"}
        again = client.chat.completions.create(model="keel", messages=messages, max_tokens=5, n=2, seed=7)
        assert [c.message.content for c in again.choices] == [c.message.content for c in completion.choices]

        stream = client.chat.completions.create(model="keel", messages=messages, max_tokens=6, seed=7, stream=True)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes in (["stop"], ["length"]) and "keel" in chunks[-1].model_extra
        plain = client.chat.completions.create(model="keel", messages=messages, max_tokens=6, seed=7)
        assert text == plain.choices[0].message.content  # streaming sends the same reply
        # What the openai client sends for a developer message and content parts, and its usage chunk.
        rich = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "how can i bake a cake"}]}]
        chunks = list(client.chat.completions.create(model="keel", messages=rich, max_tokens=4, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nonexistent", messages=messages, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).chat.completions.create(
                model="keel", messages=messages, max_tokens=2)


@pytest.mark.subprocess
def test_guard_proxy_reranks_an_upstream(tiny_reward_model: Path, tiny_moderation_model: Path, tiny_policy: str):
    import openai

    with keel_server(tiny_reward_model, "--policy", tiny_policy, "--guard", "off") as (upstream, _):
        with keel_server(tiny_reward_model, "--upstream", upstream, "--best-of", "3",
                         moderation=tiny_moderation_model) as (proxy, _):
            client = openai.OpenAI(base_url=f"{proxy}/v1", api_key="none", max_retries=0)
            completion = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "help me hack code"}], max_tokens=4)
            audit = completion.model_extra["keel"]
            assert audit["policy"] == f"upstream:{upstream}"
            assert audit["choices"][0]["candidates"] >= 3 and audit["choices"][0]["guard"] != "off"
            streamed = list(client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True))
            assert "keel" in streamed[-1].model_extra
        with keel_server(tiny_reward_model, "--upstream", "http://127.0.0.1:9",
                         moderation=tiny_moderation_model) as (proxy, _):
            response = openai.OpenAI(base_url=f"{proxy}/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.APIStatusError) as error:
                response.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
            assert error.value.status_code == 502


@pytest.fixture(scope="module")
def chat_client(tiny_reward_model: Path, tiny_moderation_model: Path, tiny_policy: str):
    settings = Settings(model=tiny_reward_model, moderation_model=tiny_moderation_model, policy=tiny_policy,
                        max_tokens_limit=16)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 17}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "best_of": 400}, "best_of"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42", "tool_call_id": "t"}]}, None),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, None),
])
def test_bad_chat_requests_get_400(chat_client: TestClient, body: dict, param: str | None):
    response = chat_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and (param is None or error["param"] == param)


def test_chat_needs_a_policy(tiny_reward_model: Path):
    with TestClient(create_app(Settings(model=tiny_reward_model))) as client:
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 404 and response.json()["error"]["code"] == "chat_not_enabled"


def test_chat_metrics_and_models(chat_client: TestClient):
    response = chat_client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "best_of": 2})
    assert response.status_code == 200, response.text
    assert response.json()["keel"]["choices"][0]["candidates"] >= 2
    metrics = chat_client.get("/metrics").text
    for name in ("keel_generated_tokens_total", "keel_time_to_first_token_seconds", "keel_best_of_rank",
                 "keel_guard_actions_total"):
        assert name in metrics
    kinds = [m.get("kind") for m in chat_client.get("/v1/models").json()["data"]]
    assert "policy" in kinds


def test_what_the_openai_client_sends_is_accepted_or_refused_by_name(chat_client: TestClient):
    user = {"role": "user", "content": "hi"}
    accepted = chat_client.post("/v1/chat/completions", json={
        "model": "keel", "max_tokens": 3, "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "name": "ana", "content": [{"type": "text", "text": "how can i "},
                                                       {"type": "text", "text": "bake a cake"}]}]})
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["usage"]["prompt_tokens"] > 0
    prefill = chat_client.post("/v1/chat/completions", json={
        "max_tokens": 3, "messages": [user, {"role": "assistant", "content": "Sure, here"}]})
    assert prefill.status_code == 200, prefill.text
    for extra, named in (({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"response_format": {"type": "json_object"}}, "json_object"),
                         ({"logprobs": True}, "logprobs"),
                         ({"messages": [{"role": "user", "content": [
                             {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "image_url")):
        refused = chat_client.post("/v1/chat/completions", json={"messages": [user], **extra})
        assert refused.status_code == 400 and named in refused.json()["error"]["message"], refused.text
    assert chat_client.post("/v1/chat/completions", json={"messages": [user], "response_format": {
        "type": "text"}, "max_tokens": 2}).status_code == 200
    unknown = chat_client.post("/v1/chat/completions", json={"messages": [user], "model": "nonexistent"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_include_usage_sends_a_final_usage_chunk(chat_client: TestClient):
    import json

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    events = [line.removeprefix("data: ") for line in chat_client.post("/v1/chat/completions", json=body).text.split(
        "\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["total_tokens"] == (last["usage"]["prompt_tokens"]
                                                                     + last["usage"]["completion_tokens"])
    without = chat_client.post("/v1/chat/completions", json={**body, "stream_options": None}).text
    assert '"usage"' not in without


def test_one_model_by_id_and_the_health_alias(chat_client: TestClient):
    listed = chat_client.get("/v1/models").json()["data"]
    one = chat_client.get(f"/v1/models/{listed[0]['id']}")
    assert one.status_code == 200 and one.json() == listed[0]
    missing = chat_client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert chat_client.get("/health").json() == {"status": "ok"}


def test_health_alias_needs_no_key(tiny_reward_model: Path):
    with TestClient(create_app(Settings(model=tiny_reward_model, api_keys=["k"]))) as client:
        assert client.get("/health").status_code == 200 and client.get("/healthz").status_code == 200
        assert client.get("/v1/models").status_code == 401


def test_the_guard_margin_lets_a_request_pass_that_moderation_flags(tiny_reward_model: Path,
                                                                      tiny_moderation_model: Path, tiny_policy: str):
    """--guard-margin raises every threshold the guard uses by that many log-odds; /v1/moderations keeps its own
    verdict. Thresholds 5 log-odds under the request's highest category probability: flagged at margin 0, passed
    at margin 10 (the highest probability is then 5 log-odds under every raised threshold)."""
    request = "i will kill and hurt you"
    with TestClient(create_app(Settings(model=tiny_reward_model, moderation_model=tiny_moderation_model))) as client:
        scores = client.post("/v1/moderations", json={"input": request}).json()["results"][0]["category_scores"]
    highest = max(scores.values())
    threshold = 1 / (1 + math.exp(5 - math.log(highest / (1 - highest))))
    assert raised(threshold, 0) == threshold and raised(0.5, math.log(3)) == pytest.approx(0.75)
    verdicts = {}
    for margin in (0.0, 10.0):
        settings = Settings(model=tiny_reward_model, moderation_model=tiny_moderation_model, policy=tiny_policy,
                            max_tokens_limit=4, guard_margin=margin,
                            moderation_thresholds={category: threshold for category in scores})
        with TestClient(create_app(settings)) as client:
            flagged = client.post("/v1/moderations", json={"input": request}).json()["results"][0]["flagged"]
            chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": request}],
                                                             "max_tokens": 2}).json()
        verdicts[margin] = (flagged, chat["keel"]["choices"][0]["guard"])
    assert verdicts[0.0] == (True, "request_refused")
    assert verdicts[10.0][0] is True and verdicts[10.0][1] != "request_refused"
