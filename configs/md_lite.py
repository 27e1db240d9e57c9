"""MobileDiffusion-Lite (Table 6): ``--config=configs/md_lite.py:512`` (or ``:256``).

MD with innermost width 896 and (SA x2 + CA x2) in the Up-3 transformers; every other field,
and every open choice with its reason, is MD's (configs/md.py).
"""

from __future__ import annotations

import ml_collections

from md_jax import config_loading


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return config_loading.config_module("md", __file__).network_config(arg, "md-lite")
