"""A small feature network for FID/KID on the shapes data (Inception with random weights, or
Inception on these images at all, measures nothing useful; this net is the shapes yardstick).

`ShapesFeatureNet`: images in [0, 1] (any size; resized to 64 px) -> four stride-2 3x3 convs
(32, 64, 64, 64 channels) -> a 128-d ReLU feature layer -> three linear heads (colour 6, shape 4,
position 9). It is trained once on the shapes training split by
``python -m md_jax.tools.train_shapes_features`` (seeded; 1500 steps, ~15 min on 2 CPU cores) and the weights
ship in md_jax/assets/shapes_features.npz, so every run is measured with the same network.
``__call__`` returns the 128-d features, which `fid.FeatureExtractor`, `fid.FeatureStats`,
`fid.frechet_distance` and `fid.kernel_inception_distance` use as they use Inception's.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from md_jax.data.shapes import COLOURS, POSITIONS, SHAPES
from md_jax.models.layers import Conv2d, Dense, KeyStream

INPUT_SIZE = 64
CHANNELS = (32, 64, 64, 64)
FEATURE_DIM = 128
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "assets", "shapes_features.npz")


class ShapesFeatureNet(nnx.Module):

  def __init__(self, *, rngs):
    convs, cin = [], 3
    for c in CHANNELS:
      convs.append(Conv2d(cin, c, 3, stride=2, rngs=rngs))
      cin = c
    self.convs = nnx.List(convs)
    spatial = INPUT_SIZE // 2 ** len(CHANNELS)
    self.features = Dense(spatial * spatial * cin, FEATURE_DIM, rngs=rngs)
    self.colour = Dense(FEATURE_DIM, len(COLOURS), rngs=rngs)
    self.shape = Dense(FEATURE_DIM, len(SHAPES), rngs=rngs)
    self.position = Dense(FEATURE_DIM, len(POSITIONS), rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) in [0, 1] -> (B, 128) features."""
    b, h, w, c = images.shape
    x = images.astype(jnp.float32)
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
      x = jax.image.resize(x, (b, INPUT_SIZE, INPUT_SIZE, c), "bilinear")
    x = 2.0 * x - 1.0
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return jax.nn.relu(self.features(x.reshape(b, -1)))

  def logits(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    f = self(images)
    return self.colour(f), self.shape(f), self.position(f)


def _flat(state) -> dict:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]:
    out["/".join(str(getattr(p, "key", p)) for p in path)] = leaf
  return out


def save(model: ShapesFeatureNet, path: str) -> str:
  np.savez(path, **{k: np.asarray(v) for k, v in _flat(nnx.state(model)).items()})
  return path


def load(path: str | None = None) -> ShapesFeatureNet:
  """The network with the weights of ``path`` (default: the shipped asset)."""
  path = path or DEFAULT_WEIGHTS
  if not os.path.isfile(path):
    raise FileNotFoundError(f"shapes feature weights {path!r} not found: train them with "
                            "`python -m md_jax.tools.train_shapes_features --out=FILE`")
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ShapesFeatureNet(rngs=KeyStream(0))))
  want = {k: tuple(v.shape) for k, v in _flat(state).items()}
  with np.load(path) as data:
    missing = [k for k in want if k not in data.files]
    if missing:
      raise KeyError(f"{path}: missing tensors {missing[:4]}")
    bad = [k for k, s in want.items() if tuple(data[k].shape) != tuple(s)]
    if bad:
      raise ValueError(f"{path}: tensors of the wrong shape: {bad[:4]}")
    flat = {k: np.asarray(data[k], np.float32) for k in want}

  def fill(node, prefix):
    return {k: fill(v, f"{prefix}{k}/") if isinstance(v, dict) else jnp.asarray(flat[f"{prefix}{k}"])
            for k, v in node.items()}

  nnx.replace_by_pure_dict(state, fill(nnx.to_pure_dict(state), ""))
  return nnx.merge(graphdef, state)
