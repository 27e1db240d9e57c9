"""grain input pipeline for the shapes dataset, plus tokenizer helpers.

Sharding is done per global batch rather than per record range: global batch k
is always the records at positions [k*G, (k+1)*G) of one seeded, per-epoch
reshuffled order, and process p of P takes rows [p*G/P, (p+1)*G/P) of it. So
the union of all processes' slices at step k is the same global batch for any
process count, which makes runs comparable (and resumable) across topologies.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Any, Sequence

import grain
import numpy as np

from md_jax import config_base
from md_jax.data import latent_cache as latent_cache_lib
from md_jax.data import shapes
from md_jax.data import text_cache as text_cache_lib

_SPLIT_SALT = {"train": 0, "eval": 1, "heldout": 2}
_TOKENIZER_LOCK = threading.Lock()


def default_tokenizer_path() -> str:
  """The packaged shapes tokenizer directory (md_jax/assets/shapes_tokenizer)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(root, "assets", "shapes_tokenizer")


def tokenizer_dir(text_config) -> str | None:
  """config.text's tokenizer: ``tokenizer_dir``, else the CLIP directory ``hf_dir``, else None
  (the packaged shapes tokenizer)."""
  path = (str(text_config.get("tokenizer_dir", "") or "")
          or str(text_config.get("hf_dir", "") or ""))
  return config_base.resolve_asset(path) or None


def load_tokenizer(path: str | None = None):
  """A transformers CLIPTokenizer, offline; None loads the packaged one.

  Loaded once per directory and process (every data iterator and trainer asks for it; the
  tokenizer is read-only once built).
  """
  if path and not os.path.isdir(path):
    tail = os.path.normpath(path).split(os.sep)[-3:]
    if tail == ["md_jax", "assets", "shapes_tokenizer"]:
      # A config written by another checkout of md_jax (an absolute path to its packaged
      # tokenizer): the packaged tokenizer here is the same one (test_shapes_data pins it).
      logging.warning("tokenizer %s not found; using the packaged shapes tokenizer %s", path,
                      default_tokenizer_path())
      path = None
    else:
      raise FileNotFoundError(
          f"text tokenizer directory {path} does not exist (config.text.tokenizer_dir, else "
          "config.text.hf_dir): point it at a CLIP tokenizer directory (vocab.json, "
          "merges.txt), or leave both empty for the packaged shapes tokenizer")
  return _load_tokenizer(os.path.abspath(path or default_tokenizer_path()))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str):
  from transformers import CLIPTokenizer  # heavy import, only when needed

  return CLIPTokenizer.from_pretrained(path, local_files_only=True)


def tokenize(tokenizer, captions: str | Sequence[str], max_length: int) -> np.ndarray:
  """int32 (B, max_length) ids: <|startoftext|> ... <|endoftext|> then padding.

  Too-long captions are truncated with the end token kept last, as CLIP does
  with padding="max_length", truncation=True.
  """
  if isinstance(captions, str):
    captions = [captions]
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2 (start and end tokens), got {max_length}")
  # A call with padding/truncation reconfigures the Rust tokenizer in place,
  # and concurrent calls (pipeline read threads vs. the trainer tokenizing eval
  # prompts) fail with "Already borrowed"; serialise them.
  with _TOKENIZER_LOCK:
    enc = tokenizer(list(captions), padding="max_length", truncation=True,
                    max_length=max_length, return_attention_mask=False)
  return np.asarray(enc["input_ids"], dtype=np.int32).reshape(len(captions), max_length)


def prompt_warnings(tokenizer, prompt: str, max_length: int) -> list[str]:
  """What tokenizing ``prompt`` to ``max_length`` ids loses, as messages for a user: the words
  cut off the end (the message says what is kept). CLIP's byte-level BPE drops no character."""
  with _TOKENIZER_LOCK:
    ids = tokenizer(prompt, truncation=False, return_attention_mask=False)["input_ids"]
  body = ids[1:-1]  # without the start and end tokens
  kept = tokenizer.decode(body[:max_length - 2], skip_special_tokens=True).strip()
  out = []
  if len(body) > max_length - 2:
    out.append(f"prompt {prompt[:40]!r}... has {len(body) + 2} tokens, more than the text "
               f"encoder's {max_length}: only {kept!r} is used")
  return out


class _ProcessRows(grain.MapDataset):
  """This process's records of each global batch, in order.

  Element j of process p is position (j // b) * G + p * b + j % b of the parent
  (b = G / P rows per process), i.e. row j % b of p's slice of global batch
  j // b.
  """

  def __init__(self, parent: grain.MapDataset, global_batch_size: int,
               process_index: int, process_count: int):
    super().__init__(parent)
    self._g = global_batch_size
    self._b = global_batch_size // process_count
    self._offset = process_index * self._b
    self._len = (len(parent) // global_batch_size) * self._b

  def __len__(self) -> int:
    return self._len

  def __str__(self) -> str:
    return f"ProcessRows(global={self._g}, rows={self._b}, offset={self._offset})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, row = divmod(index, self._b)
    return self._parent[step * self._g + self._offset + row]


def shapes_images(source: shapes.ShapesSource, indices) -> np.ndarray:
  """float32 (n, H, W, 3) images in [-1, 1] of records `indices`, as batches carry them."""
  images = np.stack([source[int(i)]["image"] for i in np.asarray(indices).reshape(-1)])
  return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


class _MakeBatch:
  """Record indices (b,) -> batch: images in [-1, 1] (or cached latent posteriors), token ids,
  labels (+ cached embeddings)."""

  def __init__(self, source: shapes.ShapesSource, tokenizer, max_length: int,
               caption_dropout: float, seed: int,
               text_cache: text_cache_lib.TextEmbeddingCache | None = None,
               latent_cache: latent_cache_lib.LatentCache | None = None):
    self._source = source
    self._tokenizer = tokenizer
    self._max_length = max_length
    self._dropout = float(caption_dropout)
    self._seed = seed
    self._cache = text_cache
    self._latents = latent_cache

  def _drop_caption(self, index: int) -> bool:
    if self._dropout <= 0.0:
      return False
    # Keyed on the record, not the step: the same record always keeps or drops
    # its caption, independent of order, sharding and restarts.
    rng = np.random.default_rng([self._seed, _SPLIT_SALT[self._source.split], index, 0xD20])
    return bool(rng.random() < self._dropout)

  def __call__(self, indices) -> dict:
    indices = [int(i) for i in np.asarray(indices).reshape(-1)]
    recs = [self._source[i] for i in indices]
    texts = ["" if self._drop_caption(i) else r["caption"] for i, r in zip(indices, recs)]
    batch = {}
    if self._latents is None:
      images = np.stack([r["image"] for r in recs]).astype(np.float32)
      batch["image"] = images * np.float32(2.0 / 255.0) - np.float32(1.0)
    else:  # the source renders at its smallest size: only captions and labels are read
      batch["latent_mean"], batch["latent_logvar"] = self._latents.moments(indices)
    batch.update(
        input_ids=tokenize(self._tokenizer, texts, self._max_length),
        colour=np.array([r["colour"] for r in recs], np.int32),
        shape=np.array([r["shape"] for r in recs], np.int32),
        position=np.array([r["position"] for r in recs], np.int32),
        held_out=np.array([r["held_out"] for r in recs], np.bool_),
    )
    if self._cache is not None:
      batch["text_embedding"] = self._cached_embeddings(indices, texts, batch["input_ids"])
    return batch

  def _cached_embeddings(self, indices, texts, input_ids) -> np.ndarray:
    cache = self._cache
    emb = cache.embeddings(indices)
    dropped = np.array([t == "" for t in texts])
    emb[dropped] = cache.null_embedding
    kept = np.flatnonzero(~dropped)
    if kept.size:
      cached_ids = cache.input_ids(np.asarray(indices)[kept])
      bad = np.flatnonzero(np.any(cached_ids != input_ids[kept], axis=1))
      if bad.size:
        raise text_cache_lib.TextCacheError(
            f"text cache {cache.directory} row {indices[kept[bad[0]]]} encodes other tokens than "
            "this pipeline's caption (another tokenizer or dataset?); rebuild the cache")
    return emb


def make_shapes_dataset(*, split: str, image_size: int, global_batch_size: int,
                        process_index: int, process_count: int, seed: int,
                        tokenizer, max_length: int, num_records: int = 1_000_000,
                        caption_dropout: float = 0.0, data_seed: int | None = None,
                        num_threads: int = 1, prefetch_batches: int = 2,
                        worker_count: int = 0, text_cache: str | None = None,
                        latent_cache: str | None = None) -> grain.IterDataset:
  """The batched IterDataset behind make_shapes_iterator (same arguments)."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got "
                     f"{process_index=} {process_count=}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive "
                     f"multiple of process_count={process_count}")
  if num_records < global_batch_size:
    raise ValueError(f"num_records={num_records} is smaller than "
                     f"global_batch_size={global_batch_size}")
  if not 0.0 <= caption_dropout <= 1.0:
    raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
  data_seed = seed if data_seed is None else data_seed
  latents = None
  if latent_cache:
    latents = latent_cache_lib.LatentCache(latent_cache)
    latents.check(image_size=image_size, num_records=num_records,
                  **shapes_cache_source(split, data_seed))
  # Captions and labels do not depend on the image size: with cached latents no image is used,
  # so records render at the smallest size.
  source = shapes.ShapesSource(split, 16 if latents else image_size, num_records, data_seed)
  cache = None
  if text_cache:
    cache = text_cache_lib.TextEmbeddingCache(text_cache)
    cache.check(max_length=max_length, num_records=num_records,
                **shapes_cache_source(split, data_seed))
  # Indexing a shuffled dataset past its length reshuffles with seed + epoch,
  # so repeat() gives a fresh order every epoch.
  order = grain.MapDataset.range(num_records).shuffle(seed=seed % 2**32).repeat()
  rows = _ProcessRows(order, global_batch_size, process_index, process_count)
  # Indices are batched before anything is rendered: a batch is the unit of
  # prefetching, so read threads and worker processes each build whole batches
  # (neither changes which records end up together), and the captions of a
  # batch are tokenized in one call.
  ds = rows.batch(global_batch_size // process_count, drop_remainder=True)
  ds = ds.map(_MakeBatch(source, tokenizer, max_length, caption_dropout, data_seed, cache,
                         latents))
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(prefetch_batches, num_threads, 1)))
  if worker_count > 0:
    from absl import flags  # grain workers read absl flags

    if not flags.FLAGS.is_parsed():
      # Outside an absl app nobody parses flags; grain's defaults are fine.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def make_shapes_iterator(*, split: str, image_size: int, global_batch_size: int,
                         process_index: int, process_count: int, seed: int,
                         tokenizer, max_length: int, num_records: int = 1_000_000,
                         caption_dropout: float = 0.0, data_seed: int | None = None,
                         num_threads: int = 1, prefetch_batches: int = 2,
                         worker_count: int = 0,
                         text_cache: str | None = None,
                         latent_cache: str | None = None) -> grain.DatasetIterator:
  """Endless, checkpointable iterator over this process's slice of each batch.

  Yields dict(image=float32 (b, H, W, 3) in [-1, 1], input_ids=int32
  (b, max_length), colour/shape/position=int32 (b,), held_out=bool (b,)) with
  b = global_batch_size // process_count. The order is a function of `seed`
  only (not of the process count); record content is a function of
  (data_seed or seed, split, record index). With probability caption_dropout,
  fixed per record, the caption is replaced by "" (for classifier-free
  guidance). With `text_cache` (a directory written by text_cache.write_text_cache for this
  split and data seed, e.g. by md_jax.tools.build_text_cache) each batch also carries
  text_embedding=float32 (b, max_length, hidden): the frozen encoder's output for the caption,
  the empty prompt's for dropped ones. With `latent_cache` (a directory written by
  latent_cache.write_latent_cache for this split, data seed and image size, e.g. by
  md_jax.tools.build_latent_cache) batches carry latent_mean / latent_logvar = float32
  (b, h, w, c), the frozen VAE's posterior of each image, instead of `image`. The iterator
  supports get_state()/set_state() and grain.checkpoint.CheckpointSave/CheckpointRestore with
  orbax.

  Throughput knobs, none of which changes the data or its order:
  num_threads read threads (0 = render synchronously; the default 1 overlaps
  rendering with the training step) keeping up to prefetch_batches batches
  ready; worker_count > 0 renders batches in that many
  grain worker processes instead (rendering is numpy-bound, so processes scale
  where threads hit the GIL); close the iterator when done with workers.
  """
  return iter(make_shapes_dataset(
      split=split, image_size=image_size, global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count, seed=seed,
      tokenizer=tokenizer, max_length=max_length, num_records=num_records,
      caption_dropout=caption_dropout, data_seed=data_seed, num_threads=num_threads,
      prefetch_batches=prefetch_batches, worker_count=worker_count, text_cache=text_cache,
      latent_cache=latent_cache))


def shapes_cache_source(split: str, data_seed: int) -> dict:
  """What identifies the captions of shapes records in a text cache's manifest."""
  return dict(name="shapes", split=split, data_seed=int(data_seed))


def decode_ids(tokenizer, input_ids: Any) -> list[str]:
  """Token ids (B, L) back to caption strings, for logging."""
  return [tokenizer.decode([int(t) for t in row], skip_special_tokens=True)
          for row in np.asarray(input_ids)]


# ---------------------------------------------------------------------------------------------
# Prepared image-text records (ArrayRecord shards from md_jax.data.prepare).

_RECORDS_SALT = 7
# How many following records a failed one may be replaced by before the batch gives up.
_MAX_REPLACEMENTS = 64


def decode_and_crop(data: bytes, image_size: int) -> tuple[np.ndarray, str]:
  """Serialized record -> (uint8 (S, S, 3) centre crop resized to S = image_size, caption).

  The shorter side is scaled to S and the centre square kept (JPEGs are decoded at a reduced
  scale first when they are at least twice as large as needed). Raises RecordError or PIL's
  errors on bad data.
  """
  import io

  from PIL import Image

  from md_jax.data import records

  rec = records.decode_record(data)
  img = Image.open(io.BytesIO(rec.image))
  w, h = img.size
  short = min(w, h)
  if img.format == "JPEG" and short >= 2 * image_size:
    img.draft("RGB", (-(-w * image_size // short), -(-h * image_size // short)))
    w, h = img.size
    short = min(w, h)
  if img.mode != "RGB":
    img = img.convert("RGB")  # prepare stores RGB; this only guards hand-made shards
  left, top = (w - short) // 2, (h - short) // 2
  img = img.resize((image_size, image_size), Image.Resampling.BICUBIC,
                   box=(left, top, left + short, top + short))
  arr = np.asarray(img, dtype=np.uint8)
  if arr.shape != (image_size, image_size, 3):
    raise ValueError(f"decoded image has shape {arr.shape}, expected "
                     f"{(image_size, image_size, 3)}")
  return arr, rec.caption


class _MakeRecordBatch:
  """Record indices (b,) -> batch of decoded, centre-cropped images and token ids.

  A record that fails to decode is replaced by the next record (index + 1, + 2, ... modulo the
  dataset size) that decodes, so batches keep their shape and stay a function of the indices;
  each row's number of failed records is returned as ``skipped`` and the reasons are counted in
  ``self.failures`` (of this process: with worker_count > 0 each worker keeps its own).
  """

  def __init__(self, source, image_size: int, tokenizer, max_length: int,
               caption_dropout: float, seed: int):
    import collections

    self._source = source
    self._size = int(image_size)
    self._tokenizer = tokenizer
    self._max_length = max_length
    self._dropout = float(caption_dropout)
    self._seed = seed
    self.failures: collections.Counter = collections.Counter()

  def _drop_caption(self, index: int) -> bool:
    if self._dropout <= 0.0:
      return False
    rng = np.random.default_rng([self._seed, _RECORDS_SALT, index, 0xD20])
    return bool(rng.random() < self._dropout)

  def _load(self, index: int) -> tuple[int, np.ndarray, str, int]:
    from md_jax.data import records

    n = len(self._source)
    for k in range(min(_MAX_REPLACEMENTS, n)):
      i = (index + k) % n
      try:
        image, caption = decode_and_crop(self._source[i], self._size)
        return i, image, caption, k
      except records.CaptionError:
        self.failures["caption_bad"] += 1
      except records.RecordError:
        self.failures["record_malformed"] += 1
      except Exception:  # PIL: OSError, SyntaxError, ValueError, DecompressionBombError, ...
        self.failures["image_corrupt"] += 1
    raise RuntimeError(f"{self._source}: records {index}..{index + k} all failed to decode "
                       f"({dict(self.failures)}); is this a prepared directory?")

  def __call__(self, indices) -> dict:
    indices = [int(i) for i in np.asarray(indices).reshape(-1)]
    loaded = [self._load(i) for i in indices]
    texts = ["" if self._drop_caption(i) else c for i, _, c, _ in loaded]
    images = np.stack([im for _, im, _, _ in loaded]).astype(np.float32)
    return dict(
        image=images * np.float32(2.0 / 255.0) - np.float32(1.0),
        input_ids=tokenize(self._tokenizer, texts, self._max_length),
        record_index=np.array([i for i, _, _, _ in loaded], np.int32),
        skipped=np.array([k for _, _, _, k in loaded], np.int32),
    )


def make_records_dataset(*, source: str, image_size: int, global_batch_size: int,
                         process_index: int, process_count: int, seed: int, tokenizer,
                         max_length: int, caption_dropout: float = 0.0, num_threads: int = 1,
                         prefetch_batches: int = 2, worker_count: int = 0,
                         tfds_data_dir: str | None = None) -> grain.IterDataset:
  """The batched IterDataset behind make_records_iterator (same arguments)."""
  from md_jax.data import records

  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got "
                     f"{process_index=} {process_count=}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive "
                     f"multiple of process_count={process_count}")
  if not 0.0 <= caption_dropout <= 1.0:
    raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
  name = source
  source = records.open_source(source, tfds_data_dir)
  if len(source) < global_batch_size:
    raise ValueError(f"{name} holds {len(source)} records, fewer than "
                     f"global_batch_size={global_batch_size}")
  order = grain.MapDataset.range(len(source)).shuffle(seed=seed % 2**32).repeat()
  rows = _ProcessRows(order, global_batch_size, process_index, process_count)
  ds = rows.batch(global_batch_size // process_count, drop_remainder=True)
  ds = ds.map(_MakeRecordBatch(source, image_size, tokenizer, max_length, caption_dropout, seed))
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(prefetch_batches, num_threads, 1)))
  if worker_count > 0:
    from absl import flags  # grain workers read absl flags

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def make_records_iterator(*, source: str, image_size: int, global_batch_size: int,
                          process_index: int, process_count: int, seed: int, tokenizer,
                          max_length: int, caption_dropout: float = 0.0, num_threads: int = 1,
                          prefetch_batches: int = 2,
                          worker_count: int = 0,
                          tfds_data_dir: str | None = None) -> grain.DatasetIterator:
  """Endless, checkpointable iterator over prepared image-text records.

  `source` is a directory written by md_jax.data.prepare, or "tfds:NAME[:SPLIT]" for a TFDS
  dataset in ArrayRecord format under `tfds_data_dir` (records.TfdsImageTextSource; its
  "image" and "captions/text" features, as in coco_captions).

  Same order and sharding rules as make_shapes_iterator: global batch k is positions
  [k*G, (k+1)*G) of a seeded, per-epoch reshuffled order of the records, and process p takes
  rows [p*G/P, (p+1)*G/P) of it. Yields dict(image=float32 (b, S, S, 3) in [-1, 1] (shorter
  side resized to S = image_size, centre square), input_ids=int32 (b, max_length),
  record_index=int32 (b,) (the record each row holds), skipped=int32 (b,) (records that failed
  to decode and were passed over to fill the row; sum it for a metric)), b = G / P. Bad
  records never raise; see _MakeRecordBatch. Supports get_state()/set_state() and grain's orbax
  checkpoint handlers; num_threads / prefetch_batches / worker_count as in make_shapes_iterator.
  """
  return iter(make_records_dataset(
      source=source, image_size=image_size, global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count, seed=seed, tokenizer=tokenizer,
      max_length=max_length, caption_dropout=caption_dropout, num_threads=num_threads,
      prefetch_batches=prefetch_batches, worker_count=worker_count, tfds_data_dir=tfds_data_dir))
