"""CLIP score (paper sec. 5.1, Table 2): the cosine similarity between a generated image's CLIP
embedding and its prompt's, averaged over the samples.

The paper reports the raw cosine (0.325 for MobileDiffusion with OpenCLIP ViT-g/14), not the
100 x max(cos, 0) some papers use; ``run`` yields the raw mean. Any Hugging Face CLIPModel
directory works (config.json with text_config and vision_config, safetensors, tokenizer files,
optionally preprocessor_config.json); ViT-g/14 and ViT-L/14 load the same way, offline.

Images are preprocessed as CLIP's image processor does: resize so the shorter side is
``shortest_edge`` (bicubic, PIL, on uint8), centre crop to ``crop_size``, scale to [0, 1],
normalise with CLIP's mean/std (values from preprocessor_config.json when present).

  scorer = CLIPScorer("/ckpt/CLIP-ViT-g-14")
  cos = scorer.scores(uint8_images, prompts)            # (N,) cosines
  dict(run(scorer, uint8_images, prompts))              # {'clip_score': ..., ...}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from md_jax.models import hf_clip

# OpenAI CLIP's normalisation (also OpenCLIP's for the LAION ViT-g/14).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclasses.dataclass(frozen=True)
class Preprocess:
  shortest_edge: int = 224
  crop_size: int = 224
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD


def read_preprocess(directory: str, image_size: int) -> Preprocess:
  """The image processor's settings from ``directory`` (defaults: CLIP's at ``image_size``)."""
  path = os.path.join(directory, PREPROCESSOR_FILE)
  if not os.path.isfile(path):
    return Preprocess(image_size, image_size)
  with open(path) as f:
    raw = json.load(f)

  def side(value, key):
    if isinstance(value, dict):
      value = value.get(key, value.get("height"))
    if value is None:
      return image_size
    return int(value)

  pre = Preprocess(side(raw.get("size"), "shortest_edge"), side(raw.get("crop_size"), "height"),
                   tuple(raw.get("image_mean", CLIP_MEAN)), tuple(raw.get("image_std", CLIP_STD)))
  if pre.crop_size != image_size:
    raise ValueError(f"{path}: crop_size {pre.crop_size} but the vision tower takes "
                     f"{image_size} px images")
  return pre


def preprocess(images, pre: Preprocess) -> np.ndarray:
  """uint8 (N, H, W, 3) (or a list of differently sized ones) -> float32 (N, S, S, 3)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = []
  mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
  for img in images:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
      raise ValueError(f"CLIP preprocessing takes uint8 HxWx3 images, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = pre.shortest_edge, int(pre.shortest_edge * long / short)
    new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
    if (new_h, new_w) != (h, w):
      img = np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.Resampling.BICUBIC))
    c = pre.crop_size
    top, left = (new_h - c) // 2, (new_w - c) // 2
    if top < 0 or left < 0:
      raise ValueError(f"image of {new_h}x{new_w} after resizing is smaller than the crop {c}")
    img = img[top:top + c, left:left + c]
    out.append(((img.astype(np.float32) * np.float32(1 / 255)) - mean) / std)
  return np.stack(out).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _image_features(graphdef, state, pixels):
  return nnx.merge(graphdef, state).get_image_features(pixels)


@functools.partial(jax.jit, static_argnums=0)
def _text_features(graphdef, state, ids):
  return nnx.merge(graphdef, state).get_text_features(ids)


class CLIPScorer:
  """A CLIPModel loaded from a Hugging Face directory, with jitted, device-sharded forwards over
  fixed-size batches (the last one padded, so one compile per tower)."""

  def __init__(self, directory: str, *, batch_size: int = 32, mesh=None, dtype=jnp.float32):
    from md_jax.train import sharding as shd  # pylint: disable=g-import-not-at-top
    model = hf_clip.load_clip_model(directory, dtype=dtype)
    self.tokenizer = hf_clip.load_hf_tokenizer(directory)
    self.max_length = int(model.text_model.max_positions)
    self.preprocess = read_preprocess(directory, model.vision_model.image_size)
    if mesh is None:
      mesh = shd.make_mesh((-1, 1, 1), ("data", "fsdp", "tensor"))
    div = shd.batch_divisor(mesh)
    self.batch_size = max(div, -(-int(batch_size) // div) * div)
    self.graphdef, state = nnx.split(model)
    self.state = jax.device_put(state, shd.replicated(mesh))
    self._mesh = mesh

  def _batched(self, fn, rows: np.ndarray) -> np.ndarray:
    from md_jax.evaluators import samples  # pylint: disable=g-import-not-at-top
    from md_jax.train import sharding as shd  # pylint: disable=g-import-not-at-top
    out = []
    sharding = shd.batch_sharding(self._mesh, rows.ndim)
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
      feats = fn(self.graphdef, self.state, jax.device_put(chunk, sharding))
      out.append(samples.gather_to_host(feats)[:n])
    return np.concatenate(out, axis=0)

  def image_embeddings(self, images) -> np.ndarray:
    """(N, projection_dim) unnormalised image embeddings of uint8 images."""
    return self._batched(_image_features, preprocess(images, self.preprocess))

  def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
    ids = hf_clip.tokenize(self.tokenizer, list(prompts), self.max_length)
    return self._batched(_text_features, ids)

  def scores(self, images, prompts: Sequence[str]) -> np.ndarray:
    """(N,) raw cosine similarity of each image with its prompt."""
    if len(images) != len(prompts):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return cosine(self.image_embeddings(images), self.text_embeddings(prompts))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def run(scorer: CLIPScorer, images, prompts: Sequence[str]) -> Iterator[tuple[str, float]]:
  """Yields ('clip_score', mean raw cosine) and its spread over the samples."""
  s = scorer.scores(images, prompts)
  yield "clip_score", float(np.mean(s))
  yield "clip_score_std", float(np.std(s))
  yield "clip_score_count", float(len(s))
