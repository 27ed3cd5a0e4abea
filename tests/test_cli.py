import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keel.cli.main import main
from tests.helpers import hh_pairs, write_jsonl


def run_keel(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keel", *args], capture_output=True, text=True, timeout=300)


def test_help_explains_every_option():
    commands = [["train", name] for name in ("reward", "moderation", "sft", "reinforce", "rloo", "ppo", "dpo")]
    for command in (*commands, ["eval", "reward"], ["eval", "policy"], ["serve"]):
        result = run_keel(*command, "--help")
        assert result.returncode == 0
        assert "--help" in result.stdout
    serve_help = run_keel("serve", "--help").stdout
    assert "KEEL_API_KEYS" in serve_help and "--max-body-bytes" in serve_help
    assert "--set KEY=VALUE" in run_keel("train", "reward", "--help").stdout
    assert "configs/rloo.yaml" in run_keel("train", "rloo", "--help").stdout


def test_eval_reward_prints_metrics_for_any_file(tiny_reward_model: Path, tmp_path: Path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(10))
    assert main(["eval", "reward", "--model", str(tiny_reward_model), "--data", str(data), "--json",
                 "--backend", "onnx-int8"]) == 0
    report = json.loads(capsys.readouterr().out)
    metrics = report[str(data)]["harmless"]
    assert metrics["pairs"] == 10 and {"accuracy", "shorter_wins_accuracy", "ece"} <= set(metrics)
    assert main(["eval", "reward", "--model", str(tiny_reward_model), "--data", str(data)]) == 0
    assert re.search(r"accuracy=[01]\.\d{4}  accuracy_ci95=\[[01]\.\d{4}, [01]\.\d{4}\]", capsys.readouterr().out)


def test_bad_data_is_a_clear_error_not_a_traceback(tiny_reward_model: Path, tmp_path: Path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(hh_pairs(1)[0]) + "\n[1, 2]\n")
    assert main(["eval", "reward", "--model", str(tiny_reward_model), "--data", str(bad)]) == 2
    assert "bad.jsonl:2: expected a JSON object" in capsys.readouterr().err
    assert main(["eval", "reward", "--model", str(tmp_path), "--data", str(bad)]) == 2
    assert "not a Keel model directory" in capsys.readouterr().err
    assert main(["train", "reward", "--output", str(tmp_path / "m"), "--set", "training.epoch=1"]) == 2
    assert "unknown keys ['epoch']" in capsys.readouterr().err


def test_train_reward_from_the_command_line_keeps_library_info_lines_out(tiny_backbone: str, tmp_path: Path):
    write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(16))
    config = tmp_path / "rm.yaml"
    config.write_text(f"base_model: {tiny_backbone}\nmax_length: 48\nheads:\n  - name: harmless\n"
                      f"    train: [pairs.jsonl]\n    validation: [{{path: pairs.jsonl, limit: 8}}]\n"
                      "training: {epochs: 1, batch_size: 8, eval_every: 0, checkpoint_every: 0}\n")
    result = run_keel("train", "reward", "--config", str(config), "--output", str(tmp_path / "rm"), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rm" / "model.int8.onnx").exists()
    # ONNX Runtime's optimiser and quantiser log every fusion and skipped tensor at INFO: only with --verbose.
    assert " INFO root:" not in result.stderr and " INFO fusion_base:" not in result.stderr, result.stderr[-2000:]


def test_bad_serve_settings_are_clear_errors_before_anything_loads(monkeypatch, capsys):
    def must_not_start(settings):
        raise AssertionError("serve started (and could have trained the default model) with invalid settings")

    monkeypatch.setattr("keel.service.server.serve", must_not_start)
    monkeypatch.setenv("KEEL_MAX_BATCH_SIZE", "0")
    assert main(["serve", "--max-items", "0", "--log-level", "debug"]) == 2
    err = capsys.readouterr().err
    assert "--max-items (or KEEL_MAX_ITEMS): Input should be greater than or equal to 1" in err
    assert "--max-batch-size (or KEEL_MAX_BATCH_SIZE)" in err and "Traceback" not in err


def test_version_and_one_line_errors_for_bad_set_paths_and_missing_models(tmp_path: Path):
    assert run_keel("--version").stdout.strip() == "keel 0.1.0"
    for assignment, named in (("training.epochs.x=1", "training.epochs is a value (1), not a section with a key 'x'"),
                              ("heads.9.name=x", "heads is a list of 3; '9' is not an index in it")):
        result = run_keel("train", "reward", "--output", str(tmp_path / "rm"), "--set", assignment)
        assert result.returncode == 2 and result.stderr.strip().endswith(named) and result.stderr.count("\n") == 1
    missing = run_keel("serve", "--model", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr == f"keel: error: no model directory or model store at " \
                                                         f"{tmp_path / 'nowhere'}\n"


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_work_directory(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": 1}\n')
    result = run_keel("train", "reward", "--output", str(tmp_path / "rm"), "--no-progress",
                      "--set", f"heads.0.train.0.path={bad}")
    assert result.returncode == 2 and f"{bad}:1:" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_the_settings_table_in_the_docs_is_the_settings_class():
    from keel.service.settings import settings_table

    docs = (Path(__file__).resolve().parent.parent / "docs" / "service.md").read_text()
    assert settings_table() in docs, "docs/service.md is out of date: regenerate its table (command in the file)"


def test_conflicting_serve_options_are_one_line_errors(tiny_reward_model: Path):
    both = run_keel("serve", "--model", str(tiny_reward_model), "--policy", "default", "--upstream", "http://x")
    assert both.returncode == 2 and both.stderr == ("keel serve: error: give --policy (generate locally) or "
                                                    "--upstream (guard proxy), not both\n")
    unknown = run_keel("serve", "--model", str(tiny_reward_model), "--upstream", "http://x",
                       "--moderation-model", "none", "--chat-reward-weights", "harmless=1,nope=2")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "['nope']" in unknown.stderr and "['harmless', 'quality']" in unknown.stderr


@pytest.mark.subprocess
def test_serve_without_a_model_serves_the_default_ones(tiny_reward_model: Path, tiny_moderation_model: Path,
                                                      tmp_path: Path, monkeypatch):
    # The default models already in the cache (copies of the tiny ones), so nothing trains: the README's main
    # command.
    import shutil

    import httpx

    from keel.core.bundled import default_model_dir
    from tests.helpers import free_port

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    default = default_model_dir()
    shutil.copytree(tiny_reward_model, default)
    shutil.copytree(tiny_moderation_model, default_model_dir("moderation"))
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "keel", "serve", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(300):
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        served = [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["data"]]
        assert served == [default.name, default_model_dir("moderation").name]
    finally:
        process.kill()
        process.wait(10)


def test_a_feedback_database_that_cannot_open_is_a_one_line_error(tiny_reward_model: Path, tmp_path: Path):
    missing = tmp_path / "no-such-folder" / "feedback.db"
    run = run_keel("serve", "--model", str(tiny_reward_model), "--moderation-model", "none",
                   "--feedback-db", f"sqlite:///{missing}")
    assert run.returncode == 2 and run.stderr.startswith("keel serve: error: --feedback-db:")
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
