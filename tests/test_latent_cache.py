"""Precomputed VAE posteriors: what is cached, how the pipeline reads it, that training on cached
posteriors is the same step as running the frozen encoder inside it, and that a cache from
another VAE or other data is refused before any training."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from md_jax.data import latent_cache as lc
from md_jax.data import pipeline
from md_jax.data import shapes
from md_jax.tools import build_latent_cache as builder
from md_jax.train import diffusion
from md_jax.train import loop
from md_jax.train import sharding as shd

NUM_RECORDS = 24


def _frozen_vae(config):
  """The VAE params and latent statistics the diffusion trainer restores for `config`."""
  ld = diffusion.LatentDiffusion(config)
  stats_abs = {k: jax.ShapeDtypeStruct((int(config.vae.latent_channels),), jnp.float32)
               for k in ("latent_shift", "latent_scale")}
  vae_params, stats, _ = diffusion.restore_frozen_vae(config, ld.vae.abstract_params, stats_abs)
  return ld, vae_params, stats


@pytest.fixture(scope="module")
def cached(vae_workdir, tmp_path_factory):
  """A tiny lowres config reading latents through the tiny VAE run, and a cache of its first 24
  training records (2 shards: 16 + 8)."""
  directory = str(tmp_path_factory.mktemp("latent_cache") / "cache")
  config = tiny_config("lowres", vae_workdir=vae_workdir,
                       **{"data.num_records": NUM_RECORDS, "data.caption_dropout": 0.5,
                          "vae.cache_dir": directory})
  loop.setup_compilation_cache(config.compilation_cache_dir)
  builder.build_for_config(config, directory, batch_size=8, rows_per_shard=16)
  ld, vae_params, stats = _frozen_vae(config)
  encode = jax.jit(lambda p, x: ld.vae.bind(p).encode(x))
  return config, directory, ld, vae_params, stats, lambda x: jax.device_get(encode(vae_params, x))


def _images(config, indices, size=None):
  source = shapes.ShapesSource("train", size or int(config.data.image_size), NUM_RECORDS,
                               int(config.data.seed))
  return pipeline.shapes_images(source, indices)


def test_cache_holds_the_encoder_posterior_of_every_record(cached):
  config, directory, ld, _, _, encode = cached
  with open(os.path.join(directory, lc.MANIFEST)) as f:
    manifest = json.load(f)
  size = int(config.data.image_size)
  assert manifest["num_rows"] == NUM_RECORDS and len(manifest["shards"]) == 2
  assert manifest["image_size"] == size
  assert tuple(manifest["latent_shape"]) == ld.latent_shape(size)
  assert manifest["source"] == dict(name="shapes", split="train", data_seed=config.data.seed)
  assert config.vae_workdir in manifest["encoder"]["vae"]
  cache = lc.LatentCache(directory)
  mean, logvar = cache.moments(np.arange(NUM_RECORDS))
  assert mean.shape == logvar.shape == (NUM_RECORDS, *ld.latent_shape(size))
  want_mean, want_logvar = encode(_images(config, np.arange(NUM_RECORDS)))
  np.testing.assert_allclose(mean, want_mean, atol=1e-5)
  np.testing.assert_allclose(logvar, want_logvar, atol=1e-5)
  assert not np.allclose(mean[0], mean[1])  # records differ
  # Rows across the shard boundary, out of order and repeated.
  pick = np.array([17, 3, 16, 15, 17])
  got_mean, got_logvar = cache.moments(pick)
  np.testing.assert_array_equal(got_mean, mean[pick])
  np.testing.assert_array_equal(got_logvar, logvar[pick])
  with pytest.raises(lc.LatentCacheError, match="record 24 is outside the 24 rows"):
    cache.moments([3, 24])
  with pytest.raises(FileExistsError):
    builder.build_for_config(config, directory, batch_size=8)
  assert not [n for n in os.listdir(os.path.dirname(directory)) if "partial" in n]


def test_pipeline_batches_carry_posteriors_instead_of_images(cached):
  config, directory, ld, _, _, _ = cached
  kw = dict(split="train", image_size=int(config.data.image_size), global_batch_size=8,
            process_index=0, process_count=1, seed=config.data.seed, tokenizer=ld.tokenizer,
            max_length=config.data.max_length, num_records=NUM_RECORDS, caption_dropout=0.5,
            num_threads=0)
  plain = pipeline.make_shapes_iterator(**kw)
  with_cache = pipeline.make_shapes_iterator(latent_cache=directory, **kw)
  cache = lc.LatentCache(directory)
  rows = np.arange(NUM_RECORDS)
  all_mean = cache.moments(rows)[0]
  for _ in range(4):  # more than one epoch of 24 records
    a, b = next(plain), next(with_cache)
    assert set(b) == (set(a) - {"image"}) | {"latent_mean", "latent_logvar"}
    for k in set(a) - {"image"}:
      np.testing.assert_array_equal(a[k], b[k])
    # Each row's posterior is the cached row of the record whose image the plain batch holds.
    whole = _images(config, rows)
    idx = [int(np.argmin(np.abs(whole - im).reshape(NUM_RECORDS, -1).sum(1))) for im in a["image"]]
    np.testing.assert_array_equal(b["latent_mean"], all_mean[idx])


def test_cache_mismatches_are_named(cached):
  config, directory, ld, _, _, _ = cached
  kw = dict(split="train", image_size=int(config.data.image_size), global_batch_size=8,
            process_index=0, process_count=1, seed=config.data.seed, tokenizer=ld.tokenizer,
            max_length=config.data.max_length, num_records=NUM_RECORDS, num_threads=0,
            latent_cache=directory)
  with pytest.raises(lc.LatentCacheError, match="image_size=32, the data uses 64"):
    pipeline.make_shapes_iterator(**dict(kw, image_size=64))
  with pytest.raises(lc.LatentCacheError, match="data_seed=0, the data uses 7"):
    pipeline.make_shapes_iterator(**dict(kw, seed=7))
  with pytest.raises(lc.LatentCacheError, match="24 rows, the data has 40 records"):
    pipeline.make_shapes_iterator(**dict(kw, num_records=40))
  with pytest.raises(FileNotFoundError, match="build_latent_cache"):
    lc.LatentCache(os.path.dirname(directory))
  # Real records have no cache yet: the trainer's iterator says which key to clear.
  from md_jax.train import vae as vae_obj  # pylint: disable=g-import-not-at-top
  other = tiny_config("lowres", **{"vae.cache_dir": directory, "data.source": "/nonexistent"})
  with pytest.raises(ValueError, match="config.vae.cache_dir works with the shapes data only"):
    vae_obj.make_data_iterator(other, 0, 1, latent_cache=directory)


@pytest.mark.slow  # ~30-50 s on 2 cores: two UNet forwards compile
def test_cached_loss_equals_encoder_in_step(cached):
  """DiffusionObjective.loss (what the train step differentiates) on a pipeline batch of cached
  posteriors equals the loss with the frozen encoder run on the images inside it: the same
  posterior, the same latent drawn from it with the same key."""
  config, _, _, vae_params, stats, _ = cached
  obj = diffusion.DiffusionObjective(config, shd.make_mesh(config.mesh_shape, config.mesh_axes))
  element = next(obj.data_iterator(0, 1))
  local = obj.host_batch(element)
  assert "image" not in local and local["latent_mean"].shape[0] == 8
  # The same records' images, as the encoder-in-step path would get them.
  plain = tiny_config("lowres", vae_workdir=config.vae_workdir,
                      **{"data.num_records": NUM_RECORDS, "data.caption_dropout": 0.5})
  plain_local = diffusion.DiffusionObjective(plain, obj.mesh).host_batch(
      next(diffusion.DiffusionObjective(plain, obj.mesh).data_iterator(0, 1)))
  np.testing.assert_array_equal(plain_local["input_ids"], local["input_ids"])
  frozen = dict(text=jax.jit(obj.ld.text.init)(jax.random.key(int(config.text.seed))),
                vae=vae_params, **stats)
  params = jax.jit(obj.init_params)(jax.random.key(1))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(
      tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])

  @jax.jit
  def both(params, frozen, cached_batch, image_batch):
    rng = jax.random.key(3)
    return (obj.loss(params, frozen, cached_batch, rng, 0)[0],
            obj.loss(params, frozen, image_batch, rng, 0)[0])

  cached_batch = {k: jnp.asarray(v) for k, v in local.items()}
  image_batch = {k: jnp.asarray(v) for k, v in plain_local.items()}
  cached_loss, encoder_loss = map(float, both(params, frozen, cached_batch, image_batch))
  print(f"\nloss: cached {cached_loss:.8f}, encoder in step {encoder_loss:.8f}")
  np.testing.assert_allclose(cached_loss, encoder_loss, rtol=1e-5)
  # The cached path really skips the encoder: other encoder weights leave its loss unchanged,
  # while the in-step loss moves.
  vae = dict(frozen["vae"])
  vae["encoder"] = jax.tree.map(lambda x: x * 0.5, vae["encoder"])
  other_cached, other_encoder = map(float, both(params, dict(frozen, vae=vae), cached_batch,
                                                image_batch))
  assert other_cached == cached_loss
  assert abs(other_encoder - encoder_loss) > 1e-4


def test_cache_from_other_vae_is_refused(cached):
  config, _, _, vae_params, _, _ = cached
  mesh = shd.make_mesh(config.mesh_shape, config.mesh_axes)
  obj = diffusion.DiffusionObjective(config, mesh)
  obj.verify_latent_cache(vae_params)  # the VAE it was built with passes
  other = jax.tree.map(lambda x: x * 1.1, vae_params)
  with pytest.raises(lc.LatentCacheError, match="different VAE or other images"):
    obj.verify_latent_cache(other)


@pytest.mark.slow  # ~40 s on 2 cores: one train step compiles
def test_training_reads_the_cache_and_checks_it_first(cached, tmp_path):
  """A run with config.vae.cache_dir trains (the step consumes latent_mean / latent_logvar) and
  one whose cache belongs to another VAE run stops before its first step, naming the cache."""
  config, directory, _, _, _, _ = cached
  with config.unlocked():
    config.num_train_steps = 2
    config.eval_at_end = False
  result = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["step"] == 2 and np.isfinite(result["metrics"]["loss"])
  spec = diffusion.DiffusionObjective(config, shd.make_mesh(config.mesh_shape,
                                                            config.mesh_axes)).batch_spec(8)
  assert "image" not in spec and spec["latent_mean"].shape == (8, 4, 4, 8)
  # A cache of other images (another data seed's records, relabelled) is caught by re-encoding.
  stale = str(tmp_path / "stale")
  other = tiny_config("lowres", vae_workdir=config.vae_workdir,
                      **{"data.num_records": NUM_RECORDS, "data.seed": 5})
  builder.build_for_config(other, stale, batch_size=8)
  with open(os.path.join(stale, lc.MANIFEST)) as f:
    manifest = json.load(f)
  manifest["source"]["data_seed"] = int(config.data.seed)
  with open(os.path.join(stale, lc.MANIFEST), "w") as f:
    json.dump(manifest, f)
  with config.unlocked():
    config.vae.cache_dir = stale
  with pytest.raises(lc.LatentCacheError, match="re-encoding cached records differs"):
    loop.train_and_evaluate(config, str(tmp_path / "stale_run"))
