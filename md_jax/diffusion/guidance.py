"""Classifier-free guidance."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cfg_combine(cond: jax.Array, uncond: jax.Array, scale, rescale: float = 0.0) -> jax.Array:
  """uncond + scale * (cond - uncond), optionally with Lin et al. 2023 guidance rescale.

  Rescale (phi = `rescale`) counters the over-exposure that large scales cause with
  zero-terminal-SNR + v-prediction: the guided output is renormalised to the per-example std of
  the conditional output and blended back with weight phi. It acts on the raw model output (as in
  Lin et al., where that output is v).
  """
  guided = uncond + scale * (cond - uncond)
  if isinstance(rescale, (int, float)) and rescale == 0.0:
    return guided
  axes = tuple(range(1, guided.ndim))
  std_cond = jnp.std(cond, axis=axes, keepdims=True)
  std_guided = jnp.std(guided, axis=axes, keepdims=True)
  factor = std_cond / jnp.maximum(std_guided, 1e-12)
  return guided * (rescale * factor + (1.0 - rescale))
