"""Image-text records in ArrayRecord shards: the record format, the index and a grain source.

A prepared dataset directory (written by ``python -m md_jax.data.prepare``) holds

  index.json                      counts, shard list, filters and skip reasons
  shard-00000.array_record ...    one serialized record per image

Record format (version 1), all integers little-endian::

  b"MDIT" | uint8 version (=1) | uint32 header length n | n bytes UTF-8 JSON header | image bytes

The JSON header is ``{"caption": str, "width": int, "height": int, "format": "JPEG"|"PNG"|...,
"key": str}``: the caption as cleaned by the preparation tool, the image's size in pixels and
the container format of the encoded image bytes that follow (always decodable to RGB by PIL).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Sequence

MAGIC = b"MDIT"
VERSION = 1
INDEX_NAME = "index.json"
INDEX_FORMAT = "md_jax.image_text.v1"
SHARD_SUFFIX = ".array_record"
# group_size:1 makes every record its own chunk, the layout random access reads want.
WRITER_OPTIONS = "group_size:1"

_PREFIX = struct.Struct("<4sBI")


class RecordError(ValueError):
  """A serialized record that is not in this module's format."""


@dataclasses.dataclass(frozen=True)
class ImageTextRecord:
  caption: str
  width: int
  height: int
  format: str
  image: bytes
  key: str = ""


def encode_record(rec: ImageTextRecord) -> bytes:
  """ImageTextRecord -> bytes in the format described in the module docstring."""
  header = json.dumps(dict(caption=rec.caption, width=int(rec.width), height=int(rec.height),
                           format=rec.format, key=rec.key), ensure_ascii=False).encode("utf-8")
  return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + rec.image


def decode_record(data: bytes) -> ImageTextRecord:
  """bytes -> ImageTextRecord; RecordError names what is wrong with a malformed record."""
  data = bytes(data)
  if len(data) < _PREFIX.size:
    raise RecordError(f"record of {len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix")
  magic, version, n = _PREFIX.unpack_from(data)
  if magic != MAGIC:
    raise RecordError(f"record starts with {magic!r}, expected {MAGIC!r}")
  if version != VERSION:
    raise RecordError(f"record version {version} is not the supported version {VERSION}")
  start = _PREFIX.size
  if start + n > len(data):
    raise RecordError(f"record header of {n} bytes runs past the record's {len(data)} bytes")
  try:
    header = json.loads(data[start:start + n].decode("utf-8"))
    return ImageTextRecord(caption=str(header["caption"]), width=int(header["width"]),
                           height=int(header["height"]), format=str(header["format"]),
                           image=data[start + n:], key=str(header.get("key", "")))
  except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise RecordError(f"record header is not valid: {e}") from e


def shard_name(i: int) -> str:
  return f"shard-{i:05d}{SHARD_SUFFIX}"


def read_index(directory: str) -> dict[str, Any]:
  """The index.json of a prepared directory, checked for format and shard files."""
  path = os.path.join(directory, INDEX_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: prepare the directory with "
                            "`python -m md_jax.data.prepare --output=...` first")
  with open(path) as f:
    index = json.load(f)
  if index.get("format") != INDEX_FORMAT:
    raise RecordError(f"{path} has format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
  for shard in index["shards"]:
    p = os.path.join(directory, shard["path"])
    if not os.path.exists(p):
      raise FileNotFoundError(f"shard {p} listed in {path} is missing")
  return index


class ImageTextSource:
  """grain RandomAccessDataSource of a prepared directory's serialized records (bytes).

  Record i is the i-th record of the shards in index order. Decoding is left to the
  pipeline so that a bad record costs the batch one row, not the whole read.
  """

  def __init__(self, directory: str):
    import grain

    self.directory = os.path.abspath(directory)
    self.index = read_index(self.directory)
    paths = [os.path.join(self.directory, s["path"]) for s in self.index["shards"]
             if int(s["num_records"]) > 0]
    self._len = int(sum(int(s["num_records"]) for s in self.index["shards"]))
    self._source = grain.sources.ArrayRecordDataSource(paths) if paths else None
    if self._source is not None and len(self._source) != self._len:
      raise RecordError(f"{self.directory}: shards hold {len(self._source)} records, "
                        f"{INDEX_NAME} says {self._len}")

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> bytes:
    if not 0 <= index < self._len:
      raise IndexError(f"record {index} out of range for {self._len} records in {self.directory}")
    return self._source[int(index)]

  def __getitems__(self, indices: Sequence[int]) -> list[bytes]:
    return [self[int(i)] for i in indices]

  def __repr__(self) -> str:
    return f"ImageTextSource({self.directory!r}, {self._len} records)"


class CaptionError(RecordError):
  """A record whose caption is missing, empty or not UTF-8."""


def _get_path(example: Any, path: str, name: str) -> Any:
  value = example
  for part in path.split("/"):
    if not isinstance(value, dict) or part not in value:
      have = sorted(value) if isinstance(value, dict) else type(value).__name__
      raise KeyError(f"TFDS dataset {name}: no feature {path!r} (at {part!r}; have {have})")
    value = value[part]
  return value


class TfdsImageTextSource:
  """grain source over a TFDS dataset in ArrayRecord format (``tfds.data_source``).

  Each element is served in this module's record format (so the records pipeline treats it
  like a prepared shard): the encoded image bytes of feature ``image_key`` (read without
  decoding) and one caption from ``caption_key`` ("a/b" for nested features, e.g.
  coco_captions' "captions/text"); when that holds several captions, one is picked per record
  index, fixed across epochs. width/height are 0 (unknown until decoded). The dataset must
  already be prepared in ``data_dir`` (nothing is downloaded), with file_format=array_record.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
               image_key: str = "image", caption_key: str = "captions/text"):
    import tensorflow_datasets as tfds

    self.name, self.split = name, split
    self._caption_key = caption_key
    self._image_key = image_key
    decoders: dict[str, Any] = tfds.decode.SkipDecoding()
    for part in reversed(image_key.split("/")):
      decoders = {part: decoders}
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                      decoders=decoders)
    except Exception as e:
      raise FileNotFoundError(
          f"TFDS dataset {name!r} split {split!r} is not prepared in ArrayRecord format under "
          f"data_dir={data_dir!r} ({type(e).__name__}: {e}); prepare it with "
          f"`tfds build {name} --file_format=array_record --data_dir=...`") from e

  def __len__(self) -> int:
    return len(self._source)

  def _caption(self, example: dict, index: int) -> str:
    value = _get_path(example, self._caption_key, self.name)
    if not isinstance(value, (str, bytes)):
      options = [v for v in list(value) if len(v)]
      if not options:
        raise CaptionError(f"{self.name}[{index}]: no caption in {self._caption_key!r}")
      import numpy as np

      value = options[int(np.random.default_rng([index, 0xCA9]).integers(len(options)))]
    if isinstance(value, bytes):
      try:
        value = value.decode("utf-8")
      except UnicodeDecodeError as e:
        raise CaptionError(f"{self.name}[{index}]: caption is not UTF-8") from e
    value = " ".join(str(value).split())
    if not value:
      raise CaptionError(f"{self.name}[{index}]: empty caption")
    return value

  def __getitem__(self, index: int) -> bytes:
    example = self._source[int(index)]
    image = _get_path(example, self._image_key, self.name)
    if not isinstance(image, bytes):
      image = bytes(getattr(image, "numpy", lambda: image)())
    return encode_record(ImageTextRecord(caption=self._caption(example, int(index)), width=0,
                                         height=0, format="", image=image,
                                         key=f"{self.name}/{self.split}/{index}"))

  def __repr__(self) -> str:
    return f"TfdsImageTextSource({self.name!r}, split={self.split!r}, {len(self)} records)"


def open_source(spec: str, tfds_data_dir: str | None = None, **tfds_kwargs):
  """A prepared directory, or "tfds:NAME[:SPLIT]" for a TFDS dataset (split default train)."""
  if spec.startswith("tfds:"):
    name, _, split = spec[len("tfds:"):].partition(":")
    return TfdsImageTextSource(name, split or "train", tfds_data_dir, **tfds_kwargs)
  return ImageTextSource(spec)
