"""CLIP's vision tower and the two-tower CLIPModel (image/text embeddings), in NNX.

Used by the CLIP-score evaluator (paper sec. 5.1, Table 2: OpenCLIP ViT-g/14); any size loads
from a Hugging Face CLIPModel directory through md_jax/models/hf_clip.py (`load_clip_model`).
The transformer layers are the text tower's (`text_encoder.CLIPEncoder`) without the causal mask.

`CLIPVisionTransformer(cfg)`, cfg with the fields of transformers.CLIPVisionConfig
(`VISION_CONFIG_FIELDS`): `__call__(pixel_values NHWC, CLIP-normalised, image_size square) ->
(last_hidden_state (B, 1 + P, D), pooled (B, D))`, pooled = post_layernorm(class token).

`CLIPModel(text_cfg, vision_cfg, projection_dim)`: `get_image_features(pixel_values)` and
`get_text_features(input_ids)` as transformers' CLIPModel (projections without bias, no
normalisation). Attribute paths mirror HF's (`vision_model.embeddings.patch_embedding`,
`vision_model.pre_layrnorm` with HF's spelling, `visual_projection`, ...). Tensors stay rank <= 4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from md_jax.models import text_encoder as text_lib
from md_jax.models.layers import EMBED, MLP, Conv2d, Dense, LayerNorm, make_param

Array = jax.Array

VISION_CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "image_size", "patch_size", "num_channels",
                        "layer_norm_eps", "hidden_act")


class CLIPVisionEmbeddings(nnx.Module):

  def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    d, p = int(cfg.hidden_size), int(cfg.patch_size)
    if int(cfg.image_size) % p:
      raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {p}")
    self.image_size, self.patch_size = int(cfg.image_size), p
    self.num_positions = (self.image_size // p) ** 2 + 1
    self.dtype = dtype
    init = lambda std: (lambda key, shape, dt: (std * jax.random.normal(key, shape)).astype(dt))
    self.class_embedding = make_param(init(d ** -0.5), rngs.params(), (d,), param_dtype, (EMBED,))
    # Stride = kernel = patch: SAME padding adds nothing, so this is the non-overlapping patchify.
    self.patch_embedding = Conv2d(int(cfg.num_channels), d, p, stride=p, use_bias=False,
                                  rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.position_embedding = text_lib.Embedding(self.num_positions, d, axes=(None, EMBED),
                                                 rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, pixel_values: Array) -> Array:
    b, h, w, _ = pixel_values.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"CLIP vision tower takes {self.image_size}x{self.image_size} images, "
                       f"got {h}x{w} (preprocess with evaluators.clip_score.preprocess)")
    patches = self.patch_embedding(pixel_values)
    patches = patches.reshape(b, -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype),
                           (b, 1, patches.shape[-1]))
    x = jnp.concatenate([cls, patches], axis=1)
    return (x + self.position_embedding.embedding[...][None].astype(x.dtype)).astype(self.dtype)


class CLIPVisionTransformer(nnx.Module):

  def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if cfg.hidden_act not in ("quick_gelu", "gelu"):
      raise ValueError(f"hidden_act {cfg.hidden_act!r} not supported")
    self.image_size = int(cfg.image_size)
    self.embeddings = CLIPVisionEmbeddings(cfg, **kw)
    self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
    self.encoder = text_lib.CLIPEncoder(cfg, **kw)
    self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

  def __call__(self, pixel_values: Array) -> tuple[Array, Array]:
    h = self.pre_layrnorm(self.embeddings(pixel_values))
    h = self.encoder(h, None).astype(jnp.float32)
    return h, self.post_layernorm(h[:, 0]).astype(jnp.float32)


class CLIPModel(nnx.Module):
  """Text and vision towers with their projections into the shared embedding space."""

  def __init__(self, text_cfg, vision_cfg, projection_dim: int, *, rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.text_model = text_lib.CLIPTextTransformer(text_cfg, **kw)
    self.vision_model = CLIPVisionTransformer(vision_cfg, **kw)
    self.visual_projection = Dense(int(vision_cfg.hidden_size), int(projection_dim),
                                   use_bias=False, kernel_axes=(EMBED, MLP), **kw)
    self.text_projection = Dense(int(text_cfg.hidden_size), int(projection_dim), use_bias=False,
                                 kernel_axes=(EMBED, MLP), **kw)

  def get_image_features(self, pixel_values: Array) -> Array:
    _, pooled = self.vision_model(pixel_values)
    return self.visual_projection(pooled).astype(jnp.float32)

  def get_text_features(self, input_ids: Array) -> Array:
    _, pooled = self.text_model(input_ids)
    return self.text_projection(pooled).astype(jnp.float32)
