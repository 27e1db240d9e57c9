"""Precomputed text-encoder embeddings of a dataset's captions, read back by the input pipeline.

The text encoder is frozen, so the embedding of record i's caption never changes during training;
computing it once and reading it back takes the encoder out of every train step (for CLIP
ViT-L/14 that is a 123M-parameter forward per caption per step).

On disk (a directory, e.g. next to the data):

  manifest.json                      format, row count, max_length, hidden size, dtype, the
                                     dataset identity (`source`) and encoder config it was built for
  embeddings-00000-of-000NN.npy ...  (rows, max_length, hidden) per shard; row i = record i
  input_ids.npy                      (num_rows, max_length) int32, the tokens each row encodes
  null.npy                           (max_length, hidden): the empty prompt "" (classifier-free
                                     guidance's unconditional branch, and dropped captions)

Shards are plain .npy files read through memory maps, so a reader costs no RAM up front and a
batch reads only its own rows. The cache is written to a temporary sibling directory and renamed
into place at the end, so a crashed build never leaves a cache that looks complete.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from md_jax.data import npy_shards

FORMAT = "md_jax.text_embeddings/1"
MANIFEST = npy_shards.MANIFEST
IDS_FILE = "input_ids.npy"
NULL_FILE = "null.npy"
DTYPES = ("float32", "float16")


class TextCacheError(ValueError):
  """A cache that does not fit the data, tokenizer or encoder it is used with."""


def write_text_cache(directory: str, captions: Sequence[str], *, tokenize: Callable,
                     encode: Callable[[np.ndarray], np.ndarray], max_length: int,
                     source: Mapping[str, Any], encoder: Mapping[str, Any] | None = None,
                     batch_size: int = 256, rows_per_shard: int = 65536,
                     dtype: str = "float32", overwrite: bool = False,
                     progress: bool = False) -> str:
  """Encodes every caption once and writes the cache to `directory`.

  captions: any sized, sliceable sequence (row i = record i); may be lazy.
  tokenize(list[str]) -> int32 (n, max_length); encode(int32 (batch_size, max_length)) ->
  (batch_size, max_length, hidden) floats; it is always called with exactly batch_size rows (the
  last batch padded) so a jitted encoder compiles once. source / encoder: JSON-able descriptions
  stored in the manifest and checked by readers (dataset identity, encoder config).
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  num_rows = len(captions)
  if num_rows < 1:
    raise ValueError("no captions to encode")
  if os.path.exists(os.path.join(directory, MANIFEST)) and not overwrite:
    raise FileExistsError(f"{directory} already holds a text cache (pass overwrite=True)")
  rows_per_shard = max(batch_size, (rows_per_shard // batch_size) * batch_size)
  tmp = npy_shards.partial_dir(directory)

  def run(ids: np.ndarray) -> np.ndarray:
    n = len(ids)
    if n < batch_size:
      ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - n, axis=0)])
    return np.asarray(encode(ids), np.float32)[:n]

  null_ids = np.asarray(tokenize([""]), np.int32).reshape(1, max_length)
  null = run(null_ids)[0]
  hidden = int(null.shape[-1])
  np.save(os.path.join(tmp, NULL_FILE), null.astype(dtype))
  all_ids = np.lib.format.open_memmap(os.path.join(tmp, IDS_FILE), mode="w+", dtype=np.int32,
                                      shape=(num_rows, max_length))
  num_shards = -(-num_rows // rows_per_shard)
  names = [f"embeddings-{s:05d}-of-{num_shards:05d}.npy" for s in range(num_shards)]
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=num_rows, desc="text cache", unit="caption")
  t0 = time.time()
  for s, name in enumerate(names):
    lo, hi = s * rows_per_shard, min((s + 1) * rows_per_shard, num_rows)
    out = np.lib.format.open_memmap(os.path.join(tmp, name), mode="w+", dtype=dtype,
                                    shape=(hi - lo, max_length, hidden))
    for start in range(lo, hi, batch_size):
      stop = min(start + batch_size, hi)
      ids = np.asarray(tokenize(list(captions[start:stop])), np.int32).reshape(-1, max_length)
      all_ids[start:stop] = ids
      out[start - lo:stop - lo] = run(ids).astype(dtype)
      if bar is not None:
        bar.update(stop - start)
    out.flush()
    del out
  all_ids.flush()
  del all_ids
  if bar is not None:
    bar.close()
  manifest = dict(format=FORMAT, num_rows=num_rows, max_length=int(max_length),
                  hidden_size=hidden, dtype=dtype, rows_per_shard=rows_per_shard, shards=names,
                  input_ids=IDS_FILE, null=NULL_FILE, null_input_ids=null_ids[0].tolist(),
                  source=dict(source),
                  encoder=dict(encoder or {}), build_seconds=round(time.time() - t0, 2))
  npy_shards.publish(tmp, directory, manifest)
  return directory


class TextEmbeddingCache(npy_shards.ShardedRows):
  """Reads a cache written by `write_text_cache`; picklable (memory maps reopen lazily)."""

  def __init__(self, directory: str):
    self.directory = directory
    m = npy_shards.read_manifest(directory, fmt=FORMAT, what="text-embedding cache",
                                 tool="md_jax.tools.build_text_cache", error=TextCacheError,
                                 files=("input_ids", "null"))
    self.manifest = m
    self.num_rows = int(m["num_rows"])
    self.max_length = int(m["max_length"])
    self.hidden_size = int(m["hidden_size"])
    self.rows_per_shard = int(m["rows_per_shard"])

  @property
  def source(self) -> dict:
    return self.manifest["source"]

  @property
  def encoder(self) -> dict:
    return self.manifest["encoder"]

  def __len__(self) -> int:
    return self.num_rows

  @property
  def null_embedding(self) -> np.ndarray:
    """float32 (max_length, hidden): the empty prompt's embedding."""
    return np.asarray(self._map(self.manifest["null"]), np.float32)

  def _rows(self, indices) -> np.ndarray:
    idx = np.asarray(indices, np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
      bad = int(idx[(idx < 0) | (idx >= self.num_rows)][0])
      raise TextCacheError(f"record {bad} is outside the {self.num_rows} rows of the text cache "
                           f"{self.directory} (rebuild it for more records)")
    return idx

  def input_ids(self, indices) -> np.ndarray:
    return np.asarray(self._map(self.manifest["input_ids"])[self._rows(indices)], np.int32)

  def embeddings(self, indices) -> np.ndarray:
    """float32 (n, max_length, hidden) for record indices (any order, repeats allowed)."""
    idx = self._rows(indices)
    return self._gather(idx, (self.max_length, self.hidden_size))

  def check(self, *, max_length: int | None = None, hidden_size: int | None = None,
            num_records: int | None = None, **source) -> None:
    """Raises TextCacheError naming the first field that differs from what the caller uses."""
    where = os.path.join(self.directory, MANIFEST)
    if max_length is not None and int(max_length) != self.max_length:
      raise TextCacheError(f"{where}: max_length={self.max_length}, the data uses {max_length}")
    if hidden_size is not None and int(hidden_size) != self.hidden_size:
      raise TextCacheError(f"{where}: hidden_size={self.hidden_size}, the model needs "
                           f"{hidden_size}")
    if num_records is not None and int(num_records) > self.num_rows:
      raise TextCacheError(f"{where}: {self.num_rows} rows, the data has {num_records} records")
    for key, want in source.items():
      got = self.source.get(key)
      if got != want:
        raise TextCacheError(f"{where}: source {key}={got!r}, the data uses {want!r}")

  def verify_encoder(self, encode: Callable[[np.ndarray], np.ndarray], *, num_probe: int = 4,
                     tolerance: float | None = None) -> float:
    """Re-encodes the empty prompt and a few cached rows with `encode`; raises if they differ.

    Catches a cache built with other encoder weights (another seed or checkpoint), which the
    manifest alone cannot. Returns the largest difference seen.
    """
    probe = np.unique(np.linspace(0, self.num_rows - 1, num_probe).astype(np.int64))
    null_ids = self.null_input_ids()
    ids = np.concatenate([null_ids[None], self.input_ids(probe)])
    got = np.asarray(encode(ids), np.float32)
    want = np.concatenate([self.null_embedding[None], self.embeddings(probe)])
    scale = 1.0 + float(np.max(np.abs(want)))
    if tolerance is None:
      tolerance = 1e-4 if self.manifest["dtype"] == "float32" else 2e-3
    err = float(np.max(np.abs(got - want))) / scale
    if not err <= tolerance:
      raise TextCacheError(
          f"text cache {self.directory} was built with a different text encoder: re-encoding "
          f"cached rows differs by {err:.3g} (relative, > {tolerance}); rebuild the cache")
    return err

  def null_input_ids(self) -> np.ndarray:
    """int32 (max_length,): the tokens of the empty prompt."""
    return np.asarray(self.manifest["null_input_ids"], np.int32)
