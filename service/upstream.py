"""Candidates from an upstream OpenAI-compatible server (vLLM, TGI, a hosted API, another Keel) for the guard
proxy: Keel asks it for the candidates, then reranks and guards them itself; or streams its tokens through the
guard (one candidate per choice)."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable, Sequence
from itertools import groupby
from typing import Any

import httpx

from keel.core.retry import RETRY_STATUSES, RetryPolicy
from keel.core.text import Conversation
from keel.service.errors import ApiError
from keel.service.sampling import Generated, OnText, Sampling


class UpstreamClient:
    def __init__(self, base_url: str, api_key: str | None, model: str | None, timeout_s: float):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout_s)
        # Retries end well inside the request's own deadline (the caller's generation timeout).
        self.retry = RetryPolicy(total_s=timeout_s / 2)

    async def close(self) -> None:
        await self.client.aclose()

    async def generate(self, conversation: Conversation, settings: Sequence[Sampling]) -> list[Generated]:
        """One reply per sampling setting; settings that differ only by seed share one request with n > 1."""
        replies: list[Generated] = []
        for _, same in groupby(settings, key=lambda s: (s.temperature, s.top_p, s.max_tokens, s.stop)):
            group = list(same)
            replies += await self._request(self._body(conversation, group[0], len(group)), len(group))
        return replies

    async def stream(self, conversation: Conversation, settings: Sequence[Sampling],
                     on_text: Callable[[int], OnText], stops: Sequence[threading.Event]) -> list[Generated]:
        """One streamed request for len(settings) choices (settings that differ only by seed): each choice's
        text, as the upstream sends it, to on_text(index). The request ends early once every choice has finished
        or been stopped."""
        count = len(settings)
        body = {**self._body(conversation, settings[0], count), "stream": True,
                "stream_options": {"include_usage": True}}
        texts, finishes = [""] * count, [None] * count  # type: list[str], list[str | None]
        usage: dict[str, Any] = {}
        response = await self._post(body, stream=True)
        try:
            if response.status_code != 200:
                raise ApiError(502, f"upstream {self.base_url} answered HTTP {response.status_code}",
                               "upstream_error", code="upstream_status")
            async for line in response.aiter_lines():
                data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
                if data == "[DONE]":
                    break
                if not data:
                    continue
                try:
                    payload = json.loads(data)
                    usage = payload.get("usage") or usage
                    pieces = [(int(c.get("index", 0)), (c.get("delta") or {}).get("content") or "",
                               c.get("finish_reason")) for c in payload.get("choices") or []]
                except (ValueError, TypeError, AttributeError) as error:
                    raise ApiError(502, f"upstream {self.base_url} sent a malformed stream", "upstream_error",
                                   code="upstream_malformed") from error
                for index, text, finish in pieces:
                    if not 0 <= index < count or finishes[index] is not None:
                        continue
                    texts[index] += text
                    finishes[index] = None if finish is None else finish if finish in ("stop", "length") else "stop"
                    if text or finish is not None:
                        on_text(index)(text, finishes[index])
                if all(finish is not None or stop.is_set() for finish, stop in zip(finishes, stops)):
                    break
        finally:
            await response.aclose()
        for index, finish in enumerate(finishes):
            if finish is None and not stops[index].is_set():  # the upstream ended without saying why
                finishes[index] = "stop"
                on_text(index)("", "stop")
        per_reply = int(usage.get("completion_tokens", 0)) // max(count, 1)
        return [Generated(text, finish or "abandoned", int(usage.get("prompt_tokens", 0)), per_reply, 0.0)
                for text, finish in zip(texts, finishes)]

    def _body(self, conversation: Conversation, sampling: Sampling, count: int) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": [{"role": m.role, "content": m.content} for m in conversation],
                                "n": count, "temperature": sampling.temperature, "top_p": sampling.top_p,
                                "max_tokens": sampling.max_tokens}
        if self.model:
            body["model"] = self.model
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        return body

    async def _post(self, body: dict[str, Any], stream: bool = False) -> httpx.Response:
        """POST the completion request, trying again on 429/5xx and dropped connections (keel.core.retry). With
        `stream`, the body is left to read (and the caller closes the response)."""
        began = time.monotonic()
        for attempt in itertools.count(1):
            try:
                request = self.client.build_request("POST", "/v1/chat/completions", json=body)
                response = await self.client.send(request, stream=stream)
                if response.status_code not in RETRY_STATUSES:
                    return response
                await response.aclose()
                failure: ApiError = ApiError(502, f"upstream {self.base_url} answered HTTP {response.status_code}",
                                             "upstream_error", code="upstream_status")
                delay = self.retry.delay(attempt, response.headers.get("Retry-After"))
            except httpx.TransportError as error:
                failure = ApiError(502, f"upstream {self.base_url} unreachable: {type(error).__name__}",
                                   "upstream_error", code="upstream_unreachable")
                delay = self.retry.delay(attempt)
            if not self.retry.allows(attempt, time.monotonic() - began, delay):
                raise failure
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _request(self, body: dict[str, Any], count: int) -> list[Generated]:
        response = await self._post(body)
        if response.status_code != 200:
            raise ApiError(502, f"upstream {self.base_url} answered HTTP {response.status_code}", "upstream_error",
                           code="upstream_status")
        try:
            payload = response.json()
            choices = sorted(payload["choices"], key=lambda c: c.get("index", 0))
            usage = payload.get("usage") or {}
            texts = [(c["message"]["content"] or "", c.get("finish_reason") or "stop") for c in choices]
        except (ValueError, KeyError, TypeError) as error:
            raise ApiError(502, f"upstream {self.base_url} sent a malformed chat completion", "upstream_error",
                           code="upstream_malformed") from error
        if len(texts) != count:
            raise ApiError(502, f"upstream {self.base_url} returned {len(texts)} choices, asked for {count}",
                           "upstream_error", code="upstream_malformed")
        per_reply = int(usage.get("completion_tokens", 0)) // max(count, 1)
        return [Generated(text, reason if reason in ("stop", "length") else "stop",
                          int(usage.get("prompt_tokens", 0)), per_reply, 0.0) for text, reason in texts]
