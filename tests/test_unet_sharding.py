"""FSDP over 8 fake CPU devices splits every big UNet kernel 8 ways (DESIGN 5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, cli_env

EIGHT = "--xla_force_host_platform_device_count=8"


def test_fsdp_splits_every_kernel_of_2_20_elements_8_ways():
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "helpers", "unet_fsdp.py")],
                        cwd=REPO, env=cli_env(XLA_FLAGS=EIGHT), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])

  # Paper-size MD, at least: 15 SA x 3 (q, shared k/v, out), 15 CA x 2 (q, out), 15 FF x 2,
  # all 1024 wide (plus proj_in/out, SPConv pointwise and 3x3 convs): each shard holds 1/8.
  paper = result["paper"]
  assert len(paper) >= 15 * 3 + 15 * 2 + 15 * 2
  for name, (size, shard) in paper.items():
    assert size == 8 * shard, (name, size, shard)

  allocated = result["allocated"]
  # Every kind of big kernel is there: attention, GLU, SPConv pointwise, 3x3 conv.
  for parts in (("attn1", "to_q"), ("ff", "proj_in"), ("convs", "pw_project"),
                ("resample", "conv")):
    assert any(all(f"'{p}'" in k for p in parts) for k in allocated), parts
  for name, info in allocated.items():
    assert info["devices"] == 8 and len(info["indices"]) == 8, (name, info)
    for shape in info["shards"]:
      n = 1
      for d in shape:
        n *= d
      assert 8 * n == info["size"], (name, shape, info["size"])
