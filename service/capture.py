"""What the feedback store records of a served response (keel.service.feedback.ServedItem): the input, the output,
the model versions, the scores, the guard's verdicts and every best-of-n candidate."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tqdm.auto import tqdm

from keel.core.runtime import ModerationRuntime, Scored
from keel.core.text import Conversation, ModelInput
from keel.service.chat import Chosen
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
    """1 / (1 + the reward margin between the two best candidates of the first choice): near 1 when the reward
    model could hardly tell them apart; 0 without two candidates."""
    rewards = sorted((c.reward for c in chosen[0].candidates), reverse=True) if chosen else []
    return 1.0 / (1.0 + rewards[0] - rewards[1]) if len(rewards) >= 2 else 0.0


def rescore(store: FeedbackStore, runtime: ModerationRuntime, newest: int | None = None, batch: int = 256,
            progress: bool = True) -> int:
    """Re-score recorded moderation responses with another model version (a retrained one) and replace their
    queue uncertainty, so that the labelling queue asks about what the new model finds hard rather than what
    the served one did; returns how many. The served output, scores and model versions stay as served."""
    ids = store.served_ids("moderation", newest)
    for start in tqdm(range(0, len(ids), batch), desc="rescore", unit="batch", disable=not progress):
        inputs = store.inputs_of(ids[start:start + batch])
        texts = {i: [(t.get("context", ""), t["text"]) for t in value["texts"]] for i, value in inputs.items()}
        values = runtime.scored([text for group in texts.values() for text in group]).values
        rows, uncertainty = iter(values), {}
        for item_id, group in texts.items():
            scores = [dict(zip(runtime.categories, map(float, next(rows)))) for _ in group]
            uncertainty[item_id] = threshold_uncertainty(scores, runtime.thresholds)
        store.set_uncertainty(uncertainty)
    return len(ids)
