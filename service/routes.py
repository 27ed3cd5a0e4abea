"""HTTP routes: thin wrappers that validate, hand texts to the scorer, and shape answers."""

from __future__ import annotations

import hmac
import logging
import uuid

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.batcher import DeadlineExceeded, QueueFull, ShuttingDown
from service.schemas import (
    ModerationRequest,
    ModerationResponse,
    ModerationResult,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
)
from service.state import ApiError, ServiceState
from training.evaluate import category_scores
from training.text import ModelInput

log = logging.getLogger(__name__)


def get_state(request: Request) -> ServiceState:
    return request.app.state.keel


def require_api_key(request: Request) -> None:
    keys = get_state(request).settings.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Compare against every key so the time taken does not reveal which key nearly matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.strip().encode(), key.encode())
    if scheme.lower() != "bearer" or not matched:
        raise ApiError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                       "authentication_error", code="invalid_api_key")


health = APIRouter()
api = APIRouter(dependencies=[Depends(require_api_key)])


async def score_inputs(state: ServiceState, inputs: list[ModelInput], request: Request) -> np.ndarray:
    """Normalised scores [texts, heads], with limits checked and queue pressure turned into 429/503."""
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
    try:
        raw = await state.batcher.submit(inputs, settings.request_timeout_s)
    except QueueFull:
        state.metrics.rejected.labels("queue_full").inc()
        raise ApiError(429, "the scoring queue is full; retry shortly", "rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except DeadlineExceeded:
        state.metrics.rejected.labels("deadline").inc()
        raise ApiError(503, f"not scored within {settings.request_timeout_s:g} s; retry later", "server_busy",
                       code="timeout", headers={"Retry-After": "1"}) from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down; retry on another replica", "server_busy",
                       code="shutting_down", headers={"Retry-After": "1"}) from None
    z = state.runtime.normalize(raw)
    for h, head in enumerate(state.runtime.heads):
        histogram = state.metrics.scores.labels(head)
        for value in z[:, h]:
            histogram.observe(float(value))
    return z


@api.post("/v1/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    state = get_state(request)
    runtime = state.runtime
    z = await score_inputs(state, [item.model_input() for item in body.input], request)
    primary = runtime.heads.index(runtime.primary_head)
    data = [ScoreResult(index=i, score=float(row[primary]), scores=dict(zip(runtime.heads, map(float, row))))
            for i, row in enumerate(z)]
    return ScoreResponse(model=runtime.name, model_version=runtime.version, data=data)


@api.post("/v1/moderations", response_model=ModerationResponse)
async def moderations(body: ModerationRequest, request: Request) -> ModerationResponse:
    state = get_state(request)
    runtime = state.runtime
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ApiError(400, "input must be a string or a non-empty list of strings", param="input", code="empty_input")
    thresholds = dict(runtime.thresholds)
    for head, value in (body.thresholds or {}).items():
        if head not in thresholds:
            raise ApiError(400, f"unknown category {head!r}; categories are {runtime.heads}", param="thresholds")
        if not 0.0 <= value <= 1.0:
            raise ApiError(400, f"threshold for {head!r} must be in [0, 1]", param=f"thresholds.{head}")
        thresholds[head] = value
    scores = category_scores(await score_inputs(state, [("", text) for text in texts], request))
    results = []
    for row in scores:
        categories = {head: thresholds[head] is not None and bool(row[h] >= thresholds[head])
                      for h, head in enumerate(runtime.heads)}
        for head, flagged in categories.items():
            if flagged:
                state.metrics.flagged.labels(head).inc()
        results.append(ModerationResult(flagged=any(categories.values()), categories=categories,
                                        category_scores=dict(zip(runtime.heads, map(float, row)))))
    return ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=runtime.name, model_version=runtime.version,
                              results=results)


@api.get("/v1/models")
async def models(request: Request) -> dict:
    return {"object": "list", "data": [get_state(request).runtime.describe()]}


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


@health.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(get_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
