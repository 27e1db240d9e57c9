"""launch/tpu.py: the exact gcloud command lines of a v5p-128 run of the 512 stage (--dry-run).
Its ``local`` mode (the per-worker command as local processes) is what
test_distributed.py's two-process test runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

WHERE = ["--name=md512", "--zone=us-east5-a", "--project=my-proj"]


def _dry(*args):
  proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "tpu.py"), *args,
                         "--dry-run"], capture_output=True, text=True, timeout=60,
                        env={**os.environ, "PATH": "/nonexistent"})  # no gcloud can run
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip().splitlines()


def test_dry_run_v5p_128_of_the_512_stage():
  ssh = "gcloud compute tpus tpu-vm ssh md512 --zone=us-east5-a --project=my-proj"
  assert _dry("create", *WHERE, "--accelerator=v5p-128", "--spot") == [
      "gcloud compute tpus tpu-vm create md512 --zone=us-east5-a --project=my-proj "
      "--accelerator-type=v5p-128 --version=v2-alpha-tpuv5 --spot"]
  assert _dry("create", *WHERE, "--accelerator=v5e-16", "--queued") == [
      "gcloud compute tpus queued-resources create md512 --node-id=md512 --zone=us-east5-a "
      "--project=my-proj --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite"]
  assert _dry("install", *WHERE) == [
      f"git -C {REPO} archive --format=tar.gz --output=/tmp/md_jax_src.tar.gz HEAD",
      "gcloud compute tpus tpu-vm scp /tmp/md_jax_src.tar.gz md512:/tmp/md_jax_src.tar.gz "
      "--zone=us-east5-a --project=my-proj --worker=all",
      f"{ssh} --worker=all '--command=rm -rf ~/md_jax && mkdir -p ~/md_jax && tar -xzf "
      "/tmp/md_jax_src.tar.gz -C ~/md_jax && cd ~/md_jax && bash launch/setup.sh tpu'"]
  # --dry-run after -- is still ours, never passed to md_jax.main.
  assert _dry("train", *WHERE, "--config=configs/md_pretrain.py:512",
              "--workdir=gs://b/md512", "--", "--config.init_from=gs://b/md256",
              "--config.data.source=gs://b/data") == [
      f"{ssh} --worker=all '--command=cd ~/md_jax && setsid nohup .venv/bin/python -m "
      "md_jax.main --config=configs/md_pretrain.py:512 --workdir=gs://b/md512 --distributed=on "
      "--config.init_from=gs://b/md256 --config.data.source=gs://b/data > ~/md_jax_train.log "
      "2>&1 < /dev/null & echo $! > ~/md_jax_train.pid'"]
  assert _dry("logs", *WHERE) == [f"{ssh} --worker=0 '--command=tail -n 200 -F ~/md_jax_train.log'"]
  assert _dry("stop", *WHERE) == [
      f"{ssh} --worker=all '--command=test -f ~/md_jax_train.pid && kill -TERM "
      "$(cat ~/md_jax_train.pid) || true'"]
  assert _dry("delete", *WHERE) == [
      "gcloud compute tpus tpu-vm delete md512 --zone=us-east5-a --project=my-proj --quiet"]

