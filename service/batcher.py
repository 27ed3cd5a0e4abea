"""Dynamic batching: concurrent requests share inference batches.

Requests queue their texts (whatever the scoring function takes: (context, response) pairs here). Each
worker takes everything queued (up to a macro-batch), waits at most `max_wait` for more while the batch is
small, and runs it in its own inference thread. While batches run, new requests pile up and form the next
ones, so batches grow with load and latency stays low when idle. The queue is bounded (QueueFull -> 429) and every request has a deadline (DeadlineExceeded -> 503).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Gauge

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class _Job:
    texts: Sequence[Any]
    future: asyncio.Future
    deadline: float
    cancelled: bool = field(default=False)


class Batcher:
    def __init__(self, score: Callable[[Sequence[Any], int], np.ndarray], max_batch_texts: int, max_wait_s: float,
                 max_queue_texts: int, queue_gauge: Gauge | None = None, workers: int = 1):
        self._score = score
        self.max_batch_texts = max_batch_texts
        self.max_wait_s = max_wait_s
        self.max_queue_texts = max_queue_texts
        self.queue_gauge = queue_gauge
        self._jobs: deque[_Job] = deque()
        self._queued_texts = 0
        self._arrived = asyncio.Event()
        self._workers_count = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="keel-inference")
        self._workers: list[asyncio.Task] = []
        self._closing = False

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._run(i), name=f"keel-batcher-{i}") for i in range(self._workers_count)]

    async def close(self) -> None:
        """Refuse new work, finish what is queued, stop the worker."""
        self._closing = True
        while self._jobs:
            await asyncio.sleep(0.01)
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def check_room(self, count: int) -> None:
        """Raise what `submit` would for `count` more texts now (callers that must answer before submitting)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if self._queued_texts + count > self.max_queue_texts:
            raise QueueFull(f"{self._queued_texts} texts are already waiting")

    async def submit(self, texts: Sequence[Any], timeout_s: float) -> np.ndarray:
        """Raw scores for texts, scored together with whatever else is queued."""
        self.check_room(len(texts))
        loop = asyncio.get_running_loop()
        job = _Job(texts, loop.create_future(), loop.time() + timeout_s)
        self._jobs.append(job)
        self._set_queued(self._queued_texts + len(texts))
        self._arrived.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise DeadlineExceeded(f"not scored within {timeout_s:g} s") from None

    def _set_queued(self, count: int) -> None:
        self._queued_texts = count
        if self.queue_gauge is not None:
            self.queue_gauge.set(count)

    async def _run(self, worker: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._jobs:
                self._arrived.clear()
                await self._arrived.wait()
            # A small batch waits briefly for company; a full one goes at once.
            wait_until = loop.time() + self.max_wait_s
            while self._queued_texts < self.max_batch_texts and (remaining := wait_until - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            jobs = self._take_jobs(loop.time())
            if not jobs:
                continue
            texts = [text for job in jobs for text in job.texts]
            try:
                raw = await loop.run_in_executor(self._executor, self._score, texts, worker)
            except Exception as error:  # a failing batch fails its requests, never the worker
                log.exception("inference failed for a batch of %d texts", len(texts))
                for job in jobs:
                    if job.cancelled:
                        job.future.cancel()
                    elif not job.future.done():
                        job.future.set_exception(error)
                continue
            start = 0
            for job in jobs:
                if job.cancelled:
                    job.future.cancel()
                elif not job.future.done():
                    job.future.set_result(raw[start : start + len(job.texts)])
                start += len(job.texts)

    def _take_jobs(self, now: float) -> list[_Job]:
        jobs: list[_Job] = []
        count = 0
        while self._jobs and (not jobs or count + len(self._jobs[0].texts) <= self.max_batch_texts):
            job = self._jobs.popleft()
            self._set_queued(self._queued_texts - len(job.texts))
            if job.cancelled:  # its caller has already answered 503
                job.future.cancel()
                continue
            if now > job.deadline:
                job.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            jobs.append(job)
            count += len(job.texts)
        return jobs
