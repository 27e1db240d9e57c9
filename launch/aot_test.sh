#!/usr/bin/env bash
# The TPU ahead-of-time compile test, with libtpu, in a second virtualenv (.venv-tpu-aot) layered
# on .venv: libtpu must not be importable by the rest of the suite. MD_JAX_REQUIRE_LIBTPU=1 makes
# a missing libtpu fail the test instead of skipping it. CI runs this after launch/test.sh.
# Usage: bash launch/aot_test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
PY="${PYTHON:-python3}"
# The libtpu pin of the `tpu-aot` extra in pyproject.toml.
PIN="$(sed -n 's/^tpu-aot = \["\(libtpu==[^"]*\)"\]/\1/p' pyproject.toml)"
[ -n "$PIN" ] || { echo "[aot_test] no tpu-aot = [\"libtpu==...\"] line in pyproject.toml" >&2; exit 1; }
if [ ! -x .venv-tpu-aot/bin/python ]; then
  "$PY" -m venv .venv-tpu-aot
fi
SITE="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
AOT_SITE="$(.venv-tpu-aot/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# addsitedir (not a bare path line) so .venv's own .pth files, md_jax's editable install among
# them, are processed too.
echo "import site; site.addsitedir('$SITE')" > "$AOT_SITE/md_jax_base_venv.pth"
HAVE="$(.venv-tpu-aot/bin/python -m pip show libtpu 2>/dev/null | sed -n 's/^Version: //p' || true)"
if [ "$HAVE" != "${PIN#libtpu==}" ]; then
  echo "[aot_test] installing $PIN into .venv-tpu-aot"
  .venv-tpu-aot/bin/python -m pip install --quiet "$PIN"
fi
export JAX_PLATFORMS=cpu MD_JAX_REQUIRE_LIBTPU=1
exec .venv-tpu-aot/bin/python -m pytest -q -ra -p no:cacheprovider "$@" tests/test_aot_compile.py
