"""The embedded end-to-end run on shapes, in one process (one JAX start-up, one compile cache).

VAE -> low-resolution diffusion (32px) -> high-resolution diffusion (64px, initialised from the
low-res run) -> 50-step DDIM samples for the evaluation prompts -> grid PNG and the judge's
scores, printed and written to WORKDIR/quickstart.json. Each stage is a normal workdir
(WORKDIR/vae, WORKDIR/lowres, WORKDIR/highres) that ``python -m md_jax.main`` could run or
resume on its own; rerunning the quickstart resumes whatever is unfinished.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", "workdir/shapes", "Root directory for the three stages.")
_SIZE = flags.DEFINE_enum("size", "full", ["full", "smoke", "tiny"],
                          "full: the quickstart; smoke: same chain, few steps (CI).")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "KEY=VALUE applied to every stage's config, e.g. --override=seed=1.")

STAGES = ("vae", "lowres", "highres")


def _apply_overrides(config, overrides):
  for item in overrides:
    key, _, value = item.partition("=")
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    if parts[-1] not in node:
      raise KeyError(f"--override={item}: config has no key {key!r}")
    old = node[parts[-1]]
    node[parts[-1]] = type(old)(json.loads(value)) if not isinstance(old, str) else value


def run(workdir: str, size: str, overrides=()) -> dict:
  from md_jax import config_loading  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  timings, results = {}, {}
  t_all = time.time()
  for stage in STAGES:
    config = config_loading.load_config(f"configs/shapes.py:{stage},{size}")
    with config.unlocked():
      if stage != "vae":
        config.vae_workdir = os.path.join(workdir, "vae")
      if stage == "highres":
        config.init_from = os.path.join(workdir, "lowres")
      if stage == "lowres":
        config.eval_at_end = False  # judged once, at the final resolution
    _apply_overrides(config, overrides)
    t0 = time.time()
    logging.info("=== stage %s ===", stage)
    print(f"[quickstart] stage {stage}: {config.num_train_steps} steps, "
          f"batch {config.global_batch_size}, {config.data.image_size}px", flush=True)
    result = loop.train_and_evaluate(config, os.path.join(workdir, stage))
    timings[stage] = round(time.time() - t0, 1)
    results[stage] = result
    if result["preempted"]:
      print("[quickstart] preempted; rerun the same command to resume", flush=True)
      sys.exit(0)
  summary = dict(size=size, seconds=timings, total_seconds=round(time.time() - t_all, 1))
  eval_path = os.path.join(workdir, "highres", "eval.json")
  if os.path.exists(eval_path):
    with open(eval_path) as f:
      summary["eval"] = json.load(f)
  summary["vae"] = results["vae"]["eval"]
  with open(os.path.join(workdir, "quickstart.json"), "w") as f:
    json.dump(summary, f, indent=1)
  _print_summary(summary, workdir)
  return summary


def _print_summary(summary, workdir):
  print("\n[quickstart] stage seconds:", summary["seconds"], "total", summary["total_seconds"])
  ev = summary.get("eval")
  if ev:
    print(f"[quickstart] {ev['num_samples']} samples, {ev['sampler']} {ev['num_steps']} steps, "
          f"cfg {ev['guidance_scale']}; grid: {ev['grid']}")
    scores = ev["scores"]
    print(json.dumps(scores, indent=1, default=str))
  print(f"[quickstart] written: {os.path.join(workdir, 'quickstart.json')}")


def main(argv):
  del argv
  run(_WORKDIR.value, _SIZE.value, _OVERRIDES.value)


if __name__ == "__main__":
  app.run(main)
