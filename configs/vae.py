"""The MobileDiffusion VAE at full size (paper sec. 3.5): ``--config=configs/vae.py``.

SD-like widths (128, 256, 512, 512) with f = 8 and c = 8 latent channels (SD: c = 4). The loss is
the paper's list: L2 reconstruction + KL + perceptual (LPIPS) + a patch-GAN adversarial term that
switches on after ``vae.adversarial.start_step``. The perceptual term is present but off
(``vae.perceptual.weight=0``) until LPIPS weights are supplied; the trainer refuses a positive
weight without them. Per-channel latent shift/scale are measured after training and stored in the
checkpoint's ``frozen`` part for every later stage and export.

The networks and loss only: training at this size needs a real image source (configs/shapes.py
is the embedded stand-in with the same structure at toy widths).
"""

from __future__ import annotations

import ml_collections

from md_jax import config_base
from md_jax.models import vae as vae_lib
from md_jax.train import vae as vae_trainer


def vae_config() -> ml_collections.ConfigDict:
  """The full-size VAE network and loss keys (``config.vae``)."""
  v = vae_lib.default_config()
  v.update(dict(
      channels=(128, 256, 512, 512),  # SD's widths; 4 levels -> f = 8 (paper sec. 3.5)
      num_res_blocks=2,  # SD: 2 per encoder level, 3 per decoder level
      latent_channels=8,  # paper: c = 8 (SD 4, EMU 16)
      norm_groups=32,
      mid_attention=True,
      decoder_channels=None,  # None: the full decoder mirrors the encoder
      decoder_res_blocks=None,
      train_crop=256,  # fully convolutional: 256px crops of the 512px images
      recon_loss="l2",  # paper: L2 reconstruction
      grad_loss_weight=0.0,
      kl_weight=1e-6,  # SD's, in its convention (train/vae.kl_term_weight)
      stats_batches=32,  # batches that measure the per-channel latent shift/scale
  ))
  v.adversarial = vae_trainer.default_adversarial_config()
  v.adversarial.update(dict(
      weight=0.5,  # SD's VAE recipe (disc_weight 0.5); ours: the paper gives no number
      start_step=50_000,  # after the autoencoder settles (SD: 50k)
      channels=(64, 128, 256),
      norm_groups=32,
  ))
  v.perceptual = vae_trainer.default_perceptual_config()  # off unless weights are supplied
  return v


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = config_base.base_config()
  c.trainer = "vae"
  c.data = ml_collections.ConfigDict(dict(
      name="shapes",  # placeholder source: the paper trains on its text-image set
      image_size=512,
      seed=0,
      num_records=1_000_000,
      caption_dropout=0.0,
      max_length=77,
  ))
  c.text = ml_collections.ConfigDict(dict(tokenizer_dir=""))
  c.vae = vae_config()
  c.sample = ml_collections.ConfigDict(dict(num_eval_samples=64, eval_seed=2024))
  c.global_batch_size = 256  # paper
  c.num_train_steps = 2_000_000  # paper
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 1000
  return c
