"""One diffusion train step with the frozen text encoder in the step vs cached embeddings.

  python benchmarks/text_cache_step.py [--text tiny|vit-l14] [--runs 10] [--batch 8]

`--text tiny` is the MD-tiny run as the tests use it (configs/shapes.py:lowres,tiny: 1-layer x 32
text tower, 16 tokens); `--text vit-l14` swaps in the CLIP ViT-L/14 text tower (12 x 768, 77
tokens, UNet context_dim 768), which is what the cache saves in a real run. Same state and images
both ways: the cached batch carries the encoder's own output as `text_embedding`. Prints the
compile time and the median step time of each path and their ratio. Random weights throughout
(a random VAE stands in for the trained one: it does not change the timing).
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
  p.add_argument("--text", choices=("tiny", "vit-l14"), default="tiny")
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--batch", type=int, default=8)
  return p.parse_args()


def main():
  args = _parse()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from md_jax import config_loading  # pylint: disable=g-import-not-at-top
  from md_jax.models import text_encoder as te  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top

  config = config_loading.load_config("configs/shapes.py:lowres,tiny")
  with config.unlocked():
    config.global_batch_size = args.batch
    config.progress_bar = False
    config.text.frozen = True  # a cache holds a frozen encoder's embeddings
    if args.text == "vit-l14":
      vit = te.default_config()
      for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings"):
        config.text[k] = vit[k]
      config.data.max_length = 77
      config.unet.context_dim = vit.hidden_size
  trainer = loop.Trainer(config, tempfile.mkdtemp())
  obj = trainer.objective
  sh = trainer.frozen_shardings
  channels = int(config.vae.latent_channels)
  text = jax.jit(obj.ld.text.init, out_shardings=sh["text"])(jax.random.key(int(config.text.seed)))
  vae = jax.jit(obj.ld.vae.init, out_shardings=sh["vae"])(jax.random.key(0))
  obj.init_frozen = lambda _: dict(text=text, vae=vae, latent_shift=jnp.zeros((channels,)),
                                   latent_scale=jnp.ones((channels,)))
  state = trainer.init_state()
  local = obj.host_batch(next(obj.data_iterator(0, 1)))
  local["text_embedding"] = np.asarray(
      jax.jit(obj.ld.encode_text)(state["frozen"], local["input_ids"]))
  batches = {"encoder in step": {k: v for k, v in local.items() if k != "text_embedding"},
             "cached embeddings": local}
  results = {}
  for name, batch in batches.items():
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    step = jax.jit(trainer._train_step)  # pylint: disable=protected-access  (no donation)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(state, batch))  # warm-up
    times = []
    for _ in range(args.runs):
      t0 = time.perf_counter()
      out = compiled(state, batch)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t0)
    results[name] = (compile_s, statistics.median(times), float(out[1]["loss"]))
  print(f"diffusion train step, configs/shapes.py:lowres,tiny, batch {args.batch}, text tower "
        f"{config.text.num_hidden_layers} x {config.text.hidden_size}, "
        f"{config.data.max_length} tokens; medians of {args.runs} steps "
        f"({jax.default_backend()}, {jax.device_count()} device(s))")
  print(f"load average (1/5/15 min) {os.getloadavg()}")
  for name, (c, t, loss) in results.items():
    print(f"{name:18s}: step {t * 1e3:8.1f} ms  (compile {c:5.1f} s, loss {loss:.6f})")
  enc, cached = results["encoder in step"][1], results["cached embeddings"][1]
  print(f"speed-up with the cache: {enc / cached:.2f}x ({(enc - cached) * 1e3:.1f} ms per step)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
