#!/usr/bin/env bash
# Set up the environment if needed, then run the whole CPU test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a broken test suite, not a pass" >&2
  exit 1
fi
exit "$status"
