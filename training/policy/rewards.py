"""Rewards for policy training: normalised reward-model heads, weighted and summed, from a Keel reward-model
directory (scored in-process) or from a running Keel service over HTTP, minus penalties (harm as the moderation
model judges it, evasion, unrefused harm: training/policy/penalties.py).

    r(x, y) = clip(sum_h w_h * z_h(x, y), -clip, clip) - sum_p lambda_p * penalty_p(x, y)
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np

from keel.core.artifact import KeelError
from keel.core.retry import RETRY_STATUSES, RetryPolicy
from keel.core.text import Conversation, Message, model_input


@dataclasses.dataclass
class PenaltyConfig:
    """A penalty subtracted from the reward: weight * penalty(x, y), a penalty in [0, 1]."""

    kind: str  # an entry of keel.training.policy.penalties.PENALTIES: harm | evasion | unrefused
    weight: float = 1.0
    model: str | None = "default"  # harm: a moderation-model directory ("default": the default moderation model)
    url: str | None = None  # harm: a running Keel service's base URL (its /v1/moderations), instead of model
    backend: str = "auto"  # harm: the moderation model's backend, in-process


@dataclasses.dataclass
class RewardSourceConfig:
    """Where rewards come from: a Keel reward-model directory, or a running Keel service."""

    model: str | None = "default"  # model directory; "default": the default reward model (trained if absent)
    url: str | None = None  # a Keel service base URL (used instead of model), e.g. http://localhost:8000
    api_key_env: str = "KEEL_API_KEY"  # environment variable holding the service's API key, if it needs one
    backend: str = "auto"  # auto | onnx-int8 | onnx | torch, for a model directory (auto: as `keel serve` picks)
    heads: dict[str, float] = dataclasses.field(default_factory=lambda: {"harmless": 1.0})  # weights of z-scores
    clip: float = 5.0  # rewards are clipped to [-clip, clip] after weighting
    penalties: list[PenaltyConfig] = dataclasses.field(default_factory=list)  # subtracted after clipping


class RewardError(KeelError, RuntimeError):
    pass


def reward_model_directory(name: str) -> Path:
    """"default" is the default reward model (trained first when absent, as `keel serve` does)."""
    if name == "default":
        from keel.core.bundled import default_model_dir
        from keel.training.default_models import ensure_default_model

        return ensure_default_model(default_model_dir())
    return Path(name)


class TooManyItems(RewardError):
    """The reward service refused a request for its item count (its --max-items is lower)."""


class KeelService:
    """A running Keel service, asked over HTTP with the API key from an environment variable; 429/5xx and dropped
    connections are tried again (keel.core.retry): a busy server slows training, not stops it."""

    def __init__(self, url: str, api_key_env: str, transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self.api_key_env = api_key_env
        self.http = httpx.Client(timeout=60, transport=transport)  # transport: tests put a fake server there
        self.retry = RetryPolicy()

    def request(self, path: str, body: dict | None = None) -> dict:
        """GET (no body) or POST JSON; the answer's JSON object."""
        headers = {}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        began = time.monotonic()
        for attempt in itertools.count(1):
            try:
                response = (self.http.post(self.url + path, json=body, headers=headers) if body is not None
                            else self.http.get(self.url + path, headers=headers))
                if response.status_code not in RETRY_STATUSES:
                    break
                failure = RewardError(f"reward service {self.url}{path}: HTTP {response.status_code}: "
                                      f"{response.text[:500]}")
                delay = self.retry.delay(attempt, response.headers.get("Retry-After"))
            except httpx.TransportError as error:
                failure = RewardError(f"reward service {self.url} unreachable: {error}; start it with `keel serve` "
                                      "or set reward.url")
                delay = self.retry.delay(attempt)
            if not self.retry.allows(attempt, time.monotonic() - began, delay):
                raise failure
            time.sleep(delay)
        if response.status_code == 400 and '"too_many_items"' in response.text:
            raise TooManyItems(response.text[:500])
        if response.status_code != 200:
            raise RewardError(f"reward service {self.url}{path}: HTTP {response.status_code}: {response.text[:500]}")
        return dict(response.json())


@dataclasses.dataclass
class Rewards:
    """What the reward function gives each (conversation, response)."""

    total: np.ndarray  # [N]: the reward optimised, heads weighted and clipped, penalties subtracted
    heads: np.ndarray  # [N]: the reward-model heads alone, weighted and clipped (before penalties)
    head_z: np.ndarray  # [N, heads]: each reward-model head's z-score
    penalties: dict[str, np.ndarray]  # kind -> [N] in [0, 1], before its weight


class RewardFunction:
    """Maps (conversation, response) to per-head z-scores [N, heads], penalties, and the reward [N]."""

    def __init__(self, config: RewardSourceConfig, transport: httpx.BaseTransport | None = None):
        from keel.training.policy.penalties import make_penalty

        self.config = config
        self.chunk = 256  # items per scoring request: the server's default --max-items, halved if it has fewer
        self.service = KeelService(config.url, config.api_key_env, transport) if config.url else None
        if self.service is not None:
            self.heads = list(self.service.request("/v1/models")["data"][0]["heads"])
            self.runtime = None
        else:
            from keel.core.runtime import RewardRuntime

            self.runtime = RewardRuntime(reward_model_directory(config.model or "default"), backend=config.backend)
            self.heads = self.runtime.heads
        self.check_weights(config.heads)
        self.penalties = [(p, make_penalty(p, config.api_key_env, transport)) for p in config.penalties]

    def check_weights(self, weights: dict[str, float]) -> None:
        unknown = set(weights) - set(self.heads)
        if unknown:
            raise RewardError(f"reward heads {sorted(unknown)} are not in the reward model (it has {self.heads})")

    def head_scores(self, conversations: Sequence[Conversation], responses: Sequence[str]) -> np.ndarray:
        conversations = [(*c, Message("assistant", r)) for c, r in zip(conversations, responses)]
        if self.runtime is not None:
            return self.runtime.transform(self.runtime.score([model_input(c) for c in conversations]))
        return self._score_over_http(conversations)

    def __call__(self, conversations: Sequence[Conversation], responses: Sequence[str],
                 weights: Sequence[dict[str, float] | None] | None = None,
                 harmful: Sequence[bool] | None = None) -> Rewards:
        """Each item may carry its own head weights, and whether its prompt is a harmful request (penalties
        that apply to ordinary requests only, such as evasion, skip those)."""
        z = self.head_scores(conversations, responses)
        weights = weights or [None] * len(responses)
        harmful = harmful or [False] * len(responses)
        matrix = np.array([[(w or self.config.heads).get(h, 0.0) for h in self.heads] for w in weights])
        heads = np.clip((z * matrix).sum(axis=1), -self.config.clip, self.config.clip)
        total, penalties = heads, {}
        for config, penalty in self.penalties:
            penalties[config.kind] = penalty(conversations, responses, harmful)
            total = total - config.weight * penalties[config.kind]
        return Rewards(total, heads, z, penalties)

    def _score_over_http(self, conversations: list[tuple[Message, ...]]) -> np.ndarray:
        """Scores in requests of at most `self.chunk` items: the server's --max-items, learnt from its 400
        (too_many_items) by halving, so a server with a lower limit is still served."""
        assert self.service is not None
        rows: list[list[float]] = []
        start = 0
        while start < len(conversations):
            items = [{"messages": [{"role": m.role, "content": m.content} for m in c]}
                     for c in conversations[start : start + self.chunk]]
            try:
                data = self.service.request("/v1/score", {"input": items})["data"]
            except TooManyItems:
                if self.chunk == 1:
                    raise
                self.chunk = max(1, len(items) // 2)
                continue
            rows.extend([item["scores"][h] for h in self.heads] for item in sorted(data, key=lambda d: d["index"]))
            start += len(items)
        return np.array(rows, dtype=np.float32)
