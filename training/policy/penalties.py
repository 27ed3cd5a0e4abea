"""Penalties subtracted from the policy's reward, each in [0, 1] per (conversation, reply), weighted in the config
(reward.penalties). A new penalty is one class here plus one PENALTIES entry.

The reward model's harmless head pays for replies that sound careful, which a policy learns to produce whatever
the request (hedging); it does not pay much for refusing real harm, which the base policy rarely does. So:
- harm: 1 when the moderation model flags the reply in its conversation (the reply-level judgment, harm the
  reply gives, not harm the request asks for), from a moderation-model directory or a running `keel serve`;
- evasion: 1 when the reply to an ordinary request (a prompt source not marked `harmful`) refuses or hedges
  (keel.training.evaluation.refusals.is_evasive), so evasion earns nothing where help was asked for;
- unrefused: 1 when the reply to a harmful request does not refuse it (keel.training.evaluation.refusals.is_refusal).
  The harm penalty alone is avoided as well by deflecting ("a complex and multifaceted challenge") as by refusing;
  this one makes the refusal the best reply to harm, as rule-based safety rewards do (Mu et al., 2024), while the
  evasion penalty keeps it from paying on ordinary requests and look-alikes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import numpy as np

from keel.core.text import Conversation, Message, model_input
from keel.training.evaluation.refusals import is_evasive, is_refusal
from keel.training.policy.rewards import KeelService, PenaltyConfig, RewardError

Penalty = Callable[[Sequence[Conversation], Sequence[str], Sequence[bool]], np.ndarray]


class HarmPenalty:
    """1 for a reply the moderation model flags in its conversation, at the model's thresholds."""

    def __init__(self, config: PenaltyConfig, api_key_env: str, transport: httpx.BaseTransport | None = None):
        self.service = KeelService(config.url, api_key_env, transport) if config.url else None
        if self.service is None:
            from keel.core.runtime import ModerationRuntime

            self.runtime = ModerationRuntime(moderation_model_directory(config.model or "default"),
                                             backend=config.backend)

    def __call__(self, conversations: Sequence[Conversation], responses: Sequence[str],
                 harmful: Sequence[bool]) -> np.ndarray:
        replies = [(*c, Message("assistant", r)) for c, r in zip(conversations, responses)]
        if self.service is not None:  # /v1/moderations judges one conversation per request
            flagged = [self.service.request("/v1/moderations", {"messages": [
                {"role": m.role, "content": m.content} for m in reply]})["results"][0]["flagged"]
                for reply in replies]
            return np.array(flagged, dtype=np.float32)
        values = self.runtime.transform(self.runtime.score([model_input(r) for r in replies]))
        return np.asarray(np.any(self.runtime.flagged(values), axis=1), dtype=np.float32)


class EvasionPenalty:
    """1 for a refusing or hedging reply to an ordinary request; 0 on harmful requests, where refusing is right."""

    def __init__(self, config: PenaltyConfig, api_key_env: str, transport: httpx.BaseTransport | None = None):
        pass

    def __call__(self, conversations: Sequence[Conversation], responses: Sequence[str],
                 harmful: Sequence[bool]) -> np.ndarray:
        return np.array([0.0 if bad else float(is_evasive(r)) for r, bad in zip(responses, harmful)],
                        dtype=np.float32)


class UnrefusedPenalty:
    """1 for a reply to a harmful request that does not refuse it; 0 on ordinary requests."""

    def __init__(self, config: PenaltyConfig, api_key_env: str, transport: httpx.BaseTransport | None = None):
        pass

    def __call__(self, conversations: Sequence[Conversation], responses: Sequence[str],
                 harmful: Sequence[bool]) -> np.ndarray:
        return np.array([float(bad and not is_refusal(r)) for r, bad in zip(responses, harmful)], dtype=np.float32)


PENALTIES: dict[str, Callable[[PenaltyConfig, str, httpx.BaseTransport | None], Penalty]] = {
    "harm": HarmPenalty, "evasion": EvasionPenalty, "unrefused": UnrefusedPenalty}


def make_penalty(config: PenaltyConfig, api_key_env: str, transport: httpx.BaseTransport | None = None) -> Penalty:
    if config.kind not in PENALTIES:
        raise RewardError(f"reward.penalties: unknown kind {config.kind!r}; the kinds are {', '.join(PENALTIES)}")
    return PENALTIES[config.kind](config, api_key_env, transport)


def moderation_model_directory(name: str) -> Path:
    """"default" is the default moderation model (trained first when absent, as `keel serve` does)."""
    if name == "default":
        from keel.core.bundled import default_model_dir
        from keel.training.default_models import ensure_default_moderation_model

        return ensure_default_moderation_model(default_model_dir("moderation"))
    return Path(name)
