"""Precomputed VAE posteriors of a dataset's images, read back by the input pipeline.

During diffusion training the stage-1 VAE encoder is frozen, so the posterior (mean and
log-variance of the latent) of record i never changes. Encoding each record once and reading the
moments back takes the encoder out of every train step; the step still draws a fresh latent from
the posterior, exactly as it would from the encoder's output. At the quickstart's 128 px the
encoder is 18.3 GFLOP of a batch of 32, as much as a narrow UNet's whole forward and backward.

On disk (a directory):

  manifest.json                   format, row count, image size, latent shape, dtype, the
                                  dataset identity (`source`) and the encoder it was built with
  moments-00000-of-000NN.npy ...  (rows, h, w, 2c) per shard: mean then log-variance along the
                                  channel axis; row i = record i

Shards are plain .npy files read through memory maps, so a reader costs no RAM up front and a
batch reads only its own rows. The cache is written to a temporary sibling directory and renamed
into place at the end, so a crashed build never leaves a cache that looks complete.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

import numpy as np

from md_jax.data import npy_shards

FORMAT = "md_jax.vae_latents/1"
MANIFEST = npy_shards.MANIFEST
DTYPES = ("float32", "float16")


class LatentCacheError(ValueError):
  """A cache that does not fit the data or the VAE it is used with."""


def write_latent_cache(directory: str, num_rows: int, *,
                       images: Callable[[int, int], np.ndarray],
                       encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                       image_size: int, source: Mapping[str, Any],
                       encoder: Mapping[str, Any] | None = None, batch_size: int = 64,
                       rows_per_shard: int = 16384, dtype: str = "float32",
                       overwrite: bool = False, progress: bool = False) -> str:
  """Encodes records [0, num_rows) once and writes the cache to `directory`.

  images(start, stop) -> float32 (stop - start, image_size, image_size, 3) in [-1, 1], the
  records' images as the pipeline would feed them; encode(images) -> (mean, logvar), each
  (batch_size, h, w, c); it is always called with exactly batch_size rows (the last batch padded)
  so a jitted encoder compiles once. source / encoder: JSON-able descriptions stored in the
  manifest and checked by readers (dataset identity, VAE checkpoint).
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  if num_rows < 1:
    raise ValueError(f"num_rows must be positive, got {num_rows}")
  if os.path.exists(os.path.join(directory, MANIFEST)) and not overwrite:
    raise FileExistsError(f"{directory} already holds a latent cache (pass overwrite=True)")
  rows_per_shard = max(batch_size, (rows_per_shard // batch_size) * batch_size)
  tmp = npy_shards.partial_dir(directory)

  def run(start: int, stop: int) -> np.ndarray:
    x = np.asarray(images(start, stop), np.float32)
    if x.shape != (stop - start, image_size, image_size, 3):
      raise ValueError(f"images({start}, {stop}) gave shape {x.shape}, expected "
                       f"{(stop - start, image_size, image_size, 3)}")
    n = len(x)
    if n < batch_size:
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
    mean, logvar = encode(x)
    return np.concatenate([np.asarray(mean, np.float32), np.asarray(logvar, np.float32)],
                          axis=-1)[:n]

  num_shards = -(-num_rows // rows_per_shard)
  names = [f"moments-{s:05d}-of-{num_shards:05d}.npy" for s in range(num_shards)]
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=num_rows, desc="latent cache", unit="image")
  t0 = time.time()
  latent_shape = None
  for s, name in enumerate(names):
    lo, hi = s * rows_per_shard, min((s + 1) * rows_per_shard, num_rows)
    out = None
    for start in range(lo, hi, batch_size):
      stop = min(start + batch_size, hi)
      moments = run(start, stop)
      if out is None:
        latent_shape = tuple(int(d) for d in moments.shape[1:])
        out = np.lib.format.open_memmap(os.path.join(tmp, name), mode="w+", dtype=dtype,
                                        shape=(hi - lo, *latent_shape))
      out[start - lo:stop - lo] = moments.astype(dtype)
      if bar is not None:
        bar.update(stop - start)
    out.flush()
    del out
  if bar is not None:
    bar.close()
  h, w, c2 = latent_shape
  manifest = dict(format=FORMAT, num_rows=int(num_rows), image_size=int(image_size),
                  latent_shape=[h, w, c2 // 2], dtype=dtype, rows_per_shard=rows_per_shard,
                  shards=names, source=dict(source), encoder=dict(encoder or {}),
                  build_seconds=round(time.time() - t0, 2))
  npy_shards.publish(tmp, directory, manifest)
  return directory


class LatentCache(npy_shards.ShardedRows):
  """Reads a cache written by `write_latent_cache`; picklable (memory maps reopen lazily)."""

  def __init__(self, directory: str):
    self.directory = directory
    m = npy_shards.read_manifest(directory, fmt=FORMAT, what="latent cache",
                                 tool="md_jax.tools.build_latent_cache", error=LatentCacheError)
    self.manifest = m
    self.num_rows = int(m["num_rows"])
    self.image_size = int(m["image_size"])
    self.latent_shape = tuple(int(d) for d in m["latent_shape"])
    self.rows_per_shard = int(m["rows_per_shard"])

  @property
  def source(self) -> dict:
    return self.manifest["source"]

  @property
  def encoder(self) -> dict:
    return self.manifest["encoder"]

  def __len__(self) -> int:
    return self.num_rows

  def moments(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """float32 (mean, logvar), each (n, h, w, c), for record indices (any order, repeats)."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
      bad = int(idx[(idx < 0) | (idx >= self.num_rows)][0])
      raise LatentCacheError(f"record {bad} is outside the {self.num_rows} rows of the latent "
                             f"cache {self.directory} (rebuild it for more records)")
    h, w, c = self.latent_shape
    out = self._gather(idx, (h, w, 2 * c))
    return out[..., :c], out[..., c:]

  def check(self, *, image_size: int | None = None, latent_shape=None,
            num_records: int | None = None, **source) -> None:
    """Raises LatentCacheError naming the first field that differs from what the caller uses."""
    where = os.path.join(self.directory, MANIFEST)
    if image_size is not None and int(image_size) != self.image_size:
      raise LatentCacheError(f"{where}: image_size={self.image_size}, the data uses {image_size}")
    if latent_shape is not None and tuple(int(d) for d in latent_shape) != self.latent_shape:
      raise LatentCacheError(f"{where}: latent_shape={list(self.latent_shape)}, the model needs "
                             f"{list(latent_shape)}")
    if num_records is not None and int(num_records) > self.num_rows:
      raise LatentCacheError(f"{where}: {self.num_rows} rows, the data has {num_records} records "
                             "(lower config.data.num_records or rebuild the cache)")
    for key, want in source.items():
      got = self.source.get(key)
      if got != want:
        raise LatentCacheError(f"{where}: source {key}={got!r}, the data uses {want!r}")

  def verify_encoder(self, images: Callable[[np.ndarray], np.ndarray],
                     encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], *,
                     num_probe: int = 4, tolerance: float | None = None) -> float:
    """Re-encodes a few cached records; raises if they differ from the cache.

    images(indices) -> float32 images of those records; encode(images) -> (mean, logvar).
    Catches a cache built with another VAE checkpoint or from other images, which the manifest
    alone cannot. Returns the largest relative difference seen.
    """
    probe = np.unique(np.linspace(0, self.num_rows - 1, num_probe).astype(np.int64))
    mean, logvar = encode(np.asarray(images(probe), np.float32))
    got = np.concatenate([np.asarray(mean, np.float32), np.asarray(logvar, np.float32)], -1)
    want = np.concatenate(self.moments(probe), -1)
    scale = 1.0 + float(np.max(np.abs(want)))
    if tolerance is None:
      tolerance = 1e-3 if self.manifest["dtype"] == "float32" else 5e-3
    err = float(np.max(np.abs(got[:len(probe)] - want))) / scale
    if not err <= tolerance:
      raise LatentCacheError(
          f"latent cache {self.directory} was built with a different VAE or other images: "
          f"re-encoding cached records differs by {err:.3g} (relative, > {tolerance}); "
          "rebuild the cache")
    return err
