"""TFLite CPU latency per component and precision (XNNPACK, 2 threads) vs the jitted JAX function.

  python benchmarks/tflite_cpu.py --config=configs/shapes.py:highres [--image_size=64]
      [--precisions=fp32,fp16,dr8,int8] [--components=...] [--runs=10] [--out=DIR]

Fresh seeded weights (latency does not depend on them). Prints a markdown table (median ms over
`runs` after one warm-up, file size, conversion time) and writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_ms(fn, runs: int) -> float:
  fn()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1000.0 * float(np.median(times))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/shapes.py:highres")
  parser.add_argument("--image_size", type=int)
  parser.add_argument("--precisions", default="fp32,fp16,dr8,int8")
  parser.add_argument("--components", default="text_encoder,unet_onestep,decoder")
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--out")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  from md_jax import config_loading  # pylint: disable=g-import-not-at-top
  from tflite_export import check  # pylint: disable=g-import-not-at-top
  from tflite_export import convert  # pylint: disable=g-import-not-at-top

  config = config_loading.load_config(args.config)
  names = args.components.split(",")
  comps, _ = convert.components_from_config(config, names=names, image_size=args.image_size,
                                            num_representative=8)
  out_dir = args.out or tempfile.mkdtemp(prefix="tflite_bench_")
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for name, comp in comps.items():
    sample = comp.representative[0]
    jitted = jax.jit(comp.fn)
    jax_in = [jax.numpy.asarray(x) for x in sample]
    jax_ms = _median_ms(lambda: jax.block_until_ready(jitted(comp.params, *jax_in)), args.runs)
    rows.append(dict(component=name, precision="jax-jit fp32", ms=jax_ms, mb=None, convert_s=None))
    print(f"{name} jax: {jax_ms:.2f} ms", flush=True)
    info = convert.convert_all(comp, args.precisions.split(","), out_dir)
    feed = {s.name: np.asarray(x, s.dtype) for s, x in zip(comp.inputs, sample)}
    for p, i in info.items():
      interp = check.make_interpreter(os.path.join(out_dir, i["file"]), num_threads=args.threads)
      ms = _median_ms(lambda: check.run(interp, feed), args.runs)
      rows.append(dict(component=name, precision=p, ms=ms, mb=i["bytes"] / 1e6,
                       convert_s=i["convert_s"] + i["saved_model_s"]))
      print(f"{name} {p}: {ms:.2f} ms, {i['bytes'] / 1e6:.2f} MB", flush=True)
  print(f"\n{args.config} image_size={args.image_size or config.data.image_size}, "
        f"XNNPACK {args.threads} threads, median of {args.runs}\n")
  print("| component | precision | latency ms | file MB | convert s |")
  print("|---|---|---|---|---|")
  for r in rows:
    mb = "" if r["mb"] is None else f"{r['mb']:.2f}"
    cs = "" if r["convert_s"] is None else f"{r['convert_s']:.1f}"
    print(f"| {r['component']} | {r['precision']} | {r['ms']:.2f} | {mb} | {cs} |")
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(dict(config=args.config, threads=args.threads, runs=args.runs, rows=rows), f,
              indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
