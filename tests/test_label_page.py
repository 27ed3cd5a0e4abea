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

from keel.service.feedback import FeedbackStore
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
    with keel_server(tiny_reward_model, "--api-keys-file", str(keys), "--annotator-keys-file", str(annotators),
                     "--feedback-db", url, moderation=tiny_moderation_model) as (base, _):
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
            browser.close()

    answers = {item.id: a for item, a, _ in store.items_with_feedback()}
    assert len(answers) == 2 and all(a[0].annotator == "alice" for a in answers.values())
    labelled = {item.input["texts"][0]["text"]: (a[0].value["categories"], item.output["results"][0]["categories"])
                for item, a, _ in store.items_with_feedback()}
    assert set(labelled) == {first, second}
    answer, suggested = labelled[first]
    assert answer["harassment"] is (not suggested["harassment"])  # key 1 toggled the model's suggestion
    assert {c for c in answer if answer[c] != suggested[c]} == {"harassment"}
    answer, suggested = labelled[second]
    assert {c for c in answer if answer[c] != suggested[c]} == {"violence"}  # the click toggled violence only
    out = tmp_path / "export"
    datasheet = export(store, out)
    assert datasheet["annotators"] == {"alice": 2} and datasheet["counts"]["moderation"] == 2
    rows = [json.loads(line) for line in (out / "moderation.jsonl").read_text().splitlines()]
    assert {row["text"] for row in rows} == {first, second}
    assert all(set(row) >= {"harassment", "violence", "split"} for row in rows)
