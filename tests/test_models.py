"""Model tests on tiny configs; the paper-size model is only built abstractly (nnx.eval_shape)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from md_jax.models import layers
from md_jax.models import text_encoder as te
from md_jax.models import unet as unet_lib
from md_jax.models import vae as vae_lib
from md_jax.models.export_safety import check_jaxpr
from md_jax.models.layers import GroupNorm, count_params


def _build(ctor, cfg, seed=0, **kw):
  """A concrete model with numpy-drawn weights.

  Eager init compiles one threefry program per distinct parameter shape (~1 s each on a busy
  2-core CPU); the init code itself still runs here, traced by eval_shape.
  """
  model = _abstract(ctor, cfg, **kw)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    # numpy, then one device_put: jnp.ones/zeros would compile a broadcast per shape.
    if name == "scale":
      value = np.ones(x.shape)
    elif name == "bias":
      value = np.zeros(x.shape)
    else:
      std = 1 / math.sqrt(math.prod(x.shape[:-1])) if name == "kernel" else 0.02
      value = std * rng.standard_normal(x.shape)
    return jnp.asarray(value.astype(x.dtype))

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


_ABSTRACT_CACHE = {}

# Tests only check values, not speed: XLA's backend optimisations double CPU compile time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jit(fn):
  return jax.jit(fn, compiler_options=_FAST_COMPILE)


def _abstract(ctor, cfg, **kw):
  """nnx.eval_shape of a model, memoised (tracing the init of every param costs seconds)."""
  key = (ctor, cfg.to_json(), tuple(sorted((k, str(v)) for k, v in kw.items())))
  if key not in _ABSTRACT_CACHE:
    with nnx.use_eager_sharding(False):
      _ABSTRACT_CACHE[key] = nnx.eval_shape(lambda: ctor(cfg, rngs=nnx.Rngs(0), **kw))
  return _ABSTRACT_CACHE[key]


def _unet_inputs(cfg, batch=2, size=8, length=5):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((batch, size, size, cfg.in_channels)).astype(np.float32)
  t = np.linspace(0.0, 999.0, batch).astype(np.float32)
  ctx = rng.standard_normal((batch, length, cfg.context_dim)).astype(np.float32)
  return x, t, ctx


def _sa_channels_sq(cfg):
  """sum over self-attention layers of channels**2 (the size of one W_V)."""
  total = 0
  for l, c in enumerate(cfg.channels):
    if cfg.self_attn[l]:
      layers = cfg.down_blocks[l] * cfg.down_depth[l] + cfg.up_blocks[l] * cfg.up_depth[l]
      total += layers * c * c
  return total


# ----------------------------------------------------------------------------- UNet


def _micro_config():
  """Two levels, still one FullConv level and one SPConv level with SA + CA transformers."""
  cfg = unet_lib.tiny_config()
  cfg.channels = (8, 16)
  cfg.down_blocks, cfg.up_blocks = (1, 1), (2, 2)
  cfg.down_conv, cfg.up_conv = ("full", "sep"), ("full", "sep")
  cfg.down_depth, cfg.up_depth = (0, 1), (0, 1)
  cfg.self_attn = (False, True)
  cfg.time_embed_dim = 16
  return cfg


@pytest.fixture(scope="module")
def default_unet():
  return _abstract(unet_lib.UNet, unet_lib.default_config())


def test_default_unet_block_counts_and_params(default_unet):
  cfg = unet_lib.default_config()
  assert unet_lib.count_blocks(cfg) == dict(conv=11, sa=15, ca=18)
  counts = unet_lib.count_modules(default_unet)
  assert counts == dict(conv=11, full_conv=6, sep_conv=5, sa=15, ca=18)
  n = count_params(default_unet)
  print(f"\nMD UNet (default config) parameters: {n:,} ({n / 1e6:.1f}M)")
  assert 300e6 < n < 450e6


def test_md_lite_counts():
  assert unet_lib.count_blocks(unet_lib.default_config("md-lite")) == dict(conv=11, sa=12, ca=15)


def test_every_param_has_logical_axes():
  model = _abstract(unet_lib.UNet, unet_lib.tiny_config())
  state = nnx.state(model, nnx.Param)
  specs = nnx.get_partition_spec(state)
  shapes = jax.tree.leaves(state)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(spec_leaves) == len(shapes)
  for spec, arr in zip(spec_leaves, shapes):
    assert len(spec) == arr.ndim
  # Only Params live in the model.
  assert len(jax.tree.leaves(nnx.state(model))) == len(shapes)


def test_eager_init():
  # Concrete init outside eval_shape (one small layer: each new shape compiles a PRNG program).
  from md_jax.models.layers import Dense
  with nnx.use_eager_sharding(False):
    layer = Dense(4, 8, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(0))
  assert layer.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
  assert float(jnp.std(layer.kernel[...])) > 0
  assert layer(jnp.ones((2, 3, 4))).shape == (2, 3, 8)


def test_shared_kv_saves_exactly_w_v():
  cfg = unet_lib.tiny_config()
  shared = count_params(_abstract(unet_lib.UNet, cfg))
  cfg.shared_kv = False
  separate = count_params(_abstract(unet_lib.UNet, cfg))
  assert separate - shared == _sa_channels_sq(cfg) > 0
  # Paper size: 15 SA layers x 1024^2 = 15.7M, ~4% of the model (paper: "approximately 5%").
  assert _sa_channels_sq(unet_lib.default_config()) == 15 * 1024 * 1024


def test_bad_skip_accounting_raises():
  cfg = unet_lib.tiny_config()
  cfg.up_blocks = (1, 2, 3)
  with pytest.raises(ValueError, match="skips"):
    unet_lib.count_blocks(cfg)


def _loss_and_grad(model, inputs):
  graphdef, params = nnx.split(model, nnx.Param)

  @_jit
  def loss_and_grad(params, x, t, ctx):
    def loss(p):
      y = nnx.merge(graphdef, p)(x, t, ctx)
      return jnp.mean(jnp.square(y)), y
    return jax.value_and_grad(loss, has_aux=True)(params)

  (loss, y), grads = loss_and_grad(params, *inputs)
  return loss, y, grads


def test_unet_forward_shape():
  cfg = unet_lib.tiny_config()
  inputs = _unet_inputs(cfg, batch=1)
  model = _build(unet_lib.UNet, cfg)
  graphdef, state = nnx.split(model)
  y = _jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *inputs)
  assert y.shape == inputs[0].shape and y.dtype == jnp.float32
  assert np.all(np.isfinite(y)) and float(jnp.std(y)) > 0


def test_unet_jit_grad_and_remat():
  cfg = _micro_config()
  inputs = _unet_inputs(cfg, batch=1)
  loss_a, y_a, grads_a = _loss_and_grad(_build(unet_lib.UNet, cfg), inputs)
  assert y_a.shape == inputs[0].shape and np.isfinite(loss_a)
  gnorm = {jax.tree_util.keystr(p): float(jnp.linalg.norm(g))
           for p, g in jax.tree_util.tree_leaves_with_path(grads_a)}
  assert all(np.isfinite(v) for v in gnorm.values())
  # Gradient reaches the first layer, the time MLP and the text projections.
  for part in ("conv_in", "time_embed_1", "to_k"):
    assert any(v > 0 for k, v in gnorm.items() if part in k), part

  cfg.remat = True
  loss_b, y_b, grads_b = _loss_and_grad(_build(unet_lib.UNet, cfg), inputs)
  np.testing.assert_allclose(y_a, y_b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  assert jax.tree.structure(grads_a) == jax.tree.structure(grads_b)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_relu_and_softmax_attention_share_param_tree():
  cfg = unet_lib.tiny_config()
  soft = nnx.state(_abstract(unet_lib.UNet, cfg), nnx.Param)
  cfg.attention = "relu"
  relu_model = _abstract(unet_lib.UNet, cfg)
  relu = nnx.state(relu_model, nnx.Param)
  assert jax.tree.structure(soft) == jax.tree.structure(relu)
  assert [x.shape for x in jax.tree.leaves(soft)] == [x.shape for x in jax.tree.leaves(relu)]


def test_relu_attention_matches_definition():
  from md_jax.models.attention import dot_product_attention
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 3, 2, 4), (1, 7, 2, 4),
                                                                  (1, 7, 2, 4)))
  def both(q, k, v):
    w = jax.nn.relu(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0) / 7.0
    return dot_product_attention(q, k, v, kind="relu"), jnp.einsum("bhqk,bkhd->bqhd", w, v)
  out, ref = _jit(both)(q, k, v)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_unet_bf16_compute_traces():
  cfg = _micro_config()
  model = _abstract(unet_lib.UNet, cfg, dtype=jnp.bfloat16)
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, *a: nnx.merge(graphdef, s)(*a), state, *_unet_inputs(cfg))
  assert out.dtype == jnp.float32 and out.shape == (2, 8, 8, cfg.out_channels)
  assert jax.tree.leaves(state)[0].dtype == jnp.float32  # params stay float32


def _pure(model, method=None):
  graphdef, state = nnx.split(model)

  def fn(state, *args):
    m = nnx.merge(graphdef, state)
    return (getattr(m, method) if method else m)(*args)

  return fn, state


def test_unet_export_safe():
  cfg = unet_lib.tiny_config()
  for attention in ("softmax", "relu"):
    cfg.attention = attention
    fn, state = _pure(_abstract(unet_lib.UNet, cfg))
    assert check_jaxpr(fn, state, *_unet_inputs(cfg, batch=1)) == []


def test_unet_export_safe_with_remat():
  cfg = _micro_config()
  cfg.remat = True
  fn, state = _pure(_abstract(unet_lib.UNet, cfg))
  assert check_jaxpr(fn, state, *_unet_inputs(cfg, batch=1)) == []


def test_checker_catches_rank5_and_gather():
  x = jnp.ones((1, 4, 4, 8))
  rank5 = lambda x: x.reshape(1, 4, 4, 2, 4).mean(axis=(1, 2, 4))
  assert any("rank 5" in p for p in check_jaxpr(rank5, x))
  take = lambda x: jnp.take(x, jnp.array([0, 2]), axis=1)
  assert any("gather" in p for p in check_jaxpr(jax.jit(take), x))
  # Nested inside jit and remat it is still found.
  nested = jax.jit(jax.checkpoint(rank5))
  assert any("rank 5" in p for p in check_jaxpr(nested, x))


def test_group_norm_matches_reference():
  with nnx.use_eager_sharding(False):
    gn = GroupNorm(8, num_groups=2, eps=1e-5, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).standard_normal((2, 3, 5, 8)).astype(np.float32) * 3 + 1
  xg = x.reshape(2, 15, 2, 4)
  ref = (xg - xg.mean(axis=(1, 3), keepdims=True)) / np.sqrt(
      xg.var(axis=(1, 3), keepdims=True) + 1e-5)
  np.testing.assert_allclose(_jit(gn)(x), ref.reshape(x.shape), rtol=1e-4, atol=1e-5)


def test_norm_statistics_stay_in_fp16_range():
  """A trained UNet's activations reach |x| ~ 1e3-1e4: the variance must not be formed from raw
  squares, which pass fp16's 65504 (the exported GPU graph runs in fp16)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 16, 4, 8)).astype(np.float32) * 3000 + 500
  x[0, 0, 0] = 2e4  # one outlier dominates the group's max
  d32 = x - x.mean(axis=(1, 3), keepdims=True)
  ref = d32 / np.sqrt(d32.var(axis=(1, 3), keepdims=True) + 1e-5)
  inv_n = 1.0 / (16 * 8)
  d16 = jnp.asarray(d32, jnp.float16)
  naive = d16 * jax.lax.rsqrt(jnp.sum(jnp.square(d16) * inv_n, axis=(1, 3), keepdims=True) + 1e-5)
  assert not np.all(np.isfinite(np.asarray(naive, np.float32))) or \
      np.abs(np.asarray(naive, np.float32) - ref).max() > 0.5  # the naive form does break
  got = layers.normalize_deviation(d16, (1, 3), inv_n, 1e-5)
  assert got.dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=2e-2, atol=2e-2)
  # Exact in float32 for any magnitude, a constant group gives 0 (not NaN), and below
  # sqrt(eps) the eps term dominates as in the textbook formula.
  for scale in (1e-4, 1.0, 1e4):
    d = (rng.standard_normal((1, 8, 2, 4)) * scale).astype(np.float32)
    d -= d.mean(axis=(1, 3), keepdims=True)
    want = d / np.sqrt(d.var(axis=(1, 3), keepdims=True) + 1e-5)
    np.testing.assert_allclose(layers.normalize_deviation(jnp.asarray(d), (1, 3), 1 / 32, 1e-5),
                               want, rtol=1e-5, atol=1e-6)
  zero = layers.normalize_deviation(jnp.zeros((1, 4, 2, 2)), (1, 3), 1 / 8, 1e-5)
  assert np.all(np.asarray(zero) == 0)


# ----------------------------------------------------------------------------- VAE


def test_vae_shapes_and_light_decoder():
  cfg = vae_lib.tiny_config()
  vae = _build(vae_lib.VAE, cfg)
  x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  graphdef, state = nnx.split(vae)
  recon, mean, logvar = _jit(lambda s, x, r: nnx.merge(graphdef, s)(x, r))(
      state, x, jax.random.key(1))
  f = vae_lib.downsample_factor(cfg)
  assert f == 8
  assert mean.shape == logvar.shape == (1, 16 // f, 16 // f, cfg.latent_channels)
  assert recon.shape == x.shape and recon.dtype == jnp.float32
  assert float(logvar.min()) >= -30 and float(logvar.max()) <= 20

  light = vae_lib.tiny_config()
  light.decoder_channels = (4, 8, 8, 8)
  light.decoder_res_blocks = 0
  full_vae, light_vae = _abstract(vae_lib.VAE, cfg), _abstract(vae_lib.VAE, light)
  assert count_params(light_vae.encoder) == count_params(full_vae.encoder)
  assert count_params(light_vae.decoder) < count_params(full_vae.decoder) / 2


def test_vae_export_safe():
  cfg = vae_lib.tiny_config()
  model = _abstract(vae_lib.VAE, cfg)
  x = jnp.zeros((1, 16, 16, 3))
  z = jnp.zeros((1, 2, 2, cfg.latent_channels))
  fn, state = _pure(model, "decode")
  assert check_jaxpr(fn, state, z) == []
  fn, state = _pure(model, "encode")
  assert check_jaxpr(fn, state, x) == []


def test_default_vae_builds():
  model = _abstract(vae_lib.VAE, vae_lib.default_config())
  n_dec = count_params(model.decoder)
  print(f"\nVAE (default) encoder {count_params(model.encoder):,} decoder {n_dec:,} params")
  assert n_dec > 0


# ----------------------------------------------------------------------------- text encoder


@pytest.fixture(scope="module")
def tiny_clip():
  cfg = te.tiny_config()
  model = _build(te.CLIPTextTransformer, cfg)
  graphdef, state = nnx.split(model)
  apply = _jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
  return cfg, model, lambda m, ids: apply(state, ids)


def test_text_encoder_shapes_and_causality(tiny_clip):
  cfg, model, fwd = tiny_clip
  ids = jnp.array([[1, 5, 9, 63, 0, 0, 0, 0], [1, 7, 8, 10, 11, 63, 0, 0]], jnp.int32)
  hidden, pooled = fwd(model, ids)
  assert hidden.shape == (2, 8, cfg.hidden_size) and pooled.shape == (2, cfg.hidden_size)
  np.testing.assert_allclose(pooled[0], hidden[0, 3], rtol=1e-6)
  np.testing.assert_allclose(pooled[1], hidden[1, 5], rtol=1e-6)
  changed = ids.at[:, 6].set(42)
  hidden2, _ = fwd(model, changed)
  np.testing.assert_allclose(hidden2[:, :6], hidden[:, :6], rtol=1e-5, atol=1e-6)
  assert not np.allclose(hidden2[:, 6:], hidden[:, 6:])


def test_text_encoder_eos_rules():
  cfg = te.tiny_config()
  model = _abstract(te.CLIPTextTransformer, cfg)
  ids = jnp.array([[3, 63, 40, 63], [3, 4, 50, 5]], jnp.int32)
  # first EOS; a row without EOS falls back to argmax.
  assert model.eos_positions(ids).tolist() == [1, 2]
  cfg.eos_token_id = 2  # legacy configs: argmax of ids
  legacy = _abstract(te.CLIPTextTransformer, cfg)
  assert legacy.eos_positions(ids).tolist() == [1, 2]


def test_text_encoder_from_hf_config_and_names():
  from transformers import CLIPTextConfig
  hf = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=12)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: te.CLIPTextTransformer.from_hf_config(hf, rngs=nnx.Rngs(0)))
  names = {".".join(str(k) for k in path)
           for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for name in ("embeddings.token_embedding.embedding",
               "embeddings.position_embedding.embedding",
               "encoder.layers.1.self_attn.q_proj.kernel", "encoder.layers.1.self_attn.k_proj.bias",
               "encoder.layers.0.self_attn.v_proj.kernel", "encoder.layers.0.self_attn.out_proj.bias",
               "encoder.layers.0.layer_norm1.scale", "encoder.layers.0.layer_norm2.bias",
               "encoder.layers.0.mlp.fc1.kernel", "encoder.layers.0.mlp.fc2.bias",
               "final_layer_norm.scale"):
    assert name in names, name
  assert model.embeddings.token_embedding.embedding.shape == (50, 16)
  assert model.encoder.layers[0].mlp.fc1.kernel.shape == (16, 32)


def test_default_text_encoder_param_count():
  n = count_params(_abstract(te.CLIPTextTransformer, te.default_config()))
  # CLIP ViT-L/14's text tower has 123,060,480 parameters.
  assert n == 123_060_480


def test_text_encoder_only_gather_is_token_lookup():
  cfg = te.tiny_config()
  fn, state = _pure(_abstract(te.CLIPTextTransformer, cfg))
  problems = check_jaxpr(fn, state, jnp.zeros((1, cfg.max_position_embeddings), jnp.int32))
  assert len(problems) == 1 and "gather" in problems[0], problems
