#!/usr/bin/env bash
# One-shot GPU check for a machine with an NVIDIA GPU: the op tests run natively (bf16 included, no
# TRITON_INTERPRET), then the whole benchmark on cuda. Needs no internet; finishes in under 5 minutes on
# an H100/H200 (each step is time-boxed; the benchmark stops starting new cases after its budget).
#
#   bench/gpu.sh OUT_DIR
#
# OUT_DIR receives: env.txt (GPU, driver, versions), tests.log, bench.log, results.json, results.md,
# speedup.png, and RESULTS.md = bench/RESULTS.md with its cuda section replaced (copy it back to commit).
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bench/gpu.sh OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET          # the interpreter is for CPU-only machines; here Triton compiles for the GPU
export TQDM_MININTERVAL=10      # progress lines every 10 s, not a log full of carriage returns

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    python -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# fastllm.kernels is kernels/ mapped into the package by setup.py, so an uninstalled checkout cannot import
# it; install it in place from local files only.
if ! python -c "import fastllm.kernels" 2>/dev/null; then
    echo "== installing fastllm in place (offline)"
    python -m pip install --no-index --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
        || { echo "pip install -e . failed, see $OUT/install.log" >&2; exit 1; }
fi

echo "== op tests (native GPU)"
timeout 110 python -m pytest tests/ops -x -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
tests_status=${PIPESTATUS[0]}

echo "== benchmark on cuda"
[ -f bench/RESULTS.md ] && cp bench/RESULTS.md "$OUT/RESULTS.md"
timeout 170 python -m bench.run --device cuda --budget 120 --out "$OUT" --results-md "$OUT/RESULTS.md" \
    2>&1 | tee "$OUT/bench.log"
bench_status=${PIPESTATUS[0]}

echo "== tests exit status $tests_status (124 = timed out), benchmark exit status $bench_status; files in $OUT"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
