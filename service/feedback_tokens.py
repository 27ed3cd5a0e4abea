"""Short-lived signed tokens that let an end user's browser give feedback on one response without the API key
(LangSmith's pattern): Keel returns one with each recorded response in the `X-Keel-Feedback-Token` header, the
product hands it to its frontend, and the frontend posts `POST /v1/feedback` with `Authorization: Bearer <token>`.
The token is good for that response only and until it expires.

Format: `fbt.<response id>.<expiry, unix seconds>.<HMAC-SHA256 of "id.expiry", base64url>`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path

from keel.core.artifact import KeelError

PREFIX = "fbt."
HEADER = "X-Keel-Feedback-Token"
TOKEN_CLIENT = "token:"  # a Client key "token:<response id>": the bearer of a valid token for that response


class FeedbackTokens:
    def __init__(self, secret: bytes, ttl_s: float):
        if len(secret) < 32:
            raise KeelError("the feedback-token secret is under 32 bytes: make one with `openssl rand -hex 32`")
        self.secret, self.ttl_s = secret, ttl_s

    @classmethod
    def from_file(cls, path: Path, ttl_s: float) -> FeedbackTokens:
        try:
            return cls(path.read_bytes().strip(), ttl_s)
        except OSError as error:
            raise KeelError(f"--feedback-token-secret-file {path}: {error.strerror}") from None

    def signature(self, payload: str) -> str:
        digest = hmac.new(self.secret, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def issue(self, response_id: str, now: float | None = None) -> str:
        payload = f"{response_id}.{int((time.time() if now is None else now) + self.ttl_s)}"
        return f"{PREFIX}{payload}.{self.signature(payload)}"

    def verify(self, token: str, now: float | None = None) -> str | None:
        """The response id a token was issued for; None if it is forged, malformed or expired."""
        payload, _, signature = token.removeprefix(PREFIX).rpartition(".")
        response_id, _, expiry = payload.rpartition(".")
        if not (token.startswith(PREFIX) and response_id and expiry.isdigit()):
            return None
        if not hmac.compare_digest(signature, self.signature(payload)):
            return None
        return response_id if int(expiry) >= (time.time() if now is None else now) else None
