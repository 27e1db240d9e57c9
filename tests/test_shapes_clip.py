"""The shapes CLIP: its contrastive loss, hard-negative batches, retrieval report, training tool
and the packaged pretrained tower the shapes configs freeze."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from md_jax import config_base
from md_jax import config_loading
from md_jax.data import shapes
from md_jax.models import hf_clip
from md_jax.models import shapes_clip
from md_jax.tools import train_shapes_clip as tool

PACKAGED = config_base.resolve_asset("md_jax:shapes_clip")


def test_contrastive_loss_is_clips_symmetric_cross_entropy():
  n = 5
  assert float(shapes_clip.contrastive_loss(jnp.zeros((n, n)))) == pytest.approx(math.log(n))
  assert float(shapes_clip.contrastive_loss(100.0 * jnp.eye(n))) < 1e-6
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(n, n))
  lt = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  li = logits - np.log(np.exp(logits).sum(0, keepdims=True))
  want = -0.5 * (np.mean(np.diag(lt)) + np.mean(np.diag(li)))
  assert float(shapes_clip.contrastive_loss(jnp.asarray(logits))) == pytest.approx(want, 1e-5)


def test_hard_negative_batches_share_colour_and_position_and_differ_in_shape():
  labels = np.asarray([[r["colour"], r["shape"], r["position"]] for r in
                       (shapes.make_record("train", i, 16) for i in range(4000))], np.int32)
  sampler = tool.BatchSampler(labels, 64, hard_negatives=4, seed=0)
  assert len(sampler()) == 64
  groups = [labels[g] for g in sampler.sample_groups()]
  for g in groups:
    assert len(set(g[:, 0])) == 1 and len(set(g[:, 2])) == 1, g
    assert len(set(g[:, 1])) == len(g), g
  # Colours with all four shapes in training give groups of four, the others of three.
  assert {len(g) for g in groups} == {3, 4}
  uniform = tool.BatchSampler(labels, 64, hard_negatives=0, seed=0)()
  assert len(set(uniform.tolist())) == 64


def test_retrieval_report_scores_what_the_embeddings_encode():
  rng = np.random.default_rng(0)
  labels = np.stack([rng.integers(6, size=300), rng.integers(4, size=300),
                     rng.integers(9, size=300)], 1)
  held = rng.random(300) < 0.2

  def onehot(lab, keep):
    parts = [np.eye(n)[lab[:, k]] * (k in keep) for k, n in enumerate((6, 4, 9))]
    return np.concatenate(parts, 1) + 1e-3 * rng.normal(size=(len(lab), 19))
  perfect = tool.retrieval_report(onehot(labels, (0, 1, 2)), onehot(labels, (0, 1, 2)), labels,
                                  held)
  assert perfect["all"]["all_three"] == 1.0 and perfect["held_out"]["shape"] == 1.0
  blind = tool.retrieval_report(onehot(labels, (0, 2)), onehot(labels, (0, 2)), labels, held)
  assert blind["all"]["colour"] == 1.0 and blind["all"]["position"] == 1.0
  assert blind["all"]["shape"] < 0.45 and blind["confusions"]["shape"]
  assert blind["chance"]["shape"] == pytest.approx(0.25, abs=0.05)


def test_train_saves_a_clip_directory_the_diffusion_stages_load(tmp_path):
  """A few steps on the tiny shapes text tower: the loss falls, and the directory holds a text
  tower `load_text_params` reads for that config (what config.text.hf_dir loads), plus the image
  tower `shapes_clip.load` gives back with the same embeddings."""
  model, tcfg, vcfg, report = tool.train(
      steps=12, batch_size=32, num_records=256, lr=3e-3, image_size=16, eval_records=64,
      log_every=0, config_spec="configs/shapes.py:lowres,tiny", channels=(8, 16))
  assert report["final_loss"] < math.log(32)
  out = tool.save(str(tmp_path / "clip"), model, tcfg, vcfg, report, "cmd")
  with open(os.path.join(out, "training.json")) as f:
    assert json.load(f)["all"]["num_captions"] == 64
  config = config_loading.load_config("configs/shapes.py:lowres,tiny")
  from md_jax.train import diffusion  # pylint: disable=g-import-not-at-top
  params = diffusion.load_hf_text_params(config, out)
  want = nnx.to_pure_dict(nnx.state(model.text_model))
  for (pw, w), (pg, g) in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                              jax.tree_util.tree_flatten_with_path(params)[0]):
    np.testing.assert_array_equal(np.asarray(w), g, err_msg=str(pw))
  again = shapes_clip.load(out)
  pool = tool.render_pool("eval", 8, 16, 0, int(config.data.max_length), progress=False)
  for a, b in zip(tool.embed(model, pool), tool.embed(again, pool)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_packaged_clip_is_what_the_shapes_configs_freeze():
  config = config_loading.load_config("configs/shapes.py:lowres")
  assert config.text.hf_dir == "md_jax:shapes_clip" and config.text.frozen
  from md_jax.train import diffusion  # pylint: disable=g-import-not-at-top
  diffusion.load_hf_text_params(config, config.text.hf_dir)  # sizes agree with the config
  tiny = config_loading.load_config("configs/shapes.py:lowres,tiny")
  assert tiny.text.hf_dir == ""  # the tiny tower is seeded


def test_packaged_clip_retrieves_every_attribute_on_eval_records():
  """The shipped towers, re-measured on 216 eval records (every colour/shape/position
  combination once, held-out pairs included): the text tower encodes shape, not just colour and
  position (training.json has the 864-record figures)."""
  model = shapes_clip.load(PACKAGED)
  pool = tool.render_pool("eval", 216, int(model.vision_model.image_size), 0, 16,
                          progress=False)
  report = tool.retrieval_report(*tool.embed(model, pool), pool["labels"], pool["held_out"])
  assert report["all"]["colour"] >= 0.95 and report["all"]["position"] >= 0.95
  assert report["all"]["shape"] >= 0.85, report
  with open(os.path.join(PACKAGED, "training.json")) as f:
    assert json.load(f)["all"]["shape"] >= 0.9


def test_text_cache_of_the_default_config_holds_the_packaged_towers_embeddings(tmp_path):
  """build_text_cache encodes with the tower the run will freeze (hf_dir), not a seeded one:
  the trainer's start-up check re-encodes cached rows with that tower."""
  from md_jax.data import text_cache  # pylint: disable=g-import-not-at-top
  from md_jax.tools import build_text_cache  # pylint: disable=g-import-not-at-top
  from md_jax.train import diffusion  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config("configs/shapes.py:lowres")
  with config.unlocked():
    config.data.num_records = 6
  directory = build_text_cache.build_for_config(config, str(tmp_path / "cache"), batch_size=8)
  cache = text_cache.TextEmbeddingCache(directory)
  assert cache.encoder["hf_dir"] == "md_jax:shapes_clip"
  ld = diffusion.LatentDiffusion(config)
  params = diffusion.load_hf_text_params(config, config.text.hf_dir)
  cache.verify_encoder(lambda ids: np.asarray(ld.encode_text({"text": params}, ids)))
  seeded = jax.jit(ld.text.init)(jax.random.key(int(config.text.seed)))
  with pytest.raises(text_cache.TextCacheError):
    cache.verify_encoder(lambda ids: np.asarray(ld.encode_text({"text": seeded}, ids)))
