"""Logging that a flood cannot turn into a flood of log lines, and JSON lines for log pipelines."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass


@dataclass
class _Burst:
    started: float
    repeats: int = 0


class BurstLog:
    """Logs the first error of a kind at once (with its traceback, if given) and the rest of its burst as one
    line with a count, when the next one after `window_s` arrives or at `flush`. Messages are the burst's key:
    keep them free of request text, and few (an exception's type, not its message)."""

    def __init__(self, logger: logging.Logger, window_s: float = 10.0):
        self.logger = logger
        self.window_s = window_s
        self._bursts: dict[str, _Burst] = {}
        self._lock = threading.Lock()

    def error(self, message: str, exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            burst = self._bursts.get(message)
            if burst is not None and now - burst.started <= self.window_s:
                burst.repeats += 1
                return
            self._bursts[message] = _Burst(now)
        if burst is not None:
            self._report(message, burst)
        self.logger.error(message, exc_info=exc_info)

    def flush(self) -> None:
        with self._lock:
            bursts, self._bursts = self._bursts, {}
        for message, burst in bursts.items():
            self._report(message, burst)

    def _report(self, message: str, burst: _Burst) -> None:
        if burst.repeats:
            self.logger.error("%s: %d more times in the %.0f s after the first", message, burst.repeats,
                              self.window_s)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def log_as_json() -> None:
    """Every logger, uvicorn's included (started without a log config), writes JSON lines to stderr."""
    handler = logging.StreamHandler()
    formatter = JsonFormatter()
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
