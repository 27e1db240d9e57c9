"""The embedded end-to-end chain (smoke size) and the sampling CLI on its result."""

from __future__ import annotations

import json
import os

import pytest

from conftest import cli_env, run_module


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("quickstart"))
  proc = run_module("md_jax.quickstart", f"--workdir={workdir}", "--size=smoke", timeout=2400,
                    env=cli_env(fast_compile=False))
  assert proc.returncode == 0, proc.stderr[-5000:]
  return workdir, proc


@pytest.mark.slow
def test_smoke_chain_trains_samples_and_judges(smoke_run):
  workdir, proc = smoke_run
  with open(os.path.join(workdir, "quickstart.json")) as f:
    summary = json.load(f)
  assert set(summary["seconds"]) == {"vae", "lowres", "highres", "export"}
  ev = summary["eval"]
  assert ev["sampler"] == "ddim" and ev["num_samples"] == 32
  scores = ev["scores"]
  for key in ("colour", "shape", "position", "all"):
    assert 0.0 <= scores[key] <= 1.0
    assert len(scores[key + "_ci"]) == 2
  assert scores["seen"]["n"] + scores["held_out"]["n"] == 32
  assert os.path.exists(ev["grid"])
  assert "eval/recon_psnr" in summary["vae"]
  # The high-res stage started from the low-res one and from the VAE's latent statistics.
  assert "[quickstart] stage highres" in proc.stdout
  # The chain ends with the checked Android bundle of the high-res run and a LiteRT run of it.
  ex = summary["export"]
  assert ex["step"] == 40 and ex["dir"] == os.path.join(workdir, "bundle")
  assert len(ex["checks"]) == 6
  # The text encoder and decoder pass in both precisions. The 40-step smoke UNet may not: its
  # full-int8 graph fails parity and, depending on the run, an fp16 activation range check
  # (early models have wide, outlier-driven activations; the full quickstart's UNet passes).
  # Failures are recorded and printed, and the bundle is still written.
  for f, ok in ex["checks"].items():
    if not f.startswith("unet_onestep"):
      assert ok, (f, ex["check_errors"].get(f))
  for f, ok in ex["checks"].items():
    assert ok == (f not in ex["check_errors"])
    if not ok:
      assert ex["check_errors"][f] and f"FAILED {f}" in proc.stdout
  with open(os.path.join(ex["dir"], "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["source"]["workdir"] == os.path.join(workdir, "highres")
  assert ex["pipeline"]["fp16"]["psnr_vs_jax_db"] >= 40.0
  assert ex["pipeline"]["int8"]["files"]["unet_onestep"] == "int8"
  for r in ex["pipeline"].values():
    assert os.path.getsize(r["png"]) > 100
  assert f"bundle {ex['dir']} (step 40): checks" in proc.stdout


@pytest.mark.slow
def test_rerun_resumes_instead_of_retraining(smoke_run):
  workdir, _ = smoke_run
  proc = run_module("md_jax.quickstart", f"--workdir={workdir}", "--size=smoke", timeout=1800,
                    env=cli_env(fast_compile=False))
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "quickstart.json")) as f:
    summary = json.load(f)
  # Nothing left to do: each finished stage reports its final.json instead of evaluating again.
  assert max(summary["seconds"].values()) < 60, summary["seconds"]
  assert "eval/recon_psnr" in summary["vae"] and summary["eval"]["num_samples"] == 32
  # The bundle already holds the high-res run's last step: reused, not converted again.
  assert summary["export"]["export_seconds"] < 5, summary["export"]
  assert summary["export"]["pipeline"]["fp16"]["psnr_vs_jax_db"] >= 40.0


@pytest.mark.slow
def test_sample_cli_writes_pngs(smoke_run, tmp_path):
  workdir, _ = smoke_run
  out = tmp_path / "samples"
  proc = run_module("md_jax.sample", f"--workdir={os.path.join(workdir, 'highres')}",
                    "--steps=4", "--num_per_prompt=2", f"--out={out}",
                    "a red circle in the top left corner", "a blue square at the bottom",
                    timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  pngs = [f for f in result["files"] if f.endswith(".png")]
  assert len(pngs) == 5  # 2 prompts x 2 + grid
  for f in pngs:
    assert os.path.getsize(f) > 100


def test_sample_cli_rejects_a_vae_workdir(vae_workdir):
  proc = run_module("md_jax.sample", f"--workdir={vae_workdir}", "a red circle", timeout=600)
  assert proc.returncode == 1
  assert "diffusion run" in proc.stderr
