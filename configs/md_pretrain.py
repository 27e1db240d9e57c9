"""MobileDiffusion pretraining at the paper's size, on pods: ``--config=configs/md_pretrain.py:256``
then ``:512`` (progressive training, paper sec. 5.1; DESIGN 1 stage 3).

  256  latent 32x32, global batch 4096, 750k steps, from scratch
  512  latent 64x64, global batch 2048, 250k steps, ``--config.init_from=WORKDIR_OF_THE_256_RUN``

The network is configs/md.py's (Table 6), loaded from that file, not repeated here. Required at
launch (no defaults can be right): ``--config.data.source`` (a directory written by
``python -m md_jax.data.prepare`` or ``tfds:NAME[:SPLIT]``), ``--config.text.hf_dir`` (a local copy
of openai/clip-vit-large-patch14: config.json, safetensors, tokenizer files) and
``--config.vae_workdir`` (the trained paper-size VAE run). ``--config.text.cache_dir`` optionally
reads precomputed caption embeddings (shapes data only, see md_jax/tools/build_text_cache.py).

Fitting a smaller slice: the global batch is fixed by the paper; ``optim.grad_accum_steps = k`` runs
it as k micro-batches per step (same update, 1/k of the activation memory), ``unet.remat`` trades
recompute for activation memory, and ``mesh_shape`` = (data, fsdp, tensor) decides how far params
and optimizer state are split. ``python -m md_jax.tools.aot_compile`` checks a choice against a TPU
topology's HBM without a TPU.
"""

from __future__ import annotations

import ml_collections

from md_jax import config_loading

# The paper's progressive schedule (sec. 5.1).
STAGES = {
    256: dict(global_batch_size=4096, num_train_steps=750_000),
    512: dict(global_batch_size=2048, num_train_steps=250_000),
}
# fsdp 8 divides every UNet width (320, 640, 1024, 1280) and CLIP's 768, so the big kernels and
# their Adam moments split 8 ways; the remaining chips of a slice form the data axis.
FSDP = 8


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  resolution = int(arg or 256)
  if resolution not in STAGES:
    raise ValueError(f"configs/md_pretrain.py:{arg}: stage must be one of {tuple(STAGES)}")
  c = config_loading.config_module("md", __file__).network_config(str(resolution), "md")
  # Objective sections (schedule, prediction, sampler) are the shapes chain's, so the pod run
  # trains exactly what the embedded run tested: v-prediction on a zero-terminal-SNR schedule.
  shapes = config_loading.config_module("shapes", __file__).get_config("lowres")
  c.stage = f"md_pretrain_{resolution}"
  c.trainer = "diffusion"
  c.diffusion = ml_collections.ConfigDict(shapes.diffusion.to_dict())
  c.diffusion.snr_shift = 1.0  # the scaled_linear schedule at the latent size it was made for
  c.sample = ml_collections.ConfigDict(shapes.sample.to_dict())
  c.update(STAGES[resolution])

  c.data = ml_collections.ConfigDict(shapes.data.to_dict())
  c.data.update(dict(
      name="records",
      image_size=resolution,
      max_length=c.context_length,  # CLIP's 77 tokens
      source="",  # required: prepared ArrayRecord directory or tfds:NAME[:SPLIT]
      tfds_data_dir="",
  ))

  # The frozen CLIP ViT-L/14 text tower (sec. 3.1), weights and tokenizer from one local dir.
  c.text.update(dict(
      tokenizer_dir="",  # "" = text.hf_dir
      frozen=True,
      seed=0,
      cache_dir="",
      hf_dir="",  # required
  ))

  # Precision and memory: params and optimizer state in float32, compute in bfloat16.
  c.compute_dtype = "bfloat16"
  c.unet.remat = True
  c.mesh_shape = (-1, FSDP, 1)  # axes and sharding rules: config_base's (embed/conv_out -> fsdp)

  # AdamW as the paper (sec. 5.1); warmup, clipping and EMA are ours (the paper does not say).
  c.optim.update(dict(name="adamw", learning_rate=1e-3, b1=0.9, b2=0.999, weight_decay=0.01,
                      warmup_steps=10_000 if resolution == 256 else 1_000, schedule="constant",
                      grad_clip_norm=1.0, grad_accum_steps=1))
  c.ema_decay = 0.9999
  c.log_every = 100
  c.checkpoint.update(dict(every=5_000, max_to_keep=3, async_save=True))
  # The built-in evaluation judges shapes prompts; real-data runs evaluate separately.
  c.eval_every = 0
  c.eval_at_end = False
  c.progress_bar = False
  c.init_from = ""  # :512 -> the :256 run's workdir (params and EMA)
  return c

