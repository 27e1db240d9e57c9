"""Converts local LPIPS(VGG16) weights to the .npz ``md_jax.models.lpips`` reads.

``python -m md_jax.tools.convert_lpips --vgg16=vgg16-397923af.pth --heads=vgg.pth --out=lpips.npz``

``--vgg16``: a torchvision VGG16 state dict the user supplies (keys ``features.N.weight/bias``);
``--heads``: LPIPS' linear heads as the ``lpips`` package ships them (``lpips/weights/v0.1/vgg.pth``,
keys ``linK.model.1.weight``, shape (1, C, 1, 1)). Both are read with ``torch.load`` (weights
only); conv kernels go from PyTorch's OIHW to our HWIO. Nothing is downloaded.

This module imports only numpy at load time: ``synthetic_vgg16_state_dict`` is shared with the
golden-vector script (tests/golden/make_lpips_golden.py), which runs in a venv without jax.
"""

from __future__ import annotations

import argparse
import zlib

import numpy as np


def _vgg16_layout():
  from md_jax.models.lpips import VGG16_STAGES, VGG16_TORCH_INDEX  # pylint: disable=g-import-not-at-top
  return VGG16_STAGES, VGG16_TORCH_INDEX


def torch_layout() -> dict[str, tuple[int, ...]]:
  """VGG16-file key -> PyTorch shape of every trunk tensor LPIPS needs (convs up to relu5_3)."""
  stages, index = _vgg16_layout()
  out, cin = {}, 3
  for widths, idx in zip(stages, index):
    for c, t in zip(widths, idx):
      out[f"features.{t}.weight"] = (c, cin, 3, 3)
      out[f"features.{t}.bias"] = (c,)
      cin = c
  return out


def heads_layout() -> dict[str, tuple[int, ...]]:
  """Heads-file key -> shape, as the ``lpips`` package ships ``weights/v0.1/vgg.pth``."""
  stages, _ = _vgg16_layout()
  return {f"lin{k}.model.1.weight": (1, widths[-1], 1, 1) for k, widths in enumerate(stages)}


def synthetic_vgg16_state_dict(seed: int = 0, layout: dict | None = None) -> dict[str, np.ndarray]:
  """Deterministic random VGG16 trunk weights in torchvision's key layout (for parity tests).

  ``layout`` (key -> shape) defaults to ``torch_layout()``. Each tensor is drawn from its own
  generator seeded by (seed, crc32(key)), so the result does not depend on the order of
  ``layout``. He-normal kernels and small biases keep activations O(1) through the 13 convs.
  """
  layout = torch_layout() if layout is None else layout
  out = {}
  for key, shape in layout.items():
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
    if key.endswith(".weight"):
      v = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))
    else:
      v = rng.normal(0.0, 0.05, shape)
    out[key] = v.astype(np.float32)
  return out


def _load_pth(path: str, what: str) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{what} weight file {path!r} not found (nothing is downloaded: "
                            "supply the file)") from e
  if isinstance(sd, dict) and "state_dict" in sd:
    sd = sd["state_dict"]
  return {k: v.detach().float().numpy() for k, v in sd.items()}


def _take(sd: dict, key: str, path: str, shape=None) -> np.ndarray:
  if key not in sd:
    raise KeyError(f"{path}: no tensor {key!r} (has {sorted(sd)[:6]}...)")
  v = sd[key]
  if shape is not None and tuple(v.shape) != tuple(shape):
    raise ValueError(f"{path}: {key!r} has shape {tuple(v.shape)}, expected {tuple(shape)}")
  return v


def convert(vgg16_path: str, heads_path: str) -> dict[str, np.ndarray]:
  vgg = _load_pth(vgg16_path, "VGG16")
  heads = _load_pth(heads_path, "LPIPS heads")
  _, index = _vgg16_layout()
  trunk = torch_layout()
  out = {}
  for s, idx in enumerate(index):
    for i, t in enumerate(idx):
      w = _take(vgg, f"features.{t}.weight", vgg16_path, trunk[f"features.{t}.weight"])
      out[f"vgg/stages/{s}/{i}/kernel"] = np.transpose(w, (2, 3, 1, 0))
      out[f"vgg/stages/{s}/{i}/bias"] = _take(vgg, f"features.{t}.bias", vgg16_path,
                                               trunk[f"features.{t}.bias"])
  for k, (key, shape) in enumerate(heads_layout().items()):
    out[f"heads/{k}/kernel"] = np.transpose(_take(heads, key, heads_path, shape), (2, 3, 1, 0))
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--vgg16", required=True)
  parser.add_argument("--heads", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  arrays = convert(args.vgg16, args.heads)
  np.savez(args.out, **arrays)
  print(f"wrote {len(arrays)} tensors to {args.out}")


if __name__ == "__main__":
  main()
