#!/usr/bin/env bash
# One command for a GPU machine: every test in tests/gpu, then compute-sanitizer memcheck and racecheck
# over a small case of each GPU kernel (Triton and CUDA; a backend that is not built prints SKIP).
#   tests/gpu/run_all.sh [extra pytest args]      (PYTHON=... to pick the interpreter)
# Exit status: 0 only if the tests and every sanitizer run passed.
set -u
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python}"
status=0

echo "== pytest tests/gpu"
"$PY" -m pytest tests/gpu -v -rs "$@" || status=1

if command -v compute-sanitizer >/dev/null 2>&1; then
  for backend in triton cuda; do
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer --tool $tool: $backend"
      # No caching allocator: out-of-bounds accesses land outside any allocation and are reported.
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 99 \
        "$PY" tests/gpu/sanitize_case.py "$backend" || status=1
    done
  done
else
  echo "== compute-sanitizer not found on PATH: sanitizer runs NOT done"
  status=1
fi

echo "== run_all: $([ $status -eq 0 ] && echo PASSED || echo FAILED)"
exit $status
