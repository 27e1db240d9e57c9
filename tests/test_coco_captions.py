"""The COCO-30K caption draw: deterministic, distinct images, independent of the source's order
and caption ids (annotation file vs TFDS), readable by the eval CLI and the statistics tool."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from md_jax import evaluate
from md_jax.tools import coco_captions, fid_stats


def _annotations(rng, n_images=60):
  images = [{"id": int(i), "file_name": f"COCO_val2014_{i:012d}.jpg"}
            for i in rng.permutation(np.arange(1000, 1000 + n_images))]
  anns, ann_id = [], 1
  for im in images:
    for k in range(int(rng.integers(1, 6))):
      anns.append({"id": ann_id, "image_id": im["id"], "caption": f"image {im['id']} caption {k} "})
      ann_id += 1
  order = rng.permutation(len(anns))
  return {"images": images, "annotations": [anns[i] for i in order]}


def test_draw_is_deterministic_and_source_independent(tmp_path):
  data = _annotations(np.random.default_rng(0))
  path = tmp_path / "captions_val2014.json"
  path.write_text(json.dumps(data))
  out = tmp_path / "coco30k.json"
  assert coco_captions.main(["--annotations", str(path), "--num", "20", "--seed", "7",
                             "--out", str(out)]) == 0
  pairs = json.loads(out.read_text())["captions"]
  assert len(pairs) == 20 and len({p["image_id"] for p in pairs}) == 20
  for p in pairs:
    assert p["caption"].startswith(f"image {p['image_id']} caption")
    assert p["file_name"] == f"COCO_val2014_{p['image_id']:012d}.jpg"
  # The same images and captions in another order, other caption ids and spacing (as TFDS's
  # Karpathy-split copy holds them): the same draw.
  images = coco_captions.from_annotations(str(path))
  other = {i: {"file_name": v["file_name"], "captions": ["  " + c.replace(" ", "  ") for c in
                                                          reversed(v["captions"])]}
           for i, v in reversed(list(images.items()))}
  assert coco_captions.draw(other, 20, 7) == pairs
  assert coco_captions.draw(images, 20, 8) != pairs
  assert evaluate.read_prompts(str(out)) == [p["caption"] for p in pairs]
  with pytest.raises(ValueError, match="only 60 images"):
    coco_captions.draw(images, 61, 7)
  with pytest.raises(FileNotFoundError, match="captions_val2014"):
    coco_captions.from_annotations(str(tmp_path / "nope.json"))


def test_fid_stats_reads_the_listed_images_in_order(tmp_path):
  folder = tmp_path / "val2014"
  folder.mkdir()
  for i in range(5):
    Image.fromarray(np.full((8, 12, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
  listing = tmp_path / "coco.json"
  listing.write_text(json.dumps({"captions": [{"file_name": "3.png"}, {"file_name": "1.png"}]}))
  n, items = fid_stats.iter_images(str(folder), list_file=str(listing), image_size=6)
  got = list(items)
  assert n == 2 and [name.rsplit("/", 1)[-1] for name, _ in got] == ["3.png", "1.png"]
  assert got[0][1].shape == (6, 6, 3) and int(got[0][1][0, 0, 0]) == 120
  listing.write_text(json.dumps({"captions": [{"file_name": "9.png"}]}))
  with pytest.raises(FileNotFoundError, match="9.png"):
    fid_stats.iter_images(str(folder), list_file=str(listing))
