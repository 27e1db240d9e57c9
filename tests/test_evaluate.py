"""The evaluation CLI on a tiny trained shapes run: restore, sample sharded, judge + VAE-space
distance + CLIP score, JSON / TensorBoard / grids / curve; the same on 8 fake devices."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import MICRO_UNET, REPO, cli_env, run_module
from md_jax import evaluate
from md_jax.evaluators import caption_use
from md_jax.train import checkpoint as ckpt_lib

ARGS = dict(sampler="dpmpp2m", num_steps=3, cfg_scales=[1.0, 3.0], num_samples=8, batch_size=8)


@pytest.fixture(scope="module")
def run_dir(vae_workdir, tmp_path_factory):
  """A tiny diffusion run trained and saved on 8 fake devices with its params split over an
  fsdp axis of 2 (mesh data x fsdp = 4 x 2), so that every evaluation below (1 device; 2
  processes x 4 devices) restores params saved on another mesh."""
  workdir = str(tmp_path_factory.mktemp("diffusion"))
  flags = [f"--config.{k}={v!r}" for k, v in MICRO_UNET.items()]
  run_module("md_jax.main", "--config=configs/shapes.py:lowres,tiny", f"--workdir={workdir}",
             f"--config.vae_workdir={vae_workdir}", "--config.num_train_steps=2",
             "--config.eval_at_end=False", "--config.progress_bar=False",
             "--config.mesh_shape=(4,2,1)", *flags,
             env=cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), check=True)
  return workdir


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A tiny random CLIPModel directory (as tests/test_clip_score.py makes it)."""
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from test_text_encoder_hf import _copy_tokenizer, _tiny_text_config  # pylint: disable=g-import-not-at-top
  cfg = transformers.CLIPConfig(
      text_config=_tiny_text_config().to_dict(),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, image_size=32, patch_size=16),
      projection_dim=16)
  directory = str(tmp_path_factory.mktemp("clip"))
  transformers.CLIPModel(cfg).eval().save_pretrained(directory)
  _copy_tokenizer(directory)
  return directory


def _two_processes(tmp_path, *args, devices_per_process: int = 4, timeout: float = 900):
  """``python -m md_jax.evaluate *args`` as two local processes; their last stdout lines."""
  port = _free_port()
  procs, logs = [], []
  for pid in range(2):
    env = cli_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
                  JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2,
                  JAX_PROCESS_ID=pid)
    out, err = (open(tmp_path / f"p{pid}.{k}", "w+") for k in ("out", "err"))  # no pipe stalls
    logs.append((out, err))
    procs.append(subprocess.Popen([sys.executable, "-m", "md_jax.evaluate", *args], cwd=REPO,
                                  env=env, stdout=out, stderr=err, text=True))
  try:
    codes = [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  results = []
  for code, (out, err) in zip(codes, logs):
    out.seek(0)
    err.seek(0)
    assert code == 0, err.read()[-4000:]
    results.append(json.loads(out.read().strip().splitlines()[-1]))
  return results


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # a tiny diffusion run, two samplings and a two-process CLI run
@pytest.mark.multiprocess
def test_evaluate_writes_metrics_and_matches_on_eight_devices(run_dir, clip_dir, tmp_path):
  one = str(tmp_path / "one")
  # The params were saved split over the fsdp axis of a 4 x 2 mesh (orbax's sharding record).
  with open(os.path.join(ckpt_lib.checkpoint_dir(run_dir), "2", "state", "_sharding")) as f:
    saved_specs = [json.loads(v) for v in json.load(f).values()]
  assert any(s["shape"] == [4, 2, 1] and "fsdp" in json.dumps(s["partition_spec"])
             for s in saved_specs)
  report = evaluate.evaluate(run_dir, clip_dir=clip_dir, out=one, progress=False, **ARGS)
  assert report["step"] == 2 and report["params"] == "ema_params"
  uses = report["caption_use"]
  assert set(uses) == {f"caption_use/{k}/t{t}" for t in caption_use.DEFAULT_TIMESTEPS
                       for k in ("mse", "colour_gap", "shape_gap", "position_gap", "empty_gap")}
  assert all(np.isfinite(v) for v in uses.values())
  assert [r["cfg"] for r in report["results"]] == [1.0, 3.0]
  for r in report["results"]:
    assert np.isfinite(r["fd_vae"]) and r["fd_vae"] > 0 and np.isfinite(r["kid_vae"])
    assert -1.0 <= r["clip_score"] <= 1.0 and r["clip_score_count"] == 8
    assert r["judge"]["n"] == 8 and 0.0 <= r["judge"]["all"] <= 1.0
    # The samples told apart from real renders, and from real renders after the VAE round trip.
    for k in ("c2st_spectrum", "c2st_shapes", "c2st_spectrum_recon", "c2st_shapes_recon"):
      lo, hi = r[k + "_ci"]
      assert lo <= r[k] <= hi and 0.0 <= r[k + "_auc"] <= 1.0, k
    assert os.path.isfile(r["grid"])
  round_trip = report["vae_round_trip"]  # the decoder alone, once per evaluation
  assert set(round_trip) == {f"c2st_{k}{s}" for k in ("spectrum", "shapes")
                             for s in ("", "_ci", "_auc")}
  imgs = report["images"]
  assert imgs[1.0].shape == (8, 32, 32, 3) and imgs[1.0].dtype == np.uint8
  assert not np.array_equal(imgs[1.0], imgs[3.0])  # guidance changes the samples
  with open(report["json"]) as f:
    saved = json.load(f)
  assert saved["sampler"] == "dpmpp2m" and saved["num_steps"] == 3
  assert os.path.isfile(saved["curve"]) and Image.open(saved["curve"]).size == (720, 520)
  assert glob.glob(os.path.join(one, "tensorboard", "events.out.tfevents.*"))

  # The CLI on 8 fake CPU devices held by two processes (jax.distributed on loopback, as on a
  # pod's hosts): the same images (grids) and metrics; process 0 writes the report.
  eight = str(tmp_path / "eight")
  summaries = _two_processes(
      tmp_path, f"--workdir={run_dir}", "--sampler=dpmpp2m", "--steps=3", "--sweep_cfg=1,3",
      "--num_samples=8", "--batch_size=8", f"--clip_dir={clip_dir}", f"--out={eight}",
      "--noprogress", "--distributed=on")
  assert summaries[1]["json"] is None
  for key, value in uses.items():  # the caption-use gaps do not depend on the device count
    assert abs(summaries[0]["caption_use"][key] - value) <= 1e-4 * max(1.0, abs(value)), key
  for a, b in zip(*(s["results"] for s in summaries)):  # every process computed the metrics
    for key in ("fd_vae", "kid_vae", "fd_shapes", "clip_score", "c2st_spectrum", "c2st_shapes",
                "c2st_spectrum_recon", "c2st_shapes_recon"):
      assert a[key] == b[key], key
  assert summaries[0]["vae_round_trip"] == summaries[1]["vae_round_trip"]
  with open(summaries[0]["json"]) as f:
    other = json.load(f)
  assert (other["devices"], other["processes"]) == (8, 2) and report["devices"] == 1
  for a, b in zip(saved["results"], other["results"]):
    ga = np.asarray(Image.open(a["grid"]), np.int16)
    gb = np.asarray(Image.open(b["grid"]), np.int16)
    assert np.abs(ga - gb).max() <= 1, f"cfg {a['cfg']}: images differ across device counts"
    for key in ("fd_vae", "kid_vae", "clip_score"):
      assert abs(a[key] - b[key]) <= 1e-3 * max(1.0, abs(a[key])), (key, a[key], b[key])
    assert a["judge"]["all"] == b["judge"]["all"]


def test_evaluate_errors_are_named(tmp_path):
  # Checked before anything is restored.
  with pytest.raises(ValueError, match="both --fid_stats and --inception"):
    evaluate.evaluate(str(tmp_path), fid_stats=str(tmp_path / "s.npz"))
  with pytest.raises(FileNotFoundError, match="--clip_dir"):
    evaluate.evaluate(str(tmp_path), clip_dir=str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    evaluate.evaluate(str(tmp_path / "empty"))
  (tmp_path / "p.json").write_text(json.dumps({"captions": [{"caption": "a"}, "b"]}))
  assert evaluate.read_prompts(str(tmp_path / "p.json")) == ["a", "b"]
  (tmp_path / "p.txt").write_text("one\n\ntwo\n")
  assert evaluate.read_prompts(str(tmp_path / "p.txt")) == ["one", "two"]


def test_a_diffusion_run_as_vae_workdir_is_named_as_such(run_dir, tmp_path):
  """config.vae_workdir pointing at a diffusion run: the error names the key and what that run
  is, instead of a restore failure."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = tiny_config("lowres", vae_workdir=run_dir, **MICRO_UNET)
  with pytest.raises(ValueError, match=r"config.vae_workdir=.* is a 'diffusion' run, not a VAE"):
    trainer = loop.Trainer(config, str(tmp_path / "w"))
    trainer.objective.init_frozen(trainer.frozen_shardings)


def test_vae_round_trip_decodes_as_the_samples_do(run_dir):
  """The two-sample tests' reference renders go through the VAE as every sample's latents do
  (latent normalisation and back cancel), padding a short last batch changes nothing, and the
  round trip does change the renders."""
  from md_jax.evaluators import samples  # pylint: disable=g-import-not-at-top
  from md_jax.train import diffusion  # pylint: disable=g-import-not-at-top

  config, ld, mesh, _, frozen, _ = diffusion.load_for_sampling(run_dir)
  # pylint: disable=protected-access
  real = evaluate._shapes_real(config, 8, int(config.data.image_size))
  vae = evaluate._Vae(ld, mesh, frozen, batch_size=8)
  # pylint: enable=protected-access
  recon = vae.reconstruct(real)
  assert recon.shape == real.shape and recon.dtype == np.uint8
  x = real.astype(np.float32) / 127.5 - 1.0
  mean, logvar = ld.vae.bind(frozen["vae"]).encode(x)
  as_sampled = samples.to_uint8(ld.decode_latents(
      frozen, ld.latents_from_moments(frozen, mean, logvar, None)))
  assert np.abs(recon.astype(int) - as_sampled.astype(int)).max() <= 1
  np.testing.assert_array_equal(vae.reconstruct(real[:5]), recon[:5])
  assert np.abs(recon.astype(int) - real.astype(int)).mean() > 1.0
  assert vae(real[:5]).shape == (5, int(np.prod(mean.shape[1:])))


def test_caption_use_gaps_are_zero_for_a_denoiser_that_ignores_the_caption(run_dir):
  """The gaps measure the caption's effect on the denoiser: exactly 0 for one that never reads
  it, non-zero for every attribute when it does."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from md_jax.train import diffusion  # pylint: disable=g-import-not-at-top

  config, ld, mesh, unet, frozen, _ = diffusion.load_for_sampling(run_dir)

  class Denoiser:
    """The run's LatentDiffusion with a stand-in denoiser that reads the caption or not."""

    def __init__(self, reads):
      self.reads = reads

    def __getattr__(self, name):
      return getattr(ld, name)

    def unet_apply(self, params):
      del params
      def apply(x, t, ctx):
        # (The text encoder's last LayerNorm makes every token's mean over features the same,
        # so read one feature, weighted by token position.)
        read = jnp.sum(ctx[..., 0] * (1.0 + jnp.arange(ctx.shape[1])), axis=1)
        return 0.5 * x + self.reads * read[:, None, None, None]
      return apply

  kw = dict(image_size=int(config.data.image_size), num_records=16, timesteps=(300, 900),
            batch_size=8)
  ignoring = dict(caption_use.run(Denoiser(0.0), unet, frozen, mesh, **kw))
  reading = dict(caption_use.run(Denoiser(1.0), unet, frozen, mesh, **kw))
  gaps = [k for k in ignoring if "_gap" in k]
  assert len(gaps) == 8 and len(ignoring) == 10  # 4 attributes and the error itself, 2 levels
  for key in gaps:
    assert ignoring[key] == 0.0 and reading[key] != 0.0, key
  real = dict(caption_use.run(ld, unet, frozen, mesh, **kw))
  assert real.keys() == ignoring.keys() and all(np.isfinite(v) for v in real.values())


def test_swapped_captions_change_one_attribute():
  swap = caption_use.swapped_captions
  got = swap("a picture of an orange plus sign at the left edge",
             dict(colour="orange", shape="cross", position="left"))
  assert got == {"colour": "a picture of a red plus sign at the left edge",
                 "shape": "a picture of an orange circle at the left edge",
                 "position": "a picture of an orange plus sign at the right edge", "empty": ""}
  got = swap("at the top right corner, a violet disc",
             dict(colour="purple", shape="circle", position="top right"))
  assert got["colour"] == "at the top right corner, an orange disc"
  assert got["shape"] == "at the top right corner, a violet square"
  assert got["position"] == "at the bottom left corner, a violet disc"
  # The centre cell has no mirror image: left out of the position gap.
  assert swap("a blue box in the middle", dict(colour="blue", shape="square",
                                              position="center"))["position"] is None
