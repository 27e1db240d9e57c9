"""md_jax.data.prepare (folders, CSV/TSV, tar shards -> ArrayRecord) and the records pipeline."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from md_jax.data import pipeline
from md_jax.data import prepare
from md_jax.data import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo(w: int, h: int, seed: int) -> Image.Image:
  """A smooth, photo-like RGB image (gradients + a little noise) that survives JPEG."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  c = rng.uniform(0, 255, (3,))
  a = np.stack([c[0] + 100 * np.sin(x / (5 + seed % 7)),
                c[1] + 80 * np.cos(y / 9.0),
                c[2] + (x + y) * 0.5], -1)
  a += rng.normal(0, 4, a.shape)
  return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def _write(path, data: bytes | str):
  mode = "w" if isinstance(data, str) else "wb"
  with open(path, mode) as f:
    f.write(data)


def _read_all(directory) -> list[records.ImageTextRecord]:
  src = records.ImageTextSource(str(directory))
  return [records.decode_record(src[i]) for i in range(len(src))]


def _pixels(rec: records.ImageTextRecord) -> np.ndarray:
  img = Image.open(io.BytesIO(rec.image))
  assert img.mode == "RGB", rec.key
  return np.asarray(img)


def _bad_folder(d) -> dict[str, np.ndarray]:
  """Every bad-input kind next to good ones; returns the expected RGB pixels of kept images."""
  d.mkdir()
  good = {}
  # Good, stored unchanged.
  img = _photo(64, 48, 0)
  _write(d / "good_jpeg.jpg", _encode(img, "JPEG", quality=90))
  _write(d / "good_jpeg.txt", "  a red  circle\n on the left ")
  good["good_jpeg"] = np.asarray(Image.open(d / "good_jpeg.jpg").convert("RGB"))
  img = _photo(48, 64, 1)
  _write(d / "good_png.png", _encode(img, "PNG"))
  _write(d / "good_png.json", json.dumps({"caption": "café au lait ☕", "url": "x"}))
  good["good_png"] = np.asarray(img)
  # Converted to RGB.
  cmyk = _photo(40, 40, 2).convert("CMYK")
  _write(d / "cmyk.jpg", _encode(cmyk, "JPEG", quality=95))
  _write(d / "cmyk.txt", "cmyk")
  good["cmyk"] = None  # JPEG re-encode: checked loosely below
  gray = _photo(40, 40, 3).convert("L")
  _write(d / "gray.png", _encode(gray, "PNG"))
  _write(d / "gray.txt", "gray")
  good["gray"] = np.repeat(np.asarray(gray)[..., None], 3, -1)
  rgba = np.zeros((40, 40, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:20, :, 3] = 255  # top half opaque red, bottom half fully transparent
  _write(d / "alpha.png", _encode(Image.fromarray(rgba, "RGBA"), "PNG"))
  _write(d / "alpha.txt", "alpha")
  exp = np.full((40, 40, 3), 255, np.uint8)
  exp[:20] = (200, 0, 0)
  good["alpha"] = exp
  pal = _photo(40, 40, 4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
  _write(d / "palette.gif", _encode(pal, "GIF"))
  _write(d / "palette.txt", "palette")
  good["palette"] = np.asarray(pal.convert("RGB"))
  g16 = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40)
  _write(d / "gray16.png", _encode(Image.fromarray(g16), "PNG"))
  _write(d / "gray16.txt", "sixteen bit")
  good["gray16"] = None
  # Skipped.
  full = _encode(_photo(64, 64, 5), "JPEG", quality=90)
  _write(d / "truncated.jpg", full[: len(full) // 2])
  _write(d / "truncated.txt", "truncated jpeg")
  fullpng = _encode(_photo(64, 64, 6), "PNG")
  _write(d / "truncated_png.png", fullpng[: len(fullpng) * 2 // 3])
  _write(d / "truncated_png.txt", "truncated png")
  _write(d / "garbage.jpg", np.random.default_rng(0).bytes(500))
  _write(d / "garbage.txt", "not an image")
  _write(d / "empty_file.png", b"")
  _write(d / "empty_file.txt", "zero bytes")
  _write(d / "one.png", _encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
  _write(d / "one.txt", "one pixel")
  _write(d / "small.png", _encode(_photo(31, 60, 7), "PNG"))
  _write(d / "small.txt", "too small")
  _write(d / "wide.png", _encode(_photo(200, 40, 8), "PNG"))
  _write(d / "wide.txt", "too wide")
  _write(d / "empty_caption.png", _encode(_photo(40, 40, 9), "PNG"))
  _write(d / "empty_caption.txt", " \n\t ")
  _write(d / "long_caption.png", _encode(_photo(40, 40, 10), "PNG"))
  _write(d / "long_caption.txt", "word " * 100)
  _write(d / "latin1.png", _encode(_photo(40, 40, 11), "PNG"))
  _write(d / "latin1.txt", "caf\xe9".encode("latin-1"))
  _write(d / "badjson.png", _encode(_photo(40, 40, 12), "PNG"))
  _write(d / "badjson.json", "{caption: oops")
  _write(d / "nocaptionfield.png", _encode(_photo(40, 40, 13), "PNG"))
  _write(d / "nocaptionfield.json", json.dumps({"url": "x"}))
  _write(d / "uncaptioned.png", _encode(_photo(40, 40, 14), "PNG"))
  _write(d / "orphan.txt", "caption without an image")
  return good


EXPECTED_SKIPS = dict(image_corrupt=4, too_small=2, bad_aspect=1, caption_empty=1,
                      caption_too_long=1, caption_not_utf8=1, caption_bad_json=2,
                      missing_caption=1, missing_image=1)


def test_folder_bad_inputs_are_counted_and_good_ones_round_trip(tmp_path):
  good = _bad_folder(tmp_path / "imgs")
  out = tmp_path / "out"
  index = prepare.prepare([str(tmp_path / "imgs")], str(out), min_side=32, max_aspect=2.0,
                          max_caption_chars=300, records_per_shard=3, workers=1, progress=False)
  assert index["skipped"] == EXPECTED_SKIPS
  assert index["num_records"] == len(good) == 7
  assert index["num_inputs"] == 7 + sum(EXPECTED_SKIPS.values())
  assert index["converted"] == {"cmyk_to_rgb": 1, "l_to_rgb": 1, "rgba_to_rgb": 1,
                                "p_to_rgb": 1, "i;16_to_rgb": 1}
  assert [s["num_records"] for s in index["shards"]] == [3, 3, 1]
  assert index["skip_examples"]["too_small"] == ["one", "small"]
  assert json.load(open(out / "index.json")) == index
  recs = {r.key: r for r in _read_all(out)}
  assert set(recs) == set(good)
  assert recs["good_jpeg"].caption == "a red circle on the left"
  assert recs["good_png"].caption == "café au lait ☕"
  assert recs["good_jpeg"].image == (tmp_path / "imgs" / "good_jpeg.jpg").read_bytes()
  for key, expected in good.items():
    px = _pixels(recs[key])
    assert (recs[key].width, recs[key].height) == (px.shape[1], px.shape[0])
    if expected is not None:
      np.testing.assert_array_equal(px, expected, err_msg=key)
  cmyk_ref = np.asarray(_photo(40, 40, 2).convert("CMYK").convert("RGB"), np.float32)
  assert np.abs(_pixels(recs["cmyk"]).astype(np.float32) - cmyk_ref).mean() < 8
  g16 = _pixels(recs["gray16"])
  assert g16[0, 0, 0] == 0 and g16[-1, -1, 0] > 150 and np.ptp(g16, axis=-1).max() == 0
  summary = prepare.summary(index)
  assert "image_corrupt" in summary and "kept 7 of 21" in summary
  with pytest.raises(FileExistsError, match="already holds prepared shards"):
    prepare.prepare([str(tmp_path / "imgs")], str(out), min_side=32, workers=1, progress=False)


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tf.addfile(info, io.BytesIO(data))


def test_csv_tsv_and_tar_inputs_through_the_cli_with_workers(tmp_path):
  d = tmp_path / "src"
  d.mkdir()
  (d / "sub").mkdir()
  for i in range(4):
    _write(d / "sub" / f"c{i}.png", _encode(_photo(40, 36, 20 + i), "PNG"))
  csv_rows = ["path,caption", "sub/c0.png,first csv", '"sub/c1.png","second, with comma"',
              "sub/missing.png,no such file", "sub/c2.png,", "sub/c3.png,   "]
  _write(d / "list.csv", "\n".join(csv_rows) + "\n")
  tsv = b"sub/c0.png\tfirst tsv\n" + str(d / "sub" / "c1.png").encode() + b"\t\xff\xfe bad\n"
  _write(d / "list.tsv", tsv)
  with tarfile.open(d / "shard-0.tar", "w") as tf:
    for i in range(3):
      _tar_add(tf, f"part/{i:04d}.jpg", _encode(_photo(48, 40, 30 + i), "JPEG"))
      _tar_add(tf, f"part/{i:04d}.txt", f"tar caption {i}".encode())
    _tar_add(tf, "part/0003.png", _encode(_photo(48, 40, 40), "PNG"))
    _tar_add(tf, "part/0003.json", json.dumps({"text": "json in tar"}).encode())
    _tar_add(tf, "part/0004.jpg", b"\xff\xd8\xff\xe0 broken")
    _tar_add(tf, "part/0004.txt", b"broken jpeg in tar")
    _tar_add(tf, "part/0005.txt", b"caption only")
    _tar_add(tf, "part/0006.png", _encode(_photo(48, 40, 41), "PNG"))
  out = tmp_path / "out"
  inputs = ",".join(str(d / n) for n in ("list.csv", "list.tsv", "shard-0.tar"))
  res = subprocess.run(
      [sys.executable, "-m", "md_jax.data.prepare", f"--input={inputs}", f"--output={out}",
       "--min_side=32", "--workers=2", "--records_per_shard=100"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "kept 7 of 14" in res.stdout, res.stdout
  assert "caption_not_utf8" in res.stdout
  index = records.read_index(str(out))
  assert index["skipped"] == dict(missing_image=2, caption_empty=2, caption_not_utf8=1,
                                  image_corrupt=1, missing_caption=1)
  caps = [r.caption for r in _read_all(out)]
  # Input order is kept (ordered imap), so the records are deterministic.
  assert caps == ["first csv", "second, with comma", "first tsv", "tar caption 0",
                  "tar caption 1", "tar caption 2", "json in tar"]
  rec = _read_all(out)[1]
  np.testing.assert_array_equal(_pixels(rec), np.asarray(_photo(40, 36, 21)))
  # A tar cut off after its first key (inside a header, where tarfile itself stops silently):
  # the first key survives, the lost tail counts once.
  data = (d / "shard-0.tar").read_bytes()
  _write(d / "cut.tar", data[:3000])
  items = list(prepare.iter_items([str(d / "cut.tar")]))
  assert [(i.key, i.error) for i in items] == [("cut.tar:<truncated>", "unreadable_file"),
                                              ("cut.tar:part/0000", None)]


def _good_folder(d, n: int, w: int = 48, h: int = 40) -> list[str]:
  d.mkdir()
  caps = []
  for i in range(n):
    _write(d / f"{i:03d}.png", _encode(_photo(w, h, 100 + i), "PNG"))
    caps.append(f"a photo number {i}")
    _write(d / f"{i:03d}.txt", caps[-1])
  return caps


@pytest.fixture(scope="module")
def tokenizer():
  return pipeline.load_tokenizer()


def test_decode_and_crop_takes_the_centre_square():
  a = np.zeros((32, 96, 3), np.uint8)
  a[:, :32] = (255, 0, 0)
  a[:, 32:64] = (0, 255, 0)
  a[:, 64:] = (0, 0, 255)
  data = records.encode_record(records.ImageTextRecord(
      "tricolour", 96, 32, "PNG", _encode(Image.fromarray(a), "PNG")))
  img, cap = pipeline.decode_and_crop(data, 16)
  assert cap == "tricolour" and img.shape == (16, 16, 3) and img.dtype == np.uint8
  np.testing.assert_allclose(img[2:-2, 2:-2], np.broadcast_to([0, 255, 0], (12, 12, 3)), atol=2)
  # A big JPEG is decoded at reduced scale but still gives the requested size.
  big = _encode(_photo(640, 480, 3), "JPEG")
  img, _ = pipeline.decode_and_crop(records.encode_record(
      records.ImageTextRecord("big", 640, 480, "JPEG", big)), 64)
  assert img.shape == (64, 64, 3)
  with pytest.raises(records.RecordError, match="expected b'MDIT'"):
    pipeline.decode_and_crop(b"XXXX" + bytes(20), 16)


def test_records_pipeline_shards_disjointly_and_restores(tmp_path, tokenizer):
  caps = _good_folder(tmp_path / "imgs", 24)
  out = tmp_path / "out"
  prepare.prepare([str(tmp_path / "imgs")], str(out), min_side=32, records_per_shard=5,
                  workers=1, progress=False)
  recs = _read_all(out)
  kw = dict(source=str(out), image_size=32, global_batch_size=8, process_count=2, seed=3,
            tokenizer=tokenizer, max_length=16, num_threads=0)
  seen = []
  for p in range(2):
    it = pipeline.make_records_iterator(process_index=p, **kw)
    for _ in range(3):  # one epoch: 24 records / global batch 8
      b = next(it)
      assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
      assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
      assert not b["skipped"].any()
      for row, i in enumerate(b["record_index"]):
        np.testing.assert_array_equal(
            b["input_ids"][row], pipeline.tokenize(tokenizer, recs[i].caption, 16)[0])
        assert recs[i].caption == caps[int(recs[i].key)]
      seen.append(b["record_index"])
  first, second = np.concatenate(seen[:3]), np.concatenate(seen[3:])
  assert not set(first) & set(second)
  assert sorted(np.concatenate([first, second])) == list(range(24))
  # Row 0 of process 0's first batch is the centre crop of its source image.
  i = seen[0][0]
  it = pipeline.make_records_iterator(process_index=0, **kw)
  b = next(it)
  ref = np.asarray(Image.open(io.BytesIO(recs[i].image)).resize(
      (32, 32), Image.Resampling.BICUBIC, box=(4, 0, 44, 40)), np.float32) / 127.5 - 1
  np.testing.assert_allclose(b["image"][0], ref, atol=1e-5)
  # Checkpoint after one batch; the restored iterator continues identically (into epoch 2),
  # also with a read thread prefetching ahead.
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  it2 = pipeline.make_records_iterator(process_index=0, **dict(kw, num_threads=1))
  it2.set_state(state)
  got = [next(it2) for _ in range(3)]
  assert set(want[2]["record_index"]) != set(seen[0])  # epoch 2 is reshuffled
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])


def test_bad_records_at_training_time_are_skipped_and_counted(tmp_path, tokenizer):
  from array_record.python.array_record_module import ArrayRecordWriter

  out = tmp_path / "hand"
  out.mkdir()
  writer = ArrayRecordWriter(str(out / records.shard_name(0)), records.WRITER_OPTIONS)
  bad = {3: b"not a record at all", 7: records.encode_record(records.ImageTextRecord(
      "corrupt", 40, 40, "JPEG", b"\xff\xd8\xff garbage")),
         11: records.encode_record(records.ImageTextRecord(
             "truncated", 40, 40, "PNG", _encode(_photo(40, 40, 1), "PNG")[:200]))}
  for i in range(16):
    writer.write(bad.get(i) or records.encode_record(records.ImageTextRecord(
        f"good {i}", 40, 40, "PNG", _encode(_photo(40, 40, 50 + i), "PNG"), key=str(i))))
  writer.close()
  _write(out / "index.json", json.dumps(dict(
      format=records.INDEX_FORMAT, num_records=16,
      shards=[dict(path=records.shard_name(0), num_records=16)])))
  ds = pipeline.make_records_dataset(
      source=str(out), image_size=16, global_batch_size=4, process_index=0,
      process_count=1, seed=0, tokenizer=tokenizer, max_length=8, num_threads=0)
  batches = [b for _, b in zip(range(4), iter(ds))]  # one epoch
  idx = np.concatenate([b["record_index"] for b in batches])
  skipped = np.concatenate([b["skipped"] for b in batches])
  assert skipped.sum() == 3 and set(skipped) == {0, 1}
  assert not set(idx) & set(bad)
  # Each bad record was replaced by the record after it.
  assert all(i - 1 in bad for i in idx[skipped == 1])


def test_missing_index_and_small_dataset_errors(tmp_path, tokenizer):
  with pytest.raises(FileNotFoundError, match="python -m md_jax.data.prepare"):
    records.ImageTextSource(str(tmp_path))
  _good_folder(tmp_path / "imgs", 3)
  prepare.prepare([str(tmp_path / "imgs")], str(tmp_path / "out"), min_side=32, workers=1,
                  progress=False)
  with pytest.raises(ValueError, match="holds 3 records, fewer than global_batch_size=4"):
    pipeline.make_records_iterator(
        source=str(tmp_path / "out"), image_size=16, global_batch_size=4, process_index=0,
        process_count=1, seed=0, tokenizer=tokenizer, max_length=8)


def test_tfds_array_record_source(tmp_path, tokenizer):
  """A tiny TFDS dataset (coco_captions-like features) built here in ArrayRecord format."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
      }))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(8)}

    def _generate_examples(self, n):
      for i in range(n):
        texts = [] if i == 5 else [f"shot {i} first", f"shot {i} second"]
        yield i, {"image": np.full((40, 48, 3), 20 + 25 * i, np.uint8),
                  "captions": {"text": texts}}

  data_dir = str(tmp_path / "tfds")
  TinyCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()
  src = records.open_source("tfds:tiny_captions:train", data_dir)
  assert len(src) == 8
  it = pipeline.make_records_iterator(
      source="tfds:tiny_captions", tfds_data_dir=data_dir, image_size=16, global_batch_size=4,
      process_index=0, process_count=1, seed=0, tokenizer=tokenizer, max_length=8,
      num_threads=0)
  batches = [next(it) for _ in range(2)]
  assert sum(int(b["skipped"].sum()) for b in batches) == 1  # the example without captions
  for b in batches:
    for row, i in enumerate(b["record_index"]):
      rec = records.decode_record(src[int(i)])
      assert rec.caption in (f"shot {j} {w}" for j in range(8) for w in ("first", "second"))
      j = int(rec.caption.split()[1])
      np.testing.assert_allclose(b["image"][row], (20 + 25 * j) / 127.5 - 1, atol=0.04)
      np.testing.assert_array_equal(b["input_ids"][row],
                                    pipeline.tokenize(tokenizer, rec.caption, 8)[0])
  bad = [k for k in range(8) if _no_caption(src, k)]
  assert len(bad) == 1
  with pytest.raises(records.CaptionError, match="no caption"):
    src[bad[0]]
  with pytest.raises(FileNotFoundError, match="tfds build no_such_set"):
    records.open_source("tfds:no_such_set", data_dir)


def _no_caption(src, k: int) -> bool:
  try:
    src[k]
    return False
  except records.CaptionError:
    return True


def test_bench_input_measures_the_records_pipeline(tmp_path, tokenizer):
  from md_jax.tools import bench_input

  bench_input.synthetic_photos(str(tmp_path / "photos"), 4, 80, 64)
  index = prepare.prepare([str(tmp_path / "photos")], str(tmp_path / "out"), min_side=64,
                          workers=1, progress=False)
  assert index["num_records"] == 4 and not index["skipped"]
  wall, cpu = bench_input.measure(str(tmp_path / "out"), 32, 2, 2, tokenizer)
  assert wall > 0 and cpu > 0


@pytest.mark.slow
def test_prepared_folder_trains_the_vae_and_reports_skipped_records(tmp_path):
  """The shared loop reads real records through config.data.source, bad ones included."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  from array_record.python.array_record_module import ArrayRecordWriter
  src = tmp_path / "imgs"
  _good_folder(src, 12, w=80, h=64)
  out = tmp_path / "records"
  index = prepare.prepare([str(src)], str(out), min_side=32, max_aspect=2.0,
                          max_caption_chars=300, records_per_shard=100, workers=1,
                          progress=False)
  assert index["num_records"] == 12
  # One more shard holding a record that only fails when decoded during training.
  writer = ArrayRecordWriter(str(out / records.shard_name(1)), records.WRITER_OPTIONS)
  writer.write(records.encode_record(records.ImageTextRecord(
      "broken", 64, 64, "JPEG", b"\xff\xd8\xff garbage")))
  writer.close()
  meta = json.loads((out / "index.json").read_text())
  meta["shards"].append(dict(path=records.shard_name(1), num_records=1))
  meta["num_records"] = 13
  (out / "index.json").write_text(json.dumps(meta))

  config = tiny_config("vae", eval_at_end=False, num_train_steps=3)
  with config.unlocked():
    config.data.source = str(out)
    config.global_batch_size = 13  # every record in each batch, so the broken one shows up
    config.mesh_shape = (1, 1, 1)
  result = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["step"] == 3
  assert np.isfinite(result["metrics"]["loss"])
  assert result["metrics"]["data/skipped_records"] == 1.0


# Photographs scikit-image ships in its wheel (no download), with what they show. camera.png is
# 8-bit grayscale, so preparation converts it to RGB; the two JPEGs are stored byte for byte.
REAL_PHOTOS = {
    "astronaut.png": "an astronaut in a white spacesuit in front of a flag",
    "coffee.png": "a cup of coffee on a saucer, seen from above",
    "chelsea.png": "a tabby cat looking to the side",
    "camera.png": "a black and white photo of a man with a camera on a tripod",
    "ihc.png": "a stained tissue sample under a microscope",
    "rocket.jpg": "a rocket on its launch pad",
    "hubble_deep_field.jpg": "hundreds of galaxies in a deep space image",
}


@pytest.mark.slow  # ~30 s on 2 cores: one tiny VAE step compiles
def test_real_photographs_prepare_and_train(tmp_path):
  """Real photographs (scikit-image's bundled samples) go through prepare -> ArrayRecord ->
  grain -> the shared loop: every one kept at its content, grayscale converted, JPEG bytes
  unchanged, and the tiny VAE trains on them."""
  import skimage  # pylint: disable=g-import-not-at-top  (the test extra installs it)
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
  src = tmp_path / "photos"
  src.mkdir()
  for name, caption in REAL_PHOTOS.items():
    with open(os.path.join(data_dir, name), "rb") as f:
      _write(src / name, f.read())
    _write(src / (os.path.splitext(name)[0] + ".txt"), caption)
  out = tmp_path / "records"
  index = prepare.prepare([str(src)], str(out), min_side=256, max_aspect=2.0, workers=1,
                          progress=False)
  assert index["num_records"] == len(REAL_PHOTOS), index
  recs = {r.caption: r for r in _read_all(out)}
  assert set(recs) == set(REAL_PHOTOS.values())
  for name, caption in REAL_PHOTOS.items():
    rec = recs[caption]
    with Image.open(os.path.join(data_dir, name)) as im:
      assert (rec.width, rec.height) == im.size, name
      original = np.asarray(im.convert("RGB"), np.float32)
    if name.endswith(".jpg"):
      with open(os.path.join(data_dir, name), "rb") as f:
        assert rec.image == f.read(), name  # plain RGB JPEG: stored unchanged
    else:
      np.testing.assert_array_equal(_pixels(rec), original, err_msg=name)  # lossless
  assert _pixels(recs[REAL_PHOTOS["camera.png"]]).shape[-1] == 3  # grayscale -> RGB
  # The records pipeline crops them to the stage size and the VAE trains on them.
  config = tiny_config("vae", eval_at_end=False, num_train_steps=3)
  with config.unlocked():
    config.data.source = str(out)
    config.global_batch_size = len(REAL_PHOTOS)
    config.mesh_shape = (1, 1, 1)
  result = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["step"] == 3 and np.isfinite(result["metrics"]["loss"])
  assert result["metrics"]["data/skipped_records"] == 0.0
