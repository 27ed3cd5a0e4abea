"""Chat completions as OpenAI-style objects and server-sent events.

Tokens stream live when each choice has one candidate (best_of == n), from the local policy or the upstream
server, through the guard when it is on. With best_of > n the candidates must be complete to be ranked, so the
chosen replies are sent as events once chosen and guarded (the first token arrives when the reply is ready).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from keel.core.text import Conversation
from keel.service.batcher import CURRENT_CLIENT
from keel.service.capture import chat_item
from keel.service.chat import Chosen, GuardedStream, candidate_seed, flagged
from keel.service.errors import ApiError
from keel.service.sampling import Generated, Row, Sampling
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


def completion_response(serving: Serving, identifier: str, chosen: list[Chosen], model: str,
                        conversation: Conversation) -> ChatCompletionResponse:
    audit = audit_of(serving, chosen)
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


async def chosen_events(serving: Serving, identifier: str, chosen: list[Chosen], model: str,
                        conversation: Conversation, usage: bool = False) -> AsyncIterator[bytes]:
    """Events for replies that are already chosen and guarded."""
    for i in range(len(chosen)):
        yield event(chunk(identifier, model, i, {"role": "assistant", "content": ""}))
    async for payload in chosen_choices(serving, chosen, model, conversation, usage, identifier):
        yield payload


async def chosen_choices(serving: Serving, chosen: list[Chosen], model: str, conversation: Conversation,
                         usage: bool, identifier: str) -> AsyncIterator[bytes]:
    """Each chosen reply's text and finish, then the closing chunks (after each choice's role chunk)."""
    audit = audit_of(serving, chosen)
    capture_chat(serving, identifier, conversation, chosen, audit)
    for i, choice in enumerate(chosen):
        if choice.reply.text:
            yield event(chunk(identifier, model, i, {"content": choice.reply.text}))
        yield event(chunk(identifier, model, i, {}, choice.reply.finish_reason))
    yield event(last_chunk(identifier, model, chosen, audit, usage))
    yield event("[DONE]")


class LiveChoices:
    """The choices of one live stream: each piece of generated text, through the guard when it is on, becomes
    the events to send."""

    def __init__(self, serving: Serving, conversation: Conversation, n: int, model: str, identifier: str,
                 arrived: float):
        assert serving.aligner is not None
        self.serving, self.aligner, self.conversation = serving, serving.aligner, conversation
        self.model, self.identifier, self.arrived = model, identifier, arrived
        self.guarded = self.aligner.guard.mode != "off"
        self.mode = "guarded_stream" if self.guarded else "stream"
        self.streams = [GuardedStream(self.aligner.guard.stream_every) for _ in range(n)]
        self.stops = [threading.Event() for _ in range(n)]  # one choice's: set when the guard ends it
        self.filtered: set[int] = set()
        self.finished = 0
        self.first = True

    async def piece(self, index: int, text: str, finish: str | None) -> list[bytes]:
        """The events for one piece of choice `index`'s text (and its finish, if it is the last)."""
        stream = self.streams[index]
        if index in self.filtered:
            return []  # ended by the guard; its row stops at the next step
        due = stream.add(text) or finish is not None
        if self.guarded and due:
            verdict = await self.aligner.read_stream(self.conversation, stream, whole=finish is not None)
            if flagged(verdict):
                return self.stop(index)
        events = []
        released = stream.release() if due or not self.guarded else ""
        if released:
            if self.first:
                self.serving.metrics.time_to_first_token.labels(self.mode).observe(time.perf_counter() - self.arrived)
                self.first = False
            events.append(event(chunk(self.identifier, self.model, index, {"content": released})))
        if finish is not None:
            self.finished += 1
            events.append(event(chunk(self.identifier, self.model, index, {}, finish)))
        return events

    def stop(self, index: int) -> list[bytes]:
        """The guard flagged choice `index`: stop its generation, and end it with the refusal."""
        self.stops[index].set()
        self.filtered.add(index)
        self.finished += 1
        self.serving.metrics.guard_actions.labels("stream_stopped").inc()
        return [event(chunk(self.identifier, self.model, index, {"content": self.refusal_after(index)})),
                event(chunk(self.identifier, self.model, index, {}, "content_filter"))]

    def refusal_after(self, index: int) -> str:
        return ("\n\n" if self.streams[index].released else "") + self.aligner.guard.refusal

    async def chosen(self, replies: list[Generated]) -> list[Chosen]:
        """The replies as sent, scored for the audit."""
        replies = [Generated(self.streams[i].released + self.refusal_after(i), "content_filter", r.prompt_tokens,
                             r.completion_tokens, r.first_token_seconds) if i in self.filtered else r
                   for i, r in enumerate(replies)]
        judged = await self.aligner.judge(self.conversation, replies)
        actions = ["stream_stopped" if i in self.filtered else "passed" if self.guarded else "off"
                   for i in range(len(replies))]
        for action in actions:
            if action != "stream_stopped":  # counted when it happened
                self.serving.metrics.guard_actions.labels(action).inc()
        return [Chosen(reply, judged.audit(i, i, candidates=1, rank=0, guard=actions[i], attempts=1),
                       judged.scored.runtime) for i, reply in enumerate(replies)]


async def live_events(serving: Serving, identifier: str, conversation: Conversation, sampling: Sampling, n: int,
                      model: str, arrived: float, usage: bool = False) -> AsyncIterator[bytes]:
    """Events as the policy (or the upstream server) produces tokens, one candidate per choice. Under the guard,
    text is sent only once the moderation model has passed it (GuardedStream), a request it flags is refused
    before any text, and a reply it flags ends with finish_reason "content_filter" and the refusal. The replies
    are scored for the audit once they are complete."""
    assert serving.aligner is not None
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, str, str | None]] = asyncio.Queue()
    choices = LiveChoices(serving, conversation, n, model, identifier, arrived)

    def on_text(index: int) -> Callable[[str, str | None], None]:
        def from_thread(text: str, finish: str | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (index, text, finish))

        return from_thread

    samplings = [Sampling(sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.stop,
                          candidate_seed(sampling.seed, i, 0, 0)) for i in range(n)]
    if serving.upstream is not None:
        generation = asyncio.ensure_future(serving.upstream.stream(conversation, samplings, on_text, choices.stops))
    else:
        generation = asyncio.ensure_future(serving.generate_rows(
            [Row(conversation, s, on_text(i), abandoned=choices.stops[i], mode=choices.mode)
             for i, s in enumerate(samplings)]))
    # The request's own check runs beside the prompt's prefill; no text is sent before it passes.
    refusal_check = asyncio.ensure_future(serving.aligner.request_refusals(conversation, n))
    try:
        for i in range(n):
            yield event(chunk(identifier, model, i, {"role": "assistant", "content": ""}))
        refused = await refusal_check
        if refused is not None:
            async for payload in chosen_choices(serving, refused, model, conversation, usage, identifier):
                yield payload
            return
        while choices.finished < n:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, generation}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                for payload in await choices.piece(*getter.result()):
                    yield payload
                continue
            getter.cancel()
            if generation.exception() is not None:  # failed before producing every reply
                error = generation.exception()
                message = error.message if isinstance(error, ApiError) else "generation failed"
                yield event({"error": {"message": message, "type": "server_error"}})
                yield event("[DONE]")
                return
            if queue.empty():
                break  # every row has finished and its text has been read
        replies = await generation
    finally:  # the client left mid-stream, or the request was refused: its rows stop generating
        refusal_check.cancel()
        if not generation.done():
            for stop in choices.stops:
                stop.set()
            generation.cancel()
            await asyncio.gather(generation, return_exceptions=True)
    chosen = await choices.chosen(replies)
    audit = audit_of(serving, chosen)
    capture_chat(serving, identifier, conversation, chosen, audit)
    yield event(last_chunk(identifier, model, chosen, audit, usage))
    yield event("[DONE]")
