#!/usr/bin/env python3
"""TPU VM slices for md_jax: create, install, train on every worker, follow logs, stop, delete.

  python launch/tpu.py create  --name=md512 --accelerator=v5p-128 --zone=us-east5-a --project=P
  python launch/tpu.py install --name=md512 ...                 # copy this checkout, setup.sh tpu
  python launch/tpu.py train   --name=md512 ... --config=configs/md_pretrain.py:512 \
      --workdir=gs://BUCKET/md512 -- --config.init_from=gs://BUCKET/md256 ...
  python launch/tpu.py logs    --name=md512 ... [--worker=0]
  python launch/tpu.py stop    --name=md512 ...                 # SIGTERM: checkpoint, then exit
  python launch/tpu.py delete  --name=md512 ...
  python launch/tpu.py local   --config=configs/shapes.py:vae,tiny --workdir=/tmp/w \
      --num-processes=2 -- --config.num_train_steps=4

Every cloud subcommand takes ``--dry-run``: it prints the exact gcloud command lines, one per
line, and runs nothing. ``train`` starts the same ``python -m md_jax.main`` on every worker
(``--worker=all``), detached, its output in ~/md_jax_train.log; each worker's process finds the
others through ``jax.distributed.initialize()`` (TPU VMs need no addresses). ``local`` runs that
very per-worker command as N processes on this machine, coordinated over loopback (CPU
collectives through gloo), to try a launch before paying for a slice.
Only the standard library is used, so this runs before anything is installed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/md_jax"
LOG = "~/md_jax_train.log"
PID = "~/md_jax_train.pid"
ARCHIVE = "/tmp/md_jax_src.tar.gz"

# TPU VM software versions per generation (the runtime each generation's docs name).
RUNTIME = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}


def runtime_for(accelerator: str) -> str:
  gen = accelerator.split("-")[0]
  if gen not in RUNTIME:
    raise SystemExit(f"--accelerator={accelerator}: unknown generation {gen!r}; pass --version")
  return RUNTIME[gen]


def gcloud_accelerator(accelerator: str) -> str:
  # gcloud names v5e slices v5litepod-N.
  return accelerator.replace("v5e-", "v5litepod-", 1)


def _where(a) -> list[str]:
  out = [f"--zone={a.zone}"]
  if a.project:
    out.append(f"--project={a.project}")
  return out


def worker_args(config: str, workdir: str, extra: list[str]) -> list[str]:
  """The md_jax.main arguments every worker runs (``--distributed=on``: on TPU VMs
  jax.distributed.initialize() finds the slice itself; locally the JAX_* variables set it up)."""
  return [f"--config={config}", f"--workdir={workdir}", "--distributed=on", *extra]


def worker_command(python: str, args: list[str]) -> list[str]:
  return [python, "-m", "md_jax.main", *args]


def _ssh(a, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", a.name, *_where(a), f"--worker={worker}",
          f"--command={command}"]


def create_commands(a) -> list[list[str]]:
  version = a.version or runtime_for(a.accelerator)
  acc = gcloud_accelerator(a.accelerator)
  if a.queued:
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", a.name, f"--node-id={a.name}",
           *_where(a), f"--accelerator-type={acc}", f"--runtime-version={version}"]
  else:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", a.name, *_where(a),
           f"--accelerator-type={acc}", f"--version={version}"]
  if a.spot:
    cmd.append("--spot")
  return [cmd]


def install_commands(a) -> list[list[str]]:
  if a.repo:
    fetch = (f"rm -rf {REMOTE_DIR} && git clone --depth=1 --branch={shlex.quote(a.branch)} "
             f"{shlex.quote(a.repo)} {REMOTE_DIR}")
    cmds = []
  else:
    # This checkout as committed (git archive), copied to every worker.
    cmds = [["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"],
            ["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE, f"{a.name}:{ARCHIVE}",
             *_where(a), "--worker=all"]]
    fetch = f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf {ARCHIVE} -C {REMOTE_DIR}"
  cmds.append(_ssh(a, f"{fetch} && cd {REMOTE_DIR} && bash launch/setup.sh tpu"))
  return cmds


def train_commands(a) -> list[list[str]]:
  args = worker_args(a.config, a.workdir, a.extra)
  run = shlex.join(worker_command(".venv/bin/python", args))
  # Detached (setsid nohup) so closing the ssh session does not stop training; the pid file
  # lets `stop` send SIGTERM, which the loop answers with a checkpoint and a clean exit.
  remote = (f"cd {REMOTE_DIR} && setsid nohup {run} > {LOG} 2>&1 < /dev/null & "
            f"echo $! > {PID}")
  return [_ssh(a, remote)]


def logs_commands(a) -> list[list[str]]:
  return [_ssh(a, f"tail -n 200 -F {LOG}", worker=a.worker)]


def stop_commands(a) -> list[list[str]]:
  return [_ssh(a, f"test -f {PID} && kill -TERM $(cat {PID}) || true")]


def delete_commands(a) -> list[list[str]]:
  if a.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", a.name, *_where(a),
             "--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", a.name, *_where(a), "--quiet"]]


COMMANDS = dict(create=create_commands, install=install_commands, train=train_commands,
                logs=logs_commands, stop=stop_commands, delete=delete_commands)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_local(a) -> int:
  """The per-worker command as ``num_processes`` local processes (CPU, loopback, gloo)."""
  args = worker_args(a.config, a.workdir, a.extra)
  port = _free_port()
  procs = []
  for pid in range(a.num_processes):
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(a.num_processes), JAX_PROCESS_ID=str(pid))
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                          f"{a.devices_per_process}").strip()
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = worker_command(sys.executable, args)
    print(f"[local {pid}] {shlex.join(cmd)}", flush=True)
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env))
  codes = [p.wait() for p in procs]
  return max(codes, key=abs)


def parse(argv: list[str]) -> argparse.Namespace:
  extra: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
    if "--dry-run" in extra:  # ours wherever it is written (md_jax.main has no such flag)
      extra = [x for x in extra if x != "--dry-run"]
      argv = [*argv, "--dry-run"]
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)

  def cloud(name, help_):
    s = sub.add_parser(name, help=help_)
    s.add_argument("--name", required=True, help="TPU VM (slice) name")
    s.add_argument("--zone", required=True)
    s.add_argument("--project", default="", help="default: gcloud's configured project")
    s.add_argument("--queued", action="store_true",
                   help="through queued resources (waits for capacity)")
    s.add_argument("--dry-run", action="store_true", help="print the gcloud commands only")
    return s

  s = cloud("create", "create the slice")
  s.add_argument("--accelerator", required=True, help="e.g. v5p-128, v5e-16, v4-32, v6e-16")
  s.add_argument("--version", default="", help="TPU VM runtime; default by generation")
  s.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
  s = cloud("install", "copy this project to every worker and run launch/setup.sh tpu")
  s.add_argument("--repo", default="", help="git URL to clone instead of copying this checkout")
  s.add_argument("--branch", default="main")
  for name, help_ in (("train", "start md_jax.main on every worker"),):
    s = cloud(name, help_)
    s.add_argument("--config", required=True)
    s.add_argument("--workdir", required=True, help="shared by all workers: gs://BUCKET/PATH")
  s = cloud("logs", "follow the training log of one worker")
  s.add_argument("--worker", default="0")
  cloud("stop", "SIGTERM the training on every worker (it saves a checkpoint first)")
  cloud("delete", "delete the slice")
  s = sub.add_parser("local", help="the per-worker command as local processes (CPU, loopback)")
  s.add_argument("--config", required=True)
  s.add_argument("--workdir", required=True)
  s.add_argument("--num-processes", type=int, default=2)
  s.add_argument("--devices-per-process", type=int, default=1)
  a = p.parse_args(argv)
  a.extra = extra
  if extra and a.cmd not in ("train", "local"):
    p.error(f"arguments after -- are md_jax.main flags, for train/local only: {extra}")
  if a.cmd == "train" and not a.workdir.startswith("gs://"):
    print(f"warning: --workdir={a.workdir} is not a gs:// path; the workers of a multi-host "
          "slice must share their workdir", file=sys.stderr)
  return a


def main(argv: list[str] | None = None) -> int:
  a = parse(sys.argv[1:] if argv is None else argv)
  if a.cmd == "local":
    return run_local(a)
  for cmd in COMMANDS[a.cmd](a):
    print(shlex.join(cmd), flush=True)
    if not a.dry_run:
      rc = subprocess.call(cmd)
      if rc:
        return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
