"""Light-decoder distillation (paper sec. 3.5): frozen encoder, trained pruned decoder."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_light_decoder_config_shapes():
  config = tiny_config("light_decoder")
  assert config.trainer == "vae_light_decoder"
  assert config.vae.kl_weight == 0.0
  assert tuple(config.vae.decoder_channels) == (4, 8, 8, 8)
  assert config.vae.decoder_res_blocks == 0


def test_light_decoder_needs_vae_workdir(tmp_path):
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="vae_workdir"):
    loop.train_and_evaluate(tiny_config("light_decoder", eval_at_end=False), str(tmp_path))


def test_light_decoder_trains_against_frozen_encoder(vae_workdir, tmp_path):
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  from md_jax.train import vae as vae_obj  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  config = tiny_config("light_decoder", vae_workdir=vae_workdir,
                       **{"vae.adversarial.weight": 0.05})
  loop.train_and_evaluate(config, workdir)

  enc_abs = vae_obj.encoder_spec(config).abstract_params
  dec_abs = vae_obj.light_decoder_spec(config).abstract_params
  c = int(config.vae.latent_channels)
  stats_abs = {k: jax.ShapeDtypeStruct((c,), np.float32) for k in ("latent_shift", "latent_scale")}
  # The VAE run's encoder (its EMA copy) and latent stats: the source of truth.
  vae_got, _ = ckpt_lib.restore_subset(
      vae_workdir, {"ema_params": {"vae": {"encoder": enc_abs}}, "frozen": stats_abs})
  want_enc = _flat(vae_got["ema_params"]["vae"]["encoder"])

  decoders = []
  for step in (2, 4):  # checkpoint.every = 2 in the tiny config
    got, _ = ckpt_lib.restore_subset(
        workdir, {"params": {"light_decoder": dec_abs, "disc": vae_obj.disc_spec(config)
                             .abstract_params},
                  "ema_params": {"light_decoder": dec_abs},
                  "frozen": dict(encoder=enc_abs, **stats_abs)}, step=step)
    enc = _flat(got["frozen"]["encoder"])
    assert enc.keys() == want_enc.keys()
    for k, v in want_enc.items():
      np.testing.assert_array_equal(enc[k], v, err_msg=f"encoder {k} changed at step {step}")
    for k in ("latent_shift", "latent_scale"):
      np.testing.assert_array_equal(np.asarray(got["frozen"][k]),
                                    np.asarray(vae_got["frozen"][k]), err_msg=k)
    decoders.append(_flat(got["params"]["light_decoder"]))
  changed = [k for k in decoders[0] if not np.array_equal(decoders[0][k], decoders[1][k])]
  assert len(changed) > len(decoders[0]) // 2, "the light decoder did not train"
  # The light decoder is the pruned one, not the VAE's.
  n_light = sum(v.size for v in decoders[1].values())
  full_abs = vae_obj.vae_spec(tiny_config("vae")).abstract_params["decoder"]
  assert n_light < sum(int(np.prod(x.shape)) for x in jax.tree.leaves(full_abs)) / 2

  with open(os.path.join(workdir, "eval_light_decoder.json")) as f:
    ev = json.load(f)
  assert np.isfinite(ev["eval/recon_psnr"])
