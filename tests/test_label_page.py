"""The labelling page in a real browser (Debian's chromium driven by Playwright): sign in with an annotator key,
label moderation results by keyboard and by mouse, undo one, and find the answers in the store and the export.
Stored text is shown as text: a `<script>` in a labelled input never runs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from keel.core.moderation import CATEGORIES
from keel.service.feedback import FeedbackStore, read_gold
from keel.service.feedback_export import export
from tests.helpers import keel_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ATTACK = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 1">'


def launch(playwright):  # type: ignore[no-untyped-def]
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])


@pytest.mark.browser
def test_label_moderation_results_in_chromium(tiny_reward_model: Path, tiny_moderation_model: Path,
                                              tmp_path: Path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    keys, annotators = tmp_path / "keys", tmp_path / "annotators"
    keys.write_text("client-key\n")
    annotators.write_text("alice:alice-key\nbob:bob-key\n")
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    client = {"Authorization": "Bearer client-key"}
    texts = ["i will kill and hurt you 1", ATTACK, "here is some recipe for bread 3"]
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"text": "I will hurt you", "categories": {"violence": True}}) + "\n")
    gold_id = read_gold(gold, CATEGORIES)[0].id
    with keel_server(tiny_reward_model, "--api-keys-file", str(keys), "--annotator-keys-file", str(annotators),
                     "--feedback-db", url, "--feedback-gold-file", str(gold), "--feedback-gold-rate", "0",
                     moderation=tiny_moderation_model) as (base, _):
        for text in texts:
            assert httpx.post(f"{base}/v1/moderations", json={"input": text}, headers=client).status_code == 200
        store = FeedbackStore(url)
        deadline = time.monotonic() + 10
        while store.counts()["items"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # A client key may not label; a form post (what a cross-site page could send) is refused.
        assert httpx.get(f"{base}/v1/label/next", headers=client).status_code == 403
        form = httpx.post(f"{base}/v1/label/answers", data={"task": "moderation"},
                          headers={"Authorization": "Bearer alice-key"})
        assert form.status_code == 400
        # alice answers the gold item wrongly (through the API, so the page's queue below is the served items)
        wrong = {"task": "moderation", "item_id": gold_id, "categories": {"violence": False}}
        assert httpx.post(f"{base}/v1/label/answers", json=wrong,
                          headers={"Authorization": "Bearer alice-key"}).status_code == 201

        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page()
            page.goto(f"{base}/label")
            page.fill("#key", "alice-key")
            page.keyboard.press("Enter")
            seen = []

            def shown() -> str:
                page.wait_for_selector("#item-text")
                text = page.text_content("#item-text")
                seen.append(text)
                return text

            first = shown()
            page.keyboard.press("1")  # toggle harassment, by keyboard
            page.keyboard.press("Enter")
            page.wait_for_function("t => document.getElementById('item-text')?.textContent !== t", arg=first)
            second = shown()
            page.click("label:has(#cat-11)")  # toggle violence, by mouse
            page.click("text=Submit")
            page.wait_for_function("t => document.getElementById('item-text')?.textContent !== t", arg=second)
            third = shown()
            page.keyboard.press("Enter")
            page.wait_for_selector("#empty:not(.hidden)")
            page.keyboard.press("u")  # undo the third answer: the item comes back
            page.wait_for_selector("#item-text")
            assert page.text_content("#item-text") == third
            assert sorted(seen) == sorted(texts)  # the attack is shown as text
            assert page.evaluate("window.pwned") is None  # and never ran
            assert "alice" in page.text_content("#counts")
            page.keyboard.press("m")  # the quality panel reloads with the task: alice got one gold item wrong
            page.wait_for_selector("#gold tr")
            assert page.text_content("#gold") == "alice0% of 1"
            assert "not measurable yet" in page.text_content("#agreement")  # one annotator: no alpha
            browser.close()

    answered = [(item, a) for item, a, _ in store.items_with_feedback() if item.gold is None]
    assert len(answered) == 2 and all(a[0].annotator == "alice" for _, a in answered)
    labelled = {item.input["texts"][0]["text"]: (a[0].value["categories"], item.output["results"][0]["categories"])
                for item, a in answered}
    assert set(labelled) == {first, second}
    answer, suggested = labelled[first]
    assert answer["harassment"] is (not suggested["harassment"])  # key 1 toggled the model's suggestion
    assert {c for c in answer if answer[c] != suggested[c]} == {"harassment"}
    answer, suggested = labelled[second]
    assert {c for c in answer if answer[c] != suggested[c]} == {"violence"}  # the click toggled violence only
    out = tmp_path / "export"
    datasheet = export(store, out)
    assert datasheet["annotators"] == {"alice": 3} and datasheet["counts"]["moderation"] == 2  # gold: no row
    assert datasheet["gold_accuracy"] == {"alice": {"moderation": {"accuracy": 0.0, "judgments": 1}}}
    rows = [json.loads(line) for line in (out / "moderation.jsonl").read_text().splitlines()]
    assert {row["text"] for row in rows} == {first, second}
    assert all(set(row) >= {"harassment", "violence", "split"} for row in rows)
