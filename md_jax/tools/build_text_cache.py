"""Precomputes the frozen text encoder's embeddings of a dataset's captions, once.

  python -m md_jax.tools.build_text_cache --config=configs/shapes.py:lowres --out=DIR \
      [--config.data.num_records=N] [--dtype=float32|float16] [--batch_size=256]

then train with `--config.text.cache_dir=DIR`: batches carry `text_embedding` and the train step
skips the encoder. The cache holds one row per record of the training split (records
[0, config.data.num_records) of `config.data.seed`) plus the empty prompt for dropped captions and
classifier-free guidance. The encoder is exactly the one the trainer builds (same config and
seed), and the trainer re-encodes a few cached rows at start to confirm it.
"""

from __future__ import annotations

import json
import logging
from typing import Sequence

import jax

from md_jax.data import pipeline
from md_jax.data import shapes
from md_jax.data import text_cache as text_cache_lib


class ShapesCaptions(Sequence):
  """Lazy captions of shapes records [0, n): row i is record i's caption."""

  def __init__(self, split: str, num_records: int, data_seed: int):
    # Captions do not depend on the image size; the smallest renders fastest.
    self._source = shapes.ShapesSource(split, 16, num_records, data_seed)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self._source[i]["caption"] for i in range(*index.indices(len(self)))]
    return self._source[index]["caption"]


def build_for_config(config, directory: str, *, split: str = "train", batch_size: int = 256,
                     dtype: str = "float32", rows_per_shard: int = 65536,
                     overwrite: bool = False, progress: bool = False, text_params=None) -> str:
  """Writes the text cache a diffusion run of `config` reads (see module docstring)."""
  from md_jax.train import diffusion  # pylint: disable=g-import-not-at-top

  if diffusion.text_trained(config):
    raise ValueError("config.text.frozen=False: the run trains its text encoder, so embeddings "
                     "cached from its initial weights would be stale; a text cache serves "
                     "config.text.frozen=True runs only")
  ld = diffusion.LatentDiffusion(config)
  hf_dir = str(config.text.get("hf_dir", "") or "")
  if text_params is None and hf_dir:  # the pretrained tower the run will freeze
    text_params = diffusion.load_hf_text_params(config, hf_dir)
  elif text_params is None:
    text_params = jax.jit(ld.text.init)(jax.random.key(int(config.text.seed)))
  encode = jax.jit(lambda p, ids: ld.encode_text({"text": p}, ids))
  max_length = int(config.data.max_length)
  data_seed = int(config.data.seed)
  source = pipeline.shapes_cache_source(split, data_seed)
  encoder = {k: config.text[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size",
                                          "max_position_embeddings", "seed")}
  encoder["eos_token_id"] = ld.eos_token_id
  encoder["hf_dir"] = hf_dir
  return text_cache_lib.write_text_cache(
      directory, ShapesCaptions(split, int(config.data.num_records), data_seed),
      tokenize=lambda caps: pipeline.tokenize(ld.tokenizer, caps, max_length),
      encode=lambda ids: jax.device_get(encode(text_params, ids)),
      max_length=max_length, source=source, encoder=encoder, batch_size=batch_size,
      rows_per_shard=rows_per_shard, dtype=dtype, overwrite=overwrite, progress=progress)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  out = build_for_config(f.config, f.out, split=f.split, batch_size=f.batch_size, dtype=f.dtype,
                         overwrite=f.overwrite, progress=True)
  cache = text_cache_lib.TextEmbeddingCache(out)
  print(json.dumps({k: cache.manifest[k] for k in ("num_rows", "max_length", "hidden_size",
                                                    "dtype", "build_seconds")}))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Stage config (configs/*.py[:arg]).")
  flags.DEFINE_string("out", None, "Directory to write the cache to.")
  flags.DEFINE_string("split", "train", "Dataset split.")
  flags.DEFINE_integer("batch_size", 256, "Captions per encoder call.")
  flags.DEFINE_enum("dtype", "float32", list(text_cache_lib.DTYPES), "Stored dtype.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing cache.")
  flags.mark_flags_as_required(["config", "out"])
  logging.getLogger().setLevel(logging.INFO)
  app.run(main)
