"""How fast the shapes diffusion stages learn to follow prompts, per text-tower setting.

``python benchmarks/text_tower_table.py --qs=QS --out=DIR [--rows=a,b,c,d] [--budgets=330,1000]
    [--num_samples=256] [--reuse ROW=QS] [--set KEY=VALUE ...]``

QS is a finished quickstart workdir: its autoencoder (QS/light_decoder) and latent caches
(QS/latents_lowres, QS/latents_highres) are the fixed start every row shares. Each row trains the
64-px stage from scratch (the quickstart's steps) and then the 128-px stage from it, judged after
each budget of 128-px steps (the run continues from one budget to the next), with the text tower
set as:

  (a) seeded, frozen      text.hf_dir="" text.frozen=True   (the default before the shapes CLIP)
  (b) seeded, trained     text.hf_dir="" text.frozen=False
  (c) pretrained, frozen  text.hf_dir=md_jax:shapes_clip text.frozen=True   (the default)
  (d) pretrained, trained text.hf_dir=md_jax:shapes_clip text.frozen=False

``--reuse ROW=QS`` takes that row's 64-px stage and first budget from the quickstart itself
(its QS/highres is copied and continued, QS is left as it was). Each judgement is
``md_jax.evaluate`` on the same prompts and per-sample noise (DDIM at the config's steps and CFG):
strict judge scores with 95% intervals, seen and held-out attribute combinations apart, the
judge's edge width, and the caption-use gaps at t = 700 (the denoiser's error increase when the
caption lies about colour, shape or position). Finished runs and evaluations are reused. Prints
a markdown table and writes DIR/table.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRETRAINED = "md_jax:shapes_clip"
ROWS = {
    "a": ("seeded, frozen", dict(hf_dir="", frozen=True)),
    "b": ("seeded, trained", dict(hf_dir="", frozen=False)),
    "c": ("pretrained, frozen", dict(hf_dir=PRETRAINED, frozen=True)),
    "d": ("pretrained, trained", dict(hf_dir=PRETRAINED, frozen=False)),
}
GAP_T = 700


def stage_command(stage: str, workdir: str, row: str, args, steps: int | None = None,
                  init_from: str | None = None) -> list[str]:
  from md_jax import config_loading  # pylint: disable=g-import-not-at-top
  light = config_loading.load_config("configs/shapes.py:light_decoder").vae
  text = ROWS[row][1]
  cmd = [sys.executable, "-m", "md_jax.main", f"--config=configs/shapes.py:{stage}",
         f"--workdir={workdir}",
         f"--config.vae_workdir={os.path.join(args.qs, 'light_decoder')}",
         f"--config.vae.decoder_channels={tuple(light.decoder_channels)}".replace(" ", ""),
         f"--config.vae.decoder_res_blocks={light.decoder_res_blocks}",
         f"--config.vae.cache_dir={os.path.join(args.qs, 'latents_' + stage)}",
         f"--config.text.hf_dir={text['hf_dir']}", f"--config.text.frozen={text['frozen']}",
         "--config.eval_at_end=False", "--config.progress_bar=False"]
  if init_from:
    cmd.append(f"--config.init_from={init_from}")
  if steps:
    cmd.append(f"--config.num_train_steps={steps}")
  return cmd + [f"--config.{kv}" for kv in args.set]


def run(cmd: list[str], log_path: str) -> None:
  print(f"[text_tower_table] {' '.join(cmd[3:5])} (log {log_path})", flush=True)
  with open(log_path, "a") as log:
    subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)


def train_to(row: str, budget: int, args) -> str:
  """DIR/<row>/highres trained to ``budget`` 128-px steps (its 64-px stage first)."""
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  base = os.path.join(args.out, row)
  high = os.path.join(base, "highres")
  os.makedirs(base, exist_ok=True)
  if row in args.reuse_qs and not os.path.isdir(high):
    shutil.copytree(os.path.join(args.reuse_qs[row], "highres"), high)
  if (ckpt_lib.latest_step_in(high) if os.path.isdir(high) else None) == budget:
    return high
  low = os.path.join(args.reuse_qs.get(row) or base, "lowres")
  if row not in args.reuse_qs and not os.path.exists(os.path.join(low, "final.json")):
    run(stage_command("lowres", low, row, args), low + ".log")
  run(stage_command("highres", high, row, args, steps=budget, init_from=low), high + ".log")
  return high


def evaluate_row(row: str, budget: int, workdir: str, args) -> dict:
  from md_jax import evaluate  # pylint: disable=g-import-not-at-top
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  out = os.path.join(args.out, "eval", f"{row}_{budget}")
  cached = os.path.join(out, "row.json")
  here, latest = os.path.abspath(workdir), ckpt_lib.latest_step_in(workdir)
  if os.path.exists(cached):
    with open(cached) as f:
      got = json.load(f)
    if got.get("workdir") == here and got.get("step") == latest:
      return got
  print(f"[text_tower_table] evaluate ({row}) at {latest} steps", flush=True)
  report = evaluate.evaluate(workdir, step=latest, num_samples=args.num_samples, out=out,
                             progress=False)
  res = report["results"][0]
  j = res["judge"]
  keep = ("colour", "colour_ci", "shape", "shape_ci", "position", "position_ci", "all",
          "rejected", "edge_width_median", "edge_width_median_ci", "n")
  got = dict(row=row, name=ROWS[row][0], budget=budget, workdir=here, step=latest,
             judge={k: j[k] for k in keep if k in j},
             seen={k: j["seen"][k] for k in ("colour", "shape", "position")},
             held_out={k: j["held_out"][k] for k in ("colour", "shape", "position")},
             gaps={a: float(report["caption_use"][f"caption_use/{a}_gap/t{GAP_T}"])
                   for a in ("colour", "shape", "position")},
             fd_shapes=float(res.get("fd_shapes", float("nan"))), grid=res["grid"])
  with open(cached, "w") as f:
    json.dump(got, f, indent=1)
  return got


def _pct(x, ci=None) -> str:
  s = f"{100 * x:.1f}"
  return s + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")


def format_table(rows) -> str:
  lines = ["| text tower | 128-px steps | colour % [95% CI] | shape % | position % | seen c/s/p "
           "| held-out c/s/p | rejected % | edge px | gaps t700 c/s/p |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    j = r["judge"]
    trio = lambda d: " / ".join(f"{100 * d[k]:.0f}" for k in ("colour", "shape", "position"))
    lines.append(
        f"| ({r['row']}) {r['name']} | {r['step']} | {_pct(j['colour'], j['colour_ci'])} | "
        f"{_pct(j['shape'], j['shape_ci'])} | {_pct(j['position'], j['position_ci'])} | "
        f"{trio(r['seen'])} | {trio(r['held_out'])} | {_pct(j['rejected'])} | "
        f"{j.get('edge_width_median', float('nan')):.2f} | "
        + " / ".join(f"{r['gaps'][a]:.3f}" for a in ("colour", "shape", "position")) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--qs", required=True, help="a finished quickstart workdir")
  parser.add_argument("--out", required=True)
  parser.add_argument("--rows", default="a,b,c,d")
  parser.add_argument("--budgets", default="330,1000", help="128-px step counts, increasing")
  parser.add_argument("--num_samples", type=int, default=256)
  parser.add_argument("--reuse", action="append", default=[], metavar="ROW=QS")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for every stage")
  args = parser.parse_args(argv)
  rows = [r for r in args.rows.split(",") if r]
  for r in rows:
    if r not in ROWS:
      parser.error(f"--rows: unknown row {r!r}; expected some of {sorted(ROWS)}")
  try:
    budgets = [int(b) for b in args.budgets.split(",") if b]
  except ValueError:
    parser.error(f"--budgets={args.budgets!r}: expected increasing integers, e.g. 330,1000")
  if not budgets or budgets != sorted(set(budgets)) or budgets[0] <= 0:
    parser.error(f"--budgets={args.budgets!r}: expected increasing positive integers")
  for name in ("light_decoder", "latents_lowres", "latents_highres"):
    if not os.path.isdir(os.path.join(args.qs, name)):
      parser.error(f"--qs={args.qs}: no {name}/ (run bash launch/quickstart.sh first)")
  args.qs = os.path.abspath(args.qs)
  args.reuse_qs = {}
  for kv in args.reuse:
    row, _, qs = kv.partition("=")
    if row not in ROWS or not os.path.exists(os.path.join(qs, "highres", "final.json")):
      parser.error(f"--reuse {kv}: expected ROW=QS with a finished QS/highres")
    args.reuse_qs[row] = os.path.abspath(qs)
  os.makedirs(args.out, exist_ok=True)
  table = []
  for row in rows:
    for budget in budgets:
      table.append(evaluate_row(row, budget, train_to(row, budget, args), args))
      with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(dict(qs=args.qs, rows=table), f, indent=1)
  print(format_table(table))
  print(f"written: {os.path.join(args.out, 'table.json')}")


if __name__ == "__main__":
  main()
