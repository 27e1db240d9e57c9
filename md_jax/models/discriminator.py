"""Patch discriminator for the VAE's adversarial loss (paper sec. 3.5).

`PatchDiscriminator(cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32)` with `cfg` a
ConfigDict holding `channels` (widths of the stride-2 stages, e.g. (64, 128, 256)) and
`norm_groups`. `__call__(x (B, H, W, C) in [-1, 1]) -> logits (B, H/2^n, W/2^n)`: one real/fake
logit per patch, each seeing a receptive field of roughly 2^(n+2) pixels, so the loss judges
local texture and edge sharpness (what pixel losses blur) and not global layout.

Structure (PatchGAN-like, as in SD's VAE training): a stride-2 conv + LeakyReLU, then per later
stage a stride-2 conv + GroupNorm + LeakyReLU, then a 3x3 conv to one logit channel. GroupNorm
rather than BatchNorm so the output of one example never depends on the others in the batch
(which also keeps it independent of how the batch is sharded).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from md_jax.models.layers import Conv2d, GroupNorm

Array = jax.Array


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(channels=(64, 128, 256), norm_groups=32, in_channels=3))


def _leaky(x: Array) -> Array:
  return jax.nn.leaky_relu(x, 0.2)


class PatchDiscriminator(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    chans = tuple(int(c) for c in cfg.channels)
    if not chans:
      raise ValueError("discriminator channels must name at least one stage")
    cin = int(cfg.get("in_channels", 3))
    self.conv_in = Conv2d(cin, chans[0], stride=2, **kw)
    self.convs = nnx.List([Conv2d(a, b, stride=2, use_bias=False, **kw)
                           for a, b in zip(chans[:-1], chans[1:])])
    self.norms = nnx.List([GroupNorm(b, num_groups=min(int(cfg.norm_groups), b), **kw)
                           for b in chans[1:]])
    self.conv_out = Conv2d(chans[-1], 1, **kw)

  def __call__(self, x: Array) -> Array:
    h = _leaky(self.conv_in(x))
    for conv, norm in zip(self.convs, self.norms):
      h = _leaky(norm(conv(h)))
    return self.conv_out(h)[..., 0].astype(jnp.float32)
