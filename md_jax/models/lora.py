"""Low-rank adapters (LoRA) on a module's kernels, as pure functions of params dicts.

For a targeted kernel W (a Dense ``(in, out)`` or a Conv2d ``(k, k, in, out)`` kernel) the
adapter holds ``a`` with W's shape but its last axis replaced by the rank r, and ``b`` of shape
``(r, out)``; the effective kernel is ``W + (alpha / r) * tensordot(a, b)``. For a convolution
this is a k x k conv to r channels followed by a 1x1 conv to ``out`` channels, folded into W.
``b`` starts at zero, so an adapted module computes exactly what its base does until ``b`` has
been trained.

Adapters live in their own tree that mirrors the module paths of the base params
(``{... "attn1": {"to_q": {"a": ..., "b": ...}}}``), so the base params can stay frozen and be
checkpointed apart from the (small) trainable factors. ``merge`` folds them into plain params
(what sampling and export read), ``unmerge`` takes them out again.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from md_jax.models import layers

# Module paths (joined with "/") matched with re.search. The defaults adapt every attention
# projection, every feed-forward layer and the dense convolutions of the conv blocks.
DEFAULT_TARGETS = (
    r"attn[12]/to_(q|k|v|out)$",
    r"/ff/proj_(in|out)$",
    r"convs/\d+/(conv1|conv2|pw_expand|pw_project)$",
)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      rank=4,
      alpha=4.0,  # the update is scaled by alpha / rank
      targets=DEFAULT_TARGETS,
      seed=0,  # draws the 'a' factors
  ))


_flatten = layers.flat_paths


def find_targets(abstract_params: dict, targets: Sequence[str], *,
                 key: str = "config.ufogen.lora.targets") -> list[tuple[str, ...]]:
  """Module paths whose ``kernel`` (rank 2 or 4) matches one of the ``targets`` patterns."""
  patterns = []
  for t in targets:
    try:
      patterns.append(re.compile(t))
    except re.error as e:
      raise ValueError(f"{key}: {t!r} is not a regular expression ({e})") from None
  found, hit = [], set()
  for path, leaf in sorted(_flatten(abstract_params).items()):
    if path[-1] != "kernel" or len(leaf.shape) not in (2, 4):
      continue
    name = "/".join(path[:-1])
    for i, p in enumerate(patterns):
      if p.search("/" + name):
        found.append(path[:-1])
        hit.add(i)
        break
  if not found:
    raise ValueError(f"{key}={tuple(targets)} matches no rank-2/4 kernel of the model; module "
                     "paths look like 'down_levels/1/transformers/0/layers/0/attn2/to_q'")
  unused = [targets[i] for i in range(len(patterns)) if i not in hit]
  if unused:  # e.g. conv-block patterns on a model whose levels are all SPConv
    logging.info("%s: %s match nothing in this model", key, unused)
  return found


class LoraSpec:
  """The adapters of one base module, seen like a ``state.ModelSpec`` by the train loop."""

  def __init__(self, name: str, base_abstract: dict, base_logical: dict, cfg):
    self.name = name
    self.rank = int(cfg.rank)
    if self.rank < 1:
      raise ValueError(f"config.ufogen.lora.rank={cfg.rank} must be >= 1")
    self.scale = float(cfg.alpha) / self.rank
    self.seed = int(cfg.seed)
    self.paths = find_targets(base_abstract, tuple(cfg.targets))
    flat_abs, flat_log = _flatten(base_abstract), _flatten(base_logical)
    abstract, logical = {}, {}
    for path in self.paths:
      kernel = flat_abs[path + ("kernel",)]
      axes = flat_log.get(path + ("kernel",)) or (None,) * len(kernel.shape)
      abstract[path + ("a",)] = jax.ShapeDtypeStruct(kernel.shape[:-1] + (self.rank,),
                                                     kernel.dtype)
      abstract[path + ("b",)] = jax.ShapeDtypeStruct((self.rank, kernel.shape[-1]), kernel.dtype)
      logical[path + ("a",)] = tuple(axes[:-1]) + (None,)
      logical[path + ("b",)] = (None, axes[-1])
    self.abstract_params = layers.nest_paths(abstract)
    self.logical = layers.nest_paths(logical)

  @property
  def num_params(self) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(self.abstract_params))

  def init(self, rng: jax.Array | None = None) -> dict:
    """``a`` ~ N(0, 1/fan_in) (fan_in: the kernel's input size), ``b`` = 0."""
    base = jax.random.key(self.seed) if rng is None else rng
    shapes = _flatten(self.abstract_params)
    flat = {}
    for i, path in enumerate(self.paths):
      a, b = shapes[path + ("a",)], shapes[path + ("b",)]
      fan_in = math.prod(a.shape[:-1])
      flat[path + ("a",)] = (jax.random.normal(jax.random.fold_in(base, i), a.shape, jnp.float32)
                             / math.sqrt(fan_in)).astype(a.dtype)
      flat[path + ("b",)] = jnp.zeros(b.shape, b.dtype)
    return layers.nest_paths(flat)

  def delta(self, factors: dict) -> dict[tuple[str, ...], jax.Array]:
    """{module path: (alpha / r) * a . b}, each the shape of that module's kernel."""
    flat = _flatten(factors)
    out = {}
    for path in self.paths:
      a = flat[path + ("a",)].astype(jnp.float32)
      b = flat[path + ("b",)].astype(jnp.float32)
      out[path] = self.scale * jnp.tensordot(a, b, axes=1)
    return out

  def merge(self, base: dict, factors: dict) -> dict:
    """Plain params: every targeted kernel plus its low-rank update."""
    return _apply(base, self.delta(factors), 1.0)

  def unmerge(self, merged: dict, factors: dict) -> dict:
    """The base params back from ``merge(base, factors)``."""
    return _apply(merged, self.delta(factors), -1.0)


def _apply(params: dict, deltas: dict, sign: float) -> dict:
  flat = _flatten(params)
  for path, d in deltas.items():
    k = flat[path + ("kernel",)]
    flat[path + ("kernel",)] = (k.astype(jnp.float32) + sign * d).astype(k.dtype)
  return _restore(params, flat)


def _restore(template, flat, prefix=()):
  """``flat`` back into ``template``'s nesting (keeps the template's key objects and order)."""
  return {k: (_restore(v, flat, prefix + (str(k),)) if isinstance(v, dict)
              else flat[prefix + (str(k),)])
          for k, v in template.items()}
