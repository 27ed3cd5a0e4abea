"""The scoring runtime, independent of HTTP: a loaded reward or moderation model behind ONNX Runtime or torch.

Both kinds are an encoder with linear heads (keel/core/reward_model.py). `ModelRuntime.score(texts)` tokenises,
sorts by length, runs the engine in batches bounded by a token budget, and returns raw scores [texts, heads].
`scored(texts)` turns them into what the kind serves: z-scores for a reward model (RewardRuntime), category
probabilities for a moderation model (ModerationRuntime). It is synchronous; the service's batcher calls it
from worker threads, the evaluation suite and the RL reward function directly. The ONNX path needs no torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from keel.core.artifact import ArtifactError, ModerationManifest, RewardManifest
from keel.core.hardware import has_cuda, int8_is_fast, usable_cpus
from keel.core.moderation import flags, probabilities
from keel.core.onnx_engine import FP32_FILE, INT8_FILE, OnnxEngine, int8_outdated, pad_batch
from keel.core.text import ModelInput
from keel.core.tokenizer import PairTokenizer

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

# Consecutive windows of a long text share this many tokens, so a sentence cut by one window is whole in the next.
WINDOW_OVERLAP = 32


def max_over_windows(per_window: np.ndarray, owners: Sequence[int], texts: int) -> np.ndarray:
    """[texts, heads]: each text's highest raw score per head over its windows (`owners[w]` is window w's text).
    Sigmoid is monotone, so the highest logit is the highest probability: harm anywhere in a text flags it."""
    out = np.full((texts, per_window.shape[1]), -np.inf, dtype=per_window.dtype)
    np.maximum.at(out, np.asarray(owners, dtype=np.int64), per_window)
    return out

# Called after each engine batch with (seconds, texts, padded tokens): the service's Prometheus histograms.
BatchObserver = Callable[[float, int, int], None]


class TorchEngine:
    def __init__(self, directory: Path, heads: list[str], threads: int, pad_id: int):
        import torch

        from keel.core.hardware import pick_device
        from keel.core.reward_model import RewardModel

        torch.set_num_threads(threads)
        self.device = pick_device()
        self.model = RewardModel.load(directory).to(self.device).eval()
        if self.model.head_names != heads:
            raise ArtifactError(f"{directory}: the weights' heads {self.model.head_names} are not keel.json's {heads}")
        self.pad_id = pad_id
        self.input_names = ["input_ids", "attention_mask"] + (
            ["token_type_ids"] if self.model.backbone.config.type_vocab_size > 1 else [])

    def run(self, items: Sequence[dict[str, list[int]]]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            batch = {k: torch.from_numpy(v).to(self.device)
                     for k, v in pad_batch(items, self.input_names, self.pad_id).items()}
            scores: np.ndarray = self.model(**batch).logits.float().cpu().numpy()
            return scores


def choose_backend(directory: Path) -> str:
    """The `auto` backend: torch on a GPU (Keel's ONNX Runtime is CPU-only); on a CPU the int8 graph where int8
    is faster (VNNI, AMX, Arm dot product), else the fp32 graph, which there is as fast and gives exact scores;
    torch for a model exported without ONNX."""
    if has_cuda():
        return "torch"
    if int8_is_fast() and (directory / INT8_FILE).exists():
        return "onnx-int8"
    return "onnx" if (directory / FP32_FILE).exists() else "torch"


@dataclass
class BatchLimits:
    max_batch_size: int = 64
    max_batch_tokens: int = 16384


def service_batch_limits(backend: str) -> BatchLimits:
    """The service's batch limits unless set: big batches for torch on a GPU; on a CPU one text at a time, as
    padding costs more than batching saves there (bench/serve_bench.py measures it; docs/experiments.md has the
    figures). Waiting for a batch to fill is left to max_wait_ms (0 by default)."""
    return BatchLimits() if backend == "torch" and has_cuda() else BatchLimits(1, 512)


R = TypeVar("R", bound="ModelRuntime")


@dataclass
class Scored(Generic[R]):
    values: np.ndarray  # [texts, heads]: z-scores of a reward model, probabilities of a moderation model
    runtime: R  # the model (version) that produced them
    tokens: np.ndarray | None = None  # [texts]: tokens the model read (every window's, for a windowed model)
    truncated: np.ndarray | None = None  # [texts]: whether the text was cut to fit the model's window

    def __getitem__(self, index: slice) -> Scored[R]:  # the batcher hands each request its slice
        return Scored(self.values[index], self.runtime, None if self.tokens is None else self.tokens[index],
                      None if self.truncated is None else self.truncated[index])

    @staticmethod
    def combine(parts: list[Scored[R]]) -> Scored[R]:
        """One request's scores from the several batches its chunks ran in. A reload between two of them would
        mix two models' scores: ModelChanged, and the caller scores the request again."""
        if any(part.runtime is not parts[0].runtime for part in parts):
            raise ModelChanged("the model was reloaded while this request was being scored")
        if len(parts) == 1:
            return parts[0]
        counted = all(part.tokens is not None and part.truncated is not None for part in parts)
        return Scored(np.concatenate([part.values for part in parts]), parts[0].runtime,
                      np.concatenate([p.tokens for p in parts if p.tokens is not None]) if counted else None,
                      np.concatenate([p.truncated for p in parts if p.truncated is not None]) if counted else None)


class ModelChanged(Exception):
    pass


class ModelRuntime:
    """What both kinds share: the manifest, tokenizer and engines. A subclass reads its kind's manifest and says
    what its scores mean (`transform`), and whether it reads long texts whole (`windowed`)."""

    manifest: RewardManifest | ModerationManifest
    windowed = False

    def __init__(self, directory: str | Path, backend: str = "auto", threads: int | None = None,
                 limits: BatchLimits | None = None, observe_batch: BatchObserver | None = None, workers: int = 1):
        self.directory = Path(directory)
        self.manifest = manifest = self.read_manifest(self.directory)
        self.heads = manifest.heads
        self.max_length = manifest.max_length
        self.version = manifest.created_at or "unknown"
        self.name = self.directory.name
        self.backend = choose_backend(self.directory) if backend == "auto" else backend
        self.limits = limits or BatchLimits()
        self.observe_batch = observe_batch
        threads = threads or max(1, usable_cpus() // workers)
        try:
            self.tokenizer = PairTokenizer.from_directory(self.directory, self.max_length, manifest.truncation_side)
            if self.backend == "torch":  # one model, however many workers: torch runs one batch at a time here
                self.engines: list[OnnxEngine | TorchEngine] = [
                    TorchEngine(self.directory, self.heads, threads, self.tokenizer.pad_token_id)]
            else:  # one session per worker, so workers run batches side by side
                onnx_file = self.directory / (INT8_FILE if self.backend == "onnx-int8" else FP32_FILE)
                if self.backend == "onnx-int8" and int8_outdated(manifest.onnx):
                    log.warning("%s was made by an older int8 export, which strays further from fp32; "
                                "`keel export reward --model %s` remakes it", onnx_file, self.directory)
                self.engines = [OnnxEngine(onnx_file, self.tokenizer.pad_token_id, threads) for _ in range(workers)]
        except ArtifactError:
            raise
        except Exception as error:  # missing, truncated or corrupt files: say which model and why
            raise ArtifactError(f"cannot load {self.backend} model from {self.directory}: {error}") from error

    @property
    def workers(self) -> int:
        return len(self.engines)

    def score(self, inputs: Sequence[ModelInput], worker: int = 0) -> np.ndarray:
        """Raw scores [len(inputs), heads]. A windowed model (moderation) reads a long text in overlapping windows
        and keeps each head's highest score over them; any other cuts a long text at max_length."""
        return self.score_counted(inputs, worker)[0]

    def score_counted(self, inputs: Sequence[ModelInput], worker: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw scores, and per input the tokens read and whether it was cut (never, for a windowed model)."""
        if self.windowed:
            encoded, owners = self.tokenizer.encode_windows(inputs, WINDOW_OVERLAP)
            truncated = np.zeros(len(inputs), dtype=bool)
        else:
            encoded, cut = self.tokenizer.encode_counted(inputs)
            owners, truncated = list(range(len(inputs))), np.array(cut, dtype=bool)
        tokens = np.zeros(len(inputs), dtype=np.int64)
        np.add.at(tokens, np.array(owners, dtype=np.int64), [len(item["input_ids"]) for item in encoded])
        per_window = self.run_batches(encoded, worker)
        if len(encoded) == len(inputs):
            return per_window, tokens, truncated
        return max_over_windows(per_window, owners, len(inputs)), tokens, truncated

    def run_batches(self, encoded: list[dict[str, list[int]]], worker: int = 0) -> np.ndarray:
        """Raw scores of tokenised inputs, sorted by length and cut into token-budgeted batches. Each worker
        thread passes its own index, so it runs its own engine."""
        engine = self.engines[worker]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
        out = np.empty((len(encoded), len(self.heads)), dtype=np.float32)
        start = 0
        while start < len(order):
            end = start + 1
            # Sorted ascending, so the padded size of [start, end) is (end - start) * length of the last item.
            while (end < len(order) and end - start < self.limits.max_batch_size
                   and (end - start + 1) * len(encoded[order[end]]["input_ids"]) <= self.limits.max_batch_tokens):
                end += 1
            idx = order[start:end]
            began = time.perf_counter()
            scores = engine.run([encoded[i] for i in idx])
            if scores.shape != (len(idx), len(self.heads)):
                raise ArtifactError(f"model returned scores of shape {scores.shape}, expected "
                                    f"({len(idx)}, {len(self.heads)}): the ONNX file does not match keel.json")
            out[idx] = scores
            if self.observe_batch:
                self.observe_batch(time.perf_counter() - began, len(idx), len(idx) * len(encoded[idx[-1]]["input_ids"]))
            start = end
        return out

    @staticmethod
    def read_manifest(directory: Path) -> RewardManifest | ModerationManifest:
        raise NotImplementedError

    def transform(self, raw: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def scored(self, inputs: Sequence[ModelInput], worker: int = 0) -> Scored[Self]:
        """The served scores, tagged with this runtime (a reload never mixes one model's scores with another's
        name, version or thresholds), with the tokens read and what was cut."""
        raw, tokens, truncated = self.score_counted(inputs, worker)
        return Scored(self.transform(raw), self, tokens, truncated)

    def warm_up(self) -> None:
        """Score a real batch so the first request pays no start-up cost, and check the model's output."""
        self.score([("Human: Hello, how are you?", "I'm well, thanks for asking."), ("", "warm-up")] * 4)

    def describe(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": int(self.directory.stat().st_mtime),
                "owned_by": "keel", "kind": self.manifest.kind, "version": self.version, "backend": self.backend,
                "base_model": self.manifest.base_model}


class RewardRuntime(ModelRuntime):
    manifest: RewardManifest

    def __init__(self, directory: str | Path, backend: str = "auto", threads: int | None = None,
                 limits: BatchLimits | None = None, observe_batch: BatchObserver | None = None, workers: int = 1):
        super().__init__(directory, backend, threads, limits, observe_batch, workers)
        self.primary_head = self.manifest.primary_head
        self.mean = np.array([self.manifest.normalization[h].mean for h in self.heads], dtype=np.float32)
        self.std = np.array([self.manifest.normalization[h].std for h in self.heads], dtype=np.float32)

    @staticmethod
    def read_manifest(directory: Path) -> RewardManifest:
        return RewardManifest.read(directory)

    def transform(self, raw: np.ndarray) -> np.ndarray:
        """z = (raw - mean) / std with the validation statistics in keel.json."""
        return (raw - self.mean) / self.std

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "heads": self.heads, "primary_head": self.primary_head}


class ModerationRuntime(ModelRuntime):
    manifest: ModerationManifest
    windowed = True  # harm anywhere in a text flags it, not only in its first max_length tokens

    def __init__(self, directory: str | Path, backend: str = "auto", threads: int | None = None,
                 limits: BatchLimits | None = None, observe_batch: BatchObserver | None = None, workers: int = 1):
        super().__init__(directory, backend, threads, limits, observe_batch, workers)
        self.categories = self.heads
        self.thresholds = {c: self.manifest.thresholds[c].threshold for c in self.categories}

    @staticmethod
    def read_manifest(directory: Path) -> ModerationManifest:
        return ModerationManifest.read(directory)

    def transform(self, raw: np.ndarray) -> np.ndarray:
        """Each category's probability, sigma(raw)."""
        return probabilities(raw)

    def flagged(self, values: np.ndarray) -> np.ndarray:
        """[texts, categories]: which probabilities reach the model's thresholds."""
        return flags(values, [self.thresholds[c] for c in self.categories])

    def any_harm(self, values: np.ndarray) -> np.ndarray:
        """A continuous score of harm at all: the highest probability among the categories that can flag."""
        flaggable: np.ndarray = values[:, [self.thresholds[c] is not None for c in self.categories]].max(axis=1)
        return flaggable

    def describe(self) -> dict[str, Any]:
        """The categories with their thresholds and how good each is (held-out AUPRC, precision, recall)."""
        test = self.manifest.metrics.get("test", {}).get("categories", {})
        categories = {c: {"threshold": self.thresholds[c], "threshold_rule": self.manifest.thresholds[c].rule,
                          **{f"test_{k}": v for k, v in test.get(c, {}).items()}} for c in self.categories}
        return {**super().describe(), "categories": categories, "guard_margin": self.manifest.guard_margin,
                "guard_margin_rule": self.manifest.guard_margin_rule}
