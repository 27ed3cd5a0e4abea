"""The feedback store: what Keel served (items: the input, the output, the model versions, the scores, the guard's
verdict, every best-of-n candidate) and what people said about it (feedback: thumbs, ratings, moderation
corrections), in SQLite (one machine) or PostgreSQL (several replicas), through SQLAlchemy 2 with Alembic
migrations (keel/service/migrations).

`Recorder` writes served items off the event loop, in batches, from a bounded queue: a slow or stopped database
never slows or fails a request; a write that fails is counted (keel_feedback_write_failures_total) and dropped.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from keel.core.artifact import KeelError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class FeedbackError(KeelError):
    """A feedback store that cannot be opened or migrated; the message says which and why."""


def now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Item(Base):
    """One response Keel served: a chat completion or a moderation result list."""

    __tablename__ = "items"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the response's id: chatcmpl-..., modr-...
    kind: Mapped[str] = mapped_column(String(16), index=True)  # chat | moderation
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    client: Mapped[str | None] = mapped_column(String(64))  # the API key's name that made the request
    input: Mapped[dict[str, Any]] = mapped_column()  # {"messages": [...]} or {"texts": [...]}
    output: Mapped[dict[str, Any]] = mapped_column()  # {"replies": [...]} or {"results": [...]}
    models: Mapped[dict[str, Any]] = mapped_column()  # {"reward": {"name", "version"}, "moderation": ...}
    scores: Mapped[dict[str, Any]] = mapped_column()  # the guard's verdicts, rewards, category scores
    # 0..1, higher first in the labelling queue: a moderation probability near its threshold, a small reward
    # margin between best-of-n candidates
    uncertainty: Mapped[float] = mapped_column(default=0.0)
    # A gold item's known answer ({"categories": {...}} or {"chosen": text}); None for what Keel served
    gold: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)  # SQL NULL


class Candidate(Base):
    """A best-of-n candidate reply with its reward (chosen or not): free comparison pairs."""

    __tablename__ = "candidates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    choice: Mapped[int] = mapped_column(Integer)  # which of the n choices it competed for
    text: Mapped[str] = mapped_column(Text)
    reward: Mapped[float | None] = mapped_column()
    flagged: Mapped[bool | None] = mapped_column()
    chosen: Mapped[bool] = mapped_column(default=False)


class Feedback(Base):
    """One annotator's answer about one item (for moderation: about one result of it). Answering again replaces
    the earlier answer (the unique key)."""

    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("item_id", "annotator", "kind", "position"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    annotator: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # thumbs | rating | moderation
    position: Mapped[int] = mapped_column(Integer, default=0)  # moderation: the result's index
    value: Mapped[dict[str, Any]] = mapped_column()  # {"thumbs": "up"} | {"rating": 5} | {"categories": {...}}
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def normalise_url(url: str) -> str:
    """postgresql://... means the psycopg 3 driver (SQLAlchemy's default would be psycopg2)."""
    return "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url


def open_engine(url: str) -> Engine:
    """An engine for the URL; SQLite in WAL mode with foreign keys on."""
    try:
        engine = create_engine(normalise_url(url), pool_pre_ping=True)
    except (SQLAlchemyError, ImportError, ValueError) as error:
        raise FeedbackError(f"--feedback-db {url!r}: {error}; use sqlite:///PATH or "
                            "postgresql://USER@HOST:PORT/DB") from None
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def sqlite_pragmas(connection: Any, _: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent: replicas may all run it at start)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except SQLAlchemyError as error:
        raise FeedbackError(f"cannot migrate the feedback database: {error.__class__.__name__}: "
                            f"{str(error).splitlines()[0]}") from None


@dataclass
class ServedItem:
    """What one response carried, as the recorder stores it."""

    id: str
    kind: str
    client: str | None
    input: dict[str, Any]
    output: dict[str, Any]
    models: dict[str, Any]
    scores: dict[str, Any]
    candidates: list[dict[str, Any]] = field(default_factory=list)  # {"choice", "text", "reward", "flagged", "chosen"}
    uncertainty: float = 0.0
    gold: dict[str, Any] | None = None


@dataclass
class LabelQueue:
    """What an annotator may still label for a task: the open units (item, result index) among recent served
    items, the ids of user-reported items, the gold units this annotator has not answered, and the open units
    other annotators have begun (with k > 1 annotators per item)."""

    units: list[tuple[Item, int]]
    reported: set[str]
    gold: list[tuple[Item, int]]
    started: set[tuple[str, int]] = field(default_factory=set)


class FeedbackStore:
    def __init__(self, url: str, migrate_schema: bool = True):
        self.url = url
        self.engine = open_engine(url)
        if migrate_schema:
            migrate(self.engine)

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def record(self, served: Sequence[ServedItem]) -> None:
        """Store served responses (one transaction for the batch)."""
        stamp = now()
        with self.session() as session, session.begin():
            self.add(session, served, stamp)

    @staticmethod
    def add(session: Session, served: Sequence[ServedItem], stamp: datetime) -> None:
        # Bulk INSERTs, one statement per table: the writer thread shares the CPU (and the GIL) with serving.
        session.execute(insert(Item), [
            {"id": s.id, "kind": s.kind, "created_at": stamp, "client": s.client, "input": s.input,
             "output": s.output, "models": s.models, "scores": s.scores, "uncertainty": s.uncertainty,
             "gold": s.gold} for s in served])
        candidates = [{"item_id": s.id, **c} for s in served for c in s.candidates]
        if candidates:
            session.execute(insert(Candidate), candidates)

    def add_new(self, items: Sequence[ServedItem]) -> int:
        """Store the items not stored yet: gold and imported items, whose ids are hashes of their content, so every
        replica may load the same gold file at start and an import may run twice; returns how many were new."""
        with self.session() as session:
            known = set(session.scalars(select(Item.id).where(Item.id.in_([i.id for i in items]))))
        new = [i for i in items if i.id not in known]
        if new:
            try:
                with self.session() as session, session.begin():
                    self.add(session, new, now())
            except IntegrityError:  # another replica stored them first
                return 0
        return len(new)

    def item(self, item_id: str) -> Item | None:
        with self.session() as session:
            return session.get(Item, item_id)

    def give(self, item_id: str, annotator: str, kind: str, value: dict[str, Any], position: int = 0,
             comment: str | None = None) -> str:
        """Record an annotator's answer, replacing their earlier answer of the same kind on the same item (and
        result); returns the answer's id."""
        with self.session() as session, session.begin():
            existing = session.scalars(select(Feedback).where(
                Feedback.item_id == item_id, Feedback.annotator == annotator, Feedback.kind == kind,
                Feedback.position == position)).first()
            if existing is not None:
                existing.value, existing.comment, existing.created_at = value, comment, now()
                return existing.id
            answer = Feedback(id=f"fb-{uuid.uuid4().hex}", item_id=item_id, annotator=annotator, kind=kind,
                              position=position, value=value, comment=comment, created_at=now())
            session.add(answer)
            return answer.id

    def withdraw(self, answer_id: str, annotator: str) -> bool:
        """Delete one of the annotator's own answers (the labelling page's undo); False if there is none."""
        with self.session() as session, session.begin():
            answer = session.get(Feedback, answer_id)
            if answer is None or answer.annotator != annotator:
                return False
            session.delete(answer)
            return True

    def open_units(self, annotator: str, task: str, annotators: frozenset[str], per_item: int = 1,
                   pool: int = 500) -> LabelQueue:
        """What an annotator may still label for a task. Served units: among the `pool` newest served items;
        moderation: each result of a moderation response; rating: a chat completion; pairwise: a chat completion
        with two or more candidates. A unit is open while this annotator has not answered it and fewer than
        `per_item` annotators have. Reported: any feedback from someone who is not an annotator (a user's thumbs
        or correction). Gold units stay open to every annotator until they have answered them."""
        kind = "moderation" if task == "moderation" else "chat"
        with self.session() as session:
            recent = list(session.scalars(select(Item).where(Item.kind == kind, Item.gold.is_(None))
                                          .order_by(Item.created_at.desc(), Item.id).limit(pool)))
            gold = list(session.scalars(select(Item).where(Item.kind == kind, Item.gold.is_not(None))
                                        .order_by(Item.id)))
            ids = [item.id for item in recent + gold]
            answers = list(session.execute(select(Feedback.item_id, Feedback.position, Feedback.annotator,
                                                  Feedback.kind).where(Feedback.item_id.in_(ids))))
            paired = ({row[0] for row in session.execute(select(Candidate.item_id).where(Candidate.item_id.in_(ids))
                                                         .group_by(Candidate.item_id).having(func.count() >= 2))}
                      if task == "pairwise" else None)
        labelled_by: dict[tuple[str, int], set[str]] = {}
        reported: set[str] = set()
        for item_id, position, who, what in answers:
            if who not in annotators:
                reported.add(item_id)
            elif what == task:
                labelled_by.setdefault((item_id, position), set()).add(who)

        def units_of(items: list[Item]) -> list[tuple[Item, int]]:
            return [(item, position) for item in items if paired is None or item.id in paired
                    for position in range(len(item.output.get("results", [])) if task == "moderation" else 1)
                    if annotator not in labelled_by.get((item.id, position), set())]

        open_units = [(item, position) for item, position in units_of(recent)
                      if len(labelled_by.get((item.id, position), set())) < per_item]
        started = {(item.id, position) for item, position in open_units if labelled_by.get((item.id, position))}
        return LabelQueue(open_units, reported, units_of(gold), started)

    @staticmethod
    def pick(queue: LabelQueue, rng: random.Random, gold_rate: float = 0.0, random_rate: float = 0.0
             ) -> tuple[Item, int] | None:
        """What to label first: reported items; then, unannounced, a gold unit at `gold_rate` (and when nothing
        else is left); then the most uncertain unit other annotators have begun; then a random unit at
        `random_rate`; else the most uncertain. Uncertain picks find the model's mistakes fastest but soon become
        near-duplicate borderline cases; random picks keep the labelled sample representative of the traffic
        (docs/benchmarks.md measures the two). Begun units come before new ones because with k annotators per
        item a unit's majority exists only once its k answers are in: independent random picks would leave
        many units with a single answer."""
        units = queue.units
        first = [unit for unit in units if unit[0].id in queue.reported]
        if first:
            return first[0]
        if queue.gold and (not units or rng.random() < gold_rate):
            return rng.choice(queue.gold)
        if not units:
            return None
        begun = [unit for unit in units if (unit[0].id, unit[1]) in queue.started]
        if begun:
            return max(begun, key=lambda unit: unit[0].uncertainty)
        if rng.random() < random_rate:
            return rng.choice(units)
        return max(units, key=lambda unit: unit[0].uncertainty)

    def served_ids(self, kind: str, newest: int | None = None) -> list[str]:
        """Ids of the recorded (not gold) responses of a kind, newest first; only the `newest` if given."""
        with self.session() as session:
            return list(session.scalars(select(Item.id).where(Item.kind == kind, Item.gold.is_(None))
                                        .order_by(Item.created_at.desc(), Item.id).limit(newest)))

    def inputs_of(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The recorded input of each of these items, by id."""
        with self.session() as session:
            return dict(session.execute(select(Item.id, Item.input).where(Item.id.in_(ids))).tuples().all())

    def set_uncertainty(self, values: dict[str, float]) -> None:
        """Replace the queue's uncertainty of these items (after a retrained model re-scored them)."""
        if not values:
            return
        with self.session() as session, session.begin():
            session.execute(update(Item), [{"id": i, "uncertainty": u} for i, u in values.items()])

    def candidates_of(self, item_id: str) -> list[Candidate]:
        return self.candidates_of_items([item_id]).get(item_id, [])

    def candidates_of_items(self, ids: Sequence[str]) -> dict[str, list[Candidate]]:
        """The candidates of each of these items that has any, in the order they were recorded (one query)."""
        found: dict[str, list[Candidate]] = {}
        with self.session() as session:
            for candidate in session.scalars(select(Candidate).where(Candidate.item_id.in_(ids))
                                             .order_by(Candidate.id)):
                found.setdefault(candidate.item_id, []).append(candidate)
        return found

    def annotator_counts(self) -> dict[str, dict[str, int]]:
        """Per annotator, answers per kind."""
        with self.session() as session:
            rows = session.execute(select(Feedback.annotator, Feedback.kind, func.count())
                                   .group_by(Feedback.annotator, Feedback.kind))
            counts: dict[str, dict[str, int]] = {}
            for who, what, count in rows:
                counts.setdefault(who, {})[what] = count
            return counts

    def purge(self, older_than: timedelta) -> int:
        """Delete items (with their candidates and feedback) served before now - older_than; returns how many.
        Gold items are the team's, not traffic: they stay."""
        cutoff = now() - older_than
        with self.session() as session, session.begin():
            old = list(session.scalars(select(Item.id).where(Item.created_at < cutoff, Item.gold.is_(None))))
            for table in (Feedback, Candidate):
                session.execute(delete(table).where(table.item_id.in_(old)))
            session.execute(delete(Item).where(Item.id.in_(old)))
            return len(old)

    def items_with_feedback(self) -> Iterator[tuple[Item, list[Feedback], list[Candidate]]]:
        """Every item that has feedback, with its answers and candidates, oldest first."""
        with self.session() as session:
            answered = select(Feedback.item_id).distinct()
            for item in session.scalars(select(Item).where(Item.id.in_(answered)).order_by(Item.created_at, Item.id)):
                answers = list(session.scalars(select(Feedback).where(Feedback.item_id == item.id)
                                               .order_by(Feedback.created_at)))
                candidates = list(session.scalars(select(Candidate).where(Candidate.item_id == item.id)
                                                  .order_by(Candidate.choice, Candidate.id)))
                yield item, answers, candidates

    def counts(self) -> dict[str, int]:
        with self.session() as session:
            return {"items": session.query(Item).count(), "candidates": session.query(Candidate).count(),
                    "feedback": session.query(Feedback).count()}


@dataclass
class GoldRow:
    """One line of a gold file: a moderation text with its known categories, or a conversation with a better and
    a worse reply (a pairwise unit whose answer is known)."""

    id: str  # like a served response's id, so the page cannot tell gold apart: modr-... or chatcmpl-...
    kind: str  # moderation | chat
    input: dict[str, Any]  # {"texts": [{"context", "text"}]} or {"messages": [...]}
    answer: dict[str, Any]  # {"categories": {category: bool}} or {"chosen": text}
    replies: list[str] = field(default_factory=list)  # chat: [chosen, rejected]


def read_gold(path: Path, categories: Sequence[str]) -> list[GoldRow]:
    """A gold file (JSON lines), one of per line:
    {"text": "...", "context": "...", "categories": {"violence": true, "hate": false}}   (context optional)
    {"messages": [{"role": "user", "content": "..."}], "chosen": "...", "rejected": "..."}
    A bad line raises FeedbackError naming the file and line."""
    import json

    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise FeedbackError(f"{where}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise FeedbackError(f"{where}: a gold row is a JSON object")
        digest = hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:32]
        if "text" in row:
            labels = row.get("categories")
            if not isinstance(row["text"], str) or not isinstance(row.get("context", ""), str):
                raise FeedbackError(f"{where}: text and context are strings")
            if not isinstance(labels, dict) or not labels or not all(isinstance(v, bool) for v in labels.values()):
                raise FeedbackError(f"{where}: categories is an object of category: true/false, at least one")
            unknown = sorted(set(labels) - set(categories))
            if unknown:
                raise FeedbackError(f"{where}: unknown categories {unknown}; categories are {list(categories)}")
            rows.append(GoldRow(f"modr-{digest}", "moderation",
                                {"texts": [{"context": row.get("context", ""), "text": row["text"]}]},
                                {"categories": labels}))
        elif "messages" in row:
            messages, chosen, rejected = row["messages"], row.get("chosen"), row.get("rejected")
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
                raise FeedbackError(f"{where}: messages is a list of {{role, content}} objects")
            if not isinstance(chosen, str) or not isinstance(rejected, str) or chosen == rejected:
                raise FeedbackError(f"{where}: chosen and rejected are two different replies")
            rows.append(GoldRow(f"chatcmpl-{digest}", "chat", {"messages": messages}, {"chosen": chosen},
                                [chosen, rejected]))
        else:
            raise FeedbackError(f"{where}: a gold row has `text` and `categories` (moderation), or `messages`, "
                                "`chosen` and `rejected` (pairwise)")
    return rows


def split_of_item(item_id: str) -> str:
    """A frozen split by a hash of the item id: 90% train, 10% test, so a model retrained on the export is judged
    on feedback it never saw, however often the export is made."""
    return "test" if int(hashlib.sha256(item_id.encode()).hexdigest()[:8], 16) % 10 == 0 else "train"


class Recorder:
    """Writes served responses off the event loop: a bounded queue, a writer thread, batches of up to
    `batch_size` gathered for up to `linger_s`. `offer` never blocks: a full queue drops the item (counted). Only a `sample_rate` share of the
    responses is kept."""

    def __init__(self, store: FeedbackStore, sample_rate: float = 1.0, max_queue: int = 10_000,
                 batch_size: int = 64, linger_s: float = 0.1, on_failure: Any = None, on_drop: Any = None):
        self.store, self.sample_rate, self.batch_size, self.linger_s = store, sample_rate, batch_size, linger_s
        self.on_failure = on_failure or (lambda n: None)
        self.on_drop = on_drop or (lambda n: None)
        # Record makers, called in the writer thread: building the record costs the event loop nothing
        self.queue: queue.Queue[Callable[[], ServedItem] | None] = queue.Queue(max_queue)
        self.thread = threading.Thread(target=self.write_forever, name="keel-feedback-writer", daemon=True)
        self.thread.start()

    def sampled(self) -> bool:
        return self.sample_rate >= 1.0 or random.random() < self.sample_rate

    def offer(self, make: Callable[[], ServedItem]) -> None:
        try:
            self.queue.put_nowait(make)
        except queue.Full:
            self.on_drop(1)

    def write_forever(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            # Gather for up to `linger_s`: a transaction per response cost a tenth of /v1/moderations' throughput on
            # 2 cores (docs/benchmarks.md); a batch every tenth of a second costs under 5%.
            until = time.monotonic() + self.linger_s
            while len(batch) < self.batch_size:
                try:
                    more = self.queue.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self.write(batch)
                    return
                batch.append(more)
            self.write(batch)

    def write(self, batch: list[Callable[[], ServedItem]]) -> None:
        try:
            self.store.record([make() for make in batch])
        except Exception as error:  # a database down or slow: serving goes on, the loss is counted
            log.warning("feedback store: %d served items not recorded (%s)", len(batch), error.__class__.__name__)
            self.on_failure(len(batch))

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to `timeout` seconds), then stop."""
        deadline = time.monotonic() + timeout
        while not self.queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            self.queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            return
        self.thread.join(max(0.0, deadline - time.monotonic()))
