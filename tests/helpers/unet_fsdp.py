"""FSDP placement of the MD UNet's parameters on 8 fake CPU devices (mesh data=1, fsdp=8).

Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 from the repo root.
Prints one JSON line:
- ``paper``: the paper-size MD UNet, shardings computed from its abstract params (nothing
  allocated): per kernel of >= 2**20 elements, its size and its shard's size;
- ``allocated``: a narrower UNet that still holds such kernels, created by a jit with
  ``out_shardings`` (as the train loop creates state; zeros stand in for the random init, whose
  per-shape PRNG programs take a minute to compile here) on the 8 devices: per such kernel, its
  size and the shapes of its addressable shards.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp

from md_jax import config_base
from md_jax.config_loading import load_config
from md_jax.models import unet as unet_lib
from md_jax.models.layers import KeyStream
from md_jax.train import sharding as shd
from md_jax.train.state import ModelSpec

BIG = 2 ** 20


def _flat(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shardings(unet_cfg, mesh, abstract_only=False):
  # KeyStream: a ~10x faster abstract build where the init itself is never run.
  spec = ModelSpec("unet", lambda rngs: unet_lib.UNet(
      unet_cfg, rngs=KeyStream(0) if abstract_only else rngs))
  rules = config_base.base_config().sharding_rules
  return spec, shd.tree_shardings(spec.abstract_params, spec.logical, rules, mesh)


def main():
  assert jax.device_count() == 8, jax.devices()
  mesh = shd.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))

  spec, sh = shardings(load_config("configs/md.py:512").unet, mesh, abstract_only=True)
  abstract, flat_sh = _flat(spec.abstract_params), _flat(sh)
  paper = {k: [math.prod(x.shape), math.prod(flat_sh[k].shard_shape(x.shape))]
           for k, x in abstract.items() if math.prod(x.shape) >= BIG}

  small = unet_lib.default_config("md")
  # One SPConv + one SA/CA/FF layer at 1024 and the 3x3 upsampling conv there: the kinds of
  # kernel of >= 2**20 elements the paper's model has.
  small.update(dict(channels=(8, 16, 1024), down_blocks=(1, 1, 1), up_blocks=(2, 2, 0),
                    down_depth=(0, 0, 1), up_depth=(0, 0, 0), time_embed_dim=32,
                    norm_groups=8))
  spec, sh = shardings(small, mesh)
  params = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                        spec.abstract_params), out_shardings=sh)()
  allocated = {}
  for k, x in _flat(params).items():
    if x.size >= BIG:
      allocated[k] = dict(size=int(x.size), devices=len({s.device for s in x.addressable_shards}),
                          shards=[list(s.data.shape) for s in x.addressable_shards],
                          indices=sorted({str(s.index) for s in x.addressable_shards}))
  print(json.dumps(dict(paper=paper, allocated=allocated)))


if __name__ == "__main__":
  main()
