"""Sampling CLI: ``python -m md_jax.sample --workdir=DIR [--step=N] "prompt" ...``.

Restores the diffusion run's checkpoint (EMA params when present; only the parts sampling needs,
onto whatever devices this machine has) and writes one PNG per prompt plus a grid.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a diffusion or UFOGen run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_STEPS = flags.DEFINE_integer("steps", None,
                              "DDIM steps (default: 50; 1 for a UFOGen run, its one-step sampler).")
_CFG = flags.DEFINE_float("cfg", None, "Classifier-free guidance scale (default: config's).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed; sample i uses fold_in(seed, i).")
_NUM = flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/samples/cli).")
_EMA = flags.DEFINE_bool("ema", True, "Use EMA params when the checkpoint has them.")
flags.mark_flags_as_required(["workdir"])


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "empty"


def main(argv):
  prompts = argv[1:]
  if not prompts:
    raise app.UsageError("give at least one prompt")
  for flag, value in (("--steps", _STEPS.value), ("--num_per_prompt", _NUM.value)):
    if value is not None and value < 1:
      print(f"error: {flag}={value}: must be at least 1", file=sys.stderr)
      sys.exit(2)
  from md_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from md_jax.evaluators import samples as samples_lib  # pylint: disable=g-import-not-at-top
  from md_jax.train import diffusion as diff  # pylint: disable=g-import-not-at-top
  try:
    config, ld, mesh, unet, frozen, step = diff.load_for_sampling(
        _WORKDIR.value, _STEP.value, _EMA.value)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for prompt in prompts:
    for message in pipeline.prompt_warnings(ld.tokenizer, prompt, int(config.data.max_length)):
      print(f"warning: {message}", file=sys.stderr)
  num_steps = _STEPS.value
  if num_steps is None:
    num_steps = int(config.sample.num_steps) if config.trainer == "ufogen" else 50
  expanded = [p for p in prompts for _ in range(_NUM.value)]
  cfg_scale = config.sample.guidance_scale if _CFG.value is None else _CFG.value
  images = diff.generate(ld, mesh, unet, frozen, expanded, seed=_SEED.value,
                         image_size=int(config.data.image_size), num_steps=num_steps,
                         guidance_scale=float(cfg_scale), batch_size=int(config.sample.batch_size))
  out = _OUT.value or os.path.join(_WORKDIR.value, "samples", "cli")
  os.makedirs(out, exist_ok=True)
  written = []
  for i, (p, img) in enumerate(zip(expanded, images)):
    written.append(samples_lib.save_png(img, os.path.join(out, f"{i:04d}_{_slug(p)}.png")))
  grid = samples_lib.make_grid(images, columns=max(1, _NUM.value) if len(prompts) > 1 else 8)
  written.append(samples_lib.save_png(grid, os.path.join(out, "grid.png")))
  print(json.dumps(dict(step=step, steps=num_steps, cfg=cfg_scale, files=written)))


if __name__ == "__main__":
  app.run(main)
