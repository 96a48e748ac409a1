#!/usr/bin/env bash
# Set up .venv with the test tools (torch included), lint, and run the test suite
# (CUDA tests skip without a GPU). Extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/setup.sh" test
cd "$repo"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
