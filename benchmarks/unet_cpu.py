"""MD UNet forward (JAX, jitted) against SD1.5's UNet (diffusers, PyTorch) on this CPU.

``python benchmarks/unet_cpu.py [--runs 5] [--threads 2] [--config configs/md.py:512]``

Both run in one process, batch 1, fp32, random weights (nothing is downloaded): MD on a 64x64x8
latent, SD1.5 on 64x64x4, both with a 77x768 text context. SD1.5's UNet2DConditionModel is built
from its published config written out below, in inference mode with torch.set_num_threads.
The process is pinned to that many cores so JAX gets the same budget. After one
warm-up call each (JAX's includes compilation), the median of `--runs` timed calls is reported,
then one JSON line with both medians and the ratio MD / SD1.5 (paper: 0.46 by FLOPs).
Needs the `bench` extra (torch, diffusers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Run as a script from a checkout: import this checkout's md_jax.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# SD1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json), written out so nothing is
# fetched; diffusers fills the rest with the same defaults that config leaves implicit.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
)


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def bench_md(config_spec: str, seed: int = 0):
  """(info, call): the jitted forward, warmed up (compiled)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from md_jax.config_loading import load_config  # pylint: disable=g-import-not-at-top
  from md_jax.models.layers import count_params  # pylint: disable=g-import-not-at-top
  from md_jax.tools.model_stats import abstract_unet, input_shapes  # pylint: disable=g-import-not-at-top

  config = load_config(config_spec)
  model = abstract_unet(config.unet)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)

  def draw(x):
    # numpy weights: an on-device random init would compile one PRNG program per shape.
    fan_in = max(int(np.prod(x.shape[:-1])), 1)
    return jax.numpy.asarray((rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype))

  state = jax.tree.map(draw, state)
  latent, context = input_shapes(config)
  x = rng.standard_normal((1, *latent)).astype(np.float32)
  t = np.array([500.0], np.float32)
  ctx = rng.standard_normal((1, *context)).astype(np.float32)
  forward = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
  call = lambda: forward(state, x, t, ctx).block_until_ready()
  t0 = time.perf_counter()
  call()
  warmup = time.perf_counter() - t0
  return dict(warmup_s=warmup, params=count_params(state), latent=list(latent)), call


def bench_sd15(threads: int, seed: int = 0):
  """(info, call): SD1.5's forward under inference_mode, warmed up."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  unet = UNet2DConditionModel(**SD15_UNET).eval()
  params = sum(p.numel() for p in unet.parameters())
  x = torch.randn(1, 4, 64, 64)
  t = torch.tensor([500])
  ctx = torch.randn(1, 77, 768)
  def call():
    with torch.inference_mode():
      unet(x, t, encoder_hidden_states=ctx)

  t0 = time.perf_counter()
  call()
  warmup = time.perf_counter() - t0
  return dict(warmup_s=warmup, params=params, torch=torch.__version__), call


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--config", default="configs/md.py:512")
  parser.add_argument("--skip-sd15", action="store_true", help="time MD only")
  args = parser.parse_args(argv)

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # The same core budget for both: XLA:CPU has no thread-count flag, so the process is pinned
  # to `threads` cores (before jax starts its pools); torch also gets set_num_threads.
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) > args.threads:
    if "jax" in sys.modules:
      print("warning: jax was imported before pinning; its pools may be wider", file=sys.stderr)
    os.sched_setaffinity(0, cores[:args.threads])
  print(f"cores: {sorted(os.sched_getaffinity(0))} of {os.cpu_count()}", flush=True)

  md, md_call = bench_md(args.config)
  sd, sd_call = (None, None) if args.skip_sd15 else bench_sd15(args.threads)
  # Alternate the timed calls so a change in machine load hits both alike.
  md_times, sd_times = [], []
  for _ in range(args.runs):
    md_times.append(_timed(md_call))
    if sd_call is not None:
      sd_times.append(_timed(sd_call))
  result = dict(md_median_s=statistics.median(md_times), md_times_s=md_times,
                md_params=md["params"], config=args.config, threads=args.threads,
                runs=args.runs)
  print(f"MD ({args.config}, {md['params'] / 1e6:.1f}M params, latent {md['latent']}): "
        f"median {result['md_median_s']:.3f} s over {args.runs} runs (warm-up incl. compile "
        f"{md['warmup_s']:.1f} s)", flush=True)
  if sd is not None:
    result.update(sd15_median_s=statistics.median(sd_times), sd15_times_s=sd_times,
                  sd15_params=sd["params"])
    result["ratio"] = result["md_median_s"] / result["sd15_median_s"]
    print(f"SD1.5 (diffusers, torch {sd['torch']}, {sd['params'] / 1e6:.1f}M params, latent "
          f"[64, 64, 4]): median {result['sd15_median_s']:.3f} s over {args.runs} runs")
    print(f"ratio MD / SD1.5: {result['ratio']:.3f} (target <= 0.46)")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
