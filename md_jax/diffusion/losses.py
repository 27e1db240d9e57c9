"""Denoising training loss and caption dropout for classifier-free guidance."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from md_jax.diffusion import schedule as sch

ApplyFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def min_snr_weight(sched: sch.NoiseSchedule, t: jax.Array, gamma: float) -> jax.Array:
  """Min-SNR-gamma weights (Hang et al. 2023), expressed for the schedule's prediction type.

  Min-SNR is defined as min(snr, gamma) * ||x0 - x0_hat||^2; the regression error of each
  parameterisation is a fixed multiple of the x0 error (eps: snr, v: snr + 1, x0: 1), so the
  weight is divided by that multiple. Note the terminal step of a zero-terminal-SNR schedule has
  snr = 0 and therefore weight 0 under v-prediction.
  """
  s = sch.snr(sched, t)
  p = sched.prediction_type
  if p == "v":
    return jnp.minimum(s, gamma) / (s + 1.0)
  if p == "eps":
    # min(snr, g) / snr written as min(1, g / snr) so snr = 0 gives weight 1, not nan.
    return jnp.minimum(1.0, gamma / jnp.maximum(s, 1e-20))
  if p == "x0":
    return jnp.minimum(s, gamma)
  raise ValueError(f"Unknown prediction_type {p!r}")


def diffusion_loss(
    sched: sch.NoiseSchedule,
    apply_fn: ApplyFn,
    x0: jax.Array,
    context: Any,
    rng: jax.Array,
    *,
    loss_weighting: str = "none",
    min_snr_gamma: float = 5.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted MSE between apply_fn(x_t, t, context) and the prediction-type target.

  t ~ U{0..T-1}, noise ~ N(0, I), both from `rng` (so the loss is a deterministic function of
  its inputs). The network receives t as float32. Per-example MSE (mean over non-batch axes) is
  weighted, then averaged over the batch.
  Returns (loss, aux) with aux = {'per_example_loss' (weighted), 'mse' (unweighted, per example),
  't', 'weight'}.
  """
  b = x0.shape[0]
  t_rng, n_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (b,), 0, sched.num_timesteps, dtype=jnp.int32)
  x0 = x0.astype(jnp.float32)
  noise = jax.random.normal(n_rng, x0.shape, jnp.float32)
  x_t = sch.q_sample(sched, x0, t, noise)
  pred = apply_fn(x_t, t.astype(jnp.float32), context).astype(jnp.float32)
  tgt = sch.target(sched, x0, noise, t)
  mse = jnp.mean(jnp.square(pred - tgt), axis=tuple(range(1, x0.ndim)))
  if loss_weighting == "none":
    weight = jnp.ones_like(mse)
  elif loss_weighting == "min_snr":
    weight = min_snr_weight(sched, t, min_snr_gamma)
  else:
    raise ValueError(f"Unknown loss_weighting {loss_weighting!r}; expected 'none' or 'min_snr'.")
  per_example = weight * mse
  return jnp.mean(per_example), {"per_example_loss": per_example, "mse": mse, "t": t, "weight": weight}


def drop_captions(context: Any, null_context: Any, rng: jax.Array, p: float) -> Any:
  """Replaces each batch row of `context` by `null_context` with probability p.

  Works on embeddings (B, L, D) or on token ids (B, L) when the data pipeline drops captions at
  the token level before the text encoder, and on matching pytrees (e.g. {'ids', 'mask'}) with one
  shared draw per row. `null_context` leaves need only broadcast to one row: (L, D), (1, L, D) or
  the full (B, L, D) all work.
  """
  leaves = jax.tree_util.tree_leaves(context)
  b = leaves[0].shape[0]
  drop = jax.random.bernoulli(rng, p, (b,))

  def pick(c, n):
    n = jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)
    return jnp.where(drop.reshape((b,) + (1,) * (c.ndim - 1)), n, c)

  return jax.tree_util.tree_map(pick, context, null_context)
