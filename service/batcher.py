"""Dynamic batching with a fair queue: concurrent requests share inference batches, and clients share capacity.

Each request is cut into chunks of at most one batch. Chunks wait in one queue per client (an API key, or a
connection when the service has no keys). A worker builds each batch round-robin over the clients with work
waiting, so a client that queued thousands of texts delays another client's request by about one batch, not
by its whole backlog. While batches run, new requests pile up and form the next ones, so batches grow with
load and latency stays low when idle.

Limits: the whole queue and each client's part of it are bounded (QueueFull -> 429), every request has a
deadline (DeadlineExceeded -> 503), and a request whose caller has gone (cancelled) leaves the queue at once.
A batch that fails is retried one request at a time, so only the request that caused the failure fails.

With `continuous`, the function joins its items to a batch that is already running (the policy's continuous
batching) and returns when they finish: the batcher then hands items over as soon as they are queued, while
fewer than max_batch_texts are in flight, instead of waiting for the previous batch to end.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from keel.service.logs import BurstLog

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass(frozen=True)
class Client:
    """Who queued a request: `key` separates the fair queue's clients; `label` names them in metrics (bounded:
    an API key's name, never the key, and one label for all clients without a key)."""

    key: str = ""
    label: str = "anonymous"


# The client of the request being handled: set once per request by the HTTP layer, read where work is queued
# (routes, and the chat aligner's injected functions, which know nothing of requests).
CURRENT_CLIENT: ContextVar[Client] = ContextVar("keel_client", default=Client())  # noqa: B039 (frozen)


@dataclass
class QueueMetrics:
    """The gauges and counters a batcher keeps, labelled with its queue's name."""

    depth: Gauge | None = None  # items waiting, all clients
    client_depth: Gauge | None = None  # items waiting, by client label
    cancelled: Counter | None = None  # items dropped from the queue because their request had gone


@dataclass(eq=False)
class _Job:
    client: Client
    future: asyncio.Future[Any]
    deadline: float
    results: list[Any]  # one per chunk, filled as chunks finish
    waiting: int  # chunks not yet finished
    gone: bool = field(default=False)  # the caller stopped waiting (deadline or cancellation)


@dataclass(eq=False)
class _Chunk:
    job: _Job
    index: int
    items: Sequence[Any]


def concatenate(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class Batcher:
    def __init__(self, score: Callable[[Sequence[Any], int], Any], max_batch_texts: int, max_wait_s: float,
                 max_queue_texts: int, max_client_texts: int | None = None, workers: int = 1,
                 combine: Callable[[list[Any]], Any] = concatenate, name: str = "scoring",
                 metrics: QueueMetrics | None = None, continuous: bool = False):
        self._score = score
        self._combine = combine  # a request's chunk results, in order -> its result
        self.max_batch_texts = max_batch_texts
        self.max_wait_s = max_wait_s
        self.max_queue_texts = max_queue_texts
        self.max_client_texts = max_client_texts or max_queue_texts
        self.name = name
        self.metrics = metrics or QueueMetrics()
        self._queues: OrderedDict[Client, deque[_Chunk]] = OrderedDict()  # round-robin order: next client first
        self._client_texts: dict[Client, int] = {}
        self._label_texts: dict[str, int] = {}  # the same, summed by metric label
        self._queued_texts = 0
        self._arrived = asyncio.Event()
        self._workers_count = workers
        self.continuous = continuous
        self._in_flight = 0  # items handed over and not yet finished (continuous)
        self._room = asyncio.Event()
        # Continuous: each hand-over blocks a thread until its items finish, and up to max_batch_texts may run.
        threads = max_batch_texts if continuous else workers
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"keel-{name}")
        self._handovers: set[asyncio.Task[None]] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self._failures = BurstLog(log)

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._run(i), name=f"keel-{self.name}-{i}")
                         for i in range(self._workers_count)]

    async def close(self) -> None:
        """Refuse new work, finish what is queued, stop the workers."""
        self._closing = True
        while self._queues:
            await asyncio.sleep(0.01)
        await asyncio.gather(*self._handovers, return_exceptions=True)
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._executor.shutdown(wait=True)
        self._failures.flush()

    def check_room(self, count: int, client: Client = Client()) -> None:
        """Raise what `submit` would for `count` more texts now (callers that must answer before submitting)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if self._queued_texts + count > self.max_queue_texts:
            raise QueueFull(f"{self._queued_texts} texts are already waiting")
        held = self._client_texts.get(client, 0)
        if held + count > self.max_client_texts:
            raise QueueFull(f"this client has {held} texts waiting and may have {self.max_client_texts}")

    async def submit(self, texts: Sequence[Any], timeout_s: float, client: Client = Client()) -> Any:
        """Results for texts (combined from their chunks), scored together with whatever else is queued."""
        if not texts:
            raise ValueError("nothing to score: a request holds at least one item")  # would never be answered
        self.check_room(len(texts), client)
        loop = asyncio.get_running_loop()
        chunks = [texts[i : i + self.max_batch_texts] for i in range(0, len(texts), self.max_batch_texts)]
        job = _Job(client, loop.create_future(), loop.time() + timeout_s, [None] * len(chunks), len(chunks))
        queue = self._queues.setdefault(client, deque())
        queue.extend(_Chunk(job, i, chunk) for i, chunk in enumerate(chunks))
        self._count(client, len(texts))
        self._arrived.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except asyncio.TimeoutError:
            self._abandon(job)
            raise DeadlineExceeded(f"not scored within {timeout_s:g} s") from None
        except asyncio.CancelledError:  # the caller is gone: its queued chunks go too
            self._abandon(job)
            raise

    def _count(self, client: Client, delta: int) -> None:
        self._queued_texts += delta
        self._client_texts[client] = self._client_texts.get(client, 0) + delta
        self._label_texts[client.label] = self._label_texts.get(client.label, 0) + delta
        if self.metrics.depth is not None:
            self.metrics.depth.set(self._queued_texts)
        if self.metrics.client_depth is not None:
            self.metrics.client_depth.labels(self.name, client.label).set(self._label_texts[client.label])
        if self._client_texts[client] == 0:
            del self._client_texts[client]

    def _abandon(self, job: _Job) -> None:
        """Drop a job whose caller stopped waiting; chunks already running finish and are discarded."""
        job.gone = True
        dropped = self._unqueue(job)
        if dropped and self.metrics.cancelled is not None:
            self.metrics.cancelled.labels(self.name, "queued").inc(dropped)

    def _unqueue(self, job: _Job) -> int:
        """Take a job's waiting chunks out of the queue; returns how many items they held."""
        queue = self._queues.get(job.client)
        if queue is None:
            return 0
        remaining = deque(chunk for chunk in queue if chunk.job is not job)
        dropped = sum(len(chunk.items) for chunk in queue if chunk.job is job)
        if remaining:
            self._queues[job.client] = remaining
        else:
            del self._queues[job.client]
        if dropped:
            self._count(job.client, -dropped)
        return dropped

    async def _run(self, worker: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queues:
                self._arrived.clear()
                await self._arrived.wait()
            if self.continuous:
                await self._hand_over(loop.time(), worker)
                continue
            # A small batch waits briefly for company; a full one goes at once.
            wait_until = loop.time() + self.max_wait_s
            while self._queued_texts < self.max_batch_texts and (remaining := wait_until - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            chunks = self._take_chunks(loop.time())
            if chunks:
                await self._run_batch(chunks, worker)

    async def _hand_over(self, now: float, worker: int) -> None:
        """Continuous: give the runtime what fits beside the items in flight, and return at once."""
        room = self.max_batch_texts - self._in_flight
        if room <= 0:
            self._room.clear()
            await self._room.wait()
            return
        chunks = self._take_chunks(now, room)
        if not chunks:
            return
        count = sum(len(chunk.items) for chunk in chunks)
        self._in_flight += count
        task = asyncio.get_running_loop().create_task(self._run_batch(chunks, worker))
        self._handovers.add(task)

        def finished(task: asyncio.Task[None]) -> None:
            self._handovers.discard(task)
            self._in_flight -= count
            self._room.set()

        task.add_done_callback(finished)

    async def _run_batch(self, chunks: list[_Chunk], worker: int) -> None:
        loop = asyncio.get_running_loop()
        chunks = [chunk for chunk in chunks if not (chunk.job.future.done() or chunk.job.gone)]
        if not chunks:
            return
        texts = [text for chunk in chunks for text in chunk.items]
        try:
            result = await loop.run_in_executor(self._executor, self._score, texts, worker)
        except Exception as error:  # noqa: BLE001 (whatever failed the batch, isolate the request that did)
            if len({id(chunk.job) for chunk in chunks}) > 1:  # find the request that failed it; the rest go on
                for chunk in chunks:
                    await self._run_batch([chunk], worker)
                return
            # The type, not the message: a message may quote the request's text.
            self._failures.error(f"{self.name} failed for one request ({type(error).__name__})", error)
            self._fail(chunks[0].job, error)
            return
        start = 0
        for chunk in chunks:
            self._finish(chunk, result[start : start + len(chunk.items)])
            start += len(chunk.items)

    def _finish(self, chunk: _Chunk, result: Any) -> None:
        job = chunk.job
        if job.future.done() or job.gone:
            return
        job.results[chunk.index] = result
        job.waiting -= 1
        if job.waiting == 0:
            try:
                job.future.set_result(self._combine(job.results))
            except Exception as error:  # noqa: BLE001 (a combine failure belongs to this request alone)
                job.future.set_exception(error)

    def _fail(self, job: _Job, error: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(error)
        self._unqueue(job)

    def _take_chunks(self, now: float, room: int | None = None) -> list[_Chunk]:
        """Up to a batch of chunks (or `room` items), one client's at a time in round-robin order."""
        limit = self.max_batch_texts if room is None else room
        batch: list[_Chunk] = []
        count = 0
        progress = True
        while progress and count < limit:
            progress = False
            for client in list(self._queues):
                queue = self._queues[client]
                chunk = queue[0]
                if count + len(chunk.items) > limit and (batch or room is not None):
                    continue
                queue.popleft()
                progress = True
                if not queue:
                    del self._queues[client]
                else:
                    self._queues.move_to_end(client)  # served: last in line for the next chunk
                self._count(client, -len(chunk.items))
                if chunk.job.future.done() or chunk.job.gone:
                    continue  # its request already failed or was answered 503
                if now > chunk.job.deadline:
                    self._fail(chunk.job, DeadlineExceeded("deadline passed while queued"))
                    continue
                batch.append(chunk)
                count += len(chunk.items)
                if count >= limit:
                    break
        return batch
