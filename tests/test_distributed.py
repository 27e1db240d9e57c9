"""Same results on 1 device, 8 fake devices (data x fsdp = 4 x 2) and 2 processes x 2 devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, cli_env, run_module
from md_jax.train import checkpoint as ckpt_lib

EIGHT = "--xla_force_host_platform_device_count=8"


def _mesh_step(tmp_path, *jobs):
  """tests/helpers/mesh_step.py's 1-device vs 8-device comparison of each job, in one process."""
  env = cli_env(XLA_FLAGS=EIGHT)
  cmd = [sys.executable, os.path.join(REPO, "tests", "helpers", "mesh_step.py"),
         os.path.join(REPO, "tests"), str(tmp_path), *jobs]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-4000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  return [got[job] for job in jobs]


@pytest.fixture(scope="module")
def vae_and_diffusion_steps(tmp_path_factory, vae_workdir):
  """The VAE step and a low-res diffusion step (micro UNet) on 1 and on 8 devices."""
  return _mesh_step(tmp_path_factory.mktemp("mesh"), "vae", f"lowres:{vae_workdir}")


def test_vae_step_same_on_one_and_eight_devices(vae_and_diffusion_steps):
  r = vae_and_diffusion_steps[0]
  assert r["fsdp_sharded_params"] > 0, "the 8-device run should really shard params over fsdp"
  assert abs(r["loss1"] - r["loss8"]) <= 1e-5 * max(1.0, abs(r["loss1"]))
  assert r["max_param_diff"] <= 1e-5 * max(1.0, r["param_scale"])


@pytest.mark.slow
def test_diffusion_step_same_on_one_and_eight_devices(vae_and_diffusion_steps):
  r = vae_and_diffusion_steps[1]
  assert r["groups"] == ["unet"]
  assert r["fsdp_sharded_params"] > 0
  assert abs(r["loss1"] - r["loss8"]) <= 1e-5 * max(1.0, abs(r["loss1"]))
  assert r["max_param_diff"] <= 1e-5 * max(1.0, r["param_scale"])


def _restore_params(workdir):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from md_jax.train import vae as vae_obj  # pylint: disable=g-import-not-at-top
  spec = vae_obj.vae_spec(tiny_config("vae"))
  got, step = ckpt_lib.restore_subset(workdir, {"params": {"vae": spec.abstract_params}})
  return got["params"], step


@pytest.mark.multiprocess
def test_two_processes_match_one_process_with_four_devices(tmp_path):
  """Two processes x 2 devices, started the way TPU workers are: ``launch/tpu.py local`` runs
  the very per-worker command (``md_jax.main ... --distributed=on``) as local processes."""
  steps = 4
  common = ["--config=configs/shapes.py:vae,tiny", f"--config.num_train_steps={steps}",
            "--config.mesh_shape=(2,2,1)", "--config.eval_at_end=False"]
  single = str(tmp_path / "single")
  run_module("md_jax.main", *common, f"--workdir={single}",
             env=cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"), check=True)

  multi = str(tmp_path / "multi")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "tpu.py"), "local", common[0],
       f"--workdir={multi}", "--num-processes=2", "--devices-per-process=2", "--", *common[1:]],
      cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  launched = [l for l in proc.stdout.splitlines() if l.startswith("[local")]
  assert len(launched) == 2 and all("-m md_jax.main" in l and "--distributed=on" in l
                                    for l in launched)
  summaries = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  assert len(summaries) == 2 and all(s["step"] == steps for s in summaries)

  a, step_a = _restore_params(single)
  b, step_b = _restore_params(multi)
  assert step_a == step_b == steps
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  # Each process saved its own data position.
  data_dir = os.path.join(multi, "checkpoints", str(steps), "data")
  assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
