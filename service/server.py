"""`keel serve`: make sure a model exists, then run the app on uvicorn with a graceful SIGTERM drain.

HTTP is parsed by h11, which bounds a request's header block (--max-header-bytes); the protocol below adds a
header timeout, which uvicorn lacks: a connection that trickles its headers is closed after --header-timeout-s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
import threading
from types import FrameType
from typing import Any, cast

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from keel.core.artifact import ModerationManifest, RewardManifest
from keel.core.hardware import has_torch
from keel.service.app import create_app
from keel.service.feedback import FeedbackError, FeedbackStore
from keel.service.models import model_directory
from keel.service.settings import Settings, SettingsError

log = logging.getLogger("keel.service")


class HeaderTimeoutProtocol(H11Protocol):
    """h11 with a deadline for each request's headers, from the connection's start or the previous response's
    end. Unlike uvicorn's keep-alive timer, arriving bytes do not reset it, so a byte a second does not keep a
    connection open."""

    header_timeout_s = 10.0  # set per server by `serve`

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        cycle = self.cycle  # a new request's headers, once parsed, start a new cycle
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_overdue, cycle)

    def _headers_overdue(self, cycle_at_arming: object) -> None:
        waiting = self.cycle is None or self.cycle.response_complete  # not in the middle of a request
        if waiting and self.cycle is cycle_at_arming and not self.transport.is_closing():
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """On SIGTERM: report not-ready for `drain_seconds` (so load balancers stop sending), then let uvicorn
    stop accepting, finish in-flight requests and run the app's shutdown."""

    def __init__(self, config: uvicorn.Config, drain_seconds: float):
        super().__init__(config)
        self.drain_seconds = drain_seconds
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        serving = cast(FastAPI, self.config.app).state.keel
        if sig == signal.SIGTERM and not self._draining and self.drain_seconds > 0:
            self._draining = True
            serving.draining = True
            log.info("SIGTERM: draining for %.1f s before shutdown", self.drain_seconds)
            threading.Timer(self.drain_seconds, super().handle_exit, (sig, frame)).start()
            return
        serving.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Stop accepting first, then give requests already sent on just-opened connections a moment to be parsed:
        # uvicorn closes connections it sees as idle at once, which would reset those requests.
        for server in self.servers:
            server.close()
        await asyncio.sleep(0.5)
        await super().shutdown(sockets)


def http_protocol(header_timeout_s: float) -> type[HeaderTimeoutProtocol]:
    return type("KeelHttpProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s})


def preflight(settings: Settings) -> None:
    """One-line errors (SettingsError, ArtifactError) before anything loads or trains: a setting this install
    cannot serve, an unreadable keys file, a model directory or store that cannot be served, or settings that
    name heads or categories the given models lack, a feedback database that cannot be opened or migrated."""
    if settings.policy is not None and not has_torch():
        raise SettingsError("--policy generates with torch, which this install lacks: pip install 'keel-rlhf[chat]', "
                            "or use --upstream")
    settings.read_api_keys()
    settings.read_admin_keys()
    settings.read_annotators()
    if settings.feedback_db is not None:
        try:  # opened and migrated here, so a wrong URL is one line before any model trains or loads
            FeedbackStore(settings.feedback_db).engine.dispose()
        except FeedbackError as error:
            raise SettingsError(f"--feedback-db: {error}") from None
    if settings.model is not None:
        directory = model_directory(settings.model, allow_symlinks=settings.allow_store_symlinks)
        settings.check_heads(RewardManifest.read(directory).heads)
    if settings.moderation_model is not None:
        directory = model_directory(settings.moderation_model, allow_symlinks=settings.allow_store_symlinks)
        settings.check_categories(ModerationManifest.read(directory).categories)


def serve(settings: Settings) -> None:
    """Run the service on settings.model and settings.moderation_model (`keel serve` resolves the default models
    and sets JSON logging first)."""
    app = create_app(settings)  # reads the API keys file (SettingsError) before the model loads
    if settings.model is None:  # `keel serve` resolves (or trains) the default model before it gets here
        raise SettingsError("no reward model: give --model DIR (or KEEL_MODEL)")
    preflight(settings)
    settings.check_guard()
    DrainingServer(uvicorn_config(app, settings), settings.drain_seconds).run()


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    # The graceful window covers the longest request these settings allow; a request still running after it
    # is answered 503 by the app (Kubernetes: terminationGracePeriodSeconds >= preStop + drain + this).
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          timeout_graceful_shutdown=math.ceil(settings.longest_request_s() + 1.0), access_log=False,
                          http=http_protocol(settings.header_timeout_s),
                          h11_max_incomplete_event_size=settings.max_header_bytes,
                          timeout_keep_alive=settings.keep_alive_timeout_s,
                          # uvicorn's own log config writes text; without it its loggers reach the JSON handler
                          log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG)
