"""Ahead-of-time compilation of the real sharded train step for a TPU topology, on this CPU.

Needs libtpu (``pip install -e .[tpu-aot]``); skipped without it unless MD_JAX_REQUIRE_LIBTPU=1,
which CI sets so a missing libtpu fails instead of silently skipping.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import tiny_config
from md_jax.tools import aot_compile

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
REQUIRE = os.environ.get("MD_JAX_REQUIRE_LIBTPU", "") not in ("", "0")


def _need_libtpu():
  if not HAVE_LIBTPU:
    if REQUIRE:
      pytest.fail("MD_JAX_REQUIRE_LIBTPU is set but libtpu is not importable "
                  "(pip install -e .[tpu-aot])")
    pytest.skip("libtpu is not installed (pip install -e .[tpu-aot])")


@pytest.mark.slow
def test_tiny_diffusion_step_compiles_for_v5e_2x2():
  _need_libtpu()
  config = tiny_config("lowres", mesh_shape=(2, 2, 1))
  report = aot_compile.compile_for_topology(config, "v5e:2x2")
  assert report["chips"] == 4 and "v5 lite" in report["device_kind"].lower()
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert report["per_chip_batch"] == config.global_batch_size // 4
  mem = report["memory_gib"]
  assert 0 < mem["arguments"] and 0 < mem["total"] < report["hbm_gib"] and report["fits"]
  assert report["step_flops_per_chip"] > 0


def test_without_libtpu_the_tool_says_how_to_get_it():
  if HAVE_LIBTPU:
    pytest.skip("libtpu is installed here")
  with pytest.raises(aot_compile.LibtpuMissingError, match=r"tpu-aot"):
    aot_compile.compile_for_topology(tiny_config("vae"), "v5e:2x2")


def test_hbm_table_knows_the_generations():
  assert aot_compile.tpu_generation("TPU v5 lite") == "v5e"
  assert aot_compile.tpu_generation("TPU v5") == "v5p"
  assert aot_compile.tpu_generation("TPU v4") == "v4"
  assert aot_compile.tpu_generation("TPU v6 lite") == "v6e"
  assert aot_compile.HBM_BYTES["v5e"] == 16 * 1024**3
