"""Judge accuracy of a shapes bundle in LiteRT against the same one-step pipeline in JAX.

  python -m tflite_export.judge --bundle DIR [--precisions fp16,int8] [--num_samples 256]
      [--seed N] [--out FILE.json]

For the shapes evaluation prompts (seen and held-out attribute combinations, as every shapes
evaluation draws them), each sample's noise is numpy-seeded from (seed, index), so the LiteRT
files and the JAX functions they were converted from see identical inputs. The JAX side rebuilds
the bundle's components from the run and step its manifest names (the float32 graphs that were
converted, with the light decoder when the bundle has one). Reports the judge's scores (strict,
and without the sharpness check as a diagnostic) for JAX and each precision, how often each
precision's verdict agrees with JAX's per attribute, and the PSNR of its images against JAX's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from tflite_export import check as check_lib
from tflite_export import pipeline as pipeline_lib

ATTRIBUTES = ("colour", "shape", "position")
DEFAULT_SEED = 2024  # the shapes configs' sample.eval_seed: the prompts every shapes eval judges


def sample_noise(seed: int, index: int, shape) -> np.ndarray:
  """The noise of sample ``index``: a function of (seed, index) only."""
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
  return rng.standard_normal((1, *shape)).astype(np.float32)


def _jax_images(bundle: str, manifest: dict, prompts, noises, log) -> np.ndarray:
  from tflite_export import convert  # pylint: disable=g-import-not-at-top
  src = manifest.get("source") or {}
  if not src.get("workdir"):
    raise ValueError(f"{bundle}/manifest.json names no source run; the JAX reference needs one")
  names = ("text_encoder", "unet_onestep", "decoder")
  decoder = src.get("decoder") or {}  # a light decoder exported with --decoder_from
  comps, ld, _, step = convert.components_from_workdir(
      src["workdir"], step=src.get("step"), names=names, num_representative=1,
      decoder_from=decoder.get("workdir"), decoder_step=decoder.get("step"))
  log(f"JAX reference: {src['workdir']} step {step}")
  out = []
  for prompt, noise in zip(prompts, noises):
    hidden = comps["text_encoder"].jax_apply(ld.tokenize([prompt]))["hidden"]
    x0 = comps["unet_onestep"].jax_apply(noise, hidden)["x0"]
    out.append(comps["decoder"].jax_apply(x0)["image"][0])
  return np.stack(out)


def judge_bundle(bundle: str, *, precisions: Sequence[str] = ("fp16", "int8"),
                 num_samples: int = 256, seed: int | None = None, log=print) -> dict:
  """Scores of JAX and of each precision on the same prompts and noise (see the module doc)."""
  from md_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from md_jax.evaluators import shapes_judge  # pylint: disable=g-import-not-at-top
  with open(os.path.join(bundle, "manifest.json")) as f:
    manifest = json.load(f)
  data = manifest.get("model_config", {}).get("data", {})
  if data.get("name") != "shapes" or data.get("source"):
    raise ValueError(f"{bundle}: not a model trained on the shapes data (manifest model_config."
                     f"data: {data}); the judge only reads shapes images")
  if num_samples < 2:
    raise ValueError(f"--num_samples={num_samples}: need at least 2")
  seed = DEFAULT_SEED if seed is None else int(seed)
  pa = shapes.eval_prompts(num_samples, seed)
  prompts = [p for p, _ in pa]
  held = [bool(a.get("held_out", False)) for _, a in pa]
  latent_shape = tuple(manifest["components"]["unet_onestep"]["inputs"][0]["shape"][1:])
  noises = [sample_noise(seed, i, latent_shape) for i in range(num_samples)]

  t0 = time.time()
  images = {"jax": _jax_images(bundle, manifest, prompts, noises, log)}
  seconds = {"jax": round(time.time() - t0, 1)}
  files = {}
  for p in precisions:
    t0 = time.time()
    pipe = pipeline_lib.BundlePipeline(bundle, p)
    files[p] = pipe.files
    images[p] = np.stack([pipe(pr, noise=nz)["image"][0] for pr, nz in zip(prompts, noises)])
    seconds[p] = round(time.time() - t0, 1)
    log(f"{p}: {num_samples} samples in {seconds[p]} s ({pipe.files})")

  report = dict(bundle=os.path.abspath(bundle), source=manifest.get("source"),
                num_samples=num_samples, seed=seed, files=files, seconds=seconds, scores={},
                scores_without_sharpness_check={}, agreement={},
                agreement_without_sharpness_check={}, psnr_vs_jax_db={})
  for suffix, strict in (("", True), ("_without_sharpness_check", False)):
    verdicts = {}
    for name, ims in images.items():
      u8 = check_lib.to_uint8(ims)
      verdicts[name] = [shapes_judge.judge(im, pr, require_sharp=strict)
                        for im, pr in zip(u8, prompts)]
      report["scores" + suffix][name] = shapes_judge.summarise(verdicts[name], held_out=held)
    for p in precisions:
      report["agreement" + suffix][p] = {
          a: float(np.mean([v[a] == w[a] for v, w in zip(verdicts[p], verdicts["jax"])]))
          for a in ATTRIBUTES}
  for p in precisions:
    psnr = [check_lib.psnr(x, y) for x, y in zip(images[p], images["jax"])]
    report["psnr_vs_jax_db"][p] = dict(median=float(np.median(psnr)), min=float(min(psnr)))
  report["images"] = images  # dropped from the JSON; returned for callers
  return report


def format_table(report: dict) -> str:
  lines = ["| pipeline | colour | shape | position | all | rejected | colour, no sharpness check "
           "| agrees with JAX (c/s/p) | agrees, no sharpness check | PSNR vs JAX median (min) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name, sc in report["scores"].items():
    lenient = report["scores_without_sharpness_check"][name]
    agree = report["agreement"].get(name)
    agree_lenient = report["agreement_without_sharpness_check"].get(name)
    psnr = report["psnr_vs_jax_db"].get(name)
    cells = [f"{100 * sc[k]:.1f}% [{100 * sc[k + '_ci'][0]:.1f}, {100 * sc[k + '_ci'][1]:.1f}]"
             for k in ("colour", "shape", "position", "all")]
    lines.append(
        f"| {name} | " + " | ".join(cells) + f" | {100 * sc['rejected']:.1f}% | "
        f"{100 * lenient['colour']:.1f}% | "
        + " | ".join("/".join(f"{100 * g[a]:.1f}%" for a in ATTRIBUTES) if g else "-"
                     for g in (agree, agree_lenient)) + " | "
        + (f"{psnr['median']:.1f} ({psnr['min']:.1f}) dB" if psnr else "-") + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bundle", required=True)
  parser.add_argument("--precisions", default="fp16,int8")
  parser.add_argument("--num_samples", type=int, default=256)
  parser.add_argument("--seed", type=int)
  parser.add_argument("--out", help="JSON report (default: BUNDLE/judge.json)")
  args = parser.parse_args(argv)
  if not os.path.isfile(os.path.join(args.bundle, "manifest.json")):
    print(f"error: --bundle={args.bundle}: no manifest.json there", file=sys.stderr)
    return 2
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  report = judge_bundle(args.bundle, precisions=[p for p in args.precisions.split(",") if p],
                        num_samples=args.num_samples, seed=args.seed)
  report.pop("images")
  out = args.out or os.path.join(args.bundle, "judge.json")
  with open(out, "w") as f:
    json.dump(report, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
  print(format_table(report))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
