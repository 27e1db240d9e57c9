"""Converts local LPIPS(VGG16) weights to the .npz ``md_jax.models.lpips`` reads.

``python -m md_jax.tools.convert_lpips --vgg16=vgg16-397923af.pth --heads=vgg.pth --out=lpips.npz``

``--vgg16``: a torchvision VGG16 state dict the user supplies (keys ``features.N.weight/bias``);
``--heads``: LPIPS' linear heads as the ``lpips`` package ships them (``lpips/weights/v0.1/vgg.pth``,
keys ``linK.model.1.weight``, shape (1, C, 1, 1)). Both are read with ``torch.load`` (weights
only); conv kernels go from PyTorch's OIHW to our HWIO. Nothing is downloaded.
"""

from __future__ import annotations

import argparse

import numpy as np

from md_jax.models.lpips import VGG16_STAGES, VGG16_TORCH_INDEX


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
  out = {}
  cin = 3
  for s, (widths, idx) in enumerate(zip(VGG16_STAGES, VGG16_TORCH_INDEX)):
    for i, (c, t) in enumerate(zip(widths, idx)):
      w = _take(vgg, f"features.{t}.weight", vgg16_path, (c, cin, 3, 3))
      out[f"vgg/stages/{s}/{i}/kernel"] = np.transpose(w, (2, 3, 1, 0))
      out[f"vgg/stages/{s}/{i}/bias"] = _take(vgg, f"features.{t}.bias", vgg16_path, (c,))
      cin = c
  for k, widths in enumerate(VGG16_STAGES):
    w = _take(heads, f"lin{k}.model.1.weight", heads_path, (1, widths[-1], 1, 1))
    out[f"heads/{k}/kernel"] = np.transpose(w, (2, 3, 1, 0))
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
