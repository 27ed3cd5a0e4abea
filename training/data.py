"""Human-feedback data: preference pairs and scalar ratings from JSONL, JSON or CSV files (gzipped or not).

Accepted rows (column names can be mapped with a source's `rename`):
- Anthropic HH transcripts: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}
- prompt/response pairs:    {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
- chat-message lists:       {"chosen": [{"role", "content"}, ...], "rejected": [...]}
- scalar ratings:           {"prompt"?: str, "response" | "text": str, "score": number} or {"messages": [...], "score": number}
Pairs may carry a "margin" (Bradley-Terry margin). A malformed row raises DataError naming the file and line.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from keel.core.artifact import KeelError
from keel.core.text import Conversation, Message, ModelInput, messages_from_json, model_input, parse_transcript, render
from keel.training.evaluation.refusals import is_refusal

log = logging.getLogger(__name__)
T = TypeVar("T")

SPLITS = ("train", "validation", "test")
# Hash buckets out of 100: [0, 80) train, [80, 90) validation, [90, 100) test.
_SPLIT_BOUNDS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}


class DataError(KeelError, ValueError):
    """A data file or row that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class PreferencePair:
    context: tuple[Message, ...]
    chosen: str
    rejected: str
    margin: float = 0.0

    @property
    def chosen_input(self) -> ModelInput:
        return render(list(self.context)), self.chosen

    @property
    def rejected_input(self) -> ModelInput:
        return render(list(self.context)), self.rejected

    @property
    def split_key(self) -> str:
        return _first_user_turn(self.context) or self.chosen


@dataclass(frozen=True)
class Rating:
    input: ModelInput
    score: float
    split_key: str


Example = PreferencePair | Rating


PAIR_FILTERS = ("all", "refusal_vs_compliance", "compliance_vs_refusal")


@dataclass
class DataSource:
    """One data file and how to read it (a `data` entry in a config)."""

    path: str
    split: str = "all"  # all | train | validation | test (hash split on the first human turn)
    limit: int | None = None  # keep the first N rows of the split, in file order
    rename: dict[str, str] = field(default_factory=dict)  # file column -> Keel field
    score_columns: list[str] | None = None  # score = max of these columns (e.g. binary labels)
    where: dict[str, str] = field(default_factory=dict)  # keep only rows whose column equals this value
    # all | refusal_vs_compliance | compliance_vs_refusal: keep only preference pairs where the chosen reply is a
    # refusal and the rejected one is not, or the reverse (training/evaluation/refusals.py): to teach when (not) to
    # refuse
    pairs: str = "all"
    # Read every row as one rating with this score (for a pair: the first exchange of its chosen conversation,
    # the first user turn and the reply to it): labels a whole file, e.g. red-team openings 0, ordinary ones 1.
    as_rating: float | None = None
    repeat: int = 1  # training: each row this many times an epoch (oversampling a small source, e.g. feedback)
    # training: repeat the rows (more than `repeat` if need be) until they give at least this many an epoch, so that
    # a growing source such as a team's feedback export keeps its share of training at any size
    min_rows: int = 0

    def __post_init__(self) -> None:
        if self.split not in ("all", *SPLITS):
            raise ValueError(f"data source {self.path}: split must be all, train, validation or test, not {self.split!r}")
        if self.min_rows < 0:
            raise ValueError(f"data source {self.path}: min_rows must be 0 or more, not {self.min_rows}")
        if self.as_rating is not None and self.pairs != "all":
            raise ValueError(f"data source {self.path}: as_rating turns pairs into ratings, so it cannot also filter "
                             f"pairs ({self.pairs})")
        if self.pairs not in PAIR_FILTERS:
            raise ValueError(f"data source {self.path}: pairs must be one of {', '.join(PAIR_FILTERS)}, "
                             f"not {self.pairs!r}")


def split_of(key: str) -> str:
    """Deterministic split by a hash of the normalised first human turn, so no opening is in two splits."""
    normalised = " ".join(key.lower().split())
    bucket = int(hashlib.sha256(normalised.encode()).hexdigest()[:8], 16) % 100
    return next(name for name, (low, high) in _SPLIT_BOUNDS.items() if low <= bucket < high)


def read_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, row) for every row of a JSONL, JSON or CSV file; location is 'file:line'."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    suffix = Path(path.name.removesuffix(".gz")).suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: unknown format {suffix!r}; use .jsonl, .json or .csv (optionally .gz)")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
        try:
            if suffix == ".jsonl":
                for line_no, line in enumerate(text, start=1):
                    if line.strip():
                        yield f"{path}:{line_no}", _json_object(line, f"{path}:{line_no}")
            elif suffix == ".json":
                document = json.loads(text.read())
                if isinstance(document, dict) and isinstance(document.get("data"), list):
                    document = document["data"]
                yield from _json_rows(document, str(path), {})
            else:
                reader = csv.DictReader(text)
                for row in reader:
                    yield f"{path}:{reader.line_num}", dict(row)
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not valid UTF-8 ({error})") from error
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON ({error})") from error
        except (OSError, EOFError, csv.Error) as error:
            raise DataError(f"{path}: unreadable ({error})") from error


def _json_rows(document: Any, location: str, keys: dict[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a JSON document: a list of objects; a list of strings (each the row's `text`); or objects of such
    lists, nested, whose keys become the columns key1, key2, ... (CatQA: category -> sub-category -> questions)."""
    if isinstance(document, dict) and document and all(isinstance(v, (dict, list)) for v in document.values()):
        for key, value in document.items():
            yield from _json_rows(value, f"{location} / {key}", {**keys, f"key{len(keys) + 1}": key})
        return
    if not isinstance(document, list):
        raise DataError(f"{location}: expected a JSON list of rows (or {{'data': [...]}})")
    for index, item in enumerate(document, start=1):
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            raise DataError(f"{location}: item {index}: expected a JSON object or a string")
        yield f"{location}: item {index}", {**keys, **item}


def filtered_rows(source: DataSource) -> Iterator[tuple[str, dict[str, Any]]]:
    """The rows of a source that pass its `where` filter, columns renamed."""
    for location, row in read_rows(source.path):
        if all(str(row.get(column)) == value for column, value in source.where.items()):
            yield location, {source.rename.get(key, key): value for key, value in row.items()}


def _json_object(line: str, location: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{location}: invalid JSON ({error.msg})") from error
    if not isinstance(value, dict):
        raise DataError(f"{location}: expected a JSON object, got {type(value).__name__}")
    return value


def parse_example(row: dict[str, Any]) -> Example:
    """A row as a PreferencePair or a Rating; raises ValueError saying what is wrong."""
    if "chosen" in row and "rejected" in row:
        return parse_pair(row)
    if "score" in row:
        return parse_rating(row)
    raise ValueError(
        f"row has neither chosen/rejected nor score (fields: {sorted(row)}); map columns with the source's `rename`"
    )


def parse_row(row: dict[str, Any], source: DataSource, parse: Callable[[dict[str, Any]], Any] = parse_example) -> Any:
    """Apply the source's own reading (score_columns, as_rating), then `parse` (a reward trainer passes its head
    types' parser, keel.training.reward.objectives.parse_example)."""
    if source.score_columns:
        labels = [float(row[c]) for c in source.score_columns if row.get(c) not in (None, "")]
        if not labels:
            raise ValueError(f"none of the score columns {source.score_columns} has a value")
        row["score"] = max(labels)
    if source.as_rating is not None:
        return _labelled_rating(row, source.as_rating)
    return parse(row)


def _labelled_rating(row: dict[str, Any], score: float) -> Rating:
    if not ("chosen" in row and "rejected" in row):
        return parse_rating({**row, "score": score})
    pair = parse_pair(row)
    turns = [*pair.context, Message("assistant", pair.chosen)]
    first_user = next((i for i, m in enumerate(turns) if m.role == "user"), None)
    reply = next((m for m in turns[(first_user or 0) + 1:] if m.role == "assistant"), None)
    if first_user is None or reply is None:
        raise ValueError("the chosen conversation has no user turn answered by the assistant")
    return Rating((render([turns[first_user]]), reply.content), score, pair.split_key)


def parse_pair(row: dict[str, Any]) -> PreferencePair:
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    margin = _number(row.get("margin", 0.0), "margin")
    if prompt in (None, ""):
        if isinstance(chosen, str) and isinstance(rejected, str):
            chosen_turns, rejected_turns = parse_transcript(chosen), parse_transcript(rejected)
        else:
            chosen_turns, rejected_turns = messages_from_json(chosen), messages_from_json(rejected)
        for turns in (chosen_turns, rejected_turns):
            if turns[-1].role != "assistant":
                raise ValueError("the last turn of chosen and rejected must be the assistant's")
        return PreferencePair(tuple(chosen_turns[:-1]), chosen_turns[-1].content, rejected_turns[-1].content, margin)
    context = (Message("user", prompt),) if isinstance(prompt, str) else tuple(messages_from_json(prompt))
    return PreferencePair(context, _response(chosen, "chosen"), _response(rejected, "rejected"), margin)


def _response(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    messages = messages_from_json(value)
    if messages[-1].role != "assistant":
        raise ValueError(f"the last message of {name} must be the assistant's")
    return messages[-1].content


def parse_rating(row: dict[str, Any]) -> Rating:
    score = _number(row["score"], "score")
    if isinstance(row.get("messages"), list):
        messages = messages_from_json(row["messages"])
        return Rating(model_input(messages), score, _first_user_turn(messages) or messages[0].content)
    response = row.get("response", row.get("text"))
    if not isinstance(response, str) or not response:
        raise ValueError("a rating needs a non-empty 'text', 'response' or 'messages'")
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt:
        return Rating((render([Message("user", prompt)]), response), score, prompt)
    return Rating(("", response), score, response)


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def _first_user_turn(messages: tuple[Message, ...] | list[Message]) -> str:
    return next((m.content for m in messages if m.role == "user"), "")


def read_source(source: DataSource, parse: Callable[[dict[str, Any]], T], split_key: Callable[[T], str],
                skip_bad_rows: bool = False, what: str = "rows", keep: Callable[[T], bool] | None = None) -> list[T]:
    """Parse every row of a source, keep its split, the items `keep` accepts, and its limit. Bad rows raise
    DataError naming file:line, or with skip_bad_rows are skipped with a warning and counted."""
    items: list[T] = []
    skipped = 0
    for location, row in filtered_rows(source):
        try:
            item = parse(row)
        except (ValueError, KeyError, TypeError) as error:
            if not skip_bad_rows:
                raise DataError(f"{location}: {error} (pass --skip-bad-rows to skip such rows)") from error
            skipped += 1
            log.warning("skipping bad row %s: %s", location, error)
            continue
        if (source.split == "all" or split_of(split_key(item)) == source.split) and (keep is None or keep(item)):
            items.append(item)
            if source.limit is not None and len(items) >= source.limit:
                break
    if skipped:
        log.warning("%s: skipped %d bad rows", source.path, skipped)
    if not items:
        raise DataError(f"{source.path}: no usable {what} for split {source.split!r}")
    return items


def load_source(source: DataSource, skip_bad_rows: bool = False,
                parse: Callable[[dict[str, Any]], Any] = parse_example) -> list[Any]:
    """Preference pairs and ratings from a source (other kinds of example with another `parse`)."""
    keep: Callable[[Example], bool] | None = None
    if source.pairs != "all":
        prefers_refusal = source.pairs == "refusal_vs_compliance"

        def refusal_filter(example: Example) -> bool:
            return (isinstance(example, PreferencePair) and is_refusal(example.chosen) == prefers_refusal
                    and is_refusal(example.rejected) != prefers_refusal)
        keep = refusal_filter
    what = f"pairs ({source.pairs})" if keep is not None else "rows"
    return read_source(source, lambda row: parse_row(row, source, parse), lambda e: e.split_key, skip_bad_rows,
                       what, keep)


def read_sources(sources: Sequence[DataSource], skip_bad_rows: bool, training: bool = False,
                 load: Callable[[Any, bool], list[Any]] = load_source) -> list[Any]:
    """Every source's rows; for training, each source's `repeat` times, or more to reach its `min_rows` (held-out
    rows are never repeated)."""
    items: list[Any] = []
    for source in sources:
        rows = load(source, skip_bad_rows)
        times = max(source.repeat, -(-source.min_rows // len(rows))) if training and rows else 1
        items += rows * times
    return items


# ---- prompts and demonstrations for policy training ------------------------------------------------------

@dataclass
class PromptSource(DataSource):
    """Prompts for a policy: a data file whose rows hold a `prompt` (text or messages; map other columns with
    `rename`) or an HH transcript/pair (the conversation before the final assistant turn)."""

    first_turn_only: bool = True  # keep only the first user turn of multi-turn conversations
    heads: dict[str, float] | None = None  # reward-head weights for these prompts (None: the reward's own)
    harmful: bool = False  # harmful requests, which the policy should refuse: evasion penalties skip them
    # responses sampled per prompt of this source in a step (None: training.samples_per_prompt): more samples of
    # prompts whose right reply the policy rarely gives make it sampled, and so reinforced, sooner
    samples: int | None = None


def parse_prompt(row: dict[str, Any], first_turn_only: bool) -> Conversation:
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return (Message("user", prompt.strip()),)
    if isinstance(prompt, list):
        conversation = tuple(messages_from_json(prompt))
    elif "chosen" in row:
        conversation = parse_pair(row).context
    else:
        raise ValueError(f"row has no prompt (fields: {sorted(row)}); map a column to `prompt` with `rename`")
    if first_turn_only:
        conversation = tuple(m for m in conversation if m.role == "system") + (
            Message("user", _first_user_turn(conversation)),)
    if not conversation or conversation[-1].role != "user" or not conversation[-1].content:
        raise ValueError("a prompt must end with a non-empty user turn")
    return conversation


def load_prompts(source: PromptSource, skip_bad_rows: bool = False) -> list[Conversation]:
    """Prompts from a source, split by the first user turn, duplicates dropped."""
    prompts = read_source(source, lambda row: parse_prompt(row, source.first_turn_only), _first_user_turn,
                          skip_bad_rows, "prompts")
    return list(dict.fromkeys(prompts))


def parse_demonstration(row: dict[str, Any]) -> tuple[Conversation, str]:
    if "chosen" in row:
        pair = parse_pair({**row, "rejected": row.get("rejected", row["chosen"])})
        return pair.context, pair.chosen
    if isinstance(row.get("messages"), list):
        messages = messages_from_json(row["messages"])
        if messages[-1].role != "assistant" or len(messages) < 2:
            raise ValueError("the last message must be the assistant's, after at least one other turn")
        return tuple(messages[:-1]), messages[-1].content
    prompt, response = row.get("prompt"), row.get("response")
    if isinstance(prompt, str) and prompt and isinstance(response, str) and response:
        return (Message("user", prompt),), response
    raise ValueError(f"a demonstration needs chosen, messages, or prompt and response (fields: {sorted(row)})")


def load_demonstrations(source: DataSource, skip_bad_rows: bool = False) -> list[tuple[Conversation, str]]:
    """(conversation, response) demonstrations for SFT: the chosen side of preference pairs, or rows of
    {"prompt", "response"} or {"messages": [..., assistant]}; split by the first user turn."""
    return read_source(source, parse_demonstration, lambda d: _first_user_turn(d[0]), skip_bad_rows,
                       "demonstrations")
