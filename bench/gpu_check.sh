#!/usr/bin/env bash
# `make gpu-check`: everything a lent GPU machine must check, in one command that stops by itself.
#
# On the GPU machine (bare: its python3 already has torch+CUDA, triton, pytest, hypothesis,
# pytest-benchmark, scipy, ninja; no network) it installs fastmask without touching torch, then,
# each phase under its own time limit and all of them inside BUDGET_S (default 450 s, well
# inside the 10-minute command limit):
#   1. builds the cuda extension and says which backends run on the GPU (a missing triton or
#      cuda backend is a failure: the tests would otherwise skip it silently);
#   2. the kernel tests compiled on the GPU: every backend against the reference bit for bit
#      (bf16/fp16 included), the >2^31-element tests, torch.compile of the ops;
#   3. `fastmask bench --device cuda` on large (2^26, 2^28), av-resnet18 and small, one JSON per
#      set (each with its own copy bandwidth and fused AdamW measured in the same run);
#   3b. the traffic model (`fastmask bench --traffic`: bytes and launches counted in Triton's
#      interpreter, and the GPU time they model), to set beside the measured step;
#   4. the report of the targets (bench/gpu_report.py), with the model beside the measurements;
#   5. the rest of the test suite, with what time is left.
# Results land in $OUT (default ./gpu_out): gpu-check.log, bench-<set>.json, traffic.json, targets.md.
# Without a GPU it is a dry run (GPU_CHECK_DRY_RUN=1 is implied): the same phases on the CPU,
# small and quick, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_out}
BUDGET_S=${BUDGET_S:-450}
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
: >"$LOG"
START=$SECONDS
FAILED=()

say() { echo "[gpu-check +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# run NAME LIMIT_S CMD...: CMD under `timeout`, never past the overall budget; records failures.
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  if ((left < 15)); then
    say "SKIP $name: ${left}s of the ${BUDGET_S}s budget left"
    FAILED+=("$name (skipped: out of time)")
    return 1
  fi
  ((limit > left)) && limit=$left
  say "START $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$LOG.phase" 2>&1
  local rc=$?
  cat "$LOG.phase" >>"$LOG" && rm -f "$LOG.phase"
  if ((rc == 0)); then
    say "OK    $name ($((SECONDS - t0))s)"
  else
    ((rc == 124 || rc == 137)) && say "TIMEOUT $name after $((SECONDS - t0))s" || say "FAIL  $name (exit $rc, $((SECONDS - t0))s)"
    FAILED+=("$name (exit $rc)")
  fi
  return $rc
}

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  DEVICE=cuda
  DRY=${GPU_CHECK_DRY_RUN:-0}
else
  DEVICE=cpu
  DRY=1
fi
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
say "device $DEVICE, dry run $DRY, python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'), budget ${BUDGET_S}s"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1

# 0. Install fastmask into this python without touching torch: no dependencies, no index, no
#    build isolation (which would fetch another torch), editable so the JIT builds find csrc/.
run install 120 "$PYTHON" -m pip install -q --no-deps --no-index --no-build-isolation -e . || {
  say "fastmask could not be installed; nothing else can run"
  exit 1
}
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >>"$LOG" 2>&1

# 1. Backends: build the extensions now (with the compiler output in the log) and require the
#    fast GPU backends to be available.
run backends 240 env FASTMASK_VERBOSE_BUILD=1 "$PYTHON" - "$DEVICE" <<'EOF'
import sys
import torch
from fastmask.ops import backend_report
device = torch.device(sys.argv[1])
report = backend_report(device)
for name, reason in report.items():
    print(f"  {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
required = ("triton", "cuda") if device.type == "cuda" else ()
missing = [b for b in required if report[b] is not None]
sys.exit(f"required backends unavailable on {device}: {missing}" if missing else 0)
EOF

# 2. Kernel tests, compiled on the GPU (the interpreter is not the hardware). Several workers
#    when pytest-xdist is there: Triton compiles each kernel specialisation on the CPU.
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -rfEs)
if [ "$DRY" = 1 ]; then
  run kernel-tests 240 "${PYTEST[@]}" tests/kernels tests/ops/test_units_backends.py -k "philox or 4097"
else
  "$PYTHON" -c "import xdist" 2>/dev/null && PYTEST+=(-n 4)
  run kernel-tests 170 "${PYTEST[@]}" tests/ops tests/optim/test_backends.py tests/kernels tests/csrc
fi

# 3. Benchmarks: one run per shape set, each measuring its own copy bandwidth and fused AdamW.
if [ "$DRY" = 1 ]; then
  run bench-av-resnet18 240 "$PYTHON" -m fastmask bench --device "$DEVICE" --sets av-resnet18 --quick \
    --variants amss+-adamw-grad2 --backends cpp --no-baselines --json "$OUT/bench-av-resnet18.json"
else
  # torch.compile of the reference is left out: compiling it per shape set costs minutes of the budget.
  for set in large av-resnet18 small; do
    run "bench-$set" 80 "$PYTHON" -m fastmask bench --device cuda --sets "$set" --no-compile \
      --json "$OUT/bench-$set.json"
  done
fi

# 3b. The traffic model (counted in Triton's interpreter, on the CPU), to set beside the measurements.
run traffic 120 env TRITON_INTERPRET=1 "$PYTHON" -m fastmask bench --traffic --variants dense grad2 ema row sgd \
  --json "$OUT/traffic.json"

# 4. The targets, from whatever the benchmarks wrote, and the model beside them.
run report 30 "$PYTHON" bench/gpu_report.py "$OUT"/bench-*.json --traffic "$OUT/traffic.json" \
  --out "$OUT/targets.md"

# 5. The rest of the suite with the time left (CPU-side tests CI already runs, now beside a GPU).
if [ "$DRY" = 0 ]; then
  run other-tests 600 "${PYTEST[@]}" tests --ignore=tests/ops --ignore=tests/optim/test_backends.py \
    --ignore=tests/kernels --ignore=tests/csrc
fi

say "done in $((SECONDS - START))s; ${#FAILED[@]} phase(s) failed${FAILED:+: ${FAILED[*]}}"
((${#FAILED[@]} == 0))
