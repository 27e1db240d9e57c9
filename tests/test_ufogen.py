"""UFOGen one-step finetune: G and D from a pretrained diffusion run, D then G in one step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import MICRO_UNET, set_keys, tiny_config
from md_jax import config_loading
from md_jax.diffusion import samplers
from md_jax.train import checkpoint as ckpt_lib
from md_jax.train import loop
from md_jax.train import sharding as shd
from md_jax.train import ufogen


# The GAN step holds three UNet passes and two backward passes of conftest.MICRO_UNET; its
# trace and lowering dominate these tests.
LORA_CELL = "diffusion,lora,tiny"


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
  # Its text encoder trains (config.text.frozen=False): UFOGen must read it from the run's params.
  config = tiny_config("lowres", vae_workdir=vae_workdir, num_train_steps=2, eval_at_end=False,
                       **MICRO_UNET, **{"text.frozen": False})
  loop.train_and_evaluate(config, workdir)
  return workdir


def _host(tree):
  return jax.tree.map(lambda a: np.array(jax.device_get(a)), tree)


def _train(arg, pretrained, workdir, steps=2, **overrides):
  """``steps`` GAN steps of one variant on one batch (the step compiles once); host copies of
  the state before and after each step."""
  config = _ufogen_config(arg, pretrained, **overrides)
  trainer = loop.Trainer(config, workdir)
  state = trainer.init_state()
  keep = ("params", "ema_params", "frozen")
  before = _host({k: state[k] for k in keep})
  it = trainer.objective.data_iterator(0, 1)
  batch = shd.global_batch_from_local(trainer.objective.host_batch(next(it)), trainer.mesh)
  step_fn = trainer.compile_step({k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                  for k, v in batch.items()})
  history, after = [], []
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    after.append(_host({k: state[k] for k in keep}))
  return dict(trainer=trainer, state=state, before=before, after=after, history=history,
              batch=batch)


_POOL = 24  # records of `trained`'s data (configs/ufogen.py's own pool is 1M)


@pytest.fixture(scope="module")
def trained(pretrained, tmp_path_factory):
  """The distill variant (it also holds the frozen teacher), on a pool of 24 records (the
  cached-latents test encodes the same pool)."""
  return _train("distill,tiny", pretrained, str(tmp_path_factory.mktemp("ufogen")),
                **{"data.num_records": _POOL})


@pytest.fixture(scope="module")
def ema_trained(pretrained, tmp_path_factory):
  """The EMA-distillation variant with the encoder-only discriminator, updated twice per step."""
  return _train("ema,tiny", pretrained, str(tmp_path_factory.mktemp("ufogen_ema")),
                **{"ufogen.disc.encoder_only": True, "ufogen.disc.steps": 2})


def test_text_encoder_is_the_pretrained_runs_trained_copy_and_stays_frozen(pretrained, trained):
  """A pretrained run that trained its text encoder (config.text.frozen=False) keeps it in its
  params: UFOGen reads that run's EMA copy into its frozen part, not the seeded init, and its
  steps never change it."""
  ld = trained["trainer"].objective.ld
  got, _ = ckpt_lib.restore_subset(pretrained, {"ema_params": {"text": ld.text.abstract_params}})
  want = jax.tree.leaves(_host(got["ema_params"]["text"]))
  init = jax.tree.leaves(_host(jax.jit(ld.text.init)(
      jax.random.key(int(trained["trainer"].config.text.seed)))))
  assert max(float(np.max(np.abs(w - i))) for w, i in zip(want, init)) > 0
  for frozen in (trained["before"]["frozen"], trained["after"][-1]["frozen"]):
    for w, g in zip(want, jax.tree.leaves(frozen["text"])):
      np.testing.assert_array_equal(g, w)


def test_config_arg_refuses_two_finetune_kinds():
  """'lora,full' used to give a full finetune without a word ('full' is a kind and a size)."""
  with pytest.raises(ValueError, match="two finetune kinds, 'lora' and 'full'"):
    config_loading.load_config("configs/ufogen.py:diffusion,lora,full")
  assert config_loading.load_config("configs/ufogen.py:lora,smoke").ufogen.finetune == "lora"
  assert config_loading.load_config("configs/ufogen.py:diffusion,full,full").ufogen.finetune == \
      "full"
  with pytest.raises(ValueError, match="two reconstruction terms"):
    config_loading.load_config("configs/ufogen.py:ema,distill")


def test_configs_cover_table5_and_reject_bad_settings(pretrained, tmp_path):
  default = config_loading.load_config("configs/ufogen.py")
  assert (default.ufogen.recon, default.ufogen.finetune) == ("diffusion", "full")
  mesh = shd.make_mesh((1, 1, 1), default.mesh_axes, devices=jax.devices()[:1])
  for recon in ufogen.RECON_TERMS:
    for finetune in ufogen.FINETUNE_KINDS:
      c = config_loading.load_config(f"configs/ufogen.py:{recon},{finetune},tiny")
      assert (c.trainer, c.ufogen.recon, c.ufogen.finetune) == ("ufogen", recon, finetune)
      # Each cell builds its sharded state layout: G's group, D, EMA and what is frozen.
      trainer = loop.Trainer(_ufogen_config(f"{recon},{finetune},tiny", pretrained),
                             str(tmp_path / f"{recon}_{finetune}"), mesh=mesh)
      g = "unet_lora" if finetune == "lora" else "unet"
      assert set(trainer.abstract_state["params"]) == {g, "disc"}
      assert set(trainer.abstract_state["ema_params"]) == {g}
      frozen = set(trainer.abstract_state["frozen"])
      assert ("unet" in frozen) == (finetune == "lora")
      assert ("teacher" in frozen) == (recon == "distill" and finetune == "full")
      assert [p.with_ema for p in trainer.phases] == [False, recon == "ema"]
  with pytest.raises(ValueError, match="bogus"):
    config_loading.load_config("configs/ufogen.py:bogus")
  with pytest.raises(ValueError, match="init_from"):
    ufogen.UFOGenObjective(_ufogen_config("tiny", ""), mesh)
  with pytest.raises(ValueError, match="config.ufogen.real_latents"):
    ufogen.UFOGenObjective(_ufogen_config("tiny", pretrained, **{"ufogen.real_latents": "x"}),
                           mesh)
  with pytest.raises(ValueError, match="config.ema_decay"):
    ufogen.UFOGenObjective(_ufogen_config("ema,tiny", pretrained, ema_decay=0.0), mesh)
  with pytest.raises(ValueError, match="config.ufogen.lora.targets"):
    ufogen.UFOGenObjective(_ufogen_config("lora,tiny", pretrained,
                                          **{"ufogen.lora.targets": ("no_such_layer",)}), mesh)


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


def test_shared_noise_and_real_latents_choose_the_draws(trained):
  """ufogen.shared_noise: x_{t-1} and x'_{t-1} use the same noise, so they differ by exactly
  sqrt(alpha_bar_{t-1}) (x0 - x0'); everything else the step draws is what it draws without it.
  ufogen.real_latents='mean': x0 is the posterior mean, the rest of the draw unchanged."""
  from md_jax.diffusion import schedule as sch  # pylint: disable=g-import-not-at-top
  trainer, state = trained["trainer"], trained["state"]
  out = {}
  for shared, real in ((False, "sample"), (True, "sample"), (True, "mean")):
    config = trainer.config.copy_and_resolve_references()
    with config.unlocked():
      config.ufogen.shared_noise = shared
      config.ufogen.real_latents = real
    obj = ufogen.UFOGenObjective(config, trainer.mesh)

    @jax.jit
    def draw(params, frozen, batch, obj=obj):
      d = obj._draws(params, frozen, batch, jnp.int32(3))  # pylint: disable=protected-access
      fake_prev = sch.q_sample(obj.ld.schedule, d["x0_fake"], d["t_prev"], d["noise_fake"])
      a, _ = sch.alpha_sigma(obj.ld.schedule, d["t_prev"], d["z"])
      return dict(d, fake_prev=fake_prev, a=a)

    out[shared, real] = jax.device_get(draw(state["params"], state["frozen"], trained["batch"]))
  off, on = out[False, "sample"], out[True, "sample"]
  for k in ("z", "t", "t_prev", "x_t", "x0_fake", "real_prev"):
    np.testing.assert_array_equal(off[k], on[k])
  np.testing.assert_allclose(on["real_prev"] - on["fake_prev"], on["a"] * (on["z"] - on["x0_fake"]),
                             atol=1e-5)
  gap_off = off["real_prev"] - off["fake_prev"] - off["a"] * (off["z"] - off["x0_fake"])
  assert float(np.std(gap_off)) > 0.1  # independent draws: the difference carries noise

  # ufogen.real_latents='mean': x0 is the VAE posterior's mean (normalised), not a draw from it.
  frozen = state["frozen"]
  mean, _ = trainer.objective.ld.vae.bind(frozen["vae"]).encode(trained["batch"]["image"])
  want = (np.asarray(mean) - np.asarray(frozen["latent_shift"])) / np.asarray(
      frozen["latent_scale"])
  got = out[True, "mean"]
  np.testing.assert_allclose(got["z"], want, rtol=1e-5, atol=1e-5)
  assert float(np.max(np.abs(on["z"] - got["z"]))) > 1e-3  # the sampled x0 differs from it
  np.testing.assert_array_equal(got["t"], on["t"])


def test_roc_auc_counts_ordered_pairs_and_ties():
  assert ufogen.roc_auc([1.0, 2.0, 3.0], [0.0, 0.5, 2.0]) == pytest.approx(7.5 / 9)
  assert ufogen.roc_auc([0.0, 0.0], [0.0, 0.0]) == 0.5
  assert ufogen.roc_auc([5.0], [1.0, 2.0]) == 1.0 and ufogen.roc_auc([0.0], [1.0]) == 0.0


def test_high_freq_energy_is_zero_on_flat_latents_and_falls_with_blur():
  flat = jnp.full((1, 8, 8, 4), 0.7)
  assert float(ufogen.latent_high_freq_energy(flat)[0]) == pytest.approx(0.0, abs=1e-10)
  noise = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
  smooth = jax.image.resize(noise[:, ::4, ::4], noise.shape, "linear")
  e_noise, e_smooth = np.asarray(ufogen.latent_high_freq_energy(noise)), np.asarray(
      ufogen.latent_high_freq_energy(smooth))
  assert e_noise.shape == (2,) and np.all(e_noise > 4 * e_smooth)


def test_discriminator_probe_reads_d_on_held_out_draws(trained):
  """The evaluation's D probe: an undecided D (zero head, step 0) scores exactly 0.5, the
  trained one does not."""
  from md_jax.train import diffusion as diff_obj  # pylint: disable=g-import-not-at-top
  trainer, obj = trained["trainer"], trained["trainer"].objective
  it = diff_obj.DiffusionObjective.validation_iterator(obj, 0, 1)
  batches = [obj.host_batch(next(it)) for _ in range(3)]
  rows = 3 * int(trainer.config.global_batch_size)
  undecided = obj.discriminator_probe({"params": trained["before"]["params"],
                                       "frozen": trained["state"]["frozen"]}, batches)
  assert undecided["disc_probe/auc"] == 0.5 and undecided["disc_probe/logit_gap"] == 0.0
  got = obj.discriminator_probe(trained["state"], batches)
  assert got["disc_probe/n"] == rows
  assert got["disc_probe/auc"] != 0.5 and got["disc_probe/logit_gap"] != 0.0
  for probe in (undecided, got):
    for k, v in probe.items():
      if "auc" in k:
        assert 0.0 <= v <= 1.0, k
  assert any(k.startswith("disc_probe/auc_q") for k in got)


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


# -- the EMA reconstruction term ---------------------------------------------------------------


def test_ema_term_regresses_g_onto_its_ema(ema_trained):
  tr = ema_trained
  obj, hist = tr["trainer"].objective, tr["history"]
  # G's EMA starts as G: the term is exactly 0 at step 0 and positive once G moved ahead of it.
  assert hist[0]["recon"] == 0.0 and hist[1]["recon"] > 0.0
  s1 = tr["after"][0]  # what step 1 read: G and its EMA after step 0
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(s1["params"]["unet"]), jax.tree.leaves(s1["ema_params"]["unet"])))
  step = jnp.int32(1)

  @jax.jit
  def probe(params, ema, frozen, batch):
    d = obj._draws(params, frozen, batch, step)  # pylint: disable=protected-access
    target = obj.generate_x0(ema["unet"], d["x_t"], d["t"], d["context"])
    gamma = ufogen.recon_weight(obj.ld.schedule, d["t"], obj.u.recon_weighting,
                                float(obj.u.min_snr_gamma))
    expected = jnp.mean(gamma * jnp.mean(jnp.square(target - d["x0_fake"]), axis=(1, 2, 3)))

    def recon(g, e):
      return obj.loss({**params, "unet": g}, frozen, batch, None, step, ema={"unet": e})[1]["recon"]

    got, (grad_g, grad_ema) = jax.value_and_grad(recon, argnums=(0, 1))(params["unet"],
                                                                         ema["unet"])
    against_fast = recon(params["unet"], params["unet"])
    return expected, got, optax.global_norm(grad_g), optax.global_norm(grad_ema), against_fast

  expected, got, grad_g, grad_ema, against_fast = jax.device_get(
      probe(s1["params"], s1["ema_params"], s1["frozen"], tr["batch"]))
  # The target is the EMA generator's x0 prediction on the step's x_t, and the loop passed the
  # EMA as it stood at the start of step 1.
  assert got == pytest.approx(expected, rel=1e-5)
  assert got == pytest.approx(hist[1]["recon"], rel=1e-4)
  assert against_fast == 0.0  # with the fast weights as "EMA" there is nothing to regress onto
  assert grad_g > 0.0 and grad_ema == 0.0  # the gradient reaches G only


def test_extra_discriminator_updates_come_first_on_their_own_draws(ema_trained):
  """ufogen.disc.steps=2: each step updates D on draw 1 ('d1/'), then on draw 0 ('d/', the draw
  G's phase uses), then G. Replays step 0's two D updates by hand."""
  tr = ema_trained
  trainer, hist = tr["trainer"], tr["history"]
  obj = trainer.objective
  assert [p.name for p in trainer.phases] == ["d1", "d", "g"]
  # D's optimizer made two updates per step.
  counts = {int(np.max(c)) for c in jax.tree.leaves(tr["state"]["opt_state"]["disc"])
            if np.asarray(c).dtype == np.int32 and np.asarray(c).ndim == 0}
  assert counts == {2 * len(hist)}
  params0 = tr["before"]["params"]
  tx = trainer.txs["disc"]
  step = jnp.int32(0)

  @jax.jit
  def replay(params, frozen, batch):
    def d_loss(disc, draw):
      return obj.d_loss({**params, "disc": disc}, frozen, batch, None, step, draw=draw)

    (loss1, m1), grads = jax.value_and_grad(d_loss, has_aux=True)(params["disc"], 1)
    updates, _ = tx.update(grads, tx.init(params["disc"]), params["disc"])
    loss0, m0 = d_loss(optax.apply_updates(params["disc"], updates), 0)
    loss0_unmoved, _ = d_loss(params["disc"], 0)
    return loss1, m1, loss0, m0, loss0_unmoved

  loss1, m1, loss0, m0, unmoved = jax.device_get(
      replay(params0, tr["before"]["frozen"], tr["batch"]))
  # The first D update meets the zero head (undecided: 2 log 2 exactly) ...
  assert hist[0]["d1/loss"] == pytest.approx(2 * np.log(2), rel=1e-6)
  assert float(loss1) == pytest.approx(2 * np.log(2), rel=1e-6)
  # ... and the second reads D after it, on the other draw (different timesteps and noise).
  assert hist[0]["d/loss"] == pytest.approx(float(loss0), rel=1e-4)
  assert hist[0]["d/loss"] != pytest.approx(float(unmoved), rel=1e-4)
  assert hist[0]["d/real_logit"] == pytest.approx(float(m0["real_logit"]), rel=1e-3, abs=1e-6)
  draws = obj._draws  # pylint: disable=protected-access
  d1 = draws(params0, tr["before"]["frozen"], tr["batch"], step, 1)
  d0 = draws(params0, tr["before"]["frozen"], tr["batch"], step)
  assert not np.array_equal(np.asarray(d1["x_t"]), np.asarray(d0["x_t"]))


def test_disc_steps_below_one_is_refused(pretrained):
  config = _ufogen_config("tiny", pretrained, **{"ufogen.disc.steps": 0})
  mesh = shd.make_mesh((1, 1, 1), config.mesh_axes, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="config.ufogen.disc.steps=0"):
    ufogen.UFOGenObjective(config, mesh)


# -- the encoder-only discriminator ------------------------------------------------------------


def test_encoder_only_discriminator(ema_trained, pretrained):
  tr = ema_trained
  d0, d1 = tr["before"]["params"]["disc"], tr["after"][-1]["params"]["disc"]
  g0 = tr["before"]["params"]["unet"]
  assert "up_levels" not in d0 and {"middle", "norm_head", "conv_out"} <= set(d0)
  # The head is zero at initialisation (D undecided: logits exactly 0) and learns.
  assert not np.any(d0["conv_out"]["kernel"]) and not np.any(d0["conv_out"]["bias"])
  assert tr["history"][0]["d1/real_logit"] == 0.0 and tr["history"][0]["d1/fake_logit"] == 0.0
  assert np.any(d1["conv_out"]["kernel"])
  # The body comes from the pretrained UNet: down path as G's, middle = G's innermost up stack.
  inner = str(len(g0["up_levels"]) - 1)
  for a, b in zip(jax.tree.leaves(d0["down_levels"]), jax.tree.leaves(g0["down_levels"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(d0["middle"]["convs"]),
                  jax.tree.leaves(g0["up_levels"][inner]["convs"])):
    np.testing.assert_array_equal(a, b)
  full_d = ufogen.disc_spec(_ufogen_config("tiny", pretrained)).num_params
  encoder_d = sum(int(x.size) for x in jax.tree.leaves(d0))
  assert encoder_d < full_d


# -- LoRA on the generator ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(pretrained, tmp_path_factory):
  """Three steps of diffusion-loss LoRA finetuning through the loop, checkpointed (also the
  uninterrupted run the SIGKILL test resumes towards)."""
  workdir = str(tmp_path_factory.mktemp("ufogen_lora"))
  config = _ufogen_config(LORA_CELL, pretrained, num_train_steps=3, eval_at_end=False,
                          **{"checkpoint.async_save": False})
  loop.train_and_evaluate(config, workdir)
  return dict(config=config, workdir=workdir)


def _pretrained_unet(objective, pretrained):
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  got, _ = ckpt_lib.restore_subset(
      pretrained, {"ema_params": {"unet": objective.ld.unet.abstract_params}})
  return _host(got["ema_params"]["unet"])


def test_lora_trains_only_factors_and_merges_to_a_plain_unet(lora_run, pretrained):
  from md_jax.train import diffusion as diff  # pylint: disable=g-import-not-at-top
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  config, workdir = lora_run["config"], lora_run["workdir"]
  mesh = shd.make_mesh((1, 1, 1), config.mesh_axes, devices=jax.devices()[:1])
  obj = ufogen.UFOGenObjective(config, mesh)
  lora = obj.lora
  base = _pretrained_unet(obj, pretrained)

  # The checkpoint holds the factors (params, EMA, optimizer) and D; the base UNet is frozen.
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  saved = ckpt.saved_state_shapes(3)
  ckpt.close()
  assert set(saved["params"]) == set(saved["opt_state"]) == {"unet_lora", "disc"}
  assert set(saved["ema_params"]) == {"unet_lora"}
  assert "unet" in saved["frozen"] and "teacher" not in saved["frozen"]
  got, _ = ckpt_lib.restore_subset(workdir, {
      "params": {"unet_lora": lora.abstract_params},
      "ema_params": {"unet_lora": lora.abstract_params},
      "frozen": {"unet": obj.ld.unet.abstract_params}})
  got = _host(got)
  factors, ema_factors = got["params"]["unet_lora"], got["ema_params"]["unet_lora"]
  assert lora.num_params < obj.ld.unet.num_params / 2  # rank 4 on a UNet 8-16 channels wide
  # The base stays bit-equal to the pretrained UNet while the factors trained.
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(got["frozen"]["unet"])):
    np.testing.assert_array_equal(a, b)
  b_factors = [np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(factors)[0]
               if p[-1].key == "b"]
  assert b_factors and all(np.any(x) for x in b_factors)

  # Zero-effect initialisation: merged fresh factors are exactly the base.
  merged0 = _host(lora.merge(base, lora.init()))
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(merged0)):
    np.testing.assert_array_equal(a, b)
  # After training G's output moved; unmerge gives the base back.
  merged = lora.merge(base, factors)
  back = _host(lora.unmerge(merged, factors))
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(back)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  ids = jnp.asarray(obj.ld.tokenize(["a red circle", "a blue square"]))
  x = jax.random.normal(jax.random.key(1), (2,) + obj.ld.latent_shape(32), jnp.float32)
  forward = jax.jit(lambda p, fz: obj.ld.unet_apply(p)(x, jnp.full((2,), 500.0),
                                                       obj.ld.encode_text(fz, ids)))
  _, _, _, sampled, frozen, step = diff.load_for_sampling(workdir)
  assert step == 3 and "unet" not in frozen
  out_base = np.asarray(forward(base, frozen))
  np.testing.assert_array_equal(out_base, np.asarray(forward(merged0, frozen)))
  assert not np.allclose(out_base, np.asarray(forward(merged, frozen)), atol=1e-6)
  # Sampling (and the TFLite export, which loads through it) gets the plain merged EMA UNet.
  for a, b in zip(jax.tree.leaves(_host(lora.merge(base, ema_factors))),
                  jax.tree.leaves(_host(sampled))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_distill_lora_cell_runs_a_step(pretrained, tmp_path):
  """The one Table-5 cell no other test trains: distill,full is `trained`, ema,full
  `ema_trained`, diffusion,lora `lora_run`, ema,lora the 8-device test, and the paper's pick
  (diffusion,full) the smoke chain's UFOGen stage (tests/test_quickstart.py), end to end."""
  tr = _train("distill,lora,tiny", pretrained, str(tmp_path), steps=1)
  h, before, after = tr["history"][0], tr["before"]["params"], tr["after"][0]["params"]
  assert h["finite"] == 1.0
  assert h["recon"] == 0.0  # G starts as the teacher (under LoRA: the frozen base)
  for group in before:
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[group]),
                                                        jax.tree.leaves(after[group]))), group


# -- sharding and resume -----------------------------------------------------------------------


@pytest.mark.slow
def test_gan_step_same_on_one_and_eight_devices(pretrained, tmp_path):
  from test_distributed import _mesh_step  # pylint: disable=g-import-not-at-top
  r = _mesh_step(tmp_path, f"ufogen:ema,lora,tiny:{pretrained}")[0]
  assert r["groups"] == ["disc", "unet_lora"]
  assert r["fsdp_sharded_params"] > 0, "the 8-device run should really shard params over fsdp"
  for name, loss in r["losses1"].items():  # D's loss and G's
    assert abs(loss - r["losses8"][name]) <= 1e-5 * max(1.0, abs(loss)), name
  assert r["max_param_diff"] <= 1e-5 * max(1.0, r["param_scale"])


def _cli_args(pretrained, workdir, steps, sleep=0.0):
  """md_jax.main flags for the `lora_run` settings (configs/ufogen.py:LORA_CELL)."""
  values = {"init_from": pretrained, "data.image_size": 32, "optim.warmup_steps": 0,
            "optim.schedule": "constant", "optim.learning_rate": 1e-3,
            "ufogen.disc.learning_rate": 1e-3, "num_train_steps": steps, "checkpoint.every": 1,
            "eval_at_end": False, "progress_bar": False, "debug.step_sleep_s": sleep,
            **MICRO_UNET}
  return [f"--config=configs/ufogen.py:{LORA_CELL}", f"--workdir={workdir}"] + [
      f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
      for k, v in values.items()]


@pytest.mark.slow
def test_sigkill_mid_finetune_then_resume_matches_uninterrupted(lora_run, pretrained, tmp_path):
  from conftest import run_module, sigkill_after_checkpoint  # pylint: disable=g-import-not-at-top
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from test_train_loop import _data_state  # pylint: disable=g-import-not-at-top
  steps = 3
  straight, killed = lora_run["workdir"], str(tmp_path / "killed")  # straight: in this process

  interrupted_at = sigkill_after_checkpoint(_cli_args(pretrained, killed, steps, sleep=2.0),
                                            killed, (1, 2))
  assert interrupted_at < steps
  run_module("md_jax.main", *_cli_args(pretrained, killed, steps), check=True)

  config = _ufogen_config(LORA_CELL, pretrained)
  mesh = shd.make_mesh((1, 1, 1), config.mesh_axes, devices=jax.devices()[:1])
  obj = ufogen.UFOGenObjective(config, mesh)
  want = {"params": {"unet_lora": obj.lora.abstract_params, "disc": obj.disc.abstract_params},
          "ema_params": {"unet_lora": obj.lora.abstract_params},
          "frozen": {"unet": obj.ld.unet.abstract_params}}
  a, step_a = ckpt_lib.restore_subset(straight, want)
  b, step_b = ckpt_lib.restore_subset(killed, want)
  assert step_a == step_b == steps
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):  # G's factors and EMA, D, base G
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  for x, y in zip(jax.tree.leaves(_pretrained_unet(obj, pretrained)),
                  jax.tree.leaves(b["frozen"]["unet"])):
    np.testing.assert_array_equal(x, y)  # the frozen base survives the kill untouched
  d0 = jax.tree.leaves(b["params"]["disc"]["conv_out"])
  assert all(np.any(np.asarray(x)) for x in d0), "D's zero head should have trained"
  assert _data_state(straight, steps) == _data_state(killed, steps)


@pytest.mark.slow
def test_gan_step_on_cached_latents_matches_the_encoder_in_step(trained, pretrained, vae_workdir,
                                                                tmp_path):
  """With config.vae.cache_dir the GAN step draws its latents from the cached posteriors (the
  encoder is not run): same records, same key, so the same losses as `trained`'s first step,
  which encoded the images in the step."""
  from md_jax.tools import build_latent_cache  # pylint: disable=g-import-not-at-top
  cache = str(tmp_path / "latents")
  # `trained`'s settings and pool of records.
  build = _ufogen_config("distill,tiny", pretrained, **{"data.num_records": _POOL})
  with build.unlocked():
    build.vae_workdir = vae_workdir  # the VAE the pretrained run (init_from) read latents with
  build_latent_cache.build_for_config(build, cache, batch_size=8)
  cached = _train("distill,tiny", pretrained, str(tmp_path / "cached"), steps=1,
                  **{"data.num_records": _POOL, "vae.cache_dir": cache})
  assert "image" in trained["batch"] and "image" not in cached["batch"]
  assert cached["batch"]["latent_mean"].shape[1:] == (4, 4, 8)
  a, b = trained["history"][0], cached["history"][0]
  assert a["finite"] == b["finite"] == 1.0
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
