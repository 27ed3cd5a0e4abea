"""(context, response) pairs to token ids with the `tokenizers` library alone.

The model directory's tokenizer.json is the fast tokenizer transformers itself runs; driving it directly keeps
transformers (and the torch it would import when present) out of a serving process. Truncation is set as
transformers sets it for `tokenizer(contexts, responses, truncation="longest_first", max_length=...)`, so ids
match training's exactly (tests/test_core.py compares them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from keel.core.text import ModelInput


class PairTokenizer:
    def __init__(self, tokenizer: Tokenizer, max_length: int, truncation_side: str, pad_token_id: int):
        self.max_length = max_length
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())  # own copies: truncation is set on them
        # Over max_length, tokens go from the longer segment first, on the truncation side (left: oldest turns).
        self.tokenizer.enable_truncation(max_length, strategy="longest_first", direction=truncation_side)
        self.tokenizer.no_padding()
        self.untruncated = Tokenizer.from_str(tokenizer.to_str())  # cuts long texts into windows
        self.untruncated.no_truncation()
        self.untruncated.no_padding()
        self.pad_token_id = pad_token_id

    @classmethod
    def from_directory(cls, directory: str | Path, max_length: int, truncation_side: str) -> PairTokenizer:
        """A model directory's tokenizer.json, with the pad token as transformers would pick it."""
        directory = Path(directory)
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        return cls(tokenizer, max_length, truncation_side, pad_token_id(tokenizer, directory))

    def encode_counted(self, inputs: Sequence[ModelInput]) -> tuple[list[dict[str, list[int]]], list[bool]]:
        """`encode`, and for each pair whether it was cut to max_length."""
        encodings = self.tokenizer.encode_batch([(context, response) for context, response in inputs])
        return ([{"input_ids": e.ids, "token_type_ids": e.type_ids} for e in encodings],
                [bool(e.overflowing) for e in encodings])

    def encode(self, inputs: Sequence[ModelInput]) -> list[dict[str, list[int]]]:
        """Each pair as two segments, unpadded: input_ids and token_type_ids (the response is segment 1)."""
        encodings = self.tokenizer.encode_batch([(context, response) for context, response in inputs])
        return [{"input_ids": e.ids, "token_type_ids": e.type_ids} for e in encodings]

    def encode_windows(self, inputs: Sequence[ModelInput], overlap: int) -> tuple[list[dict[str, list[int]]], list[int]]:
        """Every pair as one or more windows of at most max_length tokens, and the index of the pair each window
        belongs to. A pair that fits is one window, exactly as `encode` gives it. A longer response is cut into
        windows that overlap by `overlap` tokens, each after the same context; the context keeps at most half of
        the window (its end: the latest turns). The cost is linear in the response's length."""
        windows: list[dict[str, list[int]]] = []
        owners: list[int] = []
        budget = self.max_length - self.tokenizer.num_special_tokens_to_add(True)
        encodings = self.tokenizer.encode_batch([(context, response) for context, response in inputs])
        for index, ((context, response), whole) in enumerate(zip(inputs, encodings)):
            if not whole.overflowing:  # it fits: one window
                windows.append({"input_ids": whole.ids, "token_type_ids": whole.type_ids})
                owners.append(index)
                continue
            context_ids = self.untruncated.encode(context, add_special_tokens=False)
            if len(context_ids) > budget // 2:
                context_ids.truncate(budget // 2, direction="left")
            piece = self.untruncated.encode(response, add_special_tokens=False)
            size = budget - len(context_ids)
            piece.truncate(size, stride=min(overlap, size // 2), direction="right")
            for part in (piece, *piece.overflowing):
                merged = self.untruncated.post_process(context_ids, part)
                windows.append({"input_ids": merged.ids, "token_type_ids": merged.type_ids})
                owners.append(index)
        return windows, owners


def pad_token_id(tokenizer: Tokenizer, directory: Path) -> int:
    """The pad token as transformers would pick it: tokenizer_config.json's pad_token, else its eos_token."""
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    for key in ("pad_token", "eos_token"):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        token_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
        if token_id is not None:
            return int(token_id)
    return 0
