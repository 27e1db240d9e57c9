"""Classifier two-sample tests (md_jax/evaluators/two_sample.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from md_jax.data import shapes
from md_jax.evaluators import two_sample


def _renders(split_start: int, n: int, size: int = 64) -> np.ndarray:
  return np.stack([shapes.make_record("eval", i, size, seed=0)["image"]
                   for i in range(split_start, split_start + n)])


def test_radial_spectrum_puts_a_sinusoid_in_its_ring_and_blur_lowers_high_frequencies():
  size = 32
  xx = np.mgrid[:size, :size][1]
  window = np.outer(np.hanning(size), np.hanning(size))  # flat borders, as a shapes render's
  for k in (3, 9, 14):  # k cycles across the image: ring k, feature k - 1 (no DC ring)
    wave = 127.5 + 100 * window * np.cos(2 * np.pi * k * xx / size)
    spec = two_sample.radial_log_spectrum(np.repeat(wave[None, ..., None], 3, axis=-1))
    assert spec.shape == (1, size // 2 - 1)
    assert int(np.argmax(spec[0])) == k - 1, k
  sharp = _renders(0, 4, 32).astype(np.float64)
  blurred = ndimage.gaussian_filter(sharp, sigma=(0, 1.5, 1.5, 0))
  s, b = two_sample.radial_log_spectrum(sharp), two_sample.radial_log_spectrum(blurred)
  assert np.all(b[:, -4:] < s[:, -4:] - 0.5)  # > 3x less energy near Nyquist
  with pytest.raises(ValueError, match="images"):
    two_sample.radial_log_spectrum(np.zeros((2, 3)))


def test_c2st_is_chance_on_one_distribution_and_high_on_two():
  rng = np.random.default_rng(0)
  same = two_sample.c2st(rng.normal(size=(200, 10)), rng.normal(size=(200, 10)))
  assert same["n"] == 200 and abs(same["accuracy"] - 0.5) < 0.08, same
  assert same["accuracy_ci"][0] < 0.5 < same["accuracy_ci"][1] and abs(same["auc"] - 0.5) < 0.1
  shifted, ref = rng.normal(size=(300, 10)), rng.normal(size=(200, 10))
  shifted[:, 3] += 3.0  # one feature of ten moves by 3 sd
  apart = two_sample.c2st(shifted, ref)
  assert apart["n"] == 200 and apart["accuracy"] > 0.9 and apart["auc"] > 0.95, apart
  assert apart["accuracy_ci"][0] > 0.85
  assert two_sample.c2st(shifted, ref) == apart  # deterministic for a seed
  with pytest.raises(ValueError, match="at least folds=5"):
    two_sample.c2st(np.zeros((3, 2)), np.zeros((8, 2)))
  with pytest.raises(ValueError, match="non-finite"):
    two_sample.c2st(np.full((8, 2), np.nan), np.zeros((8, 2)))


def test_spectrum_c2st_tells_blurred_renders_from_sharp_ones_but_not_real_from_real():
  """The property the evaluation relies on: on the spectrum features a set of blurred shapes
  renders is told apart from real ones, while two disjoint sets of real renders are not."""
  real = two_sample.radial_log_spectrum(_renders(0, 120))
  other_real = two_sample.radial_log_spectrum(_renders(120, 120))
  blurred = two_sample.radial_log_spectrum(
      ndimage.gaussian_filter(_renders(120, 120).astype(np.float64), sigma=(0, 1.0, 1.0, 0)))
  assert two_sample.c2st(other_real, real)["accuracy"] < 0.65
  told = two_sample.c2st(blurred, real)
  assert told["accuracy"] > 0.9 and told["auc"] > 0.95, told


def test_roc_auc_counts_ordered_pairs_and_ties():
  assert two_sample.roc_auc([1.0, 2.0, 3.0], [0.0, 0.5, 2.0]) == pytest.approx(7.5 / 9)
  assert two_sample.roc_auc([0.0, 0.0], [0.0, 0.0]) == 0.5
