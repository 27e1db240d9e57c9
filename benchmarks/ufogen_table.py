"""UFOGen on shapes: one-step judge scores of the paper's Table-5 cells and the controls.

``python benchmarks/ufogen_table.py --base=QS/highres --out=DIR [--cells=diffusion,full;...]
    [--size full] [--steps N] [--batch B] [--num_samples 256] [--use_run CELL=WORKDIR ...]
    [--seeds 0,1,2] [--set KEY=VALUE ...]``

BASE is a pretrained shapes diffusion run (the quickstart's ``QS/highres``). Every row is judged
by ``md_jax.evaluate`` on the same evaluation prompts and per-sample noise (256 by default:
seen and held-out attribute combinations, 95% Wilson intervals), with the shapes-feature
distance (``fd_shapes`` / ``kid_shapes``: Frechet / kernel distance to real eval-split images in
the feature space of the shipped shapes attribute network; a caption-conditional mean image can
have the right colour and still be far from real images there) and the judge's sharpness measure
(median edge width in px at 64 px over the samples with one coloured object, the judge's own
blur test: above 0.65 it rejects the sample as blurred; real renders measure 0.12 at 64 px and
0.06 at 128 px), and two classifier two-sample tests against the same real images
(md_jax/evaluators/two_sample.py; held-out accuracy of a linear classifier telling the row's
samples from real renders, 50% = indistinguishable): on each image's radial power spectrum
(blur, artefacts) and on the shapes features (what is drawn), both also against the real renders
after the VAE round trip (encode, decode), so that the decoder's own signature, which every row
shares, cancels (the spectrum test against raw renders saturates on it: table.json keeps it):

  (a) base, one step   the pretrained model's x0 prediction from pure noise, before finetuning
                       (no guidance, as the generator samples)
  (b) base, DDIM-50    the pretrained model's 50-step DDIM samples at its config's CFG scale
  (c) CELL             each UFOGen finetune (``configs/ufogen.py:CELL,SIZE``), one step
  (d) no adversary     ``diffusion,full`` with ``ufogen.adv_weight=0``: one-step regression only

The finetunes run as ``python -m md_jax.main`` under DIR/<cell>; ``--use_run CELL=WORKDIR`` reuses
a finished one (e.g. ``diffusion,full=QS/ufogen``, the quickstart's own stage). Finished runs and
evaluations (DIR/eval/<row>) are reused when they judged the same run at its latest checkpoint,
so a rerun only reprints. Prints a markdown table and writes DIR/table.json.

``--seeds``: each finetune once per training seed (``config.seed``: its timesteps, noise and
posterior draws; the data order and the evaluation stay fixed), under DIR/<cell>_s<seed> (seed 0
under DIR/<cell>). Short shapes finetunes differ between seeds as much as between the settings
one tries (300 steps, batch 8: the default cell's edge width 1.07, 1.25 and 1.18 and fd_shapes
1461, 922 and 1777 on seeds 0-2), so a second table gives each finetuned row's mean and standard
deviation over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TABLE5 = ("diffusion,full", "diffusion,lora", "distill,full", "distill,lora", "ema,full",
          "ema,lora")
NO_ADV = "no_adversary"


def finetune(cell: str, args, seed: int = 0) -> str:
  workdir = os.path.join(args.out, cell.replace(",", "_") + (f"_s{seed}" if seed else ""))
  if os.path.exists(os.path.join(workdir, "final.json")):
    return workdir
  recon_finetune = "diffusion,full" if cell == NO_ADV else cell
  # The size only when not the default: 'full' would be read as the finetune kind.
  arg = recon_finetune if args.size == "full" else f"{recon_finetune},{args.size}"
  cmd = [sys.executable, "-m", "md_jax.main", f"--config=configs/ufogen.py:{arg}",
         f"--workdir={workdir}",
         f"--config.init_from={os.path.abspath(args.base)}", "--config.progress_bar=False",
         "--config.eval_at_end=False"]
  if cell == NO_ADV:
    cmd.append("--config.ufogen.adv_weight=0.0")
  if seed:
    cmd.append(f"--config.seed={seed}")
  if args.steps:
    cmd.append(f"--config.num_train_steps={args.steps}")
  if args.batch:
    cmd.append(f"--config.global_batch_size={args.batch}")
  cmd += [f"--config.{kv}" for kv in args.set]
  os.makedirs(args.out, exist_ok=True)
  log_path = workdir + ".log"  # DIR/<cell>[_s<seed>].log
  print(f"[ufogen_table] finetune {cell}: {' '.join(cmd[3:])} (log {log_path})", flush=True)
  with open(log_path, "w") as log:
    subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
  return workdir


def evaluate_row(name: str, workdir: str, sampler: str, args) -> dict:
  out = os.path.join(args.out, "eval", name.replace(",", "_").replace(" ", "_"))
  cached = os.path.join(out, "row.json")
  # The run's latest checkpoint, resolved once: what a stored row must have judged to be reused,
  # and what is judged otherwise.
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  here, latest = os.path.abspath(workdir), ckpt_lib.latest_step_in(workdir)
  if os.path.exists(cached):
    with open(cached) as f:
      row = json.load(f)
    # Rows are stored by name: a row copied from another table, or a run continued to more
    # steps, is judged again.
    if row.get("workdir") == here and row.get("step") == latest:
      return row
    print(f"[ufogen_table] {name}: the stored evaluation is of {row.get('workdir')} step "
          f"{row.get('step')}, not {here} step {latest}; judging again", flush=True)
  from md_jax import evaluate  # pylint: disable=g-import-not-at-top
  print(f"[ufogen_table] evaluate {name}: {workdir} ({sampler})", flush=True)
  # One step runs without guidance (the UFOGen generator is trained for none); DDIM uses the
  # run's configured scale.
  report = evaluate.evaluate(workdir, step=latest, sampler=sampler, num_samples=args.num_samples,
                             out=out, cfg_scales=[1.0] if sampler == "onestep" else None,
                             progress=False)
  res = report["results"][0]
  j = res["judge"]
  row = dict(name=name, workdir=here, sampler=sampler,
             num_steps=report["num_steps"], cfg=res["cfg"], step=report["step"],
             judge={k: j[k] for k in ("n", "colour", "colour_ci", "shape", "shape_ci", "position",
                                      "position_ci", "all", "rejected", "edge_width_median",
                                      "edge_width_median_ci", "edge_width_n")},
             seen_colour=j["seen"]["colour"], held_out_colour=j["held_out"]["colour"],
             grid=res["grid"])
  tests = ("c2st_spectrum", "c2st_shapes", "c2st_spectrum_recon", "c2st_shapes_recon")
  for k in ("fd_shapes", "kid_shapes", "fd_vae") + tests + tuple(t + "_auc" for t in tests):
    if k in res:
      row[k] = float(res[k])
  for k in (t + "_ci" for t in tests):
    if k in res:
      row[k] = [float(x) for x in res[k]]
  if report.get("vae_round_trip"):  # the decoder alone: real renders vs their round trip
    row["vae_round_trip"] = report["vae_round_trip"]
  # Diagnostic: the same images with the judge's sharpness and template-fit checks off.
  from md_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from md_jax.evaluators import shapes_judge  # pylint: disable=g-import-not-at-top
  prompts = [p for p, _ in shapes.eval_prompts(args.num_samples, report["seed"])]
  lenient = shapes_judge.score(list(report["images"][res["cfg"]]), prompts, require_sharp=False)
  row["lenient"] = {k: lenient[k] for k in ("colour", "shape", "position", "rejected")}
  with open(cached, "w") as f:
    json.dump(row, f, indent=1)
  return row


def _pct(x, ci=None) -> str:
  s = f"{100 * x:.1f}%"
  return s + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _c2st_cell(r, key: str) -> str:
  # Rows evaluated before a two-sample test existed print '-'.
  return _pct(r[key], r.get(key + "_ci")) if key in r else "-"


def format_table(rows) -> str:
  """The main table; the spectrum test against real renders stays in table.json (it saturates
  on the decoder's signature, which the round-trip columns cancel), and each distinct VAE
  round-trip control is printed under the table."""
  lines = ["| row | colour [95% CI] | shape | position | all | rejected | seen / held-out colour "
           "| no sharpness check: colour / shape / position | edge width [95% CI] (n) | fd_shapes "
           "| kid_shapes | C2ST shapes [95% CI] | C2ST shapes vs VAE round trip | C2ST spectrum "
           "vs VAE round trip |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  controls = {}
  for r in rows:
    j, le = r["judge"], r["lenient"]
    # Rows judged before the judge reported edge widths print '-'.
    edge = "-"
    if "edge_width_n" in j:
      lo, hi = j["edge_width_median_ci"]
      edge = f"{j['edge_width_median']:.2f} [{lo:.2f}, {hi:.2f}] ({j['edge_width_n']})"
    lines.append(
        f"| {r['name']} | {_pct(j['colour'], j['colour_ci'])} | {_pct(j['shape'])} | "
        f"{_pct(j['position'])} | {_pct(j['all'])} | {_pct(j['rejected'])} | "
        f"{_pct(r['seen_colour'])} / {_pct(r['held_out_colour'])} | "
        f"{_pct(le['colour'])} / {_pct(le['shape'])} / {_pct(le['position'])} | {edge} | "
        f"{r.get('fd_shapes', float('nan')):.0f} | {r.get('kid_shapes', float('nan')):.3f} | "
        f"{_c2st_cell(r, 'c2st_shapes')} | {_c2st_cell(r, 'c2st_shapes_recon')} | "
        f"{_c2st_cell(r, 'c2st_spectrum_recon')} |")
    rt = r.get("vae_round_trip")
    if rt:
      controls.setdefault(json.dumps(rt, sort_keys=True), (r["name"], rt))
  for first, rt in controls.values():
    lines.append(f"\nVAE round trip against real renders (the decoder alone; from {first}): "
                 f"spectrum {_c2st_cell(rt, 'c2st_spectrum')}, shapes "
                 f"{_c2st_cell(rt, 'c2st_shapes')}")
  return "\n".join(lines)


def _mean_sd(xs):
  m = sum(xs) / len(xs)
  sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else float("nan")
  return m, sd


def format_seed_table(groups) -> str:
  """``groups``: [(label, [row per seed])] -> mean +- sd over the seeds (and each seed's value)
  of the measures that rank short finetunes: edge width, lenient colour, fd_shapes and the
  shapes-feature two-sample tests' accuracies (in %) against real renders and against their
  VAE round trip."""
  lines = ["| row | seeds | edge width: mean +- sd (per seed) | colour, no sharpness check "
           "| fd_shapes | C2ST shapes | C2ST shapes vs VAE round trip |",
           "|---|---|---|---|---|---|---|"]
  for label, rows in groups:
    cols = []
    for get, fmt in ((lambda r: r["judge"].get("edge_width_median"), "{:.2f}"),
                     (lambda r: 100 * r["lenient"]["colour"], "{:.1f}"),
                     (lambda r: r.get("fd_shapes"), "{:.0f}"),
                     (lambda r: 100 * r["c2st_shapes"] if "c2st_shapes" in r else None,
                      "{:.1f}"),
                     (lambda r: (100 * r["c2st_shapes_recon"] if "c2st_shapes_recon" in r
                                 else None), "{:.1f}")):
      xs = [get(r) for r in rows]
      if any(x is None for x in xs):
        cols.append("-")
        continue
      m, sd = _mean_sd(xs)
      each = ", ".join(fmt.format(x) for x in xs)
      cols.append(f"{fmt.format(m)} +- {fmt.format(sd)} ({each})")
    lines.append(f"| {label} | {len(rows)} | " + " | ".join(cols) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--base", required=True, help="pretrained shapes diffusion run")
  parser.add_argument("--out", required=True)
  parser.add_argument("--cells", default=";".join(TABLE5),
                      help=f"';'-separated Table-5 cells and/or {NO_ADV}")
  parser.add_argument("--no_control", action="store_true", help=f"skip the {NO_ADV} row")
  parser.add_argument("--size", default="full", help="configs/ufogen.py size")
  parser.add_argument("--steps", type=int, default=0, help="finetune steps (0: the config's)")
  parser.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
  parser.add_argument("--num_samples", type=int, default=256)
  parser.add_argument("--use_run", action="append", default=[], metavar="CELL=WORKDIR")
  parser.add_argument("--seeds", default="0",
                      help="','-separated training seeds; each finetune runs once per seed")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for every finetune")
  args = parser.parse_args(argv)
  try:
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
  except ValueError:
    parser.error(f"--seeds={args.seeds!r}: expected ','-separated integers, e.g. 0,1,2")
  if not seeds or len(set(seeds)) != len(seeds):
    parser.error(f"--seeds={args.seeds!r}: expected distinct integers, e.g. 0,1,2")
  if any(kv.split("=", 1)[0] == "seed" for kv in args.set):
    parser.error("--set seed=...: give training seeds with --seeds (they name the run directories)")
  cells = [c for c in args.cells.split(";") if c]
  if not args.no_control and NO_ADV not in cells:
    cells.append(NO_ADV)
  for c in cells:
    if c not in TABLE5 and c != NO_ADV:
      parser.error(f"--cells: unknown cell {c!r}; expected one of {TABLE5} or {NO_ADV}")
  reuse = dict(kv.split("=", 1) for kv in args.use_run)
  if reuse and len(seeds) > 1:
    parser.error("--use_run reuses one finished run per cell; it cannot stand for several --seeds")
  for c, w in reuse.items():
    if not os.path.exists(os.path.join(w, "final.json")):
      parser.error(f"--use_run {c}={w}: no finished run there (final.json)")
  if not os.path.isdir(args.base):
    parser.error(f"--base={args.base}: no such run directory")
  os.makedirs(args.out, exist_ok=True)

  rows = [evaluate_row("(a) base, one step", args.base, "onestep", args),
          evaluate_row("(b) base, DDIM", args.base, "ddim", args)]
  groups = []
  for cell in cells:
    label = "(d) no adversary (diffusion,full)" if cell == NO_ADV else f"(c) {cell}"
    per_seed = []
    for seed in seeds:
      workdir = reuse.get(cell) or finetune(cell, args, seed)
      per_seed.append(evaluate_row(label + (f", seed {seed}" if seed else ""), workdir,
                                   "onestep", args))
    rows += per_seed
    groups.append((label, per_seed))
  with open(os.path.join(args.out, "table.json"), "w") as f:
    json.dump(dict(base=os.path.abspath(args.base), seeds=seeds, rows=rows), f, indent=1)
  print(format_table(rows))
  if len(seeds) > 1:
    print()
    print(format_seed_table(groups))
  print(f"written: {os.path.join(args.out, 'table.json')}")


if __name__ == "__main__":
  main()
