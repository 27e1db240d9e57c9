"""Input pipeline throughput: images per second per CPU core for the records pipeline.

  python -m md_jax.tools.bench_input [--source=DIR] [--image_sizes=256,512] [--batches=8]

Without --source it writes --num_images synthetic photo-like JPEGs of --photo_size (default
640x480, COCO's typical size) and prepares them with md_jax.data.prepare in a temporary
directory. It then reads batches through make_records_iterator with num_threads=0 (everything
on the calling thread, i.e. one core): read + decode + resize/centre-crop + tokenise, and prints
images/s per core for each stage resolution.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from absl import app
from absl import flags

_SOURCE = flags.DEFINE_string("source", None, "Prepared directory or tfds:NAME[:SPLIT].")
_SIZES = flags.DEFINE_list("image_sizes", ["256", "512"], "Stage resolutions to measure.")
_BATCH = flags.DEFINE_integer("batch", 32, "Rows per batch.")
_BATCHES = flags.DEFINE_integer("batches", 8, "Timed batches per resolution (after 1 warm-up).")
_NUM = flags.DEFINE_integer("num_images", 64, "Synthetic images to make without --source.")
_PHOTO = flags.DEFINE_list("photo_size", ["640", "480"], "Synthetic image width,height.")


def synthetic_photos(directory: str, n: int, w: int, h: int) -> None:
  """n photo-like JPEGs (smooth structure + sensor-like noise) with sidecar captions."""
  from PIL import Image

  os.makedirs(directory, exist_ok=True)
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  for i in range(n):
    rng = np.random.default_rng(i)
    f = rng.uniform(0.005, 0.05, (3, 2))
    a = np.stack([127 + 100 * np.sin(f[c, 0] * x + f[c, 1] * y + i) for c in range(3)], -1)
    a += rng.normal(0, 12, a.shape)
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(
        os.path.join(directory, f"{i:05d}.jpg"), quality=90)
    with open(os.path.join(directory, f"{i:05d}.txt"), "w") as fh:
      fh.write(f"a photo of a red circle and a blue square, number {i}")


def measure(source: str, image_size: int, batch: int, batches: int, tokenizer,
            tfds_data_dir: str | None = None) -> tuple[float, float]:
  """(images per wall second, images per CPU second) on one thread through
  make_records_iterator; the second is robust to other load on the machine."""
  from md_jax.data import pipeline

  it = pipeline.make_records_iterator(
      source=source, image_size=image_size, global_batch_size=batch, process_index=0,
      process_count=1, seed=0, tokenizer=tokenizer, max_length=77, num_threads=0,
      tfds_data_dir=tfds_data_dir)
  next(it)  # warm-up: opens shards, first tokenizer call
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  n = batch * batches
  return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main(argv):
  del argv
  from md_jax.data import pipeline
  from md_jax.data import prepare

  tokenizer = pipeline.load_tokenizer()
  with tempfile.TemporaryDirectory() as tmp:
    source = _SOURCE.value
    if source is None:
      w, h = (int(v) for v in _PHOTO.value)
      synthetic_photos(os.path.join(tmp, "photos"), _NUM.value, w, h)
      source = os.path.join(tmp, "prepared")
      prepare.prepare([os.path.join(tmp, "photos")], source, min_side=min(w, h),
                      workers=1, progress=False)
      print(f"synthetic: {_NUM.value} JPEGs of {w}x{h}")
    batch = min(_BATCH.value, _NUM.value if _SOURCE.value is None else _BATCH.value)
    for s in _SIZES.value:
      wall, cpu = measure(source, int(s), batch, _BATCHES.value, tokenizer)
      print(f"image_size={s}: {cpu:.1f} images per CPU-second ({wall:.1f} per wall second) "
            "on one thread: read + decode + resize/centre-crop + tokenise")


if __name__ == "__main__":
  app.run(main)
