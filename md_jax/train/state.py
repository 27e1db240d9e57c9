"""Functional view of NNX modules and the train state.

The train step is a pure function of plain nested dicts of arrays: that is what Orbax saves,
what ``jax.jit`` shards, and what a later stage restores by name. ``ModelSpec`` turns an NNX
constructor into (graphdef, abstract params, logical axis names) once, and rebuilds a module
from a params dict inside traced code with ``bind``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from md_jax.models import layers
from md_jax.models.layers import KeyStream


def _str_keys(tree):
  """Pure dicts from NNX use int keys for list entries; Orbax stores keys as strings."""
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def _restore_keys(tree, template):
  if isinstance(template, dict):
    by_str = {str(k): k for k in template}
    return {by_str[k]: _restore_keys(v, template[by_str[k]]) for k, v in tree.items()}
  return tree


class ModelSpec:
  """An NNX module seen as a pure function of a params dict.

  ``ctor(rngs)`` builds the module; ``rngs`` is a ``KeyStream`` (only ``rngs.params()`` is
  available), which traces in time linear in the number of parameters where ``nnx.Rngs`` is
  quadratic (seconds for the paper-size UNet).
  """

  def __init__(self, name: str, ctor: Callable[[nnx.Rngs], nnx.Module]):
    self.name = name
    self.ctor = ctor
    with nnx.use_eager_sharding(False):
      abstract = nnx.eval_shape(lambda: ctor(KeyStream(0)))
    self.graphdef, self._abstract_state = nnx.split(abstract)
    pure = nnx.to_pure_dict(self._abstract_state)
    self._template = pure
    self.abstract_params = _str_keys(pure)
    logical = {}
    for path, var in self._abstract_state.flat_state():
      meta = var.get_metadata()
      names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
      logical[tuple(str(p) for p in path)] = tuple(names) if names else None
    self.logical = layers.nest_paths(logical)

  @property
  def num_params(self) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(self.abstract_params))

  def init(self, rng: jax.Array) -> dict:
    """Fresh params (call under jit with out_shardings to create them already sharded)."""
    with nnx.use_eager_sharding(False):
      module = self.ctor(KeyStream(rng))
    return _str_keys(nnx.to_pure_dict(nnx.state(module)))

  def bind(self, params: dict) -> nnx.Module:
    state = jax.tree.map(lambda v: v, self._abstract_state)
    nnx.replace_by_pure_dict(state, _restore_keys(params, self._template))
    return nnx.merge(self.graphdef, state)


def init_compiler_options() -> dict | None:
  """XLA options for one-shot initialisation programs (random init of every parameter).

  On XLA:CPU the LLVM backend spends most of an init's compile time optimising hundreds of
  unrolled threefry/erfinv loops that run exactly once: a tiny VAE's init compiles in ~35 s at
  the default level and ~6 s at level 0, with the same (integer) random bits. Other backends
  keep their defaults.
  """
  if jax.default_backend() == "cpu":
    return {"xla_backend_optimization_level": 0}
  return None


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes, and everything a checkpoint holds.

  ``params`` and ``opt_state`` are trained; ``ema_params`` follows ``params``; ``frozen`` holds
  arrays the objective reads but never updates (a frozen text encoder, the stage-1 VAE and its
  latent statistics), kept here so a checkpoint is self-contained for sampling and export.
  The step's randomness is ``fold_in(key(config.seed), step)``, so no RNG needs saving and a
  resumed run draws exactly what the uninterrupted one would.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  frozen: Any

  def as_dict(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, d: dict) -> "TrainState":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def tree_bytes(tree) -> int:
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
