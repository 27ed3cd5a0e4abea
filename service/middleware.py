"""Three pure-ASGI middlewares (streaming passes through them untouched), outermost first:

- RequestContext: the request id, the request metrics, and the last word on errors: anything unexpected is a
  500 in OpenAI's shape with the connection still usable, and a request cut at shutdown is a 503;
- BodyLimits: the header block's size (431) and the body's (413), declared or streamed;
- Admission: the API key (401, checked before the body is read), the client a request counts against in the fair
  queues, and whether that queue has room for it (429).

Each answers its own errors with `refuse`, which first reads what is left of the body (up to a cap), so the
client reads the answer instead of a connection reset.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.service.batcher import CURRENT_CLIENT, Client
from keel.service.errors import ApiError
from keel.service.feedback_tokens import PREFIX as TOKEN_PREFIX
from keel.service.feedback_tokens import TOKEN_CLIENT
from keel.service.logs import BurstLog
from keel.service.serving import Serving

log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ADMIN_PREFIX = "/v1/admin/"
FEEDBACK_PATH = "/v1/feedback"  # the one route a signed feedback token opens
PUBLIC_PATHS = frozenset({"/label", "/health", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs",
                          "/docs/oauth2-redirect", "/redoc"})


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


def discard_cap(max_body_bytes: int) -> int:
    """How much of an unread body is read to answer an error on a reusable connection."""
    return max(4 * max_body_bytes, 8 * 1024 * 1024)


async def refuse(error: ApiError, scope: Scope, receive: Receive, send: Send, cap: int,
                 body_read: bool = False) -> None:
    """Answer `error` in OpenAI's shape, after reading the unread body (up to `cap` bytes; past that the
    connection cannot be reused, and is closed)."""
    if not body_read and not await discard_body(receive, cap):
        error.headers["Connection"] = "close"
    await error.response()(scope, receive, send)


def authenticate(keys: list[str], headers: dict[bytes, bytes], name: str = "key",
                 names: list[str] | None = None) -> Client | None:
    """The client a bearer token belongs to (named by the key's position: key-1, admin-2; or by `names`), or
    None for a wrong or missing key."""
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    # Compare against every key so the time taken does not reveal which key nearly matched.
    matched = None
    for i, key in enumerate(keys):
        if hmac.compare_digest(token.strip().encode("latin-1"), key.encode()):
            matched = i
    if scheme.lower() != "bearer" or matched is None:
        return None
    label = names[matched] if names else f"{name}-{matched + 1}"
    return Client(key=f"{name}-{label}" if names else label, label=label)


class RequestContext:
    def __init__(self, app: ASGIApp, serving: Serving, endpoints: frozenset[str]):
        self.app, self.serving = app, serving
        self.endpoints = endpoints  # the app's route paths: the values of the endpoint metric label
        self.errors = BurstLog(log)
        self.cap = discard_cap(serving.settings.max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"  # bounded labels, whatever clients send
        started = time.perf_counter()
        status, response_started = 500, False
        body_read = False  # the body's last message has been read (reading on would wait for a disconnect)

        async def tracked_receive() -> Message:
            nonlocal body_read
            message = await receive()
            body_read = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
                if self.serving.draining:
                    # Clients stop reusing this connection now, so none sends a request on a keep-alive
                    # connection at the moment the server closes it.
                    message["headers"].append((b"connection", b"close"))
            await send(message)

        try:
            await self.app(scope, tracked_receive, send_with_id)
        except asyncio.CancelledError:
            if response_started or not self.serving.draining:
                raise
            # uvicorn cancels what is still running when the graceful-shutdown window ends: say so, in shape.
            await refuse(ApiError(503, "the server shut down before this request finished; retry on another "
                                  "replica", "server_busy", code="shutting_down", headers={"Retry-After": "1"}),
                         scope, receive, send_with_id, self.cap, body_read)
        except Exception as error:  # the last word: never a bare 500 and a reset connection
            self.errors.error(f"unexpected {type(error).__name__} while answering a request", error)
            if response_started:
                raise
            await refuse(ApiError(500, f"internal error ({type(error).__name__}); request id {request_id}",
                                  "server_error", code="internal_error"), scope, receive, send_with_id, self.cap,
                         body_read)
        finally:
            metrics = self.serving.metrics
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)


class BodyTooLarge(Exception):
    pass


class BodyLimits:
    def __init__(self, app: ASGIApp, max_header_bytes: int, max_body_bytes: int):
        self.app = app
        self.max_header_bytes, self.max_body_bytes = max_header_bytes, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        cap = discard_cap(limit)
        header_bytes = sum(len(name) + len(value) for name, value in scope["headers"])
        if header_bytes > self.max_header_bytes:  # (an unfinished one is cut off by h11)
            await refuse(ApiError(431, f"request headers hold {header_bytes} bytes; the limit is "
                                  f"{self.max_header_bytes}", code="headers_too_large"), scope, receive, send, cap)
            return
        too_large = ApiError(413, f"request body is over the {limit}-byte limit", param="body",
                             code="body_too_large")
        try:
            declared = int(dict(scope["headers"]).get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            await refuse(too_large, scope, receive, send, cap)
            return
        received, over, body_done = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, over, body_done
            message = await receive()
            received += len(message.get("body", b""))
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if received > limit:
                over = True
                raise BodyTooLarge
            return message

        async def send_unless_over(message: Message) -> None:
            if not over:
                await send(message)
            elif message["type"] == "http.response.start":  # the framework's own 400 for the failed body read
                await refuse(too_large, scope, receive, send, cap, body_read=body_done)

        try:
            await self.app(scope, limited_receive, send_unless_over)
        except BodyTooLarge:
            await refuse(too_large, scope, receive, send, cap, body_read=body_done)


class Admission:
    """Authentication (client keys; admin keys, the only ones allowed on /v1/admin/*) and the fair-queue
    admission check, before the body is read."""

    def __init__(self, app: ASGIApp, serving: Serving, api_keys: list[str], admin_keys: list[str] | None = None,
                 annotators: dict[str, str] | None = None):
        self.app, self.serving, self.api_keys = app, serving, api_keys  # no keys at all: none needed
        self.admin_keys = admin_keys or []
        self.annotators = annotators or {}
        self.cap = discard_cap(serving.settings.max_body_bytes)

    def check_key(self, path: str, headers: dict[bytes, bytes]) -> Client | None:
        """The authenticated client (None where no key is needed), or ApiError: 401 for a missing or wrong key,
        403 for a client key on an admin route."""
        admin_route = path.startswith(ADMIN_PREFIX)
        if not (self.api_keys or self.annotators or (self.admin_keys and admin_route)):
            return None  # no keys, or admin keys only: the other routes are open
        scheme, _, bearer = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if path == FEEDBACK_PATH and bearer.startswith(TOKEN_PREFIX) and self.serving.feedback_tokens is not None:
            response_id = self.serving.feedback_tokens.verify(bearer.strip())
            if response_id is None or scheme.lower() != "bearer":
                raise ApiError(401, "invalid or expired feedback token", "authentication_error",
                               code="invalid_api_key")
            return Client(key=f"{TOKEN_CLIENT}{response_id}", label="end-user")
        admin = authenticate(self.admin_keys, headers, "admin") if self.admin_keys else None
        annotator = (authenticate(list(self.annotators.values()), headers, "annotator", list(self.annotators))
                     if self.annotators and not admin else None)
        client = admin or annotator or authenticate(self.api_keys, headers)
        if client is None:
            raise ApiError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                           "authentication_error", code="invalid_api_key")
        if admin_route and admin is None:
            raise ApiError(403, "this key may not use /v1/admin/*: admin routes need a key from --admin-keys-file"
                           + ("" if self.admin_keys else ", and none is configured"),
                           "permission_error", code="insufficient_permissions")
        return client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            client = self.check_key(scope["path"], dict(scope["headers"]))
        except ApiError as refused:
            await refuse(refused, scope, receive, send, self.cap)
            return
        # Without keys each connection is a client of its own.
        client = client or Client(key=f"connection:{scope.get('client')}")
        CURRENT_CLIENT.set(client)
        try:  # no room even for one item: refused before the body is parsed
            self.serving.admit(scope["path"], client)
        except ApiError as refused:
            await refuse(refused, scope, receive, send, self.cap)
            return
        await self.app(scope, receive, send)
