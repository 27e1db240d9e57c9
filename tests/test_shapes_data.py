"""Tests of the procedural shapes dataset and its tokenizer."""

import collections
import filecmp
import os
import re

import numpy as np
import pytest

from md_jax.data import make_shapes_tokenizer, pipeline
from md_jax.data import shapes as S
from md_jax.evaluators.shapes_judge import parse_prompt


def test_constants():
  assert len(S.COLOURS) == 6 and len(S.SHAPES) == 4 and len(S.POSITIONS) == 9
  colours = [c for c, _ in S.HELD_OUT]
  shapes = [s for _, s in S.HELD_OUT]
  assert len(set(colours)) == len(colours) and len(set(shapes)) == len(shapes)
  assert set(colours) <= set(S.COLOURS) and set(shapes) <= set(S.SHAPES)
  # Every colour and shape must still be seen in training with several partners.
  train_pairs = [(c, s) for c in S.COLOURS for s in S.SHAPES if (c, s) not in S.HELD_OUT]
  for c in S.COLOURS:
    assert sum(p[0] == c for p in train_pairs) >= 3
  for s in S.SHAPES:
    assert sum(p[1] == s for p in train_pairs) >= 5
  hues = sorted(S.COLOUR_HUES[c] for c in S.COLOURS)
  gaps = np.diff(hues + [hues[0] + 360])
  assert gaps.min() > 4 * S.HUE_JITTER_DEG


@pytest.mark.parametrize("size", [16, 24, 32, 64, 128])
def test_render_sizes(size):
  img = S.render(dict(colour="red", shape="cross", position="top left"), size,
                 np.random.default_rng(0))
  assert img.shape == (size, size, 3) and img.dtype == np.uint8


@pytest.mark.parametrize("size", [8, 20, 33])
def test_render_rejects_bad_sizes(size):
  with pytest.raises(ValueError, match="multiple of 8"):
    S.render(dict(colour=0, shape=0, position=0), size, np.random.default_rng(0))


def test_same_seed_same_image_across_sizes():
  for i in range(20):
    attrs = dict(colour=i % 6, shape=i % 4, position=i % 9)
    big = S.render(attrs, 64, np.random.default_rng(i)).astype(np.float64)
    small = S.render(attrs, 32, np.random.default_rng(i)).astype(np.float64)
    down = big.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(down - small).mean() < 1.0
    assert np.abs(down - small).max() < 40  # only a few edge pixels differ at all


def test_records_deterministic_and_typed():
  a = S.ShapesSource("train", 32, 100, seed=3)
  b = S.ShapesSource("train", 32, 100, seed=3)
  for i in (0, 7, 99):
    ra, rb = a[i], b[i]
    assert np.array_equal(ra["image"], rb["image"]) and ra["caption"] == rb["caption"]
    assert ra["image"].shape == (32, 32, 3) and ra["image"].dtype == np.uint8
    assert isinstance(ra["caption"], str)
    for k in ("colour", "shape", "position"):
      assert isinstance(ra[k], int)
    assert isinstance(ra["held_out"], bool)
  assert not np.array_equal(a[0]["image"], S.ShapesSource("train", 32, 100, seed=4)[0]["image"])
  assert not np.array_equal(a[0]["image"], S.ShapesSource("eval", 32, 100, seed=3)[0]["image"])
  assert len(a) == 100
  with pytest.raises(IndexError):
    a[100]
  with pytest.raises(ValueError):
    S.ShapesSource("test", 32, 10)


def test_splits():
  train = S.ShapesSource("train", 16, 10_000, seed=0)
  recs = [train[i] for i in range(600)]
  assert not any(r["held_out"] for r in recs)
  pairs = {(r["colour"], r["shape"]) for r in recs}
  assert len(pairs) == 24 - len(S.HELD_OUT)
  assert {r["position"] for r in recs} == set(range(9))

  held = S.ShapesSource("heldout", 16, 10_000, seed=0)
  recs = [held[i] for i in range(36)]
  assert all(r["held_out"] for r in recs)
  combos = {(r["colour"], r["shape"], r["position"]) for r in recs}
  assert len(combos) == 36  # one full balanced cycle

  ev = S.ShapesSource("eval", 16, 10_000, seed=0)
  recs = [ev[i] for i in range(216)]
  combos = collections.Counter((r["colour"], r["shape"], r["position"]) for r in recs)
  assert len(combos) == 216
  assert sum(r["held_out"] for r in recs) == 36
  for r in recs:
    assert r["held_out"] == S.is_held_out(r["colour"], r["shape"])


def test_captions_state_attributes_and_use_small_vocabulary():
  vocab = set(S.caption_vocabulary())
  assert 40 <= len(vocab) <= 80
  rng = np.random.default_rng(0)
  seen = set()
  for i in range(3000):
    attrs = dict(colour=int(rng.integers(6)), shape=int(rng.integers(4)),
                 position=int(rng.integers(9)),
                 background=S.BACKGROUND_NAMES[int(rng.integers(6))])
    text = S.caption(attrs, rng)
    words = re.findall(r"[a-z]+", text)
    assert set(words) <= vocab, text
    assert re.fullmatch(r"[a-z ,]+", text), text
    seen.add(text)
    assert parse_prompt(text) == S.attrs_to_names(attrs), text
  assert len(seen) > 1500  # wording really varies


def test_background_neutral_object_saturated():
  src = S.ShapesSource("eval", 32, 1000, seed=1)
  for i in range(100):
    img = src[i]["image"].astype(np.float64) / 255
    corners = np.concatenate([img[:2, :2], img[:2, -2:], img[-2:, :2], img[-2:, -2:]]).reshape(-1, 3)
    assert (corners.max(1) - corners.min(1)).max() < 0.25
    chroma = img.max(-1) - img.min(-1)
    assert chroma.max() > 0.55


def test_eval_prompts():
  prompts = S.eval_prompts(64, seed=0)
  assert len(prompts) == 64
  assert prompts == S.eval_prompts(64, seed=0)
  assert prompts != S.eval_prompts(64, seed=1)
  held = [a["held_out"] for _, a in prompts]
  assert sum(held) == 16
  for text, a in prompts:
    assert a["held_out"] == S.is_held_out(a["colour"], a["shape"])
    assert parse_prompt(text) == S.attrs_to_names(a)
  big = S.eval_prompts(720, seed=0)
  pos = collections.Counter(a["position"] for _, a in big)
  assert set(pos.values()) == {80}
  shapes = collections.Counter(a["shape"] for _, a in big)
  assert max(shapes.values()) - min(shapes.values()) <= 0.1 * 720 / 4
  colours = collections.Counter(a["colour"] for _, a in big)
  assert min(colours.values()) > 0.8 * 720 / 6


# ---------------------------------------------------------------------------
# Tokenizer.


@pytest.fixture(scope="module")
def tok():
  return pipeline.load_tokenizer()


def test_tokenizer_special_tokens(tok):
  assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
  assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
  assert len(tok) < 1000


def test_each_caption_word_is_one_token(tok):
  for word in S.caption_vocabulary():
    ids = tok(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))
    assert tok.convert_ids_to_tokens(ids)[0] == word + "</w>"


def test_unknown_words_fall_back_to_characters(tok):
  ids = tok("zebra 42 at the top-left!", add_special_tokens=False)["input_ids"]
  assert tok.unk_token_id not in ids
  assert tok.decode(ids) == "zebra 4 2 at the top - left !"


def test_tokenize(tok):
  ids = pipeline.tokenize(tok, ["a red circle in the center", ""], 12)
  assert ids.shape == (2, 12) and ids.dtype == np.int32
  bos, eos = tok.bos_token_id, tok.eos_token_id
  assert list(ids[0, :8]) == [bos] + [tok.convert_tokens_to_ids(w + "</w>") for w in
                                      "a red circle in the center".split()] + [eos]
  assert (ids[0, 8:] == tok.pad_token_id).all()
  assert list(ids[1]) == [bos] + [eos] * 11
  long = pipeline.tokenize(tok, "a red circle " * 20, 8)
  assert long.shape == (1, 8) and long[0, 0] == bos and long[0, -1] == eos
  with pytest.raises(ValueError):
    pipeline.tokenize(tok, ["x"], 1)


def test_tokenizer_regenerates_identically(tmp_path):
  make_shapes_tokenizer.write(str(tmp_path))
  packaged = pipeline.default_tokenizer_path()
  names = sorted(os.listdir(tmp_path))
  assert {"vocab.json", "merges.txt"} <= set(names)
  assert sorted(os.listdir(packaged)) == names
  for name in names:
    assert filecmp.cmp(tmp_path / name, os.path.join(packaged, name), shallow=False), name


def test_a_moved_packaged_tokenizer_path_loads_the_packaged_one_and_a_missing_one_is_named(
    tmp_path):
  """A checkpoint's config may name another checkout's packaged tokenizer (an absolute path);
  that path loads the packaged tokenizer here, and any other missing directory fails naming the
  config keys instead of a hub lookup error."""
  moved = str(tmp_path / "other_checkout" / "md_jax" / "assets" / "shapes_tokenizer")
  assert pipeline.load_tokenizer(moved).get_vocab() == pipeline.load_tokenizer().get_vocab()
  with pytest.raises(FileNotFoundError, match=r"my_clip does not exist \(config.text.tokenizer_dir"):
    pipeline.load_tokenizer(str(tmp_path / "my_clip"))
