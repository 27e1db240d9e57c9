"""Static checks that a forward pass stays inside what TFLite's GPU delegate runs (DESIGN 6).

`check_jaxpr(fn, *args, max_rank=4, forbidden=FORBIDDEN) -> list[str]` traces `fn(*args)` and
walks its jaxpr and every sub-jaxpr (jit/pjit, custom_jvp/vjp, remat, cond/while/scan bodies). It
reports every value of rank > max_rank and every primitive in `forbidden`; an empty list means
the graph passes.

The one gather accepted is the index gather inside `jax.image.resize`'s own jit (named
`_resize`): the TFLite converter turns that into a single RESIZE_NEAREST_NEIGHBOR (checked), and
upsampling any other way costs extra copies on the delegate. A jax that renames that function
makes the check fail loudly rather than pass silently.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax

# gather/scatter have no GPU-delegate kernel at our ranks; composite breaks TF 2.21's converter.
FORBIDDEN = ("gather", "scatter", "scatter-add", "scatter_add", "composite")

_RESIZE_FN_NAMES = ("_resize",)
_CALL_PRIMITIVES = ("pjit", "jit", "closed_call", "core_call")


def _sub_jaxprs(params: dict) -> Iterator:
  for value in params.values():
    yield from _as_jaxprs(value)


def _as_jaxprs(value) -> Iterator:
  if hasattr(value, "eqns"):  # core.Jaxpr
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value, "consts"):  # core.ClosedJaxpr
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _as_jaxprs(item)


def _rank(var) -> int:
  shape = getattr(getattr(var, "aval", None), "shape", None)
  return len(shape) if shape is not None else 0


def _describe(var) -> str:
  aval = var.aval
  return f"{getattr(aval, 'dtype', '?')}{list(aval.shape)}"


def check_jaxpr(fn: Callable, *args, max_rank: int = 4,
                forbidden: tuple[str, ...] = FORBIDDEN) -> list[str]:
  closed = jax.make_jaxpr(fn)(*args)
  problems: list[str] = []

  def check_vars(vars_, where: str):
    for var in vars_:
      if _rank(var) > max_rank:
        problems.append(f"{where}: rank {_rank(var)} value {_describe(var)}")

  def visit(jaxpr, path: str, in_resize: bool):
    check_vars(list(jaxpr.invars) + list(jaxpr.constvars), f"{path} inputs")
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      where = f"{path}/{name}" if path else name
      check_vars(eqn.outvars, where)
      if name in forbidden and not (in_resize and name == "gather"):
        problems.append(f"{where}: forbidden primitive {name!r} -> "
                        + ", ".join(_describe(v) for v in eqn.outvars))
      callee = eqn.params.get("name") if name in _CALL_PRIMITIVES else None
      sub_path = f"{where}[{callee}]" if callee else where
      for sub in _sub_jaxprs(eqn.params):
        visit(sub, sub_path, in_resize or callee in _RESIZE_FN_NAMES)

  visit(closed.jaxpr, "", False)
  return problems
