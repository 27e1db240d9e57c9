"""SD-like KL autoencoder with f = 2**(len(channels)-1) and `latent_channels` (paper 3.5).

`VAE(cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32)`, `Encoder(cfg, ...)`,
`Decoder(cfg, ...)`, with `cfg` a ConfigDict (defaults in `default_config()`):

  channels           encoder widths per level, e.g. (128, 256, 512, 512) -> f = 8
  num_res_blocks     encoder resblocks per level (decoder: decoder_res_blocks + 1 per level)
  latent_channels    c of the latent (8)
  norm_groups        GroupNorm groups (32)
  mid_attention      single-head self-attention between the two mid resblocks
  decoder_channels   None = same as `channels`; a narrower tuple makes the light decoder
  decoder_res_blocks None = num_res_blocks
  in_channels        (optional, default 3) image channels

Images are NHWC in [-1, 1]. `encode(x) -> (mean, logvar)` (logvar clipped to [-30, 20]),
`decode(z) -> x`, `__call__(x, rng) -> (recon, mean, logvar)` with z = mean +
exp(0.5 logvar) * N(0, I). Outputs are float32. Encoder and decoder are separate modules
(`vae.encoder`, `vae.decoder`) so a light decoder can be trained against a frozen encoder.

Choices: no quant_conv / post_quant_conv 1x1 layers (a 1x1 conv right after conv_out / before
conv_in adds nothing the neighbouring conv cannot express); GroupNorm eps 1e-6 as SD's VAE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from md_jax.models.attention import Attention
from md_jax.models.blocks import Downsample, FullConv, Upsample
from md_jax.models.layers import Conv2d, GroupNorm, swish

Array = jax.Array

_EPS = 1e-6


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      channels=(128, 256, 512, 512),
      num_res_blocks=2,
      latent_channels=8,
      norm_groups=32,
      mid_attention=True,
      # Typed placeholders, so --config.vae.decoder_channels=(...) overrides the None default.
      decoder_channels=ml_collections.FieldReference(None, field_type=tuple),
      decoder_res_blocks=ml_collections.FieldReference(None, field_type=int),
      in_channels=3,
  ))


def tiny_config() -> ml_collections.ConfigDict:
  cfg = default_config()
  cfg.channels = (8, 16, 16, 16)
  cfg.num_res_blocks = 1
  cfg.latent_channels = 4
  cfg.norm_groups = 4
  return cfg


def sample_posterior(mean: Array, logvar: Array, rng: jax.Array) -> Array:
  """z = mean + exp(logvar / 2) * N(0, I): the latents the VAE decodes in training and every
  later stage (diffusion, light decoder, latent statistics) reads."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def downsample_factor(cfg) -> int:
  return 2 ** (len(cfg.channels) - 1)


class MidAttention(nnx.Module):
  """GN + single-head self-attention over all positions + residual (SD's VAE AttnBlock)."""

  def __init__(self, channels: int, *, norm_groups: int, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm = GroupNorm(channels, num_groups=norm_groups, eps=_EPS, **kw)
    self.attn = Attention(channels, num_heads=1, head_dim=channels, qkv_bias=True, **kw)

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    y = self.attn(self.norm(x).reshape(b, h * w, c))
    return x + y.reshape(b, h, w, c)


class _Mid(nnx.Module):

  def __init__(self, channels: int, *, norm_groups: int, attention: bool, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.block_1 = FullConv(channels, channels, norm_groups=norm_groups, eps=_EPS, **kw)
    self.attn = (MidAttention(channels, norm_groups=norm_groups, **kw) if attention else None)
    self.block_2 = FullConv(channels, channels, norm_groups=norm_groups, eps=_EPS, **kw)

  def __call__(self, x: Array) -> Array:
    x = self.block_1(x)
    if self.attn is not None:
      x = self.attn(x)
    return self.block_2(x)


class _Level(nnx.Module):

  def __init__(self, blocks, resample):
    self.blocks = nnx.List(blocks)
    self.resample = resample


class Encoder(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    ch = tuple(cfg.channels)
    g = cfg.norm_groups
    self.dtype = dtype
    self.conv_in = Conv2d(cfg.get("in_channels", 3), ch[0], 3, **kw)
    cur = ch[0]
    levels = []
    for l, c in enumerate(ch):
      blocks = []
      for _ in range(cfg.num_res_blocks):
        blocks.append(FullConv(cur, c, norm_groups=g, eps=_EPS, **kw))
        cur = c
      levels.append(_Level(blocks, Downsample(cur, **kw) if l < len(ch) - 1 else None))
    self.levels = nnx.List(levels)
    self.mid = _Mid(cur, norm_groups=g, attention=cfg.mid_attention, **kw)
    self.norm_out = GroupNorm(cur, num_groups=g, eps=_EPS, **kw)
    self.conv_out = Conv2d(cur, 2 * cfg.latent_channels, 3, **kw)

  def __call__(self, x: Array) -> tuple[Array, Array]:
    h = self.conv_in(x.astype(self.dtype))
    for level in self.levels:
      for block in level.blocks:
        h = block(h)
      if level.resample is not None:
        h = level.resample(h)
    h = self.conv_out(swish(self.norm_out(self.mid(h)))).astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


class Decoder(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    ch = tuple(cfg.decoder_channels or cfg.channels)
    if len(ch) != len(cfg.channels):
      raise ValueError("vae.decoder_channels must have as many levels as vae.channels")
    res_blocks = cfg.decoder_res_blocks
    res_blocks = cfg.num_res_blocks if res_blocks is None else res_blocks
    g = cfg.norm_groups
    self.dtype = dtype
    cur = ch[-1]
    self.conv_in = Conv2d(cfg.latent_channels, cur, 3, **kw)
    self.mid = _Mid(cur, norm_groups=g, attention=cfg.mid_attention, **kw)
    levels = []  # in execution order: innermost (lowest resolution) first
    for l in reversed(range(len(ch))):
      blocks = []
      for _ in range(res_blocks + 1):
        blocks.append(FullConv(cur, ch[l], norm_groups=g, eps=_EPS, **kw))
        cur = ch[l]
      levels.append(_Level(blocks, Upsample(cur, **kw) if l > 0 else None))
    self.levels = nnx.List(levels)
    self.norm_out = GroupNorm(cur, num_groups=g, eps=_EPS, **kw)
    self.conv_out = Conv2d(cur, cfg.get("in_channels", 3), 3, **kw)

  def __call__(self, z: Array) -> Array:
    h = self.mid(self.conv_in(z.astype(self.dtype)))
    for level in self.levels:
      for block in level.blocks:
        h = block(h)
      if level.resample is not None:
        h = level.resample(h)
    return self.conv_out(swish(self.norm_out(h))).astype(jnp.float32)


class VAE(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.encoder = Encoder(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.decoder = Decoder(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def encode(self, x: Array) -> tuple[Array, Array]:
    return self.encoder(x)

  def decode(self, z: Array) -> Array:
    return self.decoder(z)

  def __call__(self, x: Array, rng: jax.Array) -> tuple[Array, Array, Array]:
    mean, logvar = self.encode(x)
    return self.decode(sample_posterior(mean, logvar, rng)), mean, logvar
