#!/usr/bin/env bash
# Rebuild the native extension into the dev venv (editable install). Serialised with a lock so that
# several builds started at once do not race on the same build directory.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/latentflow_build.lock .venv/bin/pip install -e . --no-build-isolation --no-deps -q "$@"
