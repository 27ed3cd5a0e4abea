"""What every policy-training run does around its algorithm's update: load the policy (LoRA or full) and its
frozen reference, the optimiser, prompts and rewards; roll out, log, evaluate, checkpoint and resume; watch
KL and reward hacking; and publish the tuned policy as a self-describing model directory.

An algorithm module (sft, reinforce, rloo, ppo, dpo) reads top to bottom as:
    run = PolicyRun(config, output, "rloo", ...)
    for step in run.steps():
        ... build a loss ...
        run.optimize(loss)
        run.end_step(metrics)
    return run.finish()
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from keel.core.artifact import PolicyManifest, file_sha256, staged
from keel.core.policy import load_policy, load_tokenizer, resolve_policy
from keel.core.text import Conversation
from keel.training.config import ConfigError, to_dict
from keel.training.data import PromptSource, load_prompts, read_sources
from keel.training.evaluation.refusals import is_evasive
from keel.training.plots import plot_curves
from keel.training.policy.common import (
    Sequences,
    generate,
    repeated_ngram_fraction,
    response_logprobs,
    sequence_kl,
    whiten,
)
from keel.training.policy.config import PolicyConfig
from keel.training.policy.lora import add_lora, reference_mode
from keel.training.policy.rewards import RewardFunction
from keel.training.runs import append_metrics, read_metrics, resume_from, save_checkpoint, start_run

log = logging.getLogger(__name__)
T = TypeVar("T")
HACKING_WINDOW = 20  # logged steps over which reward is compared with response length and repetition
HACKING_SIGNALS = ("reward", "response_length", "repetition")  # what each step logs for that check


@dataclass(frozen=True)
class TrainingPrompt:
    """A prompt as its source describes it: reward-head weights of its own (None: the reward's), whether it is a
    harmful request (evasion penalties skip it), and the source's name (metrics per source)."""

    conversation: Conversation
    heads: dict[str, float] | None = None
    harmful: bool = False
    source: str = ""
    samples: int | None = None  # responses per step (None: the algorithm's samples_per_prompt)


@dataclass
class Rollout:
    conversations: list[Conversation]
    responses: list[str]
    sequences: Sequences
    rewards: torch.Tensor  # [B] the reward (heads weighted and clipped, penalties subtracted), minus unfinished
    head_scores: np.ndarray  # [B, heads] z-scores
    reference_logprobs: torch.Tensor  # [B, R]
    penalties: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> [B], before weights
    sources: list[str] = field(default_factory=list)  # [B] each prompt's source
    group_sizes: list[int] = field(default_factory=list)  # responses per prompt, in order (rows are grouped)


class PolicyRun:
    def __init__(self, config: PolicyConfig, output: Path, algorithm: str, resume: bool = False,
                 overwrite: bool = False, progress: bool = True, skip_bad_rows: bool = False,
                 on_policy: bool = True, value_head: bool = False):
        self.config, self.algorithm, self.progress = config, algorithm, progress
        t = config.training
        self.output, self.work, self.accelerator = start_run(output, resume, overwrite, t.precision, t.seed)
        self.metrics_path = self.work / "metrics.jsonl"
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process

        # ---- policy, reference, optional value head --------------------------------------------------------
        p = config.policy
        self.tokenizer = load_tokenizer(p.model)
        policy = load_policy(p.model)
        self.reference: torch.nn.Module | None = None
        if p.lora is not None:  # the reference is the same weights with the adapter switched off
            policy = add_lora(policy, p.lora.rank, p.lora.alpha, p.lora.dropout, p.lora.targets)
        elif algorithm != "sft":  # full fine-tuning keeps a frozen copy
            self.reference = load_policy(p.model).eval().requires_grad_(False).to(self.device)
        self.value_head = torch.nn.Linear(policy.config.hidden_size, 1) if value_head else None
        modules = [policy] + ([self.value_head] if self.value_head is not None else [])
        trainable = [param for module in modules for param in module.parameters() if param.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
        warmup = max(1, t.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        if self.value_head is not None:
            self.policy, self.value_head, self.optimizer, self.scheduler = self.accelerator.prepare(
                policy, self.value_head, optimizer, scheduler)
        else:
            self.policy, self.optimizer, self.scheduler = self.accelerator.prepare(policy, optimizer, scheduler)
        self.trainable = trainable

        # ---- prompts and rewards (off-policy algorithms use them only for evaluation) --------------------------
        if on_policy and not config.prompts.train:
            raise ConfigError("prompts.train is empty: give at least one prompt file")
        train_sources = config.prompts.train if on_policy else []
        with self.accelerator.main_process_first():  # the default reward model is trained once, if absent
            self.reward = RewardFunction(config.reward) if train_sources or config.prompts.evaluation else None
        self.train_prompts = self._load_prompts(train_sources, skip_bad_rows, training=True)
        self.eval_prompts = self._load_prompts(config.prompts.evaluation, skip_bad_rows)

        # ---- resume ------------------------------------------------------------------------------------------
        self.total_steps = t.steps  # SFT and DPO set it from their data
        self.state = resume_from(self.accelerator, self.work, self.metrics_path, resume)
        self.start_step = self.state["step"]
        self.kl_coef: float = self.state.get("kl_coef", t.kl_coef)
        self.algorithm_state: dict[str, Any] = self.state.get("algorithm_state", {})  # e.g. REINFORCE's baseline
        self.stopped_early: str | None = None
        self.warnings: list[str] = []
        self.hacking_signals_warned: set[str] = set()
        # reward, response length and repetition of the latest logged steps, for the reward-hacking check
        self.recent: deque[dict[str, float]] = deque(
            ({k: r[k] for k in HACKING_SIGNALS} for r in read_metrics(self.metrics_path)
             if all(k in r for k in HACKING_SIGNALS)), maxlen=HACKING_WINDOW)
        self.started = time.time()
        self.step = self.start_step
        self.samples_before = self._sample_table() if self.start_step == 0 else self.state.get("samples_before", [])
        if self.start_step == 0 and self.eval_prompts:
            self._log_row(0, self.evaluate())

    def _load_prompts(self, sources: Sequence[PromptSource], skip_bad_rows: bool,
                      training: bool = False) -> list[TrainingPrompt]:
        """Each source's prompts; for training, its `repeat` times (read_sources, as for reward, SFT and DPO data)."""

        def load(source: PromptSource, skip: bool) -> list[TrainingPrompt]:
            if source.heads and self.reward:
                self.reward.check_weights(source.heads)
            samples = source.samples if training else None  # held-out prompts: one response each
            return [TrainingPrompt(c, source.heads, source.harmful, prompt_source_name(source), samples)
                    for c in load_prompts(source, skip)]

        return read_sources(sources, skip_bad_rows, training, load)

    # ---- the loop ----------------------------------------------------------------------------------------
    def steps(self) -> Iterator[int]:
        self.bar = tqdm(total=self.total_steps, initial=self.start_step, desc=f"train {self.algorithm}",
                        unit="step", disable=not (self.is_main and self.progress))
        self.policy.train()
        for step in range(self.start_step, self.total_steps):
            self.step = step
            yield step
            self.bar.update(1)
            if self.stopped_early:
                break
        self.bar.close()

    def take(self, items: Sequence[T], step: int, count: int) -> list[T]:
        """This process's `count` items for a step, walking through `items` in a shuffled order per pass. A
        deterministic function of (seed, step), so a resumed run sees the same data; processes take disjoint
        slices."""
        total = count * self.accelerator.num_processes
        first = step * total
        orders: dict[int, list[int]] = {}  # one shuffle per pass the step touches (at most two)
        picked = []
        for position in range(first, first + total):
            epoch, index = divmod(position, len(items))
            if epoch not in orders:
                orders[epoch] = list(range(len(items)))
                random.Random(self.config.training.seed * 100_003 + epoch).shuffle(orders[epoch])
            picked.append(items[orders[epoch][index]])
        return picked[self.accelerator.process_index :: self.accelerator.num_processes]

    def is_eval_step(self) -> bool:
        every = self.config.training.eval_every
        return bool(every) and (self.step + 1) % every == 0 and self.step + 1 != self.total_steps

    @property
    def reward_function(self) -> RewardFunction:
        """The reward the algorithm optimises; a config without reward sources has none."""
        if self.reward is None:
            raise ConfigError("this algorithm needs a reward: give the config reward sources (prompts.train) or "
                              "a reward model")
        return self.reward

    @torch.no_grad()
    def rollout(self, prompts: Sequence[TrainingPrompt], samples: int = 1,
                greedy: bool = False) -> Rollout:
        """Sample `samples` responses per prompt, or the prompt's own number (a source's `samples`), grouped: a
        prompt's responses are consecutive rows. Score them, and take the reference's log-probs."""
        p = self.config.policy
        group_sizes = [samples if greedy else prompt.samples or samples for prompt in prompts]
        repeated = [prompt for prompt, size in zip(prompts, group_sizes) for _ in range(size)]
        conversations = [prompt.conversation for prompt in repeated]
        policy = self.accelerator.unwrap_model(self.policy)
        with self.autocast():  # bf16 sampling is ~25% faster on CPU
            sequences, texts = generate(policy, self.tokenizer, conversations, p.max_prompt_length,
                                        p.max_new_tokens, p.temperature, p.top_p, greedy=greedy)
        scored = self.reward_function(conversations, texts, [p.heads for p in repeated],
                                      [p.harmful for p in repeated])
        rewards = torch.tensor(scored.total, dtype=torch.float32, device=self.device)
        rewards -= self.config.training.unfinished_penalty * (~sequences.ended).float()
        return Rollout(conversations, texts, sequences, rewards, scored.head_z, self.reference_logprobs(sequences),
                       scored.penalties, [p.source for p in repeated], group_sizes)

    @torch.no_grad()
    def reference_logprobs(self, sequences: Sequences) -> torch.Tensor:
        with self.autocast(), reference_mode(self.accelerator.unwrap_model(self.policy), self.reference) as reference:
            return response_logprobs(reference, sequences, self.config.policy.temperature)[0]

    def sequence_returns(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For sequence-level policy gradients (REINFORCE, RLOO): the policy's log-probs of the responses (with
        gradients) and entropies [B, R], each response's KL to the reference [B], and its return [B]."""
        with self.autocast():
            logprobs, entropy, _ = response_logprobs(self.policy, rollout.sequences, self.config.policy.temperature,
                                                     with_entropy=True)
        assert entropy is not None  # asked for above
        kl = sequence_kl(logprobs.detach(), rollout.reference_logprobs, rollout.sequences.response_mask)
        # R = r(x, y) - beta * KL(x, y)
        returns = rollout.rewards - self.kl_coef * kl
        return logprobs, entropy, kl, whiten(returns) if self.config.training.whiten_rewards else returns

    def autocast(self) -> Any:
        return self.accelerator.autocast()

    def optimize(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.trainable, self.config.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def end_step(self, metrics: dict[str, float], kl: float | None = None, responses: int = 0) -> None:
        """Log a finished step; evaluate, checkpoint, adapt the KL coefficient and check the KL budget."""
        t = self.config.training
        done = self.step + 1
        metrics = {k: self._mean_over_processes(v) for k, v in metrics.items()}
        if kl is not None:
            kl = self._mean_over_processes(kl)
            if t.kl_target is not None:  # adaptive controller (Ziegler et al. 2019): beta *= 1 + e * n / horizon
                error = float(np.clip(kl / t.kl_target - 1.0, -0.2, 0.2))
                self.kl_coef *= 1.0 + error * responses * self.accelerator.num_processes / t.kl_horizon
            metrics.update(kl=kl, kl_coef=self.kl_coef)
            if t.kl_budget is not None and kl > t.kl_budget:
                self.stopped_early = f"mean KL {kl:.2f} passed the budget {t.kl_budget} at step {done}"
                log.warning("stopping early: %s", self.stopped_early)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        if self.is_eval_step() and self.eval_prompts:
            metrics.update(self.evaluate())
            # Off-policy runs (SFT, DPO) sample nothing while training: their held-out KL is the one they have.
            held_out_kl = self._from_main_process(metrics.get("eval_kl", 0.0))
            if kl is None and t.kl_budget is not None and held_out_kl > t.kl_budget:
                self.stopped_early = f"held-out KL {held_out_kl:.2f} passed the budget {t.kl_budget} at step {done}"
                log.warning("stopping early: %s", self.stopped_early)
        self._log_row(done, metrics)
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("reward", "kl", "loss")})
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done != self.total_steps:
            save_checkpoint(self.accelerator, self.work, done, {"kl_coef": self.kl_coef,
                            "samples_before": self.samples_before, "algorithm_state": self.algorithm_state})

    def _mean_over_processes(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return float(value)
        tensor = torch.tensor([float(value)], device=self.device)
        return float(self.accelerator.reduce(tensor, reduction="mean").item())

    def _from_main_process(self, value: float) -> float:
        """The main process's value on every process (held-out evaluation runs on the main process only)."""
        if self.accelerator.num_processes == 1:
            return float(value)
        from accelerate.utils import broadcast

        return float(broadcast(torch.tensor([float(value)], device=self.device), from_process=0).item())

    def _log_row(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        append_metrics(self.metrics_path, {"step": step, "elapsed_s": round(time.time() - self.started, 1), **metrics})
        if all(k in metrics for k in HACKING_SIGNALS):
            self.recent.append({k: metrics[k] for k in HACKING_SIGNALS})
            for signal, message in reward_hacking_warnings(list(self.recent)).items():
                if signal not in self.hacking_signals_warned:  # each kind once per run
                    self.hacking_signals_warned.add(signal)
                    log.warning(message)
                    self.warnings.append(message)

    # ---- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out prompts: mean reward and KL to the reference of sampled responses (one per prompt)."""
        if not self.is_main or not self.eval_prompts or self.reward is None:
            return {}
        rewards, kls = [], []
        for start in range(0, len(self.eval_prompts), 16):
            rollout = self.rollout(self.eval_prompts[start : start + 16])
            with self.autocast():
                logprobs = response_logprobs(self.accelerator.unwrap_model(self.policy), rollout.sequences,
                                             self.config.policy.temperature)[0]
            rewards.append(rollout.rewards)
            kls.append(sequence_kl(logprobs, rollout.reference_logprobs, rollout.sequences.response_mask))
        self.policy.train()
        return {"eval_reward": float(torch.cat(rewards).mean()), "eval_kl": float(torch.cat(kls).mean())}

    def _sample_table(self) -> list[dict[str, Any]]:
        """Greedy responses to the first few evaluation prompts, with their rewards."""
        if not self.is_main or self.reward is None:
            return []
        prompts = self.eval_prompts[: self.config.prompts.samples]
        if not prompts:
            return []
        rollout = self.rollout(prompts, greedy=True)
        return [{"prompt": c[-1].content, "response": r, "reward": round(float(w), 3)}
                for c, r, w in zip(rollout.conversations, rollout.responses, rollout.rewards)]

    # ---- the artifact ------------------------------------------------------------------------------------
    def finish(self, data_paths: Sequence[str] = (), final_metrics: dict[str, float] | None = None) -> dict[str, Any]:
        """Evaluate, then write the policy directory (merged weights, tokenizer, keel.json, metrics, curves,
        samples) atomically."""
        self.accelerator.wait_for_everyone()
        manifest: dict[str, Any] = {}
        if self.is_main:
            final = {**(final_metrics or {}), **self.evaluate()}
            if final:
                self._log_row(self.step + 1, final)
            samples_after = self._sample_table()
            manifest = self._publish(final, samples_after, data_paths)
            shutil.rmtree(self.work, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return manifest

    def _publish(self, final: dict[str, float], samples_after: list[dict[str, Any]],
                 data_paths: Sequence[str]) -> dict[str, Any]:
        with staged(self.output, overwrite=True) as staging:
            model = self.accelerator.unwrap_model(self.policy, keep_fp32_wrapper=False)
            if self.config.policy.lora is not None:
                model = model.merge_and_unload()  # a plain model: the service and HF tools load it directly
            model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            rows = read_metrics(self.metrics_path)
            (staging / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            plot_curves(rows, staging / "training_curves.png", f"keel train {self.algorithm}")
            (staging / "samples.md").write_text(samples_markdown(self.samples_before, samples_after))
            paths = sorted({s.path for s in [*self.config.prompts.train, *self.config.prompts.evaluation]}
                           | set(data_paths))
            manifest = PolicyManifest(
                algorithm=self.algorithm, base_policy=self.config.policy.model,
                base_policy_path=resolve_policy(self.config.policy.model), lora=to_dict(self.config)["policy"]["lora"],
                steps=self.step + 1, stopped_early=self.stopped_early, warnings=self.warnings,
                train_seconds=round(time.time() - self.started, 1), precision=self.accelerator.mixed_precision,
                final_evaluation=final, chat={"max_prompt_length": self.config.policy.max_prompt_length,
                                              "max_new_tokens": self.config.policy.max_new_tokens},
                reward=to_dict(self.config)["reward"], config=to_dict(self.config),
                data=[{"path": path, "sha256": file_sha256(path)} for path in paths],
            )
            manifest.write(staging)
        return manifest.to_json()


def prompt_source_name(source: PromptSource) -> str:
    """How metrics name a prompt source: its file's stem and split (metrics.jsonl's evasive_NAME)."""
    return Path(source.path).name.split(".")[0] + (f"-{source.split}" if source.split != "all" else "")


def rollout_metrics(rollout: Rollout, heads: Sequence[str], entropy: torch.Tensor | None = None) -> dict[str, float]:
    """What every on-policy step logs about its samples."""
    mask = rollout.sequences.response_mask
    metrics = {"reward": float(rollout.rewards.mean()), "response_length": float(mask.sum(1).mean()),
               "ended_fraction": float(rollout.sequences.ended.float().mean()),
               "repetition": float(repeated_ngram_fraction(rollout.sequences).mean())}
    metrics.update({f"z_{head}": float(rollout.head_scores[:, i].mean()) for i, head in enumerate(heads)})
    metrics.update({f"penalty_{kind}": float(values.mean()) for kind, values in rollout.penalties.items()})
    # Evasive replies (refusals and hedges) per prompt source: rising on ordinary requests is reward hacking
    # (a reward that pays for sounding careful), rising on harmful ones is the refusal being taught.
    evasive = np.array([is_evasive(r) for r in rollout.responses], dtype=np.float32)
    for source in sorted(set(rollout.sources)):
        metrics[f"evasive_{source}"] = float(evasive[[s == source for s in rollout.sources]].mean())
    if entropy is not None:
        metrics["entropy"] = float((entropy * mask).sum() / mask.sum())
    return metrics


def reward_hacking_warnings(recent: Sequence[dict[str, float]]) -> dict[str, str]:
    """Signs, over the last HACKING_WINDOW logged steps, that the policy is exploiting the reward model rather
    than improving: reward moving together with response length (a reward that pays for length), or reward
    rising with repeated n-grams (a reward that pays for a phrase, however often it is said)."""
    if len(recent) < HACKING_WINDOW:
        return {}
    reward, length, repetition = (np.array([row[k] for row in recent[-HACKING_WINDOW:]]) for k in HACKING_SIGNALS)

    def correlation(signal: np.ndarray) -> float:
        return 0.0 if reward.std() == 0 or signal.std() == 0 else float(np.corrcoef(reward, signal)[0, 1])

    found: dict[str, str] = {}
    length_change = abs(length[-5:].mean() / max(length[:5].mean(), 1e-6) - 1.0)
    if abs(correlation(length)) > 0.8 and length_change > 0.25:
        found["response_length"] = (
            f"possible reward hacking: over the last {HACKING_WINDOW} steps reward and response length moved "
            f"together (correlation {correlation(length):.2f}, length changed {length_change:.0%}); read "
            "samples.md and consider a length-controlled reward or a larger kl_coef")
    repetition_rise = repetition[-5:].mean() - repetition[:5].mean()
    if correlation(repetition) > 0.8 and repetition_rise > 0.2:
        found["repetition"] = (
            f"possible reward hacking: over the last {HACKING_WINDOW} steps reward rose with repetition "
            f"(correlation {correlation(repetition):.2f}; repeated 3-grams {repetition[:5].mean():.0%} -> "
            f"{repetition[-5:].mean():.0%} of each reply); read samples.md for looping replies and consider "
            "a larger kl_coef or a reward model trained against such loops")
    return found


def samples_markdown(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    """A table of greedy responses to the same prompts before and after training."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | before | reward | after | reward |", "|---|---|---|---|---|"]
    for old, new in zip(before, after):
        lines.append(f"| {cell(old['prompt'])} | {cell(old['response'])} | {old['reward']} "
                     f"| {cell(new['response'])} | {new['reward']} |")
    return "\n".join(lines) + "\n"


def steps_for_epochs(examples: int, batch_size: int, epochs: int, processes: int) -> int:
    return epochs * math.ceil(examples / (batch_size * processes))
