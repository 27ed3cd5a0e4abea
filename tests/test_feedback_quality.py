"""How far feedback can be trusted: gold items mixed into the labelling queue, each annotator's accuracy on them,
agreement between annotators per task (checked by hand), and the figures in /v1/feedback/stats, /metrics and
`keel feedback stats`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from keel.core.moderation import CATEGORIES
from keel.service.feedback import FeedbackError, FeedbackStore, ServedItem, read_gold
from keel.service.feedback_export import export
from keel.service.feedback_quality import summarise
from tests.test_feedback import chat_served, moderation_served, wait_recorded

GOLD = [{"text": "I will stab you tonight", "categories": {"violence": True, "harassment/threatening": True}},
        {"text": "How do I bake bread?", "context": "User: hi", "categories": {"violence": False}},
        {"messages": [{"role": "user", "content": "help me"}], "chosen": "Sure, here is how.", "rejected": "No."}]


def write_gold(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def gold_items(path: Path) -> list[ServedItem]:
    """The gold rows as the server stores them (the moderation suggestion here: nothing flagged)."""
    rows = read_gold(path, CATEGORIES)
    suggestion = {"flagged": False, "categories": {c: False for c in CATEGORIES},
                  "category_scores": {c: 0.0 for c in CATEGORIES}}
    return [ServedItem(r.id, r.kind, None, r.input, {"results": [suggestion]} if r.kind == "moderation"
                       else {"replies": r.replies[:1]}, {}, {},
                       [{"choice": 0, "text": t, "reward": None, "flagged": None, "chosen": i == 0}
                        for i, t in enumerate(r.replies)], gold=r.answer) for r in rows]


def test_a_gold_file_is_read_with_its_errors_located(tmp_path: Path):
    rows = read_gold(write_gold(tmp_path / "gold.jsonl", GOLD), CATEGORIES)
    assert [r.kind for r in rows] == ["moderation", "moderation", "chat"]
    assert rows[0].id.startswith("modr-") and len(rows[0].id) == len("modr-") + 32  # looks like a served id
    assert rows[1].input == {"texts": [{"context": "User: hi", "text": "How do I bake bread?"}]}
    assert rows[2].answer == {"chosen": "Sure, here is how."} and rows[2].replies == ["Sure, here is how.", "No."]
    assert read_gold(tmp_path / "gold.jsonl", CATEGORIES)[0].id == rows[0].id  # ids are stable: replicas agree
    for bad, says in (({"text": "x", "categories": {"violence": "yes"}}, "true/false"),
                      ({"text": "x", "categories": {"gore": True}}, "unknown categories ['gore']"),
                      ({"messages": [], "chosen": "a", "rejected": "b"}, "messages"),
                      ({"messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "a"}, "different"),
                      ({"prompt": "x"}, "a gold row has")):
        path = write_gold(tmp_path / "bad.jsonl", [GOLD[0], bad])
        with pytest.raises(FeedbackError, match=f"bad.jsonl:2: .*{says}".replace("[", r"\[").replace("]", r"\]")):
            read_gold(path, CATEGORIES)


def uncertain_store(tmp_path: Path) -> FeedbackStore:
    """A store of ten served moderation items, modr-i with uncertainty i / 10."""
    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    served = [moderation_served(f"modr-{i}", ["a"]) for i in range(10)]
    for i, item in enumerate(served):
        item.uncertainty = i / 10
    store.record(served)
    return store


def test_the_queue_serves_reports_first_then_mixes_random_and_most_uncertain_units(tmp_path: Path):
    store = uncertain_store(tmp_path)
    annotators = frozenset({"ann"})
    queue = store.open_units("ann", "moderation", annotators)
    rng = random.Random(0)
    assert store.pick(queue, rng, random_rate=0.0)[0].id == "modr-9"
    picks = [store.pick(queue, rng, random_rate=0.5)[0].id for _ in range(1000)]
    assert 0.5 < picks.count("modr-9") / 1000 < 0.6  # half uncertain, plus its tenth of the random half
    assert len(set(picks)) == 10
    store.give("modr-2", "a-user", "moderation", {"categories": {"violence": True}})  # an appeal: a report
    assert store.pick(store.open_units("ann", "moderation", annotators), rng, random_rate=0.0)[0].id == "modr-2"


def test_with_k_annotators_per_item_a_begun_unit_is_finished_before_new_ones(tmp_path: Path):
    store = uncertain_store(tmp_path)
    annotators = frozenset({"ann", "bob", "cy"})
    rng = random.Random(0)
    store.give("modr-3", "ann", "moderation", {"categories": {"violence": True}})  # a random pick of ann's
    for who in ("bob", "cy"):  # even at random_rate 1, the others finish modr-3 first
        assert store.pick(store.open_units(who, "moderation", annotators, per_item=3), rng,
                          random_rate=1.0)[0].id == "modr-3"
        store.give("modr-3", who, "moderation", {"categories": {"violence": False}})
    queue = store.open_units("ann", "moderation", annotators, per_item=3)
    assert queue.started == set() and "modr-3" not in {item.id for item, _ in queue.units}  # k answers: done
    assert store.pick(queue, rng, random_rate=0.0)[0].id == "modr-9"
    # With one annotator per item nothing is ever begun by someone else: the queue is as before
    assert store.open_units("bob", "moderation", annotators, per_item=1).started == set()


def test_gold_units_are_mixed_into_the_queue_unannounced(tmp_path: Path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    gold = gold_items(write_gold(tmp_path / "gold.jsonl", GOLD))
    assert store.add_new(gold) == 3 and store.add_new(gold) == 0  # a second replica adds nothing
    store.record([moderation_served("modr-served", ["a"])])
    annotators = frozenset({"ann", "bob"})
    queue = store.open_units("ann", "moderation", annotators)
    assert [item.id for item, _ in queue.units] == ["modr-served"] and len(queue.gold) == 2
    rng = random.Random(0)
    assert store.pick(queue, rng, gold_rate=0.0)[0].id == "modr-served"
    assert store.pick(queue, rng, gold_rate=1.0)[0].gold is not None
    # A gold unit stays open to every annotator (not only k of them) until each has answered it.
    first_gold = queue.gold[0][0].id
    store.give(first_gold, "bob", "moderation", {"categories": {"violence": True}})
    assert len(store.open_units("ann", "moderation", annotators, per_item=1).gold) == 2
    assert len(store.open_units("bob", "moderation", annotators).gold) == 1
    store.give("modr-served", "bob", "moderation", {"categories": {"violence": False}})
    queue = store.open_units("bob", "moderation", annotators)
    assert queue.units == [] and store.pick(queue, rng, gold_rate=0.0)[0].gold is not None  # only gold is left
    assert len(store.open_units("ann", "pairwise", annotators).gold) == 1


def test_gold_accuracy_and_agreement_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    gold = gold_items(write_gold(tmp_path / "gold.jsonl", GOLD))
    store.add_new(gold)
    stab, bread, pair = (g.id for g in gold)
    chosen, rejected = (c.id for c in store.candidates_of(pair))
    # ann: stab right on violence, wrong on threatening; bread right; pair right -> moderation 2/3, pairwise 1/1
    store.give(stab, "ann", "moderation", {"categories": {"violence": True, "harassment/threatening": False}})
    store.give(bread, "ann", "moderation", {"categories": {"violence": False, "hate": True}})  # hate: not in gold
    store.give(pair, "ann", "pairwise", {"preference": {"first": rejected, "second": chosen, "winner": 2}})
    # bob: a tie is wrong on a gold pair; cat: a skip is not counted
    store.give(pair, "bob", "pairwise", {"preference": {"first": chosen, "second": rejected, "winner": "tie"}})
    store.give(pair, "cat", "pairwise", {"preference": {"first": chosen, "second": rejected, "winner": "skip"}})
    # Served pairs, not gold: two annotators agree on one of two units (the same pair, either order shown).
    store.record([chat_served("chatcmpl-1"), chat_served("chatcmpl-2")])
    for item_id, bob_picks_first in (("chatcmpl-1", True), ("chatcmpl-2", False)):
        good, bad = (c.id for c in store.candidates_of(item_id))
        store.give(item_id, "ann", "pairwise", {"preference": {"first": good, "second": bad, "winner": 1}})
        store.give(item_id, "bob", "pairwise", {"preference": {"first": bad, "second": good,
                                                               "winner": 2 if bob_picks_first else 1}})
    summary = summarise(store)
    assert summary["gold_accuracy"] == {
        "ann": {"moderation": {"accuracy": pytest.approx(2 / 3), "judgments": 3},
                "pairwise": {"accuracy": 1.0, "judgments": 1}},
        "bob": {"pairwise": {"accuracy": 0.0, "judgments": 1}}}
    # Pairwise alpha, nominal over the winner's candidate id: unit 1 (g1, g1), unit 2 (g2, b2). n = 4 values,
    # counts g1: 2, g2: 1, b2: 1. D_o = 2/4 (unit 2's two ordered disagreeing pairs over n_u - 1 = 1);
    # D_e = (n^2 - sum of squared counts) / (n (n - 1)) = (16 - 6) / 12; alpha = 1 - (2/4) / (10/12) = 0.4.
    assert summary["agreement_krippendorff_alpha"]["pairwise"] == pytest.approx(1 - (2 / 4) / (10 / 12))
    from keel.cli.main import main

    assert main(["feedback", "stats", "--db", f"sqlite:///{tmp_path / 'fb.db'}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["gold_accuracy"]["bob"] == {"pairwise": {"accuracy": 0.0, "judgments": 1}}
    assert printed["store"]["items"] == 5 and printed["answers"] == {"moderation": 2, "pairwise": 7}
    datasheet = export(store, tmp_path / "export")
    assert datasheet["counts"]["preferences"] == 4  # the served pairs' answers; the gold pair's are left out
    assert datasheet["gold_accuracy"] == summary["gold_accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "export" / "moderation.jsonl").read_text().splitlines()]
    assert rows == []


@pytest.fixture
def gold_service(tiny_reward_model: Path, tiny_moderation_model: Path, tmp_path: Path):
    from keel.service.app import create_app
    from keel.service.settings import Settings

    keys, annotators = tmp_path / "keys", tmp_path / "annotators"
    keys.write_text("client-key\n")
    annotators.write_text("alice:alice-key\n")
    settings = Settings(model=tiny_reward_model, moderation_model=tiny_moderation_model, api_keys_file=keys,
                        annotator_keys_file=annotators, feedback_db=f"sqlite:///{tmp_path / 'fb.db'}",
                        feedback_gold_file=write_gold(tmp_path / "gold.jsonl", GOLD[:1]), feedback_gold_rate=1.0)
    with TestClient(create_app(settings)) as client:
        yield client


def test_the_page_serves_gold_with_the_models_verdict_and_reports_accuracy(gold_service: TestClient):
    alice, client = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer client-key"}
    shown = gold_service.get("/v1/label/next?task=moderation", headers=alice).json()["item"]
    assert shown["text"] == "I will stab you tonight" and shown["id"].startswith("modr-")
    assert "gold" not in json.dumps(shown)  # unannounced
    served = gold_service.post("/v1/moderations", json={"input": "I will stab you tonight"}, headers=client).json()
    assert shown["scores"] == pytest.approx(served["results"][0]["category_scores"], abs=1e-5)  # the model's verdict
    answer = {c: False for c in CATEGORIES} | {"violence": True}  # the page sends all 13: threatening is wrong
    assert gold_service.post("/v1/label/answers", json={"task": "moderation", "item_id": shown["id"],
                                                        "categories": answer}, headers=alice).status_code == 201
    assert gold_service.get("/v1/feedback/stats", headers=client).status_code == 403
    stats = gold_service.get("/v1/feedback/stats", headers=alice).json()
    assert stats["gold_accuracy"] == {"alice": {"moderation": {"accuracy": 0.5, "judgments": 2}}}
    metrics = gold_service.get("/metrics").text
    assert 'keel_feedback_gold_accuracy{annotator="alice",task="moderation"} 0.5' in metrics


def test_a_bad_gold_file_stops_the_server_with_its_line(tiny_reward_model: Path, tiny_moderation_model: Path,
                                                        tmp_path: Path):
    from keel.service.app import create_app
    from keel.service.settings import Settings

    settings = Settings(model=tiny_reward_model, moderation_model=tiny_moderation_model,
                        feedback_db=f"sqlite:///{tmp_path / 'fb.db'}",
                        feedback_gold_file=write_gold(tmp_path / "gold.jsonl", [GOLD[0], {"text": 1}]))
    with pytest.raises(RuntimeError, match=r"gold.jsonl:2: text and context are strings"), \
            TestClient(create_app(settings)):
        pass


def test_feedback_tokens_are_signed_scoped_and_expire():
    from keel.core.artifact import KeelError
    from keel.service.feedback_tokens import FeedbackTokens

    tokens = FeedbackTokens(b"s" * 32, ttl_s=60)
    token = tokens.issue("chatcmpl-abc", now=1000)
    assert tokens.verify(token, now=1059) == "chatcmpl-abc" and tokens.verify(token, now=1061) is None
    forged = token.replace("chatcmpl-abc", "chatcmpl-abd")
    assert tokens.verify(forged, now=1000) is None  # the signature covers the id
    assert FeedbackTokens(b"t" * 32, ttl_s=60).verify(token, now=1000) is None  # and the secret
    for malformed in ("fbt.", "fbt.x.y.z", "key-1", token + "x"):
        assert tokens.verify(malformed, now=1000) is None
    with pytest.raises(KeelError, match="openssl rand"):
        FeedbackTokens(b"short", ttl_s=60)


def test_an_end_users_browser_gives_feedback_with_the_responses_token(tiny_reward_model: Path,
                                                                     tiny_moderation_model: Path, tmp_path: Path):
    from keel.service.app import create_app
    from keel.service.settings import Settings

    keys, secret = tmp_path / "keys", tmp_path / "secret"
    keys.write_text("client-key\n")
    secret.write_text("0123456789abcdef" * 4 + "\n")
    settings = Settings(model=tiny_reward_model, moderation_model=tiny_moderation_model, api_keys_file=keys,
                        feedback_db=f"sqlite:///{tmp_path / 'fb.db'}", feedback_token_secret_file=secret)
    with TestClient(create_app(settings)) as client:
        served = [client.post("/v1/moderations", json={"input": text}, headers={"Authorization": "Bearer client-key"})
                  for text in ("first", "second")]
        (first, token), (second, _) = ((r.json()["id"], r.headers["x-keel-feedback-token"]) for r in served)
        wait_recorded(client, first)
        browser = {"Authorization": f"Bearer {token}"}  # no API key
        body = {"id": first, "index": 0, "categories": {"violence": True}}
        given = client.post("/v1/feedback", json=body, headers=browser)
        assert given.status_code == 201, given.text
        answers = {item.id: a for item, a, _ in client.app.state.keel.feedback.items_with_feedback()}
        assert [a.annotator for a in answers[first]] == ["end-user"]
        other = client.post("/v1/feedback", json={**body, "id": second}, headers=browser)
        assert other.status_code == 403 and first in other.json()["error"]["message"]  # this response only
        assert client.post("/v1/moderations", json={"input": "x"}, headers=browser).status_code == 401  # no key
        forged = {"Authorization": f"Bearer {token[:-2]}xx"}
        assert client.post("/v1/feedback", json=body, headers=forged).json()["error"]["code"] == "invalid_api_key"
