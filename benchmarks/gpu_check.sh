#!/usr/bin/env bash
# GPU check, to run ON A CUDA MACHINE from a copy of the repo (torch with CUDA, numpy,
# safetensors and pytest already installed; nothing is installed, no network used):
#
#   bash benchmarks/gpu_check.sh
#
# 1. environment report; 2. generate the full-size SD1.5 pair on local disk (DATA);
# 3. pytest -k cuda; 4. CPU vs CUDA bit identity on the full-size pair (cmp);
# 5. Control-LoRA SVD timings on the GPU (benchmarks/lora_bench.py --device cuda);
# 6. bench.py: cndiff (cpu), cndiff-cuda, naive, naive-mmap; warm and cold; repeat 2.
# Results (log, bench.json, summary) go to $OUT when set (the device tool returns $OUT),
# else to $DATA/results. Whole run bounded by BUDGET_S seconds (default 540).
# Env: PYTHON (default python3/python), DATA (default /tmp/cndiff-gpu), BUDGET_S.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
DATA=${DATA:-/tmp/cndiff-gpu}
RES=${OUT:-$DATA/results}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$DATA" "$RES"
: > "$RES/summary.txt"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
FAIL=0
step() { echo; echo "== [$(date +%T), ${SECONDS}s] $*"; }
left() { echo $((BUDGET_S - SECONDS)); }
check() { # name rc
    if [ "$2" -eq 0 ]; then echo "-- $1: ok"; else echo "-- $1: FAILED (rc=$2)"; FAIL=1; fi
    echo "$1 rc=$2" >> "$RES/summary.txt"
}

main() {
step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "cpus $(nproc), $(free -g | awk '/Mem:/{print $2}') GiB RAM; $(df -h "$DATA" | tail -1)"
"$PY" -c "import torch, numpy, safetensors, cndiff
print('python', __import__('sys').version.split()[0], 'torch', torch.__version__,
      'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'cndiff', cndiff.__version__)
assert torch.cuda.is_available(), 'torch sees no CUDA GPU'
print('gpu', torch.cuda.get_device_name(0))"
rc=$?; check environment $rc
[ $rc -eq 0 ] || return 1

step "generate the full-size pair in $DATA"
CONTROL=$DATA/control_sd15_synthetic.pth
BASE=$DATA/sd15_base_synthetic.ckpt
if [ -s "$CONTROL" ] && [ -s "$BASE" ]; then
    echo "reusing $CONTROL, $BASE"; rc=0
else
    rm -rf "$DATA/.gen" "$CONTROL" "$BASE"   # generate aside: a killed run leaves no half file
    timeout 300 "$PY" -c "import sys; from cndiff.synthetic import make_pair, SD15
make_pair(sys.argv[1], SD15)" "$DATA/.gen" && mv "$DATA"/.gen/* "$DATA"/
    rc=$?
fi
ls -l "$DATA"
check generate $rc
[ $rc -eq 0 ] || return 1

step "pytest -k cuda"
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout 180 "$PY" -m pytest tests -k cuda -q -p no:cacheprovider -rs
    check pytest-cuda $?
else
    echo "pytest is not installed here: skipped (step 4 still checks CUDA bit identity)"
    echo "pytest-cuda skipped" >> "$RES/summary.txt"
fi

step "CPU vs CUDA bit identity on the full-size pair"
TIMEFORMAT="   %R s wall"
rc=0
for dev in cpu cuda; do
    echo "--device $dev:"
    time timeout 120 "$PY" -m cndiff extract "$CONTROL" "$BASE" -o "$DATA/id-$dev.safetensors" \
        --overwrite -q --device "$dev" || rc=1
done
[ $rc -eq 0 ] && cmp "$DATA/id-cpu.safetensors" "$DATA/id-cuda.safetensors" \
    && echo "identical: $(stat -c %s "$DATA/id-cpu.safetensors") bytes"
check bit-identity $?
rm -f "$DATA"/id-*.safetensors

step "Control-LoRA: exact (gram) vs svd_lowrank SVDs on the GPU (at most 150 s)"
timeout 150 "$PY" benchmarks/lora_bench.py --control "$CONTROL" --base "$BASE" \
    --device cuda --methods gram,lowrank --threads "$(nproc)" | tee "$RES/lora_cuda.txt"
check lora-cuda "${PIPESTATUS[0]}"

step "bench.py (budget left: $(left) s)"
T=$(( $(left) - 15 ))
if [ "$T" -lt 120 ]; then
    echo "not enough time left for the benchmark"; check bench 124
else
    timeout "$T" "$PY" benchmarks/bench.py --data "$DATA" \
        --runners cndiff,cndiff-cuda,naive,naive-mmap --cache warm,cold --repeat 2 \
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
