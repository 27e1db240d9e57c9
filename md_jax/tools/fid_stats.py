"""Reference statistics (mu, sigma, count) of real images for FID.

``python -m md_jax.tools.fid_stats --images=SOURCE --inception=inception.npz --out=stats.npz
[--image_size=N] [--num_images=N] [--batch_size=50]``

SOURCE is one of
  * a folder of image files (searched recursively, sorted by path);
  * a directory prepared by ``python -m md_jax.data.prepare`` (has index.json: ArrayRecord shards);
  * ``tfds:NAME[:SPLIT]`` for a TFDS dataset prepared in ArrayRecord format (``--tfds_data_dir``).

``--list=FILE`` keeps only the named files of a folder (the COCO-30K JSON written by
``md_jax.tools.coco_captions``, or one relative path a line), in that order.
``--image_size=N`` centre-crops each image to a square and resizes it to N x N (PIL bicubic), the
way generated images are framed; records and TFDS sources need it. Without it, images of a folder
are used at their own size and must all share one size (as pytorch-fid's batched loader
requires). Each batch is then resized to 299 x 299 inside the network exactly as pytorch-fid does.
The output .npz holds ``mu``, ``sigma`` (pytorch-fid's names, so its files work here too) and
``count``. Batches are split over all local devices.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Iterator

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def _crop_resize(img, size: int):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  w, h = img.size
  short = min(w, h)
  left, top = (w - short) // 2, (h - short) // 2
  return img.resize((size, size), Image.Resampling.BICUBIC,
                    box=(left, top, left + short, top + short))


def _decode(data_or_path, size: int, where: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    img = Image.open(io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path)
    img = img.convert("RGB")
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{where}: not a readable image ({type(e).__name__}: {e})") from e
  if size:
    img = _crop_resize(img, size)
  return np.asarray(img, np.uint8)


def list_images(folder: str) -> list[str]:
  out = []
  for root, _, files in os.walk(folder):
    out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTS)]
  return sorted(out)


def read_list(path: str) -> list[str]:
  """File names from a COCO-30K JSON (md_jax.tools.coco_captions) or a text file, one a line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--list={path!r}: no such file")
  with open(path) as f:
    if path.endswith(".json"):
      data = json.load(f)
      items = data["captions"] if isinstance(data, dict) else data
      return [it["file_name"] if isinstance(it, dict) else str(it) for it in items]
    return [line.strip() for line in f if line.strip()]


def iter_images(spec: str, *, image_size: int = 0, num_images: int = 0,
                tfds_data_dir: str | None = None, list_file: str | None = None
                ) -> tuple[int, Iterator[tuple[str, np.ndarray]]]:
  """(count, iterator of (name, uint8 HxWx3)) for a folder, prepared directory or tfds: spec;
  with ``list_file`` only the named files of the folder, in the list's order."""
  from md_jax.data import records  # pylint: disable=g-import-not-at-top
  is_records = spec.startswith("tfds:") or os.path.isfile(os.path.join(spec, records.INDEX_NAME))
  if is_records:
    if list_file:
      raise ValueError("--list selects files of a folder; records and TFDS sources take none")
    if not image_size:
      raise ValueError(f"{spec}: records and TFDS sources need --image_size (the square size "
                       "real images are cropped and resized to, e.g. the generation size)")
    source = records.open_source(spec, tfds_data_dir)
    n = len(source) if not num_images else min(num_images, len(source))

    def gen():
      for i in range(n):
        rec = records.decode_record(source[i])
        yield f"{spec}[{i}]", _decode(rec.image, image_size, f"{spec} record {i}")
    return n, gen()
  if not os.path.isdir(spec):
    raise FileNotFoundError(f"--images={spec!r}: no such folder (or tfds:NAME[:SPLIT])")
  if list_file:
    paths = [os.path.join(spec, name) for name in read_list(list_file)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"{len(missing)} files named by {list_file} are not in {spec}, "
                              f"e.g. {missing[0]}")
  else:
    paths = list_images(spec)
  if not paths:
    raise FileNotFoundError(f"{spec}: no image files ({', '.join(IMAGE_EXTS)})")
  paths = paths[:num_images] if num_images else paths
  return len(paths), ((p, _decode(p, image_size, p)) for p in paths)


def batches(items: Iterator[tuple[str, np.ndarray]], batch_size: int) -> Iterator[np.ndarray]:
  """Stacks images into batches; a size different from the first image's fails naming it."""
  buf, shape, first = [], None, None
  for name, img in items:
    if shape is None:
      shape, first = img.shape, name
    elif img.shape != shape:
      raise ValueError(f"{name} is {img.shape[1]}x{img.shape[0]} but {first} is "
                       f"{shape[1]}x{shape[0]}: pass --image_size=N to crop and resize all images")
    buf.append(img)
    if len(buf) == batch_size:
      yield np.stack(buf)
      buf = []
  if buf:
    yield np.stack(buf)


def compute_stats(extractor, spec: str, *, batch_size: int = 50, image_size: int = 0,
                  num_images: int = 0, tfds_data_dir: str | None = None, progress: bool = True,
                  list_file: str | None = None):
  """(mu, sigma, count) of ``extractor``'s features over the images of ``spec``."""
  from md_jax.evaluators import fid  # pylint: disable=g-import-not-at-top
  total, items = iter_images(spec, image_size=image_size, num_images=num_images,
                             tfds_data_dir=tfds_data_dir, list_file=list_file)
  stats = fid.FeatureStats()
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, desc="inception features", unit="img")
  for batch in batches(items, batch_size):
    stats.update(extractor(batch))
    if bar is not None:
      bar.update(len(batch))
  if bar is not None:
    bar.close()
  return stats.result()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", required=True, help="folder, prepared dir, or tfds:NAME[:SPLIT]")
  parser.add_argument("--inception", required=True, help="converted FID Inception .npz")
  parser.add_argument("--out", required=True, help="output statistics .npz")
  parser.add_argument("--image_size", type=int, default=0)
  parser.add_argument("--num_images", type=int, default=0, help="first N images (0: all)")
  parser.add_argument("--batch_size", type=int, default=50)
  parser.add_argument("--tfds_data_dir", default=None)
  parser.add_argument("--list", default=None,
                      help="only these files of the --images folder: a COCO-30K JSON from "
                           "md_jax.tools.coco_captions, or one relative path a line")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from md_jax.evaluators import fid  # pylint: disable=g-import-not-at-top
  try:
    extractor = fid.make_extractor(args.inception, args.batch_size)
    mu, sigma, count = compute_stats(
        extractor, args.images, batch_size=extractor.batch_size, image_size=args.image_size,
        num_images=args.num_images, tfds_data_dir=args.tfds_data_dir, list_file=args.list,
        progress=not args.no_progress and jax.process_index() == 0)
  except (FileNotFoundError, KeyError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  fid.save_stats(args.out, mu, sigma, count)
  print(f"wrote {args.out}: {count} images, {mu.shape[0]} features")
  return 0


if __name__ == "__main__":
  sys.exit(main())
