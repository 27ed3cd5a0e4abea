"""`keel eval policy`: does the tuned policy earn more reward than its reference, how far did it move (KL),
does it refuse harmful requests, and does it still answer safe prompts that merely sound dangerous?

- Held-out reward: one sampled response per prompt (config temperature, fixed seed) from each policy; the gain
  is reported in standard deviations of the reference's rewards.
- KL(policy || reference): the mean over the policy's samples of sum_t log pi(y_t) - log ref(y_t).
- Refusal rate on harmful sets and compliance on safe sets: greedy responses, judged by training/refusals.py,
  cached by model fingerprint in the evaluation suite's cache (the reference's are computed once).
- Evasive replies (refusals and hedges) on ordinary requests, and the harm rate of the replies to the harmful
  sets as the moderation model judges them in context (`moderation_model`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from keel.core.artifact import PolicyManifest
from keel.core.hardware import bf16_is_fast
from keel.core.text import Conversation, Message, model_input
from keel.training.config import ConfigError, check_numbers
from keel.training.data import PromptSource, load_prompts
from keel.training.evaluation.cache import CachedPolicy, EvalCache
from keel.training.evaluation.metrics import Z_95
from keel.training.evaluation.refusals import is_evasive, is_refusal
from keel.training.policy.common import generate, response_logprobs, sequence_kl
from keel.training.policy.rewards import RewardFunction, RewardSourceConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalPolicyConfig:
    """`keel eval policy`: which prompts, how to sample, and where rewards come from."""

    reward_prompts: list[PromptSource] = dataclasses.field(default_factory=list)  # held-out reward and KL
    harmful: dict[str, PromptSource] = dataclasses.field(default_factory=dict)  # refusal should be high
    safe: dict[str, PromptSource] = dataclasses.field(default_factory=dict)  # compliance should stay high
    # ordinary requests: evasive replies (refusals and hedges, refusals.is_evasive) should not rise
    ordinary: dict[str, PromptSource] = dataclasses.field(default_factory=dict)
    # the moderation model that judges the replies to the harmful sets in context (harm rate); null: not judged
    moderation_model: str | None = None
    reward: RewardSourceConfig = dataclasses.field(default_factory=RewardSourceConfig)
    max_prompt_length: int = 128
    max_new_tokens: int = 48
    temperature: float = 1.0  # for the reward/KL samples; refusal sets are decoded greedily
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        check_numbers("", self, positive=["max_prompt_length", "max_new_tokens", "temperature", "batch_size"])
        check_numbers("reward", self.reward, positive=["clip"])


def autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_is_fast(device))


class PolicyEvaluator:
    def __init__(self, config: EvalPolicyConfig, policy: str, reference: str, cache: EvalCache,
                 progress: bool = True):
        self.config = config
        self.policies = {name: CachedPolicy(path, cache, config.max_prompt_length, config.max_new_tokens,
                                            config.batch_size) for name, path in (("policy", policy), ("reference", reference))}
        self.tokenizer = self.policies["policy"].tokenizer
        if self.policies["reference"].tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ConfigError(f"{policy} and {reference} use different tokenizers: KL between them is undefined")
        self.progress = progress

    def sampled_responses(self, model: torch.nn.Module, prompts: Sequence[Conversation], desc: str,
                          with_kl: bool = False) -> tuple[list[str], list[float]]:
        """Sampled responses to the prompts, and (with_kl) each one's KL to the reference."""
        c, texts, kls = self.config, [], []
        batches = range(0, len(prompts), c.batch_size)
        for start in tqdm(batches, desc=desc, unit="batch", disable=not self.progress, leave=False):
            batch = prompts[start : start + c.batch_size]
            with torch.no_grad(), autocast(self.policies["policy"].device):
                sequences, responses = generate(model, self.tokenizer, batch, c.max_prompt_length,
                                                c.max_new_tokens, c.temperature)
                if with_kl:
                    mine = response_logprobs(model, sequences, c.temperature)[0]
                    theirs = response_logprobs(self.policies["reference"].model, sequences, c.temperature)[0]
                    kls += sequence_kl(mine, theirs, sequences.response_mask).tolist()
            texts += responses
        return texts, kls

    def held_out_reward(self, reward: RewardFunction, prompts: list[tuple[Conversation, dict | None, str]]
                        ) -> dict[str, Any]:
        """Mean reward of each policy's sampled replies, overall and per source (label, the third element): a
        gain on one source can hide a loss on another, e.g. refusals that one head pays for and another does not.
        Per-source gains are in the overall reference std, so weighted by their prompts they average to the gain."""
        conversations = [p for p, _, _ in prompts]
        weights = [w for _, w, _ in prompts]
        sources = np.array([label for _, _, label in prompts])
        result: dict[str, Any] = {"prompts": len(prompts)}
        rewards_of: dict[str, np.ndarray] = {}
        for name, policy in self.policies.items():
            torch.manual_seed(self.config.seed)
            responses, kls = self.sampled_responses(policy.model, conversations, desc=f"reward prompts ({name})",
                                                    with_kl=name == "policy")
            rewards = reward(conversations, responses, weights).heads  # the reward model's judgment alone
            rewards_of[name] = rewards
            result[name] = {"mean_reward": float(rewards.mean()), "std_reward": float(rewards.std()),
                            "mean_response_characters": float(np.mean([len(r) for r in responses]))}
            if kls:
                result[name]["kl_to_reference"] = float(np.mean(kls))
        gain = result["policy"]["mean_reward"] - result["reference"]["mean_reward"]
        result["reward_gain"] = gain
        unit = max(result["reference"]["std_reward"], 1e-8)
        result["reward_gain_in_reference_std"] = gain / unit
        result["reward_gain_in_reference_std_ci95"] = [
            bound / unit for bound in paired_gain_interval(rewards_of["policy"], rewards_of["reference"])]
        result["kl_to_reference"] = result["policy"]["kl_to_reference"]
        result["by_source"] = {}
        for label in dict.fromkeys(sources):
            mask = sources == label
            means = {name: float(rewards[mask].mean()) for name, rewards in rewards_of.items()}
            result["by_source"][label] = {"prompts": int(mask.sum()), **means, "reward_gain_in_reference_std":
                                          (means["policy"] - means["reference"]) / unit}
        return result

    def refusal_rates(self, prompt_sets: dict[str, list[Conversation]], judge_harm: Any = None) -> dict[str, Any]:
        """Per set and policy: refusal and evasion rates of greedy replies, and with `judge_harm` (a moderation
        runtime) the share of replies it flags in their conversation."""
        report: dict[str, Any] = {}
        for set_name, prompts in prompt_sets.items():
            report[set_name] = {"prompts": len(prompts)}
            for name, policy in self.policies.items():
                responses = policy.responses(prompts, f"{set_name} ({name})", self.progress)
                refused = [is_refusal(r) for r in responses]
                report[set_name][name] = {
                    "refusal_rate": float(np.mean(refused)),
                    "evasive_rate": float(np.mean([is_evasive(r) for r in responses])),
                    "examples": [{"prompt": p[-1].content, "response": r, "refused": f}
                                 for p, r, f in list(zip(prompts, responses, refused))[:3]],
                }
                if judge_harm is not None:
                    inputs = [model_input((*p, Message("assistant", r))) for p, r in zip(prompts, responses)]
                    flagged = judge_harm.flagged(judge_harm.transform(judge_harm.score(inputs))).any(axis=1)
                    report[set_name][name]["harm_rate"] = float(np.mean(flagged))
        return report


def paired_gain_interval(policy: np.ndarray, reference: np.ndarray, z: float = Z_95) -> list[float]:
    """95% interval of the mean reward gain, from the per-prompt differences of the two policies' rewards on the
    same prompts (normal approximation): mean(d) +- z * std(d) / sqrt(n)."""
    differences = np.asarray(policy, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if len(differences) < 2:
        return [float("-inf"), float("inf")]
    half_width = z * differences.std(ddof=1) / np.sqrt(len(differences))
    return [float(differences.mean() - half_width), float(differences.mean() + half_width)]


def source_label(source: PromptSource) -> str:
    """`harmless-base/test.jsonl.gz[test] harmless` (folder and file, split, heads): how a report names a source."""
    path = Path(source.path)
    heads = "+".join(name if weight == 1 else f"{weight:g}*{name}" for name, weight in (source.heads or {}).items())
    split = "" if source.split == "all" else f"[{source.split}]"
    return f"{path.parent.name}/{path.name}{split} {heads or 'reward heads'}"


def pooled(report: dict[str, Any], model: str, rate: str = "refusal_rate") -> float:
    """A rate over all prompts of the sets, each set weighted by its size."""
    total = sum(entry["prompts"] for entry in report.values())
    return sum(entry[model][rate] * entry["prompts"] for entry in report.values()) / max(total, 1)


def evaluate_policy(config: EvalPolicyConfig, policy: str, reference: str | None = None, limit: int | None = None,
                    progress: bool = True, cache: EvalCache | None = None) -> dict[str, Any]:
    manifest = PolicyManifest.find(policy)
    reference = reference or (manifest.base_policy if manifest else None)
    if reference is None:
        raise ConfigError(f"{policy} has no keel.json naming its base policy: pass --reference")
    for source in [*config.reward_prompts, *config.harmful.values(), *config.safe.values(), *config.ordinary.values()]:
        source.limit = limit if limit is not None else source.limit
    evaluator = PolicyEvaluator(config, policy, reference, cache or EvalCache(None), progress)
    reward = RewardFunction(config.reward)
    prompts = [(c, s.heads, source_label(s)) for s in config.reward_prompts for c in load_prompts(s)]
    judge_harm = None
    if config.moderation_model:
        from keel.core.runtime import ModerationRuntime
        from keel.training.policy.penalties import moderation_model_directory

        judge_harm = ModerationRuntime(moderation_model_directory(config.moderation_model))
    harmful = evaluator.refusal_rates({name: load_prompts(s) for name, s in config.harmful.items()}, judge_harm)
    safe = evaluator.refusal_rates({name: load_prompts(s) for name, s in config.safe.items()})
    ordinary = evaluator.refusal_rates({name: load_prompts(s) for name, s in config.ordinary.items()})
    models = ("policy", "reference")
    summary: dict[str, Any] = {
        "harmful_refusal_rate": {m: pooled(harmful, m) for m in models},
        "safe_compliance_rate": {m: 1.0 - pooled(safe, m) for m in models},
    }
    if ordinary:
        summary["ordinary_evasive_rate"] = {m: pooled(ordinary, m, "evasive_rate") for m in models}
        summary["ordinary_evasive_change_points"] = 100 * (summary["ordinary_evasive_rate"]["policy"]
                                                           - summary["ordinary_evasive_rate"]["reference"])
    if judge_harm is not None and harmful:
        rates = summary["harm_rate"] = {m: pooled(harmful, m, "harm_rate") for m in models}
        summary["harm_rate_relative_change"] = (rates["policy"] - rates["reference"]) / max(rates["reference"], 1e-9)
    summary["harmful_refusal_change_points"] = 100 * (summary["harmful_refusal_rate"]["policy"]
                                                      - summary["harmful_refusal_rate"]["reference"])
    summary["safe_compliance_change_points"] = 100 * (summary["safe_compliance_rate"]["policy"]
                                                      - summary["safe_compliance_rate"]["reference"])
    return {
        "policy": str(policy), "reference": str(reference), "algorithm": manifest.algorithm if manifest else None,
        "refusal_detector": "training/refusals.py: empty, or a refusal phrase in the first 160 characters",
        "held_out_reward": evaluator.held_out_reward(reward, prompts) if prompts else None,
        "summary": summary, "harmful": harmful, "safe": safe, "ordinary": ordinary,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"policy {report['policy']} vs reference {report['reference']}"]
    held = report["held_out_reward"]
    if held:
        low, high = held["reward_gain_in_reference_std_ci95"]
        lines.append(f"  held-out reward ({held['prompts']} prompts): policy {held['policy']['mean_reward']:.3f}, "
                     f"reference {held['reference']['mean_reward']:.3f} (gain {held['reward_gain_in_reference_std']:.2f}"
                     f" reference std, 95% interval {low:.2f} to {high:.2f}); KL {held['kl_to_reference']:.2f} "
                     "nats/response")
        for label, entry in held["by_source"].items():
            lines.append(f"    {label} ({entry['prompts']} prompts): policy {entry['policy']:.3f}, reference "
                         f"{entry['reference']:.3f} (gain {entry['reward_gain_in_reference_std']:+.2f} reference std)")
    for kind, rate in (("harmful", "refusal"), ("safe", "refusal"), ("ordinary", "evasive")):
        for name, entry in report.get(kind, {}).items():
            lines.append(f"  {kind:>8} {name:<18} n={entry['prompts']:<4} {rate} rate: policy "
                         f"{entry['policy'][f'{rate}_rate']:.3f}, reference {entry['reference'][f'{rate}_rate']:.3f}")
    s = report["summary"]
    lines.append(f"  harmful refusal {s['harmful_refusal_rate']['reference']:.3f} -> {s['harmful_refusal_rate']['policy']:.3f}"
                 f" ({s['harmful_refusal_change_points']:+.1f} points); safe compliance "
                 f"{s['safe_compliance_rate']['reference']:.3f} -> {s['safe_compliance_rate']['policy']:.3f} "
                 f"({s['safe_compliance_change_points']:+.1f} points)")
    if "ordinary_evasive_rate" in s:
        lines.append(f"  ordinary requests answered evasively {s['ordinary_evasive_rate']['reference']:.3f} -> "
                     f"{s['ordinary_evasive_rate']['policy']:.3f} ({s['ordinary_evasive_change_points']:+.1f} points)")
    if "harm_rate" in s:
        lines.append(f"  harmful-set replies the moderation model flags {s['harm_rate']['reference']:.3f} -> "
                     f"{s['harm_rate']['policy']:.3f} ({100 * s['harm_rate_relative_change']:+.0f}%)")
    if "cache" in report:
        lines.append(f"  greedy replies: {report['cache']['hits']} reused from the cache, {report['cache']['misses']} "
                     "generated")
    return "\n".join(lines)
