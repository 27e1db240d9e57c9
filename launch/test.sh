#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (slow and multiprocess tests included).
# Usage: bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@" tests
