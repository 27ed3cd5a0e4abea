"""Request and response bodies of the HTTP API (OpenAI-compatible where OpenAI has the endpoint), and the checks
of a request against the server's limits that go beyond its shape."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from keel.core.text import Message, ModelInput, model_input, render
from keel.service.errors import ApiError
from keel.service.settings import Settings


def encodable(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800", or invalid UTF-8 bytes decoded leniently); no tokenizer can read
    them, so they are refused here, naming the field, instead of failing a shared batch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"text is not valid Unicode: a lone surrogate at character {error.start}") from None
    return text


Text = Annotated[str, AfterValidator(encodable)]


def encodable_texts(value: str | list[str] | None) -> str | list[str] | None:
    """`encodable` for a field that takes a string or a list of them (a union, checked after it is resolved)."""
    for i, text in enumerate([value] if isinstance(value, str) else value or []):
        try:
            encodable(text)
        except ValueError as error:
            raise ValueError(f"item {i}: {error}" if not isinstance(value, str) else str(error)) from None
    return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text


class ScoreItem(BaseModel):
    """One thing to score: a prompt and a response, a conversation, or a bare text."""

    model_config = ConfigDict(extra="forbid")
    prompt: Text | None = None
    response: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    text: Text | None = None

    @model_validator(mode="after")
    def one_shape(self) -> ScoreItem:
        shapes = [self.response is not None, self.messages is not None, self.text is not None]
        if sum(shapes) != 1 or (self.prompt is not None and self.response is None):
            raise ValueError("an item is {prompt, response}, {messages} or {text}")
        return self

    def model_input(self) -> ModelInput:
        """The (context, response) pair the reward model reads, built as in training."""
        if self.text is not None:
            return "", self.text
        if self.messages is not None:
            return model_input([Message(m.role, m.content) for m in self.messages])
        context = render([Message("user", self.prompt)]) if self.prompt is not None else ""
        return context, self.response or ""


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: list[ScoreItem] = Field(..., min_length=1)
    model: str | None = None


def check_input_limits(inputs: list[ModelInput], settings: Settings) -> None:
    """A scoring or moderation request's item count and text sizes, each over the limit named (ApiError)."""
    if len(inputs) > settings.max_items:
        raise ApiError(400, f"{len(inputs)} items in one request; the limit is {settings.max_items}",
                       param="input", code="too_many_items")
    for i, (context, response) in enumerate(inputs):
        if len(context) + len(response) > settings.max_chars:
            raise ApiError(400, f"input {i} has {len(context) + len(response)} characters; the limit is "
                           f"{settings.max_chars}", param=f"input.{i}", code="text_too_long")


class ScoreResult(BaseModel):
    index: int
    score: float = Field(description="the primary head's normalised score")
    scores: dict[str, float] = Field(description="every head's normalised score: (raw - mean) / std")
    truncated: bool = Field(False, description="the input did not fit the model's window and was cut (the "
                            "oldest turns of a conversation go first)")


class TokenUsage(BaseModel):
    """Tokens the model read, as embedding and scoring APIs report them."""

    prompt_tokens: int
    total_tokens: int

    @staticmethod
    def of(tokens: Iterable[int] | None) -> TokenUsage:
        count = int(sum(tokens)) if tokens is not None else 0
        return TokenUsage(prompt_tokens=count, total_tokens=count)


class ScoreResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    model_version: str
    data: list[ScoreResult]
    usage: TokenUsage | None = None


class TextPart(BaseModel):
    """OpenAI's multimodal moderation input: a list of parts is one input, moderated as one text."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ModerationRequest(BaseModel):
    input: str | list[str] | list[TextPart] | None = None
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="Keel extension, instead of `input`: a conversation whose last message "
        "is judged, a user message on its own, an assistant reply in its conversation")
    model: str | None = None
    thresholds: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]] | None = Field(
        None, description="per-category threshold overrides in [0, 1] (flag when category score >= threshold)")

    @model_validator(mode="after")
    def input_or_messages(self) -> ModerationRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give either `input` (texts) or `messages` (a conversation), not both")
        return self

    @field_validator("input", mode="before")
    @classmethod
    def one_kind_of_input(cls, value: object) -> object:
        """Say what is wrong with a list in words (a union's own errors name its first branch)."""
        if not isinstance(value, list) or not value:
            return value
        if not all(isinstance(item, str) for item in value) and not all(isinstance(item, dict) for item in value):
            raise ValueError("input must be a string, a list of strings, or a list of {type: text} parts, not a mix")
        for i, item in enumerate(value):
            if isinstance(item, dict) and item.get("type") != "text":
                kind = "image inputs are not supported" if item.get("type") == "image_url" else \
                    f"unknown part type {item.get('type')!r}"
                raise ValueError(f"item {i}: {kind}: send text, a list of texts, or text parts")
        return value

    _encodable_input = field_validator("input")(
        lambda value: value if value and isinstance(value, list) and isinstance(value[0], TextPart)
        else encodable_texts(value))

    def model_inputs(self) -> list[ModelInput]:
        """What the moderation model reads: each text on its own, ("", text); or the conversation's last message,
        a user message on its own and an assistant reply after the conversation before it."""
        if self.messages is not None:
            last = self.messages[-1]
            if last.role != "assistant":
                return [("", last.content)]
            return [model_input([Message(m.role, m.content) for m in self.messages])]
        if isinstance(self.input, str):
            return [("", self.input)]
        parts = [part for part in self.input or [] if isinstance(part, TextPart)]
        if parts:
            return [("", "\n".join(part.text for part in parts))]
        return [("", text) for text in self.input or [] if isinstance(text, str)]


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[Literal["text"]]]


class JudgedMessage(BaseModel):
    index: int = Field(description="position of the judged message in `messages`")
    role: Literal["system", "user", "assistant"]
    in_context: bool = Field(description="judged with the conversation before it (assistant replies)")


class ModerationResponse(BaseModel):
    id: str
    model: str
    model_version: str
    results: list[ModerationResult]
    judged: JudgedMessage | None = Field(None, description="with `messages`: which message was judged")
    usage: TokenUsage | None = Field(None, description="tokens read, every window of a long text included")


class ContentPart(BaseModel):
    """A part of a message's content, as the openai client sends it: Keel reads text parts only."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: Text | None = None


class ChatRequestMessage(BaseModel):
    """A chat message as OpenAI's API takes it: `developer` is read as `system`, text content parts are joined,
    `name` is accepted (and not shown to the model); tool messages and tool calls are refused (no tools here)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


# Requested features Keel does not have: refused with a 400 that names them, never silently ignored.
UNSUPPORTED_CHAT_FIELDS = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs",
                           "audio", "modalities", "prediction")


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat-completions request. Sampling penalties and metadata are ignored; features Keel does not
    have (tools, logprobs, a response_format other than text, image parts) are a 400 naming them. Strict types:
    `n: 1.0` or `stream: 0` are errors, not guesses."""

    model_config = ConfigDict(extra="ignore", strict=True)
    messages: list[ChatRequestMessage] = Field(..., min_length=1)
    model: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    audio: Any = None
    modalities: list[Any] | None = None
    prediction: Any = None
    response_format: dict[str, Any] | None = None
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, description="reply tokens (default and ceiling: server settings)")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    best_of: int | None = Field(None, ge=1, le=16, description="candidates sampled per choice and reranked by "
                                "the reward model (default: server setting)")

    @model_validator(mode="after")
    def supported(self) -> ChatCompletionRequest:
        asked = [name for name in UNSUPPORTED_CHAT_FIELDS if getattr(self, name) not in (None, False, [])]
        if self.response_format and self.response_format.get("type", "text") != "text":
            asked.append(f"response_format {self.response_format.get('type')!r}")
        for i, message in enumerate(self.messages):
            if message.role == "tool" or message.tool_calls:
                asked.append(f"messages.{i}: tool messages and tool calls")
            for part in message.content if isinstance(message.content, list) else []:
                if part.type != "text" or part.text is None:
                    asked.append(f"messages.{i}: content parts of type {part.type!r}")
        if asked:
            raise ValueError(f"not supported by this server: {', '.join(asked)}; Keel generates text only")
        if self.messages[-1].role not in ("user", "assistant"):
            raise ValueError("messages must end with a user message (or an assistant message to continue)")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return self

    _encodable_stop = field_validator("stop")(lambda value: encodable_texts(value))

    def conversation(self) -> tuple[Message, ...]:
        """The messages as the policy reads them (developer as system)."""
        return tuple(Message("system" if m.role == "developer" else m.role, m.text()) for m in self.messages)

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def within_limits(self, settings: Settings) -> tuple[int, int]:
        """(max_tokens, best_of) once the server's defaults apply; ApiError for a request over a limit: tokens,
        candidates, their product (the request's cost) or characters."""
        max_tokens = (self.max_completion_tokens or self.max_tokens
                      or min(settings.default_max_tokens, settings.max_tokens_limit))
        if max_tokens > settings.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {settings.max_tokens_limit}",
                           param="max_tokens", code="max_tokens_too_large")
        best_of: int = self.best_of or settings.best_of
        client_rows = settings.max_client_queue_rows or settings.max_queue_rows  # filled in by Settings
        if self.n * best_of > client_rows:
            raise ApiError(400, f"n * best_of = {self.n * best_of} candidates; the limit is "
                           f"{client_rows}", param="best_of", code="too_many_candidates")
        if self.n * best_of * max_tokens > settings.max_request_tokens:
            raise ApiError(400, f"n * best_of * max_tokens = {self.n * best_of * max_tokens} tokens; the limit is "
                           f"{settings.max_request_tokens}: ask for fewer choices, candidates or tokens",
                           param="max_tokens", code="request_too_costly")
        characters = sum(len(m.text()) for m in self.messages)
        if characters > settings.max_chars:
            raise ApiError(400, f"messages hold {characters} characters; the limit is {settings.max_chars}",
                           param="messages", code="text_too_long")
        return max_tokens, best_of


class ChoiceAudit(BaseModel):
    """Why this reply was chosen and what the guard made of it."""

    index: int
    reward: float | None = Field(description="the reward the candidates were ranked by (weighted head z-scores); "
                                 "null when the request itself was refused")
    scores: dict[str, float] = Field(description="every head's z-score for the reply, in context")
    moderation: ModerationResult | None = Field(description="the moderation model's verdict on the reply in "
                                                "context, or on the request when it was refused; null without one")
    candidates: int = Field(description="candidates sampled for this choice, over all guard attempts")
    rank: int = Field(description="rank by reward among the final attempt's candidates (0 = best)")
    guard: Literal["off", "passed", "regenerated", "refused", "request_refused", "stream_stopped"]
    attempts: int


class ChatAudit(BaseModel):
    reward_model: str
    reward_model_version: str
    policy: str
    choices: list[ChoiceAudit]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "content_filter"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    keel: ChatAudit


class FeedbackRequest(BaseModel):
    """Feedback on one response Keel returned (its `id`): thumbs or a 1-7 rating of a chat completion, or a
    correction of one moderation result (`index`) in some categories. Categories not named are not labelled."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)
    thumbs: Literal["up", "down"] | None = None
    rating: int | None = Field(None, ge=1, le=7)
    categories: dict[str, bool] | None = Field(None, min_length=1)
    index: int = Field(0, ge=0)
    comment: str | None = Field(None, max_length=4000)

    @model_validator(mode="after")
    def one_answer(self) -> FeedbackRequest:
        given = [name for name in ("thumbs", "rating", "categories") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of thumbs, rating or categories (got {given or 'none'})")
        return self

    def answer(self) -> tuple[str, dict[str, object], int]:
        """(kind, value, position) as the store keeps them."""
        if self.thumbs is not None:
            return "thumbs", {"thumbs": self.thumbs}, 0
        if self.rating is not None:
            return "rating", {"rating": self.rating}, 0
        return "moderation", {"categories": dict(self.categories or {})}, self.index


class FeedbackResponse(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"


LABEL_TASKS = ("moderation", "rating", "pairwise")


class LabelAnswer(BaseModel):
    """An annotator's answer on the labelling page: categories for a moderation result (each true or false, the
    ones not named left unlabelled), 1-7 on each principle for a reply, or the better of two candidates."""

    model_config = ConfigDict(extra="forbid")
    task: Literal["moderation", "rating", "pairwise"]
    item_id: str = Field(min_length=1, max_length=64)
    index: int = Field(0, ge=0)
    categories: dict[str, bool] | None = None
    ratings: dict[Literal["harmless", "helpful"], Annotated[int, Field(ge=1, le=7)]] | None = None
    first: int | None = None  # pairwise: the two candidates' ids as shown, and the winner
    second: int | None = None
    winner: Literal[1, 2, "tie", "skip"] | None = None

    @model_validator(mode="after")
    def answer_fits_task(self) -> LabelAnswer:
        needed = {"moderation": ("categories",), "rating": ("ratings",),
                  "pairwise": ("first", "second", "winner")}[self.task]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.task} answer needs {', '.join(missing)}")
        return self

    def stored(self) -> tuple[str, dict[str, object]]:
        """(kind, value) as the feedback store keeps them."""
        if self.task == "moderation":
            return "moderation", {"categories": dict(self.categories or {})}
        if self.task == "rating":
            return "rating", {"ratings": dict(self.ratings or {})}
        return "pairwise", {"preference": {"first": self.first, "second": self.second, "winner": self.winner}}


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(None, description="a version (directory) in the model store; default: CURRENT")
    model: Literal["reward", "moderation"] = Field("reward", description="which served model to reload")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
