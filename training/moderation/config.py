"""The moderation trainer's config (configs/moderation.yaml): labelled sources mapped onto OpenAI's categories,
the operating point thresholds are chosen for, training and export settings."""

from __future__ import annotations

import dataclasses
from typing import Any

from keel.core.moderation import CATEGORIES
from keel.training.config import ConfigError, check_numbers, check_precision
from keel.training.data import DataSource
from keel.training.encoder.config import ExportConfig, TrainingConfig


@dataclasses.dataclass
class LabelRule:
    """How one category's label is read from a row: a constant (`value`), or a column. A column's value is
    1 if it is in `positive`, 0 if it is in `negative` (with neither list: its number, >= 0.5 is 1); any other
    value, an empty cell or null included, leaves the category unlabelled for that row."""

    value: float | None = None
    column: str | None = None
    positive: list[str] = dataclasses.field(default_factory=list)
    negative: list[str] = dataclasses.field(default_factory=list)


ANY = "any"  # in a `by` mapping: at least one of the categories marked so applies


@dataclasses.dataclass
class LabelsBy:
    """Labels that depend on a column's value (CatQA's category, then its sub-category): `values` maps a value to
    {category: 1 | 0 | null | any}. 1 and 0 label the category; null leaves it unlabelled; `any` marks it as one
    of a group of which at least one applies (the loss: keel.training.moderation.train.masked_bce). Applied in
    order after `labels` and `rest`; a value mapped to null leaves its rows out, a value not named changes
    nothing."""

    column: str
    values: dict[str, dict[str, Any] | None]  # a value mapped to null: its rows are left out


@dataclasses.dataclass
class ContextFile(DataSource):
    """The file a `context` column points into: the context is this file's `text` in the row whose `key` column
    equals the value (GPTFuzz's replies name their question by index)."""

    key: str = "index"
    text: str = "text"


@dataclasses.dataclass
class NearCopies(DataSource):
    """A test set to keep out of training: rows whose text shares at least `jaccard` of its word set with one of
    this file's `text` column are dropped (DangerousQA holds XSTest prompts)."""

    text: str = "text"
    jaccard: float = 0.7


@dataclasses.dataclass
class ModerationSource(DataSource):
    """A labelled file and its mapping onto the taxonomy. Categories a source does not label are masked in the
    loss ("not labelled" is not "no"), unless `rest` gives them a value."""

    name: str = ""  # how reports name the source (default: the file's folder)
    text: str = "text"  # the column holding the text judged
    context: str | None = None  # a column holding the user turn the text replies to: judged as a reply in context
    hh_first_turn: bool = False  # `text` holds an HH transcript: judge its first human turn
    labels: dict[str, LabelRule] = dataclasses.field(default_factory=dict)
    rest: float | None = None  # the label of every category `labels` does not name (None: unlabelled)
    # On a row judged harmless on every category it labels (none 1, at least one 0), the label of the categories it
    # leaves unlabelled: OpenAI's samples annotate a subset per text, and "harmless on all it was asked" then
    # teaches the other heads (illicit, ...) what ordinary web text is
    rest_if_clean: float | None = None
    clean_categories: list[str] = dataclasses.field(default_factory=list)  # only these take it (empty: all)
    any_of: list[str] = dataclasses.field(default_factory=list)  # at least one of these applies to every row
    by: list[LabelsBy] = dataclasses.field(default_factory=list)  # labels by a column's value, applied in order
    context_file: ContextFile | None = None  # `context` holds a key into this file
    exclude: list[NearCopies] = dataclasses.field(default_factory=list)  # drop near copies of these texts
    fraction: float = 1.0  # keep this share of the rows (a deterministic hash sample)
    # Split by `folds` hash folds instead of 80/10/10: test = fold `cross_validation.test_fold`, validation and
    # train from the other folds (for K-fold cross-validated evaluation, e.g. OpenAI's moderation samples)
    folds: bool = False
    # A `keel feedback export` moderation.jsonl: `text`, and every category as true, false or null (unlabelled)
    feedback: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feedback:
            self.labels = {c: LabelRule(column=c, positive=["True"], negative=["False"]) for c in CATEGORIES
                           if c not in self.labels} | self.labels
        self.name = self.name or self.path.replace("\\", "/").rstrip("/").split("/")[-2]


@dataclasses.dataclass
class Surroundings(DataSource):
    """Long texts in training: a hash `fraction` of the training texts judged on their own also train inside
    ordinary conversation from this file (its train split, column `text`): `chars` = [low, high] characters
    before the text, up to `low` after it (keel.training.moderation.data.surrounded). `ordinary` excerpts of
    that conversation also train on their own, every category 0: ordinary long text is harmless."""

    text: str = "chosen"
    fraction: float = 0.15
    chars: list[int] = dataclasses.field(default_factory=lambda: [100, 400])
    ordinary: int = 0


@dataclasses.dataclass
class GuardRule:
    """How training chooses the chat guard's margin (keel.json's guard_margin; `keel serve --guard-margin`
    overrides it): the widest margin on `grid`, in log-odds over the thresholds, that keeps at least `recall` of
    the harmful validation rows of the `requests` sources (pooled) flagged, and of the `replies` sources. A
    guard that refuses fewer harmless chats than /v1/moderations flags, at little cost in harm let through."""

    requests: list[str] = dataclasses.field(default_factory=list)  # source names: harmful requests judged alone
    replies: list[str] = dataclasses.field(default_factory=list)  # source names: replies judged in context
    recall: float = 0.9
    grid: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])

    def check(self, validation_sources: set[str]) -> None:
        check_numbers("guard", self, up_to_1=["recall"], positive=["recall"])
        if not self.grid or min(self.grid) < 0:
            raise ConfigError(f"guard.grid must be a non-empty list of margins >= 0, got {self.grid}")
        if unknown := sorted(set(self.requests + self.replies) - validation_sources):
            raise ConfigError(f"guard names {unknown}, which are not validation sources; the validation sources "
                              f"are {sorted(validation_sources)}")


@dataclasses.dataclass
class CrossValidation:
    folds: int = 5
    test_fold: int = 0  # the fold held out as test; `keel train moderation --set cross_validation.test_fold=K`


@dataclasses.dataclass
class ModerationConfig:
    train: list[ModerationSource]
    validation: list[ModerationSource]
    test: list[ModerationSource] = dataclasses.field(default_factory=list)
    categories: list[str] = dataclasses.field(default_factory=lambda: list(CATEGORIES))
    base_model: str = "default"
    max_length: int = 128
    # Where the saved tokenizer cuts a long text for a plain transformers pipeline. Keel trains, measures and serves
    # a moderation model on overlapping windows of a long text instead (training/moderation/train.py).
    truncation_side: str = "right"
    # Train on every window of a long text (the highest logit over them, as served) rather than its first max_length
    # tokens. Thresholds and metrics are always measured in windows. Off by default: docs/experiments.md, issue 31.
    train_in_windows: bool = False
    min_precision: float = 0.8  # thresholds: the lowest with validation precision >= this, else best F1 (train.py)
    min_positives: int = 5  # fewer validation positives than this: the category takes the shared threshold
    threshold_shrinkage: float = 30.0  # pseudo-positives pulling a category's threshold toward the shared one
    prior: float = 0.02  # heads start at this probability, so a category without labels scores near it
    cross_validation: CrossValidation = dataclasses.field(default_factory=CrossValidation)
    surroundings: Surroundings | None = None  # also train texts inside ordinary conversation (long texts)
    guard: GuardRule | None = None  # the chat guard's margin, chosen on validation (None: the service's default)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        if not self.categories or len(set(self.categories)) != len(self.categories):
            raise ConfigError(f"categories must be unique names, got {self.categories}")
        for role in ("train", "validation", "test"):
            for source in getattr(self, role):
                self.check_source(role, source)
        check_precision(self.training.precision)
        check_numbers("", self, positive=["max_length", "min_positives"], at_least_0=["threshold_shrinkage"],
                      below_1=["min_precision", "prior"])
        if not 0 <= self.cross_validation.test_fold < self.cross_validation.folds:
            raise ConfigError(f"cross_validation.test_fold must be in [0, {self.cross_validation.folds})")
        if self.surroundings is not None:
            check_numbers("surroundings", self.surroundings, up_to_1=["fraction"], positive=["fraction"],
                          at_least_0=["ordinary"])
            low, high = (self.surroundings.chars + [0, 0])[:2]
            if len(self.surroundings.chars) != 2 or not 0 <= low <= high:
                raise ConfigError(f"surroundings.chars must be [low, high] with 0 <= low <= high, got "
                                  f"{self.surroundings.chars}")
        if self.guard is not None:
            self.guard.check({source.name for source in self.validation})
        if self.truncation_side not in ("left", "right"):
            raise ConfigError("truncation_side must be left or right")
        check_numbers("training", self.training, below_1=["warmup_ratio"],
                      positive=["epochs", "batch_size", "learning_rate", "head_learning_rate", "max_grad_norm",
                                "max_steps", "log_every", "eval_batch_size"],
                      at_least_0=["weight_decay", "freeze_layers", "eval_every", "checkpoint_every"])

    def check_source(self, role: str, source: ModerationSource) -> None:
        unknown = set(source.labels) - set(self.categories)
        if unknown:
            raise ConfigError(f"{role} source {source.path}: labels name unknown categories "
                              f"{sorted(unknown)}; the categories are {self.categories}")
        named = set(source.any_of) | set(source.clean_categories) | {
            c for by in source.by for labels in by.values.values() for c in labels or {}}
        if named - set(self.categories):
            raise ConfigError(f"{role} source {source.path}: any_of, by or clean_categories name unknown categories "
                              f"{sorted(named - set(self.categories))}; the categories are {self.categories}")
        for by in source.by:
            for value, labels in by.values.items():
                if labels is not None and any(label not in (0, 1, None, ANY) for label in labels.values()):
                    raise ConfigError(f"{role} source {source.path}: by {by.column} = {value!r}: each "
                                      f"label is 1, 0, null or {ANY}, got {labels}")
        if source.clean_categories and source.rest_if_clean is None:
            raise ConfigError(f"{role} source {source.path}: clean_categories restricts rest_if_clean; set "
                              "rest_if_clean too (e.g. 0)")
        for category, rule in source.labels.items():
            if (rule.value is None) == (rule.column is None):
                raise ConfigError(f"{role} source {source.path}: labels.{category} needs exactly one of "
                                  "`value` or `column`")
        check_numbers(f"{role} source {source.path}", source, up_to_1=["fraction"],
                      positive=["fraction", "repeat"])

    def sources(self) -> list[tuple[str, ModerationSource]]:
        return [(role, source) for role in ("train", "validation", "test") for source in getattr(self, role)]
