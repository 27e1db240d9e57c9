"""MobileDiffusion-Lite (Table 6): ``--config=configs/md_lite.py:512`` (or ``:256``).

MD with innermost width 896 and (SA x2 + CA x2) in the Up-3 transformers; every other field,
and every open choice with its reason, is MD's (configs/md.py).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def _md_module():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "md.py")
  spec = importlib.util.spec_from_file_location("md_jax_config_md", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return _md_module().network_config(arg, "md-lite")
