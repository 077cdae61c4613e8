#!/usr/bin/env bash
# Set up the environment if needed, then run the main job: the causal probing protocol (v2) on the
# shipped `small` SAM-Audio-architecture model and a fixed balanced set of 24 synthetic scenes. Extra
# arguments go to `latentflow probe` (see `latentflow probe --help`; `--quick` is a smoke run). The report
# lands in ./latentflow-report/ (report.html, summary.json; `latentflow report latentflow-report --markdown
# REPORT.md` regenerates the Markdown scorecard). Resumable: rerun after an interruption to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/latentflow probe "$@"
