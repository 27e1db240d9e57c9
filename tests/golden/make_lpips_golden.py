"""Writes the golden vectors that tests/test_lpips.py compares our LPIPS(VGG16) against.

The ``lpips`` package (the LPIPS reference implementation) needs torchvision, which does not
import beside the torch the test extra pins, so the reference runs once here, in its own
environment (the ``golden`` extra's pins):

  python3.11 -m venv /tmp/goldenvenv
  /tmp/goldenvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 lpips==0.1.4 numpy pillow
  /tmp/goldenvenv/bin/python tests/golden/make_lpips_golden.py

It builds ``lpips.LPIPS(net='vgg')`` without downloading anything: ``pnet_rand=True`` makes
torchvision build an untrained VGG16, whose trunk tensors are then replaced, strictly, by
``synthetic_vgg16_state_dict`` (md_jax/tools/convert_lpips.py, numpy only); the linear heads are
the ones the package ships inside itself (``lpips/weights/v0.1/vgg.pth``), loaded by the package.
It evaluates the package's distance on image pairs of the shapes data set at 64 and 104 px (104
gives an odd feature map, 13 -> 6, at the fourth pool): different scenes, and a scene against
JPEG-compressed, blurred, shifted, noisy and re-toned copies of itself (PIL), plus one identical
pair. It writes tests/data/lpips_golden.npz:

  seed                      the trunk's seed
  trunk_keys, trunk_shapes  the package trunk's tensors in torchvision's ``features.N`` naming
                            (our converter's expected layout is checked against it)
  head:linK.model.1.weight  the package's heads, exactly as shipped (the test needs no lpips)
  x64, y64, x104, y104      uint8 NHWC image pairs; the model input is ``u8 / 127.5 - 1``
  d64, d104                 the package's per-pair distances (float32)

The test regenerates the same trunk from the seed (the 59 MB of weights are not committed).
Rerun only when the pairs, the seed or the synthetic weights change.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import lpips  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageEnhance, ImageFilter  # noqa: E402

from md_jax.data import shapes  # noqa: E402  (numpy only)
from md_jax.tools.convert_lpips import synthetic_vgg16_state_dict  # noqa: E402  (numpy only)

SEED = 20180111


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=quality)
  return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _blur(img: np.ndarray, radius: float) -> np.ndarray:
  return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


def _tone(img: np.ndarray) -> np.ndarray:
  im = ImageEnhance.Brightness(Image.fromarray(img)).enhance(1.15)
  return np.asarray(ImageEnhance.Contrast(im).enhance(0.8))


def _noise(img: np.ndarray, std: float, seed: int) -> np.ndarray:
  n = np.random.default_rng(seed).normal(0.0, std, img.shape)
  return np.clip(np.rint(img.astype(np.float64) + n), 0, 255).astype(np.uint8)


def image_pairs(size: int, first: int) -> tuple[np.ndarray, np.ndarray]:
  """(x, y) uint8 NHWC: scene-vs-scene pairs and scene-vs-distorted-copy pairs."""
  img = [shapes.make_record("eval", first + i, size, seed=0)["image"].astype(np.uint8)
         for i in range(4)]
  pairs = [
      (img[0], img[1]),
      (img[2], img[3]),
      (img[0], _jpeg(img[0], 25)),
      (img[1], _blur(img[1], 1.0)),
      (img[2], np.roll(img[2], (2, -3), axis=(0, 1))),
      (img[3], _noise(img[3], 12.0, size)),
      (img[1], _tone(img[1])),
  ]
  if size == 64:
    pairs.append((img[3], img[3]))  # identical: the distance is exactly 0 on both sides
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def build_model() -> tuple[torch.nn.Module, dict, dict]:
  """The package's LPIPS(VGG16) with the synthetic trunk, the trunk layout (features.N) and the
  shipped heads."""
  model = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
  # lpips loads its heads with strict=False; check they really are the shipped file's.
  shipped = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth"),
                       map_location="cpu", weights_only=True)
  assert sorted(shipped) == [f"lin{k}.model.1.weight" for k in range(5)], sorted(shipped)
  own = model.state_dict()
  for k, v in shipped.items():
    assert torch.equal(own[k], v), k
  # model.net is lpips' vgg16: slices holding torchvision's features[N] under their index N.
  trunk = model.net.state_dict()
  to_features = {k: "features." + k.split(".", 1)[1] for k in trunk}
  layout = {to_features[k]: tuple(v.shape) for k, v in trunk.items()}
  sd = synthetic_vgg16_state_dict(SEED, layout)
  model.net.load_state_dict({k: torch.from_numpy(sd[f]) for k, f in to_features.items()},
                            strict=True)
  return model.eval(), layout, shipped


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out_dir", default=os.path.join(REPO, "tests", "data"))
  args = parser.parse_args(argv)
  torch.manual_seed(0)
  model, layout, shipped = build_model()
  arrays = dict(seed=np.int64(SEED), trunk_keys=np.array(sorted(layout)),
                trunk_shapes=np.array([str(list(layout[k])) for k in sorted(layout)]),
                torch_version=torch.__version__,
                lpips_version=importlib.metadata.version("lpips"))
  for k, v in shipped.items():
    arrays[f"head:{k}"] = v.numpy().astype(np.float32)
  for size, first in ((64, 0), (104, 8)):
    x, y = image_pairs(size, first)
    xt, yt = (torch.from_numpy(a.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
              for a in (x, y))
    with torch.inference_mode():
      d = model(xt, yt).reshape(-1).numpy().astype(np.float32)
    arrays[f"x{size}"], arrays[f"y{size}"], arrays[f"d{size}"] = x, y, d
    print(f"{size} px, {len(d)} pairs: distances {np.array2string(d, precision=4)}")
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir, "lpips_golden.npz")
  np.savez_compressed(path, **arrays)
  print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")


if __name__ == "__main__":
  main()
