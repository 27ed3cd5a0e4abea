"""What a chat generation asks for (a Row with its Sampling settings) and gets back (Generated).

Kept apart from the policy runtime, which needs torch: the routes, the batcher and the upstream client use these
types in a serving install that has none.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from keel.core.text import Conversation

# Called from the generation thread with (text delta, finish reason or None) as a row produces text.
OnText = Callable[[str, str | None], None]
# Called from the generation thread with a row's reply as soon as the row finishes, before its batch does.
OnFinish = Callable[["Generated"], None]


@dataclass
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Row:
    """One reply to generate; `on_text` (optional) receives streamed text and `on_finish` the finished reply.
    Setting `abandoned` (its request has gone: the client left, or the deadline passed) stops the row at the
    next token."""

    conversation: Conversation
    sampling: Sampling
    on_text: OnText | None = None
    on_finish: OnFinish | None = None
    abandoned: threading.Event | None = None
    mode: str = "whole"  # how its reply is sent (metrics label): whole, stream, or guarded_stream
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class Generated:
    text: str
    finish_reason: str  # "stop" (end token or stop string) | "length" | "abandoned"
    prompt_tokens: int
    completion_tokens: int
    first_token_seconds: float  # from joining the generation queue
