"""FID: Inception features against pytorch-fid's golden vectors, the Frechet distance against a
scipy reference, the statistics tool and the converter's errors.

tests/data/inception_golden.npz and inception_fid_layout.json come from
tests/golden/make_inception_golden.py (pytorch-fid's InceptionV3 with seeded random weights;
pytorch-fid needs torchvision, which does not import beside the test extra's torch, DESIGN 6).
The same weights are regenerated here from the seed, written as a .pth in the FID file's key
layout and converted with the real tool.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from md_jax.evaluators import fid
from md_jax.tools import convert_inception, fid_stats

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _golden():
  g = np.load(os.path.join(DATA, "inception_golden.npz"))
  with open(os.path.join(DATA, "inception_fid_layout.json")) as f:
    layout = json.load(f)
  return g, layout


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
  """(extractor over converted seeded weights, .npz path, golden arrays); one compiled forward."""
  torch = pytest.importorskip("torch")
  g, layout = _golden()
  tmp = tmp_path_factory.mktemp("inception")
  sd = convert_inception.synthetic_state_dict(layout, int(g["seed"]))
  pth, out = tmp / "pt_inception.pth", tmp / "inception.npz"
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
  del sd
  convert_inception.main(["--pt", str(pth), "--out", str(out)])
  os.remove(pth)
  return fid.make_extractor(str(out), batch_size=len(g["images"])), str(out), g


def test_layout_matches_pytorch_fid():
  """Our network needs exactly pytorch-fid's tensors (its classifier aside), shape for shape."""
  _, layout = _golden()
  want = {k: tuple(v) for k, v in layout.items() if not k.startswith("fc.")}
  assert convert_inception.torch_layout() == want


def test_inception_features_match_pytorch_fid(inception):
  extractor, _, g = inception
  feats = extractor(g["images"])
  want = g["features"]
  assert feats.shape == want.shape == (4, fid.FEATURE_DIM)
  err = float(np.max(np.abs(feats - want)))
  # The images differ far more than the tolerance, so a wrong layer cannot hide in it.
  spread = float(np.max(np.abs(want[0] - want[1])))
  print(f"\nmax abs error vs pytorch-fid: {err:.2e} (features up to {np.abs(want).max():.2f}, "
        f"image-to-image difference {spread:.2f})")
  assert spread > 100 * 1e-4
  assert err <= 1e-4, f"max abs error {err:.3g} vs pytorch-fid"


def test_resize_matches_torch_bilinear():
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for h, w in ((64, 64), (320, 512), (37, 300)):
    x = rng.uniform(0, 1, (1, h, w, 3)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), size=(299, 299),
                         mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    got = np.asarray(fid.resize_bilinear(x, 299))
    np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"{h}x{w}")


def _scipy_fid(mu1, s1, mu2, s2):
  from scipy import linalg  # pylint: disable=g-import-not-at-top
  covmean = linalg.sqrtm(s1 @ s2)
  covmean = np.real(covmean)
  d = mu1 - mu2
  return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_reference():
  rng = np.random.default_rng(1)
  dim = 64
  a = rng.normal(size=(600, dim)) @ rng.normal(size=(dim, dim)) * 0.3
  b = rng.normal(size=(500, dim)) @ rng.normal(size=(dim, dim)) * 0.3 + 0.2
  mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
  mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
  got, want = fid.frechet_distance(mu1, s1, mu2, s2), _scipy_fid(mu1, s1, mu2, s2)
  print(f"\nFrechet distance {got:.10g} vs scipy reference {want:.10g}: relative "
        f"difference {abs(got - want) / abs(want):.2e}")
  assert abs(got - want) <= 1e-6 * abs(want), (got, want)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)


def test_fid_near_singular_and_self_distance(inception):
  """Fewer samples than features (singular covariances): finite, >= 0, ~0 against itself."""
  extractor, _, g = inception
  feats = extractor(g["images"])
  mu, sigma, n = fid.FeatureStats().update(feats[:2]).update(feats[2:]).result()
  assert n == 4
  np.testing.assert_allclose(mu, feats.mean(0), atol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), atol=1e-8)
  self_fid = fid.frechet_distance(mu, sigma, mu, sigma)
  assert abs(self_fid) < 1e-6 * np.trace(sigma), self_fid
  other = fid.frechet_distance(mu, sigma, mu + 0.01, sigma * 1.5)
  assert np.isfinite(other) and other > 0


def test_fid_stats_tool_on_a_folder(inception, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  _, npz, g = inception
  folder = tmp_path / "real"
  (folder / "sub").mkdir(parents=True)
  for i, img in enumerate(g["images"]):
    Image.fromarray(img).save(folder / ("sub" if i % 2 else "") / f"{i}.png")
  out = tmp_path / "stats.npz"
  assert fid_stats.main(["--images", str(folder), "--inception", npz, "--out", str(out),
                         "--batch_size", "4", "--no_progress"]) == 0
  mu, sigma, count = fid.load_stats(str(out))
  assert count == 4
  feats = np.asarray(g["features"], np.float64)
  order = [0, 2, 1, 3]  # sorted paths: 0.png, 2.png, sub/1.png, sub/3.png
  np.testing.assert_allclose(mu, feats[order].mean(0), atol=1e-4)
  assert fid.frechet_distance(mu, sigma, mu, sigma) < 1e-6 * np.trace(sigma)
  # The evaluator against those statistics: the same images give ~0.
  results = dict(fid.run(inception[0], [g["images"]], str(out)))
  assert results["fid_count"] == 4 and abs(results["fid"]) < 1e-3
  # A folder of mixed sizes without --image_size is refused, naming the file.
  Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(folder / "0a.png")  # 2nd: no extraction
  assert fid_stats.main(["--images", str(folder), "--inception", npz, "--out", str(out),
                         "--batch_size", "4", "--no_progress"]) == 1


def test_converter_and_loader_errors_name_the_tensor(tmp_path):
  torch = pytest.importorskip("torch")
  with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
    convert_inception.convert(str(tmp_path / "nope.pth"))
  layout = convert_inception.torch_layout()
  sd = {k: np.zeros(v, np.float32) for k, v in layout.items()}
  del sd["Mixed_6c.branch7x7_2.bn.running_var"]
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "missing.pth")
  with pytest.raises(KeyError, match=r"Mixed_6c\.branch7x7_2\.bn\.running_var"):
    convert_inception.convert(str(tmp_path / "missing.pth"))
  sd = {k: np.zeros(v, np.float32) for k, v in layout.items()}
  sd["Mixed_7c.branch_pool.conv.weight"] = np.zeros((192, 2048, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"Mixed_7c\.branch_pool\.conv\.weight.*\(192, 2048, 1, 1\)"):
    convert_inception.convert_state_dict(sd, "bad.pth")
  with pytest.raises(FileNotFoundError, match="convert_inception"):
    fid.load_params(str(tmp_path / "nope.npz"))
  np.savez(tmp_path / "partial.npz", **{"Conv2d_1a_3x3/conv/kernel": np.zeros((3, 3, 3, 32))})
  with pytest.raises(KeyError, match="Conv2d_1a_3x3/bn/scale"):
    fid.load_params(str(tmp_path / "partial.npz"))
  with pytest.raises(FileNotFoundError, match="fid_stats"):
    fid.load_stats(str(tmp_path / "nope_stats.npz"))


def test_kid_matches_direct_unbiased_mmd():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(40, 16))
  y = rng.normal(size=(30, 16)) * 1.3 + 0.4

  def k(a, b):
    return (a @ b.T / 16 + 1) ** 3

  m = 30
  kxx, kyy, kxy = k(x[:m], x[:m]), k(y, y), k(x[:m], y)
  want = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
  # One subset holding every sample of the smaller set: the subset draw only permutes rows.
  sub = fid.kernel_inception_distance(x[:m], y, num_subsets=1, subset_size=m)
  assert abs(sub - want) < 1e-10 * abs(want)
  # Unbiased: two independent sets of one distribution score ~0, a shifted one clearly more.
  a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
  shifted = fid.kernel_inception_distance(a, b + 0.5, num_subsets=10, subset_size=100)
  same = fid.kernel_inception_distance(a, b, num_subsets=10, subset_size=100)
  assert shifted > 0 and abs(same) < 0.1 * shifted, (same, shifted)
