"""softmax -> ReLU attention finetuning on shapes: how fast does the ReLU model get its loss back?

``python benchmarks/relu_recovery.py --softmax_run=QS/highres --vae_workdir=QS/vae --out=DIR
    [--size full] [--steps 300] [--val_every 25] [--val_batches 4]``

QS is a finished quickstart (``python -m md_jax.quickstart --workdir=QS``) or any softmax-attention
shapes highres run. Two finetunes start from its params and EMA with the same data, steps and
learning rate (``configs/shapes_relu.py:SIZE``): ``DIR/relu`` with ReLU attention (paper sec. 3.2)
and ``DIR/softmax``, the control, which keeps softmax attention. Both log the held-out loss
(``config.val``: the shapes eval split, fixed noise, so both runs score the same draws) at step 0
and every ``--val_every`` steps, and end with the usual judged DDIM evaluation.

Reported: the softmax model's held-out loss before finetuning (the reference), the ReLU model's
at step 0 (softmax weights under ReLU attention), the first logged step where the ReLU model is
within 5% of the reference (``recovered_at``) and where it first reaches it (``matched_at``),
both curves and both judge results at the end.
The EMA weights (``val/loss_ema``, what evaluation samples with) decide; the raw params' loss is
listed too. Finished runs are reused, so a rerun only reprints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def run_stage(attention: str, args) -> str:
  workdir = os.path.join(args.out, attention)
  cmd = [sys.executable, "-m", "md_jax.main", f"--config=configs/shapes_relu.py:{args.size}",
         f"--workdir={workdir}", f"--config.unet.attention={attention}",
         f"--config.init_from={args.softmax_run}", f"--config.vae_workdir={args.vae_workdir}",
         f"--config.num_train_steps={args.steps}", f"--config.val.num_batches={args.val_batches}",
         f"--config.val.every={args.val_every}", "--config.progress_bar=False"]
  with open(os.path.join(args.out, f"{attention}.log"), "w") as log:
    subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
  return workdir


def recovered_at(curve: list[dict], reference: float, key: str, tolerance: float):
  for rec in curve:
    if rec[key] <= reference * (1.0 + tolerance):
      return rec["step"]
  return None


def judge_summary(workdir: str) -> dict:
  with open(os.path.join(workdir, "final.json")) as f:
    ev = json.load(f).get("eval", {})
  out = {k: ev.get(k) for k in ("colour", "shape", "position", "all", "rejected")}
  for k in ("colour", "shape", "position", "rejected"):
    out[f"unsharp_ok/{k}"] = ev.get(f"diagnostic_unsharp/{k}")
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--softmax_run", required=True)
  parser.add_argument("--vae_workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--size", default="full", help="configs/shapes_relu.py arg")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--val_every", type=int, default=25)
  parser.add_argument("--val_batches", type=int, default=4)
  parser.add_argument("--tolerance", type=float, default=0.05)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top

  curves = {}
  for attention in ("softmax", "relu"):
    curves[attention] = loop.read_jsonl(run_stage(attention, args))
  soft, relu = curves["softmax"], curves["relu"]
  report = dict(softmax_run=args.softmax_run, steps=args.steps, tolerance=args.tolerance)
  for key in ("val/loss_ema", "val/loss"):
    ref = soft[0][key]
    report[key] = dict(
        softmax_reference=ref, relu_step0=relu[0][key], relu_step0_ratio=relu[0][key] / ref,
        relu_final=relu[-1][key], softmax_final=soft[-1][key],
        recovered_at=recovered_at(relu, ref, key, args.tolerance),
        matched_at=recovered_at(relu, ref, key, 0.0))
  report["curve"] = [dict(step=r["step"], relu=r["val/loss_ema"], softmax=s["val/loss_ema"])
                     for r, s in zip(relu, soft)]
  report["judge"] = {a: judge_summary(os.path.join(args.out, a)) for a in ("softmax", "relu")}
  print("| step | relu val/loss_ema | softmax val/loss_ema | relu / softmax reference |")
  print("|---|---|---|---|")
  ref = report["val/loss_ema"]["softmax_reference"]
  for row in report["curve"]:
    print(f"| {row['step']} | {row['relu']:.5f} | {row['softmax']:.5f} | {row['relu'] / ref:.3f} |")
  print(json.dumps(report))


if __name__ == "__main__":
  main()
