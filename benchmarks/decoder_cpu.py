"""VAE decoders on this CPU: our full decoder, our light decoder (JAX, jitted) and SD's VAE
decoder (diffusers AutoencoderKL, PyTorch), 512x512 output, all in one process.

``python benchmarks/decoder_cpu.py [--runs 3] [--threads 2]``

Random weights everywhere (nothing is downloaded), batch 1, fp32. Ours decode a 64x64x8 latent
(configs/vae.py: SD-like widths, f=8, c=8; configs/vae_light_decoder.py: the pruned decoder);
SD's decoder a 64x64x4 latent, built from the SD VAE config written out below (post_quant_conv
included, as SD runs it), under torch.inference_mode with torch.set_num_threads. The process is
pinned to `--threads` cores so JAX gets the same budget (XLA:CPU has no thread-count flag).
After one warm-up call each (JAX's includes compilation), timed calls alternate between the
three and the median of `--runs` is reported, then one JSON line with the medians, parameter
counts and the ratios to SD (paper sec. 3.5: the light decoder is 3x faster than SD's).
Needs the `bench` extra (torch, diffusers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Run as a script from a checkout: import this checkout's md_jax and configs.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# SD's VAE (stable-diffusion-v1-5, vae/config.json), written out so nothing is fetched.
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def bench_ours(config_spec: str, seed: int = 0):
  """(info, call): our jitted decoder on a 64x64xc latent, warmed up (compiled)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from md_jax.config_loading import load_config  # pylint: disable=g-import-not-at-top
  from md_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from md_jax.models.layers import KeyStream  # pylint: disable=g-import-not-at-top

  config = load_config(config_spec)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: vae_lib.Decoder(config.vae, rngs=KeyStream(0)))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)

  def draw(x):
    # numpy weights: an on-device random init would compile one PRNG program per shape.
    fan_in = max(int(np.prod(x.shape[:-1])), 1)
    return jnp.asarray((rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype))

  state = jax.tree.map(draw, state)
  params = sum(int(x.size) for x in jax.tree.leaves(state))
  c = int(config.vae.latent_channels)
  z = jnp.asarray(rng.standard_normal((1, 64, 64, c)).astype(np.float32))
  decode = jax.jit(lambda s, z: nnx.merge(graphdef, s)(z))
  call = lambda: decode(state, z).block_until_ready()
  t0 = time.perf_counter()
  out = call()
  warmup = time.perf_counter() - t0
  return dict(warmup_s=warmup, params=params, latent=[64, 64, c], out=list(out.shape[1:]),
              channels=list(config.vae.decoder_channels or config.vae.channels),
              resblocks_per_level=int(config.vae.decoder_res_blocks
                                      if config.vae.decoder_res_blocks is not None
                                      else config.vae.num_res_blocks) + 1), call


def bench_sd(threads: int, seed: int = 0):
  """(info, call): SD's VAE decoder (post_quant_conv + decoder) under inference_mode."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  vae = AutoencoderKL(**SD_VAE).eval()
  params = (sum(p.numel() for p in vae.decoder.parameters())
            + sum(p.numel() for p in vae.post_quant_conv.parameters()))
  z = torch.randn(1, 4, 64, 64)

  def call():
    with torch.inference_mode():
      return vae.decode(z).sample

  t0 = time.perf_counter()
  out = call()
  warmup = time.perf_counter() - t0
  return dict(warmup_s=warmup, params=params, torch=torch.__version__,
              out=list(out.shape[1:])), call


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--full-config", default=os.path.join(REPO, "configs", "vae.py"))
  parser.add_argument("--light-config",
                      default=os.path.join(REPO, "configs", "vae_light_decoder.py"))
  args = parser.parse_args(argv)

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) > args.threads:
    if "jax" in sys.modules:
      print("warning: jax was imported before pinning; its pools may be wider", file=sys.stderr)
    os.sched_setaffinity(0, cores[:args.threads])
  print(f"cores: {sorted(os.sched_getaffinity(0))} of {os.cpu_count()}", flush=True)

  infos, calls = {}, {}
  infos["full"], calls["full"] = bench_ours(args.full_config)
  infos["light"], calls["light"] = bench_ours(args.light_config)
  infos["sd"], calls["sd"] = bench_sd(args.threads)
  times = {k: [] for k in calls}
  # Alternate the timed calls so a change in machine load hits all three alike.
  for _ in range(args.runs):
    for k, call in calls.items():
      times[k].append(_timed(call))
  result = dict(threads=args.threads, runs=args.runs)
  names = dict(full="ours, full decoder", light="ours, light decoder",
               sd=f"SD VAE decoder (diffusers, torch {infos['sd']['torch']})")
  for k in calls:
    med = statistics.median(times[k])
    result[f"{k}_median_s"] = med
    result[f"{k}_times_s"] = times[k]
    result[f"{k}_params"] = infos[k]["params"]
    extra = (f", widths {infos[k]['channels']}, {infos[k]['resblocks_per_level']} resblocks/level"
             if k != "sd" else "")
    print(f"{names[k]} ({infos[k]['params'] / 1e6:.2f}M params{extra}, out "
          f"{infos[k]['out']}): median {med:.3f} s over {args.runs} runs (warm-up "
          f"{infos[k]['warmup_s']:.1f} s)", flush=True)
  result["full_over_sd"] = result["full_median_s"] / result["sd_median_s"]
  result["light_over_sd"] = result["light_median_s"] / result["sd_median_s"]
  result["light_over_full"] = result["light_median_s"] / result["full_median_s"]
  print(f"ratio full / SD:  {result['full_over_sd']:.3f}")
  print(f"ratio light / SD: {result['light_over_sd']:.3f} (target <= 0.33; paper 92 / 285 ms)")
  print(f"ratio light / full: {result['light_over_full']:.3f}")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
