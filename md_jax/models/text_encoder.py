"""The CLIP text transformer (the text tower of CLIP ViT-L/14 used by the paper), in NNX.

`CLIPTextTransformer(cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32)` where `cfg` has
the fields of transformers.CLIPTextConfig: vocab_size, hidden_size, intermediate_size,
num_hidden_layers, num_attention_heads, max_position_embeddings, layer_norm_eps, eos_token_id,
hidden_act ('quick_gelu' | 'gelu'). `CLIPTextTransformer.from_hf_config(hf_config, rngs=...)`
accepts a transformers.CLIPTextConfig (or anything with those attributes / keys).

`__call__(input_ids int32 (B, L)) -> (last_hidden_state (B, L, D), pooled (B, D))`, L <=
max_position_embeddings; float32 outputs.

Attribute paths mirror HF's `CLIPTextTransformer` so a safetensors loader maps names 1:1 after
dropping the `text_model.` prefix:
  embeddings.token_embedding.embedding      <- embeddings.token_embedding.weight
  embeddings.position_embedding.embedding   <- embeddings.position_embedding.weight
  encoder.layers[i].self_attn.{q,k,v,out}_proj.{kernel,bias} <- ....weight.T / .bias
  encoder.layers[i].layer_norm{1,2}.{scale,bias}, encoder.layers[i].mlp.fc{1,2}.{kernel,bias}
  final_layer_norm.{scale,bias}
(HF Linear weights are (out, in); `kernel` is (in, out), so the loader transposes.)
The loader is md_jax/models/hf_clip.py: `load_hf_text_encoder(directory)` reads a Hugging Face
model directory (config.json + safetensors) without torch.

The token lookup is the graph's only gather (TFLite GATHER); the pooled row is selected with a
one-hot contraction instead of a second gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from md_jax.models.attention import dot_product_attention
from md_jax.models.layers import (EMBED, HEADS, MLP, VOCAB, Dense, LayerNorm, get_activation,
                                  make_param)

Array = jax.Array

CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings", "layer_norm_eps",
                 "eos_token_id", "hidden_act")


def default_config() -> ml_collections.ConfigDict:
  """CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14)."""
  return ml_collections.ConfigDict(dict(
      vocab_size=49408,
      hidden_size=768,
      intermediate_size=3072,
      num_hidden_layers=12,
      num_attention_heads=12,
      max_position_embeddings=77,
      layer_norm_eps=1e-5,
      # The real end-of-text id; it is also the largest id, so the legacy argmax rule agrees.
      eos_token_id=49407,
      hidden_act="quick_gelu",
  ))


def tiny_config() -> ml_collections.ConfigDict:
  cfg = default_config()
  cfg.vocab_size = 64
  cfg.hidden_size = 32
  cfg.intermediate_size = 64
  cfg.num_hidden_layers = 2
  cfg.num_attention_heads = 4
  cfg.max_position_embeddings = 16
  cfg.eos_token_id = 63
  return cfg


def _normal(std: float):
  def init(key, shape, dtype):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  return init


class Embedding(nnx.Module):

  def __init__(self, num: int, dim: int, *, axes, std: float = 0.02, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.dtype = dtype
    self.embedding = make_param(_normal(std), rngs.params(), (num, dim), param_dtype, axes)


class CLIPTextEmbeddings(nnx.Module):

  def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.dtype = dtype
    self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, axes=(VOCAB, EMBED), **kw)
    self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                        axes=(None, EMBED), std=0.01, **kw)

  def __call__(self, input_ids: Array) -> Array:
    length = input_ids.shape[1]
    tokens = jnp.take(self.token_embedding.embedding[...], input_ids, axis=0)
    positions = self.position_embedding.embedding[...][:length]
    return (tokens + positions[None]).astype(self.dtype)


class CLIPAttention(nnx.Module):

  def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    d = cfg.hidden_size
    self.num_heads = cfg.num_attention_heads
    if d % self.num_heads:
      raise ValueError(f"hidden_size {d} not divisible by {self.num_heads} heads")
    self.head_dim = d // self.num_heads
    self.q_proj = Dense(d, d, kernel_axes=(EMBED, HEADS), **kw)
    self.k_proj = Dense(d, d, kernel_axes=(EMBED, HEADS), **kw)
    self.v_proj = Dense(d, d, kernel_axes=(EMBED, HEADS), **kw)
    self.out_proj = Dense(d, d, kernel_axes=(HEADS, EMBED), **kw)

  def __call__(self, x: Array, mask: Array) -> Array:
    b, l, d = x.shape
    h, hd = self.num_heads, self.head_dim
    q = self.q_proj(x).reshape(b, l, h, hd)
    k = self.k_proj(x).reshape(b, l, h, hd)
    v = self.v_proj(x).reshape(b, l, h, hd)
    out = dot_product_attention(q, k, v, kind="softmax", mask=mask)
    return self.out_proj(out.reshape(b, l, d))


class CLIPMLP(nnx.Module):

  def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.hidden_act = cfg.hidden_act
    self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, kernel_axes=(EMBED, MLP), **kw)
    self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, kernel_axes=(MLP, EMBED), **kw)

  def __call__(self, x: Array) -> Array:
    return self.fc2(get_activation(self.hidden_act)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):

  def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.self_attn = CLIPAttention(cfg, **kw)
    self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
    self.mlp = CLIPMLP(cfg, **kw)
    self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

  def __call__(self, x: Array, mask: Array) -> Array:
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):

  def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.layers = nnx.List([
        CLIPEncoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        for _ in range(cfg.num_hidden_layers)
    ])

  def __call__(self, x: Array, mask: Array) -> Array:
    for layer in self.layers:
      x = layer(x, mask)
    return x


class CLIPTextTransformer(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if cfg.hidden_act not in ("quick_gelu", "gelu"):
      raise ValueError(f"hidden_act {cfg.hidden_act!r} not supported")
    self.eos_token_id = cfg.eos_token_id
    self.max_positions = cfg.max_position_embeddings
    self.embeddings = CLIPTextEmbeddings(cfg, **kw)
    self.encoder = CLIPEncoder(cfg, **kw)
    self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

  @classmethod
  def from_hf_config(cls, hf_config, *, rngs: nnx.Rngs, dtype=jnp.float32,
                     param_dtype=jnp.float32) -> "CLIPTextTransformer":
    if isinstance(hf_config, dict):
      values = {k: hf_config[k] for k in CONFIG_FIELDS}
    else:
      values = {k: getattr(hf_config, k) for k in CONFIG_FIELDS}
    return cls(ml_collections.ConfigDict(values), rngs=rngs, dtype=dtype,
               param_dtype=param_dtype)

  def eos_positions(self, input_ids: Array) -> Array:
    """Index of the pooled token per row.

    eos_token_id None or 2 marks old CLIP configs whose EOS is the largest id: take argmax(ids),
    as HF does. Otherwise take the first position holding eos_token_id; a row without it falls
    back to argmax(ids) rather than HF's silent position 0.
    """
    by_max = jnp.argmax(input_ids, axis=-1)
    if self.eos_token_id is None or self.eos_token_id == 2:
      return by_max
    is_eos = input_ids == self.eos_token_id
    return jnp.where(jnp.any(is_eos, axis=-1), jnp.argmax(is_eos, axis=-1), by_max)

  def __call__(self, input_ids: Array) -> tuple[Array, Array]:
    b, l = input_ids.shape
    if l > self.max_positions:
      raise ValueError(f"sequence length {l} > max_position_embeddings {self.max_positions}")
    input_ids = input_ids.astype(jnp.int32)
    causal = jnp.tril(jnp.ones((l, l), dtype=bool))[None, None]
    h = self.encoder(self.embeddings(input_ids), causal)
    h = self.final_layer_norm(h).astype(jnp.float32)
    select = jax.nn.one_hot(self.eos_positions(input_ids), l, dtype=h.dtype)
    pooled = jnp.einsum("bl,bld->bd", select, h)
    return h, pooled
