"""The shipped shapes feature network: it recognises the attributes (so its features carry them),
its FID separates real from degraded images, and the training tool runs and round-trips."""

from __future__ import annotations

import numpy as np
import pytest

from md_jax.data import shapes
from md_jax.evaluators import fid, shapes_features
from md_jax.tools import train_shapes_features


@pytest.fixture(scope="module")
def extractor():
  return fid.FeatureExtractor(shapes_features.load(), batch_size=64)


def _real(start, n, size=32):
  return np.stack([shapes.make_record("eval", start + i, size)["image"] for i in range(n)])


def test_shipped_network_recognises_attributes():
  acc = train_shapes_features.evaluate(shapes_features.load(), num=128)
  # Chance: colour 1/6, shape 1/4, position 1/9. Shape is the hard one on 32 px images.
  assert acc["colour"] >= 0.95 and acc["position"] >= 0.95 and acc["shape"] >= 0.8, acc


def test_shapes_fid_separates_real_from_degraded(extractor):
  a, b = _real(0, 192), _real(192, 192)
  fa, fb = extractor(a), extractor(b)
  # Blurred objects and colours washed towards grey: what an undertrained model produces.
  degraded = ((a.astype(np.float32) * 0.5 + 64)).astype(np.uint8)
  degraded = ((degraded[:, :-1, :-1].astype(np.float32) + degraded[:, 1:, 1:]) / 2)
  degraded = np.pad(degraded, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge").astype(np.uint8)
  fd = extractor(degraded)

  def dist(x, y):
    mx, sx, _ = fid.FeatureStats(x.shape[1]).update(x).result()
    my, sy, _ = fid.FeatureStats(y.shape[1]).update(y).result()
    return fid.frechet_distance(mx, sx, my, sy)

  same, worse = dist(fa, fb), dist(fa, fd)
  assert worse > 5 * same, (same, worse)


def test_training_tool_runs_and_round_trips(tmp_path):
  model = train_shapes_features.train(steps=1, batch_size=8, log_every=0)  # one compile
  path = shapes_features.save(model, str(tmp_path / "sf.npz"))
  again = shapes_features.load(path)
  x = _real(0, 4).astype(np.float32) / 255.0
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(again(x)))
  with pytest.raises(FileNotFoundError, match="train_shapes_features"):
    shapes_features.load(str(tmp_path / "nope.npz"))
