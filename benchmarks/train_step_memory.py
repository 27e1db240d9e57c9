"""Peak memory of one real train step on this machine, with and without rematerialisation.

``python benchmarks/train_step_memory.py [--config configs/md_pretrain.py:256] [--batch 2]
    [--dtype float32] [--cases plain,remat] [--out FILE.jsonl]``

Each case runs in its own process (a fresh allocator, so one case's peak cannot hide another's):
it builds the loop's own Trainer for the config on this process's devices (``mesh_shape``
(-1, 1, 1) unless ``--mesh`` says otherwise) with ``compute_dtype`` and ``unet.remat`` set, compiles
the train step for a ``--batch`` global batch and reads XLA's buffer assignment (arguments,
temporaries, output). Then it allocates the state (random init, also where the config would
restore ``init_from``; the frozen VAE, text tower and teacher random too: nothing is read from
disk), runs three steps on a random batch and samples the
process's resident memory every 2 ms while they run. Reported per case: XLA's temporaries, the
resident memory with the state in place before the first step, the peak during the steps and the
difference (what the step itself needs), and the step time. The default case is the issue's
"256 (32x32 latent), batch 2, fp32" step of the paper-size MobileDiffusion pretraining stage:
the frozen f=8 VAE encoder and CLIP ViT-L/14 text tower run inside the step as in a real run.
On XLA:CPU ``unet.remat`` changes neither the temporaries nor the peak (its scheduler does not
exploit the recompute: jax-ml/jax#19822; a 12-block MLP with jax.checkpoint per block shows the
same), so this measures what a CPU run needs; remat's saving shows in the TPU compiles
(``python -m md_jax.tools.aot_compile``, ``benchmarks/aot_table.py`` cases ``+remat``).
The paper-size UFOGen GAN step (G and D two MD UNets) at 256, batch 1:
``--config configs/ufogen.py:md256 --batch 1 --set optim.grad_accum_steps=1
--set init_from=unused`` (UFOGen insists on a pretrained run; here none is read).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
GIB = 1024 ** 3


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler:
  """Samples this process's resident memory on a thread (XLA releases the GIL while it runs)."""

  def __init__(self, period_s: float = 0.002):
    self.period_s = period_s
    self.peak = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _rss_bytes())
      time.sleep(self.period_s)

  def __enter__(self):
    self.peak = _rss_bytes()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss_bytes())


def run_case(config_spec: str, batch: int, dtype: str, remat: bool, mesh: str,
             steps: int, overrides: list[str]) -> dict:
  """One case, in this process. Returns the report dict."""
  import ast  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from md_jax.config_loading import apply_overrides  # pylint: disable=g-import-not-at-top
  from md_jax.config_loading import load_config  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  from md_jax.train import sharding as shd  # pylint: disable=g-import-not-at-top
  from md_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top

  config = load_config(config_spec)
  with config.unlocked():
    config.compute_dtype = dtype
    config.unet.remat = remat
    config.mesh_shape = tuple(ast.literal_eval(mesh))
    config.global_batch_size = batch
    try:
      apply_overrides(config, overrides, flag="--set")
    except KeyError as e:
      raise SystemExit(str(e)) from None
  trainer = loop.Trainer(config, workdir="")
  n_params = sum(int(x.size) for x in jax.tree.leaves(trainer.abstract_params))
  spec = trainer.objective.batch_spec(batch)
  t0 = time.time()
  compiled = trainer.compile_step(spec)
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()

  def random_frozen(key):
    # Kernels and embeddings N(0, 0.02); vectors as a fresh init leaves them (scales 1, biases
    # and shifts 0), so that e.g. the latent scale does not blow the loss up.
    leaves, treedef = jax.tree_util.tree_flatten_with_path(trainer.frozen_abstract)
    keys = jax.random.split(key, max(1, len(leaves)))
    out = []
    for k, (path, a) in zip(keys, leaves):
      if a.ndim >= 2:
        out.append((0.02 * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype))
      else:
        out.append(jnp.full(a.shape, 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0,
                            a.dtype))
    return jax.tree.unflatten(treedef, out)

  frozen = jax.jit(random_frozen, out_shardings=trainer.frozen_shardings,
                   compiler_options=state_lib.init_compiler_options())(jax.random.key(1))
  state = trainer.init_state(frozen=frozen, random_init=True)
  rng = np.random.default_rng(0)
  host = {}
  for k, a in spec.items():
    if np.issubdtype(a.dtype, np.integer):
      host[k] = rng.integers(0, int(config.text.get("vocab_size", 1000)), a.shape).astype(a.dtype)
    else:
      host[k] = rng.uniform(-1, 1, a.shape).astype(a.dtype)
  batch_arrays = shd.global_batch_from_local(host, trainer.mesh)
  jax.block_until_ready((state, batch_arrays))
  before = _rss_bytes()
  times = []
  with _PeakSampler() as sampler:
    for _ in range(steps):
      t = time.time()
      state, metrics = compiled(state, batch_arrays)
      jax.block_until_ready((state, metrics))
      times.append(time.time() - t)
  loss = float(jax.device_get(metrics["loss"]))
  return dict(
      config=config_spec, overrides=overrides, trainer=config.trainer, batch=batch, compute_dtype=dtype, remat=remat,
      mesh=dict(trainer.mesh.shape), devices=jax.device_count(), backend=jax.default_backend(),
      trainable_params=n_params, loss=loss, finite=bool(np.isfinite(loss)),
      xla_gib=dict(arguments=round(mem.argument_size_in_bytes / GIB, 3),
                   temporaries=round(mem.temp_size_in_bytes / GIB, 3),
                   output=round(mem.output_size_in_bytes / GIB, 3),
                   aliased=round(mem.alias_size_in_bytes / GIB, 3)),
      rss_gib=dict(state_resident=round(before / GIB, 3), peak_during_step=round(sampler.peak / GIB, 3),
                   step_added=round((sampler.peak - before) / GIB, 3)),
      step_s=[round(t, 2) for t in times], compile_s=round(compile_s, 1))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/md_pretrain.py:256")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--mesh", default="(-1, 1, 1)", help="mesh_shape (data, fsdp, tensor)")
  parser.add_argument("--cases", default="plain,remat", help="comma list of plain|remat")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, JSON value, e.g. --set optim.grad_accum_steps=1 (repeatable)")
  parser.add_argument("--out", default="", help="append each case's JSON line here too")
  parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # a child process's case
  args = parser.parse_args(argv)
  if args.one:
    report = run_case(args.config, args.batch, args.dtype, args.one == "remat", args.mesh,
                      args.steps, args.set)
    print(json.dumps(report))
    return
  rows = []
  for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
    if case not in ("plain", "remat"):
      raise SystemExit(f"--cases: unknown case {case!r} (plain, remat)")
    cmd = [sys.executable, os.path.abspath(__file__), "--one", case, "--config", args.config,
           "--batch", str(args.batch), "--dtype", args.dtype, "--mesh", args.mesh,
           "--steps", str(args.steps), *[f"--set={x}" for x in args.set]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
      tail = [l for l in proc.stderr.strip().splitlines() if l.strip()][-1:]
      row = dict(case=case, error=tail[0] if tail else f"exit {proc.returncode}")
    else:
      row = dict(case=case, **json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps(row), flush=True)
    rows.append(row)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
  ok = [r for r in rows if "error" not in r]
  if ok:
    print("| case | XLA temps GiB | RSS with state GiB | peak in step GiB | step adds GiB | step s |")
    print("|---|---|---|---|---|---|")
    for r in ok:
      print(f"| {r['case']} | {r['xla_gib']['temporaries']} | {r['rss_gib']['state_resident']} | "
            f"{r['rss_gib']['peak_during_step']} | {r['rss_gib']['step_added']} | "
            f"{min(r['step_s'])} |")


if __name__ == "__main__":
  main()
