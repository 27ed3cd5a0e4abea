"""What a running service holds, and the one error type routes raise."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from keel_core.runtime import ModerationRuntime, RewardRuntime
from service.batcher import Batcher
from service.chat import ChatAligner
from service.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:  # upstream.py raises ApiError from this module; the policy runtime needs torch
    from service.generation import PolicyRuntime
    from service.upstream import UpstreamClient


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    runtime: RewardRuntime | None = None
    batcher: Batcher | None = None
    moderation: ModerationRuntime | None = None  # /v1/moderations and the chat guard (--moderation-model)
    moderation_batcher: Batcher | None = None
    policy: PolicyRuntime | None = None  # local generation (--policy)
    generation_batcher: Batcher | None = None
    queues: dict[str, Batcher] = field(default_factory=dict)  # path -> the batcher its requests queue in
    endpoints: frozenset[str] = frozenset()  # the app's route paths: the values of the endpoint metric label
    upstream: UpstreamClient | None = None  # the guard proxy's upstream (--upstream)
    aligner: ChatAligner | None = None  # best-of-n and the guard, over the policy or the upstream
    api_keys: list[str] = field(default_factory=list)  # empty: no key needed
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: bool = False
    draining: bool = False
