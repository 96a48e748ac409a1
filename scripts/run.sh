#!/usr/bin/env bash
# Run cndiff from this checkout, in the folder you call it from: ./scripts/run.sh ARGS is
# `cndiff ARGS`. The first call sets up .venv (cndiff, numpy, safetensors, tqdm; no torch).
# With no arguments: the built-in demo (a synthetic ControlNet/SD1.5 pair written to
# ./cndiff-demo, then extracted).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/setup.sh" run
if [ $# -eq 0 ]; then
    set -- demo
fi
exec "$repo/.venv/bin/python" -m cndiff "$@"
