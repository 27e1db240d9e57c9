"""DDIM, DPM-Solver++(2M) (both with classifier-free guidance) and one-step sampling.

apply_fn(x_t, t, context) -> model output in the schedule's prediction type, t float32 (B,).
Samplers are pure functions built on lax.fori_loop; wrap them in jax.jit with the step count,
apply_fn and schedule metadata static (they are Python values here).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from md_jax.diffusion import guidance
from md_jax.diffusion import schedule as sch

ApplyFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = "trailing") -> np.ndarray:
  """Descending integer timesteps.

  'trailing' (Lin et al. 2023) starts at T-1, the pure-noise step the zero-terminal-SNR schedule
  trained on, and ends at T/num_steps - 1. 'leading' (the SD/DDIM default) starts at
  T - T/num_steps and ends at 0, i.e. it never visits t = T-1.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
  if spacing == "trailing":
    ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)).astype(np.int64) - 1
  elif spacing == "leading":
    ts = (np.arange(num_steps) * (num_timesteps // num_steps))[::-1]
  else:
    raise ValueError(f"Unknown spacing {spacing!r}; expected 'trailing' or 'leading'.")
  return np.ascontiguousarray(ts[:num_steps]).astype(np.int32)


def _is_one(x) -> bool:
  return isinstance(x, (int, float)) and float(x) == 1.0


def _model_output(apply_fn, x, t_int, context, null_context, guidance_scale, guidance_rescale):
  """One network call; with CFG, cond and uncond rows are stacked into a single 2B batch."""
  b = x.shape[0]
  t = jnp.broadcast_to(jnp.asarray(t_int), (b,)).astype(jnp.float32)
  if null_context is None:
    return apply_fn(x, t, context)
  null = jax.tree_util.tree_map(
      lambda n, c: jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape), null_context, context)
  ctx2 = jax.tree_util.tree_map(lambda c, n: jnp.concatenate([c, n], axis=0), context, null)
  out = apply_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), ctx2)
  cond, uncond = out[:b], out[b:]
  return guidance.cfg_combine(cond, uncond, guidance_scale, guidance_rescale)


def _resolve_guidance(null_context, guidance_scale):
  if _is_one(guidance_scale):
    return None
  if null_context is None:
    raise ValueError("guidance_scale != 1 requires null_context (the empty-prompt context).")
  return null_context


def ddim_sample(
    sched: sch.NoiseSchedule,
    apply_fn: ApplyFn,
    x_T: jax.Array,
    context: Any,
    *,
    num_steps: int = 50,
    null_context: Any = None,
    guidance_scale=1.0,
    guidance_rescale: float = 0.0,
    eta: float = 0.0,
    rng: jax.Array | None = None,
    spacing: str = "trailing",
) -> jax.Array:
  """DDIM from x_T down to x0; the last update jumps to alpha = 1, returning the x0 estimate."""
  ts = ddim_timesteps(sched.num_timesteps, num_steps, spacing)
  sch.check_x0_defined(sched, int(ts[0]))
  null_context = _resolve_guidance(null_context, guidance_scale)
  if eta != 0.0 and rng is None:
    raise ValueError("eta > 0 needs rng.")
  if rng is None:
    rng = jax.random.PRNGKey(0)  # unused when eta == 0; keeps the loop carry uniform

  ts_j = jnp.asarray(ts)
  a_all, s_all = sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod
  a_prev = jnp.concatenate([a_all[ts_j[1:]], jnp.ones((1,), jnp.float32)])
  s_prev = jnp.concatenate([s_all[ts_j[1:]], jnp.zeros((1,), jnp.float32)])

  def body(i, carry):
    x, key = carry
    t = ts_j[i]
    out = _model_output(apply_fn, x, t, context, null_context, guidance_scale, guidance_rescale)
    x0 = sch.pred_to_x0(sched, out, x, t)
    eps = sch.pred_to_eps(sched, out, x, t)
    a_t, s_t = a_all[t], s_all[t]
    ap, sp = a_prev[i], s_prev[i]
    # DDIM's stochasticity (Song et al. eq. 16); zero at eta=0 and on the final jump (sp=0).
    var = (sp**2 / s_t**2) * (1.0 - a_t**2 / ap**2)
    noise_std = eta * jnp.sqrt(jnp.maximum(var, 0.0))
    dir_std = jnp.sqrt(jnp.maximum(sp**2 - noise_std**2, 0.0))
    x_new = ap * x0 + dir_std * eps
    if eta != 0.0:
      key, sub = jax.random.split(key)
      x_new = x_new + noise_std * jax.random.normal(sub, x.shape, x.dtype)
    return x_new.astype(x.dtype), key

  x, _ = jax.lax.fori_loop(0, len(ts), body, (x_T.astype(jnp.float32), rng))
  return x


def dpmpp_2m_sample(
    sched: sch.NoiseSchedule,
    apply_fn: ApplyFn,
    x_T: jax.Array,
    context: Any,
    *,
    num_steps: int = 20,
    null_context: Any = None,
    guidance_scale=1.0,
    guidance_rescale: float = 0.0,
    spacing: str = "trailing",
) -> jax.Array:
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): the multistep second-order solver of the
  probability-flow ODE in data (x0) prediction, one network call per step.

  With lambda = log(alpha / sigma) and h = lambda_next - lambda_cur, one step is
    x_next = (sigma_next / sigma_cur) x + (alpha_next - alpha_cur sigma_next / sigma_cur) D,
    D = x0_cur + (h / (2 h_prev)) (x0_cur - x0_prev),
  which is the paper's update with alpha(e^-h - 1) written without dividing by alpha, so the
  zero-terminal-SNR start (alpha = 0, lambda = -inf, h = inf) is finite: the first step is the
  first-order (DDIM) one, and so is the step after it (h_prev infinite). The last step goes to
  alpha = 1, sigma = 0 (lambda = +inf), where the second-order term is undefined; it is taken
  first order and returns the x0 estimate, as DDIM's last jump does. sigma_cur > 0 at every
  visited timestep, so nothing divides by zero.
  """
  ts = ddim_timesteps(sched.num_timesteps, num_steps, spacing)
  sch.check_x0_defined(sched, int(ts[0]))
  null_context = _resolve_guidance(null_context, guidance_scale)
  n = len(ts)
  ts_j = jnp.asarray(ts)
  a_all, s_all = sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod
  a_cur, s_cur = a_all[ts_j], s_all[ts_j]
  a_next = jnp.concatenate([a_all[ts_j[1:]], jnp.ones((1,), jnp.float32)])
  s_next = jnp.concatenate([s_all[ts_j[1:]], jnp.zeros((1,), jnp.float32)])
  lam_cur = jnp.log(a_cur) - jnp.log(s_cur)  # -inf at alpha = 0
  lam_next = jnp.log(a_next) - jnp.log(s_next)  # +inf at the final sigma = 0
  h = lam_next - lam_cur
  h_prev = jnp.concatenate([jnp.full((1,), jnp.inf, jnp.float32), h[:-1]])
  k = jnp.arange(n)
  second = (k > 0) & (k < n - 1) & jnp.isfinite(h) & jnp.isfinite(h_prev)
  corr = jnp.where(second, h / jnp.where(second, 2.0 * h_prev, 1.0), 0.0)
  ratio = s_next / s_cur
  coef_d = a_next - a_cur * ratio

  def body(i, carry):
    x, x0_prev = carry
    t = ts_j[i]
    out = _model_output(apply_fn, x, t, context, null_context, guidance_scale, guidance_rescale)
    x0 = sch.pred_to_x0(sched, out, x, t)
    d = x0 + corr[i] * (x0 - x0_prev)
    x_new = ratio[i] * x + coef_d[i] * d
    return x_new.astype(x.dtype), x0.astype(x.dtype)

  x_T = x_T.astype(jnp.float32)
  x, _ = jax.lax.fori_loop(0, n, body, (x_T, jnp.zeros_like(x_T)))
  return x


SAMPLERS = ("ddim", "dpmpp2m", "onestep")


def onestep_sample(
    sched: sch.NoiseSchedule,
    apply_fn: ApplyFn,
    x_T: jax.Array,
    context: Any,
    t: int | None = None,
    *,
    null_context: Any = None,
    guidance_scale=1.0,
    guidance_rescale: float = 0.0,
) -> jax.Array:
  """x0 = convert(apply_fn(x_T, t)) with t = T-1 by default: the UFOGen generator / export path.

  With the zero-terminal-SNR v-prediction default, alpha_T = 0 and sigma_T = 1, so this is
  x0 = -v. `t` must be a Python int (it selects a constant, and is checked for the eps case).
  """
  t = sched.num_timesteps - 1 if t is None else int(t)
  sch.check_x0_defined(sched, t)
  null_context = _resolve_guidance(null_context, guidance_scale)
  x_T = x_T.astype(jnp.float32)
  out = _model_output(apply_fn, x_T, t, context, null_context, guidance_scale, guidance_rescale)
  return sch.pred_to_x0(sched, out, x_T, jnp.full((x_T.shape[0],), t, jnp.int32))
