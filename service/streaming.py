"""Chat completions as OpenAI-style objects and server-sent events.

Tokens stream live when nothing has to see the whole reply first: the local policy, one candidate per choice
(best_of 1) and the guard off. Otherwise the replies are chosen and guarded first and then sent as events, so
a client that always streams still works (its first token arrives when the reply is ready).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from keel.core.text import Conversation
from keel.service.batcher import CURRENT_CLIENT
from keel.service.capture import chat_item
from keel.service.chat import Chosen, candidate_seed
from keel.service.errors import ApiError
from keel.service.sampling import Row, Sampling
from keel.service.schemas import AssistantMessage, ChatAudit, ChatChoice, ChatCompletionResponse, Usage
from keel.service.serving import Serving


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def audit_of(serving: Serving, chosen: list[Chosen]) -> ChatAudit:
    policy = serving.policy.name if serving.policy else f"upstream:{serving.settings.upstream}"
    reward_model = next((c.reward_model for c in chosen if c.reward_model is not None), serving.runtime)
    assert reward_model is not None
    return ChatAudit(reward_model=reward_model.name, reward_model_version=reward_model.version,
                     policy=policy, choices=[c.audit for c in chosen])


def capture_chat(serving: Serving, identifier: str, conversation: Conversation, chosen: list[Chosen],
                 audit: ChatAudit) -> None:
    """Record the completion in the feedback store, if one is kept (the record is made only then)."""
    client = CURRENT_CLIENT.get().label
    serving.capture(lambda: chat_item(identifier, conversation, chosen, audit, client))


def completion_response(serving: Serving, chosen: list[Chosen], model: str, conversation: Conversation
                        ) -> ChatCompletionResponse:
    identifier, audit = completion_id(), audit_of(serving, chosen)
    capture_chat(serving, identifier, conversation, chosen, audit)
    return ChatCompletionResponse(
        id=identifier, created=int(time.time()), model=model,
        choices=[ChatChoice(index=i, message=AssistantMessage(content=c.reply.text), finish_reason=c.reply.finish_reason)
                 for i, c in enumerate(chosen)],
        usage=usage_of(chosen), keel=audit)


def usage_of(chosen: list[Chosen]) -> Usage:
    prompt_tokens = chosen[0].reply.prompt_tokens if chosen else 0
    completion_tokens = sum(c.reply.completion_tokens for c in chosen)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def last_chunk(identifier: str, model: str, chosen: list[Chosen], audit: ChatAudit, usage: bool) -> dict[str, Any]:
    """The closing chunk: no choices, Keel's audit, and with stream_options.include_usage the token counts (as
    OpenAI sends them: a final chunk whose `usage` is set)."""
    extra = {"usage": usage_of(chosen).model_dump()} if usage else {}
    return {**chunk(identifier, model, 0, {}), "choices": [], "keel": audit.model_dump(), **extra}


def event(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def chunk(identifier: str, model: str, index: int, delta: dict[str, str], finish: str | None = None,
          **extra: Any) -> dict[str, Any]:
    return {"id": identifier, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}], **extra}


async def chosen_events(serving: Serving, chosen: list[Chosen], model: str, conversation: Conversation,
                        usage: bool = False) -> AsyncIterator[bytes]:
    """Events for replies that are already chosen and guarded."""
    identifier, audit = completion_id(), audit_of(serving, chosen)
    capture_chat(serving, identifier, conversation, chosen, audit)
    for i, choice in enumerate(chosen):
        yield event(chunk(identifier, model, i, {"role": "assistant", "content": ""}))
        if choice.reply.text:
            yield event(chunk(identifier, model, i, {"content": choice.reply.text}))
        yield event(chunk(identifier, model, i, {}, choice.reply.finish_reason))
    yield event(last_chunk(identifier, model, chosen, audit, usage))
    yield event("[DONE]")


async def live_events(serving: Serving, conversation: Conversation, sampling: Sampling, n: int, model: str,
                      arrived: float, usage: bool = False) -> AsyncIterator[bytes]:
    """Events as the policy produces tokens; the replies are scored for the audit once they are complete."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, str, str | None]] = asyncio.Queue()
    identifier = completion_id()

    def on_text(index: int) -> Callable[[str, str | None], None]:
        def from_thread(text: str, finish: str | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (index, text, finish))

        return from_thread

    rows = [Row(conversation, Sampling(sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.stop,
                                       candidate_seed(sampling.seed, i, 0, 0)), on_text(i)) for i in range(n)]
    generation = asyncio.ensure_future(serving.generate_rows(rows))
    try:
        for i in range(n):
            yield event(chunk(identifier, model, i, {"role": "assistant", "content": ""}))
        first, finished = True, 0
        while finished < n:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, generation}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                if generation.exception() is not None:  # failed before producing every reply
                    error = generation.exception()
                    message = error.message if isinstance(error, ApiError) else "generation failed"
                    yield event({"error": {"message": message, "type": "server_error"}})
                    yield event("[DONE]")
                    return
                continue
            index, text, finish = getter.result()
            if text:
                if first:
                    serving.metrics.time_to_first_token.labels("true").observe(time.perf_counter() - arrived)
                    first = False
                yield event(chunk(identifier, model, index, {"content": text}))
            if finish is not None:
                finished += 1
                yield event(chunk(identifier, model, index, {}, finish))
        replies = await generation
    finally:  # the client left mid-stream: its rows stop generating
        if not generation.done():
            generation.cancel()
            await asyncio.gather(generation, return_exceptions=True)
    assert serving.aligner is not None
    judged = await serving.aligner.judge(conversation, replies)
    chosen = [Chosen(reply, judged.audit(i, i, candidates=1, rank=0, guard="off", attempts=1), judged.scored.runtime)
              for i, reply in enumerate(replies)]
    serving.metrics.guard_actions.labels("off").inc(n)
    audit = audit_of(serving, chosen)
    capture_chat(serving, identifier, conversation, chosen, audit)
    yield event(last_chunk(identifier, model, chosen, audit, usage))
    yield event("[DONE]")
