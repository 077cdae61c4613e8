#!/usr/bin/env bash
# One command for a GPU machine: every test in tests/gpu, then compute-sanitizer memcheck and racecheck
# over a small case of each GPU kernel (Triton and CUDA; a backend that is not built prints SKIP).
#   tests/gpu/run_all.sh [extra pytest args]      (PYTHON=... to pick the interpreter)
# Exit status: 0 only if the tests and every sanitizer run passed.
set -u
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python}"
status=0

# The kernels live in kernels/ and are installed as latentflow_fast.kernels: the package must be installed.
if ! "$PY" -c "import latentflow_fast.kernels" >/dev/null 2>&1; then
  echo "latentflow_fast is not installed for $PY: run 'pip install -e .' (builds the CUDA extension) first"
  exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: the GPU tests and sanitizers cannot run here (nothing verified)"
  exit 3
fi
"$PY" -c "import torch; print('== device:', torch.cuda.get_device_name(0))"

echo "== pytest tests/gpu"
"$PY" -m pytest tests/gpu -v -rs "$@" || status=1

if command -v compute-sanitizer >/dev/null 2>&1; then
  # Triton: tests/gpu/sanitize_case.py; CUDA: its own, more thorough tests/gpu/sanitize_cuda_case.py when present.
  cases=("triton:tests/gpu/sanitize_case.py triton")
  if [ -f tests/gpu/sanitize_cuda_case.py ]; then
    cases+=("cuda:tests/gpu/sanitize_cuda_case.py")
  else
    cases+=("cuda:tests/gpu/sanitize_case.py cuda")
  fi
  for entry in "${cases[@]}"; do
    backend="${entry%%:*}"
    script="${entry#*:}"
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer --tool $tool: $backend ($script)"
      # Only our kernels (stable names); no caching allocator, so out-of-bounds accesses are reported.
      # shellcheck disable=SC2086
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 99 \
        --kernel-name kns=latentflow_probed_attn "$PY" $script || status=1
    done
  done
else
  echo "== compute-sanitizer not found on PATH: sanitizer runs NOT done"
  status=1
fi

echo "== run_all: $([ $status -eq 0 ] && echo PASSED || echo FAILED)"
exit $status
