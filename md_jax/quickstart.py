"""The embedded end-to-end run on shapes, in one process (one JAX start-up, one compile cache).

VAE -> light decoder distilled against the VAE's frozen encoder (paper sec. 3.5) -> low-resolution
diffusion (64px) -> high-resolution diffusion (128px, initialised from the low-res run), both
reading latents through that encoder (their training records encoded once, into
WORKDIR/latents_lowres and WORKDIR/latents_highres) and decoding with the light decoder ->
50-step DDIM samples for the evaluation prompts, judged -> UFOGen one-step finetune of the
high-res run (paper sec. 4) -> one-step samples for the same prompts, judged -> the Android
bundle of the one-step generator (TFLite fp16 + int8, checked) and one LiteRT pipeline run per
precision, all printed and written to WORKDIR/quickstart.json. Each training stage is a normal
workdir (WORKDIR/vae, WORKDIR/light_decoder, WORKDIR/lowres, WORKDIR/highres, WORKDIR/ufogen)
that ``python -m md_jax.main`` could run or resume on its own, and WORKDIR/bundle is what
``python -m tflite_export.export --workdir=WORKDIR/ufogen`` writes; rerunning the quickstart
resumes whatever is unfinished and re-exports only when the exported checkpoint changed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", "workdir/shapes", "Root directory of the stages.")
_SIZE = flags.DEFINE_enum("size", "full", ["full", "smoke", "tiny"],
                          "full: the quickstart; smoke: same chain, few steps (CI).")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "KEY=VALUE applied to every stage's config, e.g. --override=seed=1.")

_EXPORT = flags.DEFINE_bool(
    "export", True, "End with the TFLite bundle of the one-step generator (fp16, int8) and one "
    "LiteRT pipeline run per precision.")

STAGES = ("vae", "light_decoder", "lowres", "highres", "ufogen")
# Diffusion stages that read their training records' latents from a cache built once in
# WORKDIR/latents_<stage> (records [0, config.data.num_records), each seen several times) instead
# of running the frozen encoder in every step: see md_jax.tools.build_latent_cache.
LATENT_CACHE_STAGES = ("lowres", "highres")
LIGHT_STAGE = "light_decoder"  # the VAE every later stage reads latents through and decodes with
EXPORT_SOURCE = "ufogen"  # the one-step generator is what the phone runs
EXPORT_PRECISIONS = ("fp16", "int8")
EXPORT_COMPONENTS = ("text_encoder", "unet_onestep", "decoder")


def export_stage(workdir: str, source_stage: str = EXPORT_SOURCE) -> dict:
  """Bundle of WORKDIR/<source_stage> in WORKDIR/bundle (skipped when it already holds that
  run's latest checkpoint step), then the LiteRT pipeline once per precision on the bundle's
  golden prompt and seed, compared with the JAX one-call image stored in the bundle."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from tflite_export import check as check_lib  # pylint: disable=g-import-not-at-top
  from tflite_export import convert as conv  # pylint: disable=g-import-not-at-top
  from tflite_export import export as export_lib  # pylint: disable=g-import-not-at-top
  from tflite_export import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  src = os.path.join(workdir, source_stage)
  out = os.path.join(workdir, "bundle")
  step = ckpt_lib.latest_step_in(src)
  manifest_path = os.path.join(out, "manifest.json")
  manifest = None
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
    source = manifest.get("source", {})
    if (source.get("step"), source.get("workdir")) != (step, src):
      manifest = None
  t0 = time.time()
  if manifest is None:
    comps, ld, config, step = conv.components_from_workdir(
        src, names=EXPORT_COMPONENTS, num_representative=16)
    # force: a failed check must not throw away the training before it; the failures are in the
    # manifest and quickstart.json and printed (python -m tflite_export.export refuses instead).
    manifest = export_lib.write_bundle(
        out, comps, ld, config, precisions=EXPORT_PRECISIONS,
        source=dict(workdir=src, step=step, params="ema_params"), log=logging.info, force=True)
  result = dict(dir=out, step=step, export_seconds=round(time.time() - t0, 1),
                checks={k: bool(r["ok"]) for k, r in manifest["checks"].items()},
                check_errors={k: [f"[{e['check']}] {e['message']}" for e in r["findings"]
                                  if e["severity"] == "error"]
                              for k, r in manifest["checks"].items() if not r["ok"]},
                bytes={f"{c}_{p}": info["bytes"] for c, comp in manifest["components"].items()
                       for p, info in comp["files"].items()},
                prompt=manifest["golden"]["prompt"], seed=manifest["golden"]["seed"],
                pipeline={})
  golden = np.load(os.path.join(out, manifest["golden"]["file"]))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for precision in EXPORT_PRECISIONS:
    t1 = time.time()
    pipe = pipeline_lib.BundlePipeline(out, precision)
    res = pipe(result["prompt"], seed=result["seed"])
    png = os.path.join(workdir, f"bundle_pipeline_{precision}.png")
    Image.fromarray(res["image_u8"][0]).save(png)
    result["pipeline"][precision] = dict(
        png=png, files=pipe.files, seconds=round(time.time() - t1, 2),
        psnr_vs_jax_db=round(check_lib.psnr(res["image"], golden["image"]), 2))
  return result


def stage_config(workdir: str, stage: str, size: str):
  """The config of one quickstart stage, wired to the stages before it."""
  from md_jax import config_loading  # pylint: disable=g-import-not-at-top
  if stage == "ufogen":
    config = config_loading.load_config(f"configs/ufogen.py:diffusion,full,{size}")
  else:
    config = config_loading.load_config(f"configs/shapes.py:{stage},{size}")
  with config.unlocked():
    if stage == LIGHT_STAGE:
      config.vae_workdir = os.path.join(workdir, "vae")
    if stage in ("lowres", "highres", "ufogen"):
      # Every diffusion stage (UFOGen through its init_from checkpoint) carries the light run's
      # encoder and light decoder, so its decoder shape is the light stage's.
      light = config_loading.load_config(f"configs/shapes.py:{LIGHT_STAGE},{size}").vae
      config.vae.decoder_channels = tuple(light.decoder_channels)
      config.vae.decoder_res_blocks = int(light.decoder_res_blocks)
    if stage in ("lowres", "highres"):
      config.vae_workdir = os.path.join(workdir, LIGHT_STAGE)
    if stage == "lowres":
      config.eval_at_end = False  # judged once, at the final resolution
    if stage == "highres":
      config.init_from = os.path.join(workdir, "lowres")
    if stage in LATENT_CACHE_STAGES:
      config.vae.cache_dir = os.path.join(workdir, f"latents_{stage}")
    if stage == "ufogen":
      config.init_from = os.path.join(workdir, "highres")  # VAE and text encoder come with it
  return config


def ensure_latent_cache(config) -> None:
  """Builds config.vae.cache_dir when the stage reads one and it is not there yet (an existing
  cache is checked against the stage's VAE by the trainer before its first step)."""
  from md_jax.data import latent_cache  # pylint: disable=g-import-not-at-top
  from md_jax.tools import build_latent_cache  # pylint: disable=g-import-not-at-top
  directory = str(config.vae.get("cache_dir", "") or "")
  if not directory or os.path.exists(os.path.join(directory, latent_cache.MANIFEST)):
    return
  print(f"[quickstart] latent cache: encoding {config.data.num_records} records at "
        f"{config.data.image_size}px into {directory}", flush=True)
  build_latent_cache.build_for_config(config, directory, progress=bool(config.progress_bar))


def run(workdir: str, size: str, overrides=(), export: bool = True) -> dict:
  from md_jax import config_loading  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  timings, results = {}, {}
  t_all = time.time()
  for stage in STAGES:
    config = stage_config(workdir, stage, size)
    config_loading.apply_overrides(config, overrides)
    t0 = time.time()
    logging.info("=== stage %s ===", stage)
    print(f"[quickstart] stage {stage}: {config.num_train_steps} steps, "
          f"batch {config.global_batch_size}, {config.data.image_size}px", flush=True)
    ensure_latent_cache(config)  # its time counts as the stage's
    result = loop.train_and_evaluate(config, os.path.join(workdir, stage))
    timings[stage] = round(time.time() - t0, 1)
    results[stage] = result
    if result["preempted"]:
      print("[quickstart] preempted; rerun the same command to resume", flush=True)
      sys.exit(0)
  if export:
    t0 = time.time()
    print(f"[quickstart] stage export: TFLite bundle (fp16, int8) of the {EXPORT_SOURCE} run",
          flush=True)
    export_result = export_stage(workdir)
    timings["export"] = round(time.time() - t0, 1)
  summary = dict(size=size, seconds=timings, total_seconds=round(time.time() - t_all, 1))
  # "eval": the base model's 50-step DDIM samples; "onestep_eval": the UFOGen generator's
  # one-step samples of the same prompts and seeds.
  for key, stage in (("eval", "highres"), ("onestep_eval", "ufogen")):
    eval_path = os.path.join(workdir, stage, "eval.json")
    if os.path.exists(eval_path):
      with open(eval_path) as f:
        summary[key] = json.load(f)
  probe_path = os.path.join(workdir, "ufogen", "disc_probe.json")
  if os.path.exists(probe_path):  # is the UFOGen discriminator telling real from fake?
    with open(probe_path) as f:
      summary["disc_probe"] = json.load(f)
  summary["vae"] = results["vae"]["eval"]
  summary["light_decoder"] = results[LIGHT_STAGE]["eval"]
  if export:
    summary["export"] = export_result
  with open(os.path.join(workdir, "quickstart.json"), "w") as f:
    json.dump(summary, f, indent=1)
  _print_summary(summary, workdir)
  return summary


def _print_summary(summary, workdir):
  print("\n[quickstart] stage seconds:", summary["seconds"], "total", summary["total_seconds"])
  for key, what in (("eval", "base model (high-res run)"), ("onestep_eval", "UFOGen one-step")):
    ev = summary.get(key)
    if ev:
      print(f"[quickstart] {what}: {ev['num_samples']} samples, {ev['sampler']} "
            f"{ev['num_steps']} steps, cfg {ev['guidance_scale']}; grid: {ev['grid']}")
      print(json.dumps(ev["scores"], indent=1, default=str))
  vae, light = summary.get("vae") or {}, summary.get("light_decoder") or {}
  if "eval/recon_psnr" in vae and "eval/recon_psnr" in light:
    print(f"[quickstart] held-out reconstruction PSNR: VAE decoder {vae['eval/recon_psnr']:.2f} "
          f"dB, light decoder {light['eval/recon_psnr']:.2f} dB (at its start "
          f"{light['eval/recon_psnr_at_init']:.2f} dB)")
  for name, ev in (("VAE decoder", vae), ("light decoder", light)):
    # eval/recon_judge_* at the stage's image size, eval/recon<N>_judge_* on N-px renders.
    sizes = [m.group(1) for k in sorted(ev)
             if (m := re.fullmatch(r"eval/recon(\d*)_judge_colour", k))]
    if sizes:
      print(f"[quickstart] {name} reconstructions judged, colour / shape: " + ", ".join(
          f"{s + ' px' if s else 'at its image size'} "
          f"{100 * ev[f'eval/recon{s}_judge_colour']:.1f}% / "
          f"{100 * ev[f'eval/recon{s}_judge_shape']:.1f}%" for s in sorted(sizes, key=len)))
  rows = [(w.format(**summary[k]), summary[k]["scores"])
          for k, w in (("eval", "DDIM-{num_steps} (base)"), ("onestep_eval", "one-step (UFOGen)"))
          if k in summary]
  if rows:
    # Edge width: the judge's sharpness measure (median, px at 64 px; above 0.65 it rejects a
    # sample as blurred), which still ranks samples that all fail on sharpness.
    print("[quickstart] judge accuracy      colour  shape  position  all     edge width")
    for what, sc in rows:
      edge = sc.get("edge_width_median", float("nan"))
      print(f"[quickstart]   {what:<17} " + "  ".join(
          f"{100 * sc[k]:5.1f}%" for k in ("colour", "shape", "position", "all")) +
            (f"  {edge:5.2f} px" if math.isfinite(edge) else "      -"))
  probe = summary.get("disc_probe")
  if probe:
    print(f"[quickstart] UFOGen discriminator on {int(probe['disc_probe/n'])} held-out draws: "
          f"AUC real vs fake x_(t-{probe['timestep_gap']}) {probe['disc_probe/auc']:.3f} "
          f"(0.5: undecided; the latents' high-frequency energy alone: "
          f"{probe['disc_probe/hf_auc']:.3f})")
  ex = summary.get("export")
  if ex:
    ok = all(ex["checks"].values())
    print(f"[quickstart] bundle {ex['dir']} (step {ex['step']}): checks "
          f"{'passed' if ok else 'FAILED'}; LiteRT vs JAX image: " + ", ".join(
              f"{p} {r['psnr_vs_jax_db']} dB" for p, r in ex["pipeline"].items()))
    for f, errors in ex.get("check_errors", {}).items():
      for e in errors:
        print(f"[quickstart]   FAILED {f}: {e}")
  print(f"[quickstart] written: {os.path.join(workdir, 'quickstart.json')}")


def main(argv):
  del argv
  run(_WORKDIR.value, _SIZE.value, _OVERRIDES.value, export=_EXPORT.value)


if __name__ == "__main__":
  app.run(main)
