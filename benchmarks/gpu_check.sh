#!/usr/bin/env bash
# GPU check, to run ON A CUDA MACHINE from a copy of the repo (torch with CUDA, numpy,
# safetensors, threadpoolctl and pytest already installed; nothing is installed, no network):
#
#   bash benchmarks/gpu_check.sh
#
# 1. environment report (fails unless torch sees a CUDA GPU);
# 2. generate the full-size SD1.5 pair on local disk (DATA);
# 3. pytest -k cuda;
# 4. CPU vs CUDA bit identity on the full-size pair: cndiff extract --device cpu/cuda, then
#    cndiff apply --device cpu/cuda of that diff (cmp), and cndiff verify of the CUDA diff;
# 5. Control-LoRA decompositions alone on the GPU (benchmarks/lora_bench.py: torch backend on
#    cuda, gram/exact/lowrank, against numpy gram on the CPU workers);
# 6. bench.py: cndiff (cpu), cndiff-cuda, naive, naive-mmap; warm and cold; repeat 2.
# Results (gpu_check.log, bench.json, lora_cuda.txt, summary.txt) go to $OUT when set (the
# device tool returns $OUT), else to $DATA/results. The whole run is bounded by BUDGET_S
# seconds (default 540): every step has a timeout, and bench.py gets what is left.
# Env: PYTHON (default python3/python), DATA (default /tmp/cndiff-gpu), BUDGET_S.
# SMOKE=1 checks this script on a machine without a GPU: a tiny pair, the torch backend on
# the CPU where the real run uses cuda, bench.py --tiny without the cuda row (numbers
# meaningless).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then  # the torch backend on the CPU stands in for CUDA
    DATA=${DATA:-/tmp/cndiff-gpu-smoke}; DEV=cpu; TINY=--tiny; BENCH_RUNNERS=cndiff,naive,naive-mmap
    OTHER=torch-cpu; OTHER_ARGS=(--device cpu --backend torch)
else
    DATA=${DATA:-/tmp/cndiff-gpu}; DEV=cuda; TINY=; BENCH_RUNNERS=cndiff,cndiff-cuda,naive,naive-mmap
    OTHER=cuda; OTHER_ARGS=(--device cuda)
fi
RES=${OUT:-$DATA/results}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$DATA" "$RES"
: > "$RES/summary.txt"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
FAIL=0
step() { echo; echo "== [$(date +%T), ${SECONDS}s] $*"; }
left() { echo $((BUDGET_S - SECONDS)); }
# at most $1 seconds, and never past the budget (keeps 20 s for the summary)
limit() { local l=$(( $(left) - 20 )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
check() { # name rc
    if [ "$2" -eq 0 ]; then echo "-- $1: ok"; else echo "-- $1: FAILED (rc=$2)"; FAIL=1; fi
    echo "$1 rc=$2" >> "$RES/summary.txt"
}

main() {
step "environment${TINY:+ (SMOKE=1: tiny pair, no GPU)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "cpus $(nproc), $(free -g | awk '/Mem:/{print $2}') GiB RAM; $(df -h "$DATA" | tail -1)"
SMOKE=$SMOKE "$PY" -c "import os, sys, torch, numpy, safetensors, threadpoolctl, cndiff
import cndiff.backends.numpy_backend as nb
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'numpy', numpy.__version__, 'cndiff', cndiff.__version__,
      'native kernels', nb.native_kernels is not None)
if os.environ['SMOKE'] != '1':
    assert torch.cuda.is_available(), 'torch sees no CUDA GPU'
    print('gpu', torch.cuda.get_device_name(0))"
rc=$?; check environment $rc
[ $rc -eq 0 ] || return 1

step "generate the ${TINY:+tiny }SD1.5 pair in $DATA"
CONTROL=$DATA/control_sd15_synthetic.pth
BASE=$DATA/sd15_base_synthetic.ckpt
if [ -s "$CONTROL" ] && [ -s "$BASE" ]; then
    echo "reusing $CONTROL, $BASE"; rc=0
else
    rm -rf "$DATA/.gen" "$CONTROL" "$BASE"   # generate aside: a killed run leaves no half file
    timeout "$(limit 300)" "$PY" -c "import sys; from cndiff import synthetic as s
s.make_pair(sys.argv[1], s.tiny(s.SD15) if sys.argv[2] else s.SD15)" "$DATA/.gen" "$TINY" \
        && mv "$DATA"/.gen/* "$DATA"/
    rc=$?
fi
ls -l "$DATA"
check generate $rc
[ $rc -eq 0 ] || return 1

step "pytest -k cuda"
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout "$(limit 180)" "$PY" -m pytest tests -k cuda -q -p no:cacheprovider -rs
    check pytest-cuda $?
else
    echo "pytest is not installed here: skipped (step 4 still checks CUDA bit identity)"
    echo "pytest-cuda skipped" >> "$RES/summary.txt"
fi

step "CPU vs $OTHER bit identity on the pair: extract, apply, verify"
TIMEFORMAT="   %R s wall"
# cndiff SUBCOMMAND ARGS... on the CPU and on $OTHER, to $DATA/id-NAME-<device>.safetensors;
# succeeds when both ran and wrote the same bytes
same_on_both() {
    local name=$1 rc=0 dev args
    shift
    for dev in cpu "$OTHER"; do
        args=(--device cpu); [ "$dev" = cpu ] || args=("${OTHER_ARGS[@]}")
        echo "$1 ${args[*]}:"
        time timeout "$(limit 120)" "$PY" -m cndiff "$@" \
            -o "$DATA/id-$name-$dev.safetensors" --overwrite -q "${args[@]}" || rc=1
    done
    [ $rc -eq 0 ] && cmp "$DATA/id-$name-cpu.safetensors" "$DATA/id-$name-$OTHER.safetensors" \
        && echo "identical: $(stat -c %s "$DATA/id-$name-cpu.safetensors") bytes"
}
same_on_both diff extract "$CONTROL" "$BASE"
check bit-identity-extract $?
same_on_both applied apply "$DATA/id-diff-$OTHER.safetensors" "$BASE"
check bit-identity-apply $?
echo "verify of the $OTHER diff:"
time timeout "$(limit 120)" "$PY" -m cndiff verify "$DATA/id-diff-$OTHER.safetensors" \
    --control "$CONTROL" --base "$BASE"
check verify $?
rm -f "$DATA"/id-*.safetensors

step "Control-LoRA decompositions alone: torch on $DEV vs numpy on the CPU (at most 150 s)"
W=$(( $(nproc) < 4 ? $(nproc) : 4 ))
timeout "$(limit 150)" "$PY" benchmarks/lora_bench.py --control "$CONTROL" --base "$BASE" \
    --rank "$([ "$SMOKE" = 1 ] && echo 2 || echo 128)" --device "$DEV" \
    --combos "numpy:gram:$W,torch:gram:1,torch:lowrank:1,torch:exact:1" \
    --json "$RES/lora_cuda.json" | tee "$RES/lora_cuda.txt"
check lora-decompositions "${PIPESTATUS[0]}"

step "bench.py (budget left: $(left) s)"
T=$(( $(left) - 15 ))
if [ "$T" -lt 120 ]; then
    echo "not enough time left for the benchmark"; check bench 124
else
    # shellcheck disable=SC2086  # $TINY is empty or one word
    timeout "$T" "$PY" benchmarks/bench.py --data "$DATA" $TINY \
        --runners "$BENCH_RUNNERS" --cache warm,cold --repeat 2 --latency-runs 1 \
        --json "$RES/bench.json"
    check bench $?
fi
echo "note: 'CUDA runners without start-up' = cndiff-cuda median wall minus the median time of"
echo "      python -c 'import torch; torch.cuda.init()' (cndiff's CPU path never imports torch)."

step "done in ${SECONDS}s"
cat "$RES/summary.txt"
return $FAIL
}

main 2>&1 | tee "$RES/gpu_check.log"
exit "${PIPESTATUS[0]}"
