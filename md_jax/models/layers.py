"""Basic NNX layers shared by the UNet, the VAE and the text encoder.

Constructors take explicit keyword arguments plus `rngs`, `dtype` (compute dtype) and
`param_dtype` (storage dtype). Every layer holds only `nnx.Param`s, each annotated with logical
axis names through `out_sharding`; the train loop maps those names to mesh axes.

Layout is NHWC and no op here produces a tensor of rank > 4, so the graphs stay convertible to
TFLite's GPU delegate (DESIGN 6).
"""

from __future__ import annotations

import functools
import os

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
Axes = tuple

# Logical axis names (the loop's sharding rules key on these strings).
EMBED, MLP, HEADS, VOCAB = "embed", "mlp", "heads", "vocab"
CONV_IN, CONV_OUT, NORM = "conv_in", "conv_out", "norm"


def lecun_normal(fan_in: int) -> Callable:
  """Normal init with variance 1/fan_in (flax's default for Linear/Conv)."""
  std = 1.0 / math.sqrt(max(fan_in, 1))

  def init(key, shape, dtype):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

  return init


def zeros_init(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def make_param(init: Callable, key, shape: Sequence[int], param_dtype, axes: Axes) -> nnx.Param:
  assert len(axes) == len(shape), (shape, axes)
  return nnx.Param(init(key, tuple(shape), param_dtype), out_sharding=tuple(axes))


def swish(x: Array) -> Array:
  return x * jax.nn.sigmoid(x)


def quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


def get_activation(name: str) -> Callable[[Array], Array]:
  if name in ("swish", "silu"):
    return swish
  if name == "gelu":
    # Exact erf gelu, as PyTorch's default F.gelu used by SD's GEGLU and CLIP's "gelu".
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "gelu_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "quick_gelu":
    return quick_gelu
  if name == "relu":
    return jax.nn.relu
  raise ValueError(f"unknown activation {name!r}")


class Dense(nnx.Module):
  """y = x @ kernel + bias over the last axis; kernel is (in, out)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               kernel_axes: Axes = (EMBED, MLP), kernel_init: Callable | None = None,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    init = kernel_init or lecun_normal(in_features)
    self.kernel = make_param(init, rngs.params(), (in_features, out_features), param_dtype,
                             kernel_axes)
    self.bias = (make_param(zeros_init, rngs.params(), (out_features,), param_dtype, (NORM,))
                 if use_bias else None)

  def __call__(self, x: Array) -> Array:
    x = x.astype(self.dtype)
    y = jnp.dot(x, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def _xla_conv(x: Array, w: Array, stride: int) -> Array:
  return jax.lax.conv_general_dilated(x, w, window_strides=(stride, stride), padding="SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _same_pads(n: int, k: int, s: int) -> tuple[int, int, int]:
  out = -(-n // s)
  total = max((out - 1) * s + k - n, 0)
  return out, total // 2, total - total // 2


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_matmul_wgrad(x: Array, w: Array, stride: int) -> Array:
  return _xla_conv(x, w, stride)


def _conv_fwd(x, w, stride):
  return _xla_conv(x, w, stride), (x, w)


def _conv_bwd(stride, res, g):
  # XLA:CPU lowers the kernel gradient of a convolution to a slow generic loop (measured 4-10x
  # slower than the forward conv on 2 cores); one matmul per kernel tap runs at matmul speed.
  # The input gradient stays XLA's own transposed convolution, which is fast.
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _xla_conv(x_, w, stride), x)
  (dx,) = vjp_x(g)
  kh, kw, cin, cout = w.shape
  b, h, wd, c = x.shape
  ho, ph0, ph1 = _same_pads(h, kh, stride)
  wo, pw0, pw1 = _same_pads(wd, kw, stride)
  xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
  g2 = g.reshape(-1, cout)
  taps = []
  for i in range(kh):
    for j in range(kw):
      xs = jax.lax.slice(xp, (0, i, j, 0),
                         (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                         (1, stride, stride, 1))
      taps.append(jnp.dot(xs.reshape(-1, c).T, g2, preferred_element_type=jnp.float32))
  dw = jnp.stack(taps).reshape(kh, kw, cin, cout)
  return dx, dw.astype(w.dtype)


_conv_matmul_wgrad.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: Array, w: Array, stride: int = 1) -> Array:
  """SAME-padded NHWC conv. Forward is always the plain convolution (what export sees); on CPU
  the kernel gradient is computed as per-tap matmuls (MD_JAX_CONV_WGRAD=xla|matmul overrides)."""
  mode = os.environ.get("MD_JAX_CONV_WGRAD", "auto")
  use_matmul = mode == "matmul" or (mode == "auto" and jax.default_backend() == "cpu")
  if use_matmul:
    return _conv_matmul_wgrad(x, w, stride)
  return _xla_conv(x, w, stride)


class Conv2d(nnx.Module):
  """2-D convolution, NHWC input and HWIO kernel.

  padding='SAME' everywhere: for stride 1 and a 3x3 kernel it is the usual pad-1, for stride 2 on
  even sizes it pads (0, 1) as SD's VAE downsampler does, and it maps to TFLite's native SAME
  padding without a separate PAD op.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *,
               stride: int = 1, use_bias: bool = True, kernel_init: Callable | None = None,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.in_channels, self.out_channels = in_channels, out_channels
    self.kernel_size, self.stride = kernel_size, stride
    self.dtype = dtype
    init = kernel_init or lecun_normal(kernel_size * kernel_size * in_channels)
    self.kernel = make_param(init, rngs.params(),
                             (kernel_size, kernel_size, in_channels, out_channels), param_dtype,
                             (None, None, CONV_IN, CONV_OUT))
    self.bias = (make_param(zeros_init, rngs.params(), (out_channels,), param_dtype, (NORM,))
                 if use_bias else None)

  def __call__(self, x: Array) -> Array:
    x = x.astype(self.dtype)
    y = conv2d(x, self.kernel[...].astype(self.dtype), self.stride)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class DepthwiseConv2d(nnx.Module):
  """Per-channel spatial convolution; kernel (k, k, 1, C) as TFLite's DEPTHWISE_CONV_2D wants."""

  def __init__(self, channels: int, kernel_size: int = 3, *, use_bias: bool = True,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.channels, self.kernel_size = channels, kernel_size
    self.dtype = dtype
    self.kernel = make_param(lecun_normal(kernel_size * kernel_size), rngs.params(),
                             (kernel_size, kernel_size, 1, channels), param_dtype,
                             (None, None, None, CONV_OUT))
    self.bias = (make_param(zeros_init, rngs.params(), (channels,), param_dtype, (NORM,))
                 if use_bias else None)

  def __call__(self, x: Array) -> Array:
    x = x.astype(self.dtype)
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...].astype(self.dtype), window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.channels)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def normalize_deviation(d: Array, axes, inv_n: float, eps: float) -> Array:
  """d / sqrt(mean(d^2) + eps) over ``axes`` (d: deviations from the mean; inv_n: 1 / count),
  computed so that no intermediate leaves fp16's range.

  A trained UNet's residual stream reaches |x| ~ 1e3, so d^2 (1e6) and the variance overflow
  fp16's 65504 when an exported model runs on the GPU delegate in fp16 (tflite_export.check
  flags exactly this). The result is scale-invariant: for any s > 0 it equals
  (d/s) / sqrt(mean((d/s)^2) + (sqrt(eps)/s)^2), and with s = max(max|d|, sqrt(eps)) every term
  is <= 1. s only changes the rounding, so no gradient flows through it.
  """
  root_eps = math.sqrt(eps)
  s = jax.lax.stop_gradient(
      jnp.maximum(jnp.max(jnp.abs(d), axis=axes, keepdims=True), root_eps))
  # 1/s as rsqrt(s)^2: no DIV, whose full-int8 kernel refuses a divisor that quantises to 0.
  r = jax.lax.rsqrt(s)
  inv_s = r * r
  ds = d * inv_s
  var = jnp.sum(jnp.square(ds) * inv_n, axis=axes, keepdims=True)
  e = root_eps * inv_s
  return ds * jax.lax.rsqrt(var + e * e)


class GroupNorm(nnx.Module):
  """GroupNorm over (B, H, W, C) or (B, L, C), written with rank-4 intermediates only.

  flax's GroupNorm reshapes to rank 5, which the TFLite GPU delegate cannot run; here the input is
  viewed as (B, H*W, G, C/G) and reduced over axes 1 and 3. Statistics are taken in float32
  because a bf16 mean over thousands of elements loses most of its precision.
  """

  def __init__(self, channels: int, *, num_groups: int = 32, eps: float = 1e-5,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    if channels % num_groups:
      raise ValueError(f"GroupNorm: {channels} channels not divisible by {num_groups} groups")
    self.channels, self.num_groups, self.eps = channels, num_groups, eps
    self.dtype = dtype
    self.scale = make_param(ones_init, rngs.params(), (channels,), param_dtype, (NORM,))
    self.bias = make_param(zeros_init, rngs.params(), (channels,), param_dtype, (NORM,))

  def __call__(self, x: Array) -> Array:
    shape = x.shape
    b, c = shape[0], shape[-1]
    g = self.num_groups
    xg = x.astype(jnp.float32).reshape(b, -1, g, c // g)
    # Means as sums of pre-scaled terms: jnp.mean exports as SUM then MUL, and the raw sum of
    # squares over a 64x64 map already passes fp16's 65504 on the GPU delegate (tflite_export
    # check); pre-scaled, every partial sum stays within the data's own range.
    inv_n = 1.0 / (xg.shape[1] * xg.shape[3])
    mean = jnp.sum(xg * inv_n, axis=(1, 3), keepdims=True)
    y = normalize_deviation(xg - mean, (1, 3), inv_n, self.eps).reshape(shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.dim, self.eps = dim, eps
    self.dtype = dtype
    self.scale = make_param(ones_init, rngs.params(), (dim,), param_dtype, (NORM,))
    self.bias = make_param(zeros_init, rngs.params(), (dim,), param_dtype, (NORM,))

  def __call__(self, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    inv_n = 1.0 / xf.shape[-1]
    mean = jnp.sum(xf * inv_n, axis=-1, keepdims=True)
    y = normalize_deviation(xf - mean, (-1,), inv_n, self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def upsample_nearest_2x(x: Array) -> Array:
  # jax.image.resize 'nearest' is lowered by the TFLite converter to one RESIZE_NEAREST_NEIGHBOR
  # (checked, DESIGN 6); its jaxpr holds an index gather that export_safety knows to accept.
  # A 1x1 map (the innermost level of a 32 px model) is the exception: the converter turns that
  # resize into GATHER_ND, which the GPU delegate lacks; two concatenations do the same there.
  b, h, w, c = x.shape
  if h == 1 and w == 1:
    x = jnp.concatenate([x, x], axis=1)
    return jnp.concatenate([x, x], axis=2)
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding of float timesteps, [cos | sin] as SD (flip_sin_to_cos=True)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class KeyStream:
  """A stand-in for `nnx.Rngs` when building modules (abstractly, `nnx.eval_shape(lambda:
  UNet(cfg, rngs=KeyStream(0)))`, or for real init under jit with a key array): `params()`
  folds a Python counter into one key, so the keys are a deterministic function of the seed and
  the order in which layers are built.

  nnx.Rngs keeps its counter in a Variable; each update probes the traced value's `.sharding`,
  whose error message walks the whole trace, so building the MD UNet abstractly costs ~10 s
  (quadratic in the number of parameters) against ~1 s with this. The layers here only call
  `rngs.params()`. Keys differ from nnx.Rngs's (train/state.ModelSpec uses this for every
  trainer, so a seed names one init either way).
  """

  def __init__(self, seed: int | Array = 0):
    self._key = jax.random.key(seed) if isinstance(seed, int) else seed
    self._count = 0

  def params(self) -> Array:
    self._count += 1
    return jax.random.fold_in(self._key, self._count)


def nest_paths(flat: dict) -> dict:
  """{("a", "b"): v, ...} -> {"a": {"b": v}, ...}: a flat path dict back to nested dicts."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


def flat_paths(tree: dict, prefix: tuple = ()) -> dict:
  """{"a": {"b": v}} -> {("a", "b"): v}: nested dicts to a flat path dict (`nest_paths`'s
  inverse); keys become strings."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat_paths(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def count_params(tree) -> int:
  """Number of scalars in a module or state (works on nnx.eval_shape output)."""
  state = tree if isinstance(tree, nnx.State) else nnx.state(tree, nnx.Param)
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))
