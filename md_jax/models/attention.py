"""Multi-head attention with softmax or ReLU weights (paper 3.2), rank <= 4 throughout.

`Attention(query_dim, *, num_heads, head_dim, context_dim=None, shared_kv=False,
kind='softmax', qkv_bias=False, out_bias=True, rngs, dtype, param_dtype)`:
context_dim=None makes it self-attention. `shared_kv` uses one projection for keys and values
(W_K = W_V, paper 3.2), which only makes sense for self-attention and is applied wherever asked.

Heads are split by reshaping (B, L, heads*d) to (B, L, heads, d) and contracting with einsum into
(B, heads, Lq, Lk), so no rank-5 tensor appears (DESIGN 6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from md_jax.models.layers import EMBED, HEADS, Dense

Array = jax.Array

ATTENTION_KINDS = ("softmax", "relu")


def dot_product_attention(q: Array, k: Array, v: Array, *, kind: str = "softmax",
                          mask: Array | None = None) -> Array:
  """q (B,Lq,H,D), k/v (B,Lk,H,D) -> (B,Lq,H,D).

  kind='relu': weights = relu(QK^T/sqrt(D)) / Lk (Wortsman et al.), Lk counting every key,
  padding included, so a checkpoint finetuned from softmax sees a fixed normaliser.
  mask: boolean, broadcastable to (B,H,Lq,Lk), True = attend.
  """
  if kind not in ATTENTION_KINDS:
    raise ValueError(f"attention kind {kind!r} not in {ATTENTION_KINDS}")
  dtype = q.dtype
  depth = q.shape[-1]
  num_keys = k.shape[1]
  q = q * jnp.asarray(depth ** -0.5, dtype)
  # Logits and their normalisation in float32: bf16 exp/sum over hundreds of keys drifts.
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  if kind == "softmax":
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
  else:
    weights = jax.nn.relu(logits)
    if mask is not None:
      weights = jnp.where(mask, weights, 0.0)
    weights = weights * (1.0 / num_keys)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), v)


class Attention(nnx.Module):

  def __init__(self, query_dim: int, *, num_heads: int, head_dim: int,
               context_dim: int | None = None, shared_kv: bool = False, kind: str = "softmax",
               qkv_bias: bool = False, out_bias: bool = True, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    if kind not in ATTENTION_KINDS:
      raise ValueError(f"attention kind {kind!r} not in {ATTENTION_KINDS}")
    self.num_heads, self.head_dim = num_heads, head_dim
    self.is_cross = context_dim is not None
    self.shared_kv = shared_kv
    self.kind = kind
    self.dtype = dtype
    inner = num_heads * head_dim
    kv_dim = context_dim if context_dim is not None else query_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.to_q = Dense(query_dim, inner, use_bias=qkv_bias, kernel_axes=(EMBED, HEADS), **kw)
    self.to_k = Dense(kv_dim, inner, use_bias=qkv_bias, kernel_axes=(EMBED, HEADS), **kw)
    self.to_v = (None if shared_kv else
                 Dense(kv_dim, inner, use_bias=qkv_bias, kernel_axes=(EMBED, HEADS), **kw))
    self.to_out = Dense(inner, query_dim, use_bias=out_bias, kernel_axes=(HEADS, EMBED), **kw)

  def __call__(self, x: Array, context: Array | None = None, mask: Array | None = None) -> Array:
    """x (B, Lq, query_dim), context (B, Lk, context_dim) or None for self-attention."""
    ctx = x if context is None else context
    b, lq, _ = x.shape
    lk = ctx.shape[1]
    h, d = self.num_heads, self.head_dim
    q = self.to_q(x).reshape(b, lq, h, d)
    k = self.to_k(ctx)
    v = k if self.to_v is None else self.to_v(ctx)
    k = k.reshape(b, lk, h, d)
    v = v.reshape(b, lk, h, d)
    out = dot_product_attention(q, k, v, kind=self.kind, mask=mask)
    return self.to_out(out.reshape(b, lq, h * d))
