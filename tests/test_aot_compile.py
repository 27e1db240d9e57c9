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
  assert report["host_peak_rss_gib"] > 0.1  # the compile's resident memory here


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


_OOM = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory "
        "required for HLO temporaries (25.35G) exceeds available HBM (15.75G). HLO module: "
        "jit__train_step.\nSee https://openxla.org/xla/errors/error_1000 for more details.")


def test_hbm_oom_message_is_parsed():
  oom = aot_compile.parse_hbm_oom(_OOM)
  assert oom["what"] == "HLO temporaries"
  assert (oom["required_gib"], oom["available_gib"]) == (25.35, 15.75)
  assert oom["message"].startswith("RESOURCE_EXHAUSTED") and "See https" not in oom["message"]
  assert aot_compile.parse_hbm_oom(_OOM.replace("25.35G", "900M"))["required_gib"] == 0.879
  assert aot_compile.parse_hbm_oom("INVALID_ARGUMENT: something else") is None


def _aot_table():
  import importlib.util  # pylint: disable=g-import-not-at-top,redefined-outer-name,reimported
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "aot_table", os.path.join(REPO, "benchmarks", "aot_table.py"))
  aot_table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(aot_table)
  return aot_table


def test_aot_table_prints_an_hbm_refusal_as_a_row():
  aot_table = _aot_table()
  row = dict(case="md512@v5e:4x4", chips=16, mesh={"data": 2, "fsdp": 8, "tensor": 1},
             per_chip_batch=128, grad_accum_steps=1, remat=True, hbm_gib=16.0, fits=False,
             memory_gib=None, hbm_oom=aot_compile.parse_hbm_oom(_OOM), compile_s=80.0,
             host_peak_rss_gib=6.5)
  text = aot_table.table([row, dict(case="x@v5e:2x2", error="boom")])
  assert "| md512@v5e:4x4 | 16 | (2, 8, 1) | 128 | 1 | True | > 25.35 (HLO temporaries" in text
  assert "| NO | | | 80.0 | 6.5 |" in text and "| x@v5e:2x2 |" in text and "boom" in text
  # Every row has as many cells as the header.
  widths = {line.count("|") for line in text.splitlines()}
  assert len(widths) == 1, text


# libtpu logs this at start-up on a machine that is not a TPU VM; it is not the failure.
_LIBTPU_NOISE = ("E0000 00:00:1796095398.290885   10056 common_lib.cc:906] INVALID_ARGUMENT: "
                 "Error: unexpected worker hostname 'WARNING: could not determine TPU worker "
                 "hostnames or IP addresses' from env var TPU_WORKER_HOSTNAMES.")


def test_aot_table_says_why_a_compile_process_failed():
  describe = _aot_table().describe_failure
  # Killed by the kernel (no traceback): say so, and that host memory is the likely cause.
  got = describe(-9, _LIBTPU_NOISE + "\n", 1627.3)
  assert got.startswith("compile process killed by SIGKILL after 1627 s") and "OOM" in got
  assert describe(-15, "", 3.0).startswith("compile process killed by SIGTERM")
  # A traceback: its exception line, not the libtpu log line nor XLA's trailing "see <url>".
  tb = "\n".join([_LIBTPU_NOISE, "Traceback (most recent call last):", '  File "x", line 1',
                   "jaxlib._jax.XlaRuntimeError: INTERNAL: ptxas exploded",
                   "See https://openxla.org/xla/errors for more details."])
  assert describe(1, tb, 5.0) == "jaxlib._jax.XlaRuntimeError: INTERNAL: ptxas exploded"
  # The tool's own refusal.
  assert describe(1, _LIBTPU_NOISE + "\nerror: global batch 10 does not split", 5.0) == (
      "error: global batch 10 does not split")
  assert describe(3, "", 1.0) == "exit 3"


@pytest.mark.slow
def test_a_step_too_big_for_hbm_is_reported_not_raised():
  """libtpu refuses a step whose buffers exceed the chip's HBM; the tool reports it as a row
  that does not fit, with what the compiler says the step needs."""
  _need_libtpu()
  config = tiny_config("lowres", mesh_shape=(2, 2, 1))
  report = aot_compile.compile_for_topology(config, "v5e:2x2", global_batch_size=2 ** 20)
  assert report["fits"] is False and report["per_chip_batch"] == 2 ** 18
  oom = report["hbm_oom"]
  assert oom["required_gib"] > oom["available_gib"] > 0, oom
  assert report["memory_gib"] is None and report["step_flops_per_chip"] is None
  assert report["host_peak_rss_gib"] > 0.1
