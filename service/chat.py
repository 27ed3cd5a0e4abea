"""Aligned chat at inference time, independent of HTTP: best-of-n reranking by the reward model and an output
guard, over candidates from the local policy or from an upstream OpenAI-compatible server.

The guard moderates with the moderation model, on both sides, at thresholds raised by a margin (the backend
applies it: --guard-margin, else the one the model's training chose; a guard asks for more evidence than
/v1/moderations, so that fewer harmless chats are refused). A request whose last user message is flagged is
refused without generating.
Otherwise, for each requested choice, `best_of` candidates are sampled and
scored in context (conversation + reply): the reward they are ranked by is a weighted sum of the reward model's
head z-scores, and the moderation model judges each reply in its conversation. The guard takes the best-ranked
candidate it does not flag; when every candidate is flagged it samples a fresh set (up to `guard_retries`
times, mode "regenerate") and finally answers with a refusal. Mode "off" only records the moderation results.

A streamed reply (best_of == n) cannot be regenerated once text has been sent, so the guard judges it as it grows
(GuardedStream): text reaches the client only after the moderation model has passed it, and a flagged reply ends
with finish_reason "content_filter" and the refusal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from keel.core.runtime import RewardRuntime, Scored
from keel.core.text import Conversation, Message, ModelInput, model_input
from keel.service.metrics import Metrics
from keel.service.sampling import Generated, Sampling
from keel.service.schemas import ChoiceAudit, ModerationResult


class ChatBackend(Protocol):
    """What the aligner asks of the service layer (keel.service.serving.Serving)."""

    @property
    def moderates(self) -> bool:
        """Whether a moderation model is served (the guard needs one)."""

    async def generate(self, conversation: Conversation, samplings: Sequence[Sampling]) -> list[Generated]:
        """One generated reply per sampling setting."""

    async def score(self, inputs: list[ModelInput]) -> Scored[RewardRuntime]:
        """Normalised reward scores and the model version that gave them."""

    async def moderate(self, inputs: list[ModelInput]) -> list[ModerationResult]:
        """Moderation results at the guard's thresholds (the served ones raised by the guard's margin)."""


@dataclass
class GuardSettings:
    mode: str = "regenerate"  # off | refuse | regenerate
    retries: int = 1
    refusal: str = "I'm sorry, but I can't help with that."
    stream_every: int = 16  # tokens between the guard's readings of a streamed reply


# A stream's first readings come early, so that its first text is held for one token, not `stream_every`.
STREAM_FIRST_CHECKS = (1, 2, 4, 8)
# A reading in mid-stream judges the new text after this much of the text already passed (whole windows of it
# would cost more each time as the reply grows); the reading at the end judges the whole reply.
STREAM_OVERLAP_CHARS = 256


@dataclass
class GuardedStream:
    """One streamed choice under the guard: generated text waits in `pending` until a reading passes it."""

    every: int
    released: str = ""
    pending: str = ""
    tokens: int = 0
    next_reading: int = STREAM_FIRST_CHECKS[0]

    def add(self, text: str) -> bool:
        """Take a piece of generated text (about one token); True when the guard should read now."""
        self.pending += text
        self.tokens += 1 if text else 0
        if self.tokens < self.next_reading:
            return False
        later = [n for n in STREAM_FIRST_CHECKS if n > self.tokens]
        self.next_reading = later[0] if later else self.tokens + self.every
        return True

    def release(self) -> str:
        text, self.pending = self.pending, ""
        self.released += text
        return text


def split_prefill(conversation: Conversation) -> tuple[str, Conversation]:
    """A prefilled reply (the conversation ends with the assistant's start) is judged whole, start + continuation:
    the start, and the conversation before it."""
    if conversation[-1].role == "assistant":
        return conversation[-1].content, conversation[:-1]
    return "", conversation


def flagged(result: ModerationResult | None) -> bool:
    return result is not None and result.flagged


@dataclass
class Candidate:
    """A best-of-n candidate as judged: kept for the feedback store's comparison pairs."""

    text: str
    reward: float
    flagged: bool | None
    chosen: bool


@dataclass
class Chosen:
    reply: Generated
    audit: ChoiceAudit
    reward_model: RewardRuntime | None  # the version that scored it (None: the request was refused unscored)
    candidates: list[Candidate] = field(default_factory=list)  # every candidate this choice was picked from


@dataclass
class Judged:
    """Replies scored in context: each one's reward, head scores and moderation result (None: no moderation)."""

    scored: Scored[RewardRuntime]
    rewards: np.ndarray
    moderation: list[ModerationResult | None]

    def audit(self, i: int, index: int, candidates: int, rank: int, guard: str, attempts: int) -> ChoiceAudit:
        scores = dict(zip(self.scored.runtime.heads, map(float, self.scored.values[i])))
        return ChoiceAudit(index=index, reward=float(self.rewards[i]), scores=scores, moderation=self.moderation[i],
                           candidates=candidates, rank=rank, guard=guard, attempts=attempts)


def candidate_seed(seed: int | None, choice: int, attempt: int, candidate: int) -> int | None:
    """Distinct, reproducible seeds for every candidate of a seeded request."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}:{choice}:{attempt}:{candidate}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class ChatAligner:
    def __init__(self, backend: ChatBackend, heads: list[str], weights: dict[str, float], guard: GuardSettings,
                 metrics: Metrics | None = None):
        unknown = set(weights) - set(heads)
        if unknown:
            raise ValueError(f"chat reward weights name unknown heads {sorted(unknown)}; the heads are {heads}")
        if not backend.moderates and guard.mode != "off":
            raise ValueError(f"guard {guard.mode!r} needs a moderation model")
        self.backend = backend
        self.weights = weights
        self.guard = guard
        self.metrics = metrics

    async def judge(self, conversation: Conversation, replies: Sequence[Generated]) -> Judged:
        """Score and moderate replies in context; the heads come from the model version that scored them."""
        start, context = split_prefill(conversation)
        inputs = [model_input([*context, Message("assistant", start + r.text)]) for r in replies]
        scored = await self.backend.score(inputs)
        weights = np.array([self.weights.get(h, 0.0) for h in scored.runtime.heads], dtype=np.float32)
        moderation: list[ModerationResult | None] = [None] * len(replies)
        if self.backend.moderates:
            moderation = list(await self.backend.moderate(inputs))
        return Judged(scored, scored.values @ weights, moderation)

    async def read_stream(self, conversation: Conversation, stream: GuardedStream, whole: bool) -> ModerationResult:
        """The guard's reading of a growing reply in its conversation. In mid-stream it judges the text not yet
        passed twice, on its own and after some of the text that was (mean pooling would let a long passed
        text dilute new harm); with `whole`, a finished reply is also judged whole, as a non-streamed one is."""
        start, context = split_prefill(conversation)
        passed = start + stream.released
        tail = passed[max(0, len(passed) - STREAM_OVERLAP_CHARS):] + stream.pending
        replies = [stream.pending, passed + stream.pending if whole else tail]
        verdicts = await self.backend.moderate([model_input([*context, Message("assistant", reply)])
                                                for reply in replies])
        return next((v for v in verdicts if v.flagged), verdicts[-1])

    async def request_refusals(self, conversation: Conversation, n: int) -> list[Chosen] | None:
        """n refusals if the guard flags the request's last user message; else None."""
        if not self.backend.moderates or self.guard.mode == "off":
            return None
        last_user = next((m.content for m in reversed(conversation) if m.role == "user"), "")
        [verdict] = await self.backend.moderate([("", last_user)])
        if not verdict.flagged:
            return None
        if self.metrics:
            self.metrics.guard_actions.labels("request_refused").inc(n)
        refusal = Generated(self.guard.refusal, "content_filter", 0, 0, 0.0)
        return [Chosen(refusal, ChoiceAudit(index=i, reward=None, scores={}, moderation=verdict, candidates=0,
                                            rank=0, guard="request_refused", attempts=0), None)
                for i in range(n)]

    async def complete(self, conversation: Conversation, sampling: Sampling, n: int, best_of: int) -> list[Chosen]:
        """n chosen replies, each the best of `best_of` candidates that passes the guard."""
        refused = await self.request_refusals(conversation, n)
        if refused is not None:
            return refused
        chosen: dict[int, Chosen] = {}
        pending = list(range(n))
        sampled = {choice: 0 for choice in pending}
        attempt = 0
        while pending:
            settings = [Sampling(sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.stop,
                                 candidate_seed(sampling.seed, choice, attempt, j))
                        for choice in pending for j in range(best_of)]
            candidates = await self.backend.generate(conversation, settings)
            judged = await self.judge(conversation, candidates)
            rewards, moderation = judged.rewards, judged.moderation
            still_pending = []
            for k, choice in enumerate(pending):
                group = range(k * best_of, (k + 1) * best_of)
                sampled[choice] += best_of
                ranked = sorted(group, key=lambda i: -rewards[i])
                # (moderation[i] is never None here: the guard is off whenever there is no moderation model)
                allowed = ranked if self.guard.mode == "off" else [i for i in ranked if not flagged(moderation[i])]
                retry = self.guard.mode == "regenerate" and attempt < self.guard.retries
                if not allowed and retry:
                    still_pending.append(choice)
                    continue
                if allowed:
                    pick, action = allowed[0], ("off" if self.guard.mode == "off" else
                                                "passed" if attempt == 0 else "regenerated")
                    reply = candidates[pick]
                else:  # every candidate flagged, no retries left: refuse
                    pick, action = ranked[0], "refused"
                    reply = Generated(self.guard.refusal, "content_filter", candidates[pick].prompt_tokens,
                                      0, candidates[pick].first_token_seconds)
                audit = judged.audit(pick, choice, sampled[choice], ranked.index(pick), action, attempt + 1)
                verdicts = [None if moderation[i] is None else flagged(moderation[i]) for i in group]
                chosen[choice] = Chosen(reply, audit, judged.scored.runtime,
                                        [Candidate(candidates[i].text, float(rewards[i]), verdict, i == pick and bool(allowed))
                                         for i, verdict in zip(group, verdicts)])
                if self.metrics:
                    self.metrics.best_of_rank.observe(ranked.index(pick))
                    self.metrics.guard_actions.labels(action).inc()
            pending = still_pending
            attempt += 1
        return [chosen[i] for i in range(n)]
