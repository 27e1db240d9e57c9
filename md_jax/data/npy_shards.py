"""What the precomputed caches (text embeddings, VAE latents) share on disk: a directory built
in a temporary sibling and renamed into place once its manifest is written, and rows in
memory-mapped .npy shards of `rows_per_shard` rows each, listed in the manifest's `shards`."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Sequence

import numpy as np

MANIFEST = "manifest.json"


def partial_dir(directory: str) -> str:
  """A fresh temporary sibling of `directory` to write a cache into (see `publish`)."""
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  name = os.path.basename(os.path.abspath(directory))
  tmp = os.path.join(parent, f".{name}.partial-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  return tmp


def publish(tmp: str, directory: str, manifest: Mapping[str, Any]) -> None:
  """Writes the manifest into a finished `partial_dir` and renames it into place, so a crashed
  build never looks complete."""
  with open(os.path.join(tmp, MANIFEST), "w") as f:
    json.dump(dict(manifest), f, indent=1, default=str)
  if os.path.exists(directory):
    shutil.rmtree(directory)
  os.replace(tmp, directory)


def read_manifest(directory: str, *, fmt: str, what: str, tool: str, error: type,
                  files: Sequence[str] = ()) -> dict:
  """The manifest of a cache in `directory`, checked: it exists (else FileNotFoundError naming
  `tool`, the builder), has format `fmt` (else `error`), and its shards and the manifest keys
  in `files` name files that exist."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: no {what} in {directory} "
                            f"(build one with `python -m {tool}`)")
  with open(path) as f:
    m = json.load(f)
  if m.get("format") != fmt:
    raise error(f"{path}: format {m.get('format')!r}, expected {fmt!r}")
  for name in [*m["shards"], *(m[k] for k in files)]:
    if not os.path.isfile(os.path.join(directory, name)):
      raise FileNotFoundError(f"{os.path.join(directory, name)} (listed in {path}) not found")
  return m


class ShardedRows:
  """Reader base: lazily opened memory maps (dropped when pickled, so readers cross into grain
  worker processes) and row gathering across shards. Subclasses set `directory`, `manifest`
  and `rows_per_shard`."""

  directory: str
  manifest: dict
  rows_per_shard: int

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_maps"}

  def _map(self, name: str) -> np.ndarray:
    maps = self.__dict__.setdefault("_maps", {})
    if name not in maps:
      maps[name] = np.load(os.path.join(self.directory, name), mmap_mode="r")
    return maps[name]

  def _gather(self, idx: np.ndarray, row_shape) -> np.ndarray:
    """float32 (len(idx), *row_shape): rows `idx` (checked in range by the caller)."""
    out = np.empty((idx.size, *row_shape), np.float32)
    shard_of = idx // self.rows_per_shard
    for s in np.unique(shard_of):
      sel = shard_of == s
      out[sel] = self._map(self.manifest["shards"][int(s)])[idx[sel] - s * self.rows_per_shard]
    return out
