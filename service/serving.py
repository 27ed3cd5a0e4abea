"""The service layer, between the HTTP routes and the runtimes (in the manner of TEI's `Infer` and vLLM's serving
classes): one object owns the loaded models, their batchers, generation (the local policy or an upstream server),
the chat aligner and reload, and answers `score`, `moderate`, `generate` and the admission check. Routes parse a
request, call it and shape the response; nothing here knows HTTP beyond raising ApiError.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Gauge

from keel.core.artifact import ArtifactError, KeelError, write_text_atomic
from keel.core.moderation import CATEGORIES
from keel.core.runtime import ModelChanged, ModelRuntime, ModerationRuntime, RewardRuntime, Scored
from keel.core.text import Conversation, ModelInput
from keel.service.batcher import (
    CURRENT_CLIENT,
    Batcher,
    Client,
    DeadlineExceeded,
    QueueFull,
    QueueMetrics,
    ShuttingDown,
)
from keel.service.chat import ChatAligner, GuardSettings
from keel.service.errors import ApiError
from keel.service.feedback import FeedbackError, FeedbackStore, Recorder, ServedItem, read_gold
from keel.service.feedback_quality import summarise
from keel.service.feedback_tokens import HEADER as TOKEN_HEADER
from keel.service.feedback_tokens import TOKEN_CLIENT, FeedbackTokens
from keel.service.metrics import Metrics
from keel.service.models import (
    CURRENT,
    MODERATION,
    REWARD,
    SERVED,
    Served,
    describe_store,
    is_store,
    load_runtime,
    model_directory,
)
from keel.service.moderation import moderate
from keel.service.sampling import Generated, Row, Sampling
from keel.service.schemas import FeedbackRequest, LabelAnswer, ModerationResult
from keel.service.settings import LEGACY_GUARD_MARGIN, Settings
from keel.service.upstream import UpstreamClient

if TYPE_CHECKING:  # the policy runtime needs torch
    from keel.service.generation import PolicyRuntime

log = logging.getLogger(__name__)

FEEDBACK_QUALITY_REFRESH_S = 120  # agreement and gold accuracy in /metrics: one pass over the answered items
CHAT_PATH = "/v1/chat/completions"


@contextmanager
def queue_errors(metrics: Metrics, timeout_s: float, what: str) -> Iterator[None]:
    """A full queue is 429; a missed deadline or a shutdown is 503."""
    try:
        yield
    except QueueFull as full:
        metrics.rejected.labels("queue_full").inc()
        raise ApiError(429, f"the {what} queue is full ({full}); retry shortly", "rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except DeadlineExceeded:
        metrics.rejected.labels("deadline").inc()
        raise ApiError(503, f"no {what} result within {timeout_s:g} s; retry later", "server_busy",
                       code="timeout", headers={"Retry-After": "1"}) from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down; retry on another replica", "server_busy",
                       code="shutting_down", headers={"Retry-After": "1"}) from None


class Serving:
    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.runtime: RewardRuntime | None = None  # the reward model (/v1/score, chat ranking)
        self.moderation: ModerationRuntime | None = None  # /v1/moderations and the chat guard
        self.policy: PolicyRuntime | None = None  # local generation (--policy)
        self.upstream: UpstreamClient | None = None  # the guard proxy's upstream (--upstream)
        self.aligner: ChatAligner | None = None  # best-of-n and the guard, over the policy or the upstream
        self.batchers: dict[str, Batcher] = {}  # the served kind ("reward", "moderation", "generation") -> batcher
        self.queues: dict[str, Batcher] = {}  # request path -> the batcher its requests queue in (admission)
        self.reload_lock = asyncio.Lock()
        self.feedback: FeedbackStore | None = None  # --feedback-db: what was served, and what people said of it
        self.recorder: Recorder | None = None
        self.purger: asyncio.Future[None] | None = None
        self.quality_refresher: asyncio.Future[None] | None = None  # keeps the feedback-quality gauges current
        self.feedback_tokens: FeedbackTokens | None = None  # --feedback-token-secret-file: end users' feedback
        self.keys_on = False  # API keys configured: feedback is then tied to the key that made the request
        self.annotator_names: frozenset[str] = frozenset()  # --annotator-keys-file's names
        self.label_rng = random.Random()
        self.ready = False
        self.draining = False  # set by the server at SIGTERM: readiness fails, connections are told to close

    # ---- start and stop ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load and warm every configured model, start the batchers, and connect chat generation."""
        settings = self.settings
        if settings.model is None:
            raise RuntimeError("no model directory: pass --model DIR or set KEEL_MODEL")
        await self.start_model(REWARD, "scoring", self.metrics.queue_depth, "/v1/score")
        if settings.moderation_model is not None:
            await self.start_model(MODERATION, "moderation", self.metrics.moderation_queue, "/v1/moderations")
        await self.start_chat()
        if settings.feedback_db is not None:
            await self.start_feedback(settings.feedback_db)
        self.ready = True
        self.metrics.ready.set(1)

    async def close(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        for batcher in self.batchers.values():
            await batcher.close()
        if self.upstream:
            await self.upstream.close()
        for task in (self.purger, self.quality_refresher):
            if task:
                task.cancel()
        if self.recorder:
            await asyncio.to_thread(self.recorder.close)

    # ---- feedback ---------------------------------------------------------------------------------------------

    async def start_feedback(self, url: str) -> None:
        """Open (and migrate) the feedback store, start the recorder, and purge old items (at start, then daily)."""
        try:
            self.feedback = store = await asyncio.to_thread(FeedbackStore, url)
        except FeedbackError as error:
            raise RuntimeError(str(error)) from None
        if self.settings.feedback_token_secret_file is not None:
            try:
                self.feedback_tokens = FeedbackTokens.from_file(self.settings.feedback_token_secret_file,
                                                                self.settings.feedback_token_ttl_s)
            except KeelError as error:
                raise RuntimeError(str(error)) from None
        if self.settings.feedback_gold_file is not None:
            await self.load_gold(store, self.settings.feedback_gold_file)
        metrics = self.metrics
        self.recorder = Recorder(store, self.settings.feedback_sample_rate,
                                 on_failure=metrics.feedback_failures.inc,
                                 on_drop=metrics.feedback_recorded.labels("dropped").inc)
        if self.settings.feedback_retention_days is not None:
            retention = timedelta(days=self.settings.feedback_retention_days)

            async def purge_daily() -> None:
                while True:
                    with suppress(Exception):  # a database down now is retried tomorrow
                        await asyncio.to_thread(store.purge, retention)
                    await asyncio.sleep(86400)

            self.purger = asyncio.ensure_future(purge_daily())

        async def refresh_quality() -> None:
            while True:
                with suppress(Exception):  # a database down now is read again at the next refresh
                    metrics.observe_feedback_quality(await asyncio.to_thread(summarise, store))
                await asyncio.sleep(FEEDBACK_QUALITY_REFRESH_S)

        self.quality_refresher = asyncio.ensure_future(refresh_quality())

    async def load_gold(self, store: FeedbackStore, path: Path) -> None:
        """Store the gold file's items as the page shows served ones: a moderation text with the served model's
        verdict as the suggestion, a conversation with its two replies as best-of-n candidates."""
        categories = self.moderation.heads if self.moderation is not None else list(CATEGORIES)
        try:
            rows = await asyncio.to_thread(read_gold, path, categories)
        except (FeedbackError, OSError) as error:
            raise RuntimeError(f"--feedback-gold-file: {error}") from None
        texts = [row for row in rows if row.kind == "moderation"]
        if texts and self.moderation is None:
            raise RuntimeError(f"--feedback-gold-file {path} has moderation items: they need --moderation-model")
        results = (await self.moderations([(r.input["texts"][0]["context"], r.input["texts"][0]["text"])
                                           for r in texts]))[1] if texts else []
        verdicts = {row.id: result.model_dump() for row, result in zip(texts, results)}
        gold = [ServedItem(row.id, row.kind, None, row.input,
                           {"results": [verdicts[row.id]]} if row.kind == "moderation" else {"replies": row.replies[:1]},
                           {}, {}, [{"choice": 0, "text": text, "reward": None, "flagged": None, "chosen": i == 0}
                                    for i, text in enumerate(row.replies)], gold=row.answer) for row in rows]
        added = await asyncio.to_thread(store.add_new, gold)
        log.info("feedback store: %d gold items (%d new)", len(gold), added)

    def feedback_headers(self, response_id: str) -> dict[str, str]:
        """The signed token an end user's browser may give feedback on this response with (when configured)."""
        return {TOKEN_HEADER: self.feedback_tokens.issue(response_id)} if self.feedback_tokens is not None else {}

    def capture(self, item: Callable[[], ServedItem]) -> None:
        """Record a served response in the feedback store (when there is one, and the sample takes it); never
        blocks and never fails the request. `item` makes the record, in the recorder's thread and only when it is
        kept (no cost otherwise)."""
        if self.recorder is not None and self.recorder.sampled():
            self.recorder.offer(item)
            self.metrics.feedback_recorded.labels("queued").inc()

    async def give_feedback(self, request: FeedbackRequest, client: Client, keys_on: bool) -> str:
        """Check an answer against the response it is about, and store it (replacing the annotator's earlier
        answer of the same kind); returns its id. With keys on, only the key that made the request, or an admin,
        may answer."""
        if self.feedback is None:
            raise ApiError(404, "feedback is off: start `keel serve` with --feedback-db URL (or KEEL_FEEDBACK_DB)",
                           code="feedback_not_enabled")
        token_for = client.key.removeprefix(TOKEN_CLIENT) if client.key.startswith(TOKEN_CLIENT) else None
        if token_for is not None and token_for != request.id:
            raise ApiError(403, f"this feedback token is for response {token_for}, not {request.id}",
                           "permission_error", param="id", code="insufficient_permissions")
        item = await asyncio.to_thread(self.feedback.item, request.id)
        owner = (not keys_on or client.key.startswith("admin-") or token_for is not None
                 or (item is not None and item.client == client.label))
        if item is None or not owner:
            raise ApiError(404, f"no response {request.id!r} to give feedback on: unknown, expired, not recorded "
                           "(--feedback-sample-rate), or made with another key", param="id", code="not_found")
        kind, value, position = request.answer()
        if kind in ("thumbs", "rating") and item.kind != "chat":
            raise ApiError(400, f"{kind} is feedback on a chat completion; {request.id} is a moderation response: "
                           "send `categories` and `index`", param=kind)
        if kind == "moderation":
            if item.kind != "moderation":
                raise ApiError(400, f"categories correct a moderation response; {request.id} is a chat completion",
                               param="categories")
            results = len(item.output.get("results", []))
            if position >= results:
                raise ApiError(400, f"index {position} is out of range: the response has {results} results",
                               param="index")
            categories: dict[str, bool] = item.output["results"][0]["categories"] if results else {}
            corrected: dict[str, bool] = request.categories or {}
            unknown = sorted(set(corrected) - set(categories))
            if unknown:
                raise ApiError(400, f"unknown categories {unknown}; categories are {sorted(categories)}",
                               param="categories")
        annotator = client.label if keys_on else "anonymous"
        answer = await asyncio.to_thread(self.feedback.give, item.id, annotator, kind, value, position,
                                         request.comment)
        self.metrics.feedback_answers.labels(kind).inc()
        return answer

    # ---- the labelling page ------------------------------------------------------------------------------------

    def annotator_of(self, client: Client) -> str:
        """The annotator a labelling request comes from: an annotator or admin key's name ("anonymous" without
        keys); a client key gets 403."""
        if self.feedback is None:
            raise ApiError(404, "labelling needs the feedback store: start `keel serve` with --feedback-db URL",
                           code="feedback_not_enabled")
        if not self.keys_on:
            return "anonymous"
        if not client.key.startswith(("annotator-", "admin-")):
            raise ApiError(403, "labelling needs an annotator key (--annotator-keys-file) or an admin key",
                           "permission_error", code="insufficient_permissions")
        return client.label

    def annotators(self) -> frozenset[str]:
        """Who counts as an annotator in the queue (any other answer is a user's report)."""
        return frozenset({"anonymous", *self.annotator_names})

    async def label_next(self, client: Client, task: str) -> dict[str, Any]:
        """The next unit to label for the task, as the page shows it, with the annotator's progress."""
        annotator = self.annotator_of(client)
        assert self.feedback is not None
        store, per_item = self.feedback, self.settings.feedback_annotations_per_item
        queue = await asyncio.to_thread(store.open_units, annotator, task, self.annotators(), per_item,
                                        self.settings.feedback_queue_pool)
        unit = store.pick(queue, self.label_rng, self.settings.feedback_gold_rate,
                          self.settings.feedback_random_rate)
        counts = await asyncio.to_thread(store.annotator_counts)
        progress = {"remaining": len(queue.units) + len(queue.gold), "done": counts.get(annotator, {}),
                    "annotators": counts}
        if unit is None:
            return {"task": task, "item": None, "progress": progress}
        item, index = unit
        shown: dict[str, Any] = {"id": item.id, "index": index, "reported": item.id in queue.reported}
        if task == "moderation":
            text = item.input["texts"][index]
            result = item.output["results"][index]
            shown.update(text=text["text"], context=text.get("context", ""), suggestion=result["categories"],
                         scores=result["category_scores"])
        else:
            shown["messages"] = item.input.get("messages", [])
            shown["reply"] = (item.output.get("replies") or [""])[0]
            if task == "pairwise":
                candidates = await asyncio.to_thread(store.candidates_of, item.id)
                pair = self.label_rng.sample(candidates, 2)  # shown in random order
                shown["candidates"] = [{"id": c.id, "text": c.text} for c in pair]
        return {"task": task, "item": shown, "progress": progress}

    async def feedback_stats(self, client: Client) -> dict[str, Any]:
        """Counts, agreement, ties and gold accuracy (keel.service.feedback_quality), for annotators and admins;
        refreshes the /metrics gauges too."""
        self.annotator_of(client)
        assert self.feedback is not None
        summary = await asyncio.to_thread(summarise, self.feedback)
        self.metrics.observe_feedback_quality(summary)
        return summary

    async def label_answer(self, client: Client, answer: LabelAnswer) -> str:
        annotator = self.annotator_of(client)
        assert self.feedback is not None
        item = await asyncio.to_thread(self.feedback.item, answer.item_id)
        if item is None or item.kind != ("moderation" if answer.task == "moderation" else "chat"):
            raise ApiError(404, f"no {answer.task} item {answer.item_id!r}", param="item_id", code="not_found")
        kind, value = answer.stored()
        stored = await asyncio.to_thread(self.feedback.give, item.id, annotator, kind, value, answer.index)
        self.metrics.feedback_answers.labels(kind).inc()
        return stored

    async def label_undo(self, client: Client, answer_id: str) -> None:
        annotator = self.annotator_of(client)
        assert self.feedback is not None
        if not await asyncio.to_thread(self.feedback.withdraw, answer_id, annotator):
            raise ApiError(404, f"no answer {answer_id!r} of yours to undo", param="id", code="not_found")

    def runtime_of(self, which: Served) -> ModelRuntime | None:
        return self.runtime if which is REWARD else self.moderation

    def _set_runtime(self, which: Served, runtime: ModelRuntime) -> None:
        old = self.runtime_of(which)
        info = self.metrics.model_info
        if old is not None:
            with suppress(KeyError):
                info.remove(which.kind, old.name, old.version)
        info.labels(which.kind, runtime.name, runtime.version).set(1)
        if which is REWARD:
            assert isinstance(runtime, RewardRuntime)
            self.runtime = runtime
        else:
            assert isinstance(runtime, ModerationRuntime)
            self.moderation = runtime

    async def start_model(self, which: Served, name: str, depth: Gauge, path: str) -> None:
        """Load and warm a served model (its directory, or its store's current version), and start its batcher."""
        settings = self.settings
        directory = model_directory(Path(getattr(settings, which.setting)),
                                    allow_symlinks=settings.allow_store_symlinks)
        runtime = await asyncio.to_thread(load_runtime, settings, self.metrics, directory, which)
        self._set_runtime(which, runtime)

        def score(texts: Sequence[ModelInput], worker: int) -> Scored[Any]:
            # Through runtime_of at call time, so a reload switches models between batches.
            current = self.runtime_of(which)
            assert current is not None
            return current.scored(texts, worker)

        # A turn in the fair queue is up to 4 engine batches: on a GPU, sorting that many texts by length cuts
        # padding; one text at a time (CPU) there is nothing to sort, and one text keeps each turn short.
        limits = runtime.limits
        batcher = Batcher(score, max_batch_texts=limits.max_batch_size * (4 if limits.max_batch_size > 1 else 1),
                          max_wait_s=settings.max_wait_ms / 1000, max_queue_texts=settings.max_queue_texts,
                          max_client_texts=settings.max_client_queue_texts, workers=runtime.workers,
                          combine=Scored.combine, name=name, metrics=self.queue_metrics(depth))
        batcher.start()
        self.batchers[which.kind] = self.queues[path] = batcher

    async def start_chat(self) -> None:
        """With --policy or --upstream: load the policy (or connect the upstream) and build the aligner."""
        settings = self.settings
        if settings.policy is None and settings.upstream is None:
            return
        if settings.upstream is not None:
            self.upstream = UpstreamClient(settings.upstream, settings.upstream_api_key, settings.upstream_model,
                                           settings.generation_timeout_s)
        else:
            from keel.service.generation import PolicyRuntime  # torch: only a service that generates imports it

            self.policy = policy = await asyncio.to_thread(PolicyRuntime, str(settings.policy),
                                                           settings.max_prompt_tokens, self.metrics, None,
                                                           settings.policy_dtype)
            await asyncio.to_thread(policy.warm_up)
            self.metrics.model_info.labels("policy", policy.name, policy.version).set(1)
            # Continuous batching: rows join the policy's running batch at its next step, fairly by client.
            batcher = Batcher(policy.generate, max_batch_texts=settings.max_generation_rows, max_wait_s=0.0,
                              max_queue_texts=settings.max_queue_rows, max_client_texts=settings.max_client_queue_rows,
                              combine=lambda parts: [g for part in parts for g in part], name="generation",
                              metrics=self.queue_metrics(self.metrics.generation_queue), continuous=True)
            batcher.start()
            self.batchers["generation"] = self.queues[CHAT_PATH] = batcher
        assert self.runtime is not None
        weights = settings.chat_reward_weights or {self.runtime.primary_head: 1.0}
        settings.check_guard()
        self.aligner = ChatAligner(self, self.runtime.heads, weights,
                                   GuardSettings(settings.guard, settings.guard_retries, settings.refusal_text,
                                                 settings.stream_guard_tokens),
                                   self.metrics)

    def queue_metrics(self, depth: Gauge) -> QueueMetrics:
        return QueueMetrics(depth, self.metrics.client_queue_depth, self.metrics.cancelled)

    # ---- admission ------------------------------------------------------------------------------------------

    def admit(self, path: str, client: Client, items: int = 1) -> None:
        """Refuse (ApiError 429) a request to `path` whose queue has no room for its first items, before its body
        is read; paths without a queue are always admitted."""
        queue = self.queues.get(path)
        if queue is not None:
            with queue_errors(self.metrics, 0, queue.name):
                queue.check_room(items, client)

    # ---- scoring and moderation -----------------------------------------------------------------------------

    async def queued(self, batcher: Batcher, items: list[Any], timeout_s: float, what: str) -> Any:
        """Items' results from a batcher, queued as the current request's client."""
        with queue_errors(self.metrics, timeout_s, what):
            return await batcher.submit(items, timeout_s, CURRENT_CLIENT.get())

    async def batched(self, which: Served, inputs: list[ModelInput], what: str) -> Scored[Any]:
        """Scores [texts, heads], batched with every other request's texts."""
        batcher = self.batchers[which.kind]
        try:
            scored: Scored[Any] = await self.queued(batcher, inputs, self.settings.request_timeout_s, what)
        except ModelChanged:  # a reload landed between this request's batches: score it again, on one model
            scored = await self.queued(batcher, inputs, self.settings.request_timeout_s, what)
        return scored

    async def score(self, inputs: list[ModelInput]) -> Scored[RewardRuntime]:
        """Normalised reward scores [texts, heads], and the model version that gave them."""
        scored = await self.batched(REWARD, inputs, "scoring")
        for h, head in enumerate(scored.runtime.heads):
            histogram = self.metrics.scores.labels(head)
            for value in scored.values[:, h]:
                histogram.observe(float(value))
        return scored

    @property
    def moderates(self) -> bool:
        return self.moderation is not None

    async def moderations(self, inputs: list[ModelInput], thresholds: dict[str, float] | None = None,
                          guard: bool = False) -> tuple[Scored[ModerationRuntime], list[ModerationResult]]:
        """Category probabilities and moderation results, at the request's, deployment's or model's thresholds
        (for the guard, raised by its margin in log-odds)."""
        scored = await self.batched(MODERATION, inputs, "moderation")
        margin = self.guard_margin(scored.runtime) if guard else 0.0
        results = moderate(scored, self.settings.moderation_thresholds, thresholds, margin)
        for result in results:
            for category, flagged in result.categories.items():
                if flagged:
                    self.metrics.flagged.labels(category).inc()
        return scored, results

    async def moderate(self, inputs: list[ModelInput]) -> list[ModerationResult]:
        """Moderation results at the served thresholds raised by the guard's margin (the chat guard's question)."""
        return (await self.moderations(inputs, guard=True))[1]

    def guard_margin(self, runtime: ModerationRuntime) -> float:
        """--guard-margin, else the margin the model's training chose on validation, else the legacy default."""
        if self.settings.guard_margin is not None:
            return self.settings.guard_margin
        chosen = runtime.manifest.guard_margin
        return LEGACY_GUARD_MARGIN if chosen is None else chosen

    # ---- generation -------------------------------------------------------------------------------------------

    async def generate(self, conversation: Conversation, samplings: Sequence[Sampling]) -> list[Generated]:
        """One reply per sampling setting, from the upstream server or the local policy."""
        if self.upstream is not None:
            return await self.upstream.generate(conversation, samplings)
        return await self.generate_rows([Row(conversation, sampling) for sampling in samplings])

    async def generate_rows(self, rows: list[Row]) -> list[Generated]:
        """Generate rows with the local policy. The replies are returned as soon as these rows finish, not when
        their batch does (it may hold another request's longer rows). If the request goes (client gone,
        deadline passed, failure), its rows stop generating; a row that brings its own `abandoned` event can
        also be stopped alone (the stream guard does)."""
        loop = asyncio.get_running_loop()
        stops = [row.abandoned or threading.Event() for row in rows]
        replies = [loop.create_future() for _ in rows]

        def deliver(reply: asyncio.Future[Generated]) -> Callable[[Generated], None]:  # from the generation thread
            def settle(generated: Generated) -> None:
                if not reply.done():
                    reply.set_result(generated)

            def from_thread(generated: Generated) -> None:
                loop.call_soon_threadsafe(settle, generated)

            return from_thread

        rows = [replace(row, abandoned=stop, on_finish=deliver(reply)) for row, stop, reply in zip(rows, stops, replies)]
        batch = asyncio.ensure_future(self.queued(self.batchers["generation"], rows,
                                                  self.settings.generation_timeout_s, "generation"))
        every_reply = asyncio.gather(*replies)
        try:
            await asyncio.wait({batch, every_reply}, return_when=asyncio.FIRST_COMPLETED)
            return every_reply.result() if every_reply.done() else batch.result()  # the batch's error, if any
        finally:
            for stop in stops:
                stop.set()  # no effect on finished rows; stops the others
            for waiter in (batch, every_reply):
                waiter.cancel()
            await asyncio.gather(batch, every_reply, return_exceptions=True)

    # ---- models and reload ----------------------------------------------------------------------------------

    def chat_model(self, requested: str | None) -> str:
        """The name a chat completion answers with. A request's `model` must name what is served: the policy's
        name or version, the upstream's model (--upstream-model; without it the upstream decides), or `keel`
        (whatever chat model is served); else 404 model_not_found."""
        if self.policy is None and self.settings.upstream_model is None:
            return requested or "upstream"
        served = self.policy.name if self.policy else str(self.settings.upstream_model)
        accepted = {served, "keel"} | ({self.policy.version} if self.policy else set())
        if requested is not None and requested not in accepted:
            raise ApiError(404, f"the model {requested!r} is not served here; use {served!r} (or 'keel')",
                           param="model", code="model_not_found")
        return served

    def describe_models(self) -> list[dict[str, Any]]:
        """Each served model (reward, then moderation) with its store's other versions, then the policy."""
        listed = []
        for which in SERVED:
            active = self.runtime_of(which)
            if active is not None:
                listed += describe_store(active, Path(getattr(self.settings, which.setting)),
                                         self.settings.allow_store_symlinks)
        return listed + ([self.policy.describe()] if self.policy else [])

    async def reload(self, which: Served = REWARD, version: str | None = None) -> ModelRuntime:
        """Load, check and warm the new version beside the old one, then switch; on any failure keep the old."""
        async with self.reload_lock:
            old = self.runtime_of(which)
            if old is None:
                raise ApiError(404, f"no {which.kind} model is served here", code="model_not_served")
            settings, metrics = self.settings, self.metrics
            store = Path(getattr(settings, which.setting))
            try:
                directory = model_directory(store, version, settings.allow_store_symlinks)
                new = await asyncio.to_thread(load_runtime, settings, metrics, directory, which)
            except (ArtifactError, OSError, ValueError) as error:
                metrics.reloads.labels("failed").inc()
                log.error("reload failed, still serving %s (%s): %s", old.name, old.version, error)
                raise ApiError(409, f"reload failed, still serving {old.name} ({old.version}): {error}",
                               code="reload_failed") from error
            if new.heads != old.heads:
                metrics.reloads.labels("failed").inc()
                raise ApiError(409, f"reload refused, still serving {old.name}: the new model's heads {new.heads} "
                               f"differ from {old.heads}; restart the service to change heads", code="reload_failed")
            self._set_runtime(which, new)
            metrics.reloads.labels("ok").inc()
            log.info("reloaded the %s model: now serving %s (%s), was %s (%s)", which.kind, new.name, new.version,
                     old.name, old.version)
            if settings.persist_reload and is_store(store):
                try:  # so that a restart serves this version too
                    write_text_atomic(store / CURRENT, new.directory.name + "\n")
                except OSError as error:
                    log.warning("reloaded, but could not write %s (a read-only store?): %s", store / CURRENT, error)
            return new

    async def reload_all(self) -> None:
        """Reload every served model's current version (SIGHUP); a failure keeps that model serving."""
        for which in SERVED:
            if self.runtime_of(which) is not None:
                with suppress(ApiError):  # logged by reload(); the old model keeps serving
                    await self.reload(which)
