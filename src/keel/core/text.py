"""One way to turn conversations into reward-model inputs, shared by training and serving.

The model reads a (context, response) pair: the conversation so far rendered as Anthropic HH transcripts
are ("Human: ...\n\nAssistant: ..."), and the response being judged. The tokenizer encodes them as two
segments, and the model pools over the response's tokens, so a long conversation does not drown out the
reply. A bare text is ("", text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROLE_LABELS = {"user": "Human", "assistant": "Assistant", "system": "System"}
_TURN = re.compile(r"\n\n(Human|Assistant|System):[ ]?")
_LABEL_ROLES = {label: role for role, label in ROLE_LABELS.items()}


ModelInput = tuple[str, str]  # (context, response)


@dataclass(frozen=True)
class Message:
    role: str
    content: str


Conversation = tuple[Message, ...]  # the conversation so far, ending with the user's turn


def render(messages: list[Message]) -> str:
    """Render a conversation as an HH-style transcript."""
    return "\n\n".join(f"{ROLE_LABELS[m.role]}: {m.content}" for m in messages)


def model_input(messages: list[Message] | tuple[Message, ...]) -> ModelInput:
    """The last message is the response; everything before it is the context."""
    return render(list(messages[:-1])), messages[-1].content


def parse_transcript(transcript: str) -> list[Message]:
    """Parse an Anthropic "\\n\\nHuman: ... \\n\\nAssistant: ..." transcript into messages.

    Raises ValueError when the text holds no turns at all.
    """
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript
    parts = _TURN.split(text)
    # parts: [preamble, label, content, label, content, ...]
    if len(parts) < 3:
        raise ValueError("not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript")
    return [Message(_LABEL_ROLES[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def messages_from_json(value: object) -> list[Message]:
    """Validate a chat-message list such as [{"role": "user", "content": "..."}].

    Raises ValueError for anything else (a bad row, not a bad call): the loaders report it with its file and line.
    """
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of {role, content} messages")
    messages = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise ValueError("each message needs a string 'content'")  # noqa: TRY004
        role = item.get("role")
        if role not in ROLE_LABELS:
            raise ValueError(f"unknown role {role!r}; expected one of {sorted(ROLE_LABELS)}")
        messages.append(Message(role, item["content"]))
    return messages
