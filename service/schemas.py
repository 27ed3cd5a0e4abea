"""Request and response bodies of the HTTP API (OpenAI-compatible where OpenAI has the endpoint)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.text import Message, ModelInput, model_input, render


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ScoreItem(BaseModel):
    """One thing to score: a prompt and a response, a conversation, or a bare text."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    response: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    text: str | None = None

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


class ScoreResult(BaseModel):
    index: int
    score: float = Field(description="the primary head's normalised score")
    scores: dict[str, float] = Field(description="every head's normalised score: (raw - mean) / std")


class ScoreResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    model_version: str
    data: list[ScoreResult]


class ModerationRequest(BaseModel):
    input: str | list[str]
    model: str | None = None
    thresholds: dict[str, float] | None = Field(
        None, description="per-category threshold overrides in [0, 1] (flag when category score >= threshold)")


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]


class ModerationResponse(BaseModel):
    id: str
    model: str
    model_version: str
    results: list[ModerationResult]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
