"""Writes the golden vectors that tests/test_fid.py compares our FID Inception against.

pytorch-fid (the FID reference implementation) needs torchvision, which does not import beside
the torch the test extra pins, so the reference runs once here, in its own environment:

  python3.11 -m venv /tmp/goldenvenv
  /tmp/goldenvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid==0.3.0 numpy
  /tmp/goldenvenv/bin/python tests/golden/make_inception_golden.py

It builds pytorch-fid's InceptionV3 (FID weights variant: output block 3, resize to 299,
normalise to [-1, 1]) without downloading anything: the weight loader is replaced by one that
returns ``synthetic_state_dict`` (md_jax/tools/convert_inception.py, numpy only) for the model's
own key layout, loaded strictly. It writes, into tests/data:

  inception_fid_layout.json   FID-file key -> shape of pytorch-fid's network (our converter's
                              expected layout is checked against it)
  inception_golden.npz        seed, uint8 input images (shapes data set, 64 px, so the 299 px
                              resize upsamples) and pytorch-fid's 2048-d pool features

The test regenerates the same weights from the seed (the 95 MB of weights are not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pytorch_fid import inception as pf  # noqa: E402

from md_jax.data import shapes  # noqa: E402  (numpy only)
from md_jax.tools.convert_inception import synthetic_state_dict  # noqa: E402  (numpy only)

SEED = 20151205
NUM_IMAGES = 4
IMAGE_SIZE = 64


def fid_layout() -> dict[str, list[int]]:
  """Key -> shape of pytorch-fid's FID Inception, built with its loader stubbed out."""
  real_load = torch.nn.Module.load_state_dict
  real_url = pf.load_state_dict_from_url
  torch.nn.Module.load_state_dict = lambda self, *a, **k: None
  pf.load_state_dict_from_url = lambda *a, **k: {}
  try:
    net = pf.fid_inception_v3()
  finally:
    torch.nn.Module.load_state_dict = real_load
    pf.load_state_dict_from_url = real_url
  return {k: list(v.shape) for k, v in net.state_dict().items()
          if not k.endswith("num_batches_tracked")}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out_dir", default=os.path.join(REPO, "tests", "data"))
  args = parser.parse_args(argv)
  torch.manual_seed(0)
  layout = fid_layout()
  sd = {k: torch.from_numpy(v) for k, v in synthetic_state_dict(layout, SEED).items()}
  real_url = pf.load_state_dict_from_url
  pf.load_state_dict_from_url = lambda *a, **k: sd  # fid_inception_v3 loads it strictly
  try:
    model = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  finally:
    pf.load_state_dict_from_url = real_url
  images = np.stack([shapes.make_record("eval", i, IMAGE_SIZE, seed=0)["image"]
                     for i in range(NUM_IMAGES)]).astype(np.uint8)
  # Contiguous NCHW in [0, 1], as ToTensor gives pytorch-fid.
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float() / 255.0
  with torch.inference_mode():
    feats = model(x)[0][:, :, 0, 0].numpy().astype(np.float32)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "inception_fid_layout.json"), "w") as f:
    json.dump(layout, f, indent=0, sort_keys=True)
  np.savez_compressed(os.path.join(args.out_dir, "inception_golden.npz"), seed=SEED,
                      images=images, features=feats,
                      torch_version=torch.__version__)
  print(f"{len(layout)} tensors; features {feats.shape}, mean {feats.mean():.4f}, "
        f"std {feats.std():.4f}, max {feats.max():.4f}")


if __name__ == "__main__":
  main()
