"""Optimizer: AdamW with the paper's hyper-parameters, plus warmup, schedule and clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup then ``cfg.schedule`` ('constant' | 'cosine' | 'linear')."""
  warmup = int(cfg.warmup_steps)
  peak = float(cfg.learning_rate)
  decay_steps = max(1, int(total_steps) - warmup)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(cfg.final_lr_fraction))
  elif cfg.schedule == "linear":
    after = optax.linear_schedule(peak, peak * float(cfg.final_lr_fraction), decay_steps)
  else:
    raise ValueError(f"config.optim.schedule={cfg.schedule!r}: expected constant|cosine|linear")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params):
  # Biases, norm scales and embeddings' 1-d leaves are not decayed (standard AdamW practice).
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW (lr 1e-3, b1 0.9, b2 0.999, wd 0.01 by default: paper sec. 5.1)."""
  if cfg.name != "adamw":
    raise ValueError(f"config.optim.name={cfg.name!r}: only 'adamw' is implemented")
  chain = []
  if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
  chain.append(
      optax.adamw(
          learning_rate_schedule(cfg, total_steps),
          b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
          weight_decay=float(cfg.weight_decay), mask=_decay_mask))
  # cfg.grad_accum_steps is applied inside the train step (loop.Trainer): one step is still one
  # update of the whole global batch, so schedules, EMA and step counts do not change with it.
  return optax.chain(*chain)


def ema_update(ema, params, decay: float | jax.Array):
  return jax.tree.map(lambda e, p: (e * decay + p.astype(e.dtype) * (1.0 - decay)).astype(e.dtype),
                      ema, params)


def ema_decay(cfg: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """EMA decay with a warmup (min(decay, (1+n)/(10+n))) so early EMA tracks the fast weights."""
  step = step.astype(jnp.float32)
  return jnp.minimum(float(cfg.ema_decay), (1.0 + step) / (10.0 + step))


def grad_accum_steps(config: ml_collections.ConfigDict) -> int:
  """``config.optim.grad_accum_steps``: micro-batches per step (absent, None or 0 mean 1)."""
  return int(config.optim.get("grad_accum_steps", 1) or 1)
