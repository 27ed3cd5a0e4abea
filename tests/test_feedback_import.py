"""`keel feedback import`: labels made elsewhere enter the store as one annotator's answers, reach the export in
its formats, and a bad row stops the import before anything is written, named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keel.cli.main import main
from keel.service.feedback import FeedbackStore
from keel.service.feedback_quality import summarise


def run(*args: str) -> int:
    return main(["feedback", *args])


def test_labels_from_csv_files_reach_the_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    db = f"sqlite:///{tmp_path / 'fb.db'}"
    moderation = tmp_path / "moderation.csv"
    moderation.write_text('text,context,violence,hate,note\n"I will hurt you",,1,,a\n"Nice day",User: hi,0,no,b\n')
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("prompt,reply,rating\nWhat is 2+2?,4,7\n")
    preferences = tmp_path / "preferences.jsonl"
    preferences.write_text(json.dumps({"prompt": "Help me", "chosen": "Sure: ...", "rejected": "No."}) + "\n")
    assert run("import", str(moderation), "--task", "moderation", "--annotator", "vendor", "--db", db) == 0
    assert "imported 2 moderation labels by vendor (2 new items)" in capsys.readouterr().out
    assert run("import", str(moderation), "--task", "moderation", "--annotator", "vendor", "--db", db) == 0
    assert "(0 new items)" in capsys.readouterr().out  # twice: nothing added twice
    assert run("import", str(ratings), "--task", "rating", "--annotator", "vendor", "--db", db) == 0
    assert run("import", str(preferences), "--task", "preference", "--annotator", "vendor", "--db", db) == 0
    store = FeedbackStore(db)
    assert store.counts() == {"items": 4, "candidates": 2, "feedback": 4}
    # A team annotator labels an imported text again: agreement with the outside labels is measured.
    hurt = next(item.id for item, _, _ in store.items_with_feedback()
                if item.kind == "moderation" and item.input["texts"][0]["text"] == "I will hurt you")
    store.give(hurt, "alice", "moderation", {"categories": {"violence": True}})
    assert summarise(store)["annotators"] == {"vendor": 4, "alice": 1}

    out = tmp_path / "export"
    assert run("export", "--db", db, "--out", str(out)) == 0
    rows = {r["text"]: r for r in map(json.loads, (out / "moderation.jsonl").read_text().splitlines())}
    assert rows["I will hurt you"]["violence"] is True and rows["I will hurt you"]["hate"] is None  # blank
    assert rows["Nice day"]["violence"] is False and rows["Nice day"]["hate"] is False
    assert rows["Nice day"]["context"] == "User: hi"
    [rating] = map(json.loads, (out / "ratings.jsonl").read_text().splitlines())
    assert rating["score"] == 1.0 and rating["messages"][-1] == {"role": "assistant", "content": "4"}
    [preference] = map(json.loads, (out / "preferences.jsonl").read_text().splitlines())
    assert preference["chosen"] == [{"role": "assistant", "content": "Sure: ..."}]
    assert preference["rejected"] == [{"role": "assistant", "content": "No."}]


def test_the_preference_export_is_trls_conversational_format(tmp_path: Path, tiny_policy: str):
    """Loaded as TRL loads a preference dataset, recognised as conversational, rendered by a chat template and
    unpaired (KTO's form) by TRL's own data utilities."""
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template, is_conversational, unpair_preference_dataset

    db = f"sqlite:///{tmp_path / 'fb.db'}"
    preferences = tmp_path / "preferences.csv"
    preferences.write_text("prompt,chosen,rejected\nHelp me,Sure: ...,No.\nWhat is 2+2?,4,5\n")
    assert run("import", str(preferences), "--task", "preference", "--annotator", "vendor", "--db", db) == 0
    assert run("export", "--db", db, "--out", str(tmp_path / "export")) == 0
    dataset = load_dataset("json", data_files=str(tmp_path / "export" / "preferences.jsonl"), split="train")
    assert len(dataset) == 2 and all(is_conversational(row) for row in dataset)
    help_me = next(row for row in dataset if row["prompt"][0]["content"] == "Help me")
    rendered = apply_chat_template(help_me, AutoTokenizer.from_pretrained(tiny_policy))
    assert set(rendered) >= {"prompt", "chosen", "rejected"} and "Help me" in rendered["prompt"]
    assert rendered["chosen"].startswith("Sure: ...")
    unpaired = unpair_preference_dataset(dataset.select_columns(["prompt", "chosen", "rejected"]))
    assert len(unpaired) == 4 and sorted(unpaired["label"]) == [False, False, True, True]


@pytest.mark.parametrize(("task", "content", "says"), [
    ("moderation", "text,violence\nok,1\nbad,maybe\n", ":3: violence is 'maybe'; use 1/0"),
    ("moderation", "text,violence\nok,1\nbad,\n", ":3: no category labelled"),
    ("rating", "prompt,reply,rating\nq,a,7\nq,b,9\n", ":3: rating is '9'; use a whole number from 1 to 7"),
    ("preference", "prompt,chosen,rejected\nq,a,b\nq,,b\n", ":3: `chosen` is missing or empty"),
])
def test_a_bad_row_stops_the_import_naming_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], task: str,
                                                   content: str, says: str):
    db = f"sqlite:///{tmp_path / 'fb.db'}"
    labels = tmp_path / "labels.csv"
    labels.write_text(content)
    assert run("import", str(labels), "--task", task, "--annotator", "vendor", "--db", db) == 2
    error = capsys.readouterr().err
    assert f"labels.csv{says}" in error and len(error.strip().splitlines()) == 1
    assert FeedbackStore(db).counts()["items"] == 0  # the good first row was not written either
