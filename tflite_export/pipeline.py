"""Reference run of a bundle in LiteRT, the steps an Android app performs:
`python -m tflite_export.pipeline --bundle DIR [--precision fp16] [--seed 0] "a prompt" out.png`

tokenise (the bundle's CLIP tokenizer, padded to max_length) -> text_encoder -> one
unet_onestep call on numpy-seeded N(0, I) noise -> decoder -> PNG. No JAX involved.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import numpy as np

from tflite_export import check as check_lib
from tflite_export.export import pipeline_noise

# When a component lacks the asked precision, the nearest available one is used.
_FALLBACK = {"fp32": ("fp32", "fp16", "dr8", "int8"), "fp16": ("fp16", "fp32", "dr8", "int8"),
             "dr8": ("dr8", "int8", "fp16", "fp32"), "int8": ("int8", "dr8", "fp16", "fp32")}


class BundlePipeline:

  def __init__(self, bundle: str, precision: str = "fp16", num_threads: int = 2):
    self.bundle = bundle
    with open(os.path.join(bundle, "manifest.json")) as f:
      self.manifest = json.load(f)
    from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
    tok = self.manifest["tokenizer"]
    self.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(bundle, tok["dir"]),
                                                   local_files_only=True)
    self.max_length = int(tok["max_length"])
    self.files = {}
    self.runners = {}
    for name in ("text_encoder", "unet_onestep", "decoder"):
      comp = self.manifest["components"].get(name)
      if comp is None:
        raise FileNotFoundError(f"{bundle} has no '{name}' component")
      p = next((p for p in _FALLBACK[precision] if p in comp["files"]), None)
      self.files[name] = p
      interp = check_lib.make_interpreter(os.path.join(bundle, comp["files"][p]["file"]),
                                          num_threads=num_threads)
      self.runners[name] = interp
    self.latent_shape = tuple(self.manifest["components"]["unet_onestep"]["inputs"][0]["shape"][1:])

  def tokenize(self, prompt: str) -> np.ndarray:
    enc = self.tokenizer([prompt], padding="max_length", truncation=True,
                         max_length=self.max_length, return_attention_mask=False)
    return np.asarray(enc["input_ids"], np.int32).reshape(1, self.max_length)

  def __call__(self, prompt: str, seed: int = 0, noise: np.ndarray | None = None) -> dict:
    ids = self.tokenize(prompt)
    hidden = check_lib.run(self.runners["text_encoder"], {"input_ids": ids})["hidden"]
    noise = pipeline_noise(seed, self.latent_shape) if noise is None else noise
    x0 = check_lib.run(self.runners["unet_onestep"], {"noise": noise, "context": hidden})["x0"]
    image = check_lib.run(self.runners["decoder"], {"latent": x0})["image"]
    return dict(input_ids=ids, hidden=hidden, noise=noise, x0=x0, image=image,
                image_u8=check_lib.to_uint8(image))


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bundle", required=True)
  parser.add_argument("--precision", default="fp16", choices=sorted(_FALLBACK))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("prompt")
  parser.add_argument("out")
  args = parser.parse_args(argv)
  pipe = BundlePipeline(args.bundle, args.precision)
  out = pipe(args.prompt, args.seed)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  Image.fromarray(out["image_u8"][0]).save(args.out)
  print(f"wrote {args.out} ({', '.join(f'{k}={v}' for k, v in pipe.files.items())})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
