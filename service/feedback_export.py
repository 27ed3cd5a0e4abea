"""`keel feedback export`: the feedback store as training data.

- preferences.jsonl: TRL's conversational preference format ({"prompt", "chosen", "rejected"} as message lists),
  from pairwise answers; one row per (item, annotator) pair judgment;
- ratings.jsonl: {"messages", "score"} rows `keel train reward` reads: a 1-7 rating as (rating - 1) / 6, a thumbs
  up as 1 and down as 0; `kind` says which (thumbs, rating, or the page's principles: harmless, helpful);
- moderation.jsonl: per moderation result, the text (or its conversation) and each of the categories as true,
  false or null (not labelled, or a tie), by majority vote over the annotators;
- datasheet.json: counts, annotators, agreement (Krippendorff's alpha), ties, gold accuracy
  (keel.service.feedback_quality), the time range and the model versions that produced the items.

Every row carries `split`: a frozen split by a hash of its item's id (keel.service.feedback.split_of_item), so a
model retrained on the export is judged on feedback it never saw.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from keel.core.artifact import staged
from keel.service.feedback import Candidate, FeedbackStore, Item, split_of_item
from keel.service.feedback import Feedback as Answer
from keel.service.feedback_quality import Tally, majority


def conversation_of(item: Item) -> list[dict[str, str]]:
    return list(item.input.get("messages", []))


def export(store: FeedbackStore, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the four files into `out` (atomically: all or none); returns the datasheet. Gold items are the
    annotators' test, not training data: they are left out of the rows and counted in the datasheet's
    gold_accuracy."""
    preferences: list[dict[str, Any]] = []
    ratings: list[dict[str, Any]] = []
    moderation: list[dict[str, Any]] = []
    models: set[str] = set()
    times: list[str] = []
    tally = Tally()
    for item, answers, candidates in store.items_with_feedback():
        tally.add(item, answers, candidates)
        if item.gold is not None:
            continue
        split = split_of_item(item.id)
        times.append(item.created_at.isoformat())
        models.update(f"{kind}:{m['name']}@{m['version']}" for kind, m in item.models.items() if isinstance(m, dict))
        if item.kind == "chat":
            ratings += chat_ratings(item, answers, split)
            preferences += chat_preferences(item, answers, candidates, split)
        else:
            moderation += moderation_rows(item, answers, split)
    quality = tally.summary()
    datasheet = {
        "counts": {"preferences": len(preferences), "ratings": len(ratings), "moderation": len(moderation),
                   "answers": quality.pop("answers"), "test_split": {
                       "preferences": sum(r["split"] == "test" for r in preferences),
                       "ratings": sum(r["split"] == "test" for r in ratings),
                       "moderation": sum(r["split"] == "test" for r in moderation)}},
        **quality,
        "time_range": [min(times), max(times)] if times else None, "model_versions": sorted(models),
        "split": "by a hash of each item's id: 10% test, frozen across exports"}
    with staged(out, overwrite) as staging:
        for name, rows in (("preferences", preferences), ("ratings", ratings), ("moderation", moderation)):
            (staging / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (staging / "datasheet.json").write_text(json.dumps(datasheet, indent=2) + "\n")
    return datasheet


def chat_ratings(item: Item, answers: list[Answer], split: str) -> list[dict[str, Any]]:
    """One row per (annotator, reply): the conversation with the first reply (the one people saw)."""
    reply = (item.output.get("replies") or [""])[0]
    messages = [*conversation_of(item), {"role": "assistant", "content": reply}]
    rows = []
    for answer in answers:
        scores: dict[str, float] = {}
        if answer.kind == "thumbs":
            scores["thumbs"] = float(answer.value["thumbs"] == "up")
        elif answer.kind == "rating" and "rating" in answer.value:  # POST /v1/feedback: one overall rating
            scores["rating"] = (answer.value["rating"] - 1) / 6
        elif answer.kind == "rating":  # the labelling page: 1-7 on each principle
            scores.update({principle: (value - 1) / 6 for principle, value in answer.value["ratings"].items()})
        rows += [{"messages": messages, "score": score, "kind": kind, "annotator": answer.annotator,
                  "item_id": item.id, "split": split} for kind, score in scores.items()]
    return rows


def chat_preferences(item: Item, answers: list[Answer], candidates: list[Candidate],
                     split: str) -> list[dict[str, Any]]:
    """Pairwise answers ({"preference": {"first", "second", "winner": 1 | 2 | "tie"}} over candidate ids) as TRL
    rows; ties and skips give no row."""
    by_id = {c.id: c for c in candidates}
    rows = []
    for answer in answers:
        choice = answer.value.get("preference") if answer.kind == "pairwise" else None
        if not choice or choice.get("winner") not in (1, 2):
            continue
        first, second = by_id.get(choice["first"]), by_id.get(choice["second"])
        if first is None or second is None:
            continue
        chosen, rejected = (first, second) if choice["winner"] == 1 else (second, first)
        rows.append({"prompt": conversation_of(item), "chosen": [{"role": "assistant", "content": chosen.text}],
                     "rejected": [{"role": "assistant", "content": rejected.text}], "annotator": answer.annotator,
                     "item_id": item.id, "split": split})
    return rows


def moderation_rows(item: Item, answers: list[Answer], split: str) -> list[dict[str, Any]]:
    """One row per corrected result: the majority per category (null: not labelled, or a tie)."""
    results = item.output.get("results", [])
    categories = list(results[0]["categories"]) if results else []
    votes: dict[int, dict[str, dict[str, bool]]] = defaultdict(lambda: defaultdict(dict))
    for answer in answers:
        if answer.kind == "moderation":
            for category, flagged in answer.value["categories"].items():
                votes[answer.position][category][answer.annotator] = bool(flagged)
    rows = []
    for position, by_category in sorted(votes.items()):
        text = item.input["texts"][position]
        labels = {category: majority(list(by_category.get(category, {}).values())) for category in categories}
        row: dict[str, Any] = {"text": text["text"], **labels, "item_id": item.id, "index": position,
                               "annotators": len({a for c in by_category.values() for a in c}), "split": split}
        if text.get("context"):
            row["context"] = text["context"]
        rows.append(row)
    return rows
