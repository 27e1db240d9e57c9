"""Restores a tiny VAE run's newest checkpoint onto a mesh of this process's devices and reports
how the params came out: python restore_on_mesh.py TESTS_DIR WORKDIR MESH_SHAPE (e.g. 1,2,1)."""

import json
import sys

sys.path.insert(0, sys.argv[1])

import jax  # noqa: E402
import numpy as np  # noqa: E402

from conftest import tiny_config  # noqa: E402
from md_jax.train import checkpoint as ckpt_lib  # noqa: E402
from md_jax.train import loop  # noqa: E402
from md_jax.train import sharding as shd  # noqa: E402

workdir = sys.argv[2]
shape = tuple(int(x) for x in sys.argv[3].split(","))
config = tiny_config("vae", mesh_shape=shape)
trainer = loop.Trainer(config, workdir, mesh=shd.make_mesh(shape, config.mesh_axes))
ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
state, step = ckpt.restore_latest(trainer.abstract_state_sharded)
ckpt.close()
# The same params read back as plain host arrays (no mesh at all).
host, _ = ckpt_lib.restore_subset(workdir, {"params": trainer.abstract_params}, step=step)
diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(host["params"])))
fsdp_split = sum(1 for x in jax.tree.leaves(state["params"])
                 if "fsdp" in str(x.sharding.spec) and shape[1] > 1)
print(json.dumps(dict(step=step, devices=jax.device_count(), max_abs_diff=diff,
                      fsdp_split_params=fsdp_split,
                      checksum=float(sum(np.sum(np.asarray(x, np.float64))
                                         for x in jax.tree.leaves(state["params"]))))))
