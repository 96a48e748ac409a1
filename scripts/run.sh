#!/usr/bin/env bash
# Set up .venv if needed, then run cndiff. With no arguments: the built-in demo
# (a synthetic ControlNet/SD1.5 pair written to ./cndiff-demo, then extracted).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then
    set -- demo
fi
exec .venv/bin/python -m cndiff "$@"
