"""FID (Heusel et al. 2017) as the paper's Table 2 reports it: Inception-v3 pool features and the
Frechet distance between two Gaussians fitted to them.

The network is the variant FID is defined with (the TF "2015-12-05" graph as pytorch-fid ports
it), not torchvision's Inception-v3; the differences that change the numbers:
  * the 3x3 average pools inside the A, C and first E blocks do not count the zero padding
    (count_include_pad=False);
  * the last E block (Mixed_7c) pools its branch with a 3x3 *max* pool;
  * BatchNorm eps is 1e-3; every conv has no bias.
Input: NHWC images in [0, 1] (uint8 / 255) of any size; they are resized to 299x299 with
PyTorch's bilinear, align_corners=False, no antialias (what pytorch-fid does), then mapped to
[-1, 1]. Output: the 2048-d average-pooled Mixed_7c features.

Weights come only from a local file converted by ``python -m md_jax.tools.convert_inception``
from the standard FID weight file (``pt_inception-2015-12-05-6726825d.pth``); nothing is
downloaded. Layer names mirror pytorch-fid's (``Mixed_5b/branch1x1/conv/kernel`` <-
``Mixed_5b.branch1x1.conv.weight``), so the converter maps names 1:1. Every tensor is rank <= 4.

  model = fid.build("inception.npz")
  stats = fid.FeatureStats()
  stats.update(fid.features(model, uint8_images))         # any number of batches
  mu, sigma, n = stats.result()
  fid.frechet_distance(mu, sigma, *fid.load_stats("coco30k.npz")[:2])
"""

from __future__ import annotations

import functools
import os
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from md_jax.models.layers import KeyStream

Array = jax.Array

FID_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3


# ------------------------------------------------------------------------------------- layers
def _normal(key, shape, std):
  return std * jax.random.normal(key, shape, jnp.float32)


class _Conv(nnx.Module):
  """Bias-free conv with explicit (symmetric) padding, as torch.nn.Conv2d(bias=False)."""

  def __init__(self, cin: int, cout: int, kernel, stride: int, padding, *, rngs):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    self.stride = int(stride)
    self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    self.kernel = nnx.Param(_normal(rngs.params(), (kh, kw, cin, cout), (2.0 / (kh * kw * cin)) ** 0.5))

  def __call__(self, x: Array) -> Array:
    ph, pw = self.padding
    return jax.lax.conv_general_dilated(
        x, self.kernel[...], window_strides=(self.stride, self.stride),
        padding=((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)


class _BatchNorm(nnx.Module):
  """Inference BatchNorm with the running statistics of the FID weights."""

  def __init__(self, channels: int):
    self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))

  def __call__(self, x: Array) -> Array:
    inv = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
    return x * inv + (self.bias[...] - self.mean[...] * inv)


class BasicConv2d(nnx.Module):
  """conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0, *, rngs):
    self.conv = _Conv(cin, cout, kernel, stride, padding, rngs=rngs)
    self.bn = _BatchNorm(cout)

  def __call__(self, x: Array) -> Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def _max_pool(x: Array, stride: int, pad: int = 0) -> Array:
  pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               pads)


def _avg_pool_excluding_pad(x: Array) -> Array:
  """3x3, stride 1, pad 1 average that divides by the number of real pixels in each window."""
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  return total / count


# ------------------------------------------------------------------------------------- blocks
class FIDInceptionA(nnx.Module):

  def __init__(self, cin: int, pool_features: int, *, rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_excluding_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):

  def __init__(self, cin: int, *, rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class FIDInceptionC(nnx.Module):

  def __init__(self, cin: int, channels_7x7: int, *, rngs):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(_avg_pool_excluding_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):

  def __init__(self, cin: int, *, rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class FIDInceptionE(nnx.Module):
  """Mixed_7b (``max_pool=False``: average pool excluding padding) and Mixed_7c (3x3 max pool)."""

  def __init__(self, cin: int, *, max_pool: bool, rngs):
    self.max_pool = bool(max_pool)
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b1 = self.branch1x1(x)
    h = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(h), self.branch3x3_2b(h)], axis=-1)
    h = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(h), self.branch3x3dbl_3b(h)], axis=-1)
    pooled = _max_pool(x, 1, pad=1) if self.max_pool else _avg_pool_excluding_pad(x)
    return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


# ------------------------------------------------------------------------------------ resizing
@functools.lru_cache(maxsize=16)
def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) weights of PyTorch's bilinear resize (align_corners=False, no
  antialias): source = (dst + 0.5) * in/out - 0.5, clamped at 0; the upper neighbour clamped to
  the last pixel. A downscale therefore samples 2 pixels per output, as pytorch-fid does."""
  # PyTorch's CPU kernel: float32 scale, source coordinate from one fused multiply-add (one
  # rounding), so the product is formed exactly in float64 and rounded once.
  scale = np.float32(size_in) / np.float32(size_out)
  dst = np.arange(size_out, dtype=np.float64)
  src = np.float32(np.float64(scale) * (dst + 0.5) - 0.5)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
  i1 = np.minimum(i0 + 1, size_in - 1)
  lam = (src - i0.astype(np.float32)).astype(np.float32)
  m = np.zeros((size_out, size_in), np.float32)
  np.add.at(m, (np.arange(size_out), i0), np.float32(1.0) - lam)
  np.add.at(m, (np.arange(size_out), i1), lam)
  return m


def resize_bilinear(x: Array, size: int) -> Array:
  """NHWC resize to (size, size) as two matrix products (exact PyTorch bilinear weights)."""
  _, h, w, _ = x.shape
  if h != size:
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(bilinear_matrix(h, size)), x,
                   precision=jax.lax.Precision.HIGHEST)
  if w != size:
    x = jnp.einsum("pw,bowc->bopc", jnp.asarray(bilinear_matrix(w, size)), x,
                   precision=jax.lax.Precision.HIGHEST)
  return x


# ------------------------------------------------------------------------------------- network
class InceptionV3(nnx.Module):
  """The FID Inception-v3 up to the 2048-d pool features (pytorch-fid's block 3 output)."""

  def __init__(self, *, rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = FIDInceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = FIDInceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = FIDInceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = FIDInceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = FIDInceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = FIDInceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = FIDInceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False, rngs=rngs)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True, rngs=rngs)

  def __call__(self, images: Array) -> Array:
    """images: NHWC in [0, 1], any size -> (B, 2048) float32 pool features."""
    x = resize_bilinear(images.astype(jnp.float32), FID_SIZE)
    x = 2.0 * x - 1.0
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool(x, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool(x, 2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))


def abstract_model() -> InceptionV3:
  return nnx.eval_shape(lambda: InceptionV3(rngs=KeyStream(0)))


def param_shapes() -> dict[str, tuple[int, ...]]:
  """Flat name ('Mixed_5b/branch1x1/conv/kernel', ...) -> shape, for every tensor the model needs."""
  _, state = nnx.split(abstract_model())
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]:
    out["/".join(str(p.key) for p in path)] = tuple(leaf.shape)
  return out


def load_params(path: str) -> dict[str, np.ndarray]:
  """The flat name -> array dict of a converted .npz, every tensor checked by name and shape."""
  try:
    data = np.load(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"Inception weights {path!r} not found: convert the FID weight file with `python -m "
        "md_jax.tools.convert_inception --pt pt_inception-2015-12-05-6726825d.pth --out FILE.npz` "
        "(nothing is downloaded)") from e
  shapes = param_shapes()
  missing = [k for k in shapes if k not in data.files]
  if missing:
    raise KeyError(f"{path}: missing Inception tensors {missing[:4]}"
                   f"{' ...' if len(missing) > 4 else ''}")
  bad = [f"{k} {tuple(data[k].shape)} (want {s})" for k, s in shapes.items()
         if tuple(data[k].shape) != s]
  if bad:
    raise ValueError(f"{path}: Inception tensors of the wrong shape: {bad[:4]}")
  return {k: np.asarray(data[k], np.float32) for k in shapes}


def build(path_or_params) -> InceptionV3:
  """An InceptionV3 holding the weights of a converted .npz (or a flat dict of them)."""
  flat = load_params(path_or_params) if isinstance(path_or_params, (str, os.PathLike)) \
      else path_or_params
  graphdef, state = nnx.split(abstract_model())
  pure = nnx.to_pure_dict(state)

  def fill(node, prefix):
    return {k: fill(v, f"{prefix}{k}/") if isinstance(v, dict) else jnp.asarray(flat[f"{prefix}{k}"])
            for k, v in node.items()}

  nnx.replace_by_pure_dict(state, fill(pure, ""))
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------ features
def to_unit_range(images) -> np.ndarray:
  """uint8 (0..255) -> float32 in [0, 1] (torchvision's ToTensor, as pytorch-fid reads files);
  float input is taken as already in [0, 1]."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(255.0)
  return images.astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


class FeatureExtractor:
  """The Inception forward over fixed-size batches (the last one padded), so a whole evaluation
  compiles once; extractors of the same network share that compiled forward. Batches are split
  over ``mesh``'s batch axes (default: every device); all processes must pass the same images."""

  def __init__(self, model: InceptionV3, batch_size: int = 50, mesh=None):
    from md_jax.train import sharding as shd  # pylint: disable=g-import-not-at-top
    if mesh is None:
      mesh = shd.make_mesh((-1, 1, 1), ("data", "fsdp", "tensor"))
    div = shd.batch_divisor(mesh)
    self.batch_size = max(div, -(-int(batch_size) // div) * div)
    self.graphdef, state = nnx.split(model)
    self.state = jax.device_put(state, shd.replicated(mesh))
    self.sharding = shd.batch_sharding(mesh, 4)

  def __call__(self, images) -> np.ndarray:
    """(N, H, W, 3) uint8 or [0, 1] floats -> (N, 2048) float32 features."""
    from md_jax.evaluators import samples  # pylint: disable=g-import-not-at-top
    images = to_unit_range(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
      feats = _forward(self.graphdef, self.state, jax.device_put(chunk, self.sharding))
      out.append(samples.gather_to_host(feats)[:n])
    if not out:
      return np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(out, axis=0)


def make_extractor(path_or_params, batch_size: int = 50, mesh=None) -> FeatureExtractor:
  """A FeatureExtractor over the converted weights ``path_or_params``."""
  return FeatureExtractor(build(path_or_params), batch_size, mesh)


# ---------------------------------------------------------------------------------- statistics
class FeatureStats:
  """Running mean and covariance of feature batches in float64 (Chan et al.'s pairwise update),
  so statistics of 30k images come from one pass without holding the features."""

  def __init__(self, dim: int = FEATURE_DIM):
    self.dim = int(dim)
    self.count = 0
    self.mean = np.zeros((self.dim,), np.float64)
    self.m2 = np.zeros((self.dim, self.dim), np.float64)

  def update(self, feats) -> "FeatureStats":
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f"features of shape {f.shape}, expected (N, {self.dim})")
    n_b = f.shape[0]
    if not n_b:
      return self
    mean_b = f.mean(axis=0)
    c = f - mean_b
    m2_b = c.T @ c
    n = self.count + n_b
    delta = mean_b - self.mean
    self.m2 += m2_b + np.outer(delta, delta) * (self.count * n_b / n)
    self.mean += delta * (n_b / n)
    self.count = n
    return self

  def result(self) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, count), sigma the unbiased covariance (np.cov's, as pytorch-fid uses)."""
    if self.count < 2:
      raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
    return self.mean.copy(), self.m2 / (self.count - 1), self.count


def save_stats(path: str, mu, sigma, count: int) -> str:
  """Writes mu, sigma (pytorch-fid's key names) and count to ``path`` (.npz)."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
           count=np.asarray(int(count)))
  return path


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray, int | None]:
  """(mu, sigma, count or None) from a statistics .npz (ours or pytorch-fid's)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FID statistics {path!r} not found: make them with `python -m "
                            "md_jax.tools.fid_stats --images=... --inception=... --out=FILE`")
  with np.load(path) as data:
    for key in ("mu", "sigma"):
      if key not in data.files:
        raise KeyError(f"{path}: no {key!r} array (has {data.files})")
    mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    count = int(data["count"]) if "count" in data.files else None
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not describe one Gaussian")
  return mu, sigma, count


# ------------------------------------------------------------------------------------ distance
def _psd_factor(a: np.ndarray) -> np.ndarray:
  """G (r x d) with a = G^T G for a symmetric PSD ``a`` of rank r: LAPACK's pivoted Cholesky,
  which stops at the numerical rank instead of failing on a singular matrix."""
  from scipy.linalg import lapack  # pylint: disable=g-import-not-at-top  (a jax dependency)
  u, piv, rank, info = lapack.dpstrf(np.array((a + a.T) / 2, order="F"), lower=0)
  if info < 0:
    raise ValueError(f"pivoted Cholesky failed (LAPACK info {info})")
  g = np.zeros((rank, a.shape[0]), np.float64)
  g[:, piv - 1] = np.triu(u)[:rank]
  return g


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

  S1 S2 is not symmetric, and a general matrix square root of it (scipy's sqrtm) turns complex
  or inaccurate when the covariances are near singular (fewer samples than 2048 features), and
  takes tens of seconds at 2048 dimensions. With S1 = G^T G (pivoted Cholesky, rank r), the
  nonzero eigenvalues of S1 S2 are those of the symmetric PSD r x r matrix G S2 G^T, so the
  trace comes from a symmetric eigenvalue solve, round-off negatives clipped to zero.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {s1.shape} vs {s2.shape}")
  g = _psd_factor(s1)
  inner = g @ s2 @ g.T
  eig = np.linalg.eigvalsh((inner + inner.T) / 2) if len(inner) else np.zeros((0,))
  tr_covmean = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def kernel_inception_distance(f1, f2, *, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> float:
  """KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets of both feature sets."""
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  d = f1.shape[1]
  m = min(subset_size, len(f1), len(f2))
  if m < 2:
    raise ValueError(f"KID needs at least 2 samples per set, have {len(f1)} and {len(f2)}")
  rng = np.random.default_rng(seed)
  total = 0.0
  for _ in range(num_subsets):
    x = f1[rng.choice(len(f1), m, replace=False)]
    y = f2[rng.choice(len(f2), m, replace=False)]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    total += ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
              - 2 * kxy.mean())
  return float(total / num_subsets)


# ----------------------------------------------------------------------------------- evaluator
def run(features: FeatureExtractor, images: Iterable, ref_stats: str) -> Iterator[tuple[str, float]]:
  """Yields ('fid', value) and ('fid_count', n) for uint8 image batches against ``ref_stats``."""
  mu_r, sigma_r, _ = load_stats(ref_stats)
  stats = FeatureStats(mu_r.shape[0])
  for batch in images:
    stats.update(features(batch))
  mu, sigma, n = stats.result()
  yield "fid", frechet_distance(mu, sigma, mu_r, sigma_r)
  yield "fid_count", float(n)
