#!/usr/bin/env bash
# Install (idempotent) and run the unit suite (slow checks excluded; run them with: .venv/bin/pytest -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -x -p no:cacheprovider "$@"
