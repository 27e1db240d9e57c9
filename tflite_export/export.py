"""Writes an Android bundle: `python -m tflite_export.export --config=... --workdir=... --out=DIR`.

  --workdir=RUN       a diffusion run's workdir (EMA weights unless --noema); its stored config
                      is used and --config may be left out
  --config=SPEC       with no --workdir: fresh seeded weights of that config (tests, benchmarks)
  --precisions=fp32,fp16,int8   any of fp32, fp16, dr8 (dynamic-range int8), int8 (full int8)
  --components=...    default text_encoder,unet_onestep,unet,decoder
  --force             write the bundle even when checks fail

Bundle layout (DIR):
  manifest.json                 inputs/outputs/shapes/dtypes, precision files, intended delegate,
                                tokenizer, schedule constants, model config, check results
  <component>_<precision>.tflite
  tokenizer/                    the CLIP tokenizer files (vocab.json, merges.txt, ...)
  golden/golden.npz, image.png  a fixed prompt and seed through the JAX functions, step by step:
                                input_ids, hidden, noise, x0, image (float [0,1]) and image_u8
  checks/<component>.npz        representative inputs and seeded parity inputs/JAX outputs that
                                `python -m tflite_export.check DIR` reads

The pipeline's noise is numpy's `default_rng(seed).standard_normal(latent_shape)` in float32
(not jax.random), so any port can reproduce it or read it from the golden file.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Sequence

import numpy as np

from tflite_export import check as check_lib

DEFAULT_PROMPT = "a red circle in the top left corner"
FORMAT_VERSION = 1

# What a CLIPTokenizer directory holds (transformers' names); the bundle copies these alone.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


def pipeline_noise(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((1, *shape)).astype(np.float32)


def _config_json(config) -> dict:
  keep = ("stage", "size", "data", "text", "vae", "unet", "diffusion", "compute_dtype")
  d = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else \
      dict(config)
  return {k: d[k] for k in keep if k in d}


def golden_vectors(components: dict, ld, prompt: str, seed: int) -> dict:
  """The one-step pipeline in JAX for one prompt and seed, every intermediate kept."""
  ids = ld.tokenize([prompt])
  out = dict(input_ids=ids)
  if "text_encoder" in components:
    out["hidden"] = components["text_encoder"].jax_apply(ids)["hidden"]
  if "unet_onestep" in components:
    unet = components["unet_onestep"]
    noise = pipeline_noise(seed, unet.inputs[0].shape[1:])
    out["noise"] = noise
    if "hidden" not in out:  # no text encoder in this bundle: no end-to-end golden image
      return out
    out["x0"] = unet.jax_apply(noise, out["hidden"])["x0"]
    if "decoder" in components:
      image = components["decoder"].jax_apply(out["x0"])["image"]
      out["image"] = image
      out["image_u8"] = check_lib.to_uint8(image)
  return out


def parity_data(comp, golden: dict, num: int) -> tuple[dict, dict]:
  """Seeded parity inputs (the first representative samples + the golden step) and JAX outputs."""
  samples = list(comp.representative[:num])
  golden_inputs = dict(text_encoder=("input_ids",), unet_onestep=("noise", "hidden"),
                       decoder=("x0",)).get(comp.name)
  if golden_inputs and all(k in golden for k in golden_inputs):
    samples.append(tuple(golden[k] for k in golden_inputs))
  names = [s.name for s in comp.inputs]
  inputs = {n: np.stack([np.asarray(s[i], comp.inputs[i].dtype) for s in samples])
            for i, n in enumerate(names)}
  outs: dict[str, list] = {}
  for s in samples:
    for k, v in comp.jax_apply(*s).items():
      outs.setdefault(k, []).append(v)
  return inputs, {k: np.stack(v) for k, v in outs.items()}


def write_bundle(out: str, components: dict, ld, config, *, precisions: Sequence[str],
                 prompt: str = DEFAULT_PROMPT, seed: int = 0, source: dict | None = None,
                 force: bool = False, num_parity: int = 2, log=print) -> dict:
  """Converts, checks and writes the bundle; raises BundleCheckError (nothing written) on a
  failed check unless `force`."""
  from tflite_export import convert as conv  # pylint: disable=g-import-not-at-top
  staging = out.rstrip("/") + ".partial"
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(os.path.join(staging, "checks"))
  os.makedirs(os.path.join(staging, "golden"))

  golden = golden_vectors(components, ld, prompt, seed)
  np.savez_compressed(os.path.join(staging, "golden", "golden.npz"), **golden)
  if "image_u8" in golden:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    Image.fromarray(golden["image_u8"][0]).save(os.path.join(staging, "golden", "image.png"))

  from md_jax.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
  # The tokenizer the components were built with (the packaged one when the config names none).
  tok_src = (data_pipeline.tokenizer_dir(config.text) or data_pipeline.default_tokenizer_path())
  # Only the tokenizer's files: the directory may be a whole CLIP model (config.text.hf_dir).
  tok_files = sorted(f for f in os.listdir(tok_src) if f in TOKENIZER_FILES)
  os.makedirs(os.path.join(staging, "tokenizer"))
  for name in tok_files:
    shutil.copyfile(os.path.join(tok_src, name), os.path.join(staging, "tokenizer", name))

  manifest: dict = dict(
      format_version=FORMAT_VERSION,
      source=source or {},
      pipeline=["tokenize", "text_encoder", "unet_onestep", "decoder"],
      tokenizer=dict(dir="tokenizer", files=tok_files, kind="CLIPTokenizer",
                     max_length=int(config.data.max_length),
                     bos_token_id=int(ld.tokenizer.bos_token_id),
                     eos_token_id=int(ld.tokenizer.eos_token_id),
                     pad_token_id=int(ld.tokenizer.pad_token_id)),
      noise=dict(kind="numpy.random.default_rng(seed).standard_normal", dtype="float32"),
      golden=dict(file="golden/golden.npz",
                  image="golden/image.png" if "image_u8" in golden else None,
                  prompt=prompt, seed=seed, keys=sorted(golden)),
      schedule=conv.schedule_constants(ld.schedule),
      model_config=_config_json(config),
      gpu_ops_source=None,
      components={},
  )
  from tflite_export import gpu_ops  # pylint: disable=g-import-not-at-top
  manifest["gpu_ops_source"] = gpu_ops.SOURCE

  for name, comp in components.items():
    files = conv.convert_all(comp, precisions, staging, log=log)
    p_in, p_out = parity_data(comp, golden, num_parity)
    rep = [{s.name: np.asarray(x, s.dtype) for s, x in zip(comp.inputs, sample)}
           for sample in comp.representative]
    check_lib.save_arrays(os.path.join(staging, "checks", f"{name}.npz"), representative=rep,
                          parity_inputs=p_in, parity_outputs=p_out)
    manifest["components"][name] = dict(
        role=comp.role, delegate=comp.delegate, description=comp.description,
        inputs=[s.to_json() for s in comp.inputs],
        outputs=[dict(name=k, shape=list(v.shape[1:]), dtype=str(v.dtype))
                 for k, v in p_out.items()],
        files=files, checks_data=f"checks/{name}.npz", metadata=comp.metadata)
  _write_manifest(staging, manifest)

  reports = check_lib.check_bundle(staging, log=log)
  manifest["checks"] = {r.file: r.to_json() for r in reports}
  _write_manifest(staging, manifest)
  failed = [r for r in reports if not r.ok]
  if failed and not force:
    lines = [f"{r.file}: [{f.check}] {f.message}" for r in failed for f in r.errors]
    shutil.rmtree(staging, ignore_errors=True)
    raise BundleCheckError("bundle not written, checks failed (use --force to write anyway):\n  "
                           + "\n  ".join(lines))
  shutil.rmtree(out, ignore_errors=True)
  os.replace(staging, out)
  return manifest


class BundleCheckError(RuntimeError):
  pass


def _write_manifest(directory: str, manifest: dict) -> None:
  with open(os.path.join(directory, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description="Export a TFLite bundle for Android.")
  parser.add_argument("--config", help="configs/X.py:ARGS (fresh weights when no --workdir)")
  parser.add_argument("--workdir", help="diffusion run to export (EMA weights by default)")
  parser.add_argument("--step", type=int)
  parser.add_argument("--noema", action="store_true", help="raw params instead of EMA")
  parser.add_argument("--decoder_from", help="light-decoder run (configs/vae_light_decoder.py) "
                      "of the same VAE: export its decoder instead of the VAE's")
  parser.add_argument("--out", required=True)
  parser.add_argument("--precisions", default="fp32,fp16,int8")
  parser.add_argument("--components", default="text_encoder,unet_onestep,unet,decoder")
  parser.add_argument("--image_size", type=int)
  parser.add_argument("--num_representative", type=int, default=16)
  parser.add_argument("--prompt", default=DEFAULT_PROMPT)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--force", action="store_true")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from tflite_export import convert as conv  # pylint: disable=g-import-not-at-top
  precisions = [p for p in args.precisions.split(",") if p]
  names = [c for c in args.components.split(",") if c]
  kw = dict(names=names, image_size=args.image_size, num_representative=args.num_representative)
  t0 = time.time()
  if args.workdir:
    try:
      comps, ld, config, step = conv.components_from_workdir(
          args.workdir, step=args.step, use_ema=not args.noema, decoder_from=args.decoder_from,
          **kw)
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    source = dict(workdir=os.path.abspath(args.workdir), step=step,
                  params="params" if args.noema else "ema_params")
    if getattr(ld, "decoder_source", None):
      source["decoder"] = ld.decoder_source
  elif args.decoder_from:
    parser.error("--decoder_from needs --workdir (the diffusion run whose VAE it was distilled "
                 "against)")
  elif args.config:
    from md_jax import config_loading  # pylint: disable=g-import-not-at-top
    config = config_loading.load_config(args.config)
    comps, ld = conv.components_from_config(config, seed=args.seed, **kw)
    config = ld.config  # what the graphs were built from (float32 compute)
    source = dict(config=args.config, params=f"fresh random weights (seed {args.seed})")
  else:
    parser.error("give --workdir (a trained run) or --config (fresh weights)")
  try:
    manifest = write_bundle(args.out, comps, ld, config, precisions=precisions,
                            prompt=args.prompt, seed=args.seed, source=source, force=args.force)
  except BundleCheckError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  bad = [k for k, r in manifest["checks"].items() if not r["ok"]]
  print(f"wrote {args.out} in {time.time() - t0:.0f} s"
        + (f" (FORCED with failing checks: {bad})" if bad else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
