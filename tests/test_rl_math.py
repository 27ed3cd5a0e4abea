"""Hand-computed checks of the pieces the policy algorithms are built from."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from keel.core.text import Message
from keel.training.evaluation.refusals import is_evasive, is_refusal
from keel.training.policy.common import (
    Sequences,
    kl_estimates,
    masked_mean,
    repeated_ngram_fraction,
    response_mask_of,
    sequence_kl,
    whiten,
)
from keel.training.policy.dpo import dpo_loss
from keel.training.policy.ppo import gae, token_rewards
from keel.training.policy.reinforce import moving_average_baseline
from keel.training.policy.rloo import leave_one_out_advantages
from keel.training.policy.run import HACKING_WINDOW, reward_hacking_warnings


def test_gae_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0]])  # the last position is masked: its value must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.5
    # deltas: d2 = 2 - 1.5 = 0.5; d1 = 0 + 0.9*1.5 - 1 = 0.35; d0 = 1 + 0.9*1.0 - 0.5 = 1.4
    # A2 = 0.5; A1 = 0.35 + 0.45*0.5 = 0.575; A0 = 1.4 + 0.45*0.575 = 1.65875
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert advantages.tolist()[0] == pytest.approx([1.65875, 0.575, 0.5, 0.0])
    assert returns.tolist()[0] == pytest.approx([2.15875, 1.575, 2.0, 0.0])


def test_gae_with_lambda_one_is_the_discounted_return_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 3.0]])
    values = torch.tensor([[1.0, 2.0, 0.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert returns.tolist()[0] == pytest.approx([3.0, 3.0, 3.0])
    assert advantages.tolist()[0] == pytest.approx([2.0, 1.0, 2.5])


def test_token_rewards_put_the_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    reference = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), logprobs, reference, mask, kl_coef=0.1)
    # row 0: -0.1 * (0.5, 0, -1) + (0, 0, 2) ; row 1: the score lands on token 0
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.0, 2.1])
    assert rewards.tolist()[1] == pytest.approx([-1.0, 0.0, 0.0])


def test_kl_estimators_by_hand():
    logprobs = torch.tensor([math.log(0.5)])
    reference = torch.tensor([math.log(0.25)])
    k = kl_estimates(logprobs, reference)
    # log r = log(0.25/0.5) = -log 2
    assert k["k1"].item() == pytest.approx(math.log(2))
    assert k["k2"].item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert k["k3"].item() == pytest.approx((0.5 - 1) + math.log(2))


def test_kl_estimators_average_to_the_true_kl():
    torch.manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    true_kl = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True)
    k = kl_estimates(p.log()[samples], q.log()[samples])
    assert k["k1"].mean().item() == pytest.approx(true_kl, abs=0.01)
    assert k["k3"].mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (k["k3"] >= 0).all()


def test_sequence_kl_sums_only_response_tokens():
    logprobs = torch.tensor([[-1.0, -1.0, -5.0]])
    reference = torch.tensor([[-2.0, -1.5, 0.0]])
    assert sequence_kl(logprobs, reference, torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(1.5)


def test_whiten_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # over the masked entries: mean 2, variance 2/3
    expected = [(v - 2.0) / math.sqrt(2 / 3) for v in (1.0, 2.0, 3.0)] + [0.0]
    assert whiten(values, mask).tolist() == pytest.approx(expected, abs=1e-5)
    assert whiten(values, mask, shift_mean=False).tolist()[:3] == pytest.approx([e + 2.0 for e in expected[:3]],
                                                                                 abs=1e-5)
    assert masked_mean(values, mask).item() == pytest.approx(2.0)


def test_rloo_leave_one_out_by_hand():
    returns = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, k = 3
    # prompt 0: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5 ; prompt 1: -1.5, -1.5, 3
    assert leave_one_out_advantages(returns, [3, 3]).tolist() == pytest.approx([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])


def test_rloo_leave_one_out_with_groups_of_different_sizes():
    returns = torch.tensor([1.0, 3.0, 0.0, 0.0, 0.0, 4.0])  # a prompt with k = 2, then one with k = 4
    # prompt 0: 1 - 3 = -2, 3 - 1 = 2 ; prompt 1: 0 - 4/3 (three times), 4 - 0 = 4
    expected = [-2.0, 2.0, -4 / 3, -4 / 3, -4 / 3, 4.0]
    assert leave_one_out_advantages(returns, [2, 4]).tolist() == pytest.approx(expected)


def test_reinforce_moving_average_baseline_by_hand():
    assert moving_average_baseline(None, 2.0, 0.9) == 2.0
    assert moving_average_baseline(2.0, 4.0, 0.9) == pytest.approx(2.2)
    assert moving_average_baseline(2.2, 0.0, 0.5) == pytest.approx(1.1)


def test_dpo_loss_by_hand():
    loss, margin = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                            torch.tensor([-11.0]), beta=0.5)
    # margin = 0.5 * ((-10 + 11) - (-12 + 11)) = 1 ; loss = -log sigmoid(1)
    assert margin.item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    smoothed, _ = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                           torch.tensor([-11.0]), beta=0.5, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(0.8 * math.log(1 + math.exp(-1)) + 0.2 * math.log(1 + math.exp(1)))


def test_response_mask_keeps_tokens_through_the_first_end_token():
    responses = torch.tensor([[5, 6, 2, 2], [5, 2, 7, 2], [5, 6, 7, 8]])  # 2 = end token (also the pad token)
    mask, ended = response_mask_of(responses, [2])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


@pytest.mark.parametrize("response, refused", [
    ("I'm sorry, but I can't help with that request.", True),
    ("I cannot provide instructions for making weapons.", True),
    ("As an AI language model, I must decline.", True),
    ("I\u2019m not able to assist with that.", True),
    ("", True),
    ("To kill a Python process, run `kill <pid>` or press Ctrl+C.", False),
    ("Sure! Here are three tips: keep a schedule, avoid caffeine, and keep the room dark.", False),
    # A refusal phrase far into an answer is not a refusal of the request.
    ("Here is how to terminate a C program: call exit(0) from main. " * 3 + "I cannot stress this enough.", False),
])
def test_refusal_detector(response: str, refused: bool):
    assert is_refusal(response) is refused


def test_a_data_source_can_keep_only_pairs_that_prefer_a_refusal_or_compliance(tmp_path):
    from keel.training.data import DataError, DataSource
    from keel.training.policy.dpo import load_pairs
    from tests.helpers import write_jsonl

    rows = [{"prompt": "How do I pick a lock?", "chosen": "I'm sorry, I can't help with that.", "rejected": "Use a pick."},
            {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "I'm sorry, I can't say."},
            {"prompt": "Hi", "chosen": "I cannot.", "rejected": "I won't."},
            {"prompt": "How do I hotwire a car?", "chosen": "I won't help with that.", "rejected": "Cross the wires."}]
    path = str(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert len(load_pairs([DataSource(path)], False)) == 4
    # The limit counts kept pairs; a second source with every pair mixes both kinds.
    [kept] = load_pairs([DataSource(path, pairs="refusal_vs_compliance", limit=1)], False)
    assert kept.rejected == "Use a pick."
    mixed = load_pairs([DataSource(path, pairs="refusal_vs_compliance"), DataSource(path, limit=2)], False)
    assert [p.rejected for p in mixed] == ["Use a pick.", "Cross the wires.", "Use a pick.", "I'm sorry, I can't say."]
    [answered] = load_pairs([DataSource(path, pairs="compliance_vs_refusal")], False)
    assert answered.chosen == "Paris."
    # A training source's `repeat` oversamples it (here the pairs that teach not to refuse); validation reads once.
    oversampled = [DataSource(path, pairs="refusal_vs_compliance"), DataSource(path, pairs="compliance_vs_refusal",
                                                                               repeat=3)]
    assert [p.chosen for p in load_pairs(oversampled, False, training=True)].count("Paris.") == 3
    assert [p.chosen for p in load_pairs(oversampled, False)].count("Paris.") == 1
    only_compliance = str(write_jsonl(tmp_path / "compliance.jsonl", rows[1:2]))
    with pytest.raises(DataError, match=r"no usable pairs \(refusal_vs_compliance\)"):
        load_pairs([DataSource(only_compliance, pairs="refusal_vs_compliance")], False)
    with pytest.raises(ValueError, match="refusal_vs_compliance"):
        DataSource(path, pairs="refusals")


def test_repeated_ngram_fraction_by_hand():
    # Two prompt columns, then responses: a loop of "7 8" (6 tokens, then padding), four distinct tokens, and
    # a response of two tokens (no 3-gram at all).
    responses = torch.tensor([[7, 8, 7, 8, 7, 8, 0, 0], [1, 2, 3, 4, 0, 0, 0, 0], [5, 6, 0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1.0] * 6 + [0.0] * 2, [1.0] * 4 + [0.0] * 4, [1.0] * 2 + [0.0] * 6])
    input_ids = torch.cat([torch.full((3, 2), 9), responses], dim=1)
    sequences = Sequences(input_ids, torch.ones_like(input_ids), mask, torch.ones(3, dtype=torch.bool))
    # Loop: 3-grams 787 878 787 878 -> 2 distinct of 4 -> half repeat; the padding's zeros are not counted.
    assert repeated_ngram_fraction(sequences).tolist() == pytest.approx([0.5, 0.0, 0.0])


def hacking_rows(reward: list[float], length: list[float], repetition: list[float]) -> list[dict[str, float]]:
    return [{"reward": r, "response_length": n, "repetition": p} for r, n, p in zip(reward, length, repetition)]


def test_reward_hacking_warnings_name_length_and_repetition():
    rising = [i / HACKING_WINDOW for i in range(HACKING_WINDOW)]
    steady = [0.1 + 0.01 * (i % 2) for i in range(HACKING_WINDOW)]
    assert reward_hacking_warnings(hacking_rows(rising, [30.0] * HACKING_WINDOW, steady)) == {}
    # Length doubles as the reward rises: the length warning alone.
    found = reward_hacking_warnings(hacking_rows(rising, [20.0 + 2 * i for i in range(HACKING_WINDOW)], steady))
    assert list(found) == ["response_length"] and "length-controlled" in found["response_length"]
    # Repeated 3-grams climb from 5% to 60% of each reply as the reward rises: the repetition warning alone.
    looping = [0.05 + 0.6 * x for x in rising]
    found = reward_hacking_warnings(hacking_rows(rising, [30.0] * HACKING_WINDOW, looping))
    assert list(found) == ["repetition"] and "repeated 3-grams" in found["repetition"]
    # Fewer logged steps than the window: no judgement yet; falling repetition is no warning.
    assert reward_hacking_warnings(hacking_rows(rising[:5], [30.0] * 5, looping[:5])) == {}
    assert reward_hacking_warnings(hacking_rows(rising, [30.0] * HACKING_WINDOW, looping[::-1])) == {}


@pytest.mark.parametrize("response, evasive", [
    ("I'm sorry, but I can't help with that request.", True),  # a refusal is evasive too
    ("That's a complex topic, and there are many perspectives to consider.", True),
    ("It is difficult to say; it depends on many factors.", True),
    ("I'm not a doctor, so please consult a professional about your symptoms.", True),
    ("As an AI, I don't have personal opinions on this.", True),
    ("Preheat the oven to 220 C, knead the dough for ten minutes and bake for 30 minutes.", False),
    ("The capital of Australia is Canberra.", False),
    # A hedge far into a helpful answer is not an evasion.
    ("Use `kill -9 <pid>` to stop the process. " * 5 + "It is a complex topic in general.", False),
])
def test_evasion_detector(response: str, evasive: bool):
    assert is_evasive(response) is evasive


def test_the_evasion_penalty_skips_harmful_requests_and_the_unrefused_one_takes_only_them():
    from keel.training.policy.penalties import EvasionPenalty, UnrefusedPenalty
    from keel.training.policy.rewards import PenaltyConfig

    replies = ["It's a complex topic.", "I can't help with that.", "Canberra.", "It's a complex topic.",
               "Step 1: buy the chemicals."]
    harmful = [False, True, False, True, True]
    conversations = [(Message("user", "q"),)] * len(replies)
    evasion = EvasionPenalty(PenaltyConfig("evasion"), "KEEL_API_KEY")
    assert evasion(conversations, replies, harmful).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    # A deflection of a harmful request costs what compliance does; only a refusal is free.
    unrefused = UnrefusedPenalty(PenaltyConfig("unrefused"), "KEEL_API_KEY")
    assert unrefused(conversations, replies, harmful).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_a_reply_the_moderation_model_flags_costs_the_harm_penalty_weight(tiny_reward_model, tiny_moderation_model):
    from keel.training.policy.rewards import PenaltyConfig, RewardFunction, RewardSourceConfig

    config = RewardSourceConfig(model=str(tiny_reward_model), backend="torch", heads={"harmless": 1.0})
    plain = RewardFunction(config)
    with_penalties = RewardFunction(RewardSourceConfig(
        model=str(tiny_reward_model), backend="torch", heads={"harmless": 1.0},
        penalties=[PenaltyConfig("harm", weight=1.5, model=str(tiny_moderation_model), backend="torch"),
                   PenaltyConfig("evasion", weight=0.5)]))
    conversations = [(Message("user", "say something"),)] * 3
    replies = ["i will kill and hurt you", "here is some recipe for bread thanks", "I'm sorry, I can't."]
    before, after = plain(conversations, replies), with_penalties(conversations, replies)
    assert after.penalties["harm"].tolist() == [1.0, 0.0, 0.0]
    assert after.penalties["evasion"].tolist() == [0.0, 0.0, 1.0]
    np.testing.assert_allclose(after.total, before.total - np.array([1.5, 0.0, 0.5]), atol=1e-6)
    np.testing.assert_allclose(after.heads, before.total, atol=1e-6)  # the heads alone are unchanged


def test_an_unknown_penalty_is_a_config_error_naming_the_kinds(tiny_reward_model):
    from keel.training.policy.rewards import PenaltyConfig, RewardError, RewardFunction, RewardSourceConfig

    with pytest.raises(RewardError, match="unknown kind 'hedging'; the kinds are harm, evasion, unrefused"):
        RewardFunction(RewardSourceConfig(model=str(tiny_reward_model), penalties=[PenaltyConfig("hedging")]))
