"""Shared test setup: CPU only, a persistent compilation cache, helpers to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MD_JAX_COMPILATION_CACHE", os.path.join(REPO, ".cache", "jax"))
# Test programs run a handful of steps, so XLA:CPU's backend optimisation (about half of every
# compile) never pays off: compile them unoptimised. Results agree to float rounding; only the
# generated loops are slower, which at test sizes is noise. Real runs keep the defaults.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()


def cli_env(fast_compile: bool = True, **extra) -> dict:
  """The environment for a CLI subprocess; ``fast_compile=False`` for runs of real-size models
  long enough that optimised code pays for its compile time (the smoke chain)."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.update({k: str(v) for k, v in extra.items()})
  if "XLA_FLAGS" in extra and FAST_COMPILE not in env["XLA_FLAGS"]:
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {FAST_COMPILE}"
  if not fast_compile:
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(FAST_COMPILE, "").strip()
  return env


def run_module(module: str, *args, env=None, timeout=900, check=False):
  """Runs ``python -m module args`` from the repo root; returns CompletedProcess."""
  cmd = [sys.executable, "-m", module, *args]
  proc = subprocess.run(cmd, cwd=REPO, env=env or cli_env(), capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def sigkill_after_checkpoint(args, workdir: str, steps, timeout: float = 600) -> int:
  """Runs ``python -m md_jax.main *args``, SIGKILLs it (no chance to clean up, as a crash or an
  OOM kill) once WORKDIR's latest checkpoint is one of ``steps``; returns that step."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  proc = subprocess.Popen([sys.executable, "-m", "md_jax.main", *args], cwd=REPO, env=cli_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  try:
    while time.time() < deadline:
      if ckpt_lib.latest_step_in(workdir) in steps:
        break
      if proc.poll() is not None:
        pytest.fail("run ended before it could be killed")
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  interrupted_at = ckpt_lib.latest_step_in(workdir)
  assert interrupted_at is not None, f"no checkpoint in {workdir} before the kill"
  return interrupted_at


# A two-level UNet (FullConv level, then SPConv with SA + CA): every UNet block type in a third
# of the tiny shapes UNet's ops. Tests whose cost is compiling diffusion or GAN steps use it.
MICRO_UNET = {"unet.channels": (8, 16), "unet.down_blocks": (1, 1), "unet.up_blocks": (2, 2),
              "unet.down_conv": ("full", "sep"), "unet.up_conv": ("full", "sep"),
              "unet.down_depth": (0, 1), "unet.up_depth": (0, 1), "unet.self_attn": (False, True),
              "unet.time_embed_dim": 16}


def tiny_config(stage: str = "vae", **overrides):
  from md_jax import config_loading  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config(f"configs/shapes.py:{stage},tiny")
  with config.unlocked():
    config.progress_bar = False
    config.compilation_cache_dir = os.environ["MD_JAX_COMPILATION_CACHE"]
    set_keys(config, overrides)
  return config


def set_keys(config, values: dict) -> None:
  """config["a.b.c"] = v for each dotted key (call inside ``config.unlocked()``)."""
  for key, value in values.items():
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value


@pytest.fixture(scope="session")
def vae_workdir(tmp_path_factory):
  """A tiny trained VAE run that diffusion tests read latents through."""
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("vae"))
  loop.train_and_evaluate(tiny_config("vae", eval_at_end=False), workdir)
  return workdir
