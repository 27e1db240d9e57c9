"""What later stages read from a VAE run: its latent statistics, and light-decoder distillation
(paper sec. 3.5: frozen encoder, trained pruned decoder)."""

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


def test_latent_stats_normalise_the_latents_diffusion_trains_on(vae_workdir):
  """The stored shift/scale must whiten posterior *samples* (what the diffusion stages encode),
  not only posterior means: a 4-step VAE's posterior std is ~1 while its means barely spread, so
  mean-based statistics would leave normalised latents with variance far above 1."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from md_jax.train import vae as vae_obj  # pylint: disable=g-import-not-at-top
  config = tiny_config("vae")
  spec = vae_obj.vae_spec(config)
  c = int(config.vae.latent_channels)
  stats_abs = {k: jax.ShapeDtypeStruct((c,), np.float32) for k in ("latent_shift", "latent_scale")}
  got, _ = ckpt_lib.restore_subset(
      vae_workdir, {"ema_params": {"vae": spec.abstract_params}, "frozen": stats_abs})
  it = vae_obj.make_data_iterator(config, 0, 1, split="eval", seed_offset=123, caption_dropout=0.0)
  images = np.concatenate([np.asarray(next(it)["image"], np.float32) for _ in range(4)])
  mean, logvar = jax.jit(lambda p, x: spec.bind(p).encode(x))(got["ema_params"]["vae"], images)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.key(5), mean.shape)
  zn = (np.asarray(z) - np.asarray(got["frozen"]["latent_shift"])) / np.asarray(
      got["frozen"]["latent_scale"])
  var = zn.reshape(-1, c).var(axis=0)
  assert np.all((var > 0.6) & (var < 1.6)), var
  assert np.all(np.abs(zn.reshape(-1, c).mean(axis=0)) < 0.3)
  # The posterior noise is a real part of that variance here (so the test tells the two apart).
  mean_only = (np.asarray(mean) - np.asarray(got["frozen"]["latent_shift"])) / np.asarray(
      got["frozen"]["latent_scale"])
  assert mean_only.reshape(-1, c).var(axis=0).mean() < 0.8 * var.mean()


def test_reconstructions_are_judged_in_64px_units_at_every_size():
  """The judge measures edge width in 64-px units, so the same blur in pixels that fails a 64-px
  reconstruction passes a 128-px one: what the VAE evaluation's extra sizes
  (config.vae.judge_extra_sizes) report next to the training size."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  from md_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from md_jax.train import vae as vae_obj  # pylint: disable=g-import-not-at-top
  results = {}
  for size in (64, 128):
    recs = [shapes.make_record("eval", i, size, seed=3) for i in range(24)]
    captions = [r["caption"] for r in recs]
    sharp = np.stack([r["image"] for r in recs])
    blurred = np.stack([ndimage.gaussian_filter(im.astype(np.float32), (2.0, 2.0, 0))
                        for im in sharp]).round().clip(0, 255).astype(np.uint8)
    results[size] = (vae_obj._judge_reconstructions(sharp, captions, "a"),
                     vae_obj._judge_reconstructions(blurred, captions, "b"))
  for size, (sharp, blurred) in results.items():
    assert sharp["a_judge_colour"] == 1.0 and sharp["a_judge_rejected"] == 0.0, size
    assert blurred["b_judge_unsharp_colour"] >= 0.9, size  # the blur keeps the content
  assert results[64][1]["b_judge_rejected"] >= 0.9  # 2 px of blur is blurred at 64 px ...
  assert results[128][1]["b_judge_colour"] >= 0.9  # ... and sharp enough at 128 px
  assert results[128][1]["b_edge_width_median"] < 0.6 * results[64][1]["b_edge_width_median"]


def test_light_decoder_config_shapes():
  config = tiny_config("light_decoder")
  assert config.trainer == "vae_light_decoder"
  assert config.vae.kl_weight == 0.0
  # Full width at full resolution, 3/4 below (multiples of the GroupNorm groups); one
  # resblock per level instead of two; started from the VAE's decoder.
  assert tuple(config.vae.channels) == (8, 16, 16, 16)
  assert tuple(config.vae.decoder_channels) == (8, 12, 12, 12)
  assert config.vae.decoder_res_blocks == 0
  assert config.vae.light_init == "prune"


def test_light_decoder_needs_vae_workdir(tmp_path):
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="vae_workdir"):
    loop.train_and_evaluate(tiny_config("light_decoder", eval_at_end=False), str(tmp_path))


@pytest.fixture(scope="module")
def light_run(vae_workdir, tmp_path_factory):
  """A tiny light-decoder run (4 steps, GAN term on) against the tiny VAE run."""
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("light"))
  config = tiny_config("light_decoder", vae_workdir=vae_workdir,
                       **{"vae.adversarial.weight": 0.05})
  loop.train_and_evaluate(config, workdir)
  return config, workdir


def test_light_decoder_trains_against_frozen_encoder(vae_workdir, light_run):
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from md_jax.train import vae as vae_obj  # pylint: disable=g-import-not-at-top
  config, workdir = light_run

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
  assert np.isfinite(ev["eval/recon_psnr_at_init"])

  # Export reads the run's EMA light decoder and the VAE's latent statistics it carries, and
  # builds the bundle's decoder component from them (tflite_export.export --decoder_from).
  from tflite_export import convert  # pylint: disable=g-import-not-at-top
  light = convert.light_decoder_from_workdir(workdir)
  assert (light["step"], light["params_kind"]) == (4, "ema_params")
  want_dec = _flat(got["ema_params"]["light_decoder"])  # step 4, the last one restored above
  have_dec = _flat(light["params"])
  assert have_dec.keys() == want_dec.keys()
  for k, v in want_dec.items():
    np.testing.assert_array_equal(have_dec[k], v, err_msg=k)
  for k in ("latent_shift", "latent_scale"):
    np.testing.assert_array_equal(light[k], np.asarray(vae_got["frozen"][k]), err_msg=k)
  comp = convert.decoder_component(light["vae_config"], light["params"], light["latent_shift"],
                                   light["latent_scale"], latent_shape=(4, 4, c))
  assert comp.metadata["decoder_channels"] == list(config.vae.decoder_channels)
  z = np.random.default_rng(0).standard_normal((1, 4, 4, c)).astype(np.float32)
  image = comp.jax_apply(z)["image"]
  decoded = vae_obj.light_decoder_spec(config).bind(got["ema_params"]["light_decoder"])(
      z * light["latent_scale"] + light["latent_shift"])
  np.testing.assert_allclose(image, np.clip(np.asarray(decoded), -1, 1) * 0.5 + 0.5, atol=1e-5)
  convert.check_same_latent_stats(vae_got["frozen"], light, vae_workdir, workdir)
  other = dict(vae_got["frozen"], latent_scale=np.asarray(vae_got["frozen"]["latent_scale"]) * 2)
  with pytest.raises(ValueError, match="distilled against another VAE.*latent_scale"):
    convert.check_same_latent_stats(other, light, vae_workdir, workdir)
  with pytest.raises(ValueError, match="expected a light-decoder run"):
    convert.light_decoder_from_workdir(vae_workdir)


def test_diffusion_stages_decode_with_a_light_decoder_run(vae_workdir, light_run, tmp_path):
  """vae_workdir = a light-decoder run: latents through the encoder it was distilled against
  (the VAE's), samples decoded by its EMA light decoder; the run's decoder widths must be
  the config's."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from md_jax.train import diffusion as diff  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  from md_jax.train import vae as vae_obj  # pylint: disable=g-import-not-at-top
  light_config, light_wd = light_run
  with pytest.raises(ValueError, match=r"config.vae.decoder_channels .*--config.vae.decoder_"):
    loop.Trainer(tiny_config("lowres", vae_workdir=light_wd), str(tmp_path / "bad")).init_state()
  config = tiny_config("lowres", vae_workdir=light_wd, **{
      "vae.decoder_channels": tuple(light_config.vae.decoder_channels),
      "vae.decoder_res_blocks": light_config.vae.decoder_res_blocks})
  trainer = loop.Trainer(config, str(tmp_path / "diffusion"))
  state = trainer.init_state()
  frozen = state["frozen"]
  enc_abs = vae_obj.encoder_spec(light_config).abstract_params
  dec_abs = vae_obj.light_decoder_spec(light_config).abstract_params
  vae_got, _ = ckpt_lib.restore_subset(vae_workdir, {"ema_params": {"vae": {"encoder": enc_abs}}})
  light_got, _ = ckpt_lib.restore_subset(light_wd, {"ema_params": {"light_decoder": dec_abs}})
  for name, want, have in (("encoder", vae_got["ema_params"]["vae"]["encoder"],
                            frozen["vae"]["encoder"]),
                           ("decoder", light_got["ema_params"]["light_decoder"],
                            frozen["vae"]["decoder"])):
    want, have = _flat(want), _flat(have)
    assert want.keys() == have.keys(), name
    for k, v in want.items():
      np.testing.assert_array_equal(have[k], v, err_msg=f"{name} {k}")
  # Decoding through the diffusion stage's frozen VAE is the light decoder's output.
  ld = diff.LatentDiffusion(config)
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, int(config.vae.latent_channels)))
  got = jax.jit(ld.decode_latents)(frozen, z)
  want = vae_obj.light_decoder_spec(light_config).bind(light_got["ema_params"]["light_decoder"])(
      z * frozen["latent_scale"] + frozen["latent_shift"])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want, np.float32), atol=1e-5)
  assert jnp.all(jnp.isfinite(got))

  # What the stage trains on: its loss equals the diffusion loss on latents made here from the
  # VAE run's checkpoint alone (its EMA encoder, a posterior sample, its stored shift / scale);
  # with a wrong scale the losses differ, so the comparison can tell.
  from md_jax.diffusion import losses  # pylint: disable=g-import-not-at-top
  from md_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  c = int(config.vae.latent_channels)
  stats_abs = {k: jax.ShapeDtypeStruct((c,), np.float32) for k in ("latent_shift", "latent_scale")}
  vae_stats = ckpt_lib.restore_subset(vae_workdir, {"frozen": stats_abs})[0]["frozen"]
  obj = trainer.objective
  batch = {k: jnp.asarray(v) for k, v in obj.host_batch(next(obj.data_iterator(0, 1))).items()}
  encoder = vae_obj.encoder_spec(light_config).bind(vae_got["ema_params"]["vae"]["encoder"])
  rng = jax.random.key(7)

  @jax.jit
  def losses_of(params, frozen, batch, scale):
    in_step = obj.loss(params, frozen, batch, rng, 0)[0]
    z_rng, d_rng = jax.random.split(rng)
    z = vae_lib.sample_posterior(*encoder(batch["image"]), z_rng)
    z = (z - vae_stats["latent_shift"]) / scale
    context = batch.get("text_embedding")
    if context is None and "text" in params:  # config.text.frozen=False: a trained encoder
      context = ld.text_hidden(params["text"], batch["input_ids"])
    elif context is None:
      context = ld.encode_text(frozen, batch["input_ids"])
    by_hand = losses.diffusion_loss(
        ld.schedule, ld.unet_apply(params["unet"]), z, context, d_rng,
        loss_weighting=config.diffusion.loss_weighting,
        min_snr_gamma=float(config.diffusion.min_snr_gamma))[0]
    return in_step, by_hand

  in_step, by_hand = map(float, losses_of(state["params"], frozen, batch,
                                          vae_stats["latent_scale"]))
  np.testing.assert_allclose(in_step, by_hand, rtol=1e-5)
  _, wrong = map(float, losses_of(state["params"], frozen, batch,
                                  2.0 * vae_stats["latent_scale"]))
  assert abs(wrong - in_step) > 1e-3 * abs(in_step), (wrong, in_step)


def test_light_decoder_starts_pruned_from_the_vae_decoder(vae_workdir, tmp_path):
  """vae.light_init='prune': the light decoder (and its EMA) starts as the VAE run's EMA
  decoder cut to its widths and depth (leading channels, first resblocks); D starts fresh."""
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  from md_jax.train import vae as vae_obj  # pylint: disable=g-import-not-at-top
  config = tiny_config("light_decoder", vae_workdir=vae_workdir,
                       **{"vae.adversarial.weight": 0.05})
  assert config.vae.light_init == "prune"  # the shipped default
  trainer = loop.Trainer(config, str(tmp_path))
  state = trainer.init_state()
  full_abs = vae_obj.full_decoder_spec(config).abstract_params
  got, _ = ckpt_lib.restore_subset(vae_workdir, {"ema_params": {"vae": {"decoder": full_abs}}})
  full = _flat(got["ema_params"]["vae"]["decoder"])
  light, ema = _flat(state["params"]["light_decoder"]), _flat(state["ema_params"]["light_decoder"])
  assert len(light) < len(full)  # one resblock per level fewer
  assert sum(v.shape != full[k].shape for k, v in light.items()) > len(light) // 2  # narrower
  for k, v in light.items():
    want = full[k][tuple(slice(0, n) for n in v.shape)]
    np.testing.assert_array_equal(v, want, err_msg=k)
    np.testing.assert_array_equal(ema[k], want, err_msg=k)
  assert "disc" in state["params"]
  fresh = loop.Trainer(tiny_config("light_decoder", vae_workdir=vae_workdir,
                                   **{"vae.light_init": "random"}), str(tmp_path / "fresh"))
  fresh_light = _flat(fresh.init_state()["params"]["light_decoder"])
  assert not np.array_equal(fresh_light["['conv_in']['kernel']"], light["['conv_in']['kernel']"])
  # A light decoder wider than the VAE's cannot be pruned from it; an unknown mode is named.
  wide = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[:-1] + (a.shape[-1] + 1,), a.dtype),
                      vae_obj.light_decoder_spec(config).abstract_params)
  with pytest.raises(ValueError, match="narrower, not wider"):
    vae_obj.prune_to(got["ema_params"]["vae"]["decoder"], wide)
  bad = tiny_config("light_decoder", vae_workdir=vae_workdir, **{"vae.light_init": "copy"})
  with pytest.raises(ValueError, match="vae.light_init"):
    loop.Trainer(bad, str(tmp_path / "bad")).init_state()


def test_light_decoder_export_safe():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from md_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from md_jax.models.export_safety import check_jaxpr  # pylint: disable=g-import-not-at-top
  from md_jax.models.layers import KeyStream  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("light_decoder").vae
  with nnx.use_eager_sharding(False):
    dec = nnx.eval_shape(lambda: vae_lib.Decoder(cfg, rngs=KeyStream(0)))
  graphdef, state = nnx.split(dec)
  fn = lambda s, z: nnx.merge(graphdef, s)(z)
  assert check_jaxpr(fn, state, jnp.zeros((1, 2, 2, cfg.latent_channels))) == []


def test_full_size_configs():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from md_jax import config_loading  # pylint: disable=g-import-not-at-top
  from md_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from md_jax.models.layers import KeyStream  # pylint: disable=g-import-not-at-top
  from md_jax.models.layers import count_params  # pylint: disable=g-import-not-at-top
  full = config_loading.load_config("configs/vae.py")
  light = config_loading.load_config("configs/vae_light_decoder.py")
  assert full.trainer == "vae" and light.trainer == "vae_light_decoder"
  assert vae_lib.downsample_factor(full.vae) == 8 and full.vae.latent_channels == 8
  assert tuple(full.vae.channels) == (128, 256, 512, 512)  # SD's widths
  assert full.vae.adversarial.weight > 0 and full.vae.adversarial.start_step > 0
  assert full.vae.perceptual.weight == 0  # off until LPIPS weights are given
  assert light.vae.kl_weight == 0
  assert 0 < light.vae.adversarial.weight < full.vae.adversarial.weight
  # Same encoder as the VAE run (so its checkpoint restores), a much smaller decoder.
  for key in ("channels", "num_res_blocks", "latent_channels", "norm_groups", "mid_attention"):
    assert light.vae[key] == full.vae[key], key
  with nnx.use_eager_sharding(False):
    dec = lambda cfg: nnx.eval_shape(lambda: vae_lib.Decoder(cfg, rngs=KeyStream(0)))
    n_full, n_light = count_params(dec(full.vae)), count_params(dec(light.vae))
  assert n_light < n_full / 3


def test_perceptual_weight_without_files_is_refused(tmp_path):
  from md_jax.train import vae as vae_obj  # pylint: disable=g-import-not-at-top
  config = tiny_config("vae", **{"vae.perceptual.weight": 0.1})
  with pytest.raises(FileNotFoundError, match=r"perceptual.weights=''"):
    vae_obj.perceptual_config(config)
  with config.unlocked():
    config.vae.perceptual.weights = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match="not a file"):
    vae_obj.perceptual_config(config)
  with config.unlocked():
    config.vae.perceptual.weight = 0.0
  assert vae_obj.perceptual_config(config) is None  # disabled: no files needed
