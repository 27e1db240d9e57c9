"""LPIPS(VGG16) perceptual distance in NNX (Zhang et al. 2018; paper sec. 3.5's perceptual loss).

`LPIPS(rngs=..., dtype=...)` holds a VGG16 trunk (`vgg`, torchvision's `features` conv layers up to
relu5_3) and LPIPS' five learned 1x1 linear heads (`heads`, no bias). `__call__(x, y)` takes two
NHWC image batches in [-1, 1] and returns the distance per example, shape (B,):

  scale input with LPIPS' fixed shift/scale -> VGG16 features at relu1_2, relu2_2, relu3_3,
  relu4_3, relu5_3 -> unit-normalise each feature over channels -> squared difference ->
  head (1x1 conv to one channel) -> spatial mean -> sum over the five layers.

Weights come only from local files converted by `md_jax.tools.convert_lpips` into one .npz
(`load_params` reads it); nothing is downloaded. The loss only runs in training, so it is not held
to the export rules (it max-pools and reduces freely).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from md_jax.models.layers import Conv2d

Array = jax.Array

# torchvision vgg16().features: conv widths per stage; a 2x2 max pool between stages.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Index of each conv in torchvision's `features` Sequential (ReLUs and pools sit between).
VGG16_TORCH_INDEX = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
# LPIPS' ScalingLayer: inputs in [-1, 1] -> (x - shift) / scale.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # LPIPS' normalize_tensor epsilon


def _max_pool(x: Array) -> Array:
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class VGG16Features(nnx.Module):
  """VGG16's conv trunk; returns the relu output at the end of each of the 5 stages."""

  def __init__(self, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    stages, cin = [], 3
    for widths in VGG16_STAGES:
      convs = []
      for c in widths:
        convs.append(Conv2d(cin, c, 3, **kw))
        cin = c
      stages.append(nnx.List(convs))
    self.stages = nnx.List(stages)

  def __call__(self, x: Array) -> list[Array]:
    feats, h = [], x
    for i, stage in enumerate(self.stages):
      if i:
        h = _max_pool(h)
      for conv in stage:
        h = jax.nn.relu(conv(h))
      feats.append(h)
    return feats


class LPIPS(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.vgg = VGG16Features(**kw)
    self.heads = nnx.List([Conv2d(w[-1], 1, 1, use_bias=False, **kw) for w in VGG16_STAGES])

  def __call__(self, x: Array, y: Array) -> Array:
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
    n = x.shape[0]
    feats = self.vgg((jnp.concatenate([x, y], axis=0).astype(jnp.float32) - shift) / scale)
    total = jnp.zeros((n,), jnp.float32)
    for f, head in zip(feats, self.heads):
      f = f.astype(jnp.float32)
      f = f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + _EPS)
      d = jnp.square(f[:n] - f[n:])
      total = total + jnp.mean(head(d).astype(jnp.float32), axis=(1, 2, 3))
    return total


def param_names() -> list[str]:
  """Flat names ('vgg/stages/S/I/kernel', 'heads/K/kernel', ...) the converted .npz holds."""
  names = []
  for s, widths in enumerate(VGG16_STAGES):
    for i in range(len(widths)):
      names += [f"vgg/stages/{s}/{i}/kernel", f"vgg/stages/{s}/{i}/bias"]
  names += [f"heads/{k}/kernel" for k in range(len(VGG16_STAGES))]
  return names


def load_params(path: str) -> dict:
  """The nested params dict (as ``nnx.to_pure_dict`` lays it out) from a converted .npz."""
  try:
    data = np.load(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"LPIPS weights {path!r} not found: convert local files with `python -m "
        "md_jax.tools.convert_lpips --vgg16=VGG16.pth --heads=LPIPS_VGG.pth --out=FILE.npz` "
        "(nothing is downloaded), or set config.vae.perceptual.weight=0") from e
  missing = [k for k in param_names() if k not in data.files]
  if missing:
    raise KeyError(f"{path}: missing LPIPS tensors {missing[:4]}{'...' if len(missing) > 4 else ''}")
  out: dict = {}
  for name in param_names():
    node = out
    parts = name.split("/")
    for p in parts[:-1]:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[parts[-1]] = np.asarray(data[name], np.float32)
  return out


def build(path: str, dtype=jnp.float32) -> LPIPS:
  """An LPIPS module holding the weights of the converted file ``path``."""
  from md_jax.models.layers import KeyStream  # pylint: disable=g-import-not-at-top
  params = load_params(path)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: LPIPS(rngs=KeyStream(0), dtype=dtype))
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  shapes_ok = jax.tree.map(lambda a, b: tuple(a.shape) == tuple(b.shape), pure, params)
  bad = [jax.tree_util.keystr(k) for k, ok in jax.tree_util.tree_flatten_with_path(shapes_ok)[0]
         if not ok]
  if bad:
    raise ValueError(f"{path}: tensors of the wrong shape for LPIPS(VGG16): {bad[:4]}")
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)
