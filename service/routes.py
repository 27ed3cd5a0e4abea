"""HTTP routes: thin wrappers that validate, hand texts to the scorer, and shape answers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response, Security
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from keel_core.runtime import ModelChanged, Scored
from keel_core.text import Message, ModelInput
from service.batcher import CURRENT_CLIENT, Batcher, DeadlineExceeded, QueueFull, ShuttingDown
from service.models import MODERATION, REWARD, describe_versions, reload_model
from service.moderation import moderate
from service.sampling import Generated, Row, Sampling
from service.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    JudgedMessage,
    ModerationRequest,
    ModerationResponse,
    ModerationResult,
    ReloadRequest,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
)
from service.state import ApiError, ServiceState
from service.streaming import chosen_events, completion_response, live_events

log = logging.getLogger(__name__)
T = TypeVar("T")


def get_state(request: Request) -> ServiceState:
    return request.app.state.keel


health = APIRouter()
# The key itself is checked by the request middleware before the body is read; this declares the scheme in the
# OpenAPI document, so generated clients send it.
api = APIRouter(dependencies=[Security(HTTPBearer(auto_error=False, description="an API key from the server's "
                                                  "--api-keys-file (needed only when the server has keys)"))])


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await work, cancelling it if the client disconnects first: its queued texts and generation rows go too."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():  # nobody reads this answer; 499 is what the metrics record
        raise ApiError(499, "the client closed the connection before the answer", code="client_closed")
    return task.result()


def check_limits(state: ServiceState, inputs: list[ModelInput], request: Request) -> None:
    """A request's item count and text sizes, each over the limit named."""
    settings = state.settings
    if len(inputs) > settings.max_items:
        raise ApiError(400, f"{len(inputs)} items in one request; the limit is {settings.max_items}",
                       param="input", code="too_many_items")
    for i, (context, response) in enumerate(inputs):
        if len(context) + len(response) > settings.max_chars:
            raise ApiError(400, f"input {i} has {len(context) + len(response)} characters; the limit is "
                           f"{settings.max_chars}", param=f"input.{i}", code="text_too_long")
    if settings.log_bodies:
        log.info("request %s inputs: %r", request.state.request_id, inputs)


@contextmanager
def queue_errors(state: ServiceState, timeout_s: float, what: str) -> Iterator[None]:
    """A full queue is 429; a missed deadline or a shutdown is 503."""
    try:
        yield
    except QueueFull as full:
        state.metrics.rejected.labels("queue_full").inc()
        raise ApiError(429, f"the {what} queue is full ({full}); retry shortly", "rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except DeadlineExceeded:
        state.metrics.rejected.labels("deadline").inc()
        raise ApiError(503, f"no {what} result within {timeout_s:g} s; retry later", "server_busy",
                       code="timeout", headers={"Retry-After": "1"}) from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down; retry on another replica", "server_busy",
                       code="shutting_down", headers={"Retry-After": "1"}) from None


async def queued(state: ServiceState, batcher: Batcher, items: list, timeout_s: float, what: str) -> Any:
    """Items' results from a batcher, queued as the current request's client."""
    with queue_errors(state, timeout_s, what):
        return await batcher.submit(items, timeout_s, CURRENT_CLIENT.get())


async def batched(state: ServiceState, batcher: Batcher, inputs: list[ModelInput], what: str) -> Scored:
    """Scores [texts, heads], batched with every other request's texts."""
    try:
        return await queued(state, batcher, inputs, state.settings.request_timeout_s, what)
    except ModelChanged:  # a reload landed between this request's batches: score it again, on one model
        return await queued(state, batcher, inputs, state.settings.request_timeout_s, what)


async def scores_for(state: ServiceState, inputs: list[ModelInput]) -> Scored:
    """Normalised reward scores [texts, heads]."""
    scored = await batched(state, state.batcher, inputs, "scoring")
    for h, head in enumerate(scored.runtime.heads):
        histogram = state.metrics.scores.labels(head)
        for value in scored.values[:, h]:
            histogram.observe(float(value))
    return scored


async def moderate_inputs(state: ServiceState, inputs: list[ModelInput],
                          thresholds: dict[str, float] | None = None) -> tuple[Scored, list[ModerationResult]]:
    """Category probabilities and moderation results, at the request's, deployment's or model's thresholds."""
    scored = await batched(state, state.moderation_batcher, inputs, "moderation")
    results = moderate(scored, state.settings.moderation_thresholds, thresholds)
    for result in results:
        for category, flagged in result.categories.items():
            if flagged:
                state.metrics.flagged.labels(category).inc()
    return scored, results


async def submit_generation(state: ServiceState, rows: list[Row]) -> list[Generated]:
    """Generate rows. The replies are returned as soon as these rows finish, not when their batch does (it may
    hold another request's longer rows). If the request goes (client gone, deadline passed, failure), its rows
    stop generating."""
    loop = asyncio.get_running_loop()
    abandoned = threading.Event()
    replies = [loop.create_future() for _ in rows]

    def deliver(reply: asyncio.Future) -> Callable[[Generated], None]:  # called from the generation thread
        return lambda generated: loop.call_soon_threadsafe(lambda: reply.done() or reply.set_result(generated))

    rows = [replace(row, abandoned=abandoned, on_finish=deliver(reply)) for row, reply in zip(rows, replies)]
    batch = asyncio.ensure_future(queued(state, state.generation_batcher, rows, state.settings.generation_timeout_s,
                                         "generation"))
    every_reply = asyncio.gather(*replies)
    try:
        await asyncio.wait({batch, every_reply}, return_when=asyncio.FIRST_COMPLETED)
        return every_reply.result() if every_reply.done() else batch.result()  # the batch's error, if any
    finally:
        abandoned.set()  # no effect on finished rows; stops the others
        for waiter in (batch, every_reply):
            waiter.cancel()
        await asyncio.gather(batch, every_reply, return_exceptions=True)


@api.post("/v1/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    state = get_state(request)
    inputs = [item.model_input() for item in body.input]
    check_limits(state, inputs, request)
    scored = await unless_client_leaves(request, scores_for(state, inputs))
    runtime, z = scored.runtime, scored.values
    primary = runtime.heads.index(runtime.primary_head)
    data = [ScoreResult(index=i, score=float(row[primary]), scores=dict(zip(runtime.heads, map(float, row))))
            for i, row in enumerate(z)]
    return ScoreResponse(model=runtime.name, model_version=runtime.version, data=data)


@api.post("/v1/moderations", response_model=ModerationResponse)
async def moderations(body: ModerationRequest, request: Request) -> ModerationResponse:
    state = get_state(request)
    if state.moderation is None:
        raise ApiError(404, "moderation is not served here: start `keel serve` with --moderation-model DIR (or "
                       "without --moderation-model none)", code="moderation_not_enabled")
    inputs = body.model_inputs()
    if not inputs:
        raise ApiError(400, "input must be a string, a non-empty list of strings, or a list of text parts",
                       param="input", code="empty_input")
    categories = state.moderation.categories  # a reload never changes the categories
    for category in body.thresholds or {}:
        if category not in categories:
            raise ApiError(400, f"unknown category {category!r}; categories are {list(categories)}",
                           param="thresholds", code="unknown_category")
    check_limits(state, inputs, request)
    scored, results = await unless_client_leaves(request, moderate_inputs(state, inputs, body.thresholds))
    judged = None
    if body.messages is not None:
        last = len(body.messages) - 1
        judged = JudgedMessage(index=last, role=body.messages[last].role,
                               in_context=body.messages[last].role == "assistant")
    return ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=scored.runtime.name,
                              model_version=scored.runtime.version, results=results, judged=judged)


@api.get("/v1/models")
async def models(request: Request) -> dict:
    state = get_state(request)
    policies = [state.policy.describe()] if state.policy else []
    return {"object": "list", "data": [*describe_versions(state), *policies]}


@api.post("/v1/admin/reload")
async def reload(request: Request, body: ReloadRequest | None = None) -> dict:
    """Switch to another model version (default: the store's CURRENT, else newest) without a restart."""
    state = get_state(request)
    body = body or ReloadRequest()
    runtime = await reload_model(state, body.version, MODERATION if body.model == "moderation" else REWARD)
    return {"object": "reload", "model": runtime.name, "model_version": runtime.version}


@health.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@health.get("/readyz")
async def readyz(request: Request) -> Response:
    state = get_state(request)
    if state.ready and not state.draining:
        return Response('{"status":"ready"}', media_type="application/json")
    reason = "draining" if state.draining else "loading"
    return Response(f'{{"status":"{reason}"}}', status_code=503, media_type="application/json")


@health.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(get_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@api.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = get_state(request)
    settings = state.settings
    if state.aligner is None:
        raise ApiError(404, "chat completions are not served here: start `keel serve` with --policy DIR or "
                       "--upstream URL", code="chat_not_enabled")
    max_tokens = (body.max_completion_tokens or body.max_tokens
                  or min(settings.default_max_tokens, settings.max_tokens_limit))
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {settings.max_tokens_limit}",
                       param="max_tokens", code="max_tokens_too_large")
    best_of = body.best_of or settings.best_of
    if body.n * best_of > settings.max_client_queue_rows:
        raise ApiError(400, f"n * best_of = {body.n * best_of} candidates; the limit is "
                       f"{settings.max_client_queue_rows}", param="best_of", code="too_many_candidates")
    if body.n * best_of * max_tokens > settings.max_request_tokens:
        raise ApiError(400, f"n * best_of * max_tokens = {body.n * best_of * max_tokens} tokens; the limit is "
                       f"{settings.max_request_tokens}: ask for fewer choices, candidates or tokens",
                       param="max_tokens", code="request_too_costly")
    characters = sum(len(m.content) for m in body.messages)
    if characters > settings.max_chars:
        raise ApiError(400, f"messages hold {characters} characters; the limit is {settings.max_chars}",
                       param="messages", code="text_too_long")
    if settings.log_bodies:
        log.info("request %s messages: %r", request.state.request_id, body.messages)
    conversation = tuple(Message(m.role, m.content) for m in body.messages)
    sampling = Sampling(body.temperature, body.top_p, max_tokens, body.stops(), body.seed)
    model = state.policy.name if state.policy else (settings.upstream_model or "upstream")
    arrived = time.perf_counter()
    live = state.policy is not None and best_of == 1 and settings.guard == "off"
    if body.stream and live:
        with queue_errors(state, settings.generation_timeout_s, "generation"):  # answer before the stream starts
            state.generation_batcher.check_room(body.n, CURRENT_CLIENT.get())
        return StreamingResponse(live_events(state, conversation, sampling, body.n, model, arrived,
                                             lambda rows: submit_generation(state, rows)),
                                 media_type="text/event-stream")
    chosen = await unless_client_leaves(request, state.aligner.complete(conversation, sampling, body.n, best_of))
    state.metrics.time_to_first_token.labels(str(body.stream).lower()).observe(time.perf_counter() - arrived)
    if body.stream:
        return StreamingResponse(chosen_events(state, chosen, model), media_type="text/event-stream")
    return completion_response(state, chosen, model)
