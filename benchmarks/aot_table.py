"""Will the paper-size runs fit? The AOT compile of each pod stage for several TPU slices, as a table.

``JAX_PLATFORMS=cpu .venv-tpu-aot/bin/python benchmarks/aot_table.py [--out aot_table.jsonl]
    [--cases md256@v5e:4x4,...] [--timeout 1800]``

Each case runs ``python -m md_jax.tools.aot_compile`` (the loop's real sharded train step,
compiled by libtpu for a topology described on this machine) in its own process with its own
time limit, and appends the JSON report (or the error / timeout) to ``--out``; cases already in
``--out`` are not compiled again, so an interrupted table resumes. The table printed at the end
(markdown) has per-chip batch, per-chip memory against HBM (total = arguments + temporaries +
output not aliased to donated arguments + code), whether it fits, the step's TFLOPs
per chip and its time at the chip's bf16 peak, and the compile time here.

A case is STAGE@TOPOLOGY[+VARIANT]: STAGE one of md256, md512, ufogen512 (the paper's global
batches 4096 / 2048 / 2048), VARIANT one of ``remat`` (unet.remat), ``accK`` (K micro-batches)
or both (``remat+acc2``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {
    "md256": ["--config=configs/md_pretrain.py:256"],
    "md512": ["--config=configs/md_pretrain.py:512"],
    # UFOGen insists on init_from; the compile never reads it.
    "ufogen512": ["--config=configs/ufogen.py:md512", "--config.init_from=/nonexistent"],
}
DEFAULT_CASES = ("md256@v5e:4x4,md512@v5e:4x4,ufogen512@v5e:4x4,"
                 "md256@v5p:4x4x4,md512@v5p:4x4x4,ufogen512@v5p:4x4x4,"
                 "md256@v6e:4x4,md512@v6e:4x4,ufogen512@v6e:4x4")


def case_args(case: str) -> list[str]:
  stage, _, rest = case.partition("@")
  topology, *variants = rest.split("+")
  if stage not in STAGES or not topology:
    raise ValueError(f"case {case!r}: want STAGE@TOPOLOGY[+VARIANT], STAGE in {sorted(STAGES)}")
  args = [*STAGES[stage], f"--topology={topology}"]
  for v in variants:
    if v == "remat":
      args.append("--config.unet.remat=True")
    elif v.startswith("acc") and v[3:].isdigit():
      args.append(f"--config.optim.grad_accum_steps={int(v[3:])}")
    else:
      raise ValueError(f"case {case!r}: unknown variant {v!r} (remat, accK)")
  return args


# The last line of a Python traceback ("ValueError: ...", "jaxlib...XlaRuntimeError: ...") or
# the tool's own "error: ..." line.
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception)|error): ")


def describe_failure(returncode: int, stderr: str, wall_s: float) -> str:
  """One line saying why a compile process failed.

  A process killed by a signal leaves no traceback; SIGKILL there is almost always the kernel's
  OOM killer (a paper-size compile holds tens of GiB of host memory). Otherwise the exception's
  own line: not a log line that merely contains "Error" (libtpu logs one about TPU worker
  hostnames at start-up), nor the "see <url>" line some XLA errors end with.
  """
  if returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = f"signal {-returncode}"
    hint = (" - most likely out of host memory (the kernel's OOM killer): compile this case "
            "alone, or on a machine with more RAM") if -returncode == signal.SIGKILL else ""
    return f"compile process killed by {name} after {wall_s:.0f} s{hint}"
  lines = [l.strip() for l in stderr.strip().splitlines() if l.strip()]
  errors = [l for l in lines if _EXCEPTION_LINE.match(l)]
  return (errors or lines or [f"exit {returncode}"])[-1]


def run_case(case: str, timeout: float) -> dict:
  cmd = [sys.executable, "-m", "md_jax.tools.aot_compile", *case_args(case)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  t0 = time.time()
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(case=case, error=f"compile did not finish in {timeout:.0f}s")
  wall = round(time.time() - t0, 1)
  if proc.returncode != 0:
    return dict(case=case, error=describe_failure(proc.returncode, proc.stderr, wall),
                wall_s=wall)
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  return dict(case=case, wall_s=wall, **report)


def table(rows: list[dict]) -> str:
  head = ("| case | chips | mesh (data, fsdp, tensor) | per-chip batch | accum | remat | "
          "GiB/chip: total (args, temps) | HBM | fits | step TFLOP/chip | s at peak | compile s | "
          "host GiB |")
  out = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    if "error" in r:
      out.append(f"| {r['case']} | | | | | | {r['error']} | | | | | | |")
      continue
    m = r["memory_gib"]
    setup = (f"| {r['case']} | {r['chips']} | {tuple(r['mesh'].values())} | "
             f"{r['per_chip_batch']} | {r['grad_accum_steps']} | {r['remat']} |")
    # compile time and the compile's peak resident memory on this machine
    tail = f" {r['compile_s']} | {r.get('host_peak_rss_gib', '')} |"
    if r.get("hbm_oom"):  # refused by the TPU compiler: what it needs, no flops
      o = r["hbm_oom"]
      out.append(f"{setup} > {o['required_gib']:.2f} ({o['what']} alone; compiler: "
                 f"{o['available_gib']:.2f} available) | {r['hbm_gib']} | NO | | |{tail}")
      continue
    out.append(f"{setup} {m['total']:.2f} ({m['arguments']:.2f}, {m['temporaries']:.2f}) | "
               f"{r['hbm_gib']} | {'yes' if r['fits'] else 'NO'} | "
               f"{r['step_tflops_per_chip']:.1f} | {r['step_s_at_peak']} |{tail}")
  return "\n".join(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--cases", default=DEFAULT_CASES)
  ap.add_argument("--out", default="aot_table.jsonl")
  ap.add_argument("--timeout", type=float, default=1800)
  a = ap.parse_args()
  cases = [c for c in a.cases.split(",") if c]
  for c in cases:
    case_args(c)  # every case is checked before the first long compile
  done = {}
  if os.path.exists(a.out):
    with open(a.out) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          done[r["case"]] = r
  for c in cases:
    if c in done:
      continue
    print(f"[aot_table] {c} ...", file=sys.stderr, flush=True)
    r = run_case(c, a.timeout)
    print(f"[aot_table] {c}: {r.get('error') or ('fits' if r['fits'] else 'does NOT fit')}"
          f" ({r.get('wall_s', a.timeout)} s)", file=sys.stderr, flush=True)
    done[c] = r
    with open(a.out, "a") as f:
      f.write(json.dumps(r) + "\n")
  print(table([done[c] for c in cases]))


if __name__ == "__main__":
  main()
