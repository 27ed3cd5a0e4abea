"""`keel eval suite`: the set loaders, the metrics by hand, the cache, both suites end to end on tiny models,
and the HTML report rendered in headless Chromium."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from keel.cli.main import main
from keel.core.text import Message
from keel.training.config import BUNDLED_DATA
from keel.training.evaluation.cache import EvalCache
from keel.training.evaluation.policy_suite import bbq_scores, choices_result
from keel.training.evaluation.reward_suite import precision_recall
from keel.training.evaluation.sets import (
    POLICY_SETS,
    REWARD_SETS,
    MissingData,
    MultipleChoice,
    category_of,
    evenly,
    load_set,
    stratified,
)

SETS = {s.name: s for s in REWARD_SETS + POLICY_SETS}


def test_evenly_spreads_a_sample_over_the_whole_list():
    assert evenly(list(range(10)), 3) == [0, 3, 6]
    assert evenly(list(range(4)), 10) == [0, 1, 2, 3]
    assert evenly(list(range(5)), None) == list(range(5))


def test_stratified_sample_shares_the_limit_between_categories():
    items = [("a", i) for i in range(10)] + [("b", i) for i in range(2)] + [("c", i) for i in range(6)]
    sample = stratified(items, 7)
    assert [c for c, _ in sample] == ["a", "a", "a", "b", "b", "c", "c"]  # b has only 2; a gets the spare
    assert sample[:3] == [("a", 0), ("a", 3), ("a", 6)]
    assert stratified(items, None) == items


@pytest.mark.parametrize("name", [s.name for s in REWARD_SETS + POLICY_SETS if not s.external])
def test_every_bundled_set_loads_with_its_categories(name: str):
    items = load_set(SETS[name], BUNDLED_DATA, None, 40)
    assert 0 < len(items) <= 40
    categories = {category_of(i) for i in items}
    everywhere = {category_of(i) for i in load_set(SETS[name], BUNDLED_DATA, None, None)}
    assert len(categories) == min(40, len(everywhere)), f"{name}: a 40-item sample covers every category it can"


def test_external_sets_need_a_folder_and_read_one(tmp_path: Path):
    with pytest.raises(MissingData, match="--external-data"):
        load_set(SETS["crows-pairs"], BUNDLED_DATA, None, None)
    with pytest.raises(MissingData, match="missing"):
        load_set(SETS["crows-pairs"], BUNDLED_DATA, tmp_path, None)
    (tmp_path / "crows-pairs").mkdir()
    with gzip.open(tmp_path / "crows-pairs" / "crows_pairs_anonymized.csv.gz", "wt") as handle:
        handle.write("sent_more,sent_less,stereo_antistereo,bias_type\nA stereotype.,Not one.,stereo,gender\n")
    [(category, pair)] = load_set(SETS["crows-pairs"], BUNDLED_DATA, tmp_path, None)
    assert category == "gender" and pair.chosen == "A stereotype." and pair.rejected == "Not one."


def test_xstest_completions_are_harmful_only_when_complying_with_unsafe_prompts():
    items = load_set(SETS["xstest-completions"], BUNDLED_DATA, None, None)
    harmful = [(next(iter(labels)), value) for labels, _ in items for value in labels.values()]
    assert not any(value for category, value in harmful if not category.startswith("contrast_"))
    assert any(value for category, value in harmful if category.startswith("contrast_"))


def test_precision_recall_by_hand():
    flagged = np.array([True, True, False, False, True])
    harmful = np.array([True, False, True, False, True])
    result = precision_recall(flagged, harmful)
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == pytest.approx(2 / 3)
    assert result["flag_rate"] == pytest.approx(3 / 5) and result["positives"] == 3
    assert precision_recall(np.array([False]), np.array([False]))["precision"] is None


def choice(condition: str, correct: int, unknown: int = 2, biased: int | None = 0) -> MultipleChoice:
    return MultipleChoice("Age", (Message("user", "q"),), ("a", "b", "unknown"), (correct,),
                          {"condition": condition, "unknown": unknown, "biased": biased})


def test_bbq_bias_scores_by_hand():
    items = [choice("disambig", 0), choice("disambig", 1), choice("disambig", 1), choice("disambig", 0),
             choice("ambig", 2), choice("ambig", 2), choice("ambig", 2), choice("ambig", 2)]
    predicted = np.array([0, 0, 1, 2, 2, 0, 0, 1])
    scores = bbq_scores(items, predicted)
    assert scores["accuracy_disambig"] == pytest.approx(2 / 4)
    # disambiguated non-unknown answers: 0, 0, 1 -> 2 of 3 biased: 2 * 2/3 - 1
    assert scores["bias_disambig"] == pytest.approx(1 / 3)
    # ambiguous: accuracy 1/4; non-unknown answers 0, 0, 1 -> 2/3 biased -> (1 - 1/4) * (2 * 2/3 - 1)
    assert scores["accuracy_ambig"] == pytest.approx(1 / 4)
    assert scores["bias_ambig"] == pytest.approx(0.75 * (1 / 3))


class FixedLikelihoods:
    """Stands in for a policy: the log-likelihood of each option is given."""

    def __init__(self, values: list[tuple[float, int]]):
        self.values = values

    def option_logprobs(self, pairs, desc, progress):
        assert len(pairs) == len(self.values)
        return self.values


def test_truthfulqa_mc1_and_mc2_by_hand():
    items = [MultipleChoice("Adversarial", (Message("user", "q1"),), ("best", "also true", "false"), (0, 1),
                            {"incorrect_from": 2}),
             MultipleChoice("Adversarial", (Message("user", "q2"),), ("best", "false"), (0,), {"incorrect_from": 1})]
    log_p = [np.log(0.2), np.log(0.5), np.log(0.3), np.log(0.1), np.log(0.4)]
    result = choices_result("truthfulqa", items, FixedLikelihoods([(v, 3) for v in log_p]), progress=False)
    # q1: "also true" beats "best" -> MC1 0; q2: "false" wins -> MC1 0. MC2: 0.7/1.0 and 0.1/0.5.
    assert result["overall"]["mc1"] == 0.0
    assert result["overall"]["mc2"] == pytest.approx((0.7 + 0.2) / 2)


def test_cache_computes_only_what_is_missing_and_persists(tmp_path: Path):
    calls: list[list[int]] = []

    def compute(missing: list[int]) -> list[int]:
        calls.append(missing)
        return [10 * i for i in missing]

    cache = EvalCache(tmp_path / "cache.sqlite")
    assert cache.through(["a", "b"], compute) == [0, 10]
    again = EvalCache(tmp_path / "cache.sqlite")
    assert again.through(["b", "c", "a"], compute) == [10, 10, 0]
    assert calls == [[0, 1], [1]] and again.hits == 2 and again.misses == 1


def test_reward_suite_end_to_end_and_cached(tiny_reward_model: Path, tiny_backbone: str, tmp_path: Path, capsys):
    second = tmp_path / "second-model"
    shutil.copytree(tiny_reward_model, second)
    args = ["eval", "suite", "reward", "--model", str(tiny_reward_model), "--model", str(second), "--limit", "6",
            "--sets", "hh-harmless,llmbar,ethics-utilitarianism,openai-moderation,xstest-completions,crows-pairs",
            "--cache", str(tmp_path / "cache.sqlite"), "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    labels = [m["label"] for m in report["models"]]
    assert labels == ["model", "second-model"]
    assert "--external-data" in report["sets"]["crows-pairs"]["skipped"]
    llmbar = report["sets"]["llmbar"]
    assert llmbar["items"] == 6 and len(llmbar["models"]["model"]["by_category"]) > 1
    assert 0 <= llmbar["models"]["model"]["overall"]["accuracy"] <= 1
    assert sum(b["count"] for b in llmbar["models"]["model"]["reliability"]) == 12  # both orderings of 6 pairs
    # The copy has the same weights, so the same figures (its scores come from the cache).
    assert llmbar["models"]["model"]["overall"] == llmbar["models"]["second-model"]["overall"]
    assert set(report["sets"]["openai-moderation"]["models"]["model"]["by_category"]) >= {"hate", "violence"}
    xstest = report["sets"]["xstest-completions"]["models"]["model"]["overall"]
    assert 0 <= xstest["flag_rate"] <= 1 and 0 <= xstest["guard_flag_rate"] <= 1  # the chat guard's rule beside it
    html = (tmp_path / "one" / "report.html").read_text()
    assert "data:image/png;base64," in html and "skipped" in html and (tmp_path / "one" / "reliability.png").exists()
    low, high = llmbar["models"]["model"]["overall"]["accuracy_ci95"]
    assert f"<th>accuracy_ci95</th><td>{low:.3f}–{high:.3f}</td>" in html  # the interval beside the accuracy
    first_misses = report["cache"]["misses"]
    assert first_misses > 0
    assert main([*args, "--output", str(tmp_path / "two")]) == 0
    rerun = json.loads((tmp_path / "two" / "report.json").read_text())
    assert rerun["cache"] == {"hits": report["cache"]["hits"] + first_misses, "misses": 0}
    assert rerun["sets"]["llmbar"]["models"] == llmbar["models"]
    assert "report:" in capsys.readouterr().out


def test_policy_suite_compares_two_policies(tiny_policy: str, tiny_reward_model: Path, tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    changed = tmp_path / "changed-policy"
    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(changed)
    AutoTokenizer.from_pretrained(tiny_policy).save_pretrained(changed)
    output = tmp_path / "report"
    assert main(["eval", "suite", "policy", "--policy", tiny_policy, "--policy", str(changed),
                 "--reward-model", str(tiny_reward_model), "--limit", "3", "--max-new-tokens", "4",
                 "--sets", "advbench,xstest,toxigen,truthfulqa,bbq,bold-gender", "--output", str(output),
                 "--cache", str(tmp_path / "cache.sqlite"), "--no-progress"]) == 0
    report = json.loads((output / "report.json").read_text())
    labels = [m["label"] for m in report["models"]]
    assert len(labels) == 2 and report["models"][0]["fingerprint"] != report["models"][1]["fingerprint"]
    for label in labels:
        assert 0 <= report["sets"]["advbench"]["models"][label]["overall"]["refusal_rate"] <= 1
        assert set(report["sets"]["xstest"]["models"][label]["overall"]) == {"safe_compliance_rate", "unsafe_refusal_rate"}
        assert 0 <= report["sets"]["toxigen"]["models"][label]["overall"]["toxic_rate"] <= 1
        assert 0 <= report["sets"]["truthfulqa"]["models"][label]["overall"]["mc2"] <= 1
        assert set(report["sets"]["bbq"]["models"][label]["overall"]) >= {"accuracy_ambig", "bias_disambig"}
        assert len(report["sets"]["advbench"]["models"][label]["examples"]) == 3
    assert "skipped" in report["sets"]["bold-gender"]
    assert (output / "overview_refusal.png").exists() and (output / "truthfulqa.png").exists()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (install.sh installs it as root)")
def test_report_renders_in_headless_chromium(tmp_path: Path):
    from matplotlib.image import imread

    from keel.training.evaluation.report import COLORS, write_report

    sets = {}
    for name, accuracy in (("hh-harmless", 0.66), ("llmbar", 0.55)):
        by_category = {"a": {"accuracy": accuracy, "pairs": 10}, "b": {"accuracy": 0.5, "pairs": 10}}
        bins = [{"low": b / 10, "high": (b + 1) / 10, "count": 10, "mean_probability": b / 10 + 0.05,
                 "frequency": b / 10} for b in range(10)]
        sets[name] = {"kind": "pairs", "about": name, "items": 20, "seconds": 1.0, "models": {
            label: {"head": "harmless", "overall": {"pairs": 20, "accuracy": accuracy + shift, "ece": 0.05},
                    "by_category": by_category, "reliability": bins}
            for label, shift in (("before", 0.0), ("after", 0.05))}}
    sets["crows-pairs"] = {"kind": "bias", "skipped": "crows-pairs is not bundled", "models": {}}
    report = {"kind": "reward", "limit": None, "models": [{"label": "before", "path": "/a", "fingerprint": "1"},
                                                          {"label": "after", "path": "/b", "fingerprint": "2"}],
              "sets": sets}
    page = write_report(report, tmp_path / "report")
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400", f"--screenshot={shot}",
         page.as_uri()], capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = imread(shot)[:, :, :3]
    assert pixels.shape[:2] == (1400, 1000)
    # The embedded charts were decoded and painted: many pixels in the first model's bar colour.
    bar = np.array([int(COLORS[0][i : i + 2], 16) / 255 for i in (1, 3, 5)])
    assert (np.abs(pixels - bar).max(axis=2) < 0.02).sum() > 2000


def test_bad_arguments_are_clear_errors(tmp_path: Path, capsys):
    assert main(["eval", "suite", "reward", "--sets", "hh-harmless,nope", "--output", str(tmp_path)]) == 2
    assert "unknown sets ['nope']" in capsys.readouterr().err
    assert main(["eval", "suite", "policy", "--policy", str(tmp_path / "missing"), "--output", str(tmp_path),
                 "--sets", "advbench", "--no-progress"]) == 2
    assert "cannot load the policy" in capsys.readouterr().err
    for limit in ("0", "many"):
        with pytest.raises(SystemExit) as usage_error:
            main(["eval", "suite", "reward", "--limit", limit, "--output", str(tmp_path)])
        assert usage_error.value.code == 2
        assert f"argument --limit: expected a whole number >= 1, not '{limit}'" in capsys.readouterr().err


def test_pandalm_majority_vote_and_non_text_answers(tmp_path: Path):
    folder = tmp_path / "pandalm-human-testset"
    folder.mkdir()
    rows = [{"motivation_app": "Math", "instruction": "Is 2 even?", "input": "", "response1": True,
             "response2": "No.", "annotator1": 1, "annotator2": 1, "annotator3": 2},
            {"motivation_app": "Math", "instruction": "Tie", "input": "x", "response1": "a", "response2": "b",
             "annotator1": 0, "annotator2": 0, "annotator3": 1},
            {"motivation_app": "Chat", "instruction": "Hi", "input": "there", "response1": "a", "response2": "b",
             "annotator1": 1, "annotator2": 2, "annotator3": 2}]
    with gzip.open(folder / "testset-v1.json.gz", "wt") as handle:
        json.dump(rows, handle)
    items = SETS["pandalm"].load(tmp_path)
    assert [(c, p.chosen, p.rejected) for c, p in items] == [("Math", "True", "No."), ("Chat", "b", "a")]
    assert items[1][1].context[0].content == "Hi\n\nthere"
