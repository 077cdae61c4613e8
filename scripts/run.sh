#!/usr/bin/env bash
# Set up the environment if needed, then run the main job: the causal probing protocol on the embedded
# tiny SAM-Audio-architecture model and a fixed set of synthetic clips. Extra arguments go to
# `latentflow probe` (see `latentflow probe --help`). The report lands in ./latentflow-report/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/latentflow probe "$@"
