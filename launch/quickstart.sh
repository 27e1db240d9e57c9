#!/usr/bin/env bash
# The embedded end-to-end run on shapes: VAE -> light decoder -> 64px diffusion -> 128px diffusion
# -> 50-step DDIM samples judged for colour, shape and position -> UFOGen one-step finetune,
# judged -> TFLite bundle of the one-step generator. 20-30 min on a 2-core CPU after install.
# Usage: bash launch/quickstart.sh [WORKDIR] [extra md_jax.quickstart flags, e.g. --size=smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
WORKDIR="${1:-workdir/shapes}"
shift || true
export JAX_PLATFORMS="${JAX_PLATFORMS:-}"
exec .venv/bin/python -m md_jax.quickstart --workdir="$WORKDIR" "$@"
