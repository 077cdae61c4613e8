#!/usr/bin/env bash
# Set up (or refresh) the development environment in .venv: pinned torch stack, build tools, and an
# editable install of latentflow_fast with its native extension. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchaudio, sys; sys.exit(0 if (torch.__version__.startswith('2.11.0') and torchaudio.__version__.startswith('2.11.0')) else 1)" 2>/dev/null; then
  echo "[setup] installing torch==2.11.0 torchaudio==2.11.0 and dependencies (a few minutes on a fresh machine)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.11.0 torchaudio==2.11.0
fi
# build tools, then the [all] and [test] extras of pyproject.toml (listed here because the package itself
# is installed with --no-deps below, to keep the pinned torch untouched; tests/test_packaging.py keeps
# this list and pyproject.toml in step)
.venv/bin/pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja \
  numpy scipy pandas pyarrow matplotlib tqdm safetensors soundfile pytest hypothesis
echo "[setup] building latentflow_fast (native extension; CUDA kernels too when nvcc is found)"
flock /tmp/latentflow_build.lock .venv/bin/pip install -q -e . --no-build-isolation --no-deps
.venv/bin/python -c "import latentflow_fast as lf, latentflow_fast._C as C; print('[setup] ok: backends', lf.available_backends(), '| CUDA kernels compiled:', C.has_cuda)"
