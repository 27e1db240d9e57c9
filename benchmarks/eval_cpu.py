"""What the evaluation networks add per image: the FID Inception and a full-size CLIP image tower.

  python benchmarks/eval_cpu.py [--clip vit-g-14,vit-l-14] [--batch 4] [--runs 3] [--image 512]

Jitted JAX forwards, fp32, random weights at the real sizes (the numbers do not depend on the
weights): Inception-v3 pool features from --image px inputs (the 299 px resize included), and
CLIP's image tower + projection at 224 px (ViT-g/14 as OpenCLIP's LAION-2B model that the paper
uses: width 1408, 40 layers, MLP 6144; ViT-L/14: width 1024, 24 layers). Prints compile time and
the median seconds per image over --runs timed calls after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VISION = {
    "vit-g-14": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=40,
                     num_attention_heads=16, patch_size=14, hidden_act="gelu", projection_dim=1024),
    "vit-l-14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, patch_size=14, hidden_act="quick_gelu",
                     projection_dim=768),
}


def _time(fn, runs: int) -> tuple[float, float]:
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--clip", default="vit-g-14,vit-l-14")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--image", type=int, default=512)
  p.add_argument("--skip_inception", action="store_true")
  args = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from md_jax.evaluators import fid  # pylint: disable=g-import-not-at-top
  from md_jax.models import clip_vision  # pylint: disable=g-import-not-at-top
  from md_jax.models.layers import Dense, KeyStream  # pylint: disable=g-import-not-at-top

  print(f"devices: {jax.devices()}, cores: {os.cpu_count()}, batch {args.batch}")
  rng = np.random.default_rng(0)
  if not args.skip_inception:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: fid.InceptionV3(rngs=KeyStream(0))))
    state = jax.jit(lambda: nnx.split(fid.InceptionV3(rngs=KeyStream(0)))[1])()
    x = jnp.asarray(rng.uniform(0, 1, (args.batch, args.image, args.image, 3)), jnp.float32)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    first, med = _time(lambda: fwd(state, x).block_until_ready(), args.runs)
    print(f"inception ({args.image}px -> 299): first call {first:.1f} s, "
          f"{med / args.batch * 1000:.0f} ms/image")
  for name in [c for c in args.clip.split(",") if c]:
    v = dict(VISION[name])
    proj = v.pop("projection_dim")
    vcfg = ml_collections.ConfigDict(dict(v, image_size=224, num_channels=3, layer_norm_eps=1e-5))

    def build(vcfg=vcfg, proj=proj):
      vision = clip_vision.CLIPVisionTransformer(vcfg, rngs=KeyStream(1))
      head = Dense(vcfg.hidden_size, proj, use_bias=False, rngs=KeyStream(2))
      return vision, head

    with nnx.use_eager_sharding(False):
      graphdef, _ = nnx.split(nnx.eval_shape(build))
      state = jax.jit(lambda: nnx.split(build())[1])()
    n_params = sum(a.size for a in jax.tree.leaves(state))
    x = jnp.asarray(rng.normal(size=(args.batch, 224, 224, 3)), jnp.float32)

    def apply(s, x):
      vision, head = nnx.merge(graphdef, s)
      return head(vision(x)[1])

    fwd = jax.jit(apply)
    first, med = _time(lambda: fwd(state, x).block_until_ready(), args.runs)
    print(f"CLIP {name} image tower ({n_params / 1e6:.0f}M params): first call {first:.1f} s, "
          f"{med / args.batch:.2f} s/image")
    del state


if __name__ == "__main__":
  main()
