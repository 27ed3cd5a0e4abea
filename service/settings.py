"""Service settings: every option is a `keel serve` flag and a KEEL_* environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from keel.core.artifact import KeelError
from keel.core.hardware import usable_cpus


class SettingsError(KeelError, ValueError):
    """A setting that cannot be used as given; the message says which and why."""


def number_pairs(text: str) -> dict[str, float]:
    """`harmless=1,helpful=0.5` as {"harmless": 1.0, "helpful": 0.5}; ValueError saying the form otherwise."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError("expected NAME=NUMBER pairs separated by commas, e.g. harmless=1,helpful=0.5")
    return {name.strip(): float(number) for name, number in pairs}


# The guard margin of a moderation model whose keel.json has none (trained before margins were chosen per model):
# the one chosen on the 2026-12-06 default model's validation split (docs/experiments.md, issue 31 item 8).
LEGACY_GUARD_MARGIN = 0.5


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KEEL_", extra="ignore")

    model: Path | None = Field(None, description="reward-model directory or model store (keel serve's default: "
                               "the default reward model, trained first if absent)")
    moderation_model: Path | None = Field(
        None, description="moderation-model directory or model store for /v1/moderations and the chat guard "
        "(keel serve's default: the default moderation model, trained first if absent; `none`: no moderation)")
    moderation_thresholds: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict, description="this deployment's category thresholds over the model's, e.g. "
        "hate=0.5,violence=0.7 (a probability in [0, 1]; a request's `thresholds` override these)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    backend: Literal["auto", "onnx-int8", "onnx", "torch"] = Field(
        "auto", description="scoring engine: int8 ONNX, fp32 ONNX, or torch (uses CUDA if present); auto: torch on a "
        "GPU, int8 on CPUs where it is faster (VNNI, AMX, Arm dot product), else fp32")
    workers: int | None = Field(
        None, ge=1, description="inference workers, each with its own ONNX Runtime session (default: one per CPU "
        "core for ONNX, 1 for torch)")
    threads: int | None = Field(None, ge=1, description="threads per inference worker (default: CPU cores / workers)")
    max_batch_tokens: int | None = Field(
        None, ge=1, description="padded tokens per inference batch (default: 16384 for torch on a GPU, 512 on a CPU)")
    max_batch_size: int | None = Field(
        None, ge=1, description="texts per inference batch (default: 64 for torch on a GPU; 1 on a CPU, where "
        "padding a batch costs more than batching saves)")
    max_wait_ms: float = Field(0.0, ge=0, description="longest a text waits for others to join its batch")
    max_queue_texts: int = Field(2048, ge=1, description="texts waiting to be scored before new requests get 429")
    max_client_queue_texts: int | None = Field(
        None, ge=1, description="texts one client (an API key; a connection when there are no keys) may have "
        "waiting; above it that client gets 429 while the others are still served (default: a quarter of "
        "--max-queue-texts, at least --max-items)")
    request_timeout_s: float = Field(30.0, gt=0, description="a request not answered by then gets 503")
    max_items: int = Field(256, ge=1, description="items (texts or conversations) per request")
    max_chars: int = Field(32768, ge=1, description="characters per text")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1, description="request body size limit (413 above it)")
    api_keys_file: Path | None = Field(
        None, description="file of API keys, one a line (# comments allowed); when set, every endpoint but "
        "health and metrics needs `Authorization: Bearer KEY`. Clients are named key-1, key-2, ... by line")
    admin_keys_file: Path | None = Field(
        None, description="file of admin keys, one a line: only these may call /v1/admin/* (a client key gets "
        "403). With client keys and no admin keys, the admin routes are refused to everyone; with no keys at all, "
        "they are open like every route. Admin keys are valid client keys too; admins are named admin-1, ...")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, json_schema_extra={"env_only": True},
        description="comma-separated API keys, from the environment only (a flag would show them in the process "
        "list); prefer --api-keys-file")
    feedback_db: str | None = Field(
        None, description="feedback store URL: sqlite:///PATH (one machine) or postgresql://USER@HOST:PORT/DB "
        "(several replicas). Served chat completions and moderation results are recorded, and POST /v1/feedback "
        "takes thumbs, ratings and moderation corrections on them (docs/feedback.md). Off by default")
    annotator_keys_file: Path | None = Field(
        None, description="file of annotators, one `name:key` a line: these keys may use the labelling page "
        "(/label) and label any recorded response; the name is the annotator's in the store and the export")
    feedback_annotations_per_item: int = Field(1, ge=1, description="annotators who label each item on the "
                                               "labelling page before it leaves the queue (k)")
    feedback_queue_pool: int = Field(500, ge=1, description="the labelling queue chooses among this many of the "
                                     "newest recorded responses of a kind (raise it when traffic outpaces labelling "
                                     "and older uncertain items should still be offered)")
    feedback_sample_rate: float = Field(1.0, gt=0, le=1, description="share of served responses recorded in the "
                                        "feedback store (feedback on an unrecorded one gets 404)")
    feedback_gold_file: Path | None = Field(
        None, description="gold items with known answers (JSON lines: a moderation text with its categories, or "
        "messages with a chosen and a rejected reply; docs/feedback.md), mixed into the labelling queue unannounced "
        "to measure each annotator's accuracy")
    feedback_gold_rate: float = Field(0.1, ge=0, le=1, description="share of the labelling page's picks that are "
                                      "a gold item the annotator has not answered yet")
    feedback_random_rate: float = Field(0.5, ge=0, le=1, description="share of the labelling queue's picks "
                                        "taken at random rather than the most uncertain (which find the model's "
                                        "mistakes first, but soon only its borderline cases)")
    feedback_token_secret_file: Path | None = Field(
        None, description="file holding a secret (32 bytes or more, e.g. `openssl rand -hex 32`) that signs a "
        "short-lived token returned with each chat completion and moderation response (X-Keel-Feedback-Token), "
        "with which an end user's browser may give feedback on that one response without the API key")
    feedback_token_ttl_s: float = Field(86400.0, gt=0, description="how long a feedback token stays valid")
    feedback_retention_days: float | None = Field(None, gt=0, description="recorded responses older than this "
                                                  "are purged at start and daily (with their feedback)")
    log_bodies: bool = Field(False, description="log request bodies (debugging only: they hold user text)")
    drain_seconds: float = Field(
        6.0, ge=0, description="after SIGTERM, report not-ready and answer with `Connection: close` this long "
        "before closing the listener; longer than --keep-alive-timeout-s, so no idle keep-alive connection is "
        "left open to be cut")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection that has not sent a request's whole "
                                    "header by then is closed (slow-header clients)")
    max_header_bytes: int = Field(32768, ge=1024, description="largest request header block: a whole one above "
                                  "it gets 431; an unfinished one is cut off with 400 and the connection closed")
    keep_alive_timeout_s: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this")
    allow_store_symlinks: bool = Field(False, description="serve model-store versions that are symbolic links "
                                       "leading outside the store")
    persist_reload: bool = Field(False, description="an API or SIGHUP reload also writes the store's CURRENT "
                                 "file, so a restart serves the same version (off: CURRENT is the operator's)")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="log lines as text, or as one JSON object a "
                                                "line (time, level, logger, message) for log pipelines")

    # ---- chat completions (served when --policy or --upstream is given) -------------------------------------
    policy: Path | None = Field(None, description="policy directory (or HF causal-LM path) to serve "
                                "/v1/chat/completions with; \"default\" is SmolLM2-135M-Instruct (unset: no chat "
                                "endpoint unless --upstream)")
    upstream: str | None = Field(None, description="guard proxy: an OpenAI-compatible base URL (e.g. "
                                 "http://vllm:8000) that generates the candidates Keel reranks and guards")
    upstream_api_key: str | None = Field(None, json_schema_extra={"env_only": True},
                                         description="API key sent to the upstream server, from the environment "
                                         "only (unset: none)")
    upstream_model: str | None = Field(None, description="model name sent to the upstream server (unset: "
                                       "none, the server's own default)")
    best_of: int = Field(1, ge=1, le=16, description="candidates per reply, reranked by the reward model, "
                         "when a request does not say (`best_of`)")
    guard: Literal["off", "refuse", "regenerate"] = Field(
        "regenerate", description="output guard: off (audit only), refuse (a flagged reply becomes a refusal) or "
        "regenerate (sample again up to --guard-retries times, then refuse)")
    guard_retries: int = Field(1, ge=0, le=5, description="fresh candidate sets the guard may draw")
    guard_margin: float | None = Field(None, ge=0.0, le=10.0, description="the guard refuses a request or reply "
                                       "only when a category's probability passes its moderation threshold by this "
                                       "margin in log-odds (0: the /v1/moderations verdict; higher: fewer harmless "
                                       "chats refused). Default: the margin the moderation model's training chose "
                                       f"on validation (keel.json), else {LEGACY_GUARD_MARGIN}")
    refusal_text: str = Field("I'm sorry, but I can't help with that.", description="the guard's refusal")
    stream_guard_tokens: int = Field(16, ge=1, le=256, description="a streamed reply under the guard is judged "
                                     "after its first 1, 2, 4 and 8 tokens, then every this many, and whole at its "
                                     "end; text reaches the client only once judged")
    chat_reward_weights: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict, description="head weights candidates are ranked by, e.g. harmless=1,helpful=0.5 "
        "(default: the reward model's primary head)")
    default_max_tokens: int = Field(128, ge=1, description="reply tokens when a request does not say")
    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    max_prompt_tokens: int = Field(1024, ge=16, description="prompt tokens kept (the oldest go first)")
    max_generation_rows: int = Field(32, ge=1, description="replies (candidates) generated together: the running "
                                     "batch's rows (continuous batching: a new row joins at the next token)")
    policy_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="weights of the served policy (auto: bfloat16 on GPUs and CPUs with native bf16, "
        "else float32, which is 2x faster than emulated bf16)")
    max_queue_rows: int = Field(256, ge=1, description="candidates waiting to be generated before 429")
    max_client_queue_rows: int | None = Field(
        None, ge=1, description="candidates one client may have waiting; a request with more (n * best_of) gets "
        "400, a client over it 429 (default: a quarter of --max-queue-rows, at least 16)")
    max_request_tokens: int = Field(8192, ge=1, description="largest n * best_of * max_tokens of one chat "
                                    "request (400 above it): the most tokens one request can make the policy "
                                    "generate")
    generation_timeout_s: float = Field(300.0, gt=0, description="a chat request not answered by then gets 503")

    @field_validator("api_keys", mode="before")
    @classmethod
    def split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("chat_reward_weights", "moderation_thresholds", mode="before")
    @classmethod
    def parse_pairs(cls, value: object) -> object:
        return number_pairs(value) if isinstance(value, str) else value

    @field_validator("moderation_thresholds")
    @classmethod
    def probabilities(cls, value: dict[str, float]) -> dict[str, float]:
        outside = {name: number for name, number in value.items() if not 0.0 <= number <= 1.0}
        if outside:
            raise ValueError(f"thresholds are probabilities in [0, 1]; got {outside}")
        return value

    @field_validator("moderation_model", mode="before")
    @classmethod
    def none_means_none(cls, value: object) -> object:
        return None if isinstance(value, str) and value.lower() == "none" else value

    @model_validator(mode="after")
    def client_shares(self) -> Settings:
        """Each client's share of the queues: given, or a quarter of the queue (a request's largest size at least,
        so one can always be queued), and never more than the queue."""
        if self.max_client_queue_texts is None:
            self.max_client_queue_texts = max(self.max_queue_texts // 4, self.max_items)
        if self.max_client_queue_rows is None:
            self.max_client_queue_rows = max(self.max_queue_rows // 4, 16)
        self.max_client_queue_texts = min(self.max_client_queue_texts, self.max_queue_texts)
        self.max_client_queue_rows = min(self.max_client_queue_rows, self.max_queue_rows)
        return self

    @model_validator(mode="after")
    def one_source_of_replies(self) -> Settings:
        if self.policy is not None and self.upstream is not None:
            raise ValueError("give --policy (generate locally) or --upstream (guard proxy), not both")
        return self

    def check_guard(self) -> None:
        """The chat guard moderates requests and replies with the moderation model."""
        chat = self.policy is not None or self.upstream is not None
        if chat and self.guard != "off" and self.moderation_model is None:
            raise SettingsError(f"--guard {self.guard} moderates chat with a moderation model: give "
                                "--moderation-model DIR, or --guard off")

    def check_categories(self, categories: list[str]) -> None:
        unknown = sorted(set(self.moderation_thresholds) - set(categories))
        if unknown:
            raise SettingsError(f"--moderation-thresholds names {unknown}, which the moderation model does not "
                                f"have; its categories are {categories}")

    def check_heads(self, heads: list[str]) -> None:
        """Settings that name reward-model heads must name the served model's (checked before it loads)."""
        unknown = sorted(set(self.chat_reward_weights) - set(heads))
        if unknown:
            raise SettingsError(f"--chat-reward-weights names {unknown}, which the reward model does not have; "
                                f"its heads are {heads}")

    def read_api_keys(self) -> list[str]:
        """The keys from --api-keys-file (one a line) and KEEL_API_KEYS, in that order."""
        return read_keys(self.api_keys_file, "--api-keys-file") + self.api_keys

    def read_annotators(self) -> dict[str, str]:
        """name -> key from --annotator-keys-file (`name:key` lines)."""
        annotators: dict[str, str] = {}
        for line in read_keys(self.annotator_keys_file, "--annotator-keys-file"):
            name, sep, key = line.partition(":")
            if not sep or not name.strip() or not key.strip() or name.strip() in annotators:
                raise SettingsError(f"--annotator-keys-file: each line is a unique `name:key`, got {name.strip()!r}")
            annotators[name.strip()] = key.strip()
        return annotators

    def read_admin_keys(self) -> list[str]:
        """The keys from --admin-keys-file (one a line)."""
        return read_keys(self.admin_keys_file, "--admin-keys-file")

    def longest_request_s(self) -> float:
        """The longest a request may run under these settings: what a graceful shutdown waits for."""
        chat = self.policy is not None or self.upstream is not None
        return max(self.request_timeout_s, self.generation_timeout_s if chat else 0.0)

    def inference_workers(self, backend: str) -> int:
        """Workers for the backend `auto` resolved to (see keel.core.runtime.choose_backend)."""
        if self.workers:
            return self.workers
        return 1 if backend == "torch" else usable_cpus()


def is_env_only(field: FieldInfo) -> bool:
    """A secret's setting: from the environment only, never a flag (`ps` would show it)."""
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("env_only"))


def settings_table() -> str:
    """Every setting as a Markdown table row: flag, environment variable, default, description (docs/service.md
    holds this table; a test keeps the two the same)."""
    rows = ["| flag | environment | default | what it does |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        env_only = is_env_only(field)
        flag = "(none: a secret)" if env_only else f"`--{name.replace('_', '-')}`"
        default = "" if field.default_factory or field.default is None else f"`{field.default}`"
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| {flag} | `KEEL_{name.upper()}` | {default} | {description} |")
    return "\n".join(rows) + "\n"


def read_keys(path: Path | None, flag: str) -> list[str]:
    """A keys file's keys, one a line, # comments allowed; none for no file."""
    if path is None:
        return []
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise SettingsError(f"{flag}: cannot read {path}: {error.strerror}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise SettingsError(f"{flag}: {path} holds no keys (one key a line)")
    return keys
