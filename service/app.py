"""The FastAPI application: the service layer's lifespan (load, warm up, drain), the middlewares and the error
shapes. Everything a request does happens in routes.py and the service layer (serving.py)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from keel.service import routes
from keel.service.errors import ApiError, error_response
from keel.service.metrics import Metrics
from keel.service.middleware import Admission, BodyLimits, RequestContext
from keel.service.schemas import ErrorResponse
from keel.service.serving import Serving
from keel.service.settings import Settings

log = logging.getLogger("keel.service")


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first: dict[str, Any] = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON (or not UTF-8): " + str(first.get("ctx", {}).get("error", "")), None
    message = first.get("msg", "invalid request")
    param = ".".join(location) or None
    return (f"{param}: {message}" if param else message), param


def reload_on_sighup(serving: Serving) -> None:
    """`kill -HUP` reloads the model store's current version (only where the loop owns signals: the main thread)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(serving.reload_all()))
    except (NotImplementedError, RuntimeError, ValueError):
        log.debug("SIGHUP reload unavailable here (not the main thread)")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the API keys file is read here (SettingsError if it cannot be). The models are loaded and
    warmed up during startup."""
    settings = settings or Settings()
    api_keys, admin_keys, annotators = settings.read_api_keys(), settings.read_admin_keys(), settings.read_annotators()
    serving = Serving(settings, Metrics())
    serving.keys_on = bool(api_keys or admin_keys or annotators)
    serving.annotator_names = frozenset(annotators)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await serving.start()
        reload_on_sighup(serving)
        reward, moderation = serving.runtime, serving.moderation
        assert reward is not None
        log.info("ready: reward model %s (%s, heads %s); moderation model %s", reward.name, reward.backend,
                 reward.heads, moderation.name if moderation else "none")
        yield
        await serving.close()

    errors: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse}
                                               for status in (400, 401, 403, 404, 409, 413, 429, 502, 503)}
    app = FastAPI(title="Keel", version="0.1.0", lifespan=lifespan, responses=errors,
                  description="Reward scoring and moderation with Keel reward models.")
    app.state.keel = serving
    routers = (routes.health, routes.api)
    for router in routers:
        app.include_router(router)
    endpoints = frozenset(getattr(route, "path", "") for router in routers for route in router.routes)
    # Added innermost first: a request meets RequestContext, then BodyLimits, then Admission.
    app.add_middleware(Admission, serving=serving, api_keys=api_keys, admin_keys=admin_keys, annotators=annotators)
    app.add_middleware(BodyLimits, max_header_bytes=settings.max_header_bytes, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext, serving=serving, endpoints=endpoints)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), code=f"http_{error.status_code}",
                              headers=getattr(error, "headers", None))  # e.g. Allow on 405

    return app
