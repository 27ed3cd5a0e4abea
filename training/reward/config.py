"""The reward trainer's config (configs/reward.yaml): heads and their data, training and export settings."""

from __future__ import annotations

import dataclasses

from keel.training.config import HEAD_ROLES, ConfigError, check_numbers, check_precision
from keel.training.data import DataSource
from keel.training.encoder.config import ExportConfig, TrainingConfig


@dataclasses.dataclass
class HeadConfig:
    """One reward head (a principle such as `harmless`), trained on its own data."""

    name: str
    train: list[DataSource]
    validation: list[DataSource]
    test: list[DataSource] = dataclasses.field(default_factory=list)
    # Labelled texts (score 1 = should be flagged) for choosing the moderation threshold on this head;
    # without them the threshold is chosen to separate rejected from chosen validation responses.
    moderation: list[DataSource] = dataclasses.field(default_factory=list)
    moderate: bool = True  # a /v1/moderations category: flagged below its threshold (False: never flagged there)
    # Benign conversations (every reply of a pair, or the rated texts) the chat output guard should pass: its
    # threshold is set to flag at most `guard_false_flags` of them (whether or not the head is a /v1/moderations
    # category). Without them the guard uses the moderation threshold, which is tuned for F1 on flag-heavy data
    # and so flags many ordinary replies.
    guard: list[DataSource] = dataclasses.field(default_factory=list)
    guard_false_flags: float = 0.01
    weight: float = 1.0  # loss weight of this head
    # Fit this head after training as a linear probe on the trained backbone's features, so its data never
    # changes the backbone: a judgement added at no cost to the other heads' accuracy (a task unlike theirs
    # sharing the backbone can lower it)
    detach: bool = False
    margin: float = 0.0  # Bradley-Terry margin added to every pair's own margin

    def sources(self) -> list[tuple[str, DataSource]]:
        """Every data source of this head with its role."""
        return [(role, source) for role in HEAD_ROLES for source in getattr(self, role)]


@dataclasses.dataclass
class RewardConfig:
    heads: list[HeadConfig]
    base_model: str = "default"  # HF name or path; "default" is all-MiniLM-L6-v2 from its wheel
    # A Keel reward model directory to fine-tune instead of fresh heads on base_model (e.g. the served model,
    # with a team's feedback added to its data): it keeps what that model learned instead of re-drawing it, as a
    # fresh run with another seed would. Its heads must be this config's; base_model must name its backbone.
    init_from: str | None = None
    max_length: int = 256  # tokens; longer conversations lose their oldest turns
    truncation_side: str = "left"  # left keeps the final response
    attention_dropout: float = 0.0  # 0 trains 1.5-2x faster on CPU
    primary_head: str | None = None  # the head reported as `score`; default: the first
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

    @property
    def base_model_name(self) -> str:
        """The backbone's name as a model's keel.json records it."""
        return "all-MiniLM-L6-v2" if self.base_model == "default" else self.base_model

    def __post_init__(self) -> None:
        names = [head.name for head in self.heads]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"heads need unique names, got {names}")
        if self.primary_head is None:
            self.primary_head = names[0]
        if self.primary_head not in names:
            raise ConfigError(f"primary_head {self.primary_head!r} is not one of the heads {names}")
        check_precision(self.training.precision)
        check_numbers("", self, positive=["max_length"], below_1=["attention_dropout"])
        check_numbers("training", self.training, below_1=["warmup_ratio"],
                      positive=["epochs", "batch_size", "learning_rate", "head_learning_rate", "max_grad_norm",
                                "max_steps", "log_every", "eval_batch_size"],
                      at_least_0=["weight_decay", "freeze_layers", "eval_every", "checkpoint_every"])
        check_numbers("export", self.export, positive=["opset"])
        if self.truncation_side not in ("left", "right"):
            raise ConfigError("truncation_side must be left or right")
        if next(head for head in self.heads if head.name == self.primary_head).detach:
            raise ConfigError(f"primary_head {self.primary_head!r} has detach: true, but its validation accuracy "
                              "during training picks the weights to keep; make a trained head primary")
        for head in self.heads:
            check_numbers(f"heads.{head.name}", head, at_least_0=["weight"], below_1=["guard_false_flags"])
            for role, source in head.sources():
                check_numbers(f"heads.{head.name} {role} source {source.path}", source, positive=["repeat"])
