"""UFOGen one-step finetune: G and D from a pretrained diffusion run, D then G in one step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import set_keys, tiny_config
from md_jax import config_loading
from md_jax.diffusion import samplers
from md_jax.train import loop
from md_jax.train import sharding as shd
from md_jax.train import ufogen


# A two-level UNet (FullConv level, then SPConv with SA + CA): every UNet piece, a third of the
# tiny shapes UNet's ops. The GAN step holds three UNet passes and two backward passes, and its
# trace and lowering dominate these tests.
MICRO_UNET = {"unet.channels": (8, 16), "unet.down_blocks": (1, 1), "unet.up_blocks": (2, 2),
              "unet.down_conv": ("full", "sep"), "unet.up_conv": ("full", "sep"),
              "unet.down_depth": (0, 1), "unet.up_depth": (0, 1), "unet.self_attn": (False, True),
              "unet.time_embed_dim": 16}


def _ufogen_config(arg: str, init_from: str, **overrides):
  config = config_loading.load_config(f"configs/ufogen.py:{arg}")
  base = tiny_config("lowres")  # the test-wide settings (compilation cache, no progress bar)
  with config.unlocked():
    config.progress_bar = False
    config.compilation_cache_dir = base.compilation_cache_dir
    config.init_from = init_from
    config.data.image_size = 32  # the pretrained run is lowres: latent 4x4 (cheap)
    config.optim.warmup_steps = 0  # step 0 already moves the params
    config.optim.schedule = "constant"
    config.optim.learning_rate = 1e-3
    config.ufogen.disc.learning_rate = 1e-3
    set_keys(config, {**MICRO_UNET, **overrides})
  return config


@pytest.fixture(scope="module")
def pretrained(vae_workdir, tmp_path_factory):
  """A tiny pretrained diffusion run (lowres, two steps) that UFOGen finetunes."""
  workdir = str(tmp_path_factory.mktemp("diffusion"))
  config = tiny_config("lowres", vae_workdir=vae_workdir, num_train_steps=2, eval_at_end=False,
                       **MICRO_UNET)
  loop.train_and_evaluate(config, workdir)
  return workdir


def _host(tree):
  return jax.tree.map(lambda a: np.array(jax.device_get(a)), tree)


@pytest.fixture(scope="module")
def trained(pretrained, tmp_path_factory):
  """Two GAN steps of the distill variant (it also holds the frozen teacher): the step compiles once."""
  config = _ufogen_config("distill,tiny", pretrained)
  trainer = loop.Trainer(config, str(tmp_path_factory.mktemp("ufogen")))
  state = trainer.init_state()
  before = _host({k: state[k] for k in ("params", "ema_params", "frozen")})
  it = trainer.objective.data_iterator(0, 1)
  batch = shd.global_batch_from_local(trainer.objective.host_batch(next(it)), trainer.mesh)
  step_fn = trainer.compile_step({k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                  for k, v in batch.items()})
  history = []
  for _ in range(2):
    state, metrics = step_fn(state, batch)
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return dict(trainer=trainer, state=state, before=before, history=history, batch=batch)


def test_configs_cover_table5_and_reject_unimplemented(pretrained):
  for recon in ufogen.RECON_TERMS:
    for finetune in ufogen.FINETUNE_KINDS:
      c = config_loading.load_config(f"configs/ufogen.py:{recon},{finetune},tiny")
      assert (c.trainer, c.ufogen.recon, c.ufogen.finetune) == ("ufogen", recon, finetune)
  default = config_loading.load_config("configs/ufogen.py")
  assert (default.ufogen.recon, default.ufogen.finetune) == ("diffusion", "full")
  with pytest.raises(ValueError, match="bogus"):
    config_loading.load_config("configs/ufogen.py:bogus")
  mesh = shd.make_mesh((1, 1, 1), default.mesh_axes, devices=jax.devices()[:1])
  with pytest.raises(NotImplementedError, match="ufogen.finetune='lora'"):
    ufogen.UFOGenObjective(_ufogen_config("lora,tiny", pretrained), mesh)
  with pytest.raises(NotImplementedError, match="ufogen.recon='ema'"):
    ufogen.UFOGenObjective(_ufogen_config("ema,tiny", pretrained), mesh)
  with pytest.raises(ValueError, match="init_from"):
    ufogen.UFOGenObjective(_ufogen_config("tiny", ""), mesh)


def test_generator_and_discriminator_start_from_the_pretrained_unet(trained, pretrained):
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  trainer = trained["trainer"]
  before = trained["before"]
  got, _ = ckpt_lib.restore_subset(
      pretrained, {"ema_params": {"unet": trainer.objective.ld.unet.abstract_params}})
  pre = _host(got["ema_params"]["unet"])
  g, d = before["params"]["unet"], before["params"]["disc"]
  for a, b in zip(jax.tree.leaves(pre), jax.tree.leaves(g)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(pre), jax.tree.leaves(before["frozen"]["teacher"])):
    np.testing.assert_array_equal(a, b)
  # D: the same network and weights except its one-channel output layer, which starts at zero.
  assert d["conv_out"]["kernel"].shape[-1] == 1
  assert not np.any(d["conv_out"]["kernel"]) and not np.any(d["conv_out"]["bias"])
  for key in g:
    if key != "conv_out":
      for a, b in zip(jax.tree.leaves(g[key]), jax.tree.leaves(d[key])):
        np.testing.assert_array_equal(a, b)
  # The pretrained run's pretrained UNet has a non-zero output layer (it was trained).
  assert np.any(g["conv_out"]["kernel"])
  # Only G keeps an EMA; each group has its own optimizer state.
  assert set(before["ema_params"]) == {"unet"}
  assert set(trained["state"]["opt_state"]) == {"unet", "disc"}


def test_gan_step_trains_g_and_d_and_leaves_frozen_alone(trained):
  before, state, hist = trained["before"], _host(trained["state"]), trained["history"]
  # D undecided at init: both logits exactly 0, loss 2 log 2.
  assert hist[0]["d/real_logit"] == 0.0 and hist[0]["d/fake_logit"] == 0.0
  assert hist[0]["d/loss"] == pytest.approx(2 * np.log(2), rel=1e-6)
  assert all(h["finite"] == 1.0 for h in hist)
  assert np.any(state["params"]["disc"]["conv_out"]["kernel"])  # D's head learned
  for group in ("unet", "disc"):
    changed = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(before["params"][group]), jax.tree.leaves(state["params"][group]))]
    assert np.mean(changed) > 0.5, group
  # G's EMA follows G; the teacher, text encoder, VAE and latent stats never change.
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(before["ema_params"]["unet"]), jax.tree.leaves(state["ema_params"]["unet"])))
  for a, b in zip(jax.tree.leaves(before["frozen"]), jax.tree.leaves(state["frozen"])):
    np.testing.assert_array_equal(a, b)
  # Distillation: G starts as the teacher, so the term is exactly 0 at step 0; after G moved
  # (through D's verdict) the term is positive, i.e. it reads the frozen teacher, not G itself.
  assert hist[0]["recon"] == 0.0
  assert hist[1]["recon"] > 0.0
  assert hist[0]["g_adv"] > 0.0 and np.isfinite(hist[1]["d/loss"])


def test_one_step_sampler_runs_on_the_generator(trained):
  trainer, state = trained["trainer"], trained["state"]
  ld = trainer.objective.ld
  ids = jnp.asarray(ld.tokenize(["a red circle", "a blue square"]))
  shape = ld.latent_shape(32)
  noise = jax.random.normal(jax.random.key(0), (2,) + shape, jnp.float32)

  @jax.jit
  def sample(params, frozen, ids, noise):
    context = ld.encode_text(frozen, ids)
    z = samplers.onestep_sample(ld.schedule, ld.unet_apply(params), noise, context)
    return z, ld.decode_latents(frozen, z)

  z, images = sample(state["params"]["unet"], state["frozen"], ids, noise)
  assert z.shape == (2,) + shape and images.shape == (2, 32, 32, 3)
  assert np.all(np.isfinite(np.asarray(images)))
  # v-prediction at t = T-1 (alpha 0, sigma 1): x0 = -v.
  ctx = ld.encode_text(state["frozen"], ids)
  v = jax.jit(lambda p, x, c: ld.unet_apply(p)(x, jnp.full((2,), 999.0), c))(
      state["params"]["unet"], noise, ctx)
  np.testing.assert_allclose(np.asarray(z), -np.asarray(v), atol=1e-5)
