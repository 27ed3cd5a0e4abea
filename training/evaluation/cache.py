"""The evaluation cache: scores, generations and likelihoods in sqlite, keyed by a fingerprint of the model's
weights, and the reward models and policies that read and write through it. A re-run only computes what changed."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from keel.core.artifact import file_sha256
from keel.core.onnx_engine import FP32_FILE, INT8_FILE
from keel.core.text import Conversation, ModelInput

log = logging.getLogger(__name__)


class EvalCache:
    """A persistent key -> JSON value store (sqlite). Keys are sha256 digests of what produced the value."""

    def __init__(self, path: Path | None):
        self.db = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path)
            self.db.execute("CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.hits = self.misses = 0

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def through(self, keys: list[str], compute: Callable[[list[int]], list[Any]], chunk: int = 1024,
                desc: str = "", progress: bool = False) -> list[Any]:
        """Values for keys; compute(indices of the missing ones) fills the gaps chunk by chunk, each chunk stored
        as soon as it is done (an interrupted run keeps what it computed)."""
        found: dict[str, Any] = {}
        if self.db is not None and keys:
            for start in range(0, len(keys), 500):  # sqlite's bound-parameter limit
                part = keys[start : start + 500]
                marks = ",".join("?" * len(part))
                found.update((k, json.loads(v)) for k, v in
                             self.db.execute(f"SELECT key, value FROM cache WHERE key IN ({marks})", part))
        first_missing: dict[str, int] = {}  # a key asked for twice is computed once
        for i, k in enumerate(keys):
            if k not in found:
                first_missing.setdefault(k, i)
        missing = list(first_missing.values())
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        with tqdm(total=len(missing), desc=desc, unit="item", disable=not progress or not missing, leave=False) as bar:
            for start in range(0, len(missing), chunk):
                indices = missing[start : start + chunk]
                computed = [(keys[i], v) for i, v in zip(indices, compute(indices))]
                found.update(computed)
                if self.db is not None:
                    self.db.executemany("INSERT OR REPLACE INTO cache VALUES (?, ?)",
                                        [(k, json.dumps(v)) for k, v in computed])
                    self.db.commit()
                bar.update(len(part))
        return [found[k] for k in keys]


def fingerprint(directory: Path, patterns: Sequence[str]) -> str:
    """sha256 over the files that define a model, so a retrained model never reuses another's cache."""
    digest = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(directory.glob(pattern)):
            digest.update(path.name.encode() + file_sha256(path).encode())
    return digest.hexdigest()[:16]


class CachedRewardModel:
    """A RewardRuntime whose raw scores go through the cache."""

    def __init__(self, name: str, backend: str, cache: EvalCache, progress: bool = False):
        from keel.core.runtime import BatchLimits, RewardRuntime
        from keel.training.policy.rewards import reward_model_directory

        directory = reward_model_directory(name)
        self.runtime = RewardRuntime(directory, backend=backend, limits=BatchLimits(64, 8192))
        files = {"onnx-int8": INT8_FILE, "onnx": FP32_FILE, "torch": "*.safetensors"}[self.runtime.backend]
        self.fingerprint = fingerprint(directory, ["keel.json", files])
        self.cache, self.progress = cache, progress
        self.path = str(directory)

    def raw(self, inputs: Sequence[ModelInput]) -> np.ndarray:
        keys = [EvalCache.key("reward", self.fingerprint, list(i)) for i in inputs]
        values = self.cache.through(keys, lambda missing: self.runtime.score([inputs[i] for i in missing]).tolist(),
                                    desc="scoring", progress=self.progress)
        return np.array(values, dtype=np.float32).reshape(len(inputs), len(self.runtime.heads))

    def head(self, preferred: str | None) -> str:
        return preferred if preferred in self.runtime.heads else self.runtime.primary_head

    def flags(self, inputs: Sequence[ModelInput]) -> tuple[np.ndarray, np.ndarray]:
        """(flagged [N] by the reward heads' own thresholds, normalised scores z [N, heads])."""
        z = self.runtime.transform(self.raw(inputs))
        return self.flagged(z), z

    def flagged(self, z: np.ndarray, guard: bool = False) -> np.ndarray:
        """Which normalised scores the reward heads' stand-in moderation thresholds flag (keel.json's
        `moderation`); with `guard`, at their guard thresholds. (The service moderates with a moderation model.)"""
        from keel.core.moderation import category_scores, flags

        manifest = self.runtime.manifest
        thresholds = [manifest.guard_threshold(h) if guard else manifest.moderation[h].threshold
                      for h in self.runtime.heads]
        return np.asarray(flags(category_scores(z), thresholds).any(axis=1))


class CachedPolicy:
    """A causal LM whose greedy responses and answer log-likelihoods go through the cache."""

    def __init__(self, name: str, cache: EvalCache, max_prompt_length: int, max_new_tokens: int, batch_size: int):
        from keel.core.hardware import pick_device
        from keel.core.policy import load_policy, load_tokenizer, resolve_policy

        self.path = resolve_policy(name)
        self.device = pick_device()
        self.tokenizer = load_tokenizer(self.path)
        self.model = load_policy(self.path).to(self.device).eval()
        directory = Path(self.path)
        self.fingerprint = (fingerprint(directory, ["config.json", "*.safetensors", "*.bin"]) if directory.is_dir()
                            else self.path)
        self.cache = cache
        self.max_prompt_length, self.max_new_tokens, self.batch_size = max_prompt_length, max_new_tokens, batch_size

    def _autocast(self) -> Any:
        import contextlib

        import torch

        # bf16 autocast on GPUs; on CPUs it recasts every weight at every step, so fp32 is faster there.
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()

    def responses(self, conversations: Sequence[Conversation], desc: str, progress: bool) -> list[str]:
        from keel.training.policy.common import generate

        def compute(missing: list[int]) -> list[str]:
            # Similar prompt lengths in a batch waste less padding.
            order = sorted(missing, key=lambda i: len(conversations[i][-1].content))
            texts: dict[int, str] = {}
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                with self._autocast():
                    _, replies = generate(self.model, self.tokenizer, [conversations[i] for i in idx],
                                          self.max_prompt_length, self.max_new_tokens, greedy=True)
                texts.update(zip(idx, replies))
            return [texts[i] for i in missing]

        keys = [EvalCache.key("greedy", self.fingerprint, self.max_prompt_length, self.max_new_tokens,
                              [[m.role, m.content] for m in c]) for c in conversations]
        return self.cache.through(keys, compute, chunk=4 * self.batch_size, desc=desc, progress=progress)

    def option_logprobs(self, pairs: Sequence[tuple[Conversation, str]], desc: str, progress: bool
                        ) -> list[tuple[float, int]]:
        """(sum of log p(option tokens | conversation), token count) for each (conversation, option); the end
        token the teacher-forced sequence closes with is not counted."""
        import torch

        from keel.training.policy.common import response_logprobs, teacher_forced

        def compute(missing: list[int]) -> list[tuple[float, int]]:
            sequences = teacher_forced(self.tokenizer, [pairs[i][0] for i in missing], [pairs[i][1] for i in missing],
                                       self.max_prompt_length, 128).to(self.device)
            with torch.no_grad(), self._autocast():
                logprobs = response_logprobs(self.model, sequences)[0].float()
            mask = sequences.response_mask.clone()
            mask[torch.arange(len(missing)), mask.sum(dim=1).long() - 1] = 0.0  # the end token
            return [(float(s), int(n)) for s, n in zip((logprobs * mask).sum(1).tolist(), mask.sum(1).tolist())]

        keys = [EvalCache.key("option", self.fingerprint, self.max_prompt_length, [[m.role, m.content] for m in c], o)
                for c, o in pairs]
        return [tuple(v) for v in self.cache.through(keys, compute, chunk=self.batch_size, desc=desc, progress=progress)]
