from pathlib import Path

import pytest

from keel.training.config import DEFAULT_REWARD_CONFIG, ConfigError, load_config
from keel.training.reward.config import RewardConfig


def test_default_config_loads_with_resolved_paths():
    config = load_config(RewardConfig, DEFAULT_REWARD_CONFIG)
    assert [h.name for h in config.heads] == ["harmless", "helpful", "benign_request"]
    assert config.primary_head == "harmless"
    assert all(Path(s.path).is_file() for h in config.heads for s in h.train + h.validation + h.test + h.moderation)


def test_overrides_are_parsed_as_yaml():
    config = load_config(RewardConfig, DEFAULT_REWARD_CONFIG,
                         ["training.epochs=1", "training.learning_rate=1e-4", "heads.1.train.0.limit=50",
                          "training.max_steps=null"])
    assert config.training.epochs == 1 and config.training.learning_rate == 1e-4
    assert config.heads[1].train[0].limit == 50 and config.training.max_steps is None


def test_plus_equals_appends_a_source_without_repeating_the_others(tmp_path):
    extra = tmp_path / "feedback.jsonl"
    config = load_config(RewardConfig, DEFAULT_REWARD_CONFIG,
                         [f"heads.1.train+={{path: {extra}, as_rating: 1}}", f"heads.1.train+=[{{path: {extra}}}]"])
    default = load_config(RewardConfig, DEFAULT_REWARD_CONFIG)
    assert config.heads[1].train[:-2] == default.heads[1].train
    assert [s.path for s in config.heads[1].train[-2:]] == [str(extra)] * 2
    assert config.heads[1].train[-2].as_rating == 1
    with pytest.raises(ConfigError, match="primary_head is 'harmless', not a list"):
        load_config(RewardConfig, DEFAULT_REWARD_CONFIG, ["primary_head+=x"])


@pytest.mark.parametrize("override, message", [
    ("training.epoch=1", "unknown keys \\['epoch'\\]"),
    ("training.epochs=many", "expected int"),
    ("primary_head=kind", "not one of the heads"),
    ("noequals", "KEY=VALUE"),
    ("heads.0.train.0.split=dev", "heads.0.train.0: data source .* split must be"),
    ("heads.0.train.0.min_rows=-1", "heads.0.train.0: data source .* min_rows must be 0 or more"),
    ("primary_head=benign_request", "has detach: true"),
    ("heads.0.guard_false_flags=1.5", "heads.harmless.guard_false_flags must be in \\[0, 1\\), not 1.5"),
    ("training.batch_size=0", "training.batch_size must be > 0, not 0"),
    ("training.learning_rate=-1e-4", "training.learning_rate must be > 0"),
    ("training.warmup_ratio=1", "training.warmup_ratio must be in"),
    ("training.freeze_layers=-1", "training.freeze_layers must be >= 0"),
    ("max_length=0", "max_length must be > 0"),
])
def test_bad_configs_say_what_is_wrong(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RewardConfig, DEFAULT_REWARD_CONFIG, [override])


@pytest.mark.parametrize("override, message", [
    ("training.samples_per_prompt=0", "training.samples_per_prompt must be > 0"),
    ("training.kl_coef=-0.1", "training.kl_coef must be >= 0"),
    ("ppo.lam=1.5", "ppo.lam must be <= 1"),
    ("policy.top_p=0", "policy.top_p must be > 0"),
    ("policy.lora.rank=0", "policy.lora.rank must be > 0"),
    ("dpo.beta=0", "dpo.beta must be > 0"),
    ("prompts.train.0.samples=0", "samples must be at least 1"),
    ("training.restarts={attempts: 0}", "training.restarts.attempts must be > 0"),
    ("training.restarts={max_evasive_ordinary: 1.5}", "training.restarts.max_evasive_ordinary must be <= 1"),
])
def test_out_of_range_policy_settings_are_named(override, message):
    from keel.training.config import CONFIGS
    from keel.training.policy.config import PolicyConfig

    with pytest.raises(ConfigError, match=message):
        load_config(PolicyConfig, CONFIGS / "ppo.yaml", [override])
    load_config(PolicyConfig, CONFIGS / "ppo.yaml", ["policy.lora=null", "training.kl_budget=null"])  # unset is fine


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(RewardConfig, tmp_path / "nope.yaml")


def test_extends_inherits_and_keeps_data_paths_relative_to_their_own_file(tmp_path):
    from keel.training.config import CONFIGS, ConfigError, load_config
    from keel.training.policy.config import PolicyConfig

    child = tmp_path / "mine.yaml"
    child.write_text(f"extends: {CONFIGS / 'rloo.yaml'}\ntraining:\n  steps: 3\n")
    config = load_config(PolicyConfig, child, ["training.learning_rate=1e-5"])
    assert config.training.steps == 3 and config.training.learning_rate == 1e-5
    assert config.training.samples_per_prompt == 4  # from rloo.yaml
    assert config.policy.lora.rank == 16  # from policy.yaml, two levels up
    first = Path(config.prompts.train[0].path)
    assert ".." not in first.parts  # normalised, so the same file is one path (and one manifest entry)
    assert first.is_file() and first.parent.parent.name == "hh-rlhf"  # not resolved against tmp_path
    assert config.prompts.train[0].heads == {"harmless": 1.0}
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(PolicyConfig, loop)


def test_model_paths_that_exist_next_to_a_config_are_taken_from_it(tmp_path, monkeypatch):
    from keel.training.policy.config import PolicyConfig

    (tmp_path / "stage-one").mkdir()
    (tmp_path / "rm").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("policy:\n  model: stage-one\nreward:\n  model: rm\n")
    (tmp_path / "sub" / "child.yaml").write_text("extends: ../base.yaml\n")
    monkeypatch.chdir(tmp_path / "sub")  # neither directory exists relative to the working directory
    config = load_config(PolicyConfig, tmp_path / "sub" / "child.yaml")
    assert config.policy.model == str(tmp_path / "stage-one")  # relative to base.yaml, the file that names it
    assert config.reward.model == str(tmp_path / "rm")
    # Hub names, "default" and paths that exist only from the working directory are kept as written.
    (tmp_path / "sub" / "here").mkdir()
    config = load_config(PolicyConfig, tmp_path / "base.yaml",
                         ["policy.model=HuggingFaceTB/SmolLM2-135M-Instruct", "reward.model=default"])
    assert (config.policy.model, config.reward.model) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "default")
    assert load_config(PolicyConfig, tmp_path / "base.yaml", ["policy.model=here"]).policy.model == "here"
    base_model = load_config(RewardConfig, DEFAULT_REWARD_CONFIG, ["base_model=sub"]).base_model
    assert base_model == "sub"  # configs/sub does not exist


@pytest.mark.parametrize("name", sorted(p.name for p in Path(__file__).parent.parent.joinpath("configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_its_data_exists(name: str):
    from keel.training.config import CONFIGS
    from keel.training.evaluation.policy_eval import EvalPolicyConfig
    from keel.training.moderation.config import ModerationConfig
    from keel.training.policy.config import PolicyConfig

    kind = {"reward.yaml": RewardConfig, "eval_policy.yaml": EvalPolicyConfig, "eval_policy_harm.yaml": EvalPolicyConfig,
            "moderation.yaml": ModerationConfig}.get(name, PolicyConfig)
    config = load_config(kind, CONFIGS / name)
    if kind is RewardConfig:
        sources = [source for head in config.heads for _, source in head.sources()]
    elif kind is ModerationConfig:
        sources = [source for _, source in config.sources()]
    elif kind is EvalPolicyConfig:
        sources = [*config.reward_prompts, *config.harmful.values(), *config.safe.values(), *config.ordinary.values()]
    else:
        sources = [*config.data, *config.validation, *config.prompts.train, *config.prompts.evaluation]
    assert sources and all(Path(s.path).is_file() for s in sources)
