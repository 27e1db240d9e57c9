"""The light decoder of paper sec. 3.5: ``--config=configs/vae_light_decoder.py
--config.vae_workdir=WORKDIR_OF_THE_VAE_RUN``.

The VAE's decoder pruned in width and depth, trained for 400k steps against the VAE's frozen
encoder (loaded from ``vae_workdir``, its EMA copy when there is one) with L2 and a reduced
adversarial weight and no KL (paper sec. 3.5). Widths (64, 128, 256, 256) and 2 resblocks per
level (the full decoder: (128, 256, 512, 512), 3 per level) make it >= 3x faster than SD's
decoder at 512x512 (benchmarks/decoder_cpu.py).
"""

from __future__ import annotations

import ml_collections

from md_jax import config_loading

LIGHT_DECODER_CHANNELS = (64, 128, 256, 256)
LIGHT_DECODER_RES_BLOCKS = 1  # + 1 per level, as the full decoder: 2 resblocks per level


def light_decoder_overrides(vae: ml_collections.ConfigDict) -> None:
  """Turns a VAE config into its light-decoder distillation config, in place."""
  vae.decoder_channels = LIGHT_DECODER_CHANNELS
  vae.decoder_res_blocks = LIGHT_DECODER_RES_BLOCKS
  vae.kl_weight = 0.0  # paper: no KL (the encoder is frozen)
  vae.adversarial.weight = 0.1  # paper: reduced (the VAE run uses 0.5)
  vae.adversarial.start_step = 0  # the frozen encoder's latents are settled from the start
  # Start from the VAE's own decoder cut to these widths and depth (train/vae.py:prune_to), not
  # from random weights: on shapes, +0.6 dB and sharper edges at the same budget.
  vae.light_init = "prune"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_loading.config_module("vae", __file__).get_config(arg)
  c.trainer = "vae_light_decoder"
  light_decoder_overrides(c.vae)
  c.num_train_steps = 400_000  # paper
  return c
