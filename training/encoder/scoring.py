"""Scoring many texts with an encoder model (torch or ONNX Runtime behind a Scorer); the metrics computed on
the scores are in keel.training.evaluation.metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from keel.core.reward_model import RewardModel
from keel.core.runtime import WINDOW_OVERLAP, max_over_windows
from keel.core.text import ModelInput
from keel.core.tokenizer import PairTokenizer

# A scorer maps (context, response) inputs to raw scores [len(inputs), heads] (torch or ONNX Runtime behind it).
Scorer = Callable[[Sequence[ModelInput]], np.ndarray]


def encode(tokenizer: PreTrainedTokenizerBase, inputs: Sequence[ModelInput], max_length: int) -> list[dict[str, list[int]]]:
    """Tokenise (context, response) pairs as two segments, without padding. Over max_length, tokens go from
    the longer segment first, on the tokenizer's truncation side (left: the oldest turns go first)."""
    if not inputs:
        return []
    contexts, responses = zip(*inputs)
    encoded = tokenizer(list(contexts), list(responses), truncation="longest_first", max_length=max_length)
    return [{key: encoded[key][i] for key in encoded} for i in range(len(inputs))]


def encode_windows(tokenizer: PreTrainedTokenizerBase, inputs: Sequence[ModelInput], max_length: int
                   ) -> tuple[list[dict[str, list[int]]], list[int]]:
    """Each pair as the runtime reads it for a windowed (moderation) model: as `encode` gives it when it fits,
    else overlapping windows of the response (keel.core.tokenizer.PairTokenizer.encode_windows, WINDOW_OVERLAP);
    and for each window the index of its pair. Training and thresholds then see what serving sees."""
    return window_tokenizer(tokenizer, max_length).encode_windows(inputs, WINDOW_OVERLAP)


def window_tokenizer(tokenizer: PreTrainedTokenizerBase, max_length: int) -> PairTokenizer:
    """The runtime's tokenizer over the same vocabulary (it copies the tokenizer: build it once, not per call)."""
    return PairTokenizer(tokenizer.backend_tokenizer, max_length, tokenizer.truncation_side,
                         tokenizer.pad_token_id or 0)


def collate(tokenizer: PreTrainedTokenizerBase, items: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest sequence (dynamic padding)."""
    return dict(tokenizer.pad(list(items), return_tensors="pt"))


def length_sorted_scorer(tokenizer: PreTrainedTokenizerBase, max_length: int, batch_size: int, heads: int,
                         run: Callable[[list[dict[str, list[int]]]], np.ndarray], windowed: bool = False) -> Scorer:
    """A scorer that tokenises, sorts by length (similar lengths pad less) and runs `run` on each batch. A
    windowed scorer reads a long text in overlapping windows and keeps each head's highest score, as served."""
    windows = window_tokenizer(tokenizer, max_length) if windowed else None

    def score(texts: Sequence[ModelInput]) -> np.ndarray:
        if windows is not None:
            encoded, owners = windows.encode_windows(texts, WINDOW_OVERLAP)
        else:
            encoded, owners = encode(tokenizer, texts, max_length), list(range(len(texts)))
        order = np.argsort([len(item["input_ids"]) for item in encoded])
        out = np.zeros((len(encoded), heads), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = run([encoded[i] for i in idx])
        return out if windows is None else max_over_windows(out, owners, len(texts))

    return score


def torch_scorer(
    model: RewardModel, tokenizer: PreTrainedTokenizerBase, max_length: int, batch_size: int = 64,
    features: bool = False, windowed: bool = False,
) -> Scorer:
    """Scores [texts, heads] of a RewardModel; with `features`, the pooled features its heads read; `windowed`
    as in length_sorted_scorer. The device is read at each call: training moves the model (to the GPU) after
    the scorer is made."""

    @torch.no_grad()
    def run(items: list[dict[str, list[int]]]) -> np.ndarray:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in collate(tokenizer, items).items()}
        scores: np.ndarray = (model.pool(**batch) if features else model(**batch).logits).float().cpu().numpy()
        model.train(was_training)
        return scores

    width = model.heads.in_features if features else len(model.head_names)
    return length_sorted_scorer(tokenizer, max_length, batch_size, width, run, windowed)


def cached(scorer: Scorer) -> Scorer:
    """A scorer that remembers scored texts, so metrics that share texts score them once."""
    memory: dict[ModelInput, np.ndarray] = {}

    def score(texts: Sequence[ModelInput]) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in memory))
        if new:
            memory.update(zip(new, scorer(new)))
        return np.stack([memory[t] for t in texts]) if texts else scorer(texts)

    return score
