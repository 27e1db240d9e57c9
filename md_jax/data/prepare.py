"""Turn captioned images into ArrayRecord shards for training.

  python -m md_jax.data.prepare --input=PATH[,PATH...] --output=DIR \
      [--min_side=256 --max_aspect=2.0 --records_per_shard=10000 --workers=N]

Inputs (any mix, comma-separated):
  * a folder of images (.jpg .jpeg .png .webp .bmp .gif .tif .tiff), each with a sidecar caption
    file of the same stem: ``name.txt`` (the whole file) or ``name.json`` (its "caption" or
    "text" field); sub-folders are walked, and .tar files found there are read as below;
  * a CSV or TSV file of ``path,caption`` rows (a header naming the columns path/file/image and
    caption/text is optional; one row per line, quoted fields may hold commas but not line
    breaks); relative paths are relative to the CSV's folder;
  * a webdataset-style .tar shard: members grouped by key (the name up to the first dot after the
    last slash), one image member plus a .txt or .json caption member per key.

Every image is fully decoded once. Bad input is skipped and counted per reason (never raised):
unreadable or corrupt/truncated images, images smaller than --min_side or more elongated than
--max_aspect, missing, empty, overlong or non-UTF-8 captions. Images that are not plain RGB
(CMYK, grayscale, palette, alpha, 16-bit, EXIF-rotated) are converted to RGB (alpha composited
on white) and re-encoded; those are counted as conversions. Original JPEG/PNG/WebP bytes of
plain RGB images are stored unchanged.

The output directory gets shard-NNNNN.array_record files (format: md_jax.data.records) and
index.json with the counts, shard list, filters and skip/conversion reasons.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import multiprocessing
import os
import sys
import tarfile
import time
import warnings
from typing import Any, Iterator, Sequence

from absl import app
from absl import flags

from md_jax.data import records

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTS = (".txt", ".json")
_KEEP_FORMATS = ("JPEG", "PNG", "WEBP")
_CAPTION_FIELDS = ("caption", "text", "txt")
_PATH_COLUMNS = ("path", "file", "filename", "image", "image_path", "url")
_TEXT_COLUMNS = ("caption", "text", "txt", "prompt")

# Skip reasons (index.json "skipped" keys).
SKIP_REASONS = (
    "unreadable_file",      # the image file could not be read
    "image_corrupt",        # PIL could not identify or fully decode it (corrupt, truncated)
    "image_too_large",      # over PIL's decompression-bomb pixel limit
    "too_small",            # shorter side < min_side
    "bad_aspect",           # longer / shorter side > max_aspect
    "missing_caption",      # no sidecar / tar member / CSV cell for the image
    "caption_not_utf8",     # caption bytes are not valid UTF-8
    "caption_bad_json",     # JSON caption that does not parse or has no caption field
    "caption_empty",        # nothing left after whitespace normalisation
    "caption_too_long",     # more than max_caption_chars characters
    "missing_image",        # a caption (sidecar, tar member, CSV row) without an image
    "duplicate_key",        # a second image with the same key in the same input
)


class Item:
  """One candidate record as handed to a worker: a key, image (bytes or path), caption."""

  __slots__ = ("key", "image", "image_path", "caption", "caption_kind", "error")

  def __init__(self, key: str, image: bytes | None = None, image_path: str | None = None,
               caption: bytes | str | None = None, caption_kind: str = "txt",
               error: str | None = None):
    self.key = key
    self.image = image
    self.image_path = image_path
    self.caption = caption
    self.caption_kind = caption_kind
    self.error = error

  def __getstate__(self):
    return tuple(getattr(self, s) for s in self.__slots__)

  def __setstate__(self, state):
    for s, v in zip(self.__slots__, state):
      setattr(self, s, v)


# ---------------------------------------------------------------------------------------------
# Reading inputs.


def _read_file(path: str) -> bytes | None:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError:
    return None


def _folder_items(root: str) -> Iterator[Item]:
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    by_stem: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for name in sorted(filenames):
      stem, ext = os.path.splitext(name)
      ext = ext.lower()
      full = os.path.join(dirpath, name)
      if ext == ".tar":
        yield from _tar_items(full)
      elif ext in IMAGE_EXTS:
        if "image" in by_stem[stem]:
          yield Item(os.path.relpath(full, root), error="duplicate_key")
          continue
        by_stem[stem]["image"] = full
      elif ext in CAPTION_EXTS:
        # .txt wins over .json when both exist.
        if ext == ".txt" or "caption" not in by_stem[stem]:
          by_stem[stem]["caption"] = full
    for stem in sorted(by_stem):
      entry = by_stem[stem]
      key = os.path.relpath(os.path.join(dirpath, stem), root)
      if "image" not in entry:
        yield Item(key, error="missing_image")
        continue
      if "caption" not in entry:
        yield Item(key, error="missing_caption")
        continue
      cap = _read_file(entry["caption"])
      if cap is None:
        yield Item(key, error="missing_caption")
        continue
      kind = "json" if entry["caption"].lower().endswith(".json") else "txt"
      yield Item(key, image_path=entry["image"], caption=cap, caption_kind=kind)


def _csv_items(path: str) -> Iterator[Item]:
  base = os.path.dirname(os.path.abspath(path))
  delimiter = "\t" if path.lower().endswith(".tsv") else ","
  with open(path, "rb") as f:
    raw = f.read()
  # Decode row by row so one non-UTF-8 caption costs one row, not the file.
  lines = raw.splitlines()
  path_col, text_col, start = 0, 1, 0
  if lines:
    head = next(csv.reader([lines[0].decode("utf-8", "replace")], delimiter=delimiter), [])
    names = [h.strip().lower() for h in head]
    if any(n in _PATH_COLUMNS for n in names) and any(n in _TEXT_COLUMNS for n in names):
      path_col = next(i for i, n in enumerate(names) if n in _PATH_COLUMNS)
      text_col = next(i for i, n in enumerate(names) if n in _TEXT_COLUMNS)
      start = 1
  for lineno, line in enumerate(lines[start:], start=start + 1):
    if not line.strip():
      continue
    key = f"{os.path.basename(path)}:{lineno}"
    # Caption bytes stay bytes until the worker checks them; surrogateescape round-trips them.
    row = next(csv.reader([line.decode("utf-8", "surrogateescape")], delimiter=delimiter), [])
    if len(row) <= path_col or not row[path_col].strip():
      yield Item(key, error="missing_image")
      continue
    img = row[path_col].strip()
    img = img if os.path.isabs(img) else os.path.join(base, img)
    if len(row) <= text_col:
      yield Item(key, error="missing_caption")
      continue
    cap = row[text_col].encode("utf-8", "surrogateescape")
    yield Item(key, image_path=img, caption=cap)


def _tar_key(name: str) -> tuple[str, str]:
  """webdataset convention: key = dir/basename up to the first dot; ext = the rest."""
  d, base = os.path.split(name)
  stem, dot, ext = base.partition(".")
  return os.path.join(d, stem), ext.lower()


def _has_end_marker(path: str, tf: tarfile.TarFile) -> bool:
  """Whether an uncompressed tar ends with its end-of-archive zero block after the last member.

  tarfile stops silently when a file is cut between members; this tells that case apart from
  a complete archive. Compressed tars are trusted (their decompressor reports truncation).
  """
  if not isinstance(tf.fileobj, (io.BufferedReader, io.FileIO)):
    return True
  try:
    with open(path, "rb") as f:
      f.seek(tf.offset)
      block = f.read(tarfile.BLOCKSIZE)
  except OSError:
    return False
  return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def _tar_items(path: str) -> Iterator[Item]:
  tag = os.path.basename(path)
  try:
    tf = tarfile.open(path, "r:*")
  except (OSError, tarfile.TarError):
    yield Item(tag, error="unreadable_file")
    return
  with tf:
    groups: dict[str, dict[str, bytes]] = collections.OrderedDict()
    try:
      for m in tf:
        if not m.isfile():
          continue
        key, ext = _tar_key(m.name)
        f = tf.extractfile(m)
        data = f.read() if f is not None else None
        if data is not None:
          groups.setdefault(key, {})[ext] = data
      truncated = not _has_end_marker(path, tf)
    except (OSError, tarfile.TarError, EOFError):
      truncated = True
    if truncated:
      # Keep what was read; the lost tail counts as one unreadable file.
      yield Item(f"{tag}:<truncated>", error="unreadable_file")
    for key, members in groups.items():
      k = f"{tag}:{key}"
      img = next((members[e] for e in members if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTS),
                 None)
      if img is None:
        yield Item(k, error="missing_image")
      elif "txt" in members:
        yield Item(k, image=img, caption=members["txt"])
      elif "json" in members:
        yield Item(k, image=img, caption=members["json"], caption_kind="json")
      else:
        yield Item(k, error="missing_caption")


def iter_items(inputs: Sequence[str]) -> Iterator[Item]:
  """Items from every input path (folder, CSV/TSV or .tar), in a deterministic order."""
  for path in inputs:
    if os.path.isdir(path):
      yield from _folder_items(path)
    elif path.lower().endswith((".csv", ".tsv")):
      yield from _csv_items(path)
    elif path.lower().endswith(".tar") or ".tar." in path.lower():
      yield from _tar_items(path)
    elif not os.path.exists(path):
      raise FileNotFoundError(f"--input {path} does not exist")
    else:
      raise ValueError(f"--input {path}: expected a folder, a .csv/.tsv file or a .tar shard")


# ---------------------------------------------------------------------------------------------
# Checking and converting one item (runs in worker processes).


def clean_caption(raw: bytes | str, kind: str, max_chars: int) -> tuple[str | None, str | None]:
  """(caption, None) or (None, skip reason)."""
  if isinstance(raw, bytes):
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      return None, "caption_not_utf8"
  else:
    text = raw
  if text.startswith("\ufeff"):
    text = text[1:]
  if kind == "json":
    try:
      obj = json.loads(text)
    except json.JSONDecodeError:
      return None, "caption_bad_json"
    if isinstance(obj, str):
      text = obj
    elif isinstance(obj, dict) and any(isinstance(obj.get(k), str) for k in _CAPTION_FIELDS):
      text = next(obj[k] for k in _CAPTION_FIELDS if isinstance(obj.get(k), str))
    else:
      return None, "caption_bad_json"
  # Drop control characters (NUL etc.) and collapse whitespace runs.
  text = "".join(c if c.isprintable() else " " for c in text)
  text = " ".join(text.split())
  if not text:
    return None, "caption_empty"
  if len(text) > max_chars:
    return None, "caption_too_long"
  return text, None


def to_rgb(img):
  """(RGB image, conversion name or None): alpha goes onto white, everything else via PIL."""
  from PIL import Image

  mode = img.mode
  if mode == "RGB":
    return img, None
  if mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    bg = Image.new("RGB", rgba.size, (255, 255, 255))
    bg.paste(rgba, mask=rgba.getchannel("A"))
    return bg, f"{mode.lower()}_to_rgb"
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    # 16/32-bit grayscale: scale to 8 bits rather than clipping.
    import numpy as np

    a = np.asarray(img, dtype=np.float64)
    hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
    a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB"), f"{mode.lower()}_to_rgb"
  return img.convert("RGB"), f"{mode.lower()}_to_rgb"


def process_item(item: Item, min_side: int, max_aspect: float, max_caption_chars: int,
                 jpeg_quality: int = 95) -> tuple[str, Any, list[str]]:
  """("ok", encoded record, conversions) or ("skip", reason, [])."""
  from PIL import Image, ImageOps

  if item.error:
    return "skip", item.error, []
  if item.caption is None:
    return "skip", "missing_caption", []
  caption, why = clean_caption(item.caption, item.caption_kind, max_caption_chars)
  if why:
    return "skip", why, []
  data = item.image
  if data is None:
    data = _read_file(item.image_path) if item.image_path else None
    if data is None:
      return "skip", ("missing_image" if item.image_path and not os.path.exists(item.image_path)
                      else "unreadable_file"), []
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
      fmt = img.format
      w, h = img.size
      # Size filters before the (expensive) full decode.
      if min(w, h) < min_side:
        return "skip", "too_small", []
      if max(w, h) > max_aspect * min(w, h):
        return "skip", "bad_aspect", []
      img.load()  # full decode: truncated or corrupt data raises here
  except (Image.DecompressionBombError, Image.DecompressionBombWarning):
    return "skip", "image_too_large", []
  except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad data
    return "skip", "image_corrupt", []
  conversions = []
  try:
    if img.getexif().get(0x0112, 1) not in (1, None):
      img = ImageOps.exif_transpose(img)
      conversions.append("exif_rotated")
    rgb, conv = to_rgb(img)
    if conv:
      conversions.append(conv)
    if getattr(img, "n_frames", 1) > 1:
      conversions.append("first_frame_only")
    if not conversions and fmt in _KEEP_FORMATS:
      out_bytes, out_fmt = data, fmt
    else:
      buf = io.BytesIO()
      # Lossy sources stay JPEG; everything else (PNG, GIF, BMP, TIFF...) becomes PNG.
      out_fmt = "JPEG" if fmt in ("JPEG", "WEBP") else "PNG"
      if out_fmt == "JPEG":
        rgb.save(buf, "JPEG", quality=jpeg_quality)
      else:
        rgb.save(buf, "PNG", compress_level=1)
      out_bytes = buf.getvalue()
    w, h = rgb.size
  except Exception:
    return "skip", "image_corrupt", []
  rec = records.ImageTextRecord(caption=caption, width=w, height=h, format=out_fmt,
                                image=out_bytes, key=item.key)
  return "ok", records.encode_record(rec), conversions


class _Worker:
  """Picklable process_item with fixed filter settings, for Pool.imap."""

  def __init__(self, min_side: int, max_aspect: float, max_caption_chars: int):
    self.args = (min_side, max_aspect, max_caption_chars)

  def __call__(self, item: Item):
    return (item.key,) + process_item(item, *self.args)


# ---------------------------------------------------------------------------------------------
# Writing.


def prepare(inputs: Sequence[str], output: str, *, min_side: int = 256, max_aspect: float = 2.0,
            max_caption_chars: int = 1000, records_per_shard: int = 10_000,
            workers: int | None = None, progress: bool = True) -> dict[str, Any]:
  """Write shards + index.json to `output`; returns the index. See the module docstring."""
  from array_record.python.array_record_module import ArrayRecordWriter
  import tqdm

  if records_per_shard < 1:
    raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
  if min_side < 1 or max_aspect < 1.0:
    raise ValueError(f"need min_side >= 1 and max_aspect >= 1, got {min_side=} {max_aspect=}")
  os.makedirs(output, exist_ok=True)
  if os.path.exists(os.path.join(output, records.INDEX_NAME)) or any(
      n.endswith(records.SHARD_SUFFIX) for n in os.listdir(output)):
    raise FileExistsError(f"{output} already holds prepared shards; use an empty directory")
  workers = workers or os.cpu_count() or 1
  worker = _Worker(min_side, max_aspect, max_caption_chars)
  skipped: collections.Counter = collections.Counter()
  converted: collections.Counter = collections.Counter()
  skip_examples: dict[str, list[str]] = collections.defaultdict(list)
  shards: list[dict[str, Any]] = []
  writer, in_shard, total = None, 0, 0
  t0 = time.time()

  def close_shard():
    nonlocal writer, in_shard
    if writer is not None:
      writer.close()
      shards.append(dict(path=records.shard_name(len(shards)), num_records=in_shard))
      writer, in_shard = None, 0

  items = iter_items(inputs)
  pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
  try:
    results = (pool.imap(worker, items, chunksize=16) if pool is not None
               else map(worker, items))
    bar = tqdm.tqdm(results, desc="prepare", unit="img", disable=not progress,
                    file=sys.stderr, dynamic_ncols=True)
    for n, (key, status, payload, conv) in enumerate(bar):
      if status == "skip":
        skipped[payload] += 1
        if len(skip_examples[payload]) < 5:
          skip_examples[payload].append(key)
      else:
        if writer is None:
          writer = ArrayRecordWriter(os.path.join(output, records.shard_name(len(shards))),
                                     records.WRITER_OPTIONS)
        writer.write(payload)
        in_shard += 1
        total += 1
        converted.update(conv)
        if in_shard >= records_per_shard:
          close_shard()
      if n % 256 == 0:
        bar.set_postfix(kept=total, skipped=sum(skipped.values()))
    bar.close()
    close_shard()
  finally:
    if pool is not None:
      pool.close()
      pool.join()
  index = dict(
      format=records.INDEX_FORMAT,
      num_records=total,
      num_inputs=total + sum(skipped.values()),
      shards=shards,
      filters=dict(min_side=min_side, max_aspect=max_aspect, max_caption_chars=max_caption_chars),
      skipped=dict(sorted(skipped.items())),
      skip_examples={k: v for k, v in sorted(skip_examples.items())},
      converted=dict(sorted(converted.items())),
      inputs=[os.path.abspath(p) for p in inputs],
      seconds=round(time.time() - t0, 3),
  )
  tmp = os.path.join(output, records.INDEX_NAME + ".tmp")
  with open(tmp, "w") as f:
    json.dump(index, f, indent=2, ensure_ascii=False)
  os.replace(tmp, os.path.join(output, records.INDEX_NAME))
  return index


def summary(index: dict[str, Any]) -> str:
  """Human-readable lines: kept, skipped per reason (with example keys), conversions."""
  lines = [f"kept {index['num_records']} of {index['num_inputs']} inputs in "
           f"{len(index['shards'])} shard(s) ({index['seconds']:.1f} s)"]
  n_skip = sum(index["skipped"].values())
  lines.append(f"skipped {n_skip}:" if n_skip else "skipped none")
  for reason, n in index["skipped"].items():
    ex = ", ".join(index["skip_examples"].get(reason, [])[:3])
    lines.append(f"  {reason:18s} {n:8d}   e.g. {ex}")
  if index["converted"]:
    lines.append("converted (kept):")
    for what, n in index["converted"].items():
      lines.append(f"  {what:18s} {n:8d}")
  return "\n".join(lines)


_INPUT = flags.DEFINE_list("input", None, "Folder(s), CSV/TSV file(s) or .tar shard(s).")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (must not hold shards yet).")
_MIN_SIDE = flags.DEFINE_integer("min_side", 256, "Skip images whose shorter side is smaller.")
_MAX_ASPECT = flags.DEFINE_float("max_aspect", 2.0, "Skip images with longer/shorter side above.")
_MAX_CAPTION = flags.DEFINE_integer("max_caption_chars", 1000, "Skip longer captions.")
_PER_SHARD = flags.DEFINE_integer("records_per_shard", 10_000, "Records per ArrayRecord shard.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Worker processes (0: all cores).")


def main(argv):
  del argv
  if not _INPUT.value or not _OUTPUT.value:
    raise app.UsageError("--input and --output are required")
  index = prepare(_INPUT.value, _OUTPUT.value, min_side=_MIN_SIDE.value,
                  max_aspect=_MAX_ASPECT.value, max_caption_chars=_MAX_CAPTION.value,
                  records_per_shard=_PER_SHARD.value, workers=_WORKERS.value or None)
  print(summary(index))
  print(f"wrote {os.path.join(_OUTPUT.value, records.INDEX_NAME)}")


if __name__ == "__main__":
  app.run(main)
