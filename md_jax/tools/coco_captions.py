"""The COCO-30K protocol (paper sec. 5.1): 30,000 captions drawn with a fixed seed from the
MS-COCO 2014 validation set, and the list of their images for the reference FID statistics.

``python -m md_jax.tools.coco_captions --annotations=captions_val2014.json --out=coco30k.json``

The draw is a pure function of the set of (image id, file name, captions) and the seed: images
are ordered by COCO image id and each image's captions by their whitespace-normalised text (not
by caption id: TFDS numbers captions with Karpathy's sentence ids, COCO with annotation ids), then
``--num`` distinct images are chosen (numpy ``default_rng(seed)``, without replacement) and one
caption per chosen image. So any source holding the same 40,504 images and captions gives the
same 30k pairs:

  * ``--annotations``: the official ``captions_val2014.json`` (40,504 images, 202,654 captions);
  * ``--tfds=coco_captions``: TFDS's coco_captions uses Karpathy's splits, which redistribute
    COCO 2014 *train and val* images; its ``val``, ``test`` and ``restval`` splits together hold
    exactly the 40,504 val2014 images (5,000 + 5,000 + 30,504; the file names say val2014), so
    reading those three and keeping the val2014 files reproduces the set (the dataset must be
    prepared locally in ArrayRecord format; nothing is downloaded).

Output JSON: ``{"seed", "num", "source", "captions": [{"image_id", "file_name", "caption"}, ...]}``.
Use it as ``md_jax.evaluate --prompts=coco30k.json`` and, for the reference statistics, as
``md_jax.tools.fid_stats --images=val2014/ --list=coco30k.json --image_size=512`` (the real
images centre-cropped and resized to the generation size, then resized to 299 inside the FID
network as pytorch-fid does).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Iterable

import numpy as np

COCO30K_SIZE = 30_000
DEFAULT_SEED = 2014
VAL2014_IMAGES = 40_504


def from_annotations(path: str) -> dict[int, dict]:
  """{image_id: {file_name, captions: [text, ...]}} from captions_val2014.json."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--annotations={path!r}: no such file (COCO's "
                            "annotations/captions_val2014.json)")
  with open(path) as f:
    data = json.load(f)
  for key in ("images", "annotations"):
    if key not in data:
      raise KeyError(f"{path}: no {key!r} list: not a COCO captions annotation file")
  images = {int(im["id"]): {"file_name": im["file_name"], "captions": []} for im in data["images"]}
  for ann in data["annotations"]:
    image_id = int(ann["image_id"])
    if image_id not in images:
      raise KeyError(f"{path}: annotation {ann.get('id')} names image {image_id}, which is not "
                     "in 'images'")
    images[image_id]["captions"].append(str(ann["caption"]))
  return images


def from_tfds(name: str = "coco_captions", data_dir: str | None = None,
              splits: Iterable[str] = ("val", "test", "restval")) -> dict[int, dict]:
  """The same structure from TFDS coco_captions' Karpathy splits, val2014 images only."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  images: dict[int, dict] = {}
  for split in splits:
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # pylint: disable=broad-except
      raise FileNotFoundError(f"TFDS {name!r} split {split!r} is not prepared under "
                              f"data_dir={data_dir!r} ({type(e).__name__}: {e})") from e
    for i in range(len(source)):
      ex = source[i]
      file_name = os.path.basename(_text(ex["image/filename"]))
      if "val2014" not in file_name:
        continue
      caps = ex["captions"]
      images[int(ex["image/id"])] = {"file_name": file_name,
                                     "captions": [_text(t) for t in caps["text"]]}
  return images


def _text(value) -> str:
  value = getattr(value, "numpy", lambda: value)()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def draw(images: dict[int, dict], num: int = COCO30K_SIZE, seed: int = DEFAULT_SEED) -> list[dict]:
  """``num`` (image, caption) pairs: distinct images, one caption each, fixed by ``seed``."""
  ids = sorted(images)
  if num > len(ids):
    raise ValueError(f"asked for {num} captions of distinct images, but only {len(ids)} images")
  rng = np.random.default_rng(seed)
  chosen = rng.choice(len(ids), size=num, replace=False)
  out = []
  for k in chosen:
    image_id = ids[int(k)]
    entry = images[image_id]
    caps = sorted(" ".join(t.split()) for t in entry["captions"])
    if not caps:
      raise ValueError(f"image {image_id} ({entry['file_name']}) has no caption")
    out.append(dict(image_id=image_id, file_name=entry["file_name"],
                    caption=caps[int(rng.integers(len(caps)))]))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--annotations", help="captions_val2014.json")
  src.add_argument("--tfds", help="TFDS dataset name (coco_captions)")
  parser.add_argument("--tfds_data_dir", default=None)
  parser.add_argument("--num", type=int, default=COCO30K_SIZE)
  parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  images = (from_annotations(args.annotations) if args.annotations
            else from_tfds(args.tfds, args.tfds_data_dir))
  if len(images) != VAL2014_IMAGES:
    print(f"note: {len(images)} images, not the {VAL2014_IMAGES} of COCO val2014: the draw is "
          "not the standard COCO-30K set")
  pairs = draw(images, args.num, args.seed)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(seed=args.seed, num=args.num, images_in_source=len(images),
                   source=args.annotations or f"tfds:{args.tfds}", captions=pairs), f, indent=0)
  print(f"wrote {len(pairs)} captions of distinct images to {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
