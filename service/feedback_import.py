"""`keel feedback import`: labels made elsewhere (a spreadsheet, another labelling tool) into the feedback store, as
items with one annotator's answers. They join the export, the agreement figures and the labelling queue (so a
team's annotators can label them again, and agreement with the outside labels is measured).

Rows (CSV columns or JSON keys), by task:
- moderation: `text`, optional `context`, and any of the 13 categories as 1/0, true/false or yes/no (blank: not
  labelled);
- rating: `prompt`, `reply` and `rating` (1-7);
- preference: `prompt`, `chosen` and `rejected`.

An item's id is a hash of its task and content, so importing a file twice adds nothing twice: the annotator's
answer on an item is replaced, as on the page.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from keel.service.feedback import FeedbackError, FeedbackStore, ServedItem

TASKS = ("moderation", "rating", "preference")
TRUE, FALSE = {"1", "true", "yes", "y"}, {"0", "false", "no", "n"}
CHUNK = 500  # items per transaction (and per id lookup: SQLite binds at most 32,766 parameters)


@dataclass
class Imported:
    item: ServedItem
    kind: str  # the answer's: moderation | rating | pairwise
    value: dict[str, Any]


def text_field(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise FeedbackError(f"{where}: `{name}` is missing or empty")
    return value


def label_of(value: Any, where: str, category: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word == "":
        return None
    if word in TRUE | FALSE:
        return word in TRUE
    raise FeedbackError(f"{where}: {category} is {value!r}; use 1/0, true/false, yes/no, or leave it blank")


def item_id(prefix: str, task: str, content: Any) -> str:
    return f"{prefix}-{hashlib.sha256(json.dumps([task, content], sort_keys=True).encode()).hexdigest()[:32]}"


def imported(location: str, row: dict[str, Any], task: str, categories: Sequence[str], source: str) -> Imported:
    """One row as an item (looking like a served one) and the annotator's answer on it."""
    models = {"import": {"name": "import", "version": source}}
    if task == "moderation":
        text, context = text_field(row, "text", location), row.get("context") or ""
        labels = {c: label for c in categories if (label := label_of(row.get(c), location, c)) is not None}
        if not labels:
            raise FeedbackError(f"{location}: no category labelled; give one or more of {', '.join(categories)}")
        unlabelled = {"flagged": False, "categories": {c: False for c in categories},
                      "category_scores": {c: 0.0 for c in categories}}  # no model verdict to suggest
        item = ServedItem(item_id("modr", task, [context, text]), "moderation", None,
                          {"texts": [{"context": context, "text": text}]}, {"results": [unlabelled]}, models, {})
        return Imported(item, "moderation", {"categories": labels})
    messages = [{"role": "user", "content": text_field(row, "prompt", location)}]
    if task == "rating":
        reply = text_field(row, "reply", location)
        try:
            rating = int(str(row.get("rating")).strip())
        except ValueError:
            rating = 0
        if not 1 <= rating <= 7:
            raise FeedbackError(f"{location}: rating is {row.get('rating')!r}; use a whole number from 1 to 7")
        item = ServedItem(item_id("chatcmpl", task, [messages, reply]), "chat", None, {"messages": messages},
                          {"replies": [reply]}, models, {})
        return Imported(item, "rating", {"rating": rating})
    chosen, rejected = text_field(row, "chosen", location), text_field(row, "rejected", location)
    if chosen == rejected:
        raise FeedbackError(f"{location}: chosen and rejected are the same reply")
    candidates = [{"choice": 0, "text": text, "reward": None, "flagged": None, "chosen": False}
                  for text in (chosen, rejected)]
    item = ServedItem(item_id("chatcmpl", task, [messages, chosen, rejected]), "chat", None, {"messages": messages},
                      {"replies": [chosen]}, models, {}, candidates)
    return Imported(item, "pairwise", {"chosen": chosen})


def import_labels(store: FeedbackStore, rows: Iterable[tuple[str, dict[str, Any]]], task: str, annotator: str,
                  categories: Sequence[str], source: str) -> dict[str, int]:
    """Check every row first (a bad one stops the import before anything is written, naming its file and line),
    then store the items and the answers; returns {"rows", "new_items"}."""
    if task not in TASKS:
        raise FeedbackError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    checked = [imported(location, row, task, categories, source) for location, row in rows]
    new = 0
    for start in range(0, len(checked), CHUNK):
        chunk = checked[start:start + CHUNK]
        new += store.add_new([entry.item for entry in chunk])
        for entry in chunk:
            value = entry.value
            if entry.kind == "pairwise":  # the answer names candidates by their ids in the store
                first, second = store.candidates_of(entry.item.id)
                winner = 1 if first.text == value["chosen"] else 2
                value = {"preference": {"first": first.id, "second": second.id, "winner": winner}}
            store.give(entry.item.id, annotator, entry.kind, value)
    return {"rows": len(checked), "new_items": new}
