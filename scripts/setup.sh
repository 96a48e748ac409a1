#!/usr/bin/env bash
# Create .venv (once) and install cndiff into it, editable, with the test tools.
# Torch is pinned to 2.13.0 unless TORCH_SPEC says otherwise (e.g. TORCH_SPEC=torch for
# the newest release, or a CUDA build you already use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
if ! .venv/bin/python -c "import cndiff, pytest, hypothesis" 2>/dev/null \
    || [ pyproject.toml -nt .venv/.cndiff-installed ]; then
    .venv/bin/python -m pip install -q -e ".[test]"
    touch .venv/.cndiff-installed
fi
