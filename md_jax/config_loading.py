"""Loading ``configs/*.py`` files by path (the same files ``--config=`` takes)."""

from __future__ import annotations

import importlib.util
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


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``"configs/shapes.py:highres,smoke"`` -> the locked ConfigDict ``get_config`` returns."""
  path, _, arg = spec.partition(":")
  path = config_path(path)
  module_spec = importlib.util.spec_from_file_location(
      f"md_jax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  return config
