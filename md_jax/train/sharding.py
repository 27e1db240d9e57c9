"""Device mesh and the map from logical axis names to mesh axes.

Parameters carry logical axis names (``nnx.Param(..., out_sharding=("embed", "mlp"))``); which
mesh axis a logical name lands on is decided only here, from ``config.sharding_rules``, so the
same model code runs on one CPU, fake CPU devices, GPUs and TPU pods.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Batch rows are split over every axis that is not a model-parallel axis.
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_shape: Sequence[int], mesh_axes: Sequence[str], devices=None) -> Mesh:
  """Builds a mesh over all (global) devices; one entry of ``mesh_shape`` may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_shape)
  if len(shape) != len(mesh_axes):
    raise ValueError(
        f"config.mesh_shape {tuple(mesh_shape)} and config.mesh_axes {tuple(mesh_axes)} "
        "must have the same length")
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh_shape {tuple(mesh_shape)} may hold at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(
          f"config.mesh_shape {tuple(mesh_shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
        f"config.mesh_shape {tuple(mesh_shape)} needs {math.prod(shape)} devices, "
        f"but {len(devices)} are available")
  # create_device_mesh orders devices so that inner mesh axes use the fastest links.
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except
    arr = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(arr, tuple(mesh_axes))


def rules_dict(rules: Sequence[Sequence[Any]]) -> dict[str, tuple[str, ...]]:
  out = {}
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"config.sharding_rules entry {rule!r} must be (logical_name, mesh_axes)")
    name, axes = rule
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    out[name] = tuple(axes)
  return out


_warned: set[tuple[str, int]] = set()


def logical_to_pspec(logical: Sequence[str | None] | None, shape: Sequence[int],
                     rules: Mapping[str, tuple[str, ...]], mesh: Mesh) -> P:
  """PartitionSpec for one array.

  A mesh axis is used for a dimension only if it divides it and has not been used by an earlier
  dimension of the same array; otherwise that dimension stays replicated along it. This keeps
  tiny test models valid on any mesh while the paper-size kernels split as the rules ask.
  """
  if not logical:
    return P()
  if len(logical) != len(shape):
    raise ValueError(f"logical axes {logical} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape):
    axes = rules.get(name, ()) if name is not None else ()
    chosen = []
    for ax in axes:
      if ax in used or ax not in mesh.shape:
        continue
      size = mesh.shape[ax] * math.prod(mesh.shape[a] for a in chosen)
      if dim % size:
        if mesh.shape[ax] > 1 and (name, dim) not in _warned:
          _warned.add((name, dim))
          logging.info("dim %d of logical axis %r is not divisible by mesh axis %r: replicated",
                       dim, name, ax)
        continue
      chosen.append(ax)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return P(*spec)


def tree_shardings(abstract_tree, logical_tree, rules, mesh: Mesh):
  """NamedShardings for a tree of ShapeDtypeStructs given a matching tree of logical names."""
  rules = rules if isinstance(rules, dict) else rules_dict(rules)

  def one(x, logical):
    return NamedSharding(mesh, logical_to_pspec(logical, x.shape, rules, mesh))

  return jax.tree.map(one, abstract_tree, logical_tree,
                      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def global_batch_from_local(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles a global batch from this process's rows (the same call on every process)."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
  return out


def maybe_initialize_distributed(mode: str) -> None:
  """jax.distributed.initialize() when ``mode`` is 'on', or 'auto' and a cluster is detected
  (TPU VM pods, SLURM, or JAX_COORDINATOR_ADDRESS set); 'off' never."""
  if mode == "off":
    return
  env = os.environ
  coordinator = env.get("JAX_COORDINATOR_ADDRESS")
  if coordinator:
    if env.get("JAX_PLATFORMS", "") == "cpu" or env.get("MD_JAX_CPU_COLLECTIVES"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=int(env["JAX_NUM_PROCESSES"]),
        process_id=int(env["JAX_PROCESS_ID"]))
    return
  if mode == "on" or on_tpu_vm() or env.get("SLURM_JOB_ID"):
    # No addresses needed: on a TPU VM jax asks the VM's metadata for the slice's workers.
    jax.distributed.initialize()


def on_tpu_vm() -> bool:
  """A Cloud TPU VM worker (its environment or its accelerator device files)."""
  env = os.environ
  if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_WORKER_ID") or env.get("TPU_ACCELERATOR_TYPE"):
    return True
  return os.path.exists("/dev/accel0")
