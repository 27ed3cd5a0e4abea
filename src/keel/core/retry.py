"""When a client of a busy server tries again: after 429, 502, 503, 504 or a dropped connection, waiting what
the server's Retry-After says, else an exponential backoff with jitter, within a bounded total time. Shared by
the HTTP reward function (policy training against `keel serve`) and the guard proxy's upstream client."""

from __future__ import annotations

import random
from dataclasses import dataclass

RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # tries in all, the first included
    base_s: float = 0.5  # the first backoff; doubled each time
    max_delay_s: float = 10.0  # no single wait is longer, whatever Retry-After says
    total_s: float = 60.0  # no retry starts after this long

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before try `attempt + 1` (attempt counts from 1): Retry-After's seconds when the
        server gave them, else base * 2^(attempt-1) with full jitter; capped at max_delay_s."""
        try:
            wanted = float(retry_after) if retry_after is not None else None
        except ValueError:  # an HTTP date: not worth parsing for waits this short
            wanted = None
        if wanted is None or wanted < 0:
            wanted = random.uniform(0, self.base_s * 2 ** (attempt - 1))
        return min(wanted, self.max_delay_s)

    def allows(self, attempt: int, elapsed_s: float, delay_s: float) -> bool:
        """Whether another try may follow try `attempt` after waiting delay_s."""
        return attempt < self.attempts and elapsed_s + delay_s <= self.total_s
