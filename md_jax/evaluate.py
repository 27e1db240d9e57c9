"""Evaluation CLI (paper sec. 5.1): samples from a checkpoint and the metrics the paper reports.

``python -m md_jax.evaluate --workdir=DIR [--config=configs/X.py:arg] [--step=N|latest]
[--sampler=ddim|dpmpp2m|onestep] [--steps=50] [--cfg=3.0 | --sweep_cfg=1,2,3,4]
[--num_samples=N] [--prompts=FILE] [--fid_stats=stats.npz --inception=inception.npz]
[--clip_dir=HF_CLIP_DIR] [--out=DIR]``

Restores only what sampling needs (the UNet's EMA params when the run kept them, the frozen text
encoder, VAE and latent statistics; md_jax.train.diffusion.load_for_sampling) onto this machine's devices
whatever mesh saved them, generates one image per prompt sharded over all devices (sample i's
noise depends only on (seed, i), so the images do not depend on the device count), and computes:

  * on shapes runs (prompts: the data set's evaluation prompts): the shapes judge, and the
    Frechet distance and KID between generated and real eval-split images in two feature
    spaces (Inception features mean nothing on these images): ``fd_shapes`` / ``kid_shapes``
    with the shipped shapes feature network (md_jax/evaluators/shapes_features.py, the same for
    every run) and ``fd_vae`` / ``kid_vae`` in the run's own VAE-encoder latent space;
  * on shapes runs, classifier two-sample tests against the same real images
    (md_jax/evaluators/two_sample.py): ``c2st_spectrum`` (held-out accuracy of a linear
    classifier on each image's radial power spectrum: blur and artefacts) and ``c2st_shapes``
    (on the shapes features), each with ``_ci`` and ``_auc``; 0.5 = indistinguishable; and
    the same two against the real images after the run's VAE round trip (encode, decode:
    ``c2st_spectrum_recon`` / ``c2st_shapes_recon``), which every sample's decoding also ends
    with, so the decoder's own signature cancels and what is left is the generator's. The
    round trip against the real images (the decoder alone) is the report's ``vae_round_trip``;
  * ``fid`` against a statistics file (``--fid_stats``, made by md_jax.tools.fid_stats with the
    same ``--inception`` weights), e.g. FID-30K with the COCO-30K captions as ``--prompts``;
  * ``clip_score``: the raw image-prompt cosine with the CLIP model in ``--clip_dir``;
  * on shapes runs, once per checkpoint (not per sample): ``caption_use`` (--caption_use), the
    denoiser's error with true captions vs captions that lie about colour, shape or position
    (md_jax/evaluators/caption_use.py): which parts of the prompt the model uses at all.

Writes OUT/eval_<tag>.json, sample grids (OUT/grid_<tag>_cfg<s>.png), TensorBoard scalars and
grids under OUT/tensorboard (OUT defaults to WORKDIR/eval), and with ``--sweep_cfg`` the FID-vs-CLIP
curve (on shapes: the shapes-feature distance ``fd_shapes`` vs judge accuracy, or the VAE-space
one when only that was computed) as OUT/curve_<tag>.png.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags


def _define_flags() -> None:
  """The CLI's flags, defined only when run as a program: importing this module (evaluate() from
  a test or another tool) must not clash with md_jax.main's or md_jax.sample's flags."""
  global _CONFIG, _WORKDIR, _STEP, _SAMPLER, _STEPS, _CFG, _SWEEP, _NUM, _SEED, _BATCH
  global _PROMPTS, _FID_STATS, _INCEPTION, _CLIP_DIR, _OUT, _EMA, _PROGRESS, _DISTRIBUTED
  global _CAPTION_USE
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Optional config file (configs/*.py[:arg]); default: the one stored with the "
      "checkpoint. Its shapes must match the checkpoint.", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a diffusion or UFOGen run.")
  _STEP = flags.DEFINE_string("step", "latest", "Checkpoint step, or 'latest'.")
  _SAMPLER = flags.DEFINE_enum("sampler", "ddim", ["ddim", "dpmpp2m", "onestep"], "Sampler.")
  _STEPS = flags.DEFINE_integer("steps", None, "Sampler steps (default: config.sample.num_steps).")
  _CFG = flags.DEFINE_float("cfg", None, "CFG scale (default: config.sample.guidance_scale).")
  _SWEEP = flags.DEFINE_list("sweep_cfg", None, "Several CFG scales, e.g. 1,2,3,4: one evaluation "
                             "each and the FID-vs-CLIP (shapes: distance-vs-judge) curve.")
  _NUM = flags.DEFINE_integer("num_samples", None,
                              "Number of samples (default: config.sample.num_eval_samples, or all "
                              "prompts of --prompts).")
  _SEED = flags.DEFINE_integer("seed", None, "Noise seed (default: config.sample.eval_seed).")
  _BATCH = flags.DEFINE_integer("batch_size", None, "Sampling batch (default: config.sample.batch_size).")
  _PROMPTS = flags.DEFINE_string("prompts", None, "Prompt file: one per line, or a JSON list (e.g. "
                                 "the COCO-30K captions). Required unless the run is on shapes.")
  _FID_STATS = flags.DEFINE_string("fid_stats", None, "Reference statistics .npz for FID.")
  _INCEPTION = flags.DEFINE_string("inception", None, "Converted FID Inception weights .npz.")
  _CLIP_DIR = flags.DEFINE_string("clip_dir", None, "Hugging Face CLIPModel directory (CLIP score).")
  _OUT = flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/eval).")
  _EMA = flags.DEFINE_bool("ema", True, "Use EMA params when the checkpoint has them.")
  _CAPTION_USE = flags.DEFINE_bool(
      "caption_use", True, "Shapes runs: the caption-use gaps (md_jax.evaluators.caption_use).")
  _PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars.")
  _DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                   "jax.distributed.initialize() as md_jax.main does.")
  flags.mark_flags_as_required(["workdir"])


def read_prompts(path: str) -> list[str]:
  """Prompts from a text file (one per line, blank lines skipped) or a JSON list / {'captions'}."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--prompts={path!r}: no such file")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".json"):
    data = json.loads(text)
    if isinstance(data, dict):
      data = data.get("captions", data.get("prompts"))
    if not isinstance(data, list):
      raise ValueError(f"{path}: expected a JSON list of prompts or {{'captions': [...]}}")
    return [d["caption"] if isinstance(d, dict) else str(d) for d in data]
  return [line.strip() for line in text.splitlines() if line.strip()]


def _is_shapes(config) -> bool:
  return not str(config.data.get("source", "") or "")


class _Vae:
  """The run's VAE on uint8 images, batched over the mesh: ``__call__`` gives the flattened
  encoder latent means (the feature space of the shapes-only ``fd_vae``), ``reconstruct`` the
  images decoded from those means (real renders after the round trip every sample's decoding
  ends with)."""

  def __init__(self, ld, mesh, frozen, batch_size: int):
    import jax  # pylint: disable=g-import-not-at-top
    from md_jax.train import sharding as shd  # pylint: disable=g-import-not-at-top
    self.div = shd.batch_divisor(mesh)
    self.batch_size = max(self.div, (batch_size // self.div) * self.div)
    self.sharding = shd.batch_sharding(mesh, 4)
    self.frozen = frozen
    self._encode = jax.jit(lambda fz, x: ld.vae.bind(fz["vae"]).encode(x)[0].astype("float32"))

    def round_trip(fz, x):
      vae = ld.vae.bind(fz["vae"])
      return vae.decode(vae.encode(x)[0]).astype("float32")
    self._round_trip = jax.jit(round_trip)

  def _map(self, fn, images_uint8: np.ndarray) -> list[np.ndarray]:
    import jax  # pylint: disable=g-import-not-at-top
    from md_jax.evaluators import samples  # pylint: disable=g-import-not-at-top
    out = []
    for start in range(0, len(images_uint8), self.batch_size):
      chunk = images_uint8[start:start + self.batch_size].astype(np.float32) / 127.5 - 1.0
      n = len(chunk)
      if n < self.batch_size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
      out.append(samples.gather_to_host(fn(self.frozen, jax.device_put(chunk, self.sharding)))[:n])
    return out

  def __call__(self, images_uint8: np.ndarray) -> np.ndarray:
    z = self._map(self._encode, images_uint8)
    return np.concatenate([b.reshape(len(b), -1) for b in z], axis=0).astype(np.float64)

  def reconstruct(self, images_uint8: np.ndarray) -> np.ndarray:
    from md_jax.evaluators import samples  # pylint: disable=g-import-not-at-top
    return samples.to_uint8(np.concatenate(self._map(self._round_trip, images_uint8), axis=0))


def _shapes_real(config, n: int, image_size: int) -> np.ndarray:
  from md_jax.data import shapes  # pylint: disable=g-import-not-at-top
  return np.stack([shapes.make_record("eval", i, image_size, seed=int(config.data.seed))["image"]
                   for i in range(n)])


def _distances(feats, real_feats, ref_stats, prefix: str) -> dict[str, float]:
  from md_jax.evaluators import fid  # pylint: disable=g-import-not-at-top
  f = np.asarray(feats, np.float64)
  mu, sigma, _ = fid.FeatureStats(f.shape[1]).update(f).result()
  return {f"fd_{prefix}": fid.frechet_distance(mu, sigma, ref_stats[0], ref_stats[1]),
          f"kid_{prefix}": fid.kernel_inception_distance(f, real_feats, num_subsets=50,
                                                         subset_size=min(len(f), 1000))}


def _c2st(feats, real_feats, prefix: str) -> dict[str, Any]:
  from md_jax.evaluators import two_sample  # pylint: disable=g-import-not-at-top
  if len(feats) < 5:  # too few samples for its five folds: no test
    return {}
  r = two_sample.c2st(feats, real_feats)
  return {f"c2st_{prefix}": r["accuracy"], f"c2st_{prefix}_ci": r["accuracy_ci"],
          f"c2st_{prefix}_auc": r["auc"]}


def evaluate(workdir: str, *, config=None, step: int | None = None, sampler: str = "ddim",
             num_steps: int | None = None, cfg_scales: Sequence[float] | None = None,
             num_samples: int | None = None, seed: int | None = None,
             batch_size: int | None = None, prompts_file: str | None = None,
             fid_stats: str | None = None, inception: str | None = None,
             clip_dir: str | None = None, out: str | None = None, use_ema: bool = True,
             progress: bool = True, caption_use: bool = True) -> dict[str, Any]:
  """Runs the evaluation; returns the report that is also written as JSON."""
  import jax  # pylint: disable=g-import-not-at-top
  from md_jax.evaluators import fid as fid_lib  # pylint: disable=g-import-not-at-top
  from md_jax.evaluators import samples as samples_lib  # pylint: disable=g-import-not-at-top
  from md_jax.evaluators import two_sample  # pylint: disable=g-import-not-at-top
  from md_jax.train import diffusion as diff  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top

  if bool(fid_stats) != bool(inception):
    raise ValueError("FID needs both --fid_stats and --inception")
  for path, what in ((fid_stats, "--fid_stats"), (inception, "--inception")):
    if path and not os.path.isfile(path):
      raise FileNotFoundError(f"{what}={path!r}: no such file")
  if clip_dir and not os.path.isdir(clip_dir):
    raise FileNotFoundError(f"--clip_dir={clip_dir!r}: no such directory")
  config, ld, mesh, unet, frozen, step = diff.load_for_sampling(workdir, step, use_ema, config)
  loop.setup_compilation_cache(config.get("compilation_cache_dir") or None)
  sc = config.sample
  shapes_run = _is_shapes(config)
  num_steps = 1 if sampler == "onestep" else int(num_steps or sc.num_steps)
  seed = int(sc.eval_seed if seed is None else seed)
  batch_size = int(batch_size or sc.batch_size)
  image_size = int(config.data.image_size)
  cfg_scales = [float(sc.guidance_scale)] if not cfg_scales else [float(s) for s in cfg_scales]

  held = None
  if prompts_file:
    prompts = read_prompts(prompts_file)
    prompts = prompts[:num_samples] if num_samples else prompts
  elif shapes_run:
    from md_jax.data import shapes  # pylint: disable=g-import-not-at-top
    pa = shapes.eval_prompts(int(num_samples or sc.num_eval_samples), seed)
    prompts = [p for p, _ in pa]
    held = [bool(a.get("held_out", False)) for _, a in pa]
  else:
    raise ValueError("this run is not on the shapes data: pass --prompts=FILE (e.g. the COCO-30K "
                     "captions from md_jax.tools.coco_captions)")
  if len(prompts) < 2:
    raise ValueError(f"need at least 2 prompts, have {len(prompts)}")

  out = out or os.path.join(workdir, "eval")
  tag = f"step{step}_{sampler}{num_steps if sampler != 'onestep' else ''}"
  main_process = jax.process_index() == 0
  extractor = (fid_lib.make_extractor(inception, min(50, batch_size), mesh) if inception
               else None)
  scorer = None
  if clip_dir:
    from md_jax.evaluators import clip_score  # pylint: disable=g-import-not-at-top
    scorer = clip_score.CLIPScorer(clip_dir, batch_size=32, mesh=mesh)
  # Shapes: distances in two feature spaces, each with statistics of real eval-split images:
  # the shipped shapes feature network (a fixed yardstick across runs) and the run's own VAE.
  spaces = {}
  if shapes_run:
    from md_jax.evaluators import shapes_features  # pylint: disable=g-import-not-at-top
    real = _shapes_real(config, max(len(prompts), 256), image_size)
    vae = _Vae(ld, mesh, frozen, batch_size)
    extractors = {"vae": vae}
    if os.path.isfile(shapes_features.DEFAULT_WEIGHTS):
      extractors["shapes"] = fid_lib.FeatureExtractor(shapes_features.load(), batch_size, mesh)
    for name, fn in extractors.items():
      rf = np.asarray(fn(real), np.float64)
      spaces[name] = (fn, rf, fid_lib.FeatureStats(rf.shape[1]).update(rf).result())
    real_spectrum = two_sample.radial_log_spectrum(real)
    # The same renders after the VAE round trip: every sample ends with the decoder, so samples
    # told from these are told apart by what the generator made, not by the decoder's own
    # signature; the round trip against the renders measures that signature (a control).
    recon = vae.reconstruct(real)
    real_refs = {"spectrum": real_spectrum}
    recon_refs = {"spectrum": two_sample.radial_log_spectrum(recon)}
    if "shapes" in spaces:
      real_refs["shapes"] = spaces["shapes"][1]
      recon_refs["shapes"] = np.asarray(spaces["shapes"][0](recon), np.float64)
    round_trip = {}
    for name, ref in recon_refs.items():
      round_trip.update(_c2st(ref, real_refs[name], name))

  writer = loop._make_writer(out) if main_process else None  # pylint: disable=protected-access
  uses = None
  if shapes_run and caption_use:
    from md_jax.evaluators import caption_use as uses_lib  # pylint: disable=g-import-not-at-top
    uses = dict(uses_lib.run(ld, unet, frozen, mesh, image_size=image_size, seed=seed,
                             batch_size=batch_size, data_seed=int(config.data.seed)))
    if main_process:
      writer.write_scalars(step, {f"step{step}/{k}": v for k, v in uses.items()})
  results = []
  for scale in cfg_scales:
    timings: list = []
    images = diff.generate(ld, mesh, unet, frozen, prompts, seed=seed, image_size=image_size,
                           num_steps=num_steps, guidance_scale=scale,
                           guidance_rescale=float(sc.guidance_rescale), batch_size=batch_size,
                           progress=progress, sampler=sampler, timings=timings)
    metrics: dict[str, Any] = dict(cfg=scale, num_samples=len(images),
                                   sampling_seconds=sum(t for _, t in timings))
    if len(timings) > 1:  # throughput without the first batch, which includes the compile
      later = timings[1:]
      metrics["images_per_s"] = sum(n for n, _ in later) / max(sum(t for _, t in later), 1e-9)
    if extractor is not None:
      metrics.update(dict(fid_lib.run(extractor, [images], fid_stats)))
    if scorer is not None:
      from md_jax.evaluators import clip_score  # pylint: disable=g-import-not-at-top
      metrics.update(dict(clip_score.run(scorer, images, prompts)))
    for name, (fn, real_feats, real_stats) in spaces.items():
      feats = fn(images)
      metrics.update(_distances(feats, real_feats, real_stats, name))
      if name == "shapes":  # what the images depict, told apart from real renders
        metrics.update(_c2st(feats, real_feats, name))
        metrics.update(_c2st(feats, recon_refs["shapes"], "shapes_recon"))
    if shapes_run:  # their spatial-frequency content, told apart from real renders
      spectrum = two_sample.radial_log_spectrum(images)
      metrics.update(_c2st(spectrum, real_spectrum, "spectrum"))
      metrics.update(_c2st(spectrum, recon_refs["spectrum"], "spectrum_recon"))
    if main_process:
      if shapes_run:
        from md_jax.evaluators import shapes_judge  # pylint: disable=g-import-not-at-top
        scores = shapes_judge.score(list(images), prompts, held_out=held)
        metrics["judge"] = scores
      grid = samples_lib.make_grid(images[:64], columns=min(8, len(images)))
      metrics["grid"] = samples_lib.save_png(grid, os.path.join(out, f"grid_{tag}_cfg{scale:g}.png"))
      scalars = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and k != "cfg"}
      if shapes_run:
        scalars.update({f"judge/{k}": float(v) for k, v in metrics["judge"].items()
                        if isinstance(v, (int, float))})
      writer.write_scalars(step, {f"{tag}/cfg{scale:g}/{k}": v for k, v in scalars.items()})
      writer.write_images(step, {f"{tag}/cfg{scale:g}/samples": grid[None]})
    metrics["images"] = images  # dropped from the JSON below; returned for callers
    results.append(metrics)

  report = dict(workdir=os.path.abspath(workdir), step=step, sampler=sampler, num_steps=num_steps,
                seed=seed, num_samples=len(prompts), image_size=image_size,
                params=getattr(ld, "restored_params", None),
                devices=jax.device_count(), processes=jax.process_count(),
                fid_stats=fid_stats, clip_dir=clip_dir, caption_use=uses,
                vae_round_trip=round_trip if shapes_run else None,
                results=[{k: v for k, v in r.items() if k != "images"} for r in results])
  if main_process:
    if len(results) > 1:
      report["curve"] = _write_curve(results, os.path.join(out, f"curve_{tag}.png"), tag)
    writer.flush()
    path = os.path.join(out, f"eval_{tag}.json")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
      json.dump(report, f, indent=1, default=_json_default)
    report["json"] = path
  report["images"] = {r["cfg"]: r["images"] for r in results}
  return report


def _write_curve(results, path: str, tag: str) -> str | None:
  from md_jax.evaluators import samples as samples_lib  # pylint: disable=g-import-not-at-top
  first = results[0]
  if "fid" in first and "clip_score" in first:
    pts = [(r["clip_score"], r["fid"]) for r in results]
    xlabel, ylabel, short = "CLIP score (raw cosine)", "FID", "FID vs CLIP score"
  elif "fd_shapes" in first and "judge" in first:
    pts = [(r["judge"]["all"], r["fd_shapes"]) for r in results]
    xlabel, ylabel = "shapes judge: share with all attributes right", "FID (shapes features)"
    short = "shapes FID vs judge"
  elif "fd_vae" in first and "judge" in first:
    pts = [(r["judge"]["all"], r["fd_vae"]) for r in results]
    xlabel, ylabel = "shapes judge: share with all attributes right", "Frechet distance (VAE latents)"
    short = "VAE-space distance vs judge"
  else:
    return None
  labels = [f"cfg {r['cfg']:g}" for r in results]
  return samples_lib.curve_png(pts, path, xlabel=xlabel, ylabel=ylabel, labels=labels,
                               title=f"{short} over CFG scales ({tag})")


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from md_jax.train import sharding as shd  # pylint: disable=g-import-not-at-top
  shd.maybe_initialize_distributed(_DISTRIBUTED.value)
  step = None if _STEP.value in ("latest", "", None) else int(_STEP.value)
  sweep = [float(s) for s in _SWEEP.value] if _SWEEP.value else None
  if sweep and _CFG.value is not None:
    raise app.UsageError("give --cfg or --sweep_cfg, not both")
  try:
    report = evaluate(
        _WORKDIR.value, config=_CONFIG.value, step=step, sampler=_SAMPLER.value,
        num_steps=_STEPS.value, cfg_scales=sweep or ([_CFG.value] if _CFG.value is not None else None),
        num_samples=_NUM.value, seed=_SEED.value, batch_size=_BATCH.value,
        prompts_file=_PROMPTS.value, fid_stats=_FID_STATS.value, inception=_INCEPTION.value,
        clip_dir=_CLIP_DIR.value, out=_OUT.value, use_ema=_EMA.value, progress=_PROGRESS.value,
        caption_use=_CAPTION_USE.value)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  report.pop("images", None)
  summary = {k: report.get(k) for k in ("step", "sampler", "num_steps", "num_samples", "json",
                                        "curve", "caption_use", "vae_round_trip")}
  summary["results"] = [{k: v for k, v in r.items() if k not in ("judge", "grid")} |
                        ({"judge_all": r["judge"]["all"]} if "judge" in r else {})
                        for r in report["results"]]
  print(json.dumps(summary, default=_json_default))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
