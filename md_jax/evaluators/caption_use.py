"""Does a shapes diffusion model use each part of its caption?

Sample-based scores (the judge) say whether the images are right, not why they are wrong. This
evaluator asks the denoiser directly. For records of the shapes evaluation split it computes the
training loss's error (MSE against the prediction-type target) at fixed noise levels with the
record's own caption, and again with the same latent, noise and timestep but one attribute of the
caption changed:

  colour    the colour word replaced by the next palette colour's
  shape     the shape word replaced by the next shape's (circle -> square -> triangle -> cross)
  position  the position mirrored (left <-> right, top/upper <-> bottom/lower); records in the
            centre cell have nothing to mirror and are left out of this one
  empty     the empty caption (what classifier-free guidance contrasts with)

``caption_use/<attribute>_gap/t<T>`` is the mean increase of the error when the caption lies
about that attribute: about 0 at every T means the model ignores the attribute (its samples
cannot follow it, whatever the guidance scale), larger means the model relies on it at that noise
level. ``caption_use/mse/t<T>`` is the error with the true captions.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping, Sequence

import numpy as np

from md_jax.data import shapes

ATTRIBUTES = ("colour", "shape", "position", "empty")
DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)

_MIRROR = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "upper": "lower",
           "lower": "upper"}


def _replace_word(caption: str, words: Sequence[str], new: str) -> str | None:
  """``caption`` with the first of ``words`` (longest first) replaced by ``new``, fixing a
  preceding indefinite article; None if none of them occurs."""
  for word in sorted(words, key=len, reverse=True):
    m = re.search(r"(?:\b(an?) )?\b" + re.escape(word) + r"\b", caption)
    if m:
      article = m.group(1)
      if article:
        article = "an" if new[0] in "aeiou" else "a"
        return caption[:m.start()] + f"{article} {new}" + caption[m.end():]
      return caption[:m.start()] + new + caption[m.end():]
  return None


def swapped_captions(caption: str, attrs: Mapping) -> dict[str, str | None]:
  """The caption with each attribute changed (see the module doc); None where it cannot be."""
  names = shapes.attrs_to_names(attrs)
  out: dict[str, str | None] = {}
  colour = names["colour"]
  other = shapes.COLOURS[(shapes.COLOURS.index(colour) + 1) % len(shapes.COLOURS)]
  out["colour"] = _replace_word(caption, shapes.COLOUR_WORDS[colour], shapes.COLOUR_WORDS[other][0])
  shape = names["shape"]
  other = shapes.SHAPES[(shapes.SHAPES.index(shape) + 1) % len(shapes.SHAPES)]
  out["shape"] = _replace_word(caption, shapes.SHAPE_WORDS[shape], shapes.SHAPE_WORDS[other][0])
  mirrored = re.sub(r"\b(" + "|".join(_MIRROR) + r")\b", lambda m: _MIRROR[m.group(1)], caption)
  out["position"] = mirrored if mirrored != caption else None
  out["empty"] = ""
  return out


def run(ld, unet_params, frozen, mesh, *, image_size: int, num_records: int = 128,
        timesteps: Sequence[int] = DEFAULT_TIMESTEPS, seed: int = 0, batch_size: int = 64,
        data_seed: int = 0) -> Iterator[tuple[str, float]]:
  """Yields (name, value): ``caption_use/mse/t<T>`` and ``caption_use/<attr>_gap/t<T>``.

  ``ld`` is the run's LatentDiffusion (``train.diffusion.load_for_sampling``). Latent draws
  depend on (seed, batch index) and noise on (seed, batch index, T) only, so values do not
  depend on the device count.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from md_jax.diffusion import schedule as sch  # pylint: disable=g-import-not-at-top
  from md_jax.evaluators import samples  # pylint: disable=g-import-not-at-top
  from md_jax.train import sharding as shd  # pylint: disable=g-import-not-at-top

  div = shd.batch_divisor(mesh)
  batch_size = max(div, (min(batch_size, num_records) // div) * div)
  recs = [shapes.make_record("eval", i, image_size, seed=data_seed) for i in range(num_records)]
  captions = {"true": [r["caption"] for r in recs]}
  swapped = [swapped_captions(r["caption"], r) for r in recs]
  for a in ATTRIBUTES:
    captions[a] = [s[a] for s in swapped]
  sched = ld.schedule

  def errors(params, z, context, t, key):
    tt = jnp.full((z.shape[0],), t, jnp.int32)
    noise = jax.random.normal(key, z.shape, jnp.float32)
    x_t = sch.q_sample(sched, z, tt, noise)
    pred = ld.unet_apply(params)(x_t, tt.astype(jnp.float32), context)
    err = jnp.square(pred.astype(jnp.float32) - sch.target(sched, z, noise, tt))
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))

  # Each batch's latents and each caption variant's embeddings are computed once and shared by
  # every noise level (the encoder costs more than the UNet's forward pass).
  latents = jax.jit(ld.encode_images)
  embed = jax.jit(ld.encode_text)
  fn = jax.jit(errors)
  img_sharding = shd.batch_sharding(mesh, 4)
  ids_sharding = shd.batch_sharding(mesh, 2)
  per = {k: {t: [] for t in timesteps} for k in captions}
  for b, start in enumerate(range(0, num_records, batch_size)):
    idx = list(range(start, min(start + batch_size, num_records)))
    pad = idx + [idx[-1]] * (batch_size - len(idx))
    images = np.stack([recs[i]["image"] for i in pad]).astype(np.float32) / 127.5 - 1.0
    batch_key = jax.random.fold_in(jax.random.key(seed), b)
    z = latents(frozen, jax.device_put(images, img_sharding), batch_key)
    for name, caps in captions.items():
      ids = jax.device_put(ld.tokenize([caps[i] or "" for i in pad]), ids_sharding)
      context = embed(frozen, ids)
      for t in timesteps:
        key = jax.random.fold_in(batch_key, 1 + int(t))
        e = samples.gather_to_host(fn(unet_params, z, context, int(t), key))
        per[name][t].extend(float(v) for v in e[:len(idx)])
  for t in timesteps:
    true = np.asarray(per["true"][t])
    yield f"caption_use/mse/t{t}", float(true.mean())
    for a in ATTRIBUTES:
      usable = np.asarray([c is not None for c in captions[a]])
      lied = np.asarray(per[a][t])
      yield f"caption_use/{a}_gap/t{t}", float((lied - true)[usable].mean())
