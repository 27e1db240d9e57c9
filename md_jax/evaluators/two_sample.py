"""Classifier two-sample tests: can a classifier tell generated images from real ones?

Distances between feature statistics (``fd_*``, ``kid_*``) compare means and covariances; a set
of blurred caption-conditional means can sit close to the real set there and still be told
apart from real images at a glance. A classifier two-sample test (C2ST; Lopez-Paz and Oquab,
2017) asks that question directly: a regularised logistic regression learns to label samples
"generated" or "real" on k-1 folds and predicts the held-out fold. Held-out accuracy 0.5 means
the classifier cannot tell the sets apart; 1.0 means it always can. The prediction scores also
give a ROC AUC (0.5: no separation).

Two feature sets are used on shapes (md_jax.evaluate):
  * ``spectrum``: each image's radially averaged log power spectrum (luminance), the energy at
    each spatial frequency. Blur removes high-frequency energy, and decoder or generator
    artefacts add energy at frequencies real renders do not have; both show up here whatever
    the colours and shapes;
  * ``shapes``: the shipped shapes feature network's features (the ``fd_shapes`` space): what
    the images depict.

The classifier is linear on standardised features, so the test is cheap (a few Newton steps per
fold) and deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np
from scipy import special
from scipy import stats

from md_jax.evaluators import shapes_judge

_LUMA = np.array([0.299, 0.587, 0.114])


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
  """P(a score of ``pos`` > a score of ``neg``), ties counting half (Mann-Whitney): 0.5 = no
  separation."""
  pos, neg = np.asarray(pos, np.float64).ravel(), np.asarray(neg, np.float64).ravel()
  ranks = stats.rankdata(np.concatenate([pos, neg]))
  n, m = len(pos), len(neg)
  return float((ranks[:n].sum() - n * (n + 1) / 2.0) / (n * m))


def _periodic_fft(x: np.ndarray) -> np.ndarray:
  """FFT of the periodic component of each [N, H, W] image (Moisan's periodic-plus-smooth
  decomposition): an image's FFT sees its opposite borders as neighbours, and the jump between
  them spreads energy over every frequency (a blurred image would still look sharp there);
  the smooth component that accounts for those jumps is removed first."""
  v = np.zeros_like(x)
  v[:, 0, :] += x[:, -1, :] - x[:, 0, :]
  v[:, -1, :] += x[:, 0, :] - x[:, -1, :]
  v[:, :, 0] += x[:, :, -1] - x[:, :, 0]
  v[:, :, -1] += x[:, :, 0] - x[:, :, -1]
  h, w = x.shape[1:]
  denom = (2 * np.cos(2 * np.pi * np.arange(h) / h)[:, None]
           + 2 * np.cos(2 * np.pi * np.arange(w) / w)[None, :] - 4)
  denom[0, 0] = 1.0
  smooth = np.fft.fft2(v) / denom
  smooth[:, 0, 0] = 0.0
  return np.fft.fft2(x) - smooth


def radial_log_spectrum(images) -> np.ndarray:
  """[N, H, W(, 3)] images -> [N, min(H, W) // 2 - 1]: log10 of the mean power of each image's
  luminance (its mean and its border jumps removed) in rings of spatial frequency, from the
  lowest non-zero ring up to half the sampling rate (the DC ring and the corners beyond it left
  out)."""
  x = np.asarray(images, np.float64)
  if x.ndim == 4:
    x = x @ _LUMA
  if x.ndim != 3:
    raise ValueError(f"expected [N, H, W] or [N, H, W, 3] images, got shape {x.shape}")
  n, h, w = x.shape
  x = x - x.mean(axis=(1, 2), keepdims=True)
  power = np.abs(_periodic_fft(x)) ** 2 / (h * w)
  radius = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])  # cycles / pixel
  bins = min(h, w) // 2
  ring = np.floor(radius * 2 * bins).astype(int).ravel()  # 0 .. bins - 1 below Nyquist
  onehot = (ring[:, None] == np.arange(1, bins)[None, :]).astype(np.float64)
  mean_power = power.reshape(n, -1) @ onehot / onehot.sum(axis=0)
  return np.log10(mean_power + 1e-10)


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iters: int = 100) -> np.ndarray:
  """L2-regularised logistic regression by Newton's method; weights then bias (unpenalised)."""
  n, d = x.shape
  xb = np.concatenate([x, np.ones((n, 1))], axis=1)
  reg = np.full(d + 1, float(l2))
  reg[-1] = 1e-8
  w = np.zeros(d + 1)
  for _ in range(iters):
    p = special.expit(xb @ w)
    grad = xb.T @ (p - y) + reg * w
    hess = (xb.T * (p * (1.0 - p))) @ xb + np.diag(reg)
    step = np.linalg.solve(hess, grad)
    w -= step
    if np.max(np.abs(step)) < 1e-8:
      break
  return w


def c2st(generated, real, *, folds: int = 5, l2: float = 1.0, seed: int = 0) -> dict:
  """Classifier two-sample test of ``generated`` against ``real`` ([N, ...] feature arrays; the
  first min(N_generated, N_real) of each, so both classes weigh the same).

  Returns held-out ``accuracy`` with its 95% Wilson interval ``accuracy_ci``, the ROC ``auc`` of
  the held-out scores (P(a generated sample scores as more generated than a real one)) and ``n``
  (samples per class)."""
  gen = np.asarray(generated, np.float64)
  ref = np.asarray(real, np.float64)
  n = min(len(gen), len(ref))
  if n < folds:
    raise ValueError(f"c2st needs at least folds={folds} samples per class, have {n}")
  if folds < 2:
    raise ValueError(f"c2st needs folds >= 2, got {folds}")
  x = np.concatenate([gen[:n].reshape(n, -1), ref[:n].reshape(n, -1)])
  if not np.all(np.isfinite(x)):
    raise ValueError("c2st: non-finite features")
  y = np.concatenate([np.ones(n), np.zeros(n)])
  rng = np.random.default_rng(seed)
  # Stratified folds: each class spread evenly over the folds, in a seeded random order.
  fold = np.concatenate([rng.permutation(n) % folds, rng.permutation(n) % folds])
  score = np.zeros(2 * n)
  for k in range(folds):
    train, test = fold != k, fold == k
    mu, sd = x[train].mean(axis=0), x[train].std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    w = _fit_logistic((x[train] - mu) / sd, y[train], l2)
    score[test] = ((x[test] - mu) / sd) @ w[:-1] + w[-1]
  correct = int(np.sum((score > 0) == (y == 1)))
  return dict(accuracy=correct / (2 * n),
              accuracy_ci=list(shapes_judge.wilson_interval(correct, 2 * n)),
              auc=roc_auc(score[y == 1], score[y == 0]), n=n)
