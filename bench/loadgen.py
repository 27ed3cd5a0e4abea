"""A lean HTTP/1.1 keep-alive load generator (asyncio streams, no client library), so the load itself takes
little of the CPU that the server under test shares on a small machine. Loopback targets only."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def summary(self) -> dict:
        return {"requests": len(self.latencies), "seconds": round(self.seconds, 2),
                "requests_per_s": round(self.requests_per_s, 1), "p50_ms": round(self.percentile(0.5) * 1000, 2),
                "p99_ms": round(self.percentile(0.99) * 1000, 2),
                "mean_ms": round(statistics.fmean(self.latencies) * 1000, 2) if self.latencies else None,
                "statuses": self.statuses}


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    return status, await reader.readexactly(length)


async def _worker(url: str, bodies: list[bytes], next_index: list[int], stop_at: float, total: int | None,
                  result: LoadResult, headers: dict[str, str]) -> None:
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("the load generator only targets loopback addresses")
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    try:
        while time.perf_counter() < stop_at and (total is None or next_index[0] < total):
            body = bodies[next_index[0] % len(bodies)]
            next_index[0] += 1
            request = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                       f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body
            began = time.perf_counter()
            writer.write(request)
            status, _ = await _read_response(reader)
            result.latencies.append(time.perf_counter() - began)
            result.statuses[status] = result.statuses.get(status, 0) + 1
    finally:
        writer.close()


async def run_load(url: str, payloads: list[dict], concurrency: int, seconds: float, total: int | None = None,
                   headers: dict[str, str] | None = None) -> LoadResult:
    """Send payloads round-robin from `concurrency` connections for `seconds` (or `total` requests)."""
    bodies = [json.dumps(p).encode() for p in payloads]
    started = time.perf_counter()
    result = LoadResult(seconds=0.0)
    next_index = [0]
    await asyncio.gather(*[_worker(url, bodies, next_index, started + seconds, total, result, headers or {})
                           for _ in range(concurrency)])
    result.seconds = time.perf_counter() - started
    return result
