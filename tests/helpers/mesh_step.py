"""Runs one train step of a tiny config on a 1-device mesh and on a data x fsdp mesh.

Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8; for each job,
the max differences of loss and updated params between the two meshes.

``mesh_step.py TESTS_DIR WORKDIR JOB [JOB ...]``, one process for all jobs (one JAX start-up),
printing one JSON object keyed by job. A JOB is
  STAGE[:VAE_WORKDIR]              a configs/shapes.py tiny stage (diffusion stages with the
                                   micro UNet of conftest.MICRO_UNET, reading VAE_WORKDIR);
  ufogen:ARG:PRETRAINED_WORKDIR    a GAN step of configs/ufogen.py:ARG (the test_ufogen settings)
                                   finetuning PRETRAINED_WORKDIR.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

sys.path.insert(0, sys.argv[1])  # tests/ for conftest helpers
from conftest import MICRO_UNET, tiny_config  # noqa: E402
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
  # Every phase's loss (a GAN step has the discriminator's too).
  losses = {k: float(v) for k, v in metrics.items() if k.endswith("loss")}
  return (losses, jax.device_get(new_state["params"]), specs)


def compare(job, workdir):
  if job.startswith("ufogen:"):
    from test_ufogen import _ufogen_config  # pylint: disable=g-import-not-at-top
    _, arg, pretrained = job.split(":", 2)
    config = _ufogen_config(arg, pretrained)
  else:
    stage, _, vae_workdir = job.partition(":")
    config = tiny_config(stage, **({} if stage == "vae" else MICRO_UNET))
    with config.unlocked():
      config.vae_workdir = vae_workdir
  with config.unlocked():
    config.mesh_shape = (4, 2, 1)
  mesh8 = shd.make_mesh(config.mesh_shape, config.mesh_axes)
  mesh1 = shd.make_mesh((1, 1, 1), config.mesh_axes, devices=jax.devices()[:1])
  losses1, params1, _ = one_step(config, workdir + "/one", mesh1)
  losses8, params8, specs8 = one_step(config, workdir + "/eight", mesh8)
  loss1, loss8 = losses1["loss"], losses8["loss"]
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8))]
  scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(params1))
  sharded = sum("fsdp" in s for s in specs8.values())
  return dict(loss1=loss1, loss8=loss8, max_param_diff=max(diffs), param_scale=scale,
              fsdp_sharded_params=sharded, num_params=len(specs8), losses1=losses1,
              losses8=losses8, groups=sorted(params1))


def main():
  workdir, jobs = sys.argv[2], sys.argv[3:]
  assert jax.device_count() == 8, jax.devices()
  print(json.dumps({job: compare(job, f"{workdir}/{i}") for i, job in enumerate(jobs)}))


if __name__ == "__main__":
  main()
