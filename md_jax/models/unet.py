"""The MobileDiffusion UNet (paper sec. 3, Table 6; DESIGN 2).

`UNet(cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32)`, with `cfg` a ConfigDict whose
fields are (defaults in `default_config()`, the paper's MD):

  in_channels, out_channels    latent channels in and out (8, 8)
  context_dim                  text embedding width (768, CLIP ViT-L/14)
  channels                     per-level widths, e.g. (320, 640, 1024)
  down_blocks, up_blocks       conv blocks per level. Each outer level pushes its input (conv_in's
                               output or the downsampler's) and every down block's output as a
                               skip, and its up blocks pop them: up = down + 1 (SD accounting)
  inner_skips                  False (paper 3.4): the innermost level's down and up blocks are one
                               unified module, a plain stack of down+up layers with no skip
                               concatenations; True: SD accounting at that level too
  down_conv, up_conv           per level 'full' (SD resblock) or 'sep' (SPConv)
  down_depth, up_depth         transformer layers after each conv block (0 = none)
  self_attn                    per level, SA in those transformer layers (CA always present)
  head_dim                     attention head width; heads = channels // head_dim
  num_heads                    (optional, 0 = unset) fixed head count at every level instead;
                               head_dim = channels // num_heads
  ff_mult, ff_activation       GLU expansion and gate nonlinearity ('swish' | 'gelu')
  shared_kv                    self-attention W_K = W_V
  attention                    'softmax' | 'relu'
  sep_expansion                SPConv pointwise expansion
  norm_groups                  GroupNorm groups
  time_embed_dim               width of the time MLP output
  remat                        (optional, default False) nnx.remat around conv blocks and
                               transformer layers

`__call__(x (B,H,W,in_channels), t (B,) float in [0, 1000), context (B,L,context_dim))`
returns (B,H,W,out_channels) in float32 (the loss is taken in float32 whatever the compute
dtype). H and W must be divisible by 2**(levels-1).

Layout: conv_in -> per level: blocks x [conv block (+ transformer)], strided-conv downsample except
at the last level -> per level reversed: blocks x [concat skip -> conv block (+ transformer)],
nearest upsample + conv except at level 0 -> GN, swish, conv_out (zero-init, so the untrained
model predicts 0). The innermost down and up stacks share one resolution and form one unified
module (paper 3.4: "the 5 layers in the middle", as the transformer stack in the middle of UViT,
which the paper builds on): its layers run one after another without skip concatenations and
there is no separate mid block. `inner_skips=True` restores SD's accounting there (the first
innermost up block then concatenates the last down block's output with itself).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from md_jax.models.blocks import (Downsample, FullConv, SpatialTransformer, SPConv, Upsample,
                                  make_conv_block, maybe_remat)
from md_jax.models.attention import Attention
from md_jax.models.layers import (EMBED, MLP, Conv2d, Dense, GroupNorm, swish,
                                  timestep_embedding, zeros_init)

Array = jax.Array


def default_config(variant: str = "md") -> ml_collections.ConfigDict:
  """Paper Table 6: 'md' (MobileDiffusion) or 'md-lite'."""
  cfg = ml_collections.ConfigDict(dict(
      in_channels=8,
      out_channels=8,
      context_dim=768,
      channels=(320, 640, 1024),
      down_blocks=(1, 1, 2),
      up_blocks=(2, 2, 3),
      down_conv=("full", "full", "sep"),
      up_conv=("full", "full", "sep"),
      down_depth=(0, 1, 3),
      up_depth=(0, 1, 3),
      self_attn=(False, False, True),
      # Paper 3.4: the innermost down/mid/up is one unified stack of 5 layers (UViT's middle).
      inner_skips=False,
      # 64: SD's and most ViTs' head width; gives 10 heads at 640 and 16 at 1024.
      head_dim=64,
      num_heads=0,
      ff_mult=3,
      ff_activation="swish",
      shared_kv=True,
      attention="softmax",
      # 4: ConvNeXt's inverted-bottleneck ratio, which the paper's SPConv follows (Fig. 2).
      sep_expansion=4,
      # 32: SD's value, and it divides every width (and every concatenated width) used here.
      norm_groups=32,
      # 1280 = 4 x 320: SD's time MLP width for a 320-channel first level.
      time_embed_dim=1280,
      remat=False,
  ))
  if variant == "md-lite":
    cfg.channels = (320, 640, 896)
    cfg.up_depth = (0, 1, 2)
  elif variant != "md":
    raise ValueError(f"unknown UNet variant {variant!r}")
  return cfg


def tiny_config() -> ml_collections.ConfigDict:
  """Same block types as the paper's model, small enough for CPU tests."""
  cfg = default_config()
  cfg.in_channels = 4
  cfg.out_channels = 4
  cfg.context_dim = 16
  cfg.channels = (16, 32, 32)
  cfg.down_depth = (0, 1, 1)
  cfg.up_depth = (0, 1, 1)
  cfg.head_dim = 8
  cfg.ff_mult = 2
  cfg.sep_expansion = 2
  cfg.norm_groups = 4
  cfg.time_embed_dim = 32
  return cfg


def _levels(cfg) -> int:
  n = len(cfg.channels)
  for name in ("down_blocks", "up_blocks", "down_conv", "up_conv", "down_depth", "up_depth",
               "self_attn"):
    if len(cfg[name]) != n:
      raise ValueError(f"unet.{name} has {len(cfg[name])} entries, channels has {n}")
  for l in range(n):
    if l == n - 1 and not _inner_skips(cfg):
      continue
    if cfg.up_blocks[l] != cfg.down_blocks[l] + 1:
      raise ValueError(
          f"level {l}: up_blocks={cfg.up_blocks[l]} must equal the {cfg.down_blocks[l] + 1} skips "
          f"it pushes (its input + down_blocks={cfg.down_blocks[l]})"
          + ("" if l < n - 1 else "; or set inner_skips=False"))
  return n


def _head_dim(cfg, channels: int) -> int:
  heads = int(cfg.get("num_heads", 0) or 0)
  if not heads:
    return int(cfg.head_dim)
  if channels % heads:
    raise ValueError(f"unet.num_heads={heads} does not divide a level's {channels} channels")
  return channels // heads


def _inner_skips(cfg) -> bool:
  return bool(cfg.get("inner_skips", True))


def count_blocks(cfg) -> dict:
  """Conv blocks, SA and CA layers implied by the config (Table 6: 11, 15, 18 for MD)."""
  n = _levels(cfg)
  conv = sum(cfg.down_blocks) + sum(cfg.up_blocks)
  sa = ca = 0
  for l in range(n):
    for blocks, depth in ((cfg.down_blocks[l], cfg.down_depth[l]),
                          (cfg.up_blocks[l], cfg.up_depth[l])):
      ca += blocks * depth
      sa += blocks * depth * int(bool(cfg.self_attn[l]))
  return dict(conv=conv, sa=sa, ca=ca)


def count_modules(model: nnx.Module) -> dict:
  """The same counts read off a built (or eval_shape'd) model, to check the wiring."""
  counts = dict(conv=0, full_conv=0, sep_conv=0, sa=0, ca=0)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, (FullConv, SPConv)):
      counts["conv"] += 1
      counts["full_conv" if isinstance(node, FullConv) else "sep_conv"] += 1
    elif isinstance(node, Attention):
      counts["ca" if node.is_cross else "sa"] += 1
  return counts


class UNetLevel(nnx.Module):
  """Conv blocks of one level, their transformers (empty when depth is 0) and a resampler."""

  def __init__(self, convs, transformers, resample):
    self.convs = nnx.List(convs)
    self.transformers = nnx.List(transformers)
    self.resample = resample


class UNet(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    n, ch = _levels(cfg), tuple(cfg.channels)
    skip_channels, cur = self._build_down(cfg, **kw)
    up = [None] * n
    for l in reversed(range(n)):
      up[l], cur = self._build_up_level(cfg, l, cur, skip_channels, **kw)
    assert not skip_channels
    # Indexed by level (up_levels[0] is the outermost), run from the innermost outwards.
    self.up_levels = nnx.List(up)

    self.norm_out = GroupNorm(ch[0], num_groups=cfg.norm_groups, **kw)
    self.conv_out = Conv2d(ch[0], cfg.out_channels, 3, kernel_init=zeros_init, **kw)

  def _transformer(self, cfg, l: int, depth: int, **kw):
    ch = tuple(cfg.channels)
    return SpatialTransformer(
        ch[l], depth=depth, context_dim=cfg.context_dim, head_dim=_head_dim(cfg, ch[l]),
        self_attn=bool(cfg.self_attn[l]), shared_kv=cfg.shared_kv, attention=cfg.attention,
        ff_mult=cfg.ff_mult, ff_activation=cfg.ff_activation, norm_groups=cfg.norm_groups,
        remat=self.remat, **kw)

  def _block_kw(self, cfg, **kw):
    return dict(temb_dim=cfg.time_embed_dim, norm_groups=cfg.norm_groups,
                sep_expansion=cfg.sep_expansion, **kw)

  def _build_up_level(self, cfg, l: int, cur: int, skip_channels: list, resample: bool = True,
                      **kw):
    """Up level ``l`` (popping its skips' widths); returns (level, its output width)."""
    ch = tuple(cfg.channels)
    convs, trans = [], []
    for _ in range(cfg.up_blocks[l]):
      in_ch = cur + (skip_channels.pop() if self.level_skips[l] else 0)
      convs.append(make_conv_block(cfg.up_conv[l], in_ch, ch[l], **self._block_kw(cfg, **kw)))
      cur = ch[l]
      if cfg.up_depth[l] > 0:
        trans.append(self._transformer(cfg, l, cfg.up_depth[l], **kw))
    return UNetLevel(convs, trans, Upsample(cur, **kw) if l > 0 and resample else None), cur

  def _build_down(self, cfg, *, rngs, dtype, param_dtype):
    """Time MLP, conv_in and the down levels; returns (skip widths, output width)."""
    n = _levels(cfg)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    ch = tuple(cfg.channels)
    ted = cfg.time_embed_dim
    self.remat = bool(cfg.get("remat", False))
    self.num_levels = n
    self.dtype = dtype

    # Sinusoid width = first level's width, as SD (320 -> 1280).
    self.time_freq_dim = ch[0]
    self.time_embed_1 = Dense(ch[0], ted, kernel_axes=(EMBED, MLP), **kw)
    self.time_embed_2 = Dense(ted, ted, kernel_axes=(MLP, EMBED), **kw)
    self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, **kw)

    block_kw = self._block_kw(cfg, **kw)

    # Which levels push and pop skips (all but a unified innermost level).
    self.level_skips = tuple(l < n - 1 or _inner_skips(cfg) for l in range(n))
    skip_channels = []
    cur = ch[0]
    down = []
    for l in range(n):
      convs, trans = [], []
      if self.level_skips[l]:
        skip_channels.append(cur)  # the level's input: conv_in's or the downsampler's output
      for _ in range(cfg.down_blocks[l]):
        convs.append(make_conv_block(cfg.down_conv[l], cur, ch[l], **block_kw))
        cur = ch[l]
        if cfg.down_depth[l] > 0:
          trans.append(self._transformer(cfg, l, cfg.down_depth[l], **kw))
        if self.level_skips[l]:
          skip_channels.append(cur)
      resample = Downsample(cur, **kw) if l < n - 1 else None
      down.append(UNetLevel(convs, trans, resample))
    self.down_levels = nnx.List(down)
    return skip_channels, cur

  def time_embedding(self, t: Array) -> Array:
    emb = timestep_embedding(t, self.time_freq_dim).astype(self.dtype)
    return self.time_embed_2(swish(self.time_embed_1(emb)))

  def _stage(self, level: UNetLevel, i: int, h: Array, temb: Array, context: Array) -> Array:
    h = maybe_remat(level.convs[i], h, temb, enabled=self.remat)
    if len(level.transformers):
      h = level.transformers[i](h, context)
    return h

  def _down(self, x: Array, t: Array, context: Array):
    """The down path: (innermost features, skips, time embedding, context in compute dtype)."""
    factor = 2 ** (self.num_levels - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"spatial size {x.shape[1:3]} not divisible by {factor}")
    x = x.astype(self.dtype)
    context = context.astype(self.dtype)
    temb = self.time_embedding(t)

    h = self.conv_in(x)
    skips = []
    for l, level in enumerate(self.down_levels):
      if self.level_skips[l]:
        skips.append(h)
      for i in range(len(level.convs)):
        h = self._stage(level, i, h, temb, context)
        if self.level_skips[l]:
          skips.append(h)
      if level.resample is not None:
        h = level.resample(h)
    return h, skips, temb, context

  def __call__(self, x: Array, t: Array, context: Array) -> Array:
    h, skips, temb, context = self._down(x, t, context)
    for l in reversed(range(self.num_levels)):
      level = self.up_levels[l]
      for i in range(len(level.convs)):
        if self.level_skips[l]:
          h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = self._stage(level, i, h, temb, context)
      if level.resample is not None:
        h = level.resample(h)

    h = self.conv_out(swish(self.norm_out(h)))
    return h.astype(jnp.float32)


class UNetEncoder(UNet):
  """The UNet's down path and innermost (middle) stack with a per-location logit head.

  The encoder-only discriminator (DESIGN 3): time MLP, conv_in and down levels are the UNet's
  (same names, so they load from a pretrained UNet), ``middle`` is the UNet's innermost up stack
  (``up_levels[levels-1]``; the rest of the unified middle module of paper 3.4), and the head is
  GroupNorm -> swish -> a zero-initialised 3x3 conv to ``out_channels`` at the innermost
  resolution. Returns (B, H/2**(levels-1), W/2**(levels-1), out_channels) in float32.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    n, ch = _levels(cfg), tuple(cfg.channels)
    skip_channels, cur = self._build_down(cfg, **kw)
    # No upsampler: the features stay at the innermost resolution.
    self.middle, cur = self._build_up_level(cfg, n - 1, cur, skip_channels, resample=False, **kw)
    self.norm_head = GroupNorm(cur, num_groups=cfg.norm_groups, **kw)
    self.conv_out = Conv2d(cur, cfg.out_channels, 3, kernel_init=zeros_init, **kw)

  def __call__(self, x: Array, t: Array, context: Array) -> Array:
    h, skips, temb, context = self._down(x, t, context)
    n = self.num_levels
    for i in range(len(self.middle.convs)):
      if self.level_skips[n - 1]:
        h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = self._stage(self.middle, i, h, temb, context)
    h = self.conv_out(swish(self.norm_head(h)))
    return h.astype(jnp.float32)
