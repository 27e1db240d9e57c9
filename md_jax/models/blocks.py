"""UNet/VAE building blocks: FullConv, SPConv, GLU feed-forward, transformer layers.

Constructors take explicit keyword arguments plus `rngs`, `dtype`, `param_dtype`:

- `FullConv(in_ch, out_ch, *, temb_dim=None, norm_groups=32, eps=1e-5)`: the SD residual block
  (GN, swish, conv3x3, + time projection, GN, swish, conv3x3, 1x1 skip when channels change).
  temb_dim=None drops the time projection (VAE).
- `SPConv(in_ch, out_ch, *, temb_dim, expansion=4, norm_groups=32, eps=1e-5)`: ConvNeXt-like
  separable block (paper Fig. 2).
- `FeedForward(dim, *, mult=3, activation='swish')`: gated linear unit d -> 2*mult*d -> d.
- `TransformerLayer(dim, *, context_dim, num_heads, head_dim, self_attn, shared_kv,
  attention, ff_mult, ff_activation)`: pre-LN [SA] + CA + FF, each residual.
- `SpatialTransformer(channels, *, depth, context_dim, head_dim, self_attn, shared_kv,
  attention, ff_mult, ff_activation, norm_groups, remat=False)`: GN, proj_in, `depth` layers,
  proj_out, residual (SD's Transformer2DModel with linear projections).
- `Downsample(ch)`: 3x3 stride-2 conv. `Upsample(ch)`: nearest 2x + 3x3 conv.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from md_jax.models.attention import Attention
from md_jax.models.layers import (EMBED, MLP, Conv2d, Dense, DepthwiseConv2d, GroupNorm,
                                  LayerNorm, get_activation, swish, upsample_nearest_2x)

Array = jax.Array


def _call(module, *args):
  return module(*args)


def maybe_remat(module: nnx.Module, *args, enabled: bool):
  """Run `module(*args)`, recomputing its activations in the backward pass when enabled."""
  if not enabled:
    return module(*args)
  return nnx.remat(_call)(module, *args)


class FullConv(nnx.Module):

  def __init__(self, in_channels: int, out_channels: int, *, temb_dim: int | None = None,
               norm_groups: int = 32, eps: float = 1e-5, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.in_channels, self.out_channels = in_channels, out_channels
    self.norm1 = GroupNorm(in_channels, num_groups=norm_groups, eps=eps, **kw)
    self.conv1 = Conv2d(in_channels, out_channels, 3, **kw)
    self.time_proj = (Dense(temb_dim, out_channels, kernel_axes=(EMBED, MLP), **kw)
                      if temb_dim else None)
    self.norm2 = GroupNorm(out_channels, num_groups=norm_groups, eps=eps, **kw)
    self.conv2 = Conv2d(out_channels, out_channels, 3, **kw)
    self.skip = (Conv2d(in_channels, out_channels, 1, **kw)
                 if in_channels != out_channels else None)

  def __call__(self, x: Array, temb: Array | None = None) -> Array:
    h = self.conv1(swish(self.norm1(x)))
    if self.time_proj is not None:
      h = h + self.time_proj(swish(temb))[:, None, None, :]
    h = self.conv2(swish(self.norm2(h)))
    return h + (x if self.skip is None else self.skip(x))


class SPConv(nnx.Module):
  """Separable conv block: DW 3x3 -> +time -> GN -> 1x1 expand -> swish -> 1x1 project.

  Open choices (paper Fig. 2 leaves them):
  - time embedding added right after the depthwise conv, the place SD's resblock adds it (after
    its first conv, before the second norm), and at in_ch width, far cheaper than at e*out_ch;
  - GroupNorm rather than ConvNeXt's LayerNorm, to share the FullConv blocks' normalisation
    (per-sample statistics over space, the same groups config);
  - expansion from the config (default 4, ConvNeXt's inverted-bottleneck ratio);
  - when channels change, the expand conv reads in_ch and a 1x1 conv carries the residual.
  """

  def __init__(self, in_channels: int, out_channels: int, *, temb_dim: int | None,
               expansion: int = 4, norm_groups: int = 32, eps: float = 1e-5, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.in_channels, self.out_channels = in_channels, out_channels
    hidden = expansion * out_channels
    self.dwconv = DepthwiseConv2d(in_channels, 3, **kw)
    self.time_proj = (Dense(temb_dim, in_channels, kernel_axes=(EMBED, MLP), **kw)
                      if temb_dim else None)
    self.norm = GroupNorm(in_channels, num_groups=norm_groups, eps=eps, **kw)
    self.pw_expand = Conv2d(in_channels, hidden, 1, **kw)
    self.pw_project = Conv2d(hidden, out_channels, 1, **kw)
    self.skip = (Conv2d(in_channels, out_channels, 1, **kw)
                 if in_channels != out_channels else None)

  def __call__(self, x: Array, temb: Array | None = None) -> Array:
    h = self.dwconv(x)
    if self.time_proj is not None:
      h = h + self.time_proj(swish(temb))[:, None, None, :]
    h = self.pw_project(swish(self.pw_expand(self.norm(h))))
    return h + (x if self.skip is None else self.skip(x))


def make_conv_block(kind: str, in_channels: int, out_channels: int, *, temb_dim: int | None,
                    norm_groups: int, sep_expansion: int, rngs: nnx.Rngs, dtype, param_dtype):
  kw = dict(temb_dim=temb_dim, norm_groups=norm_groups, rngs=rngs, dtype=dtype,
            param_dtype=param_dtype)
  if kind == "full":
    return FullConv(in_channels, out_channels, **kw)
  if kind == "sep":
    return SPConv(in_channels, out_channels, expansion=sep_expansion, **kw)
  raise ValueError(f"conv block kind {kind!r} not in ('full', 'sep')")


class FeedForward(nnx.Module):
  """Gated linear unit: (value, gate) = split(x W1); act(gate) * value; W2."""

  def __init__(self, dim: int, *, mult: int = 3, activation: str = "swish", rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.activation = activation
    self.proj_in = Dense(dim, 2 * mult * dim, kernel_axes=(EMBED, MLP), **kw)
    self.proj_out = Dense(mult * dim, dim, kernel_axes=(MLP, EMBED), **kw)

  def __call__(self, x: Array) -> Array:
    value, gate = jnp.split(self.proj_in(x), 2, axis=-1)
    return self.proj_out(value * get_activation(self.activation)(gate))


class TransformerLayer(nnx.Module):

  def __init__(self, dim: int, *, context_dim: int, num_heads: int, head_dim: int,
               self_attn: bool = True, shared_kv: bool = True, attention: str = "softmax",
               ff_mult: int = 3, ff_activation: str = "swish", rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    akw = dict(num_heads=num_heads, head_dim=head_dim, kind=attention, **kw)
    if self_attn:
      self.norm1 = LayerNorm(dim, **kw)
      self.attn1 = Attention(dim, shared_kv=shared_kv, **akw)
    else:
      self.norm1 = None
      self.attn1 = None
    self.norm2 = LayerNorm(dim, **kw)
    self.attn2 = Attention(dim, context_dim=context_dim, **akw)
    self.norm3 = LayerNorm(dim, **kw)
    self.ff = FeedForward(dim, mult=ff_mult, activation=ff_activation, **kw)

  def __call__(self, x: Array, context: Array) -> Array:
    if self.attn1 is not None:
      x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class SpatialTransformer(nnx.Module):

  def __init__(self, channels: int, *, depth: int, context_dim: int, head_dim: int,
               self_attn: bool, shared_kv: bool = True, attention: str = "softmax",
               ff_mult: int = 3, ff_activation: str = "swish", norm_groups: int = 32,
               remat: bool = False, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    if channels % head_dim:
      raise ValueError(f"channels {channels} not divisible by head_dim {head_dim}")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.remat = remat
    # SD's transformer GroupNorm uses eps 1e-6.
    self.norm = GroupNorm(channels, num_groups=norm_groups, eps=1e-6, **kw)
    self.proj_in = Dense(channels, channels, kernel_axes=(EMBED, MLP), **kw)
    self.layers = nnx.List([
        TransformerLayer(channels, context_dim=context_dim, num_heads=channels // head_dim,
                         head_dim=head_dim, self_attn=self_attn, shared_kv=shared_kv,
                         attention=attention, ff_mult=ff_mult, ff_activation=ff_activation,
                         **kw)
        for _ in range(depth)
    ])
    self.proj_out = Dense(channels, channels, kernel_axes=(MLP, EMBED), **kw)

  def __call__(self, x: Array, context: Array) -> Array:
    b, h, w, c = x.shape
    y = self.proj_in(self.norm(x).reshape(b, h * w, c))
    for layer in self.layers:
      y = maybe_remat(layer, y, context, enabled=self.remat)
    return x + self.proj_out(y).reshape(b, h, w, c)


class Downsample(nnx.Module):

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.conv = Conv2d(channels, channels, 3, stride=2, rngs=rngs, dtype=dtype,
                       param_dtype=param_dtype)

  def __call__(self, x: Array) -> Array:
    return self.conv(x)


class Upsample(nnx.Module):

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.conv = Conv2d(channels, channels, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: Array) -> Array:
    return self.conv(upsample_nearest_2x(x))
