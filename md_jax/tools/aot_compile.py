"""Compiles a config's real sharded train step for a TPU topology, here, without a TPU.

  python -m md_jax.tools.aot_compile --config=configs/md_pretrain.py:512 --topology=v5p:4x4x4 \
      [--config.optim.grad_accum_steps=4 --config.mesh_shape='(-1,8,1)' ...]

Needs libtpu (``pip install -e .[tpu-aot]``, best in its own virtualenv: with libtpu installed
every other command should run with JAX_PLATFORMS=cpu). The topology's devices come from
``jax.experimental.topologies.get_topology_desc``; the mesh is built over them from the config,
the state and batch are ShapeDtypeStructs with the run's shardings, and the step is the loop's own
(md_jax.train.loop.Trainer). Prints one JSON line: per-chip memory (arguments, temporaries,
output, total) against the chip's HBM, whether it fits, and the step's flops per chip. A step
that the TPU compiler refuses for lack of HBM is a result too: the report then has
``fits: false`` and ``hbm_oom`` (what the compiler says the step needs against what the chip
has), and no flops. ``host_peak_rss_gib`` is the compile's peak memory on this machine.
Nothing is read from disk: UFOGen configs still insist on ``--config.init_from``, but any value
compiles (it is read only when a run starts).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import resource
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file (configs/*.py[:arg]).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None,
                                "TPU topology, e.g. v5e:2x2, v5e:4x4, v5p:4x4x4, v4:2x2x2, v6e:4x4.")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch_size", 0,
                                     "0: config.global_batch_size.")
flags.mark_flags_as_required(["config", "topology"])

GIB = 1024 ** 3
# HBM per chip (public specs).
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
_KIND_TO_GEN = (("v6 lite", "v6e"), ("v6e", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"),
                ("v5p", "v5p"), ("v5", "v5p"), ("v4", "v4"))


class LibtpuMissingError(RuntimeError):
  pass


def tpu_generation(device_kind: str) -> str:
  kind = device_kind.lower()
  for key, gen in _KIND_TO_GEN:
    if key in kind:
      return gen
  raise ValueError(f"unknown TPU device kind {device_kind!r}")


def topology_devices(topology: str):
  """The devices of a TPU slice, described on this (CPU) machine by libtpu."""
  if importlib.util.find_spec("libtpu") is None:
    raise LibtpuMissingError(
        "libtpu is not importable in this Python environment "
        f"({sys.executable}); install it with `pip install -e .[tpu-aot]` (best in a separate "
        "virtualenv) to compile for TPU topologies")
  # Compiling needs no exclusive access to a chip: let several compiles (and tests) share libtpu
  # instead of failing on its single-process lock file.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"--topology={topology}: libtpu cannot describe it ({e})") from None


# libtpu's refusal, e.g. "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM,
# the total memory required for HLO temporaries (25.35G) exceeds available HBM (15.75G)."
_HBM_OOM = re.compile(r"CompileTimeHbmOom.*?required for (?P<what>[^(]+?) \((?P<need>[\d.]+)"
                      r"(?P<need_unit>[KMGT])\) exceeds available HBM \((?P<have>[\d.]+)"
                      r"(?P<have_unit>[KMGT])\)", re.S)
_UNIT_GIB = {"K": 1 / 1024 ** 2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}


def parse_hbm_oom(message: str) -> dict | None:
  """{what, required_gib, available_gib, message} of a TPU compile refused for lack of HBM, or
  None for any other error."""
  m = _HBM_OOM.search(message)
  if m is None:
    return None
  line = next((l.strip() for l in message.splitlines() if "CompileTimeHbmOom" in l), "")
  return dict(what=m["what"].strip(),
              required_gib=round(float(m["need"]) * _UNIT_GIB[m["need_unit"]], 3),
              available_gib=round(float(m["have"]) * _UNIT_GIB[m["have_unit"]], 3),
              message=line)


def compile_for_topology(config, topology: str, global_batch_size: int = 0) -> dict:
  """Lowers and compiles ``config``'s train step for ``topology``; returns the report dict."""
  import jax  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  from md_jax.train import optim  # pylint: disable=g-import-not-at-top
  from md_jax.train import sharding as shd  # pylint: disable=g-import-not-at-top

  devices = topology_devices(topology)
  mesh = shd.make_mesh(config.mesh_shape, config.mesh_axes, devices=devices)
  batch = int(global_batch_size or config.global_batch_size)
  div = shd.batch_divisor(mesh)
  accum = optim.grad_accum_steps(config)
  if batch % div or (batch // div) % accum:
    raise ValueError(f"global batch {batch} does not split over the {div} devices of the data "
                     f"axes of mesh {dict(mesh.shape)} into grad_accum_steps={accum} micro-batches")
  trainer = loop.Trainer(config, workdir="", mesh=mesh)
  gen = tpu_generation(devices[0].device_kind)
  hbm = HBM_BYTES[gen]
  n_params = sum(int(x.size) for x in jax.tree.leaves(trainer.abstract_params))
  report = dict(
      config=str(config.get("stage", config.trainer)), trainer=config.trainer, topology=topology,
      chips=len(devices), device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
      global_batch=batch, per_chip_batch=batch // div, grad_accum_steps=accum,
      remat=bool(config.unet.get("remat", False)) if "unet" in config else False,
      compute_dtype=str(config.compute_dtype), trainable_params=n_params,
      hbm_gib=round(hbm / GIB, 1))
  t0 = time.time()
  try:
    compiled = trainer.compile_step(trainer.objective.batch_spec(batch))
  except Exception as e:  # pylint: disable=broad-except
    oom = parse_hbm_oom(str(e))
    if oom is None:
      raise
    return dict(report, fits=False, hbm_oom=oom, memory_gib=None, step_flops_per_chip=None,
                step_tflops_per_chip=None, step_s_at_peak=None,
                compile_s=round(time.time() - t0, 1), host_peak_rss_gib=_host_peak_rss_gib())
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  args = int(mem.argument_size_in_bytes)
  temps = int(mem.temp_size_in_bytes)
  out = int(mem.output_size_in_bytes)
  alias = int(mem.alias_size_in_bytes)
  code = int(mem.generated_code_size_in_bytes)
  # Donated state buffers are reused for the output (alias): count them once.
  total = args + temps + out - alias + code
  flops = float(trainer.step_flops)
  peak = loop._PEAK_FLOPS.get(f"tpu {gen}", 0.0)  # pylint: disable=protected-access
  return dict(
      report,
      memory_gib=dict(arguments=round(args / GIB, 3), temporaries=round(temps / GIB, 3),
                      output=round(out / GIB, 3), aliased=round(alias / GIB, 3),
                      code=round(code / GIB, 4), total=round(total / GIB, 3)),
      fits=total <= hbm,
      step_flops_per_chip=flops,
      step_tflops_per_chip=round(flops / 1e12, 3),
      # The compute-bound floor of one step at the chip's bf16 peak (real steps are slower).
      step_s_at_peak=round(flops / peak, 4) if peak else None,
      compile_s=round(compile_s, 1),
      host_peak_rss_gib=_host_peak_rss_gib())


def _host_peak_rss_gib() -> float:
  """This process's peak resident memory so far (Linux reports KiB): what compiling needed on
  this machine; a paper-size step holds tens of GiB."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  try:
    report = compile_for_topology(_CONFIG.value, _TOPOLOGY.value, _GLOBAL_BATCH.value)
  except (LibtpuMissingError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(report))


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  app.run(main)
