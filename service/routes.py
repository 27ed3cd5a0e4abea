"""HTTP routes: each parses its request, calls the service layer (keel.service.serving.Serving) and shapes the
answer; nothing else."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response, Security
from fastapi.responses import HTMLResponse, StreamingResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from keel.service.batcher import CURRENT_CLIENT
from keel.service.capture import moderation_item
from keel.service.errors import ApiError
from keel.service.models import MODERATION, REWARD
from keel.service.sampling import Sampling
from keel.service.schemas import (
    LABEL_TASKS,
    ChatCompletionRequest,
    ChatCompletionResponse,
    FeedbackRequest,
    FeedbackResponse,
    JudgedMessage,
    LabelAnswer,
    ModerationRequest,
    ModerationResponse,
    ReloadRequest,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    TokenUsage,
    check_input_limits,
)
from keel.service.serving import CHAT_PATH, Serving
from keel.service.streaming import chosen_events, completion_id, completion_response, live_events

log = logging.getLogger(__name__)
T = TypeVar("T")
LABEL_PAGE = Path(__file__).resolve().parent / "label.html"


def get_serving(request: Request) -> Serving:
    serving: Serving = request.app.state.keel
    return serving


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


def log_bodies(serving: Serving, request: Request, what: object) -> None:
    """--log-bodies (off by default: request text stays out of the logs) logs what a request asked."""
    if serving.settings.log_bodies:
        log.info("request %s: %r", request.state.request_id, what)


@api.post("/v1/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    serving = get_serving(request)
    inputs = [item.model_input() for item in body.input]
    check_input_limits(inputs, serving.settings)
    log_bodies(serving, request, inputs)
    scored = await unless_client_leaves(request, serving.score(inputs))
    runtime, z = scored.runtime, scored.values
    primary = runtime.heads.index(runtime.primary_head)
    truncated = scored.truncated if scored.truncated is not None else [False] * len(z)
    data = [ScoreResult(index=i, score=float(row[primary]), scores=dict(zip(runtime.heads, map(float, row))),
                        truncated=bool(cut)) for i, (row, cut) in enumerate(zip(z, truncated))]
    return ScoreResponse(model=runtime.name, model_version=runtime.version, data=data,
                         usage=TokenUsage.of(scored.tokens))


@api.post("/v1/moderations", response_model=ModerationResponse)
async def moderations(body: ModerationRequest, request: Request, response: Response) -> ModerationResponse:
    serving = get_serving(request)
    if serving.moderation is None:
        raise ApiError(404, "moderation is not served here: start `keel serve` with --moderation-model DIR (or "
                       "without --moderation-model none)", code="moderation_not_enabled")
    inputs = body.model_inputs()
    if not inputs:
        raise ApiError(400, "input must be a string, a non-empty list of strings, or a list of text parts",
                       param="input", code="empty_input")
    categories = serving.moderation.categories  # a reload never changes the categories
    for category in body.thresholds or {}:
        if category not in categories:
            raise ApiError(400, f"unknown category {category!r}; categories are {list(categories)}",
                           param="thresholds", code="unknown_category")
    check_input_limits(inputs, serving.settings)
    log_bodies(serving, request, inputs)
    scored, results = await unless_client_leaves(request, serving.moderations(inputs, body.thresholds))
    judged = None
    if body.messages is not None:
        last = len(body.messages) - 1
        judged = JudgedMessage(index=last, role=body.messages[last].role,
                               in_context=body.messages[last].role == "assistant")
    moderated = ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=scored.runtime.name,
                                   model_version=scored.runtime.version, results=results, judged=judged,
                                   usage=TokenUsage.of(scored.tokens))
    client = CURRENT_CLIENT.get().label
    serving.capture(lambda: moderation_item(moderated, inputs, scored, client))
    response.headers.update(serving.feedback_headers(moderated.id))
    return moderated


@api.post("/v1/feedback", response_model=FeedbackResponse, status_code=201)
async def feedback(body: FeedbackRequest, request: Request) -> FeedbackResponse:
    """Feedback on a response Keel returned (docs/feedback.md)."""
    serving = get_serving(request)
    return FeedbackResponse(id=await serving.give_feedback(body, CURRENT_CLIENT.get(), serving.keys_on))


@api.get("/v1/feedback/stats")
async def feedback_stats(request: Request) -> dict[str, Any]:
    """Counts, agreement between annotators, ties and gold accuracy, for annotator and admin keys."""
    return await get_serving(request).feedback_stats(CURRENT_CLIENT.get())


@health.get("/label", response_class=HTMLResponse, include_in_schema=False)
async def label_page() -> HTMLResponse:
    """The labelling page: one HTML file with its script and style inside (no CDN, no build step). It asks for
    an annotator key and talks to /v1/label/* with it."""
    nonce = secrets.token_urlsafe(16)  # only the page's own script runs, whatever text it shows
    return HTMLResponse(LABEL_PAGE.read_text().replace("{{nonce}}", nonce), headers={
        "Content-Security-Policy": f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})


@api.get("/v1/label/next")
async def label_next(request: Request, task: str = "moderation") -> dict[str, Any]:
    if task not in LABEL_TASKS:
        raise ApiError(400, f"task must be one of {', '.join(LABEL_TASKS)}", param="task")
    return await get_serving(request).label_next(CURRENT_CLIENT.get(), task)


@api.post("/v1/label/answers", response_model=FeedbackResponse, status_code=201)
async def label_answer(body: LabelAnswer, request: Request) -> FeedbackResponse:
    return FeedbackResponse(id=await get_serving(request).label_answer(CURRENT_CLIENT.get(), body))


@api.delete("/v1/label/answers/{answer_id}", status_code=204)
async def label_undo(answer_id: str, request: Request) -> Response:
    await get_serving(request).label_undo(CURRENT_CLIENT.get(), answer_id)
    return Response(status_code=204)


@api.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": get_serving(request).describe_models()}


@api.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict[str, Any]:
    found = next((m for m in get_serving(request).describe_models() if m["id"] == model_id), None)
    if found is None:
        raise ApiError(404, f"the model {model_id!r} does not exist here; GET /v1/models lists them",
                       param="model", code="model_not_found")
    return found


@api.post("/v1/admin/reload")
async def reload(request: Request, body: ReloadRequest | None = None) -> dict[str, Any]:
    """Switch to another model version (default: the store's CURRENT, else newest) without a restart."""
    body = body or ReloadRequest()
    runtime = await get_serving(request).reload(MODERATION if body.model == "moderation" else REWARD, body.version)
    return {"object": "reload", "model": runtime.name, "model_version": runtime.version}


@health.get("/healthz")
@health.get("/health")  # TEI's and vLLM's name
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@health.get("/readyz")
async def readyz(request: Request) -> Response:
    serving = get_serving(request)
    if serving.ready and not serving.draining:
        return Response('{"status":"ready"}', media_type="application/json")
    reason = "draining" if serving.draining else "loading"
    return Response(f'{{"status":"{reason}"}}', status_code=503, media_type="application/json")


@health.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(get_serving(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@api.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response) -> Any:
    serving = get_serving(request)
    settings = serving.settings
    if serving.aligner is None:
        raise ApiError(404, "chat completions are not served here: start `keel serve` with --policy DIR or "
                       "--upstream URL", code="chat_not_enabled")
    max_tokens, best_of = body.within_limits(settings)
    log_bodies(serving, request, body.messages)
    conversation = body.conversation()
    sampling = Sampling(body.temperature, body.top_p, max_tokens, body.stops(), body.seed)
    model = serving.chat_model(body.model)
    usage = body.stream_options is not None and body.stream_options.include_usage
    arrived = time.perf_counter()
    identifier = completion_id()
    headers = serving.feedback_headers(identifier)
    if body.stream and best_of == 1:  # tokens as generated (and as the guard passes them)
        serving.admit(CHAT_PATH, CURRENT_CLIENT.get(), body.n)  # answer before the stream starts
        return StreamingResponse(live_events(serving, identifier, conversation, sampling, body.n, model, arrived,
                                             usage), media_type="text/event-stream", headers=headers)
    chosen = await unless_client_leaves(request, serving.aligner.complete(conversation, sampling, body.n, best_of))
    serving.metrics.time_to_first_token.labels("whole").observe(time.perf_counter() - arrived)
    if body.stream:
        return StreamingResponse(chosen_events(serving, identifier, chosen, model, conversation, usage),
                                 media_type="text/event-stream", headers=headers)
    response.headers.update(headers)
    return completion_response(serving, identifier, chosen, model, conversation)
