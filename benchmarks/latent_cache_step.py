"""One diffusion train step with the frozen VAE encoder in the step vs cached posteriors.

  python benchmarks/latent_cache_step.py [--stage lowres|highres] [--size full|smoke|tiny]
      [--runs 10] [--batch 32] [--set KEY=VALUE ...]

Defaults are the quickstart's stages (configs/shapes.py:STAGE,full at batch 32: 64 px and 128 px
images). Same state and records both ways: the cached batch carries the encoder's own posterior
as latent_mean / latent_logvar. Prints each path's compile time and median step time, their
ratio, what encoding one image costs when the cache is built (encoder alone, same batch), and
from that how many passes over the records a run must make before the cache pays for itself.
Random weights throughout (a random VAE stands in for the trained one: it does not change the
timing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--stage", choices=("lowres", "highres"), default="highres")
  p.add_argument("--size", choices=("full", "smoke", "tiny"), default="full")
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, JSON value, e.g. --set unet.remat=true (repeatable)")
  return p.parse_args()


def _median_time(fn, runs):
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn())  # warm-up
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  args = _parse()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from md_jax import config_loading  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top

  config = config_loading.load_config(f"configs/shapes.py:{args.stage},{args.size}")
  with config.unlocked():
    config.global_batch_size = args.batch
    config.progress_bar = False
    try:
      config_loading.apply_overrides(config, args.set, flag="--set")
    except KeyError as e:
      raise SystemExit(str(e)) from None
  trainer = loop.Trainer(config, tempfile.mkdtemp())
  obj = trainer.objective
  sh = trainer.frozen_shardings
  channels = int(config.vae.latent_channels)
  vae = jax.jit(obj.ld.vae.init, out_shardings=sh["vae"])(jax.random.key(0))
  frozen = dict(vae=vae, latent_shift=jnp.zeros((channels,)), latent_scale=jnp.ones((channels,)))
  if "text" in sh:  # a frozen encoder (config.text.frozen=True); else it is a trained group
    frozen["text"] = jax.jit(obj.ld.text.init, out_shardings=sh["text"])(
        jax.random.key(int(config.text.seed)))
  obj.init_frozen = lambda _: frozen
  state = trainer.init_state()
  local = obj.host_batch(next(obj.data_iterator(0, 1)))
  encode = jax.jit(lambda p, x: obj.ld.vae.bind(p).encode(x))
  images = jnp.asarray(local["image"])
  mean, logvar = encode(vae, images)
  cached = {k: v for k, v in local.items() if k != "image"}
  cached.update(latent_mean=mean, latent_logvar=logvar)
  batches = {"encoder in step": local, "cached posteriors": cached}
  results = {}
  for name, batch in batches.items():
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    step = jax.jit(trainer._train_step)  # pylint: disable=protected-access  (no donation)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    run = lambda c=compiled, b=batch: c(state, b)
    t = _median_time(run, args.runs)
    results[name] = (compile_s, t, float(compiled(state, batch)[1]["loss"]))
  encode_s = _median_time(lambda: encode(vae, images), args.runs)
  size = int(config.data.image_size)
  sets = "".join(f" --set {x}" for x in args.set)
  print(f"diffusion train step, configs/shapes.py:{args.stage},{args.size}{sets}, "
        f"batch {args.batch}, "
        f"{size} px images -> latents {obj.ld.latent_shape(size)}, UNet "
        f"{obj.ld.unet.num_params:,} params; medians of {args.runs} "
        f"({jax.default_backend()}, {jax.device_count()} device(s))")
  print(f"load average (1/5/15 min) {os.getloadavg()}")
  for name, (c, t, loss) in results.items():
    print(f"{name:18s}: step {t * 1e3:8.1f} ms  (compile {c:5.1f} s, loss {loss:.6f})")
  enc, cache = results["encoder in step"][1], results["cached posteriors"][1]
  saved = enc - cache
  print(f"speed-up with the cache: {enc / cache:.2f}x ({saved * 1e3:.1f} ms per step)")
  per_image = encode_s / args.batch
  print(f"building the cache: {per_image * 1e3:.2f} ms per image (encoder alone, batch "
        f"{args.batch})")
  if saved > 0:
    # A run of S steps over N records saves S * saved and pays N * per_image: it gains once
    # S * batch / N (passes over the records) exceeds per_image * batch / saved.
    print(f"the cache pays for itself after {per_image * args.batch / saved:.2f} passes over "
          "the cached records")
  return 0


if __name__ == "__main__":
  sys.exit(main())
