"""The MD UNet at the paper's size against Table 6 and arithmetic (paper sec. 3, appendix B).

Models are only built abstractly (nnx.eval_shape with layers.KeyStream: ~1 s each at 383M
params). Every expected count below is written from the block definitions by hand, never read
back from a model, so a wiring change shows up as a mismatch.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from md_jax.config_loading import load_config
from md_jax.models import unet as unet_lib
from md_jax.models.attention import Attention
from md_jax.models.blocks import FullConv, SPConv
from md_jax.models.export_safety import check_jaxpr
from md_jax.models.layers import KeyStream, count_params

TEMB = 1280  # time-embedding width of the paper configs
CTX = 768  # CLIP ViT-L/14 text width

_CACHE = {}


def md_cfg(**overrides):
  cfg = load_config("configs/md.py:512").unet.copy_and_resolve_references()
  cfg.unlock()
  cfg.update(overrides)
  return cfg


def abstract(cfg):
  key = cfg.to_json()
  if key not in _CACHE:
    with nnx.use_eager_sharding(False):
      _CACHE[key] = nnx.eval_shape(lambda: unet_lib.UNet(cfg, rngs=KeyStream(0)))
  return _CACHE[key]


def params(**overrides) -> int:
  return count_params(abstract(md_cfg(**overrides)))


# ---- parameter counts of each block, from its definition (weights + biases + norm scale/bias)


def gn(c):
  return 2 * c


def full_conv(cin, cout):
  """GN, conv3x3, time projection, GN, conv3x3, 1x1 skip when the width changes."""
  skip = cin * cout + cout if cin != cout else 0
  return (gn(cin) + 9 * cin * cout + cout + TEMB * cout + cout + gn(cout) + 9 * cout * cout
          + cout + skip)


def sp_conv(cin, cout, e=4):
  """DW3x3 (+bias), time projection at cin, GN, 1x1 to e*cout, 1x1 back, 1x1 skip."""
  skip = cin * cout + cout if cin != cout else 0
  return (9 * cin + cin + TEMB * cin + cin + gn(cin) + cin * e * cout + e * cout
          + e * cout * cout + cout + skip)


def self_attn(d, shared_kv=True):
  """q, k (= v when shared), out (+ out bias); q/k/v carry no bias."""
  return (3 if shared_kv else 4) * d * d + d


def cross_attn(d, ctx=CTX):
  return 2 * d * d + 2 * ctx * d + d


def glu_ff(d, mult=3):
  """d -> 2*mult*d (value | gate) -> d."""
  return d * 2 * mult * d + 2 * mult * d + mult * d * d + d


def layer(d, sa=True, mult=3, shared_kv=True):
  """Pre-LN [SA] + CA + FF."""
  return ((2 * d + self_attn(d, shared_kv)) if sa else 0) + 2 * d + cross_attn(d) + 2 * d \
      + glu_ff(d, mult)


def transformer(d, depth, sa=True, **kw):
  """GN, proj_in, depth layers, proj_out."""
  return gn(d) + d * d + d + depth * layer(d, sa, **kw) + d * d + d


def resample(c):
  return 9 * c * c + c


STEM = (320 * TEMB + TEMB + TEMB * TEMB + TEMB  # time MLP (sinusoid width 320)
        + 9 * 8 * 320 + 320  # conv_in
        + gn(320) + 9 * 320 * 8 + 8)  # norm_out, conv_out


def md_total(c3=1024, up3_depth=3):
  """Table 6 written out block by block (MD; MD-Lite with c3=896, up3_depth=2)."""
  return (STEM
          + full_conv(320, 320) + resample(320)  # Down-1, then downsample
          + full_conv(320, 640) + transformer(640, 1, sa=False) + resample(640)  # Down-2
          + sp_conv(640, c3) + transformer(c3, 3)  # Down-3: (SPConv + (SA+CA) x3) x2
          + sp_conv(c3, c3) + transformer(c3, 3)
          + 3 * (sp_conv(c3, c3) + transformer(c3, up3_depth))  # Up-3, no skips (unified)
          + resample(c3)  # upsample conv
          # Up-2 pops Down-2's output (640), then the downsampled Down-1 output (320).
          + full_conv(c3 + 640, 640) + transformer(640, 1, sa=False)
          + full_conv(640 + 320, 640) + transformer(640, 1, sa=False) + resample(640)
          # Up-1 pops Down-1's output, then conv_in's.
          + full_conv(640 + 320, 320) + full_conv(320 + 320, 320))


# ---- the paper's networks


def test_configs_match_library_defaults():
  for name, variant in (("md", "md"), ("md_lite", "md-lite")):
    for res, latent in ((256, 32), (512, 64)):
      c = load_config(f"configs/{name}.py:{res}")
      assert c.unet.to_dict() == unet_lib.default_config(variant).to_dict()
      assert (c.latent_size, c.context_length, c.unet.in_channels) == (latent, 77, 8)
  with pytest.raises(ValueError, match="resolution"):
    load_config("configs/md.py:384")


def test_md_param_count_is_table6_arithmetic():
  n = params()
  assert n == md_total() == 382_912_712
  assert abs(n / 386e6 - 1) < 0.02  # Table 1: 386M


def test_md_lite_param_count():
  cfg = load_config("configs/md_lite.py:512").unet
  assert count_params(abstract(cfg)) == md_total(c3=896, up3_depth=2)


def _per_level(model):
  """{'down-3': Counter(sa=.., ca=.., full=.., sep=..), ...} read off the built modules."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if not path or path[0] not in ("down_levels", "up_levels"):
      continue
    kind = None
    if isinstance(node, Attention):
      kind = "ca" if node.is_cross else "sa"
    elif isinstance(node, FullConv):
      kind = "full"
    elif isinstance(node, SPConv):
      kind = "sep"
    if kind:
      where = f"{path[0].split('_')[0]}-{int(path[1]) + 1}"
      out.setdefault(where, {}).setdefault(kind, 0)
      out[where][kind] += 1
  return out


TABLE6_MD = {
    "down-1": dict(full=1),
    "down-2": dict(full=1, ca=1),
    "down-3": dict(sep=2, sa=6, ca=6),
    "up-3": dict(sep=3, sa=9, ca=9),
    "up-2": dict(full=2, ca=2),
    "up-1": dict(full=2),
}


def test_blocks_per_level_match_table6():
  assert _per_level(abstract(md_cfg())) == TABLE6_MD
  lite = dict(TABLE6_MD, **{"up-3": dict(sep=3, sa=6, ca=6)})
  assert _per_level(abstract(load_config("configs/md_lite.py:512").unet)) == lite
  # Table 1 totals.
  assert unet_lib.count_blocks(md_cfg()) == dict(conv=11, sa=15, ca=18)


def test_heads_follow_head_dim_or_num_heads():
  def heads(cfg):
    return {(a.num_heads, a.head_dim) for _, a in nnx.iter_graph(abstract(cfg))
            if isinstance(a, Attention)}
  assert heads(md_cfg()) == {(10, 64), (16, 64)}  # 640 and 1024 channels at head_dim 64
  assert heads(md_cfg(num_heads=8)) == {(8, 80), (8, 128)}
  assert heads(md_cfg(head_dim=128)) == {(5, 128), (8, 128)}
  # Heads only split the projections: no parameter changes.
  assert params(num_heads=8) == params(head_dim=128) == params()
  with pytest.raises(ValueError, match="num_heads"):
    abstract(md_cfg(num_heads=12))


# ---- each ablation switch moves the count by what arithmetic says


BASE = 382_912_712


@pytest.mark.parametrize("overrides, delta", [
    # Shared K/V off: every one of the 15 SA layers (all at d=1024) gets its own W_V.
    (dict(shared_kv=False), 15 * 1024 * 1024),
    # Attention nonlinearity and FF gate activation have no parameters.
    (dict(attention="relu"), 0),
    (dict(ff_activation="gelu"), 0),
    # GLU expansion 3 -> 4: each FF gains d*2d + d*d weights and 2d biases; 15 FFs at 1024,
    # 3 at 640 (the CA-only transformers at 32x32).
    (dict(ff_mult=4), 15 * (3 * 1024 * 1024 + 2 * 1024) + 3 * (3 * 640 * 640 + 2 * 640)),
    # SA at 32x32 switched on: 3 layers of LN + shared-K/V SA at d=640.
    (dict(self_attn=(False, True, True)), 3 * (2 * 640 + 3 * 640 * 640 + 640)),
    # Remat and the compute dtype change nothing stored.
    (dict(remat=True), 0),
])
def test_switch_changes_params_by_arithmetic(overrides, delta):
  assert params(**overrides) - BASE == delta


def test_switch_fullconv_instead_of_spconv_at_16x16():
  delta = (full_conv(640, 1024) - sp_conv(640, 1024)) + 4 * (full_conv(1024, 1024)
                                                             - sp_conv(1024, 1024))
  # FullConv(1024->1024) = 2*1024 + 9*1024^2 + 1024 + 1280*1024 + 1024 + 2*1024 + 9*1024^2 + 1024
  assert full_conv(1024, 1024) == 18 * 1024 * 1024 + 1280 * 1024 + 7 * 1024
  assert params(down_conv=("full", "full", "full"), up_conv=("full", "full", "full")) \
      - BASE == delta


def test_switch_spconv_at_32x32_text_variant():
  # Sec. 3.3's text: separable convs everywhere but the outermost level.
  delta = ((sp_conv(320, 640) - full_conv(320, 640))
           + (sp_conv(1024 + 640, 640) - full_conv(1024 + 640, 640))
           + (sp_conv(640 + 320, 640) - full_conv(640 + 320, 640)))
  assert params(down_conv=("full", "sep", "sep"), up_conv=("full", "sep", "sep")) - BASE == delta


def test_switch_sep_expansion():
  # Each SPConv's two pointwise convs: cin*e*cout + e*cout*cout weights, e*cout biases.
  per_e = (640 * 1024 + 1024 * 1024 + 1024) + 4 * (1024 * 1024 + 1024 * 1024 + 1024)
  assert params(sep_expansion=2) - BASE == -2 * per_e


def test_switch_transformer_depth():
  one_layer = (2 * 1024 + 3 * 1024 * 1024 + 1024  # LN + SA (shared K/V)
               + 2 * 1024 + 2 * 1024 * 1024 + 2 * 768 * 1024 + 1024  # LN + CA
               + 2 * 1024 + 9 * 1024 * 1024 + 6 * 1024 + 1024)  # LN + GLU FF (3x)
  assert params(up_depth=(0, 1, 2)) - BASE == -3 * one_layer
  assert params(down_depth=(0, 1, 4)) - BASE == 2 * one_layer


def test_switch_innermost_channels():
  # Every block that touches level 3 resizes; the whole network written out must still agree.
  assert params(channels=(320, 640, 896)) == md_total(c3=896)
  assert params(channels=(320, 640, 1280)) == md_total(c3=1280)


def test_switch_inner_skips_sd_accounting():
  # SD's accounting at 16x16: Up-3 blocks read [1024 | 1024], [1024 | 1024], [1024 | 640].
  delta = (2 * (sp_conv(2048, 1024) - sp_conv(1024, 1024))
           + sp_conv(1024 + 640, 1024) - sp_conv(1024, 1024))
  assert params(inner_skips=True) - BASE == delta
  with pytest.raises(ValueError, match="inner_skips"):
    params(inner_skips=True, up_blocks=(2, 2, 2))


def test_relu_and_softmax_share_one_tree_at_paper_size():
  soft = nnx.state(abstract(md_cfg()), nnx.Param)
  relu = nnx.state(abstract(md_cfg(attention="relu")), nnx.Param)
  assert jax.tree.structure(soft) == jax.tree.structure(relu)
  assert [x.shape for x in jax.tree.leaves(soft)] == [x.shape for x in jax.tree.leaves(relu)]


# ---- export safety of the paper-size forward (DESIGN 6)


def _forward(model):
  graphdef, state = nnx.split(model)
  return (lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c)), state


def _md_inputs(cfg, size=64):
  return (jax.ShapeDtypeStruct((1, size, size, cfg.in_channels), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.float32),
          jax.ShapeDtypeStruct((1, 77, cfg.context_dim), jnp.float32))


@pytest.mark.parametrize("overrides", [dict(), dict(attention="relu", remat=True)])
def test_md_forward_has_rank_le_4_and_no_gather(overrides):
  cfg = md_cfg(**overrides)
  fn, state = _forward(abstract(cfg))
  assert check_jaxpr(fn, state, *_md_inputs(cfg)) == []


def test_rank_check_catches_a_planted_rank5_reshape(monkeypatch):
  def flax_style_group_norm(self, x):
    # What flax's GroupNorm does: (B, H, W, G, C/G), a rank-5 tensor.
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, self.num_groups, c // self.num_groups)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    return (xg - mean).reshape(x.shape) * self.scale[...] + self.bias[...]

  cfg = md_cfg(remat=True)  # planted inside remat'd blocks: nested jaxprs must be walked
  model = abstract(cfg)
  monkeypatch.setattr(SPConv, "__call__", _planted_spconv(flax_style_group_norm))
  fn, state = _forward(model)
  problems = check_jaxpr(fn, state, *_md_inputs(cfg))
  assert problems and all("rank 5" in p for p in problems), problems[:3]
  assert any("remat" in p or "checkpoint" in p for p in problems), problems[:3]


def _planted_spconv(norm_fn):
  original = SPConv.__call__

  def call(self, x, temb=None):
    return original(self, norm_fn(self.norm, x), temb)

  return call
