"""Benchmarks that report numbers from the real code paths still run (on tiny configs here)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re

import pytest

from conftest import MICRO_UNET, REPO


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_train_step_memory_runs_a_real_step_with_nothing_on_disk():
  bench = _load("train_step_memory")
  overrides = [f"{k}={json.dumps(v)}" for k, v in MICRO_UNET.items()] + [
      "text.num_hidden_layers=1"]
  report = bench.run_case("configs/shapes.py:highres,tiny", batch=2, dtype="float32",
                          remat=True, mesh="(-1, 1, 1)", steps=2, overrides=overrides)
  assert report["trainer"] == "diffusion" and report["remat"] and report["finite"]
  assert report["batch"] == 2 and len(report["step_s"]) == 2
  assert report["xla_gib"]["arguments"] > 0 and report["xla_gib"]["temporaries"] > 0
  rss = report["rss_gib"]
  assert rss["peak_during_step"] >= rss["state_resident"] > 0
  with pytest.raises(SystemExit, match="unet.no_such_key"):
    bench.run_case("configs/shapes.py:highres,tiny", batch=2, dtype="float32", remat=False,
                   mesh="(-1, 1, 1)", steps=1, overrides=["unet.no_such_key=1"])


def test_ufogen_table_validates_its_arguments_and_formats_rows(tmp_path, capsys, monkeypatch):
  bench = _load("ufogen_table")
  for argv, message in (
      (["--base", str(tmp_path), "--out", str(tmp_path / "o"), "--cells", "diffusion,fast"],
       "unknown cell 'diffusion,fast'"),
      (["--base", str(tmp_path / "none"), "--out", str(tmp_path / "o")], "no such run directory"),
      (["--base", str(tmp_path), "--out", str(tmp_path / "o"), "--use_run",
        f"diffusion,full={tmp_path}"], "no finished run there"),
      (["--base", str(tmp_path), "--out", str(tmp_path / "o"), "--seeds", "0,x"],
       "expected ','-separated integers"),
      (["--base", str(tmp_path), "--out", str(tmp_path / "o"), "--seeds", "1,1"],
       "expected distinct integers"),
      (["--base", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "seed=3"],
       "give training seeds with --seeds")):
    with pytest.raises(SystemExit):
      bench.main(argv)
    assert message in capsys.readouterr().err
  # Each training seed finetunes in its own directory, with its own log and config.seed.
  calls = []
  monkeypatch.setattr(bench.subprocess, "run", lambda cmd, stdout=None, **kw: calls.append(
      (cmd, stdout.name)))
  args = argparse.Namespace(out=str(tmp_path / "o"), size="full", base=str(tmp_path), steps=300,
                            batch=8, set=["ufogen.disc.steps=2"])
  for seed in (0, 2):
    bench.finetune("no_adversary", args, seed)
  (cmd0, log0), (cmd2, log2) = calls
  assert f"--workdir={tmp_path / 'o' / 'no_adversary'}" in cmd0
  assert log0.endswith("no_adversary.log")
  assert not any(a.startswith("--config.seed") for a in cmd0)
  assert f"--workdir={tmp_path / 'o' / 'no_adversary_s2'}" in cmd2
  assert log2.endswith("no_adversary_s2.log") and "--config.seed=2" in cmd2
  assert {"--config.ufogen.adv_weight=0.0", "--config.ufogen.disc.steps=2"} <= set(cmd2)
  row = dict(name="(c) diffusion,full", seen_colour=0.5, held_out_colour=0.25, fd_shapes=812.4,
             kid_shapes=0.1234, c2st_spectrum=0.8125, c2st_spectrum_ci=[0.7754, 0.8445],
             c2st_shapes=0.5625, c2st_shapes_recon=0.625, c2st_shapes_recon_ci=[0.5, 0.7],
             c2st_spectrum_recon=0.75,
             vae_round_trip=dict(c2st_spectrum=0.99, c2st_spectrum_ci=[0.98, 1.0],
                                 c2st_shapes=0.5),
             judge=dict(colour=0.5, colour_ci=[0.4, 0.6], shape=0.25, position=0.75, all=0.125,
                        rejected=0.0625, edge_width_median=0.7349,
                        edge_width_median_ci=[0.7012, 0.7788], edge_width_n=250),
             lenient=dict(colour=0.625, shape=0.375, position=0.875, rejected=0.0))
  old = {**{k: v for k, v in row.items() if not k.startswith(("c2st", "vae_round"))},
         "judge": {k: v for k, v in row["judge"].items() if not k.startswith("edge")}}
  table = bench.format_table([row, old, row]).splitlines()
  assert len(table) == 7 and table[1].count("|") == table[0].count("|") == table[2].count("|")
  assert table[2] == ("| (c) diffusion,full | 50.0% [40.0, 60.0] | 25.0% | 75.0% | 12.5% | 6.2% | "
                      "50.0% / 25.0% | 62.5% / 37.5% / 87.5% | 0.73 [0.70, 0.78] (250) | 812 "
                      "| 0.123 | 56.2% | 62.5% [50.0, 70.0] | 75.0% |")
  # A row judged without edge widths or two-sample tests.
  assert "| 62.5% / 37.5% / 87.5% | - | 812 | 0.123 | - | - | - |" in table[3]
  # The decoder-alone control, once for the two rows that share it.
  assert table[5:] == ["", "VAE round trip against real renders (the decoder alone; from (c) "
                       "diffusion,full): spectrum 99.0% [98.0, 100.0], shapes 50.0%"]
  # Across seeds: mean +- sample sd of each finetuned row's edge width, lenient colour, fd.
  other = {**row, "fd_shapes": 912.4, "lenient": {**row["lenient"], "colour": 0.5},
           "c2st_shapes": 0.6875,
           "judge": {**row["judge"], "edge_width_median": 0.9349}}
  seeds = bench.format_seed_table([("(c) diffusion,full", [row, other]), ("old", [old, row])])
  lines = seeds.splitlines()
  assert lines[2] == ("| (c) diffusion,full | 2 | 0.83 +- 0.14 (0.73, 0.93) | 56.2 +- 8.8 "
                      "(62.5, 50.0) | 862 +- 71 (812, 912) | 62.5 +- 8.8 (56.2, 68.8) "
                      "| 62.5 +- 0.0 (62.5, 62.5) |")
  assert lines[3].startswith("| old | 2 | - | 62.5 +- 0.0")


def test_ufogen_table_reuses_an_evaluation_only_of_the_same_run_and_step(tmp_path, monkeypatch):
  bench = _load("ufogen_table")
  from md_jax import evaluate  # pylint: disable=g-import-not-at-top
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  class Judged(Exception):
    pass

  def judge(workdir, **kw):
    raise Judged(workdir)

  monkeypatch.setattr(evaluate, "evaluate", judge)
  run, other = str(tmp_path / "run"), str(tmp_path / "other")
  args = argparse.Namespace(out=str(tmp_path / "o"), num_samples=8)
  stored = os.path.join(args.out, "eval", "(c)_diffusion_full")
  os.makedirs(stored)
  with open(os.path.join(stored, "row.json"), "w") as f:
    json.dump(dict(name="(c) diffusion,full", workdir=run, step=40), f)
  latest = {run: 40, other: 40}
  monkeypatch.setattr(ckpt_lib, "latest_step_in", lambda w: latest[w])
  assert bench.evaluate_row("(c) diffusion,full", run, "onestep", args)["step"] == 40
  with pytest.raises(Judged, match=f"^{re.escape(other)}$"):  # copied from another table's run
    bench.evaluate_row("(c) diffusion,full", other, "onestep", args)
  latest[run] = 80  # the run continued to more steps
  with pytest.raises(Judged, match=f"^{re.escape(run)}$"):
    bench.evaluate_row("(c) diffusion,full", run, "onestep", args)


@pytest.mark.slow  # two train steps of conftest.MICRO_UNET compile
def test_latent_cache_step_compares_the_same_step_both_ways(monkeypatch, capsys):
  bench = _load("latent_cache_step")
  sets = [a for k, v in MICRO_UNET.items() for a in ("--set", f"{k}={json.dumps(v)}")]
  monkeypatch.setattr("sys.argv", ["latent_cache_step.py", "--stage", "highres", "--size", "tiny",
                                   "--runs", "1", "--batch", "8", *sets])
  assert bench.main() == 0
  out = capsys.readouterr().out
  losses = [float(line.rsplit("loss ", 1)[1].rstrip(")")) for line in out.splitlines()
            if "step" in line and "loss " in line]
  assert len(losses) == 2 and abs(losses[0] - losses[1]) < 1e-5, out  # the same step both ways
  assert "speed-up with the cache:" in out and "ms per image" in out
  assert "--set unet.channels=[8, 16]" in out and "UNet 34,072 params" in out  # the micro UNet


def test_text_tower_table_trains_each_row_with_its_tower_and_formats_rows(tmp_path, capsys,
                                                                         monkeypatch):
  bench = _load("text_tower_table")
  qs = tmp_path / "qs"
  for argv, message in (
      (["--qs", str(qs), "--out", str(tmp_path / "o")], "no light_decoder/"),
      (["--qs", str(qs), "--out", str(tmp_path / "o"), "--rows", "a,e"], "unknown row 'e'"),
      (["--qs", str(qs), "--out", str(tmp_path / "o"), "--budgets", "1000,330"],
       "increasing positive integers")):
    with pytest.raises(SystemExit):
      bench.main(argv)
    assert message in capsys.readouterr().err
  # Each row: the 64-px stage from scratch, then the 128-px stage from it to each budget, on the
  # quickstart's autoencoder and latent caches, with the row's text tower.
  calls = []
  monkeypatch.setattr(bench.subprocess, "run", lambda cmd, stdout=None, **kw: calls.append(cmd))
  args = argparse.Namespace(out=str(tmp_path / "o"), qs=str(qs), set=["seed=1"], reuse_qs={})
  high = bench.train_to("d", 330, args)
  assert high == str(tmp_path / "o" / "d" / "highres")
  (low_cmd, high_cmd) = calls
  assert "--config=configs/shapes.py:lowres" in low_cmd
  assert f"--config.vae.cache_dir={qs / 'latents_lowres'}" in low_cmd
  assert f"--config.init_from={tmp_path / 'o' / 'd' / 'lowres'}" in high_cmd
  for cmd in calls:
    assert {"--config.text.hf_dir=md_jax:shapes_clip", "--config.text.frozen=False",
            f"--config.vae_workdir={qs / 'light_decoder'}", "--config.seed=1",
            "--config.vae.decoder_channels=(16,24,48,48)"} <= set(cmd), cmd
  assert "--config.num_train_steps=330" in high_cmd
  calls.clear()
  bench.train_to("a", 1000, args)
  assert {"--config.text.hf_dir=", "--config.text.frozen=True"} <= set(calls[0])
  # A reused quickstart row continues a copy of its 128-px run, initialised from its 64-px one.
  (qs / "highres" / "checkpoints").mkdir(parents=True)
  args.reuse_qs = {"c": str(qs)}
  calls.clear()
  bench.train_to("c", 1000, args)
  assert (tmp_path / "o" / "c" / "highres" / "checkpoints").is_dir() and len(calls) == 1
  assert f"--config.init_from={qs / 'lowres'}" in calls[0]
  row = dict(row="c", name="pretrained, frozen", step=330,
             judge=dict(colour=0.5, colour_ci=[0.4, 0.6], shape=0.25, shape_ci=[0.2, 0.3],
                        position=0.75, position_ci=[0.7, 0.8], rejected=0.0625,
                        edge_width_median=0.7349),
             seen=dict(colour=0.5, shape=0.25, position=0.75),
             held_out=dict(colour=0.25, shape=0.125, position=0.5),
             gaps=dict(colour=0.3612, shape=0.0421, position=0.4))
  table = bench.format_table([row]).splitlines()
  assert table[2] == ("| (c) pretrained, frozen | 330 | 50.0 [40, 60] | 25.0 [20, 30] | "
                      "75.0 [70, 80] | 50 / 25 / 75 | 25 / 12 / 50 | 6.2 | 0.73 | "
                      "0.361 / 0.042 / 0.400 |")
