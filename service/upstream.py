"""Candidates from an upstream OpenAI-compatible server (vLLM, TGI, a hosted API, another Keel) for the guard
proxy: Keel asks it for the candidates, then reranks and guards them itself."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from itertools import groupby
from typing import Any

import httpx

from keel.core.retry import RETRY_STATUSES, RetryPolicy
from keel.core.text import Conversation
from keel.service.errors import ApiError
from keel.service.sampling import Generated, Sampling


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
            first, count = group[0], len(group)
            body = {"messages": [{"role": m.role, "content": m.content} for m in conversation], "n": count,
                    "temperature": first.temperature, "top_p": first.top_p, "max_tokens": first.max_tokens}
            if self.model:
                body["model"] = self.model
            if first.stop:
                body["stop"] = list(first.stop)
            if first.seed is not None:
                body["seed"] = first.seed
            replies += await self._request(body, count)
        return replies

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        """POST the completion request, trying again on 429/5xx and dropped connections (keel.core.retry)."""
        began = time.monotonic()
        for attempt in itertools.count(1):
            try:
                response = await self.client.post("/v1/chat/completions", json=body)
                if response.status_code not in RETRY_STATUSES:
                    return response
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
