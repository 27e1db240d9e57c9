"""A CLIP for the shapes domain: the shapes run's text tower trained contrastively against a
small convolutional image tower, so that the diffusion stages can freeze a *pretrained* text
encoder, as MobileDiffusion freezes CLIP ViT-L/14's (paper sec. 3.1).

`ShapesCLIP(text_cfg, cfg, rngs=...)`:
  text_model        `text_encoder.CLIPTextTransformer` (the diffusion stages' text tower)
  text_projection   pooled (end-of-text) state -> the joint embedding, no bias (CLIP's)
  vision_model      `ConvImageTower`: images in [0, 1] -> a feature vector
  visual_projection features -> the joint embedding, no bias
  logit_scale       log of CLIP's learned temperature (init log(1/0.07), clipped at log 100)

The image tower is convolutional with a flattened (not pooled) final map, so it keeps where the
object is; it exists only to train the text tower and is saved beside it for the retrieval
report. `md_jax.tools.train_shapes_clip` trains both and writes a Hugging Face-style directory
(`hf_clip.save_text_encoder`) that `config.text.hf_dir` loads like any CLIP directory.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from md_jax.models import hf_clip
from md_jax.models import text_encoder as text_lib
from md_jax.models.layers import (EMBED, MLP, Conv2d, Dense, GroupNorm, KeyStream, flat_paths,
                                  make_param, nest_paths)

Array = jax.Array

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


def default_config() -> ml_collections.ConfigDict:
  """The image tower and the joint embedding (the text tower's config is the run's
  config.text)."""
  return ml_collections.ConfigDict(dict(
      # 32-px renders (4x cheaper steps than 64 px); shapes are still told apart there.
      image_size=32,
      # One stride-1 conv at full resolution (corners tell the shapes apart), then stride-2
      # stages down to 4x4.
      channels=(32, 64, 128, 128),
      norm_groups=8,
      feature_dim=256,
      projection_dim=64,
  ))


class ConvImageTower(nnx.Module):
  """(B, S, S, 3) in [0, 1] -> (B, feature_dim): conv/GroupNorm/swish stages, the first at
  stride 1 and the rest at stride 2, then the flattened final map through a dense layer."""

  def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.image_size = int(cfg.image_size)
    convs, norms, cin = [], [], 3
    for i, c in enumerate(cfg.channels):
      convs.append(Conv2d(cin, int(c), 3, stride=1 if i == 0 else 2, **kw))
      norms.append(GroupNorm(int(c), num_groups=int(cfg.norm_groups), **kw))
      cin = int(c)
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    side = self.image_size // 2 ** (len(cfg.channels) - 1)
    self.features = Dense(side * side * cin, int(cfg.feature_dim), **kw)

  def __call__(self, images: Array) -> Array:
    b, h, w, c = images.shape
    x = images.astype(jnp.float32)
    if (h, w) != (self.image_size, self.image_size):
      x = jax.image.resize(x, (b, self.image_size, self.image_size, c), "bilinear")
    x = 2.0 * x - 1.0
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.silu(norm(conv(x)))
    return jax.nn.silu(self.features(x.reshape(b, -1)))


class ShapesCLIP(nnx.Module):

  def __init__(self, text_cfg, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    d, p = int(text_cfg.hidden_size), int(cfg.projection_dim)
    self.text_model = text_lib.CLIPTextTransformer(text_cfg, **kw)
    self.text_projection = Dense(d, p, use_bias=False, kernel_axes=(EMBED, MLP), **kw)
    self.vision_model = ConvImageTower(cfg, **kw)
    self.visual_projection = Dense(int(cfg.feature_dim), p, use_bias=False,
                                   kernel_axes=(EMBED, MLP), **kw)
    self.logit_scale = make_param(lambda k, s, t: jnp.full(s, LOGIT_SCALE_INIT, t),
                                  rngs.params(), (), param_dtype, ())

  def text_embeds(self, input_ids: Array) -> Array:
    _, pooled = self.text_model(input_ids)
    return _unit(self.text_projection(pooled))

  def image_embeds(self, images: Array) -> Array:
    return _unit(self.visual_projection(self.vision_model(images)))

  def logits_per_text(self, input_ids: Array, images: Array) -> Array:
    """(B_text, B_image) scaled cosine similarities."""
    scale = jnp.exp(jnp.minimum(self.logit_scale[...], LOGIT_SCALE_MAX))
    return scale * self.text_embeds(input_ids) @ self.image_embeds(images).T


def _unit(x: Array) -> Array:
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def contrastive_loss(logits_per_text: Array) -> Array:
  """CLIP's symmetric cross-entropy: pair i is the positive of row i and of column i."""
  labels = jnp.arange(logits_per_text.shape[0])
  lt = jax.nn.log_softmax(logits_per_text, axis=1)[labels, labels]
  li = jax.nn.log_softmax(logits_per_text, axis=0)[labels, labels]
  return -0.5 * (jnp.mean(lt) + jnp.mean(li))


def load(directory: str) -> ShapesCLIP:
  """Both towers, projections and temperature from a directory `train_shapes_clip` wrote."""
  text_cfg = hf_clip.read_text_config(directory)
  with open(os.path.join(directory, hf_clip.CONFIG_FILE)) as f:
    raw = json.load(f)
  if "md_jax_conv_vision_config" not in raw:
    raise hf_clip.CheckpointError(f"{directory}/config.json has no md_jax_conv_vision_config: "
                                  "not a directory md_jax.tools.train_shapes_clip wrote")
  cfg = default_config()
  cfg.update(raw["md_jax_conv_vision_config"])
  cfg.channels = tuple(cfg.channels)
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ShapesCLIP(text_cfg, cfg,
                                                                  rngs=KeyStream(0))))
  template = nnx.to_pure_dict(state)
  flat = {("text_model",) + k: v for k, v in flat_paths(
      hf_clip.load_text_params(directory, text_cfg)).items()}
  reader = hf_clip.SafetensorsReader(directory)
  try:
    for name in reader.keys():
      if name.startswith("md_jax_conv_vision."):
        flat[("vision_model",) + tuple(name.split(".")[1:])] = reader.get(name)
    flat[("text_projection", "kernel")] = reader.get("text_projection.weight").T
    flat[("visual_projection", "kernel")] = reader.get("visual_projection.weight").T
    flat[("logit_scale",)] = reader.get("logit_scale")
  finally:
    reader.close()
  values = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32)), nest_paths(flat))
  nnx.replace_by_pure_dict(state, hf_clip._restore_keys(values, template))  # pylint: disable=protected-access
  return nnx.merge(graphdef, state)

