"""Checkpoints across meshes (saved on 8 devices, restored on 2 and on 4 with another fsdp size)
and resuming past a truncated latest checkpoint."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, cli_env, run_module, tiny_config
from md_jax.train import checkpoint as ckpt_lib
from md_jax.train import loop


def _restore(workdir, devices, mesh):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tests", "helpers", "restore_on_mesh.py"),
       os.path.join(REPO, "tests"), workdir, mesh],
      cwd=REPO, env=cli_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"),
      capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_saved_on_eight_devices_restores_on_two_and_four(tmp_path):
  workdir = str(tmp_path / "w8")
  run_module("md_jax.main", "--config=configs/shapes.py:vae,tiny", f"--workdir={workdir}",
             "--config.num_train_steps=2", "--config.eval_at_end=False",
             "--config.mesh_shape=(4,2,1)",
             env=cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), check=True)
  on2 = _restore(workdir, 2, "1,2,1")
  on4 = _restore(workdir, 4, "1,4,1")  # another fsdp size
  for r, n in ((on2, 2), (on4, 4)):
    assert r["step"] == 2 and r["devices"] == n
    assert r["max_abs_diff"] == 0.0  # the sharded restore equals the host copy exactly
    assert r["fsdp_split_params"] > 0  # and really is split over the new fsdp axis
  assert on2["checksum"] == on4["checksum"]


def _truncate_step(workdir, step):
  state_dir = os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step), "state")
  n = 0
  for root, _, files in os.walk(state_dir):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      with open(path, "r+b") as f:
        f.truncate(size // 2)
      n += 1
  assert n > 0


def test_truncated_latest_checkpoint_resumes_from_the_previous(tmp_path, caplog):
  workdir = str(tmp_path / "w")
  config = tiny_config("vae", num_train_steps=4, eval_at_end=False, **{"checkpoint.every": 2,
                                                                       "checkpoint.max_to_keep": 3})
  loop.train_and_evaluate(config, workdir)
  assert ckpt_lib.latest_step_in(workdir) == 4
  trainer = loop.Trainer(config, workdir)
  at2, _ = ckpt_lib.restore_subset(workdir, {"params": trainer.abstract_params}, step=2)
  _truncate_step(workdir, 4)

  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  state, step = ckpt.restore_latest(trainer.abstract_state_sharded)
  ckpt.close()
  assert step == 2
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(at2["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The loop itself: resumes from step 2 (saying so), replaces the bad step 4, goes on.
  longer = tiny_config("vae", num_train_steps=6, eval_at_end=False,
                       **{"checkpoint.every": 2, "checkpoint.max_to_keep": 3})
  with caplog.at_level(logging.WARNING):
    result = loop.train_and_evaluate(longer, workdir)
  assert result["step"] == 6
  assert any("step 4, is unreadable" in r.getMessage() for r in caplog.records)
  assert ckpt_lib.latest_step_in(workdir) == 6


@pytest.mark.parametrize("with_ema", [True, False])
def test_restore_preferring_ema_falls_back_only_for_a_missing_ema(tmp_path, with_ema):
  """Sampling, export and the later stages read a run's EMA weights, or its params when the run
  kept no EMA copy; any other missing part is an error, not a silent fallback."""
  params = {"unet": {"w": np.full((2, 3), 1.0, np.float32)}}
  ema = {"unet": {"w": np.full((2, 3), 2.0, np.float32)}}
  frozen = {"stats": np.arange(4, dtype=np.float32)}
  state = dict(params=params, frozen=frozen, **({"ema_params": ema} if with_ema else {}))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(7, state, None, {"trainer": "test"})
  ckpt.close()
  abstract = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)

  got, others, step, which = ckpt_lib.restore_preferring_ema(
      str(tmp_path), abstract(params), {"frozen": abstract(frozen)})
  assert step == 7 and which == ("ema_params" if with_ema else "params")
  np.testing.assert_array_equal(got["unet"]["w"], (ema if with_ema else params)["unet"]["w"])
  np.testing.assert_array_equal(others["frozen"]["stats"], frozen["stats"])
  got, _, _, which = ckpt_lib.restore_preferring_ema(str(tmp_path), abstract(params),
                                                     use_ema=False)
  assert which == "params" and float(got["unet"]["w"][0, 0]) == 1.0
  with pytest.raises(ckpt_lib.MissingStateError, match="teacher") as err:
    ckpt_lib.restore_preferring_ema(str(tmp_path), abstract(params),
                                    {"teacher": abstract(params)})
  assert "teacher" in err.value.missing
