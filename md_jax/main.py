"""Entry point: ``python -m md_jax.main --config=configs/X.py[:arg] --workdir=DIR [--config.k=v]``.

``config.trainer`` picks the objective; the run resumes from the newest checkpoint in DIR.
An unknown or mistyped ``--config.`` key fails at flag parsing, naming the key.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize(): 'auto' calls it when a cluster is detected (a TPU VM, "
    "SLURM, or JAX_COORDINATOR_ADDRESS set); 'on' always (what launch/tpu.py runs).")
flags.mark_flags_as_required(["config", "workdir"])


def maybe_initialize_distributed(mode: str) -> None:
  from md_jax.train import sharding as shd  # pylint: disable=g-import-not-at-top
  shd.maybe_initialize_distributed(mode)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  maybe_initialize_distributed(_DISTRIBUTED.value)
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  try:
    result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (loop.WorkdirError, loop.NonFiniteLossError, ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  summary = {k: result[k] for k in ("step", "preempted", "workdir")}
  summary["eval"] = {k: v for k, v in result.get("eval", {}).items() if isinstance(v, (int, float))}
  # One write of the whole line: the processes of a multi-process run share one stdout (a pipe
  # under launch/tpu.py local), and a line written in pieces can interleave with another's.
  line = json.dumps(summary) + "\n"
  sys.stdout.flush()
  try:
    os.write(sys.stdout.fileno(), line.encode())
  except (AttributeError, OSError, ValueError):  # stdout replaced by an object with no fd
    sys.stdout.write(line)


if __name__ == "__main__":
  app.run(main)
