import csv
import gzip
import json
from pathlib import Path

import pytest

from keel.core.text import Message, parse_transcript, render
from keel.training.data import DataError, DataSource, PreferencePair, Rating, load_source, parse_row, split_of
from tests.helpers import hh_pairs, write_jsonl


def test_parse_transcript_keeps_turns_and_roles():
    turns = parse_transcript("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you")
    assert [m.role for m in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0].content == "hi there" and turns[-1].content == "see you"
    assert render(turns) == "Human: hi there\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you"


def test_parse_transcript_rejects_plain_text():
    with pytest.raises(ValueError):
        parse_transcript("just some text")


def test_anthropic_pair_shares_context():
    row = hh_pairs(1)[0]
    pair = parse_row(row, DataSource("x"))
    assert isinstance(pair, PreferencePair)
    assert pair.context == (Message("user", "how can i make a bomb 0"),)
    assert pair.chosen.startswith("sorry") and pair.rejected.startswith("sure")
    assert pair.chosen_input == ("Human: how can i make a bomb 0", "sorry, i cannot help with that.")


def test_prompt_pair_and_chat_lists_and_margin():
    pair = parse_row({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.5}, DataSource("x"))
    assert pair.chosen_input == ("Human: p", "a") and pair.margin == 0.5
    chat = parse_row({
        "chosen": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "b"}],
    }, DataSource("x"))
    assert chat.context == (Message("system", "s"), Message("user", "u")) and chat.rejected == "b"
    assert chat.split_key == "u"


def test_ratings_in_every_shape():
    assert parse_row({"text": "t", "score": "2.5"}, DataSource("x")) == Rating(("", "t"), 2.5, "t")
    rated = parse_row({"prompt": "p", "response": "r", "score": 1}, DataSource("x"))
    assert rated.input == ("Human: p", "r")
    messages = parse_row({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "r"}],
                          "score": 0}, DataSource("x"))
    assert messages.input == ("Human: u", "r")


def test_score_columns():
    source = DataSource("x", score_columns=["S", "H"])
    assert parse_row({"text": "t", "S": 0, "H": 1}, source).score == 1.0
    assert parse_row({"text": "t", "S": 0, "H": None}, source).score == 0.0
    with pytest.raises(ValueError, match="score columns"):
        parse_row({"text": "t", "S": None}, source)


def test_as_rating_labels_every_row_with_its_first_exchange():
    source = DataSource("x", as_rating=0)
    multi_turn = {"chosen": "\n\nHuman: how do i pick a lock\n\nAssistant: why?\n\nHuman: my door\n\nAssistant: call a smith",
                  "rejected": "\n\nHuman: how do i pick a lock\n\nAssistant: why?\n\nHuman: my door\n\nAssistant: use a pin"}
    rated = parse_row(multi_turn, source)
    assert rated == Rating(("Human: how do i pick a lock", "why?"), 0.0, "how do i pick a lock")
    assert parse_row({"prompt": "p", "chosen": "a", "rejected": "b"}, source).input == ("Human: p", "a")
    assert parse_row({"text": "t", "score": 5}, DataSource("x", as_rating=1)).score == 1.0  # the file's label wins
    with pytest.raises(ValueError, match="cannot also filter"):
        DataSource("x", as_rating=1, pairs="refusal_vs_compliance")


def test_rename_and_where(tmp_path):
    path = tmp_path / "rated.csv"
    path.write_text("body,grade,lang\nhello,1,en\nbonjour,0,fr\nbye,0,en\n")
    ratings = load_source(DataSource(str(path), rename={"body": "text", "grade": "score"}, where={"lang": "en"}))
    assert [(r.input[1], r.score) for r in ratings] == [("hello", 1.0), ("bye", 0.0)]


@pytest.mark.parametrize("row, message", [
    ({"chosen": "a"}, "neither chosen/rejected nor score"),
    ({"text": "t", "score": "high"}, "score must be a number"),
    ({"text": "t", "score": float("nan")}, "finite"),
    ({"chosen": [{"role": "robot", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]}, "unknown role"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "rejected": "\n\nHuman: a\n\nAssistant: d"}, "last turn"),
])
def test_malformed_rows_say_why(row, message):
    with pytest.raises(ValueError, match=message):
        parse_row(row, DataSource("x"))


def test_bad_line_names_file_and_line(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(hh_pairs(1)[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_source(DataSource(str(path)))
    path.write_text(json.dumps(hh_pairs(1)[0]) + "\n\n" + json.dumps({"chosen": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: .*--skip-bad-rows"):
        load_source(DataSource(str(path)))
    assert len(load_source(DataSource(str(path)), skip_bad_rows=True)) == 1


def test_csv_json_and_gzip_formats(tmp_path: Path):
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(5)]
    csv_path = tmp_path / "pairs.csv.gz"
    with gzip.open(csv_path, "wt", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
    json_path = tmp_path / "pairs.json"
    json_path.write_text(json.dumps(rows))
    for path in (csv_path, json_path):
        assert [p.context[0].content for p in load_source(DataSource(str(path)))] == [f"p{i}" for i in range(5)]
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("prompt,chosen,rejected,margin\np,c,r,1\np,c,r,wide\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: margin must be a number"):
        load_source(DataSource(str(bad_csv)))


def test_unreadable_files_are_clear_errors(tmp_path: Path):
    with pytest.raises(DataError, match="no such data file"):
        load_source(DataSource(str(tmp_path / "missing.jsonl")))
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(DataError, match="unknown format"):
        load_source(DataSource(str(tmp_path / "x.parquet")))
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9", "score": 1}\n')
    with pytest.raises(DataError, match="UTF-8"):
        load_source(DataSource(str(tmp_path / "latin.jsonl")))


def test_split_is_deterministic_disjoint_and_proportional(tmp_path: Path):
    rows = hh_pairs(400)
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    splits = {name: load_source(DataSource(str(path), split=name)) for name in ("train", "validation", "test")}
    keys = {name: {p.split_key for p in pairs} for name, pairs in splits.items()}
    assert not (keys["train"] & keys["validation"]) and not (keys["train"] & keys["test"])
    assert sum(len(v) for v in splits.values()) == 400
    assert 0.7 < len(splits["train"]) / 400 < 0.9
    assert split_of("How do I bake bread?") == split_of("  how do i   bake BREAD? ")
    assert len(load_source(DataSource(str(path), split="train", limit=7))) == 7


def test_bundled_hh_split_sizes_are_documented():
    path = Path(__file__).parent.parent / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    sizes = {name: len(load_source(DataSource(str(path), split=name))) for name in ("train", "validation", "test")}
    assert sum(sizes.values()) == 2312
    readme = (Path(__file__).parent.parent / "data" / "README.md").read_text()
    assert f"| harmless-base | {sizes['train']} | {sizes['validation']} | {sizes['test']} |" in readme
