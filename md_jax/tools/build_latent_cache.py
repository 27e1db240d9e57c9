"""Precomputes the frozen VAE's posterior of every training image, once.

  python -m md_jax.tools.build_latent_cache --config=configs/shapes.py:highres --out=DIR \
      --config.vae_workdir=RUN [--config.data.num_records=N] [--dtype=float32|float16]

then train with `--config.vae.cache_dir=DIR` (and the same data.num_records, data.seed and
data.image_size): batches carry the posterior (latent_mean, latent_logvar) instead of the image,
and the train step draws its latent from it without running the encoder. The cache holds records
[0, config.data.num_records) of the training split, encoded by exactly the VAE the diffusion
trainer restores from config.vae_workdir (a VAE run, or a light-decoder run's encoder); the
trainer re-encodes a few cached records at start to confirm it.

Worth it when records are seen more than once: a run of S steps at batch B over N records
encodes S * B images without the cache, N with it.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp

from md_jax.data import latent_cache as latent_cache_lib
from md_jax.data import pipeline
from md_jax.data import shapes


def build_for_config(config, directory: str, *, split: str = "train", batch_size: int = 64,
                     dtype: str = "float32", rows_per_shard: int = 16384,
                     overwrite: bool = False, progress: bool = False) -> str:
  """Writes the latent cache a diffusion run of `config` reads (see module docstring)."""
  from md_jax.train import diffusion  # pylint: disable=g-import-not-at-top

  if config.data.get("source", ""):
    raise ValueError("config.vae.cache_dir works with the shapes data only; clear "
                     f"config.data.source={config.data.source!r}")
  ld = diffusion.LatentDiffusion(config)
  stats_abs = {k: jax.ShapeDtypeStruct((int(config.vae.latent_channels),), jnp.float32)
               for k in ("latent_shift", "latent_scale")}
  vae_params, _, what = diffusion.restore_frozen_vae(config, ld.vae.abstract_params, stats_abs)
  encode = jax.jit(lambda p, x: ld.vae.bind(p).encode(x))
  size = int(config.data.image_size)
  data_seed = int(config.data.seed)
  num_records = int(config.data.num_records)
  source = shapes.ShapesSource(split, size, num_records, data_seed)
  return latent_cache_lib.write_latent_cache(
      directory, num_records,
      images=lambda start, stop: pipeline.shapes_images(source, range(start, stop)),
      encode=lambda x: jax.device_get(encode(vae_params, x)),
      image_size=size, source=pipeline.shapes_cache_source(split, data_seed),
      encoder=dict(vae=what, latent_channels=int(config.vae.latent_channels)),
      batch_size=batch_size, rows_per_shard=rows_per_shard, dtype=dtype, overwrite=overwrite,
      progress=progress)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  out = build_for_config(f.config, f.out, split=f.split, batch_size=f.batch_size, dtype=f.dtype,
                         overwrite=f.overwrite, progress=True)
  cache = latent_cache_lib.LatentCache(out)
  print(json.dumps({k: cache.manifest[k] for k in ("num_rows", "image_size", "latent_shape",
                                                    "dtype", "build_seconds")}))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Diffusion stage config (configs/*.py[:arg]).")
  flags.DEFINE_string("out", None, "Directory to write the cache to.")
  flags.DEFINE_string("split", "train", "Dataset split.")
  flags.DEFINE_integer("batch_size", 64, "Images per encoder call.")
  flags.DEFINE_enum("dtype", "float32", list(latent_cache_lib.DTYPES), "Stored dtype.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing cache.")
  flags.mark_flags_as_required(["config", "out"])
  logging.getLogger().setLevel(logging.INFO)
  app.run(main)
