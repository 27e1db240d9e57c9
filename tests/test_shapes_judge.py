"""Tests of the procedural shapes judge.

The pinned outputs in tests/data/judge_pinned.{npz,json} freeze the judge:
regenerate them only for a deliberate change, with

    PYTHONPATH=. python tests/test_shapes_judge.py --regen
"""

import functools
import json
import math
import os
import sys
import time

import numpy as np
import pytest
from scipy import ndimage

from md_jax.data import shapes as S
from md_jax.evaluators import shapes_judge as J

DATA = os.path.join(os.path.dirname(__file__), "data")
PINNED_IMAGES = os.path.join(DATA, "judge_pinned.npz")
PINNED_OUTPUTS = os.path.join(DATA, "judge_pinned.json")
CHANCE = J.chance()
SLACK = 0.05


@functools.lru_cache(maxsize=None)
def _records(split, size, n, seed=11):
  src = S.ShapesSource(split, size, 10_000, seed=seed)
  return tuple(src[i] for i in range(n))


def _blur(img, sigma):
  x = ndimage.gaussian_filter(img.astype(np.float32), (sigma, sigma, 0), mode="nearest")
  return np.round(x).astype(np.uint8)


def _two_objects(i, size):
  rng = np.random.default_rng([77, i])
  p1, p2 = rng.choice(9, 2, replace=False)
  a1 = dict(colour=int(rng.integers(6)), shape=int(rng.integers(4)), position=int(p1))
  a2 = dict(colour=int(rng.integers(6)), shape=int(rng.integers(4)), position=int(p2))
  scene = S.sample_scene(a1, rng)
  scene["objects"].append(S.sample_object(a2, rng))
  return S.render_scene(scene, size), S.caption(a1, rng)


def _accuracy(images, prompts):
  res = [J.judge(im, p) for im, p in zip(images, prompts)]
  return {k: float(np.mean([r[k] for r in res])) for k in ("colour", "shape", "position")}


def _assert_at_most_chance(acc, what):
  for k, v in acc.items():
    assert v <= CHANCE[k] + SLACK, f"{what}: {k} accuracy {v:.3f} vs chance {CHANCE[k]:.3f}"


# ---------------------------------------------------------------------------


def test_parse_prompt():
  cases = {
      "a red circle in the top left corner": ("red", "circle", "top left"),
      "at the upper right, a violet plus sign": ("purple", "cross", "top right"),
      "an orange box in the middle": ("orange", "square", "center"),
      "green disc along the bottom edge on a dark background": ("green", "circle", "bottom"),
      "a yellow triangle in the middle left, beige background": ("yellow", "triangle", "left"),
      "blue cross at the lower right corner": ("blue", "cross", "bottom right"),
      "a purple dot on the right side": ("purple", "circle", "right"),
      "a red square at the top center": ("red", "square", "top"),
      "a green triangle in the centre": ("green", "triangle", "center"),
  }
  for text, (c, s, p) in cases.items():
    assert J.parse_prompt(text) == dict(colour=c, shape=s, position=p), text
  assert J.parse_prompt("a photo") == dict(colour=None, shape=None, position=None)
  assert J.parse_prompt("") == dict(colour=None, shape=None, position=None)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("split", S.SPLITS)
def test_dataset_images_pass(size, split):
  # 150 per (split, size): 300 per split and 450 per size in total.
  recs = _records(split, size, 150)
  res = [J.judge(r["image"], r["caption"]) for r in recs]
  for k in ("colour", "shape", "position"):
    acc = np.mean([r[k] for r in res])
    assert acc >= 0.99, (k, acc, [r["reason"] for r in res if not r[k]][:5])
  good = res[0]
  assert good["reason"] == "ok" and good["detected"]["colour"] == S.COLOURS[recs[0]["colour"]]


@pytest.mark.parametrize("size", [32, 64])
def test_shuffled_pairs_score_chance(size):
  recs = _records("eval", size, 256)
  perm = np.random.default_rng(size).permutation(len(recs))
  acc = _accuracy([r["image"] for r in recs], [recs[i]["caption"] for i in perm])
  for k, v in acc.items():
    assert abs(v - CHANCE[k]) <= SLACK, (k, v, CHANCE[k])
    # Exactly the pairs whose attribute happens to coincide should pass.
    coincide = np.mean([r[k] == recs[i][k] for r, i in zip(recs, perm)])
    assert abs(v - coincide) <= 0.01, (k, v, coincide)


@pytest.mark.parametrize("size", [32, 64])
def test_noise_and_blank_images_fail(size):
  rng = np.random.default_rng(size)
  prompts = [p for p, _ in S.eval_prompts(200, seed=1)]
  uniform = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(100)]
  gauss = [np.clip(rng.normal(128, 40, (size, size, 3)), 0, 255).astype(np.uint8)
           for _ in range(100)]
  _assert_at_most_chance(_accuracy(uniform + gauss, prompts), "noise")
  smooth = [np.clip(ndimage.gaussian_filter(rng.normal(0, 1, (size, size, 3)),
                                            (size / 16, size / 16, 0)) * 800 + 128,
                    0, 255).astype(np.uint8) for _ in range(100)]
  _assert_at_most_chance(_accuracy(smooth, prompts[:100]), "smooth noise")
  blank = [np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8) for _ in range(100)]
  backgrounds = []
  for i in range(100):
    scene = S.sample_scene(dict(colour=0, shape=0, position=0), np.random.default_rng([3, i]))
    scene["objects"] = []
    backgrounds.append(S.render_scene(scene, size))
  _assert_at_most_chance(_accuracy(blank + backgrounds, prompts), "blank")


@pytest.mark.parametrize("size,sigma", [(64, 2.0), (64, 3.0), (32, 1.0)])
def test_blurred_images_fail(size, sigma):
  recs = _records("eval", size, 150)
  acc = _accuracy([_blur(r["image"], sigma) for r in recs], [r["caption"] for r in recs])
  _assert_at_most_chance(acc, f"blur sigma={sigma} at {size}")


@pytest.mark.parametrize("size,sigma", [(64, 0.7), (64, 1.0), (32, 0.4)])
def test_slightly_soft_images_pass(size, sigma):
  rng = np.random.default_rng(0)
  recs = _records("eval", size, 100)
  images = []
  for r in recs:
    x = ndimage.gaussian_filter(r["image"].astype(np.float32), (sigma, sigma, 0))
    x += rng.normal(0, 3, x.shape)  # mild decoder-like noise
    images.append(np.clip(np.round(x), 0, 255).astype(np.uint8))
  acc = _accuracy(images, [r["caption"] for r in recs])
  assert min(acc.values()) >= 0.97, acc


@pytest.mark.parametrize("size", [32, 64])
def test_two_objects_fail(size):
  images, prompts = zip(*[_two_objects(i, size) for i in range(200)])
  _assert_at_most_chance(_accuracy(images, prompts), "two objects")


def test_non_square_and_odd_sizes():
  rng = np.random.default_rng(0)
  img = S.render(dict(colour="blue", shape="square", position="bottom right"), 64, rng)
  out = J.judge(img[:, 8:], "a blue square in the bottom right corner")  # 64 x 56
  assert out["colour"] and out["shape"] and out["position"], out
  small = np.asarray(img.reshape(16, 4, 16, 4, 3).mean(axis=(1, 3)).round(), np.uint8)
  out = J.judge(small[:, :], "a blue square in the bottom right corner")
  assert out["colour"] and out["position"], out
  with pytest.raises(ValueError):
    J.judge(img[:8, :8], "x")
  with pytest.raises(TypeError):
    J.judge(img.astype(np.float32), "x")
  floats = img.astype(np.float32) / 127.5 - 1
  assert np.array_equal(J.from_model_output(floats), img)


def test_wrong_prompt_attributes_are_false():
  rng = np.random.default_rng(1)
  img = S.render(dict(colour="green", shape="triangle", position="top"), 64, rng)
  out = J.judge(img, "a red triangle in the bottom left corner")
  assert (out["colour"], out["shape"], out["position"]) == (False, True, False)
  assert out["detected"]["colour"] == "green" and out["detected"]["position"] == "top"
  out = J.judge(img, "a picture")  # nothing stated -> nothing can be right
  assert (out["colour"], out["shape"], out["position"]) == (False, False, False)


def test_score_reports_the_median_edge_width_of_found_objects():
  recs = _records("eval", 64, 16)
  images = [r["image"] for r in recs]
  prompts = [r["caption"] for r in recs]
  sharp = J.score(images, prompts)
  assert sharp["edge_width_n"] == 16 and sharp["edge_width_median"] < 0.2
  lo, hi = sharp["edge_width_median_ci"]
  assert lo <= sharp["edge_width_median"] <= hi
  # Blurred past the judge's limit: every sample is rejected (the accuracies cannot tell two such
  # sets apart), and the edge width still ranks them by how blurred they are.
  soft = J.score([_blur(im, 2.0) for im in images], prompts)
  softer = J.score([_blur(im, 4.0) for im in images], prompts)
  assert soft["rejected"] == softer["rejected"] == 1.0
  assert J.EDGE_WIDTH_MAX_64 < soft["edge_width_median"] < softer["edge_width_median"]
  images[0] = np.zeros_like(images[0])  # no object found: no edge width
  out = J.score(images, prompts, held_out=[i % 2 == 0 for i in range(16)])
  assert out["edge_width_n"] == 15 and out["seen"]["edge_width_n"] == 8
  assert np.isnan(J.score(images[:1], prompts[:1])["edge_width_median"])


def test_median_interval_is_the_binomial_order_statistics():
  # n = 100: 1-based ranks 40 and 61, the textbook 95% interval of a median.
  assert J.median_interval(np.arange(100.0)[::-1]) == (39.0, 60.0)
  assert J.median_interval([3.0]) == (3.0, 3.0)
  assert all(np.isnan(J.median_interval([])))
  rng = np.random.default_rng(0)  # coverage of the true median (ln 2) of Exp(1) samples
  hits = [lo <= np.log(2) <= hi for lo, hi in
          (J.median_interval(rng.exponential(size=200)) for _ in range(400))]
  assert 0.92 <= np.mean(hits) <= 0.99


def test_score_and_wilson():
  recs = _records("eval", 32, 24)
  images = [r["image"] for r in recs]
  prompts = [r["caption"] for r in recs]
  images[0] = np.zeros_like(images[0])  # one rejected image
  held = [r["held_out"] for r in recs]
  out = J.score(images, prompts, held_out=held)
  assert out["n"] == 24 and out["rejected"] == pytest.approx(1 / 24)
  assert out["all"] == pytest.approx(23 / 24)
  lo, hi = out["all_ci"]
  assert lo < 23 / 24 < hi <= 1.0
  assert out["held_out"]["n"] + out["seen"]["n"] == 24
  assert out["held_out"]["n"] == sum(held)
  # Reference value: Wilson interval of 8/10 is (0.4902, 0.9433).
  lo, hi = J.wilson_interval(8, 10)
  assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
  assert J.wilson_interval(0, 0) == (0.0, 1.0)
  with pytest.raises(ValueError):
    J.score(images, prompts[:3])


def test_chance():
  c = J.chance()
  assert c["colour"] == pytest.approx(1 / 6) and c["shape"] == pytest.approx(1 / 4)
  assert c["position"] == pytest.approx(1 / 9)
  assert c["all"] == pytest.approx(1 / 216)


def test_speed():
  recs = _records("eval", 64, 256)  # shared with the shuffled-pairs test
  images = [r["image"] for r in recs]
  prompts = [r["caption"] for r in recs]
  J.judge(images[0], prompts[0])
  t = time.perf_counter()
  J.score(images, prompts)
  elapsed = time.perf_counter() - t
  assert elapsed < 6.0, f"{elapsed:.2f} s for 256 images at 64 px"


# ---------------------------------------------------------------------------
# Frozen outputs.


def _pinned_inputs():
  """Seeded images covering every verdict, with the prompts they are judged on."""
  images, prompts = [], []
  for size, split, n in ((32, "eval", 12), (64, "eval", 6), (32, "heldout", 4), (64, "train", 4)):
    for r in _records(split, size, n, seed=2024):
      images.append(r["image"])
      prompts.append(r["caption"])
  recs = _records("eval", 64, 3, seed=99)
  for r, sigma in zip(recs, (1.0, 2.0, 3.0)):
    images.append(_blur(r["image"], sigma))
    prompts.append(r["caption"])
  for i in range(4):
    img, p = _two_objects(i, 32)
    images.append(img)
    prompts.append(p)
  rng = np.random.default_rng(5)
  images.append(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
  images.append(np.full((32, 32, 3), 200, np.uint8))
  prompts += ["a red circle in the center", "a blue square at the top"]
  # Right image, shuffled prompt: detected attributes stay, booleans change.
  images.append(images[0])
  prompts.append(prompts[1])
  return images, prompts


def _canonical(out):
  """JSON-friendly judge output; floats are compared with a tolerance."""
  return json.loads(json.dumps(out))


def _write_pinned():
  images, prompts = _pinned_inputs()
  sizes = sorted({im.shape[0] for im in images})
  arrays = {f"images_{s}": np.stack([im for im in images if im.shape[0] == s]) for s in sizes}
  arrays["order"] = np.array([im.shape[0] for im in images])
  os.makedirs(DATA, exist_ok=True)
  np.savez_compressed(PINNED_IMAGES, **arrays)
  outputs = [_canonical(J.judge(im, p)) for im, p in zip(images, prompts)]
  with open(PINNED_OUTPUTS, "w") as f:
    json.dump(dict(prompts=prompts, outputs=outputs), f, indent=1, sort_keys=True)
    f.write("\n")


def _load_pinned_images():
  data = np.load(PINNED_IMAGES)
  counters = {}
  images = []
  for s in data["order"]:
    s = int(s)
    k = counters.get(s, 0)
    images.append(data[f"images_{s}"][k])
    counters[s] = k + 1
  return images


def _assert_close(actual, expected, path="out"):
  if isinstance(expected, dict):
    assert isinstance(actual, dict) and actual.keys() == expected.keys(), path
    for k in expected:
      _assert_close(actual[k], expected[k], f"{path}.{k}")
  elif isinstance(expected, list):
    assert isinstance(actual, list) and len(actual) == len(expected), path
    for i, (a, e) in enumerate(zip(actual, expected)):
      _assert_close(a, e, f"{path}[{i}]")
  elif isinstance(expected, float) and not isinstance(expected, bool):
    assert math.isclose(actual, expected, rel_tol=1e-3, abs_tol=2e-3), (path, actual, expected)
  else:
    assert actual == expected, (path, actual, expected)


def test_pinned_outputs():
  with open(PINNED_OUTPUTS) as f:
    pinned = json.load(f)
  images = _load_pinned_images()
  assert len(images) == len(pinned["outputs"]) == len(pinned["prompts"])
  reasons = {o["reason"] for o in pinned["outputs"]}
  assert {"ok", "object not sharp", "multiple objects", "no object",
          "background not uniform"} <= reasons
  for i, (im, p, expected) in enumerate(zip(images, pinned["prompts"], pinned["outputs"])):
    _assert_close(_canonical(J.judge(im, p)), expected, f"case {i}")


def test_pinned_images_still_match_renderer():
  # Not a judge check: tells whether the dataset renderer changed since pinning.
  images, prompts = _pinned_inputs()
  with open(PINNED_OUTPUTS) as f:
    assert json.load(f)["prompts"] == prompts
  for a, b in zip(images, _load_pinned_images()):
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


if __name__ == "__main__":
  if "--regen" in sys.argv:
    _write_pinned()
    print(f"wrote {PINNED_IMAGES} and {PINNED_OUTPUTS}")
