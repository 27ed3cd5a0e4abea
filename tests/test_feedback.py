"""The human-feedback loop's first half: the store on SQLite and PostgreSQL, capture of served responses,
POST /v1/feedback, and the export that training reads."""

from __future__ import annotations

import json
import math
import time
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from keel.core.moderation import CATEGORIES
from keel.service.feedback import FeedbackStore, ServedItem, split_of_item
from keel.service.feedback_export import export
from keel.service.feedback_quality import krippendorff_alpha, majority


def moderation_served(item_id: str, texts: list[str], client: str | None = "key-1") -> ServedItem:
    results = [{"flagged": False, "categories": {c: False for c in CATEGORIES},
                "category_scores": {c: 0.01 for c in CATEGORIES}} for _ in texts]
    return ServedItem(item_id, "moderation", client, {"texts": [{"context": "", "text": t} for t in texts]},
                      {"results": results}, {"moderation": {"name": "m", "version": "v1"}}, {})


def chat_served(item_id: str) -> ServedItem:
    return ServedItem(item_id, "chat", "key-1", {"messages": [{"role": "user", "content": "hi"}]},
                      {"replies": ["hello"]}, {"reward": {"name": "r", "version": "v1"}, "policy": "p"}, {},
                      [{"choice": 0, "text": "hello", "reward": 0.5, "flagged": False, "chosen": True},
                       {"choice": 0, "text": "go away", "reward": -1.0, "flagged": True, "chosen": False}])


def check_store(url: str) -> None:
    store = FeedbackStore(url)
    FeedbackStore(url)  # migrating again is a no-op (every replica migrates at start)
    store.record([moderation_served("modr-1", ["a", "b"]), chat_served("chatcmpl-1")])
    first = store.give("modr-1", "ann", "moderation", {"categories": {"hate": True}}, position=1)
    again = store.give("modr-1", "ann", "moderation", {"categories": {"hate": False}}, position=1)
    assert first == again  # the same annotator's second answer replaces the first
    store.give("modr-1", "other", "moderation", {"categories": {"hate": True}}, position=1)
    store.give("chatcmpl-1", "ann", "rating", {"rating": 7})
    assert store.counts() == {"items": 2, "candidates": 2, "feedback": 3}
    answered = {item.id: (answers, candidates) for item, answers, candidates in store.items_with_feedback()}
    answers, candidates = answered["modr-1"][0], answered["chatcmpl-1"][1]
    assert [a.value["categories"]["hate"] for a in answers] == [False, True]
    assert [c.text for c in candidates] == ["hello", "go away"] and candidates[0].chosen
    # A gold item (known answer) is kept apart from served ones in the queue; adding it again is a no-op.
    gold = ServedItem("modr-gold", "moderation", None, {"texts": [{"context": "", "text": "g"}]},
                      moderation_served("x", ["g"]).output, {}, {}, gold={"categories": {"hate": True}})
    assert store.add_new([gold]) == 1 and store.add_new([gold]) == 0
    queue = store.open_units("new", "moderation", frozenset({"new", "ann", "other"}))
    assert [item.id for item, _ in queue.gold] == ["modr-gold"] and queue.gold[0][0].gold == gold.gold
    assert {item.id for item, _ in queue.units} == {"modr-1"}
    # Re-scoring (keel feedback rescore) reads what was served, not gold, and replaces the queue's uncertainty
    assert store.served_ids("moderation") == ["modr-1"] and store.served_ids("chat", newest=1) == ["chatcmpl-1"]
    assert store.inputs_of(["modr-1"])["modr-1"]["texts"][1]["text"] == "b"
    store.set_uncertainty({"modr-1": 0.75})
    assert store.open_units("new", "moderation", frozenset({"new"})).units[0][0].uncertainty == 0.75
    assert store.purge(timedelta(days=1)) == 0 and store.purge(timedelta(seconds=-1)) == 2  # gold stays
    assert store.counts() == {"items": 1, "candidates": 0, "feedback": 0}


def test_store_on_sqlite(tmp_path: Path):
    check_store(f"sqlite:///{tmp_path / 'feedback.db'}")


@pytest.mark.database
def test_store_on_postgresql(postgres_url: str):
    check_store(postgres_url)


def test_the_queue_chooses_among_the_newest_pool_items(tmp_path: Path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    for n in range(3):
        store.record([moderation_served(f"modr-{n}", ["a"])])
        time.sleep(0.01)  # distinct timestamps: newest first
    annotators = frozenset({"ann"})
    assert {i.id for i, _ in store.open_units("ann", "moderation", annotators, pool=2).units} == {"modr-1", "modr-2"}
    assert len(store.open_units("ann", "moderation", annotators, pool=500).units) == 3


def test_rescore_gives_the_queue_a_retrained_models_uncertainty(tmp_path: Path, tiny_moderation_model: Path):
    from keel.cli.main import main
    from keel.core.runtime import ModerationRuntime

    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    texts = [["i will kill and hurt you", "here is some recipe for bread thanks"], ["help me steal"], ["python code"]]
    store.record([moderation_served(f"modr-{i}", group) for i, group in enumerate(texts)])
    store.record([chat_served("chatcmpl-1")])
    runtime = ModerationRuntime(tiny_moderation_model)
    assert any(t is not None for t in runtime.thresholds.values())  # else every uncertainty would be 0
    expected = {}
    for i, group in enumerate(texts):  # by hand: 1 - the nearest any category came to its threshold
        values = runtime.scored([("", t) for t in group]).values
        expected[f"modr-{i}"] = 1 - min(abs(float(row[runtime.categories.index(c)]) - t) for row in values
                                        for c, t in runtime.thresholds.items() if t is not None)
    assert main(["feedback", "rescore", "--db", store.url, "--model", str(tiny_moderation_model)]) == 0
    queue = store.open_units("ann", "moderation", frozenset({"ann"}))
    got = {item.id: item.uncertainty for item, _ in queue.units}
    assert got == pytest.approx(expected, abs=1e-6) and len(set(got.values())) > 1
    assert store.inputs_of(["modr-0"])["modr-0"]["texts"][1]["text"] == texts[0][1]  # what was served stays
    assert main(["feedback", "rescore", "--db", store.url, "--model", str(tmp_path)]) == 2  # not a model: 1 line


def test_rescore_gives_the_pairwise_queue_a_retrained_reward_models_margins(tmp_path: Path,
                                                                             tiny_reward_model: Path,
                                                                             tiny_moderation_model: Path):
    from keel.cli.main import main
    from keel.core.runtime import RewardRuntime
    from keel.core.text import Message, model_input

    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    store.record([chat_served("chatcmpl-1"), moderation_served("modr-1", ["a"])])
    runtime = RewardRuntime(tiny_reward_model)
    hello, away = runtime.scored([model_input([Message("user", "hi"), Message("assistant", reply)])
                                  for reply in ("hello", "go away")]).values[:, runtime.heads.index(runtime.primary_head)]
    command = ["feedback", "rescore", "--db", store.url, "--model", str(tiny_reward_model)]
    assert main(command) == 0
    units = store.open_units("ann", "pairwise", frozenset({"ann"})).units
    assert units[0][0].uncertainty == pytest.approx(1 / (1 + abs(float(hello - away))), abs=1e-6)
    assert units[0][0].uncertainty != 0.0  # served with no uncertainty recorded: the rescore set it
    assert store.open_units("ann", "moderation", frozenset({"ann"})).units[0][0].uncertainty == 0.0  # not its kind
    assert main([*command, "--chat-reward-weights", "nonsense=1"]) == 2  # one line naming the heads
    assert main([*command[:-1], str(tiny_moderation_model), "--chat-reward-weights", "harmless=1"]) == 2


def test_majority_and_agreement_by_hand():
    assert majority([True, True, False]) is True and majority([True, False]) is None and majority([]) is None
    # Two annotators, four units, nominal: they agree on 3 of 4. Pairable values: 8 (4 units x 2); observed
    # disagreement D_o = 2/8 (one unit contributes two disagreeing ordered pairs over n_u - 1 = 1);
    # value counts: 1 -> 5, 0 -> 3, so D_e = 2 * 5 * 3 / (8 * 7) = 30/56; alpha = 1 - (2/8) / (30/56) = 8/15.
    units = {1: {"a": 1.0, "b": 1.0}, 2: {"a": 0.0, "b": 0.0}, 3: {"a": 1.0, "b": 1.0}, 4: {"a": 1.0, "b": 0.0}}
    assert krippendorff_alpha(units, "nominal") == pytest.approx(8 / 15)
    assert krippendorff_alpha({1: {"a": 1.0}}, "nominal") is None  # no unit with two answers


def test_export_is_what_training_reads(tmp_path: Path):
    from keel.training.data import load_source, parse_rating
    from keel.training.moderation.config import ModerationConfig, ModerationSource
    from keel.training.moderation.data import load_labelled

    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    store.record([moderation_served(f"modr-{i}", ["you idiot", "hello"]) for i in range(20)] + [chat_served("chatcmpl-1")])
    for i in range(20):
        store.give(f"modr-{i}", "ann", "moderation", {"categories": {"harassment": True, "hate": False}})
        store.give(f"modr-{i}", "bob", "moderation", {"categories": {"harassment": True, "hate": True}})
    store.give("chatcmpl-1", "ann", "thumbs", {"thumbs": "down"})
    store.give("chatcmpl-1", "bob", "rating", {"rating": 4})
    datasheet = export(store, tmp_path / "export")
    rows = [json.loads(line) for line in (tmp_path / "export" / "moderation.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(r["text"] == "you idiot" and r["index"] == 0 for r in rows)
    assert all(r["harassment"] is True and r["hate"] is None and r["violence"] is None for r in rows)  # tie: None
    assert {r["split"] for r in rows} == {split_of_item(r["item_id"]) for r in rows}
    assert datasheet["moderation_ties_left_unlabelled"] == 20 and datasheet["annotators"] == {"ann": 21, "bob": 21}
    assert datasheet["agreement_krippendorff_alpha"]["moderation"]["harassment"] is None  # all agree: undefined
    # hate: the two always disagree, so alpha is far below 0: 1 - D_o / D_e = 1 - 1 / (2 * 20 * 20 / (40 * 39))
    assert datasheet["agreement_krippendorff_alpha"]["moderation"]["hate"] == pytest.approx(1 - 1560 / 800)

    # One config line reads the export as moderation labels: unlabelled categories stay NaN (masked).
    config = ModerationConfig(train=[], validation=[])
    source = ModerationSource(path=str(tmp_path / "export" / "moderation.jsonl"), feedback=True, split="all")
    labelled = load_labelled(source, config, "train")
    harassment, hate = CATEGORIES.index("harassment"), CATEGORIES.index("hate")
    assert len(labelled) == 20 and all(item.labels[harassment] == 1 and math.isnan(item.labels[hate])
                                       for item in labelled)
    ratings = [json.loads(line) for line in (tmp_path / "export" / "ratings.jsonl").read_text().splitlines()]
    assert sorted(r["score"] for r in ratings) == [0.0, 0.5]
    parsed = parse_rating(ratings[0])
    assert parsed.input == ("Human: hi", "hello")
    from keel.training.data import DataSource

    assert len(load_source(DataSource(path=str(tmp_path / "export" / "ratings.jsonl")), parse=parse_rating)) == 2


@pytest.fixture
def feedback_service(tiny_reward_model: Path, tiny_moderation_model: Path, tmp_path: Path):
    from keel.service.app import create_app
    from keel.service.settings import Settings

    keys = tmp_path / "keys"
    keys.write_text("k1\nk2\n")
    admin = tmp_path / "admin"
    admin.write_text("boss\n")
    settings = Settings(model=tiny_reward_model, moderation_model=tiny_moderation_model, api_keys_file=keys,
                        admin_keys_file=admin, feedback_db=f"sqlite:///{tmp_path / 'fb.db'}")
    with TestClient(create_app(settings)) as client:
        yield client


def wait_recorded(client: TestClient, item_id: str) -> None:
    store = client.app.state.keel.feedback
    deadline = time.monotonic() + 10
    while store.item(item_id) is None:
        assert time.monotonic() < deadline, "the recorder did not write the item"
        time.sleep(0.02)


def test_feedback_on_a_served_moderation_result(feedback_service: TestClient):
    k1, k2, boss = ({"Authorization": f"Bearer {key}"} for key in ("k1", "k2", "boss"))
    served = feedback_service.post("/v1/moderations", json={"input": ["i will kill and hurt you", "hi"]}, headers=k1)
    item_id = served.json()["id"]
    wait_recorded(feedback_service, item_id)
    body = {"id": item_id, "index": 1, "categories": {"violence": False}}
    given = feedback_service.post("/v1/feedback", json=body, headers=k1)
    assert given.status_code == 201 and given.json()["object"] == "feedback" and given.json()["id"].startswith("fb-")
    assert feedback_service.post("/v1/feedback", json=body, headers=k1).json()["id"] == given.json()["id"]
    assert feedback_service.post("/v1/feedback", json=body, headers=boss).status_code == 201  # an admin may
    other = feedback_service.post("/v1/feedback", json=body, headers=k2)  # another client may not
    assert other.status_code == 404 and other.json()["error"]["param"] == "id"
    for bad, param in (({**body, "index": 2}, "index"), ({**body, "categories": {"nope": True}}, "categories"),
                       ({"id": item_id, "thumbs": "up"}, "thumbs"), ({"id": item_id, "rating": 9}, "rating")):
        refused = feedback_service.post("/v1/feedback", json=bad, headers=k1)
        assert refused.status_code == 400 and param in refused.json()["error"]["message"], refused.text
    both = feedback_service.post("/v1/feedback", json={"id": item_id, "thumbs": "up", "rating": 3}, headers=k1)
    assert both.status_code == 400 and "exactly one" in both.json()["error"]["message"]
    missing = feedback_service.post("/v1/feedback", json={"id": "modr-unknown", "thumbs": "up"}, headers=k1)
    assert missing.status_code == 404
    metrics = feedback_service.get("/metrics").text
    assert 'keel_feedback_items_total{outcome="queued"} 1.0' in metrics
    assert 'keel_feedback_total{kind="moderation"} 3.0' in metrics
    assert "kill" not in metrics


def test_feedback_is_a_clear_404_when_off(tiny_reward_model: Path):
    from keel.service.app import create_app
    from keel.service.settings import Settings

    with TestClient(create_app(Settings(model=tiny_reward_model, moderation_model="none"))) as client:
        off = client.post("/v1/feedback", json={"id": "x", "thumbs": "up"})
        assert off.status_code == 404 and "--feedback-db" in off.json()["error"]["message"]


def test_a_failing_database_never_fails_a_request(tiny_reward_model: Path, tiny_moderation_model: Path,
                                                  tmp_path: Path):
    from keel.service.app import create_app
    from keel.service.settings import Settings

    settings = Settings(model=tiny_reward_model, moderation_model=tiny_moderation_model,
                        feedback_db=f"sqlite:///{tmp_path / 'fb.db'}")
    with TestClient(create_app(settings)) as client:
        store = client.app.state.keel.feedback

        def broken(_: object) -> None:
            raise OSError("database is down")

        store.record = broken
        for _ in range(5):
            assert client.post("/v1/moderations", json={"input": "hello"}).status_code == 200
        deadline = time.monotonic() + 10
        while "keel_feedback_write_failures_total 5.0" not in client.get("/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_a_chat_completion_is_recorded_with_every_candidate(tiny_reward_model: Path, tiny_moderation_model: Path,
                                                            tiny_policy: str, tmp_path: Path):
    from keel.service.app import create_app
    from keel.service.settings import Settings

    settings = Settings(model=tiny_reward_model, moderation_model=tiny_moderation_model, policy=tiny_policy,
                        feedback_db=f"sqlite:///{tmp_path / 'fb.db'}")
    with TestClient(create_app(settings)) as client:
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 3, "best_of": 3}).json()
        wait_recorded(client, reply["id"])
        store = client.app.state.keel.feedback
        candidates = store.candidates_of(reply["id"])
        assert len(candidates) == 3 and sum(c.chosen for c in candidates) <= 1
        assert all(c.reward is not None for c in candidates)
        item = store.item(reply["id"])
        assert item.input["messages"] == [{"role": "user", "content": "hi"}]
        assert item.output["replies"] == [reply["choices"][0]["message"]["content"]]
        given = client.post("/v1/feedback", json={"id": reply["id"], "rating": 6})
        assert given.status_code == 201
