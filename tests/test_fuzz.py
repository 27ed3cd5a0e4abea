"""Fuzz every endpoint of the OpenAPI document with schemathesis (its CLI, deterministic generation), against a
real server on loopback with the tiny reward model and tiny policy: no server errors, every response status,
content type and body as documented. Run once with the API key and once without (401 must be documented)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import keel_server

pytestmark = pytest.mark.fuzz


@pytest.mark.parametrize("with_key", [True, False])
def test_every_endpoint_survives_fuzzing(tiny_reward_model: Path, tiny_moderation_model: Path, tiny_policy: str,
                                        with_key: bool, tmp_path: Path):
    schemathesis = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    assert schemathesis, "install the dev extra: pip install -e '.[dev]'"
    with keel_server(tiny_reward_model, "--policy", tiny_policy, "--max-tokens-limit", "8",
                     "--max-generation-rows", "16", "--max-queue-rows", "32", moderation=tiny_moderation_model,
                     KEEL_API_KEYS="fuzz-key") as (url, _):
        headers = ["-H", "Authorization: Bearer fuzz-key"] if with_key else []
        result = subprocess.run(
            # Every check but positive-data acceptance: the schema cannot say which categories a model has, nor
            # that a score item is exactly one of {prompt, response}, {messages} or {text}; those are 400s.
            [schemathesis, "run", f"{url}/openapi.json", "--checks", "all", "--exclude-checks",
             "positive_data_acceptance", "--max-examples", "30",
             "--generation-deterministic", "--request-timeout", "120", "--no-color", *headers],
            capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its cache stays out of the repo
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
