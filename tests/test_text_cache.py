"""Precomputed caption embeddings: what is cached, how the pipeline reads it, and that training on
cached embeddings is the same step as running the frozen encoder inside it."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from md_jax.data import pipeline
from md_jax.data import text_cache as tc
from md_jax.tools import build_text_cache as builder
from md_jax.train import diffusion
from md_jax.train import loop
from md_jax.train import sharding as shd

NUM_RECORDS = 24


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
  """A tiny lowres config and a cache of its first 24 training records (2 shards: 16 + 8)."""
  directory = str(tmp_path_factory.mktemp("text_cache") / "cache")
  config = tiny_config("lowres", **{"data.num_records": NUM_RECORDS, "data.caption_dropout": 0.5,
                                    "text.cache_dir": directory, "text.frozen": True})
  loop.setup_compilation_cache(config.compilation_cache_dir)
  builder.build_for_config(config, directory, batch_size=8, rows_per_shard=16)
  ld = diffusion.LatentDiffusion(config)
  params = jax.jit(ld.text.init)(jax.random.key(int(config.text.seed)))
  encode = jax.jit(lambda p, ids: ld.encode_text({"text": p}, ids))
  return config, directory, ld, lambda ids: np.asarray(encode(params, ids))


def test_cache_holds_every_caption_and_the_empty_prompt(cached):
  config, directory, ld, encode = cached
  with open(os.path.join(directory, tc.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest["num_rows"] == NUM_RECORDS and len(manifest["shards"]) == 2
  assert manifest["source"] == dict(name="shapes", split="train", data_seed=config.data.seed)
  cache = tc.TextEmbeddingCache(directory)
  length, hidden = config.data.max_length, config.text.hidden_size
  captions = builder.ShapesCaptions("train", NUM_RECORDS, config.data.seed)[:]
  ids = pipeline.tokenize(ld.tokenizer, captions, length)
  np.testing.assert_array_equal(cache.input_ids(np.arange(NUM_RECORDS)), ids)
  rows = cache.embeddings(np.arange(NUM_RECORDS))
  assert rows.shape == (NUM_RECORDS, length, hidden) and rows.dtype == np.float32
  np.testing.assert_allclose(rows, encode(ids), atol=1e-5)
  # Rows across the shard boundary, out of order and repeated.
  pick = np.array([17, 3, 16, 15, 17])
  np.testing.assert_array_equal(cache.embeddings(pick), rows[pick])
  null_ids = pipeline.tokenize(ld.tokenizer, [""], length)
  np.testing.assert_array_equal(cache.null_input_ids(), null_ids[0])
  np.testing.assert_allclose(cache.null_embedding, encode(null_ids)[0], atol=1e-5)
  with pytest.raises(tc.TextCacheError, match="record 24 is outside the 24 rows"):
    cache.embeddings([3, 24])
  with pytest.raises(FileExistsError):
    builder.build_for_config(config, directory, batch_size=8)


def test_pipeline_batches_carry_cached_embeddings(cached):
  config, directory, ld, encode = cached
  kw = dict(split="train", image_size=16, global_batch_size=8, process_index=0, process_count=1,
            seed=config.data.seed, tokenizer=ld.tokenizer, max_length=config.data.max_length,
            num_records=NUM_RECORDS, caption_dropout=0.5, num_threads=0)
  plain = pipeline.make_shapes_iterator(**kw)
  with_cache = pipeline.make_shapes_iterator(text_cache=directory, **kw)
  null_ids = pipeline.tokenize(ld.tokenizer, [""], config.data.max_length)[0]
  dropped = 0
  for _ in range(3):
    a, b = next(plain), next(with_cache)
    assert set(b) == set(a) | {"text_embedding"}
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
    # Every row, captioned or dropped to "", is what the encoder gives for its tokens.
    np.testing.assert_allclose(b["text_embedding"], encode(b["input_ids"]), atol=1e-5)
    dropped += int((b["input_ids"] == null_ids).all(axis=1).sum())
  assert 0 < dropped < 24  # both kinds of rows were checked


def test_cache_mismatches_are_named(cached):
  config, directory, ld, _ = cached
  kw = dict(split="train", image_size=16, global_batch_size=8, process_index=0, process_count=1,
            seed=config.data.seed, tokenizer=ld.tokenizer, max_length=config.data.max_length,
            num_records=NUM_RECORDS, num_threads=0, text_cache=directory)
  with pytest.raises(tc.TextCacheError, match="max_length=16, the data uses 12"):
    pipeline.make_shapes_iterator(**dict(kw, max_length=12))
  with pytest.raises(tc.TextCacheError, match="data_seed=0, the data uses 7"):
    pipeline.make_shapes_iterator(**dict(kw, seed=7))
  with pytest.raises(tc.TextCacheError, match="24 rows, the data has 40 records"):
    pipeline.make_shapes_iterator(**dict(kw, num_records=40))
  with pytest.raises(FileNotFoundError, match="build_text_cache"):
    tc.TextEmbeddingCache(os.path.dirname(directory))


@pytest.mark.slow  # ~40-60 s on 2 cores: two UNet forwards compile
def test_cached_loss_equals_encoder_in_step(cached):
  """DiffusionObjective.loss (what the train step differentiates) on a pipeline batch that
  carries cached embeddings equals the loss with the frozen encoder run inside it."""
  config, _, _, _ = cached
  obj = diffusion.DiffusionObjective(config, shd.make_mesh(config.mesh_shape, config.mesh_axes))
  local = obj.host_batch(next(obj.data_iterator(0, 1)))
  assert local["text_embedding"].shape == (8, config.data.max_length, config.text.hidden_size)
  batch = {k: jnp.asarray(v) for k, v in local.items()}
  channels = int(config.vae.latent_channels)
  frozen = dict(text=jax.jit(obj.ld.text.init)(jax.random.key(int(config.text.seed))),
                vae=jax.jit(obj.ld.vae.init)(jax.random.key(0)),
                latent_shift=jnp.full((channels,), 0.1), latent_scale=jnp.full((channels,), 1.3))
  params = jax.jit(obj.init_params)(jax.random.key(1))
  # Off the initial point: zero-initialised output projections would hide the text context.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(
      tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])

  @jax.jit
  def both(params, frozen, batch):
    rng = jax.random.key(3)
    cached = obj.loss(params, frozen, batch, rng, 0)[0]
    in_step = {k: v for k, v in batch.items() if k != "text_embedding"}
    return cached, obj.loss(params, frozen, in_step, rng, 0)[0]

  cached_loss, encoder_loss = map(float, both(params, frozen, batch))
  print(f"\nloss: cached {cached_loss:.8f}, encoder in step {encoder_loss:.8f}")
  np.testing.assert_allclose(cached_loss, encoder_loss, rtol=1e-6)
  # The cached path really skips the encoder: other text weights leave its loss unchanged, while
  # the in-step loss moves (so the context does matter to this UNet).
  other = dict(frozen, text=jax.tree.map(lambda x: x * 0.5, frozen["text"]))
  other_cached, other_encoder = map(float, both(params, other, batch))
  assert other_cached == cached_loss
  assert abs(other_encoder - encoder_loss) > 1e-4


def test_cache_from_other_encoder_is_refused(cached):
  config, directory, _, _ = cached
  other = tiny_config("lowres", **{"data.num_records": NUM_RECORDS, "text.cache_dir": directory,
                                   "text.frozen": True, "text.seed": 99})
  mesh = shd.make_mesh(other.mesh_shape, other.mesh_axes)
  obj = diffusion.DiffusionObjective(other, mesh)
  params = jax.jit(obj.ld.text.init)(jax.random.key(99))
  with pytest.raises(tc.TextCacheError, match="different text encoder"):
    obj.verify_text_cache(params)
  # The right weights pass.
  diffusion.DiffusionObjective(config, mesh).verify_text_cache(
      jax.jit(obj.ld.text.init)(jax.random.key(int(config.text.seed))))
