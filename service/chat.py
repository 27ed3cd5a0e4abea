"""Aligned chat at inference time, independent of HTTP: best-of-n reranking by the reward model and an output
guard, over candidates from the local policy or from an upstream OpenAI-compatible server.

For each requested choice, `best_of` candidates are sampled and scored in context (conversation + reply). The
reward they are ranked by is a weighted sum of the reward model's head z-scores. The guard then takes the
best-ranked candidate the moderation thresholds do not flag; when every candidate is flagged it samples a
fresh set (up to `guard_retries` times, mode "regenerate") and finally answers with a refusal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.generation import Generated, Sampling
from service.metrics import Metrics
from service.schemas import ChoiceAudit, ModerationResult
from training.data import Conversation
from training.evaluate import category_scores
from training.text import Message, ModelInput, model_input

# (conversation, sampling settings for each candidate) -> one generated reply per sampling setting
GenerateFn = Callable[[Conversation, Sequence[Sampling]], Awaitable[list[Generated]]]
ScoreFn = Callable[[list[ModelInput]], Awaitable[np.ndarray]]  # normalised z-scores [texts, heads]


@dataclass
class GuardSettings:
    mode: str = "regenerate"  # off | refuse | regenerate
    retries: int = 1
    refusal: str = "I'm sorry, but I can't help with that."


@dataclass
class Chosen:
    reply: Generated
    audit: ChoiceAudit


def candidate_seed(seed: int | None, choice: int, attempt: int, candidate: int) -> int | None:
    """Distinct, reproducible seeds for every candidate of a seeded request."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}:{choice}:{attempt}:{candidate}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class ChatAligner:
    def __init__(self, generate: GenerateFn, score: ScoreFn, heads: list[str], thresholds: dict[str, float | None],
                 weights: dict[str, float], guard: GuardSettings, metrics: Metrics | None = None):
        unknown = set(weights) - set(heads)
        if unknown:
            raise ValueError(f"chat reward weights name unknown heads {sorted(unknown)}; the heads are {heads}")
        self.generate, self.score, self.heads = generate, score, heads
        self.thresholds = thresholds
        self.weights = np.array([weights.get(h, 0.0) for h in heads], dtype=np.float32)
        self.guard = guard
        self.metrics = metrics

    def moderate(self, z: np.ndarray) -> list[ModerationResult]:
        """The moderation result of each scored reply, with the reward model's thresholds."""
        results = []
        for row in category_scores(z):
            categories = {h: self.thresholds.get(h) is not None and bool(row[i] >= self.thresholds[h])
                          for i, h in enumerate(self.heads)}
            results.append(ModerationResult(flagged=any(categories.values()), categories=categories,
                                            category_scores={h: float(v) for h, v in zip(self.heads, row)}))
        return results

    async def complete(self, conversation: Conversation, sampling: Sampling, n: int, best_of: int) -> list[Chosen]:
        """n chosen replies, each the best of `best_of` candidates that passes the guard."""
        chosen: dict[int, Chosen] = {}
        pending = list(range(n))
        sampled = {choice: 0 for choice in pending}
        attempt = 0
        while pending:
            settings = [Sampling(sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.stop,
                                 candidate_seed(sampling.seed, choice, attempt, j))
                        for choice in pending for j in range(best_of)]
            candidates = await self.generate(conversation, settings)
            z = await self.score([model_input([*conversation, Message("assistant", c.text)]) for c in candidates])
            rewards = z @ self.weights
            moderation = self.moderate(z)
            still_pending = []
            for k, choice in enumerate(pending):
                group = range(k * best_of, (k + 1) * best_of)
                sampled[choice] += best_of
                ranked = sorted(group, key=lambda i: -rewards[i])
                allowed = ranked if self.guard.mode == "off" else [i for i in ranked if not moderation[i].flagged]
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
                chosen[choice] = Chosen(reply, ChoiceAudit(
                    index=choice, reward=float(rewards[pick]), scores=dict(zip(self.heads, map(float, z[pick]))),
                    moderation=moderation[pick], candidates=sampled[choice], rank=ranked.index(pick),
                    guard=action, attempts=attempt + 1))
                if self.metrics:
                    self.metrics.best_of_rank.observe(ranked.index(pick))
                    self.metrics.guard_actions.labels(action).inc()
            pending = still_pending
            attempt += 1
        return [chosen[i] for i in range(n)]
