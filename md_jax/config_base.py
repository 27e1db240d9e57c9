"""Defaults every stage config starts from; configs/*.py override what their stage needs.

Every key the loop, trainers or models read exists here, so a mistyped override
(``--config.optim.learnig_rate=...``) fails at flag parsing, naming the key, before any work.
"""

from __future__ import annotations

import os

import ml_collections


def default_compilation_cache() -> str:
  return os.environ.get("MD_JAX_COMPILATION_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "md_jax", "jax_cache"))


def with_compute_dtype(config: ml_collections.ConfigDict, dtype: str) -> ml_collections.ConfigDict:
  """``config`` if it already computes in ``dtype``, else a copy that does (the caller's stays
  as it was): a pod run trains in bfloat16, while TFLite export builds float32 graphs."""
  if config.get("compute_dtype", "float32") == dtype:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.compute_dtype = dtype
  return config


PACKAGE_PREFIX = "md_jax:"


def resolve_asset(path: str) -> str:
  """``md_jax:NAME`` -> the packaged ``md_jax/assets/NAME`` of this installation; any other
  path unchanged. Configs name packaged assets this way so that a checkpoint's stored config
  still finds them on another machine or checkout."""
  path = str(path or "")
  if path.startswith(PACKAGE_PREFIX):
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                        path[len(PACKAGE_PREFIX):])
  return path


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = "diffusion"  # which objective the shared loop runs: 'vae' | 'diffusion'
  c.seed = 0
  c.num_train_steps = 1000
  c.global_batch_size = 32
  c.compute_dtype = "float32"  # 'bfloat16' on accelerators; params stay float32
  c.ema_decay = 0.999  # 0 disables the EMA copy
  c.log_every = 50
  c.eval_every = 0  # 0: evaluate only at the end
  c.eval_at_end = True
  c.progress_bar = True
  c.check_finite_every = 1
  c.compilation_cache_dir = default_compilation_cache()
  c.peak_flops_per_device = 0.0  # 0: look up by device kind (for MFU)
  c.init_from = ""  # workdir of a run whose params (and EMA) initialise this one
  c.vae_workdir = ""  # workdir of the trained VAE (diffusion stages read latents through it)

  # Mesh: batch rows are split over data x fsdp; fsdp also splits the big kernels.
  c.mesh_shape = (-1, 1, 1)
  c.mesh_axes = ("data", "fsdp", "tensor")
  c.sharding_rules = (
      ("embed", "fsdp"),
      ("conv_out", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("conv_in", None),
      ("vocab", None),
      ("norm", None),
  )

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw",
      learning_rate=1e-3,  # paper sec. 5.1
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.01,
      warmup_steps=1000,  # ours: the paper does not say
      schedule="constant",
      final_lr_fraction=0.0,
      grad_clip_norm=1.0,
      grad_accum_steps=1,  # micro-batches per step (same global batch, 1/k the activations)
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(every=1000, max_to_keep=3, async_save=True))
  # Held-out loss: the objective's loss on num_batches fixed batches of held-out data with fixed
  # noise (same draws at every evaluation), so it is comparable across steps and runs, unlike the
  # training loss. Logged as val/loss (and val/loss_ema) at the start of a fresh run, every
  # `every` steps (0: start and end only) and at the end; also appended to WORKDIR/val.jsonl.
  c.val = ml_collections.ConfigDict(dict(num_batches=0, every=0, seed=0))
  # Test hooks: poison the loss at one step; slow every step down (to interrupt a run mid-way).
  # Test hooks: a NaN injected into the loss, a sleep per step, a SIGTERM sent to this process
  # after the given step (a preemption at a known step).
  c.debug = ml_collections.ConfigDict(dict(inject_nan_at_step=-1, step_sleep_s=0.0,
                                           sigterm_at_step=-1))
  return c
