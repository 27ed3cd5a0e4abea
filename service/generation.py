"""The policy runtime: continuous (iteration-level) batching of chat generation, with per-request sampling
settings and token streaming.

One decoding loop runs in its own thread over a batch of rows (one per candidate reply, from any number of
requests). A row joins the batch at the next decoding step: its prompt is prefilled and its KV cache is
left-padded and concatenated onto the running batch's. A row leaves as soon as it finishes (end token, stop
string, token limit, or its request gone), so a short request never waits for a long one to end. Each row
keeps its own temperature, top-p, token limit, stop strings, random generator and position ids, so requests
with different settings share one forward pass per token.

Transformers' own continuous-batching manager (`generate_batch`, paged KV cache) was measured against this on
the default policy on CPU: this gave 1.5x its tokens per second (bench/batching_bench.py, docs/benchmarks.md),
so the scheduler is Keel's, over the DynamicCache the model already returns.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import deque
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


@dataclass(eq=False)
class _Call:
    """One `generate` call: its rows finish one by one; the caller waits for the last."""

    states: list[_RowState]
    submitted: float
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    running: int = 0  # rows not yet finished

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


@dataclass(eq=False)
class _RowState:
    row: Row
    call: _Call
    generator: torch.Generator | None
    prompt_tokens: int = 0
    limit: int = 0  # the most tokens this row may take: max_tokens, within the model's context
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters already streamed
    finish_reason: str | None = None
    first_token_at: float = 0.0


@dataclass
class _Batch:
    """The running rows and what the next decoding step feeds them: one token each, at its own position, over
    a KV cache whose columns are left-padded (attention 0) where a row had not yet started."""

    states: list[_RowState]
    cache: Any  # transformers' DynamicCache
    attention: torch.Tensor  # [rows, columns]
    positions: torch.Tensor  # [rows, 1]: the position of each row's next token
    next_ids: torch.Tensor  # [rows, 1]


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
        # transformers 5.25 renamed the KV cache's argument past_key_values to cache (the old name warns)
        self._cache_argument = "cache" if "cache" in inspect.signature(self.model.forward).parameters else (
            "past_key_values")
        self._pending: deque[_Call] = deque()
        self._wake = threading.Condition()
        self._loop: threading.Thread | None = None

    def describe(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": int(self.directory.stat().st_mtime),
                "owned_by": "keel", "version": self.version, "kind": "policy", "algorithm": self.algorithm}

    def warm_up(self) -> None:
        from keel.core.text import Message

        self.generate([Row((Message("user", "Hello"),), Sampling(temperature=0.0, max_tokens=2))])

    def generate(self, rows: Sequence[Row], worker: int = 0) -> list[Generated]:
        """Every row's reply. The rows join the running batch at its next step (the `worker` argument fits the
        Batcher's interface); this blocks until the last of them finishes."""
        call = _Call([], time.perf_counter())
        call.states = [_RowState(r, call, _generator(r.sampling.seed)) for r in rows]
        call.running = len(rows)
        with self._wake:
            if self._loop is None:
                self._loop = threading.Thread(target=self._decode_forever, name="keel-generation", daemon=True)
                self._loop.start()
            self._pending.append(call)
            self._wake.notify()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return [_reply(state) for state in call.states]

    # ---- the decoding loop (its own thread) -----------------------------------------------------------------

    def _decode_forever(self) -> None:
        batch: _Batch | None = None
        while True:
            with self._wake:
                while not self._pending and batch is None:
                    self._wake.wait()
                admitted = list(self._pending)
                self._pending.clear()
            with torch.no_grad():
                if admitted:
                    batch = self._admit(batch, admitted)
                if batch is not None:
                    batch = self._step(batch)

    def _admit(self, batch: _Batch | None, calls: list[_Call]) -> _Batch | None:
        """Prefill the new calls' prompts and add their rows to the batch. A call whose prompt fails alone."""
        try:
            joined = self._prefill(calls)
        except Exception as error:  # noqa: BLE001 (find the call that failed; the others go on)
            if len(calls) == 1:
                calls[0].fail(error)
                return batch
            for call in calls:
                batch = self._admit(batch, [call])
            return batch
        if joined is None:
            return batch
        return joined if batch is None else _merge(batch, joined)

    def _prefill(self, calls: list[_Call]) -> _Batch | None:
        states = [state for call in calls for state in call.states]
        prompts = encode_prompts(self.tokenizer, [s.row.conversation for s in states], self.max_prompt_tokens)
        input_ids = prompts["input_ids"].to(self.device)
        attention = prompts["attention_mask"].to(self.device)
        for state, count in zip(states, attention.sum(1).tolist()):
            state.prompt_tokens = int(count)
            state.limit = max(0, min(state.row.sampling.max_tokens, self.max_context - int(count)))
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        started = time.perf_counter()
        if self.metrics:
            for state in states:
                self.metrics.generation_queue_wait.labels(state.row.mode).observe(started - state.row.queued_at)
        output = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                            logits_to_keep=1)
        batch = _Batch(states, _returned_cache(output), attention, positions[:, -1:] + 1,
                       torch.zeros_like(input_ids[:, -1:]))
        return self._take_tokens(batch, output.logits[:, -1])

    def _step(self, batch: _Batch) -> _Batch | None:
        """One decoding step for every running row. A failure fails the requests in the batch, not the loop."""
        attention = torch.cat([batch.attention, torch.ones_like(batch.next_ids)], dim=1)
        try:
            output = self.model(input_ids=batch.next_ids, attention_mask=attention, position_ids=batch.positions,
                                use_cache=True, logits_to_keep=1, **{self._cache_argument: batch.cache})
            batch.cache, batch.attention, batch.positions = _returned_cache(output), attention, batch.positions + 1
            return self._take_tokens(batch, output.logits[:, -1])
        except Exception as error:  # noqa: BLE001
            for call in {id(s.call): s.call for s in batch.states}.values():
                call.fail(error)
            return None

    def _take_tokens(self, batch: _Batch, logits: torch.Tensor) -> _Batch | None:
        """Sample each row's next token, advance the rows, and drop the ones that finished."""
        states = batch.states
        temperature = torch.tensor([s.row.sampling.temperature for s in states], device=self.device)
        top_p = torch.tensor([s.row.sampling.top_p for s in states], device=self.device)
        next_ids = sample(logits.float(), temperature, top_p, [s.generator for s in states])
        now = time.perf_counter()
        for i, state in enumerate(states):
            if state.row.abandoned is not None and state.row.abandoned.is_set():
                state.finish_reason = "abandoned"  # nobody reads it: no more tokens, no stream
                if self.metrics:
                    self.metrics.cancelled.labels("generation", "running").inc()
                self._settle(state)
            elif state.limit == 0:
                self._finish(state, "length")
            else:
                self._advance(state, int(next_ids[i]), now - state.call.submitted)
        keep = [i for i, s in enumerate(states) if s.finish_reason is None]
        if not keep:
            return None
        batch.next_ids = next_ids.unsqueeze(1)
        return _select(batch, keep) if len(keep) < len(states) else batch

    def _advance(self, state: _RowState, token: int, elapsed: float) -> None:
        """Take one token for a row: end token, stop string or token limit finish it; new text is streamed."""
        if not state.tokens:
            state.first_token_at = elapsed
        if token in self.end_ids:
            self._finish(state, "stop")
            return
        state.tokens.append(token)
        if self.metrics:
            self.metrics.generated_tokens.inc()
        state.text = self.tokenizer.decode(state.tokens, skip_special_tokens=True)
        stops = [state.text.find(s) for s in state.row.sampling.stop if s in state.text]
        if stops:
            state.text = state.text[: min(stops)]
            self._finish(state, "stop")
        elif len(state.tokens) >= state.limit:
            self._finish(state, "length")
        else:
            self._stream(state, final=False)

    def _finish(self, state: _RowState, reason: str) -> None:
        state.finish_reason = reason
        self._stream(state, final=True)
        self._settle(state)

    def _settle(self, state: _RowState) -> None:
        """A finished row: hand its reply over, and wake its caller when it was the call's last."""
        if self.metrics and len(state.tokens) > 1:
            after_first = time.perf_counter() - state.call.submitted - state.first_token_at
            self.metrics.time_per_output_token.labels(state.row.mode).observe(after_first / (len(state.tokens) - 1))
        if state.row.on_finish is not None:
            state.row.on_finish(_reply(state))
        call = state.call
        call.running -= 1
        if call.running == 0:
            if self.metrics:
                self.metrics.generation_seconds.observe(time.perf_counter() - call.submitted)
            call.done.set()

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


def _merge(running: _Batch, joining: _Batch) -> _Batch:
    """One batch of two: each side's cache and attention left-padded to the longer one's columns, then stacked."""
    columns = max(running.attention.shape[1], joining.attention.shape[1])

    def pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        missing = columns - tensor.shape[dim]
        if missing == 0:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

    for mine, theirs in zip(_layers(running.cache), _layers(joining.cache)):
        mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)])
        mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)])
    return _Batch(running.states + joining.states, running.cache,
                  torch.cat([pad(running.attention, 1), pad(joining.attention, 1)]),
                  torch.cat([running.positions, joining.positions]), torch.cat([running.next_ids, joining.next_ids]))


def _select(batch: _Batch, keep: list[int]) -> _Batch:
    """The batch without its finished rows, and without the leading columns no remaining row attends to."""
    index = torch.tensor(keep, device=batch.attention.device)
    attention = batch.attention[index]
    start = int(attention.any(0).int().argmax())  # rows are contiguous up to the end: left columns may go
    for layer in _layers(batch.cache):
        layer.keys = layer.keys[index, :, start:]
        layer.values = layer.values[index, :, start:]
    return _Batch([batch.states[i] for i in keep], batch.cache, attention[:, start:], batch.positions[index],
                  batch.next_ids[index])


def _returned_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def _layers(cache: Any) -> list[Any]:
    """The cache's layers, each holding keys and values of shape [rows, heads, columns, head size]."""
    layers = list(cache.layers)
    if not all(hasattr(layer, "keys") and not getattr(layer, "is_sliding", False) for layer in layers):
        raise NotImplementedError("continuous batching needs a full-attention KV cache (no sliding windows or "
                                  "recurrent state); this policy's architecture has another kind")
    return layers

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
