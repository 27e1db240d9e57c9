"""softmax -> ReLU finetuning: one parameter tree, restored through the stage checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_jax.config_loading import load_config
from md_jax.models import unet as unet_lib
from md_jax.train import checkpoint as ckpt_lib
from md_jax.train.state import ModelSpec


def _micro_config():
  """Two levels: a FullConv level and an SPConv level with SA + CA transformers."""
  cfg = unet_lib.tiny_config()
  cfg.channels = (8, 16)
  cfg.down_blocks, cfg.up_blocks = (1, 1), (2, 2)
  cfg.down_conv, cfg.up_conv = ("full", "sep"), ("full", "sep")
  cfg.down_depth, cfg.up_depth = (0, 1), (0, 1)
  cfg.self_attn = (False, True)
  cfg.time_embed_dim = 16
  return cfg


def _spec(attention: str) -> ModelSpec:
  cfg = _micro_config()
  cfg.attention = attention
  return ModelSpec("unet", lambda rngs: unet_lib.UNet(cfg, rngs=rngs))


def _inputs(cfg):
  rng = np.random.default_rng(0)
  return (rng.standard_normal((1, 8, 8, cfg.in_channels)).astype(np.float32),
          np.array([500.0], np.float32),
          rng.standard_normal((1, 5, cfg.context_dim)).astype(np.float32))


def _random_params(spec: ModelSpec) -> dict:
  """numpy-drawn weights (a jitted init compiles one PRNG program per shape: slow on 2 cores);
  nothing zero, so the attention kind shows in the output (conv_out starts at zero)."""
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda a: jnp.asarray((rng.standard_normal(a.shape) / np.sqrt(max(a.shape[-1], 1)))
                            .astype(np.float32)),
      spec.abstract_params)


# Values only, not speed: XLA's backend optimisations double CPU compile time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def test_softmax_checkpoint_restores_into_relu_model(tmp_path):
  soft, relu = _spec("softmax"), _spec("relu")
  assert jax.tree.structure(soft.abstract_params) == jax.tree.structure(relu.abstract_params)
  params = _random_params(soft)

  workdir = str(tmp_path / "softmax_run")
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  ckpt.save(7, {"step": jnp.asarray(7), "params": {"unet": params}}, None, {})
  ckpt.close()

  got, step = ckpt_lib.restore_subset(workdir, {"params": {"unet": relu.abstract_params}})
  assert step == 7
  restored = got["params"]["unet"]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  inputs = _inputs(_micro_config())
  apply = lambda spec: jax.jit(lambda p, *a: spec.bind(p)(*a), compiler_options=_FAST_COMPILE)
  y_soft = apply(soft)(params, *inputs)
  y_relu = apply(relu)(restored, *inputs)
  assert np.all(np.isfinite(y_relu))
  # Same weights, different attention: the relu model really runs relu attention.
  assert not np.allclose(y_soft, y_relu, atol=1e-4)


def test_relu_stage_config():
  for size in ("tiny", "smoke", "full"):
    relu = load_config(f"configs/shapes_relu.py:{size}")
    soft = load_config(f"configs/shapes.py:highres,{size}")
    assert relu.unet.attention == "relu" and soft.unet.attention == "softmax"
    relu_unet = relu.unet.to_dict()
    relu_unet["attention"] = "softmax"
    assert relu_unet == soft.unet.to_dict()  # same network, so the same parameter tree
    assert relu.data.image_size == soft.data.image_size
