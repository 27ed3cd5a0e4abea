"""The FastAPI application: lifespan (load, warm up, drain), request middleware, error shapes."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Gauge
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel_core.runtime import Scored
from keel_core.text import ModelInput
from service import routes
from service.batcher import CURRENT_CLIENT, Batcher, Client, QueueMetrics
from service.chat import ChatAligner, GuardSettings
from service.logs import BurstLog
from service.metrics import Metrics
from service.models import MODERATION, REWARD, SERVED, Served, load_runtime, model_directory, reload_model
from service.sampling import Row
from service.schemas import ErrorResponse, ModerationResult
from service.settings import Settings
from service.state import ApiError, ServiceState
from service.upstream import UpstreamClient

log = logging.getLogger("keel.service")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyTooLarge(Exception):
    pass


PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                          "/redoc"})


def authenticate(keys: list[str], headers: dict[bytes, bytes]) -> Client | None:
    """The client a bearer token belongs to (named by the key's position), or None for a wrong or missing key."""
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    # Compare against every key so the time taken does not reveal which key nearly matched.
    matched = None
    for i, key in enumerate(keys):
        if hmac.compare_digest(token.strip().encode("latin-1"), key.encode()):
            matched = i
    if scheme.lower() != "bearer" or matched is None:
        return None
    return Client(key=f"key-{matched + 1}", label=f"key-{matched + 1}")


async def discard_body(receive: Receive, cap: int) -> bool:
    """Read and drop the rest of a request body, up to `cap` bytes, so that an error answered before the body was
    read reaches the client instead of a connection reset. True if the body's end was reached."""
    read = 0
    while read <= cap:
        message = await receive()
        if message["type"] != "http.request":
            return False
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


class RequestMiddleware:
    """Request ids, API keys (checked before the body is read), the body-size limit (413), the client a request
    counts against in the fair queues, request metrics, and the last word on errors: anything unexpected is a
    500 in OpenAI's shape and the connection stays usable; a request cut at shutdown is a 503. Pure ASGI, so
    streaming is untouched."""

    def __init__(self, app: ASGIApp, state: ServiceState):
        self.app = app
        self.state = state
        self.errors = BurstLog(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope.get("path", "")
        endpoint = path if path in self.state.endpoints else "other"  # bounded labels, whatever clients send
        started = time.perf_counter()
        status = 500
        limit = self.state.settings.max_body_bytes
        discard_cap = max(4 * limit, 8 * 1024 * 1024)
        received = 0
        too_large = False
        body_done = False  # the body's last message has been read (reading on would wait for a disconnect)
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
                if self.state.draining:
                    # Clients stop reusing this connection now, so none sends a request on a keep-alive
                    # connection at the moment the server closes it.
                    message["headers"].append((b"connection", b"close"))
            await send(message)

        async def answer(error: ApiError) -> None:
            if not body_done and not await discard_body(receive, discard_cap):
                error.headers["Connection"] = "close"  # too much to read: the connection cannot be reused
            await error_response(error.status, error.message, error.type, error.param, error.code,
                                 error.headers)(scope, receive, send_with_id)

        too_large_error = ApiError(413, f"request body is over the {limit}-byte limit", param="body",
                                   code="body_too_large")

        async def limited_receive() -> Message:
            nonlocal received, too_large, body_done
            message = await receive()
            received += len(message.get("body", b""))
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if received > limit:
                too_large = True
                raise BodyTooLarge
            return message

        async def send_refusal(message: Message) -> None:
            # The framework turns a failed body read into its own 400; answer 413 instead.
            if message["type"] == "http.response.start":
                await answer(too_large_error)

        try:
            header_bytes = sum(len(name) + len(value) for name, value in scope["headers"])
            if header_bytes > self.state.settings.max_header_bytes:  # (an unfinished one is cut off by h11)
                await answer(ApiError(431, f"request headers hold {header_bytes} bytes; the limit is "
                                      f"{self.state.settings.max_header_bytes}", code="headers_too_large"))
                return
            if scope["path"] not in PUBLIC_PATHS:
                client = authenticate(self.state.api_keys, headers) if self.state.api_keys else None
                if self.state.api_keys and client is None:
                    await answer(ApiError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                                          "authentication_error", code="invalid_api_key"))
                    return
                # Without keys each connection is a client of its own.
                client = client or Client(key=f"connection:{scope.get('client')}")
                CURRENT_CLIENT.set(client)
                queue = self.state.queues.get(scope["path"])
                if queue is not None:  # no room even for one item: refused before the body is parsed
                    try:
                        with routes.queue_errors(self.state, 0, queue.name):
                            queue.check_room(1, client)
                    except ApiError as refused:
                        await answer(refused)
                        return
            try:
                declared = int(headers.get(b"content-length", b"0") or 0)
            except ValueError:
                declared = 0
            if declared > limit:
                await answer(too_large_error)
                return
            await self.app(scope, limited_receive, lambda m: send_refusal(m) if too_large else send_with_id(m))
        except BodyTooLarge:
            await answer(too_large_error)
        except asyncio.CancelledError:
            if response_started or not self.state.draining:
                raise
            # uvicorn cancels what is still running when the graceful-shutdown window ends: say so, in shape.
            await answer(ApiError(503, "the server shut down before this request finished; retry on another "
                                  "replica", "server_busy", code="shutting_down", headers={"Retry-After": "1"}))
        except Exception as error:  # the last word: never a bare 500 and a reset connection
            self.errors.error(f"unexpected {type(error).__name__} while answering a request", error)
            if response_started:
                raise
            await answer(ApiError(500, f"internal error ({type(error).__name__}); request id {request_id}",
                                  "server_error", code="internal_error"))
        finally:
            metrics = self.state.metrics
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first: dict[str, Any] = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON (or not UTF-8): " + str(first.get("ctx", {}).get("error", "")), None
    message = first.get("msg", "invalid request")
    param = ".".join(location) or None
    return (f"{param}: {message}" if param else message), param


def reload_on_sighup(state: ServiceState) -> None:
    """`kill -HUP` reloads the model store's current version (only where the loop owns signals: the main thread)."""
    loop = asyncio.get_running_loop()

    async def reload() -> None:
        for which in SERVED:
            if getattr(state, which.runtime) is not None:
                try:
                    await reload_model(state, which=which)
                except ApiError:
                    pass  # logged by reload_model; the old model keeps serving

    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    except (NotImplementedError, RuntimeError, ValueError):
        log.debug("SIGHUP reload unavailable here (not the main thread)")


async def start_chat(state: ServiceState) -> None:
    """With --policy or --upstream: load the policy (or connect the upstream) and build the aligner."""
    settings = state.settings
    if settings.policy is None and settings.upstream is None:
        return
    if settings.upstream is not None:
        state.upstream = UpstreamClient(settings.upstream, settings.upstream_api_key, settings.upstream_model,
                                        settings.generation_timeout_s)
        generate = state.upstream.generate
    else:
        from service.generation import PolicyRuntime  # torch: only a service that generates imports it

        state.policy = await asyncio.to_thread(PolicyRuntime, str(settings.policy), settings.max_prompt_tokens,
                                               state.metrics, None, settings.policy_dtype)
        await asyncio.to_thread(state.policy.warm_up)
        # A short wait lets requests that arrive together share a batch; generation takes far longer.
        state.generation_batcher = Batcher(
            state.policy.generate, max_batch_texts=settings.max_generation_rows,
            max_wait_s=settings.generation_wait_ms / 1000, max_queue_texts=settings.max_queue_rows,
            max_client_texts=settings.max_client_queue_rows, combine=lambda parts: [g for part in parts for g in part],
            name="generation", metrics=queue_metrics(state.metrics, state.metrics.generation_queue))
        state.generation_batcher.start()
        state.queues["/v1/chat/completions"] = state.generation_batcher

        async def generate(conversation, samplings):
            return await routes.submit_generation(state, [Row(conversation, sampling) for sampling in samplings])

    runtime = state.runtime
    weights = settings.chat_reward_weights or {runtime.primary_head: 1.0}
    async def moderate(inputs: list[ModelInput]) -> list[ModerationResult]:
        return (await routes.moderate_inputs(state, inputs))[1]

    settings.check_guard()
    state.aligner = ChatAligner(generate, lambda inputs: routes.scores_for(state, inputs),
                                moderate if state.moderation else None, runtime.heads, weights,
                                GuardSettings(settings.guard, settings.guard_retries, settings.refusal_text),
                                state.metrics)


async def start_model(state: ServiceState, which: Served, name: str, depth: Gauge) -> Batcher:
    """Load and warm a served model (its directory, or its store's current version), and start its batcher."""
    settings = state.settings
    directory = model_directory(Path(getattr(settings, which.setting)), allow_symlinks=settings.allow_store_symlinks)
    runtime = await asyncio.to_thread(load_runtime, state, directory, which)
    setattr(state, which.runtime, runtime)
    # Through the state at call time, so a reload switches models between batches.
    # A turn in the fair queue is up to 4 engine batches: on a GPU, sorting that many texts by length cuts
    # padding; one text at a time (CPU) there is nothing to sort, and one text keeps each turn short.
    limits = runtime.limits
    batcher = Batcher(lambda texts, worker: getattr(state, which.runtime).scored(texts, worker),
                      max_batch_texts=limits.max_batch_size * (4 if limits.max_batch_size > 1 else 1),
                      max_wait_s=settings.max_wait_ms / 1000, max_queue_texts=settings.max_queue_texts,
                      max_client_texts=settings.max_client_queue_texts, workers=runtime.workers,
                      combine=Scored.combine, name=name, metrics=queue_metrics(state.metrics, depth))
    batcher.start()
    return batcher


def queue_metrics(metrics: Metrics, depth: Gauge) -> QueueMetrics:
    return QueueMetrics(depth, metrics.client_queue_depth, metrics.cancelled)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the API keys file is read here (SettingsError if it cannot be). The model is loaded and
    warmed up during startup."""
    settings = settings or Settings()
    state = ServiceState(settings=settings, metrics=Metrics(), api_keys=settings.read_api_keys())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.model is None:
            raise RuntimeError("no model directory: pass --model DIR or set KEEL_MODEL")
        state.batcher = await start_model(state, REWARD, "scoring", state.metrics.queue_depth)
        state.queues.update({"/v1/score": state.batcher})
        if settings.moderation_model is not None:
            state.moderation_batcher = await start_model(state, MODERATION, "moderation",
                                                         state.metrics.moderation_queue)
            state.queues["/v1/moderations"] = state.moderation_batcher
        reload_on_sighup(state)
        await start_chat(state)
        state.ready = True
        state.metrics.ready.set(1)
        log.info("ready: reward model %s (%s, heads %s); moderation model %s", state.runtime.name,
                 state.runtime.backend, state.runtime.heads, state.moderation.name if state.moderation else "none")
        yield
        state.ready = False
        state.metrics.ready.set(0)
        await state.batcher.close()
        if state.moderation_batcher:
            await state.moderation_batcher.close()
        if state.generation_batcher:
            await state.generation_batcher.close()
        if state.upstream:
            await state.upstream.close()

    errors = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 413, 429, 502, 503)}
    app = FastAPI(title="Keel", version="0.1.0", lifespan=lifespan, responses=errors,
                  description="Reward scoring and moderation with Keel reward models.")
    app.state.keel = state
    routers = (routes.health, routes.api)
    for router in routers:
        app.include_router(router)
    state.endpoints = frozenset(route.path for router in routers for route in router.routes)  # metric labels
    app.add_middleware(RequestMiddleware, state=state)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.type, error.param, error.code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), code=f"http_{error.status_code}",
                              headers=getattr(error, "headers", None))  # e.g. Allow on 405

    return app
