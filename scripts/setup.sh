#!/usr/bin/env bash
# Create .venv (once) and install cndiff into it, editable.
#   setup.sh run   cndiff and what it needs (numpy, safetensors, tqdm): no torch
#   setup.sh test  also torch (pinned to 2.13.0 unless TORCH_SPEC says otherwise, e.g.
#                  TORCH_SPEC=torch for the newest release) and the test tools
# A stamp file per kind makes a second call cost nothing unless pyproject.toml or setup.py
# (the native modules) changed.
set -euo pipefail
kind=${1:-run}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
stamp="$venv/.cndiff-$kind"
if [ -f "$stamp" ] && [ "$stamp" -nt "$repo/pyproject.toml" ] && [ "$stamp" -nt "$repo/setup.py" ] \
    && [ -x "$venv/bin/python" ]; then
    exit 0
fi
PY=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
case "$kind" in
    run)
        "${pip[@]}" -e "$repo" ;;
    test)
        if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
            "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
        fi
        "${pip[@]}" -e "$repo[test]" ;;
    *)
        echo "usage: setup.sh [run|test]" >&2; exit 2 ;;
esac
touch "$stamp"
if [ "$kind" = test ]; then touch "$venv/.cndiff-run"; fi  # (a test set-up has all run needs)
