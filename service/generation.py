"""The policy runtime: batched chat generation with per-request sampling settings and token streaming.

A batch holds rows (one per candidate reply) from several requests. Each row keeps its own temperature, top-p,
token limit, stop strings and random generator, so requests with different settings share one forward pass
per token. Prompts are left-padded; every step feeds each row its newest token with the KV cache. A row that
has finished keeps being fed its end token (cheaper than reshaping the cache) and is ignored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from keel.core.artifact import PolicyManifest
from keel.core.hardware import fast_dtype, pick_device
from keel.core.policy import encode_prompts, end_token_ids, load_policy, load_tokenizer, resolve_policy
from keel.service.metrics import Metrics
from keel.service.sampling import Generated, Row, Sampling


@dataclass
class _RowState:
    row: Row
    generator: torch.Generator | None
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters already streamed
    finish_reason: str | None = None
    first_token_at: float = 0.0


class PolicyRuntime:
    def __init__(self, directory: str | Path, max_prompt_tokens: int = 1024, metrics: Metrics | None = None,
                 threads: int | None = None, dtype: str = "auto"):
        self.directory = Path(resolve_policy(str(directory)))  # "default" and .gguf files: the cached conversion
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device()
        self.tokenizer = load_tokenizer(str(self.directory))
        # Weights stored in bf16 once where bf16 is fast: autocast would recast every weight at every decoding
        # step, which costs more than the matmuls themselves for one row at a time on a CPU (measured: 2x at
        # batch 1).
        weights = fast_dtype(self.device) if dtype == "auto" else getattr(torch, dtype)
        self.model = load_policy(str(self.directory), dtype=weights).to(self.device).eval()
        manifest = PolicyManifest.find(self.directory)
        self.name = self.directory.name
        self.version = manifest.created_at if manifest else "unversioned"
        self.algorithm = manifest.algorithm if manifest else None
        self.end_ids = end_token_ids(self.model, self.tokenizer)
        context = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_prompt_tokens = min(max_prompt_tokens, context // 2)
        self.max_context = context
        self.metrics = metrics
        self._lock = threading.Lock()  # one batch at a time: a batch already uses every core

    def describe(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": int(self.directory.stat().st_mtime),
                "owned_by": "keel", "version": self.version, "kind": "policy", "algorithm": self.algorithm}

    def warm_up(self) -> None:
        from keel.core.text import Message

        self.generate([Row((Message("user", "Hello"),), Sampling(temperature=0.0, max_tokens=2))])

    @torch.no_grad()
    def generate(self, rows: Sequence[Row], worker: int = 0) -> list[Generated]:
        """Generate every row's reply in one batch (the `worker` argument fits the Batcher's interface)."""
        with self._lock:
            return self._generate(rows)

    def _generate(self, rows: Sequence[Row]) -> list[Generated]:
        started = time.perf_counter()
        prompts = encode_prompts(self.tokenizer, [r.conversation for r in rows], self.max_prompt_tokens)
        input_ids = prompts["input_ids"].to(self.device)
        attention = prompts["attention_mask"].to(self.device)
        prompt_tokens = attention.sum(1).tolist()
        budget = min(max(r.sampling.max_tokens for r in rows), self.max_context - input_ids.shape[1])
        states = [_RowState(r, _generator(r.sampling.seed), int(n)) for r, n in zip(rows, prompt_tokens)]
        temperature = torch.tensor([r.sampling.temperature for r in rows], device=self.device)
        top_p = torch.tensor([r.sampling.top_p for r in rows], device=self.device)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        past = None
        step_ids = input_ids
        for _ in range(max(budget, 0)):
            output = self.model(input_ids=step_ids, attention_mask=attention, position_ids=positions,
                                past_key_values=past, use_cache=True, logits_to_keep=1)
            past = output.past_key_values
            next_ids = sample(output.logits[:, -1].float(), temperature, top_p, [s.generator for s in states])
            now = time.perf_counter()
            for i, state in enumerate(states):
                if state.finish_reason is None and state.row.abandoned is not None and state.row.abandoned.is_set():
                    state.finish_reason = "abandoned"  # nobody reads it: no more tokens, no stream
                    if self.metrics:
                        self.metrics.cancelled.labels("generation", "running").inc()
                elif state.finish_reason is None:
                    self._advance(state, int(next_ids[i]), now - started)
            if all(s.finish_reason is not None for s in states):
                break
            finished = torch.tensor([s.finish_reason is not None for s in states], device=self.device)
            next_ids = torch.where(finished, torch.full_like(next_ids, self.end_ids[0]), next_ids)
            step_ids = next_ids.unsqueeze(1)
            attention = torch.cat([attention, torch.ones_like(step_ids)], dim=1)
            positions = positions[:, -1:] + 1
        for state in states:
            if state.finish_reason is None:
                self._finish(state, "length")
        results = [_reply(state) for state in states]
        if self.metrics:
            self.metrics.generated_tokens.inc(sum(len(s.tokens) for s in states))
            self.metrics.generation_seconds.observe(time.perf_counter() - started)
        return results

    def _advance(self, state: _RowState, token: int, elapsed: float) -> None:
        """Take one token for a row: end token, stop string or token limit finish it; new text is streamed."""
        if not state.tokens:
            state.first_token_at = elapsed
        if token in self.end_ids:
            self._finish(state, "stop")
            return
        state.tokens.append(token)
        state.text = self.tokenizer.decode(state.tokens, skip_special_tokens=True)
        stops = [state.text.find(s) for s in state.row.sampling.stop if s in state.text]
        if stops:
            state.text = state.text[: min(stops)]
            self._finish(state, "stop")
        elif len(state.tokens) >= state.row.sampling.max_tokens:
            self._finish(state, "length")
        else:
            self._stream(state, final=False)

    def _finish(self, state: _RowState, reason: str) -> None:
        state.finish_reason = reason
        self._stream(state, final=True)
        if state.row.on_finish is not None:
            state.row.on_finish(_reply(state))

    @staticmethod
    def _stream(state: _RowState, final: bool) -> None:
        if state.row.on_text is None:
            return
        safe = len(state.text)
        if not final:
            # Hold back what may be the start of a stop string, or half of a multi-byte character.
            holdback = max((len(s) - 1 for s in state.row.sampling.stop), default=0)
            safe = max(state.sent, len(state.text.rstrip("\ufffd")) - holdback)
        if safe > state.sent or final:
            state.row.on_text(state.text[state.sent : safe], state.finish_reason if final else None)
            state.sent = safe


def _reply(state: _RowState) -> Generated:
    return Generated(state.text, state.finish_reason or "length", state.prompt_tokens, len(state.tokens),
                     state.first_token_at)


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row: greedy where temperature is 0, else nucleus sampling at the row's temperature/top-p.
    Rows with a seed draw from their own generator, so a seeded request is reproducible in any batch."""
    choices = logits.argmax(-1)
    sampled = (temperature > 0).nonzero().flatten().tolist()
    if not sampled:
        return choices
    rows = torch.tensor(sampled, device=logits.device)
    probabilities = torch.softmax(logits[rows] / temperature[rows].unsqueeze(1), dim=-1)
    order = None
    if bool((top_p[rows] < 1.0).any()):  # sorting the vocabulary is the costly part: only when needed
        probabilities, order = probabilities.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = probabilities.cumsum(-1) - probabilities > top_p[rows].unsqueeze(1)
        probabilities = probabilities.masked_fill(outside, 0.0)
    seeded = [k for k, row in enumerate(sampled) if generators[row] is not None]
    picks = torch.empty(len(sampled), dtype=torch.long, device=logits.device)
    unseeded = [k for k in range(len(sampled)) if generators[sampled[k]] is None]
    if unseeded:  # one call for every row without its own generator
        picks[unseeded] = torch.multinomial(probabilities[unseeded], 1).squeeze(1)
    for k in seeded:
        picks[k] = torch.multinomial(probabilities[k].cpu(), 1, generator=generators[sampled[k]]).item()
    if order is not None:
        picks = order.gather(1, picks.unsqueeze(1)).squeeze(1)
    choices[rows] = picks
    return choices
