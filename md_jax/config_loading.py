"""Loading ``configs/*.py`` files by path (the same files ``--config=`` takes)."""

from __future__ import annotations

import importlib.util
import json
import os

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_path(name: str) -> str:
  """``configs/NAME.py`` of this checkout, or NAME itself when it is a path."""
  if os.path.exists(name):
    return name
  for base in (os.getcwd(), REPO_ROOT):
    path = os.path.join(base, "configs", name if name.endswith(".py") else f"{name}.py")
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"config file {name!r} not found under ./configs or {REPO_ROOT}/configs")


def config_module(name: str, near: str | None = None):
  """``configs/NAME.py`` loaded as a module (configs/ is a folder of files, not a package).

  With ``near`` (a config file's ``__file__``) NAME is looked up beside that file first, so one
  config builds on another of the same checkout: ``config_module("md", __file__)``.
  """
  path = None
  if near is not None:
    sibling = os.path.join(os.path.dirname(os.path.abspath(near)),
                           name if name.endswith(".py") else f"{name}.py")
    path = sibling if os.path.exists(sibling) else None
  path = path or config_path(name)
  module_spec = importlib.util.spec_from_file_location(
      f"md_jax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``"configs/shapes.py:highres,smoke"`` -> the locked ConfigDict ``get_config`` returns."""
  path, _, arg = spec.partition(":")
  module = config_module(path)
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides, flag: str = "--override"):
  """Applies ``KEY=VALUE`` strings (dotted keys, JSON values cast to the key's current type, any
  JSON value for a None key; string keys take VALUE as is) to an unlocked ``config``. An unknown
  key raises KeyError naming ``flag`` and the key; a value that does not parse as the key's type,
  ValueError naming both."""
  for item in overrides:
    key, _, value = item.partition("=")
    node = config
    parts = key.split(".")
    for p in parts:
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        raise KeyError(f"{flag}={item}: config has no key {key!r}")
      parent, node = node, node[p]
    old = node
    if isinstance(old, str):
      parent[parts[-1]] = value
      continue
    try:
      parsed = json.loads(value)
      parent[parts[-1]] = parsed if old is None else type(old)(parsed)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{flag}={item}: {value!r} is not a JSON {type(old).__name__} for "
                       f"{key!r} (e.g. lists as [1,2], booleans as true/false): {e}") from None
