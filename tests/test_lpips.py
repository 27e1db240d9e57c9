"""LPIPS(VGG16) in NNX against the `lpips` package and a PyTorch forward of the same weights.

The `lpips` package needs torchvision, which does not import beside torch 2.13 (DESIGN 6), so
tests/data/lpips_golden.npz holds its distances on shapes image pairs, computed once by
tests/golden/make_lpips_golden.py with a seeded random VGG16 trunk and the package's shipped
linear heads. Here the trunk is regenerated from the seed and, with the stored heads, goes
through the real converter. A second reference, LPIPS' computation written with
torch.nn.functional, checks the conversion and forward on other random weights and sizes.
"""

from __future__ import annotations

import ast
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from md_jax.models import lpips as lpips_lib  # pylint: disable=g-import-not-at-top
from md_jax.tools import convert_lpips  # pylint: disable=g-import-not-at-top

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "lpips_golden.npz")
SIZES = (64, 104)


def _golden():
  g = np.load(GOLDEN)
  trunk = {str(k): tuple(ast.literal_eval(str(s))) for k, s in zip(g["trunk_keys"],
                                                                  g["trunk_shapes"])}
  heads = {k[len("head:"):]: g[k] for k in g.files if k.startswith("head:")}
  return g, trunk, heads


@pytest.fixture(scope="module")
def golden_model(tmp_path_factory):
  """Our LPIPS over the seeded trunk + the package's heads, converted like a user's files."""
  g, _, heads = _golden()
  tmp = tmp_path_factory.mktemp("lpips_golden")
  vgg_pth, heads_pth, out = tmp / "vgg16.pth", tmp / "vgg.pth", tmp / "lpips.npz"
  sd = convert_lpips.synthetic_vgg16_state_dict(int(g["seed"]))
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, vgg_pth)
  del sd
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in heads.items()}, heads_pth)
  convert_lpips.main(["--vgg16", str(vgg_pth), "--heads", str(heads_pth), "--out", str(out)])
  os.remove(vgg_pth)
  return lpips_lib.build(str(out)), g


def test_golden_layout_is_what_the_converter_reads():
  """The package's VGG16 trunk and shipped heads file have exactly the tensors we convert."""
  _, trunk, heads = _golden()
  assert convert_lpips.torch_layout() == trunk
  assert {k: tuple(v.shape) for k, v in heads.items()} == convert_lpips.heads_layout()
  assert all(np.all(v > 0) for v in heads.values())  # the shipped heads are clamped positive


def test_lpips_matches_lpips_package(golden_model):
  model, g = golden_model
  errs, rels = [], []
  for size in SIZES:
    x, y, want = g[f"x{size}"], g[f"y{size}"], g[f"d{size}"]
    got = np.asarray(model(x.astype(np.float32) / 127.5 - 1.0, y.astype(np.float32) / 127.5 - 1.0))
    assert got.shape == want.shape == (len(x),)
    errs.append(np.abs(got - want))
    rels.append(np.abs(got - want) / np.maximum(np.abs(want), 1e-3))
  err, rel = float(np.max(np.concatenate(errs))), float(np.max(np.concatenate(rels)))
  want = np.concatenate([g[f"d{s}"] for s in SIZES])
  print(f"\nmax abs error vs lpips: {err:.2e}, max rel error {rel:.2e} "
        f"({len(want)} pairs, distances {want.min():.4f}..{want.max():.4f})")
  # Every non-identical pair is far above the tolerance, so a wrong layer cannot hide in it, and
  # the relative bound (measured ~2e-6) also catches small slips (a 0.45 scale, a 1e-3 eps).
  assert np.all(want[want > 0] > 10 * 1e-4) and np.sum(want == 0) == 1
  assert err <= 1e-4, f"max abs error {err:.3g} vs the lpips package"
  assert rel <= 2e-5, f"max relative error {rel:.3g} vs the lpips package"


def _write_weights(tmp_path):
  g = torch.Generator().manual_seed(0)
  vgg, cin = {}, 3
  for widths, idx in zip(lpips_lib.VGG16_STAGES, lpips_lib.VGG16_TORCH_INDEX):
    for c, t in zip(widths, idx):
      vgg[f"features.{t}.weight"] = torch.randn(c, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
      vgg[f"features.{t}.bias"] = torch.randn(c, generator=g) * 0.05
      cin = c
  heads = {f"lin{k}.model.1.weight": torch.rand(1, w[-1], 1, 1, generator=g)
           for k, w in enumerate(lpips_lib.VGG16_STAGES)}
  torch.save(vgg, tmp_path / "vgg16.pth")
  torch.save(heads, tmp_path / "heads.pth")
  return vgg, heads


def _torch_lpips(vgg, heads, x, y):
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  shift = torch.tensor(lpips_lib.LPIPS_SHIFT).view(1, 3, 1, 1)
  scale = torch.tensor(lpips_lib.LPIPS_SCALE).view(1, 3, 1, 1)

  def feats(h):
    h = (h - shift) / scale
    out = []
    for s, idx in enumerate(lpips_lib.VGG16_TORCH_INDEX):
      if s:
        h = F.max_pool2d(h, 2, 2)
      for t in idx:
        h = F.relu(F.conv2d(h, vgg[f"features.{t}.weight"], vgg[f"features.{t}.bias"], padding=1))
      out.append(h)
    return out

  total = 0
  for k, (a, b) in enumerate(zip(feats(x), feats(y))):
    a = a / (torch.sqrt(torch.sum(a ** 2, dim=1, keepdim=True)) + 1e-10)
    b = b / (torch.sqrt(torch.sum(b ** 2, dim=1, keepdim=True)) + 1e-10)
    total = total + F.conv2d((a - b) ** 2, heads[f"lin{k}.model.1.weight"]).mean(dim=(2, 3))
  return total[:, 0]


def test_lpips_matches_torch_forward_of_converted_weights(tmp_path):
  vgg, heads = _write_weights(tmp_path)
  out = tmp_path / "lpips.npz"
  convert_lpips.main(["--vgg16", str(tmp_path / "vgg16.pth"), "--heads",
                      str(tmp_path / "heads.pth"), "--out", str(out)])
  model = lpips_lib.build(str(out))
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  got = np.asarray(model(x, y))
  with torch.inference_mode():
    want = _torch_lpips(vgg, heads, torch.from_numpy(x).permute(0, 3, 1, 2),
                        torch.from_numpy(y).permute(0, 3, 1, 2)).numpy()
  assert got.shape == (2,)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(model(x, x)) < 1e-6)  # identical images: zero distance


def test_lpips_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="perceptual.weight=0"):
    lpips_lib.build(str(tmp_path / "nope.npz"))
  with pytest.raises(FileNotFoundError, match="VGG16 weight file"):
    convert_lpips.convert(str(tmp_path / "vgg.pth"), str(tmp_path / "heads.pth"))
  torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "bad.pth")
  torch.save({}, tmp_path / "heads.pth")
  with pytest.raises(KeyError, match="features.0.bias"):
    convert_lpips.convert(str(tmp_path / "bad.pth"), str(tmp_path / "heads.pth"))


def test_vae_trains_with_perceptual_term(tmp_path):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  _write_weights(tmp_path)
  out = tmp_path / "lpips.npz"
  np.savez(out, **convert_lpips.convert(str(tmp_path / "vgg16.pth"), str(tmp_path / "heads.pth")))
  config = tiny_config("vae", eval_at_end=False, num_train_steps=2,
                       **{"vae.perceptual.weight": 0.5, "vae.perceptual.weights": str(out)})
  result = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(result["metrics"]["lpips"]) and result["metrics"]["lpips"] > 0
