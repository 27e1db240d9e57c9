"""Pretrains the shapes text tower contrastively (CLIP) and writes it as a CLIP directory.

``python -m md_jax.tools.train_shapes_clip --out=md_jax/assets/shapes_clip [--steps=N]
[--batch_size=256] [--hard_negatives=K] [--seed=0]``

The text tower is the one the shapes diffusion stages use (sizes from ``configs/shapes.py``),
trained against `shapes_clip.ConvImageTower` with CLIP's symmetric cross-entropy over in-batch
pairs and a learned temperature, on a pool of training-split records (captions in their varied
wordings; the held-out colour/shape pairs never appear). ``--hard_negatives=K`` builds each batch
from groups of K records that share colour and position and differ in shape, so that in-batch
negatives ask for shape, the attribute an image tower learns last.

Held-out retrieval (caption -> image among the eval split's N images, seen and held-out pairs
apart, per attribute, and which values the errors confuse) is printed and written to
``OUT/training.json``. ``OUT`` is a Hugging Face CLIP directory (config.json, model.safetensors
with ``text_model.*``, the projections and the image tower, tokenizer files): the diffusion
stages freeze its text tower through ``config.text.hf_dir``. Deterministic for a seed on one
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ATTRS = ("colour", "shape", "position")


def text_config(config_spec: str = "configs/shapes.py:lowres"):
  """The shapes run's text tower config, with the tokenizer's real end-of-text id."""
  from md_jax import config_loading  # pylint: disable=g-import-not-at-top
  from md_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from md_jax.models import text_encoder  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config(config_spec)
  cfg = text_encoder.default_config()
  for key in cfg:
    cfg[key] = config.text[key]
  cfg.eos_token_id = int(pipeline.load_tokenizer(None).eos_token_id)
  return cfg, int(config.data.max_length)


def render_pool(split: str, num: int, size: int, seed: int, max_length: int, progress=True):
  """Images (uint8), token ids and labels of records [0, num) of a split."""
  from md_jax.data import pipeline, shapes  # pylint: disable=g-import-not-at-top
  images = np.empty((num, size, size, 3), np.uint8)
  labels = np.empty((num, 3), np.int32)
  held = np.empty((num,), bool)
  captions = []
  t0 = time.time()
  for i in range(num):
    r = shapes.make_record(split, i, size, seed=seed)
    images[i] = r["image"]
    labels[i] = [r[k] for k in ATTRS]
    held[i] = r["held_out"]
    captions.append(r["caption"])
    if progress and (i + 1) % 8192 == 0:
      print(f"  rendered {i + 1}/{num} {split} records ({time.time() - t0:.0f} s)", flush=True)
  ids = pipeline.tokenize(pipeline.load_tokenizer(None), captions, max_length)
  return dict(images=images, ids=np.asarray(ids, np.int32), labels=labels, held_out=held,
              captions=captions)


class BatchSampler:
  """Seeded batches of pool indices: uniform, or groups of K sharing colour and position."""

  def __init__(self, labels: np.ndarray, batch_size: int, hard_negatives: int, seed: int):
    self.labels, self.batch_size, self.k = labels, int(batch_size), int(hard_negatives)
    self.rng = np.random.default_rng([seed, 0xC11B])
    self.groups: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    if self.k > 1:
      for (c, s, p) in {tuple(x) for x in labels.tolist()}:
        rows = np.flatnonzero((labels[:, 0] == c) & (labels[:, 1] == s) & (labels[:, 2] == p))
        self.groups.setdefault((c, p), {})[s] = rows

  def __call__(self) -> np.ndarray:
    if self.k <= 1:
      return self.rng.choice(len(self.labels), self.batch_size, replace=False)
    return np.concatenate(self.sample_groups())[:self.batch_size]

  def sample_groups(self) -> list[np.ndarray]:
    """Groups of up to K indices (fewer where a colour has fewer training shapes) covering at
    least a batch."""
    n, out, total = len(self.labels), [], 0
    while total < self.batch_size:
      c, s, p = self.labels[int(self.rng.integers(n))]
      by_shape = self.groups[(int(c), int(p))]
      others = [x for x in by_shape if x != s]
      picked = [int(s)] + [int(x) for x in self.rng.permutation(others)[:self.k - 1]]
      out.append(np.asarray([int(self.rng.choice(by_shape[x])) for x in picked]))
      total += len(picked)
    return out


def retrieval_report(text_emb: np.ndarray, image_emb: np.ndarray, labels: np.ndarray,
                     held_out: np.ndarray) -> dict:
  """Caption -> image retrieval among all the images: per attribute, the share of captions
  whose best image has the caption's value, seen and held-out pairs apart, with chance (the
  share of images with that value) and the commonest confusions."""
  from md_jax.data import shapes  # pylint: disable=g-import-not-at-top
  names = dict(colour=shapes.COLOURS, shape=shapes.SHAPES, position=shapes.POSITIONS)
  best = np.argmax(text_emb @ image_emb.T, axis=1)
  got = labels[best]
  hit = got == labels
  report = dict(num_images=int(len(labels)))
  for part, rows in (("seen", ~held_out), ("held_out", held_out), ("all", np.ones_like(held_out))):
    if not rows.any():
      continue
    report[part] = dict(
        {a: float(hit[rows, k].mean()) for k, a in enumerate(ATTRS)},
        all_three=float(hit[rows].all(axis=1).mean()), num_captions=int(rows.sum()))
  confusions = {}
  for k, a in enumerate(ATTRS):
    wrong = ~hit[:, k]
    pairs, counts = np.unique(np.stack([labels[wrong, k], got[wrong, k]], 1), axis=0,
                              return_counts=True) if wrong.any() else (np.zeros((0, 2)), [])
    order = np.argsort(-np.asarray(counts))[:3]
    confusions[a] = [f"{names[a][int(pairs[i][0])]} -> {names[a][int(pairs[i][1])]}: "
                     f"{int(counts[i])}" for i in order]
  report["confusions"] = confusions
  report["chance"] = {a: float(np.mean(labels[:, k][None, :] == labels[:, k][:, None]))
                      for k, a in enumerate(ATTRS)}
  return report


def embed(model, pool: dict, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, ids, x: (nnx.merge(graphdef, s).text_embeds(ids),
                                   nnx.merge(graphdef, s).image_embeds(x)))
  texts, images = [], []
  for i in range(0, len(pool["ids"]), batch_size):
    t, v = fwd(state, pool["ids"][i:i + batch_size],
               pool["images"][i:i + batch_size].astype(np.float32) / 255.0)
    texts.append(np.asarray(t))
    images.append(np.asarray(v))
  return np.concatenate(texts), np.concatenate(images)


def train(steps: int, batch_size: int = 256, num_records: int = 32768, seed: int = 0,
          lr: float = 1e-3, hard_negatives: int = 4, image_size: int = 32,
          eval_records: int = 864, log_every: int = 50,
          config_spec: str = "configs/shapes.py:lowres", channels: tuple[int, ...] | None = None):
  """Returns (model, text config, image-tower config, report)."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from md_jax.models import shapes_clip  # pylint: disable=g-import-not-at-top
  from md_jax.models.layers import KeyStream  # pylint: disable=g-import-not-at-top

  tcfg, max_length = text_config(config_spec)
  vcfg = shapes_clip.default_config()
  vcfg.image_size = image_size
  if channels:
    vcfg.channels = tuple(channels)
  t0 = time.time()
  pool = render_pool("train", num_records, image_size, 0, max_length)
  evalset = render_pool("eval", eval_records, image_size, 0, max_length, progress=False)
  print(f"rendered {num_records} train + {eval_records} eval records ({time.time() - t0:.0f} s)",
        flush=True)

  build = lambda: shapes_clip.ShapesCLIP(tcfg, vcfg, rngs=KeyStream(seed))
  with nnx.use_eager_sharding(False):
    graphdef, _ = nnx.split(nnx.eval_shape(build))
    params = jax.jit(lambda: nnx.split(build())[1])()
  warmup = max(1, min(100, steps // 10))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
  tx = optax.adamw(schedule, b2=0.98, weight_decay=0.1)
  opt = tx.init(params)

  def loss_fn(p, ids, x):
    return shapes_clip.contrastive_loss(nnx.merge(graphdef, p).logits_per_text(ids, x))

  @jax.jit
  def step(p, o, ids, x):
    loss, g = jax.value_and_grad(loss_fn)(p, ids, x)
    upd, o = tx.update(g, o, p)
    return optax.apply_updates(p, upd), o, loss

  sampler = BatchSampler(pool["labels"], batch_size, hard_negatives, seed)
  t0 = time.time()
  losses = []
  for i in range(steps):
    idx = sampler()
    params, opt, loss = step(params, opt, pool["ids"][idx],
                             pool["images"][idx].astype(np.float32) / 255.0)
    losses.append(loss)
    if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
      mean = float(np.mean([float(x) for x in losses[-log_every:]]))
      print(f"step {i + 1}/{steps}: loss {mean:.4f} ({time.time() - t0:.0f} s)", flush=True)
  train_seconds = time.time() - t0
  model = nnx.merge(graphdef, params)
  text_emb, image_emb = embed(model, evalset)
  report = retrieval_report(text_emb, image_emb, evalset["labels"], evalset["held_out"])
  report.update(train_seconds=round(train_seconds, 1), steps=steps, batch_size=batch_size,
                num_records=num_records, hard_negatives=hard_negatives, seed=seed, lr=lr,
                final_loss=float(np.mean([float(x) for x in losses[-log_every or -1:]])),
                logit_scale=float(np.exp(np.asarray(params["logit_scale"]))))
  return model, tcfg, vcfg, report


def save(directory: str, model, tcfg, vcfg, report: dict, command: str) -> str:
  """`directory` as a CLIP directory (hf_clip.save_text_encoder) plus training.json."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from md_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from md_jax.models import hf_clip  # pylint: disable=g-import-not-at-top
  from md_jax.models.layers import flat_paths  # pylint: disable=g-import-not-at-top
  state = nnx.to_pure_dict(nnx.state(model))
  extra = {"text_projection.weight": np.asarray(state["text_projection"]["kernel"]).T,
           "visual_projection.weight": np.asarray(state["visual_projection"]["kernel"]).T,
           "logit_scale": np.asarray(state["logit_scale"])}
  extra.update({"md_jax_conv_vision." + ".".join(path): np.asarray(v)
                for path, v in flat_paths(state["vision_model"]).items()})
  hf_clip.save_text_encoder(
      directory, tcfg, state["text_model"], tokenizer_dir=pipeline.default_tokenizer_path(),
      extra_tensors=extra,
      extra_config=dict(projection_dim=int(vcfg.projection_dim),
                        md_jax_conv_vision_config=vcfg.to_dict()))
  with open(os.path.join(directory, "training.json"), "w") as f:
    json.dump(dict(report, command=command), f, indent=2, sort_keys=True)
    f.write("\n")
  return directory


def format_report(report: dict) -> str:
  lines = [f"caption -> image retrieval among {report['num_images']} eval images "
           f"(chance: " + ", ".join(f"{a} {report['chance'][a]:.2f}" for a in ATTRS) + ")"]
  for part in ("seen", "held_out", "all"):
    if part in report:
      r = report[part]
      lines.append(f"  {part:9s} ({r['num_captions']:4d} captions): " + "  ".join(
          f"{a} {r[a] * 100:5.1f}%" for a in ATTRS + ("all_three",)))
  for a in ATTRS:
    if report["confusions"][a]:
      lines.append(f"  {a} errors: " + "; ".join(report["confusions"][a]))
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--num_records", type=int, default=32768)
  parser.add_argument("--hard_negatives", type=int, default=4)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--eval_records", type=int, default=864)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--channels", default="",
                      help="image tower widths, e.g. 32,64,128,128 (default: shapes_clip's)")
  parser.add_argument("--config", default="configs/shapes.py:lowres",
                      help="the config whose config.text the tower takes its sizes from")
  args = parser.parse_args(argv)
  model, tcfg, vcfg, report = train(args.steps, args.batch_size, args.num_records, args.seed,
                                    args.lr, args.hard_negatives, args.image_size,
                                    eval_records=args.eval_records, config_spec=args.config,
                                    channels=tuple(int(c) for c in args.channels.split(",") if c))
  print(format_report(report))
  print(f"trained in {report['train_seconds']:.0f} s")
  save(args.out, model, tcfg, vcfg, report,
       "python -m md_jax.tools.train_shapes_clip " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
