"""Full-size pod configs (configs/md_pretrain.py, configs/ufogen.py:md512) and gradient
accumulation in the loop's train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from md_jax import config_base
from md_jax import config_loading
from md_jax.train import loop
from md_jax.train import sharding as shd
from md_jax.train.state import ModelSpec


def _load(spec, **overrides):
  config = config_loading.load_config(spec)
  with config.unlocked():
    for k, v in overrides.items():
      node = config
      *head, last = k.split(".")
      for p in head:
        node = node[p]
      node[last] = v
  return config


@pytest.mark.parametrize("res,batch,steps", [(256, 4096, 750_000), (512, 2048, 250_000)])
def test_md_pretrain_stage_values(res, batch, steps):
  c = _load(f"configs/md_pretrain.py:{res}")
  md = _load(f"configs/md.py:{res}")
  assert c.unet.to_dict() == {**md.unet.to_dict(), "remat": True}  # the paper's network
  assert c.text.hidden_size == 768 and c.context_length == 77 and c.data.max_length == 77
  assert (c.global_batch_size, c.num_train_steps) == (batch, steps)
  assert c.data.image_size == res and c.latent_size == res // 8
  o = c.optim
  assert (o.name, o.learning_rate, o.b1, o.b2, o.weight_decay) == ("adamw", 1e-3, 0.9, 0.999, 0.01)
  assert c.ema_decay > 0 and c.compute_dtype == "bfloat16"
  assert tuple(c.mesh_axes) == ("data", "fsdp", "tensor")
  fsdp = c.mesh_shape[1]
  for width in (*c.unet.channels, c.unet.time_embed_dim, c.text.hidden_size):
    assert width % fsdp == 0, "fsdp must divide the big kernels or they stay replicated"
  # The global batch splits over any slice of 8..512 chips with whole per-chip batches.
  for chips in (8, 16, 64, 128, 256, 512):
    assert batch % chips == 0
  assert "init_from" in c and c.init_from == ""


def test_md_pretrain_rejects_unknown_stage():
  with pytest.raises(ValueError, match="stage must be one of"):
    config_loading.load_config("configs/md_pretrain.py:1024")


def test_records_config_without_source_fails_naming_the_key():
  from md_jax.train import vae as vae_obj  # pylint: disable=g-import-not-at-top
  c = _load("configs/md_pretrain.py:256")
  with pytest.raises(ValueError, match="config.data.source"):
    vae_obj.make_data_iterator(c, 0, 1)


def test_md_pretrain_builds_abstractly_at_paper_size():
  # The whole sharded state of the 512 stage, as ShapeDtypeStructs only (no parameter memory):
  # a 1-device mesh here, the same code on a pod.
  c = _load("configs/md_pretrain.py:512", mesh_shape=(1, 1, 1))
  trainer = loop.Trainer(c, workdir="", mesh=shd.make_mesh((1, 1, 1), c.mesh_axes))
  n = sum(int(x.size) for x in jax.tree.leaves(trainer.abstract_params))
  assert 370e6 < n < 400e6  # paper: ~386M
  spec = trainer.objective.batch_spec(c.global_batch_size)
  assert spec["image"].shape == (2048, 512, 512, 3) and spec["input_ids"].shape == (2048, 77)
  # params, Adam moments (2x) and EMA, float32
  state_bytes = sum(int(x.size) * x.dtype.itemsize
                    for x in jax.tree.leaves(trainer.abstract_state) if hasattr(x, "dtype"))
  assert state_bytes > 4 * 4 * 370e6


@pytest.mark.parametrize("size", [512, 256])
def test_ufogen_md_sizes_take_the_md_network(size):
  c = _load(f"configs/ufogen.py:md{size}")
  md = _load(f"configs/md.py:{size}")
  assert c.trainer == "ufogen" and c.data.image_size == size
  assert {k: v for k, v in c.unet.to_dict().items() if k != "remat"} == {
      k: v for k, v in md.unet.to_dict().items() if k != "remat"}
  assert c.compute_dtype == "bfloat16" and c.unet.remat
  assert c.global_batch_size % c.optim.grad_accum_steps == 0
  assert c.text.hidden_size == 768


# ---------------------------------------------------------------------------------------------
# Gradient accumulation: k micro-batches per step give the update of the whole batch.


class _Linear(nnx.Module):

  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (6, 3)) * 0.3, sharding=("embed", None))


@loop.register("test_linear_regression")
class _LinearRegression(loop.Objective):
  """Deterministic loss (no noise draws), so the accumulated and the full-batch step must agree."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    self.spec = ModelSpec("lin", _Linear)

  @property
  def trainable(self):
    return {"lin": self.spec}

  def loss(self, params, frozen, batch, rng, step):
    pred = batch["x"] @ params["lin"]["w"]
    err = jnp.mean(jnp.square(pred - batch["y"]))
    return err, dict(mse=err)

  def data_iterator(self, process_index, process_count):
    raise NotImplementedError


def _step(accum):
  c = config_base.base_config()
  c.trainer = "test_linear_regression"
  c.num_train_steps = 10
  c.optim.warmup_steps = 0
  c.optim.grad_clip_norm = 0.0
  c.optim.grad_accum_steps = accum
  c.mesh_shape = (1, 1, 1)
  trainer = loop.Trainer(c, workdir="")
  rng = np.random.default_rng(0)
  batch = dict(x=jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
               y=jnp.asarray(rng.normal(size=(8, 3)), jnp.float32))
  state = trainer.init_state()
  w_init = np.asarray(jax.device_get(state["params"]["lin"]["w"]))
  step = trainer.compile_step({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()})
  new, metrics = step(state, batch)
  return jax.device_get(new["params"]["lin"]["w"]), jax.device_get(metrics), w_init


def test_grad_accumulation_matches_full_batch_update():
  w1, m1, w_init = _step(1)
  w4, m4, _ = _step(4)
  assert np.abs(w1 - w_init).max() > 1e-4  # the step really moved the weights
  np.testing.assert_allclose(w4, w1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)


def test_grad_accumulation_must_divide_the_batch():
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    _step(3)


def test_step_flops_count_every_micro_batch():
  """MFU and the AOT table read trainer.step_flops; XLA counts the micro-batch scan's body once,
  so without scaling an accumulated step would report 1/k of its flops."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  flops = {}
  for k in (1, 2):
    config = tiny_config("vae")
    with config.unlocked():
      config.optim.grad_accum_steps = k
    trainer = loop.Trainer(config, workdir="")
    trainer.compile_step(trainer.objective.batch_spec(int(config.global_batch_size)))
    flops[k] = trainer.step_flops
  assert flops[1] > 0
  assert flops[2] == pytest.approx(flops[1], rel=0.03), flops
