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
    def __init__(self, directory: str | Path, max_length: int, truncation_side: str):
        directory = Path(directory)
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        # Over max_length, tokens go from the longer segment first, on the truncation side (left: oldest turns).
        self.tokenizer.enable_truncation(max_length, strategy="longest_first", direction=truncation_side)
        self.tokenizer.no_padding()
        self.pad_token_id = self._pad_id(directory)

    def _pad_id(self, directory: Path) -> int:
        """The pad token as transformers would pick it: tokenizer_config.json's pad_token, else its eos_token."""
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        for key in ("pad_token", "eos_token"):
            token = config.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and self.tokenizer.token_to_id(token) is not None:
                return self.tokenizer.token_to_id(token)
        return 0

    def encode(self, inputs: Sequence[ModelInput]) -> list[dict[str, list[int]]]:
        """Each pair as two segments, unpadded: input_ids and token_type_ids (the response is segment 1)."""
        encodings = self.tokenizer.encode_batch([(context, response) for context, response in inputs])
        return [{"input_ids": e.ids, "token_type_ids": e.type_ids} for e in encodings]
