#!/usr/bin/env bash
# Create .venv (idempotent) and install neuralpath with torch pinned to 2.13.0 (a CPU build on these machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || { echo "setup: creating .venv" >&2; "$PY" -m venv .venv; }
echo "setup: torch 2.13.0 (pinned; ~40 s on a fresh venv)" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
echo "setup: neuralpath with its test, kernels and plots extras (~1 min on a fresh venv)" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,kernels,plots]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, neuralpath; assert torch.__version__.startswith('2.13.0'), torch.__version__"
