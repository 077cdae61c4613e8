#!/usr/bin/env bash
# One validation run that fits 10 minutes of GPU time (H100/H200 with 16 cores: under 9 minutes).
#
#   OUT=/path/for/logs tests/gpu/quick_validate.sh            (PYTHON=... picks the interpreter)
#   OUT=/tmp/qv tests/gpu/quick_validate.sh --dry-run          (CPU: Triton interpreter, tiny shapes; CI)
#
# Stages, each with its own time limit and log file under $OUT (default: a new temporary folder):
#   1 build       the CUDA extension for this GPU's architecture only, in parallel          (limit 120 s)
#   2 correctness cuda and triton against the float64 reference, norm and per-row max-abs checks:
#                 N=8192 at D=64/128 with every capture and intervention, ragged 1000x3001 with GQA,
#                 one segment per key (G=N), bitwise determinism, batch invariance, CUDA-graph replay
#                 (tests/gpu/quick_validate.py)                           (limits 75 s cuda, 90 s triton)
#   3 benchmark   benchmarks/attention_gpu.py at N=8192, D=64/128, B=4, H=16, bf16       (limit 110 s)
#   4 sanitize    compute-sanitizer memcheck and racecheck on small cases of each kernel  (limit 35 s each)
# The limits add up to 535 s, so even a run where every stage hits its limit ends inside 9 minutes.
# A summary table is printed last. Exit status 0 only when every stage passed.
# --dry-run runs the same stages on the CPU (no build: the installed extension is imported; Triton
# under its interpreter; the benchmark's --smoke mode; the sanitizer cases without compute-sanitizer,
# where they print SKIP), so that CI can check that this script is not broken.
set -u
cd "$(dirname "$0")/../.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -gt 0 ]; then echo "usage: [OUT=dir] $0 [--dry-run]"; exit 2; fi
PY="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d -t quick_validate.XXXXXX)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SUMMARY=()
STATUS=0
T0=$(date +%s)

# stage NAME LIMIT_S CMD...: runs CMD with its own time limit, output to $OUT/NAME.log.
stage() {
  local name=$1 limit=$2
  shift 2
  local start rc verdict
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then verdict=PASS; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict=TIMEOUT; else verdict=FAIL; fi
  [ $rc -eq 0 ] || STATUS=1
  tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
  SUMMARY+=("$(printf '%-22s %-8s %4ss  %s' "$name" "$verdict" "$(( $(date +%s) - start ))" "$OUT/$name.log")")
}

if [ $DRY -eq 1 ]; then
  echo "== quick_validate --dry-run: CPU only, nothing about a GPU is verified"
  stage build 60 "$PY" -c "import latentflow_fast._C as C, latentflow_fast.kernels; print('extension imported; has_cuda =', C.has_cuda)"
  stage correctness 60 "$PY" tests/gpu/quick_validate.py --backend cuda triton --dry-run
  stage benchmark 90 env OMP_NUM_THREADS=1 "$PY" benchmarks/attention_gpu.py --smoke --n 32 --d 16 --backends triton
  stage sanitize-cases 60 sh -c "'$PY' tests/gpu/sanitize_case.py triton && '$PY' tests/gpu/sanitize_cuda_case.py --head-dims 64"
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: use --dry-run on a machine without a GPU"; exit 3
  fi
  CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
  CC=${CC:-$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")}
  "$PY" -c "import torch, triton; print('== device:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| triton', triton.__version__)"
  # 1. Build for this architecture only (machine code, no PTX), all cores.
  stage build 120 env CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${CC}-real" \
    "$PY" -m pip install --no-build-isolation --no-deps -q -e .
  # 2. Correctness (each backend in its own process and time limit).
  stage correctness-cuda 75 "$PY" tests/gpu/quick_validate.py --backend cuda
  stage correctness-triton 90 "$PY" tests/gpu/quick_validate.py --backend triton
  # 3. Benchmark: B*H*N = 4*16*8192 gives B=4 at H=16.
  stage benchmark 110 "$PY" benchmarks/attention_gpu.py --n 8192 --d 64 128 --heads 16 --tokens $((4 * 16 * 8192)) --rounds 5
  # 4. compute-sanitizer on small cases of each kernel (only our kernels, no caching allocator).
  if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck; do
      stage "$tool-triton" 35 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 99 \
        --kernel-name kns=latentflow_probed_attn "$PY" tests/gpu/sanitize_case.py triton
      stage "$tool-cuda" 35 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 99 \
        --kernel-name kns=latentflow_probed_attn "$PY" tests/gpu/sanitize_cuda_case.py --head-dims 64 128 --dtypes bfloat16
    done
  else
    echo "== compute-sanitizer not on PATH: sanitizer stage NOT run"
    SUMMARY+=("$(printf '%-22s %-8s' sanitize MISSING)")
    STATUS=1
  fi
fi

echo
echo "== quick_validate summary ($(( $(date +%s) - T0 )) s in all; logs in $OUT)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "== quick_validate: $([ $STATUS -eq 0 ] && echo PASSED || echo FAILED)$([ $DRY -eq 1 ] && echo ' (dry run: CPU only)')"
exit $STATUS
