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


def test_tfds_path_draws_the_same_captions_as_the_annotation_file(tmp_path):
  """A coco_captions-shaped TFDS dataset (Karpathy splits: val2014 images spread over val, test
  and restval; train2014 images in train and restval), built here in ArrayRecord format: the
  TFDS path keeps exactly the val2014 images and draws the same COCO-30K pairs as the annotation
  file, and the statistics tool reads the same dataset's images."""
  tfds = pytest.importorskip("tensorflow_datasets")
  data = _annotations(np.random.default_rng(3), n_images=24)
  by_image = {}
  for a in data["annotations"]:
    by_image.setdefault(a["image_id"], []).append((a["id"], a["caption"]))
  val = [(im["id"], im["file_name"]) for im in data["images"]]
  train = [(5000 + i, f"COCO_train2014_{5000 + i:012d}.jpg") for i in range(6)]
  splits = {"val": val[:8], "test": val[8:14], "restval": val[14:] + train[:3], "train": train[3:]}

  class TinyCocoCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "image/filename": tfds.features.Text(),
          "image/id": np.int64,
          "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
      }))

    def _split_generators(self, dl_manager):
      return {name: self._generate_examples(rows) for name, rows in splits.items()}

    def _generate_examples(self, rows):
      for image_id, file_name in rows:
        # Karpathy sentence ids and order, not the annotation file's.
        caps = by_image.get(image_id, [(0, f"train image {image_id}")])[::-1]
        yield image_id, {"image": np.full((20, 30, 3), image_id % 250, np.uint8),
                         "image/filename": file_name, "image/id": image_id,
                         "captions": {"id": [900000 + k for k in range(len(caps))],
                                      "text": [c for _, c in caps]}}

  data_dir = str(tmp_path / "tfds")
  TinyCocoCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()
  path = tmp_path / "captions_val2014.json"
  path.write_text(json.dumps(data))
  from_file = coco_captions.from_annotations(str(path))
  from_tfds = coco_captions.from_tfds("tiny_coco_captions", data_dir)
  assert sorted(from_tfds) == sorted(from_file)  # all val2014 images, no train2014 one
  assert coco_captions.draw(from_tfds, 20, 7) == coco_captions.draw(from_file, 20, 7)
  out = tmp_path / "coco30k.json"
  assert coco_captions.main(["--tfds", "tiny_coco_captions", "--tfds_data_dir", data_dir,
                             "--num", "20", "--seed", "7", "--out", str(out)]) == 0
  assert json.loads(out.read_text())["captions"] == coco_captions.draw(from_file, 20, 7)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    coco_captions.from_tfds("no_such_captions", data_dir)
  # The statistics tool on the same TFDS dataset: every image of the split, resized.
  n, items = fid_stats.iter_images("tfds:tiny_coco_captions:val", image_size=8,
                                   tfds_data_dir=data_dir)
  got = list(items)
  assert n == 8 and len(got) == 8
  assert {img.shape for _, img in got} == {(8, 8, 3)}
  np.testing.assert_allclose(sorted(int(img[4, 4, 0]) for _, img in got),
                             sorted(i % 250 for i, _ in splits["val"]), atol=2)  # flat JPEGs
  with pytest.raises(ValueError, match="--image_size"):
    fid_stats.iter_images("tfds:tiny_coco_captions:val", tfds_data_dir=data_dir)
