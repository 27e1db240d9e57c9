#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (slow and multiprocess tests included).
# Usage: bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
# Two workers: most of the suite's time is XLA compilation, which runs on one core per process,
# so a 2-core machine compiles two test files at once. loadfile keeps each file (and its module
# fixtures) on one worker. MD_JAX_TEST_WORKERS=0 runs everything in this process.
WORKERS="${MD_JAX_TEST_WORKERS:-2}"
exec .venv/bin/python -m pytest -q -ra --durations=30 -n "$WORKERS" --dist loadfile "$@" tests
