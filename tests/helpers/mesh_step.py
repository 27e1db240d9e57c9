"""Runs one train step of a tiny config on a 1-device mesh and on a data x fsdp mesh.

Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8; prints one JSON
line with the max differences of loss and updated params between the two meshes.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

sys.path.insert(0, sys.argv[1])  # tests/ for conftest helpers
from conftest import tiny_config  # noqa: E402
from md_jax.train import loop  # noqa: E402
from md_jax.train import sharding as shd  # noqa: E402


def one_step(config, workdir, mesh):
  trainer = loop.Trainer(config, workdir, mesh=mesh)
  state = trainer.init_state()
  it = trainer.objective.data_iterator(0, 1)
  batch = shd.global_batch_from_local(trainer.objective.host_batch(next(it)), mesh)
  compiled = trainer.compile_step({k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                   for k, v in batch.items()})
  new_state, metrics = compiled(state, batch)
  specs = {str(p): str(x.sharding.spec) for p, x in
           jax.tree_util.tree_flatten_with_path(new_state["params"])[0]}
  return (float(metrics["loss"]), jax.device_get(new_state["params"]), specs)


def main():
  stage, workdir = sys.argv[2], sys.argv[3]
  vae_workdir = sys.argv[4] if len(sys.argv) > 4 else ""
  assert jax.device_count() == 8, jax.devices()
  config = tiny_config(stage)
  with config.unlocked():
    config.vae_workdir = vae_workdir
    config.mesh_shape = (4, 2, 1)
  mesh8 = shd.make_mesh(config.mesh_shape, config.mesh_axes)
  mesh1 = shd.make_mesh((1, 1, 1), config.mesh_axes, devices=jax.devices()[:1])
  loss1, params1, _ = one_step(config, workdir + "/one", mesh1)
  loss8, params8, specs8 = one_step(config, workdir + "/eight", mesh8)
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8))]
  scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(params1))
  sharded = sum("fsdp" in s for s in specs8.values())
  print(json.dumps(dict(loss1=loss1, loss8=loss8, max_param_diff=max(diffs), param_scale=scale,
                        fsdp_sharded_params=sharded, num_params=len(specs8))))


if __name__ == "__main__":
  main()
