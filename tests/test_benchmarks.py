"""Benchmarks that report numbers from the real code paths still run (on tiny configs here)."""

from __future__ import annotations

import importlib.util
import json
import os

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
