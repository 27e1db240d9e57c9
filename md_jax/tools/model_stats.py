"""Parameters and forward FLOPs of a config's UNet.

``python -m md_jax.tools.model_stats --config=configs/md.py:512`` prints parameters per level
and part (conv blocks, SA, CA, feed-forward, the rest of the transformers, resamplers), the
conv/SA/CA counts, and ends with one JSON line
``{"params": N, "flops": F, "flops_ratio_sd15": F / 677.2e9, ...}``.

F is XLA's cost analysis of one jitted forward (batch 1, the config's latent size, 77 x 768 text
context for the paper's configs), which counts 2 flops per multiply-add. 677.2e9 is SD1.5's UNet
forward at 64x64x4 with 77 x 768 text, counted the same way (DESIGN 2). The model is only built
abstractly (nnx.eval_shape), so no weights are allocated; the compile for the flop count takes most of its ~15 s.
"""

from __future__ import annotations

import collections
import json
import math
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size of the measured forward.")
_FLOPS = flags.DEFINE_bool("flops", True, "Compile the forward and report XLA's flop count.")
flags.mark_flags_as_required(["config"])

SD15_FLOPS = 677.2e9  # SD1.5 UNet forward, batch 1, 64x64x4 latent, 77x768 text (DESIGN 2)


def input_shapes(config) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(latent NHWC without batch, context (length, width)) of a stage config."""
  from md_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  size = config.get("latent_size")
  if not size:
    size = int(config.data.image_size) // vae_lib.downsample_factor(config.vae)
  length = config.get("context_length") or config.data.max_length
  return (size, size, int(config.unet.in_channels)), (int(length), int(config.unet.context_dim))


def abstract_unet(unet_cfg, dtype=None):
  """The UNet built by nnx.eval_shape: shapes and sharding names, no weights."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from md_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  from md_jax.models.layers import KeyStream  # pylint: disable=g-import-not-at-top
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: unet_lib.UNet(unet_cfg, rngs=KeyStream(0),
                                                dtype=dtype or jnp.float32))


def _part(path: tuple[str, ...]) -> tuple[str, str]:
  """(where, what) of one parameter path, e.g. ('up-3', 'SA')."""
  head = path[0]
  if head in ("down_levels", "up_levels"):
    where = f"{head.split('_')[0]}-{int(path[1]) + 1}"
    if "transformers" in path:
      what = ("SA" if "attn1" in path else "CA" if "attn2" in path else
              "FF" if "ff" in path else "tr-other")
    elif "convs" in path:
      what = "conv"
    else:
      what = "resample"
    return where, what
  if head.startswith("time_embed"):
    return "stem", "time-embedding"
  return "stem", head  # conv_in, norm_out, conv_out


def param_breakdown(model) -> dict[tuple[str, str], int]:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  parts: dict[tuple[str, str], int] = collections.Counter()
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    parts[_part(tuple(str(k) for k in path))] += math.prod(value.shape)
  return dict(parts)


def forward_flops(model, latent_shape, context_shape, batch: int = 1) -> float:
  """XLA's flop count of the compiled, jitted forward (2 per multiply-add)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)

  def forward(state, x, t, context):
    return nnx.merge(graphdef, state)(x, t, context)

  args = (jax.ShapeDtypeStruct((batch, *latent_shape), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.float32),
          jax.ShapeDtypeStruct((batch, *context_shape), jnp.float32))
  compiled = jax.jit(forward).lower(state, *args).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per device
    analysis = analysis[0]
  return float(analysis["flops"])


def stats(config, *, batch: int = 1, flops: bool = True) -> dict:
  from md_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  model = abstract_unet(config.unet)
  parts = param_breakdown(model)
  latent, context = input_shapes(config)
  out = dict(params=int(sum(parts.values())),
             flops=forward_flops(model, latent, context, batch) if flops else None,
             batch=batch, latent=list(latent), context=list(context),
             **unet_lib.count_blocks(config.unet), parts=parts)
  out["flops_ratio_sd15"] = (out["flops"] / (batch * SD15_FLOPS)) if flops else None
  return out


def _level_order(where: str) -> tuple:
  if where == "stem":
    return (0, 0)
  stack, level = where.split("-")
  return (1, int(level)) if stack == "down" else (2, -int(level))


def format_table(parts: dict[tuple[str, str], int]) -> str:
  whats = ["conv", "SA", "CA", "FF", "tr-other", "resample"]
  rows = sorted({w for w, _ in parts}, key=_level_order)
  total = sum(parts.values())
  lines = [f"{'part':<8}" + "".join(f"{w:>12}" for w in whats) + f"{'total':>14}{'share':>8}"]
  for where in rows:
    if where == "stem":
      continue
    vals = [parts.get((where, w), 0) for w in whats]
    lines.append(f"{where:<8}" + "".join(f"{v:>12,}" for v in vals)
                 + f"{sum(vals):>14,}{100 * sum(vals) / total:>7.1f}%")
  stem = {w: n for (where, w), n in parts.items() if where == "stem"}
  lines.append("stem    " + ", ".join(f"{w} {n:,}" for w, n in sorted(stem.items()))
               + f"  ({sum(stem.values()):,})")
  by_what = collections.Counter()
  for (_, w), n in parts.items():
    by_what[w] += n
  lines.append("by kind " + ", ".join(f"{w} {n / 1e6:.2f}M" for w, n in by_what.most_common()))
  lines.append(f"total   {total:,} ({total / 1e6:.1f}M)")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  result = stats(config, batch=_BATCH.value, flops=_FLOPS.value)
  print(format_table(result["parts"]))
  print(f"conv blocks {result['conv']}, SA {result['sa']}, CA {result['ca']}; forward at "
        f"latent {result['latent']}, context {result['context']}, batch {result['batch']}")
  if result["flops"] is not None:
    print(f"forward {result['flops'] / 1e9:.4g} GFLOP (XLA cost analysis, 2 per multiply-add), "
          f"{result['flops_ratio_sd15']:.3g} x SD1.5's {SD15_FLOPS / 1e9:.1f} GFLOP")
  summary = {k: v for k, v in result.items() if k != "parts"}
  summary["config"] = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
                           None)
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
