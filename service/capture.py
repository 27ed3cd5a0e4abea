"""What the feedback store records of a served response (keel.service.feedback.ServedItem): the input, the output,
the model versions, the scores, the guard's verdicts and every best-of-n candidate."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial

import numpy as np
from tqdm.auto import tqdm

from keel.core.runtime import ModerationRuntime, RewardRuntime, Scored
from keel.core.text import Conversation, Message, ModelInput, model_input
from keel.service.chat import Chosen, split_prefill
from keel.service.feedback import FeedbackStore, ServedItem
from keel.service.schemas import ChatAudit, ModerationResponse


def moderation_item(response: ModerationResponse, inputs: list[ModelInput], scored: Scored[ModerationRuntime],
                    client: str | None) -> ServedItem:
    texts = [{"context": context, "text": text} for context, text in inputs]
    return ServedItem(
        id=response.id, kind="moderation", client=client, input={"texts": texts},
        output={"results": [result.model_dump() for result in response.results]},
        models={"moderation": {"name": scored.runtime.name, "version": scored.runtime.version}},
        scores={"thresholds": {c: scored.runtime.thresholds.get(c) for c in scored.runtime.heads}},
        uncertainty=moderation_uncertainty(response, scored))


def chat_item(identifier: str, conversation: Conversation, chosen: list[Chosen], audit: ChatAudit,
              client: str | None) -> ServedItem:
    return ServedItem(
        id=identifier, kind="chat", client=client,
        input={"messages": [{"role": m.role, "content": m.content} for m in conversation]},
        output={"replies": [c.reply.text for c in chosen]},
        models={"reward": {"name": audit.reward_model, "version": audit.reward_model_version},
                "policy": audit.policy},
        scores={"choices": [choice.model_dump() for choice in audit.choices]},
        candidates=[{"choice": i, "text": candidate.text, "reward": candidate.reward, "flagged": candidate.flagged,
                     "chosen": candidate.chosen} for i, c in enumerate(chosen) for candidate in c.candidates],
        uncertainty=reward_uncertainty(chosen))


def moderation_uncertainty(response: ModerationResponse, scored: Scored[ModerationRuntime]) -> float:
    """The queue's uncertainty of a served moderation response, by the model version that served it."""
    return threshold_uncertainty([result.category_scores for result in response.results], scored.runtime.thresholds)


def threshold_uncertainty(category_scores: Iterable[Mapping[str, float]], thresholds: Mapping[str, float | None]
                          ) -> float:
    """1 - the smallest distance of a category probability from its threshold, over the results of a response:
    near 1 when a verdict was close."""
    distances = [abs(scores[c] - t) for scores in category_scores for c, t in thresholds.items() if t is not None]
    return 1.0 - min(distances, default=1.0)


def reward_uncertainty(chosen: list[Chosen]) -> float:
    return margin_uncertainty([c.reward for c in chosen[0].candidates] if chosen else [])


def margin_uncertainty(rewards: Iterable[float]) -> float:
    """1 / (1 + the reward margin between the two best candidates of the first choice): near 1 when the reward
    model could hardly tell them apart; 0 without two candidates."""
    best = sorted(rewards, reverse=True)
    return 1.0 / (1.0 + best[0] - best[1]) if len(best) >= 2 else 0.0


def rescore(store: FeedbackStore, runtime: ModerationRuntime | RewardRuntime, newest: int | None = None,
            weights: Mapping[str, float] | None = None, batch: int = 256, progress: bool = True) -> int:
    """Re-score recorded responses with another model version (a retrained one) and replace their queue
    uncertainty, so that the labelling queue asks about what the new model finds hard rather than what the
    served one did; returns how many responses were read. A moderation model re-scores moderation responses; a
    reward model the best-of-n candidates of chat completions, ranked by `weights` of its heads (default: the
    primary head, as `keel serve --chat-reward-weights`). What was served, its scores and model versions stay."""
    rescored: Callable[[Sequence[str]], dict[str, float]]
    if isinstance(runtime, ModerationRuntime):
        kind, rescored = "moderation", partial(moderation_rescored, store, runtime=runtime)
    else:
        kind = "chat"
        rescored = partial(chat_rescored, store, runtime=runtime, weights=weights or {runtime.primary_head: 1.0})
    ids = store.served_ids(kind, newest)
    for start in tqdm(range(0, len(ids), batch), desc="rescore", unit="batch", disable=not progress):
        store.set_uncertainty(rescored(ids[start:start + batch]))
    return len(ids)


def moderation_rescored(store: FeedbackStore, ids: Sequence[str], runtime: ModerationRuntime) -> dict[str, float]:
    texts = {i: [(t.get("context", ""), t["text"]) for t in value["texts"]] for i, value in store.inputs_of(ids).items()}
    values = iter(runtime.scored([text for group in texts.values() for text in group]).values)
    return {item_id: threshold_uncertainty([dict(zip(runtime.categories, map(float, next(values)))) for _ in group],
                                           runtime.thresholds)
            for item_id, group in texts.items()}


def chat_rescored(store: FeedbackStore, ids: Sequence[str], runtime: RewardRuntime, weights: Mapping[str, float]
                  ) -> dict[str, float]:
    """The reward margin between the two best candidates of each completion's first choice, as served (the
    prefilled start of a reply is judged with it); completions with fewer than two candidates are left alone."""
    head_weights = np.array([weights.get(h, 0.0) for h in runtime.heads], dtype=np.float32)
    groups: dict[str, list[ModelInput]] = {}
    candidates = store.candidates_of_items(ids)
    for item_id, value in store.inputs_of(ids).items():
        replies = [c.text for c in candidates.get(item_id, []) if c.choice == 0]
        if len(replies) >= 2:
            prefill, context = split_prefill(tuple(Message(m["role"], m["content"]) for m in value["messages"]))
            groups[item_id] = [model_input([*context, Message("assistant", prefill + r)]) for r in replies]
    if not groups:
        return {}
    rewards = iter(runtime.scored([text for group in groups.values() for text in group]).values @ head_weights)
    return {item_id: margin_uncertainty([float(next(rewards)) for _ in group]) for item_id, group in groups.items()}
