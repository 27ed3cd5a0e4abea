"""The benchmark scripts keep running on today's artifacts: each answers --help (so it imports), and the serving
bench runs end to end, pipeline peer included, on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if "ArgumentParser(" in p.read_text())


@pytest.mark.subprocess
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_every_bench_script_answers_help(script: Path):
    run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout


@pytest.mark.subprocess
def test_serve_bench_runs_with_its_pipeline_peer(tiny_reward_model: Path, tmp_path: Path):
    out = tmp_path / "serve.json"
    run = subprocess.run([sys.executable, "bench/serve_bench.py", "--model", str(tiny_reward_model), "--seconds", "1",
                          "--repeats", "1", "--concurrency", "2", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["keel"]["texts_per_s"] > 0 and report["peer_pipeline"]["texts_per_s"] > 0
    assert report["keel_vs_peer"] > 0


@pytest.mark.subprocess
def test_feedback_capture_bench_serves_through_a_stuck_store(tiny_reward_model: Path, tiny_moderation_model: Path,
                                                            tmp_path: Path):
    out = tmp_path / "capture.json"
    run = subprocess.run([sys.executable, "bench/feedback_capture_bench.py", "--model", str(tiny_reward_model),
                          "--moderation-model", str(tiny_moderation_model), "--stores", "sqlite", "--seconds", "2",
                          "--repeats", "1", "--concurrency", "4", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    [sqlite] = json.loads(out.read_text())["stores"]
    assert sqlite["on_over_off"] > 0
    failing = sqlite["store_failing"]
    assert failing["requests"] > 0 and failing["failed_requests"] == 0
    assert failing["write_failures_counted"] > 0  # the store really failed under the load
