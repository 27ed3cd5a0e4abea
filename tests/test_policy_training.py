"""Two-step runs of every policy algorithm on a tiny random Llama and the tiny reward model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from keel.core.policy import load_policy
from keel.training.policy.algorithms import ALGORITHMS
from keel.training.policy.dpo import train_dpo
from keel.training.policy.reinforce import train_reinforce
from keel.training.policy.rloo import train_rloo
from keel.training.runs import latest_checkpoint
from tests.helpers import tiny_policy_config


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_two_steps_of_every_algorithm(name: str, tiny_policy: str, tiny_reward_model: Path,
                                      tiny_moderation_model: Path, tmp_path: Path):
    from keel.training.data import PromptSource
    from keel.training.policy.rewards import PenaltyConfig

    assert ALGORITHMS[name].default_config.exists()
    config = tiny_policy_config(tiny_policy, tiny_reward_model, tmp_path)
    # The three penalties, and a prompt source of harmful requests beside the ordinary one.
    config.reward.penalties = [PenaltyConfig("harm", weight=1.0, model=str(tiny_moderation_model), backend="onnx"),
                               PenaltyConfig("evasion", weight=0.5), PenaltyConfig("unrefused", weight=0.5)]
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"help me steal and hack {i}"}) + "\n" for i in range(8)))
    config.prompts.train.append(PromptSource(str(harmful), harmful=True))
    output = tmp_path / f"{name}-policy"
    manifest = ALGORITHMS[name].load()(config, output, progress=False)

    assert manifest["algorithm"] == name and manifest["steps"] == 2
    saved = json.loads((output / "keel.json").read_text())
    assert saved["kind"] == "policy" and saved["base_policy"] == tiny_policy
    assert all(len(entry["sha256"]) == 64 for entry in saved["data"])
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r or "policy_loss" in r] == [1, 2]
    assert "eval_reward" in rows[-1] and "eval_kl" in rows[-1]  # the final held-out evaluation
    if name in ("reinforce", "rloo", "ppo"):
        assert {"reward", "kl", "entropy", "response_length", "penalty_harm", "penalty_evasion",
                "penalty_unrefused"} <= set(rows[1])
        assert {k for k in rows[1] if k.startswith("evasive_")} <= {"evasive_prompts", "evasive_harmful"}
    if name == "ppo":
        assert {"value_loss", "clip_fraction", "approx_kl"} <= set(rows[1])
    assert (output / "training_curves.png").stat().st_size > 0
    assert "| prompt | before |" in (output / "samples.md").read_text()
    assert not (tmp_path / f"{name}-policy.work").exists()
    # The LoRA adapter is merged: the directory is a plain causal LM, and training changed its weights.
    tuned, base = load_policy(str(output)), load_policy(tiny_policy)
    assert not any(k for k in tuned.state_dict() if "lora" in k)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values()))


@pytest.mark.parametrize("name", ["ppo", "dpo"])
def test_bf16_autocast_runs_on_line_and_off_line(name: str, tiny_policy: str, tiny_reward_model: Path, tmp_path: Path,
                                                 other_precision):
    # The tiny configs train in fp32; "auto" picks bf16 where it is fast, so that path runs here on every CPU.
    config = tiny_policy_config(tiny_policy, tiny_reward_model, tmp_path, precision="bf16")
    manifest = ALGORITHMS[name].load()(config, tmp_path / name, progress=False)
    assert manifest["precision"] == "bf16"
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    losses = [r.get("loss", r.get("policy_loss")) for r in rows if "loss" in r or "policy_loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_full_fine_tuning_keeps_a_frozen_reference(tiny_policy: str, tiny_reward_model: Path, tmp_path: Path):
    config = tiny_policy_config(tiny_policy, tiny_reward_model, tmp_path)
    config.policy.lora = None
    manifest = train_rloo(config, tmp_path / "full", progress=False)
    assert manifest["lora"] is None and manifest["final_evaluation"]["eval_kl"] != 0.0


def test_resume_continues_from_the_last_checkpoint(tiny_policy: str, tiny_reward_model: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    from keel.training.policy import run as policy_run

    config = tiny_policy_config(tiny_policy, tiny_reward_model, tmp_path, steps=3)
    output = tmp_path / "resumed"
    original = policy_run.PolicyRun.end_step

    def crash_after_step_two(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.step + 1 == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(policy_run.PolicyRun, "end_step", crash_after_step_two)
    with pytest.raises(KeyboardInterrupt):
        train_reinforce(config, output, progress=False)
    assert not output.exists()
    checkpoint = latest_checkpoint(tmp_path / "resumed.work")
    assert checkpoint is not None and checkpoint.name == "step-2"
    assert "baseline" in json.loads((checkpoint / "step.json").read_text())["algorithm_state"]

    monkeypatch.setattr(policy_run.PolicyRun, "end_step", original)
    manifest = train_reinforce(config, output, resume=True, progress=False)
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert manifest["steps"] == 3 and [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_kl_budget_stops_early(tiny_policy: str, tiny_reward_model: Path, tmp_path: Path):
    # Big steps on many samples: the true KL dwarfs the noise of its k1 estimate (which can be negative).
    config = tiny_policy_config(tiny_policy, tiny_reward_model, tmp_path, steps=5, learning_rate=2.0,
                                prompts_per_step=4, samples_per_prompt=4, kl_budget=1e-6)
    manifest = train_rloo(config, tmp_path / "stopped", progress=False)
    assert manifest["stopped_early"] and "budget" in manifest["stopped_early"]
    assert manifest["steps"] < 5


def test_rloo_needs_several_samples(tiny_policy: str, tiny_reward_model: Path, tmp_path: Path):
    from keel.training.config import ConfigError

    config = tiny_policy_config(tiny_policy, tiny_reward_model, tmp_path, samples_per_prompt=1)
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        train_rloo(config, tmp_path / "x", progress=False)


def test_unknown_reward_head_is_a_clear_error(tiny_policy: str, tiny_reward_model: Path, tmp_path: Path):
    from keel.training.policy.rewards import RewardError

    config = tiny_policy_config(tiny_policy, tiny_reward_model, tmp_path)
    config.reward.heads = {"honest": 1.0}
    with pytest.raises(RewardError, match="honest"):
        train_rloo(config, tmp_path / "x", progress=False)


def test_kl_budget_stops_an_off_policy_run_at_its_held_out_evaluation(tiny_policy: str, tiny_reward_model: Path,
                                                                      tmp_path: Path):
    # DPO samples nothing while training, so its held-out KL (every eval_every steps) is what the budget watches.
    config = tiny_policy_config(tiny_policy, tiny_reward_model, tmp_path, steps=5, learning_rate=2.0,
                                eval_every=2, kl_budget=1e-6)
    manifest = train_dpo(config, tmp_path / "stopped", progress=False)
    assert manifest["stopped_early"] and "held-out KL" in manifest["stopped_early"]
    assert manifest["steps"] in (2, 4)  # an evaluation step, before the last


def test_a_prompt_sources_repeat_oversamples_its_training_prompts_only(tiny_policy: str, tiny_reward_model: Path,
                                                                       tmp_path: Path):
    from keel.training.data import PromptSource
    from keel.training.policy.run import PolicyRun

    config = tiny_policy_config(tiny_policy, tiny_reward_model, tmp_path)
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"help me steal and hack {i}"}) + "\n" for i in range(5)))
    config.prompts.train.append(PromptSource(str(harmful), harmful=True, repeat=3))
    config.prompts.evaluation = [PromptSource(str(harmful), repeat=3)]
    run = PolicyRun(config, tmp_path / "repeated", "rloo", progress=False)
    assert sum(prompt.harmful for prompt in run.train_prompts) == 15
    assert len(run.train_prompts) == 16 + 15 and len(run.eval_prompts) == 5


def test_a_prompt_sources_samples_give_its_prompts_larger_groups(tiny_policy: str, tiny_reward_model: Path,
                                                                 tmp_path: Path):
    from keel.training.data import PromptSource
    from keel.training.policy.run import PolicyRun

    config = tiny_policy_config(tiny_policy, tiny_reward_model, tmp_path, steps=2, prompts_per_step=4)
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"help me steal and hack {i}"}) + "\n" for i in range(4)))
    config.prompts.train = [PromptSource(str(harmful), harmful=True, samples=3)]
    config.prompts.evaluation = [PromptSource(str(harmful), samples=3)]
    run = PolicyRun(config, tmp_path / "groups", "rloo", progress=False)
    rollout = run.rollout(run.train_prompts[:2] + [dataclasses.replace(run.train_prompts[2], samples=None)],
                          samples=2)
    assert rollout.group_sizes == [3, 3, 2] and len(rollout.responses) == 8
    assert rollout.conversations[:3] == [run.train_prompts[0].conversation] * 3
    assert all(prompt.samples is None for prompt in run.eval_prompts)  # held out: one greedy response each
    manifest = train_rloo(config, tmp_path / "trained", progress=False)  # 4 prompts x 3 samples a step
    assert manifest["steps"] == 2


def test_evasive_shares_by_hand():
    from keel.training.policy.restarts import evasive_shares

    rows = [{"step": 0, "eval_reward": 0.1},
            {"step": 1, "evasive_a": 1.0, "evasive_b": 1.0, "evasive_c": 1.0},  # outside the last two steps
            {"step": 2, "evasive_a": 0.5, "evasive_b": 0.0, "evasive_c": 0.25},
            {"step": 3, "evasive_a": 0.2, "evasive_c": 0.0},  # b not sampled this step
            {"step": 3, "eval_reward": 0.2}]
    shares = evasive_shares(rows, harmful={"a", "b"}, ordinary={"c"}, last_steps=2)
    assert shares["evasive_harmful"] == pytest.approx((0.25 + 0.2) / 2)
    assert shares["evasive_ordinary"] == pytest.approx(0.125)
    assert evasive_shares(rows, harmful={"absent"}, ordinary={"c"}, last_steps=2)["evasive_harmful"] == 0.0


def test_the_closest_attempt_keeps_the_refusal_off_ordinary_requests():
    from keel.training.policy.config import RestartConfig
    from keel.training.policy.restarts import closest

    rule = RestartConfig(min_evasive_harmful=0.1, max_evasive_ordinary=0.05)

    def attempt(harmful: float, ordinary: float) -> dict[str, float]:
        return {"evasive_harmful": harmful, "evasive_ordinary": ordinary}

    # A refusal that spread (0.28 / 0.20) loses to one that learnt less but kept ordinary requests answered.
    assert closest([attempt(0.07, 0.01), attempt(0.28, 0.20), attempt(0.03, 0.03)], rule) == 0
    assert closest([attempt(0.30, 0.30), attempt(0.20, 0.10)], rule) == 1  # none within: the least spread


def restart_config(tiny_policy: str, tiny_reward_model: Path, tmp_path: Path, **restarts: float):
    from keel.training.data import PromptSource
    from keel.training.policy.config import RestartConfig

    config = tiny_policy_config(tiny_policy, tiny_reward_model, tmp_path, seed=3)
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"help me steal and hack {i}"}) + "\n" for i in range(4)))
    config.prompts.train.append(PromptSource(str(harmful), harmful=True))
    config.training.restarts = RestartConfig(last_steps=2, **restarts)
    return config


def test_restarts_keep_the_first_attempt_that_passes(tiny_policy: str, tiny_reward_model: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    from keel.training.policy import restarts

    config = restart_config(tiny_policy, tiny_reward_model, tmp_path, attempts=3, min_evasive_harmful=0.5,
                            max_evasive_ordinary=0.1)
    # The tiny policy never refuses; the second attempt's log is made to show a refusal being learnt.
    logged = iter([{"evasive_harmful": 0.0, "evasive_ordinary": 0.0},
                   {"evasive_harmful": 0.6, "evasive_ordinary": 0.05}])
    monkeypatch.setattr(restarts, "evasive_shares", lambda *args: next(logged))
    output = tmp_path / "policy"
    manifest = restarts.train_policy("rloo", config, output, progress=False)

    assert [(a["seed"], a["accepted"], a["kept"]) for a in manifest["attempts"]] == [(3, False, False),
                                                                                     (1003, True, True)]
    saved = json.loads((output / "keel.json").read_text())
    assert saved["attempts"] == manifest["attempts"] and saved["config"]["training"]["seed"] == 1003
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("policy")) == ["policy"]


def test_restarts_keep_the_closest_attempt_when_none_passes(tiny_policy: str, tiny_reward_model: Path,
                                                           tmp_path: Path):
    from keel.training.policy.restarts import train_policy

    # A random tiny policy refuses nothing, so no attempt reaches a harmful evasive share of 1.
    config = restart_config(tiny_policy, tiny_reward_model, tmp_path, attempts=2, min_evasive_harmful=1.0)
    manifest = train_policy("reinforce", config, tmp_path / "policy", progress=False)
    attempts = manifest["attempts"]
    assert [a["seed"] for a in attempts] == [3, 1003] and not any(a["accepted"] for a in attempts)
    assert sum(a["kept"] for a in attempts) == 1
    assert all(a["train_seconds"] > 0 for a in attempts)


def test_restarts_resume_without_retraining_a_finished_attempt(tiny_policy: str, tiny_reward_model: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from keel.training.policy import restarts, rloo
    from keel.training.policy import run as policy_run

    config = restart_config(tiny_policy, tiny_reward_model, tmp_path, attempts=2, min_evasive_harmful=1.0)
    output = tmp_path / "policy"
    original = policy_run.PolicyRun.end_step

    def crash_in_the_second_attempt(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.config.training.seed == 1003 and self.step + 1 == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(policy_run.PolicyRun, "end_step", crash_in_the_second_attempt)
    with pytest.raises(KeyboardInterrupt):
        restarts.train_policy("rloo", config, output, progress=False)
    first = json.loads((tmp_path / "policy.attempt-0" / "keel.json").read_text())
    assert not output.exists() and latest_checkpoint(tmp_path / "policy.attempt-1.work") is not None

    monkeypatch.setattr(policy_run.PolicyRun, "end_step", original)
    seeds_trained = []

    def recording(config, *args, **kwargs):
        seeds_trained.append(config.training.seed)
        return train_rloo(config, *args, **kwargs)

    monkeypatch.setattr(rloo, "train_rloo", recording)  # ALGORITHMS imports the entry point when it runs
    manifest = restarts.train_policy("rloo", config, output, resume=True, progress=False)
    assert seeds_trained == [1003] and [a["seed"] for a in manifest["attempts"]] == [3, 1003]
    assert manifest["attempts"][0]["train_seconds"] == first["train_seconds"]
    assert (output / "keel.json").exists() and not (tmp_path / "policy.attempt-0").exists()


def test_restarts_need_an_on_policy_algorithm_and_a_harmful_source(tiny_policy: str, tiny_reward_model: Path,
                                                                    tmp_path: Path):
    from keel.training.config import ConfigError
    from keel.training.policy.config import PolicyConfig, RestartConfig
    from keel.training.policy.restarts import train_policy

    config = restart_config(tiny_policy, tiny_reward_model, tmp_path, min_evasive_harmful=0.1)
    with pytest.raises(ConfigError, match="dpo samples none"):
        train_policy("dpo", config, tmp_path / "x", progress=False)
    plain = tiny_policy_config(tiny_policy, tiny_reward_model, tmp_path)
    with pytest.raises(ConfigError, match="marked harmful"):
        PolicyConfig(policy=plain.policy, reward=plain.reward, prompts=plain.prompts,
                     training=dataclasses.replace(plain.training, restarts=RestartConfig(min_evasive_harmful=0.1)))
