"""How far the feedback can be trusted: agreement between annotators (Krippendorff's alpha per task and per
moderation category), majority-vote aggregation with ties left unresolved and counted, and each annotator's
accuracy on the gold items mixed into their queue. `keel feedback stats`, `GET /v1/feedback/stats` (the labelling
page shows it), /metrics and the export's datasheet all read `summarise`."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Literal

import numpy as np

from keel.service.feedback import Candidate, Feedback, FeedbackStore, Item

Units = dict[Any, dict[str, float]]  # unit (an item, a result, a pair) -> annotator -> value


def majority(votes: list[bool]) -> bool | None:
    """The majority of the votes; None for no votes or a tie."""
    yes, no = votes.count(True), votes.count(False)
    return None if yes == no else yes > no


def krippendorff_alpha(units: Units, level: Literal["nominal", "ordinal"]) -> float | None:
    """Krippendorff's alpha over units x annotators; None when no unit has two answers or every answer is the
    same (alpha is undefined)."""
    import krippendorff

    annotators = sorted({a for answers in units.values() for a in answers})
    pairable = [u for u, answers in units.items() if len(answers) >= 2]
    values = {v for u in pairable for v in units[u].values()}
    if not pairable or len(values) < 2:
        return None
    data = np.array([[units[u].get(a, np.nan) for u in pairable] for a in annotators], dtype=float)
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))


def pairwise_winner(answer: Feedback) -> int | None:
    """The candidate id a pairwise answer chose, 0 for a tie, None for a skip."""
    choice = answer.value.get("preference") or {}
    winner = choice.get("winner")
    if winner == "tie":
        return 0
    return choice["first"] if winner == 1 else choice["second"] if winner == 2 else None


class Tally:
    """Accumulates one pass over the answered items."""

    def __init__(self) -> None:
        self.thumbs: Units = {}
        self.ratings: Units = {}
        self.pairwise: Units = {}
        self.categories: dict[str, Units] = defaultdict(dict)
        self.gold: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        self.annotators: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()

    def add(self, item: Item, answers: list[Feedback], candidates: list[Candidate]) -> None:
        for answer in answers:
            self.annotators[answer.annotator] += 1
            self.kinds[answer.kind] += 1
        if item.gold is not None:
            self.score_gold(item.gold, answers, candidates)
            return
        for answer in answers:
            who = answer.annotator
            if answer.kind == "thumbs":
                self.thumbs.setdefault(item.id, {})[who] = float(answer.value["thumbs"] == "up")
            elif answer.kind == "rating":
                for principle, value in (answer.value.get("ratings") or {"rating": answer.value["rating"]}).items():
                    self.ratings.setdefault((item.id, principle), {})[who] = float(value)
            elif answer.kind == "pairwise" and (winner := pairwise_winner(answer)) is not None:
                pair = frozenset((answer.value["preference"]["first"], answer.value["preference"]["second"]))
                self.pairwise.setdefault((item.id, pair), {})[who] = float(winner)
            elif answer.kind == "moderation":
                for category, flagged in answer.value["categories"].items():
                    self.categories[category].setdefault((item.id, answer.position), {})[who] = float(flagged)

    def score_gold(self, gold: dict[str, Any], answers: list[Feedback], candidates: list[Candidate]) -> None:
        """Moderation: one judgment per category the gold names; pairwise: the winner (a tie is wrong, a skip is
        not counted)."""
        texts = {c.id: c.text for c in candidates}
        for answer in answers:
            score = self.gold[answer.annotator]
            if answer.kind == "moderation":
                for category, truth in gold["categories"].items():
                    given = answer.value["categories"].get(category)
                    if given is not None:
                        score["moderation"][0] += int(bool(given) == truth)
                        score["moderation"][1] += 1
            elif answer.kind == "pairwise" and (winner := pairwise_winner(answer)) is not None:
                score["pairwise"][0] += int(texts.get(winner) == gold["chosen"])
                score["pairwise"][1] += 1

    def summary(self) -> dict[str, Any]:
        ties = {category: sum(majority([v == 1.0 for v in votes.values()]) is None for votes in units.values())
                for category, units in sorted(self.categories.items())}
        return {
            "answers": dict(self.kinds),
            "annotators": dict(self.annotators),
            "agreement_krippendorff_alpha": {
                "thumbs": krippendorff_alpha(self.thumbs, "nominal"),
                "rating": krippendorff_alpha(self.ratings, "ordinal"),
                "pairwise": krippendorff_alpha(self.pairwise, "nominal"),
                "moderation": {c: krippendorff_alpha(units, "nominal")
                               for c, units in sorted(self.categories.items())}},
            "moderation_ties_left_unlabelled": sum(ties.values()),
            "moderation_ties_by_category": {c: n for c, n in ties.items() if n},
            "gold_accuracy": {who: {task: {"accuracy": right / total, "judgments": total}
                                    for task, (right, total) in tasks.items() if total}
                              for who, tasks in sorted(self.gold.items())
                              if any(total for _, total in tasks.values())},
        }


def summarise(store: FeedbackStore) -> dict[str, Any]:
    """Counts, agreement, ties and gold accuracy over every answered item."""
    tally = Tally()
    for item, answers, candidates in store.items_with_feedback():
        tally.add(item, answers, candidates)
    return {"store": store.counts(), **tally.summary()}
