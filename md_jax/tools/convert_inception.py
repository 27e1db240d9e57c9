"""Converts the standard FID Inception weight file to the .npz ``md_jax.evaluators.fid`` reads.

``python -m md_jax.tools.convert_inception --pt pt_inception-2015-12-05-6726825d.pth --out inception.npz``

The input is the state dict pytorch-fid loads for FID (the TF 2015-12-05 Inception graph ported to
PyTorch; the user supplies the file, nothing is downloaded). It is read with
``torch.load(weights_only=True)``. Keys map 1:1 onto our layer names
(``Mixed_5b.branch1x1.conv.weight`` -> ``Mixed_5b/branch1x1/conv/kernel``, OIHW -> HWIO;
``bn.weight/bias/running_mean/running_var`` -> ``bn/scale/bias/mean/var``). The classifier
(``fc.*``) and ``num_batches_tracked`` counters are not needed for pool features and are
skipped; any missing tensor or wrong shape fails naming the key.

This module imports only numpy at load time: ``synthetic_state_dict`` is shared with the
golden-vector script (tests/golden/make_inception_golden.py), which runs in a venv without jax.
"""

from __future__ import annotations

import argparse
import zlib

import numpy as np

_BN_SUFFIXES = {"bn.weight": "bn/scale", "bn.bias": "bn/bias", "bn.running_mean": "bn/mean",
                "bn.running_var": "bn/var"}
_SKIPPED = ("num_batches_tracked",)


def torch_key(ours: str) -> str:
  """Our flat name -> the FID file's key."""
  if ours.endswith("/conv/kernel"):
    return ours[:-len("/conv/kernel")].replace("/", ".") + ".conv.weight"
  for torch_suffix, our_suffix in _BN_SUFFIXES.items():
    if ours.endswith("/" + our_suffix):
      return ours[:-len(our_suffix) - 1].replace("/", ".") + "." + torch_suffix
  raise ValueError(f"no FID-file key for {ours!r}")


def torch_layout() -> dict[str, tuple[int, ...]]:
  """FID-file key -> PyTorch shape for every tensor the pool features need."""
  from md_jax.evaluators import fid  # pylint: disable=g-import-not-at-top  (imports jax)
  out = {}
  for name, shape in fid.param_shapes().items():
    out[torch_key(name)] = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
  return out


def synthetic_state_dict(layout: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Deterministic random weights in the FID file's key layout (for parity tests).

  Each tensor is drawn from its own generator seeded by (seed, crc32(key)), so the result does
  not depend on the order of ``layout``. Scales keep activations O(1) through the ~90 layers:
  He-normal convs, BatchNorm near identity with spread-out statistics.
  """
  out = {}
  for key, shape in layout.items():
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
    if key.endswith("conv.weight"):
      fan_in = int(np.prod(shape[1:]))
      v = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith("bn.weight"):
      v = rng.uniform(0.7, 1.3, shape)
    elif key.endswith("bn.bias"):
      v = rng.normal(0.0, 0.1, shape)
    elif key.endswith("running_mean"):
      v = rng.normal(0.0, 0.2, shape)
    elif key.endswith("running_var"):
      v = rng.uniform(0.5, 2.0, shape)
    elif key.endswith("num_batches_tracked"):
      out[key] = np.zeros(shape, np.int64)
      continue
    else:  # the classifier
      v = rng.normal(0.0, 0.01, shape)
    out[key] = v.astype(np.float32)
  return out


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"FID Inception weight file {path!r} not found (nothing is "
                            "downloaded: supply pt_inception-2015-12-05-6726825d.pth)") from e
  if isinstance(sd, dict) and "state_dict" in sd:
    sd = sd["state_dict"]
  if not isinstance(sd, dict):
    raise ValueError(f"{path}: not a state dict (got {type(sd).__name__})")
  return {k: v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v)
          for k, v in sd.items()}


def convert_state_dict(sd: dict, where: str = "state dict") -> dict[str, np.ndarray]:
  """FID-file tensors -> our flat names and layouts; every needed key checked by name/shape."""
  from md_jax.evaluators import fid  # pylint: disable=g-import-not-at-top
  out = {}
  missing = []
  for ours, shape in fid.param_shapes().items():
    key = torch_key(ours)
    if key not in sd:
      missing.append(key)
      continue
    v = np.asarray(sd[key], np.float32)
    want = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
    if tuple(v.shape) != tuple(want):
      raise ValueError(f"{where}: {key!r} has shape {tuple(v.shape)}, expected {tuple(want)}")
    out[ours] = np.ascontiguousarray(np.transpose(v, (2, 3, 1, 0)) if v.ndim == 4 else v)
  if missing:
    raise KeyError(f"{where}: missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''} "
                   f"({len(missing)} in all): not the FID Inception weight file?")
  return out


def convert(path: str) -> dict[str, np.ndarray]:
  return convert_state_dict(load_state_dict(path), path)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pt", required=True, help="pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument("--out", required=True, help="output .npz")
  args = parser.parse_args(argv)
  arrays = convert(args.pt)
  np.savez(args.out, **arrays)
  print(f"wrote {len(arrays)} tensors to {args.out}")


if __name__ == "__main__":
  main()
