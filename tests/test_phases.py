"""Several trainable groups with their own optimizers, updated in ordered phases in one step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from md_jax.train import loop
from md_jax.train import sharding as shd
from md_jax.train.state import ModelSpec
from md_jax.train import vae as vae_obj


class _Scalar(nnx.Module):

  def __init__(self, value: float):
    self.w = nnx.Param(jnp.asarray(value, jnp.float32), out_sharding=())


@loop.register("_test_two_phase")
class _TwoPhase(loop.Objective):
  """'d' moves b toward 1; 'g' then moves a toward b. Order and frequency are visible in a."""

  every_d = 1

  @property
  def trainable(self):
    return {"a": ModelSpec("a", lambda rngs: _Scalar(0.5)),
            "b": ModelSpec("b", lambda rngs: _Scalar(0.0))}

  def phases(self):
    return [loop.Phase("d", ("b",), self.d_loss, every=self.every_d),
            loop.Phase("g", ("a",), self.loss)]

  def ema_groups(self):
    return ("a",)

  def d_loss(self, params, frozen, batch, rng, step):
    return jnp.square(params["b"]["w"] - 1.0), {}

  def loss(self, params, frozen, batch, rng, step):
    return jnp.square(params["a"]["w"] - params["b"]["w"]), {"gap": params["a"]["w"]}

  def data_iterator(self, process_index, process_count):
    raise NotImplementedError


@loop.register("_test_two_phase_every2")
class _TwoPhaseEvery2(_TwoPhase):
  every_d = 2


def _trainer(tmp_path, name):
  config = tiny_config("vae", trainer=name, ema_decay=0.5)
  with config.unlocked():
    config.optim.learning_rate = 1.0
    config.optim.warmup_steps = 0
    config.optim.schedule = "constant"
    config.optim.grad_clip_norm = 0.0
  return loop.Trainer(config, str(tmp_path))


def _run(trainer, steps):
  state = trainer.init_state()
  batch = shd.global_batch_from_local({"x": np.zeros((8, 1), np.float32)}, trainer.mesh)
  step_fn = trainer.compile_step({"x": jax.ShapeDtypeStruct((8, 1), jnp.float32)})
  history = []
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
    history.append((float(state["params"]["a"]["w"]), float(state["params"]["b"]["w"]),
                    {k: float(v) for k, v in metrics.items()}))
  return state, history


def test_later_phase_sees_the_earlier_phase_update(tmp_path):
  trainer = _trainer(tmp_path, "_test_two_phase")
  state, hist = _run(trainer, 1)
  a, b, metrics = hist[0]
  # Adam's first step moves each scalar by the learning rate against its gradient's sign:
  # b 0 -> 1; then a sees b = 1 (not 0), so a rises 0.5 -> 1.5 (with the old b it would fall).
  assert b == pytest.approx(1.0, abs=1e-4)
  assert a == pytest.approx(1.5, abs=1e-4)
  # Each group has its own optimizer state; only the EMA groups keep an EMA.
  assert set(state["opt_state"]) == {"a", "b"}
  assert set(state["ema_params"]) == {"a"}
  # The last phase reports plain names, earlier ones are prefixed.
  assert metrics["loss"] == pytest.approx(0.25, abs=1e-4)  # (0.5 - 1)^2 before the g update
  assert metrics["d/loss"] == pytest.approx(1.0, abs=1e-5)  # (0 - 1)^2
  assert "gap" in metrics and "d/grad_norm" in metrics


def test_phase_every_skips_updates_in_between(tmp_path):
  trainer = _trainer(tmp_path, "_test_two_phase_every2")
  _, hist = _run(trainer, 2)
  assert hist[0][1] == pytest.approx(1.0, abs=1e-4)  # step 0: d updates
  assert hist[1][1] == hist[0][1]  # step 1: d skipped, b unchanged (an update would move it ~lr)


def test_phase_naming_an_unknown_group_is_an_error(tmp_path):
  class _Bad(_TwoPhase):
    def phases(self):
      return [loop.Phase("g", ("a", "c"), self.loss)]
  loop.register("_test_bad_phase")(_Bad)
  with pytest.raises(ValueError, match="'c'"):
    _trainer(tmp_path, "_test_bad_phase")


def _adv_config(start_step=2):
  config = tiny_config("vae")
  with config.unlocked():
    config.vae.adversarial.weight = 0.5
    config.vae.adversarial.start_step = start_step
    config.vae.adversarial.channels = (8, 16)
    config.vae.adversarial.norm_groups = 4
  return config


def test_vae_gan_term_switches_on_at_start_step():
  config = _adv_config(start_step=3)
  mesh = shd.make_mesh((1, 1, 1), config.mesh_axes, devices=jax.devices()[:1])
  obj = vae_obj.VAEObjective(config, mesh)
  assert set(obj.trainable) == {"vae", "disc"}
  assert obj.optim_config("disc").b1 == 0.5 and obj.optim_config("vae").b1 == 0.9
  params = jax.jit(obj.init_params)(jax.random.key(0))
  # 32 px = the training crop, so the loss sees the whole image.
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  batch = {"image": x}
  rng = jax.random.key(1)

  loss_fn = jax.jit(lambda p, step: obj.loss(p, {}, batch, rng, step))

  def parts(step):
    loss, m = loss_fn(params, jnp.asarray(step))
    return float(loss), {k: float(v) for k, v in m.items()}

  before, mb = parts(2)
  after, ma = parts(3)
  # kl_weight is in SD's convention (against the per-image SUM of errors); our mse averages over
  # the 32x32x3 values, so the KL enters divided by them.
  base = mb["mse"] + float(config.vae.kl_weight) / (32 * 32 * 3) * mb["kl"]
  assert mb["adv_weight"] == 0.0 and before == pytest.approx(base, rel=1e-5)
  assert ma["adv_weight"] == 0.5
  assert after == pytest.approx(base + ma["d_loss"] + 0.5 * ma["g_adv"], rel=1e-5)

  # The GAN term trains the VAE only through D's verdict on the reconstruction and D only on
  # real vs (stopped) reconstructions: D's gradient equals that of its own loss alone.
  def d_only(dp):
    d = obj.disc.bind(dp)
    model = obj.spec.bind(params["vae"])
    crop_rng, r = jax.random.split(rng)
    xc = vae_obj.random_crop(x, int(config.vae.train_crop), 8, crop_rng)
    recon = model(xc, r)[0].astype(jnp.float32)
    return (jnp.mean(jax.nn.softplus(-d(xc))) + jnp.mean(jax.nn.softplus(d(recon))))

  g_full = jax.jit(jax.grad(lambda dp: obj.loss({**params, "disc": dp}, {}, batch, rng,
                                                jnp.asarray(3))[0]))(params["disc"])
  g_own = jax.jit(jax.grad(d_only))(params["disc"])
  for u, v in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_own)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_vae_gan_trains_and_checkpoints_the_discriminator(tmp_path):
  config = _adv_config(start_step=2)
  with config.unlocked():
    config.eval_at_end = False
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 4
  metrics = result["metrics"]
  assert metrics["adv_weight"] == 0.5 and np.isfinite(metrics["d_loss"])
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  got, step = ckpt_lib.restore_subset(
      str(tmp_path), {"params": {"disc": obj_disc_abstract(config)}})
  assert step == 4 and jax.tree.leaves(got["params"]["disc"])


def obj_disc_abstract(config):
  return vae_obj.disc_spec(config).abstract_params
