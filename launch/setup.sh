#!/usr/bin/env bash
# Creates .venv in the repository (once) and installs md_jax with the given extras.
# Usage: bash launch/setup.sh [extras]   (default extras: test)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-test}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=".venv/.md_jax_installed_${EXTRAS//,/_}"
HASH="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  echo "[setup] installing md_jax[$EXTRAS] into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import md_jax, jax, flax, orbax.checkpoint, grain, clu, transformers" \
    || { echo "[setup] install failed" >&2; exit 1; }
  echo "$HASH" > "$STAMP"
fi
