"""Checks every .tflite file of a bundle: `python -m tflite_export.check BUNDLE_DIR`.

Per file (the component's role and delegate come from manifest.json):
  builtin     builtin ops only: no Flex, no CUSTOM, no STABLEHLO_COMPOSITE
  gpu_ops     UNet/decoder: every op in gpu_ops.GPU_DELEGATE_OPS, and no GATHER
  rank        every tensor of rank <= 4 (the Analyzer does not flag rank 5)
  analyzer    tf.lite.experimental.Analyzer with gpu_compatibility=True (an error for a graph
              meant for the GPU delegate, a note otherwise)
  ranges      max |x| of every float activation on the bundle's representative inputs: over
              65504 / FP16_HEADROOM would overflow fp16 on the GPU (an error for GPU graphs);
              over FP16_LARGE (spacing >= 2 there, small residual updates vanish) or many values
              in fp16's subnormal range are precision warnings
  parity      against the JAX function's outputs on seeded inputs stored at export: max-abs and
              relative error (max-abs / max |ref|) for float models; for dr8/int8 the PSNR of the
              decoded image (the decoder's own output, or the one-step UNet's x0 decoded by the
              bundle's float decoder on both sides)

Exit status 1 when any file has an error; the report names the failing op or tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from tflite_export import gpu_ops

FP16_MAX = 65504.0
FP16_HEADROOM = 2.0  # a representative maximum within 2x of the fp16 limit is an overflow risk
FP16_LARGE = 2048.0
FP16_MIN_NORMAL = 2.0 ** -14
SUBNORMAL_FRACTION = 0.05

# Parity limits per precision: `rel` for float outputs, `psnr` (dB) where an image is available.
TOLERANCES = {
    "fp32": dict(rel=1e-3),
    "fp16": dict(rel=2e-2),
    "dr8": dict(rel=0.35, psnr=20.0),
    "int8": dict(rel=0.35, psnr=20.0),
}


@dataclasses.dataclass
class Finding:
  check: str
  severity: str  # 'error' | 'warning' | 'info'
  message: str

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
  file: str
  component: str = ""
  role: str = ""
  delegate: str = ""
  precision: str = ""
  findings: list = dataclasses.field(default_factory=list)
  metrics: dict = dataclasses.field(default_factory=dict)

  @property
  def errors(self) -> list[Finding]:
    return [f for f in self.findings if f.severity == "error"]

  @property
  def ok(self) -> bool:
    return not self.errors

  def add(self, check: str, severity: str, message: str) -> None:
    self.findings.append(Finding(check, severity, message))

  def to_json(self) -> dict:
    return dict(file=self.file, component=self.component, role=self.role,
                delegate=self.delegate, precision=self.precision, ok=self.ok,
                findings=[f.to_json() for f in self.findings], metrics=self.metrics)


# -- reading the flatbuffer ----------------------------------------------------------------------


def _op_names() -> dict[int, str]:
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


_TYPE_NAMES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool",
               7: "int16", 9: "int8", 10: "float64"}


def read_graph(blob: bytes) -> dict:
  """Ops and tensors of subgraph 0 of a TFLite flatbuffer (all subgraphs for the op list)."""
  from tensorflow.lite.tools import flatbuffer_utils  # pylint: disable=g-import-not-at-top
  model = flatbuffer_utils.read_model_from_bytearray(bytearray(blob))
  names = _op_names()
  codes = []
  for oc in model.operatorCodes:
    code = max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode))
    name = names.get(code, f"BUILTIN_{code}")
    if name == "CUSTOM":
      custom = oc.customCode.decode() if isinstance(oc.customCode, bytes) else str(oc.customCode)
      name = custom if custom.startswith(gpu_ops.NON_BUILTIN_PREFIXES) else f"CUSTOM:{custom}"
    codes.append(name)
  ops, tensors = [], []
  for si, sg in enumerate(model.subgraphs):
    tnames = [t.name.decode() if isinstance(t.name, bytes) else str(t.name) for t in sg.tensors]
    for oi, op in enumerate(sg.operators or []):
      outs = [tnames[i] for i in (op.outputs if op.outputs is not None else []) if i >= 0]
      ops.append(dict(subgraph=si, index=oi, op=codes[op.opcodeIndex], outputs=outs,
                      input_ids=[int(i) for i in (op.inputs if op.inputs is not None else [])
                                 if i >= 0],
                      output_ids=[int(i) for i in (op.outputs if op.outputs is not None else [])]))
    for ti, t in enumerate(sg.tensors):
      buf = model.buffers[t.buffer] if t.buffer < len(model.buffers) else None
      const = buf is not None and ((buf.data is not None and len(buf.data) > 0)
                                   or int(getattr(buf, "size", 0) or 0) > 0)
      shape = [int(d) for d in (t.shape if t.shape is not None else [])]
      tensors.append(dict(subgraph=si, index=ti, name=tnames[ti], shape=shape,
                          dtype=_TYPE_NAMES.get(int(t.type), f"type{t.type}"), const=const))
  return dict(ops=ops, tensors=tensors, num_subgraphs=len(model.subgraphs))


def _where(op: dict) -> str:
  out = op["outputs"][0] if op["outputs"] else "?"
  return f"op #{op['index']} {op['op']} (output '{out}')"


def check_ops(graph: dict, role: str, report: Report) -> None:
  bad_builtin = [op for op in graph["ops"]
                 if op["op"].startswith(gpu_ops.NON_BUILTIN_PREFIXES) or op["op"].startswith(
                     "CUSTOM") or op["op"] in gpu_ops.NON_BUILTIN_OPS]
  for op in bad_builtin:
    report.add("builtin", "error", f"non-builtin {_where(op)}")
  counts: dict[str, int] = {}
  for op in graph["ops"]:
    counts[op["op"]] = counts.get(op["op"], 0) + 1
  report.metrics["ops"] = dict(sorted(counts.items()))
  if role in ("unet", "decoder"):
    for op in graph["ops"]:
      if op in bad_builtin:
        continue
      if op["op"] in gpu_ops.FORBIDDEN_IN_GPU_GRAPHS:
        report.add("gpu_ops", "error", f"{op['op']} in a {role} graph: {_where(op)}")
      elif op["op"] not in gpu_ops.GPU_DELEGATE_OPS:
        report.add("gpu_ops", "error",
                   f"{_where(op)} is not in the GPU delegate's supported ops ({gpu_ops.SOURCE})")


def check_ranks(graph: dict, report: Report, max_rank: int = gpu_ops.MAX_RANK) -> None:
  worst = 0
  for t in graph["tensors"]:
    worst = max(worst, len(t["shape"]))
    if len(t["shape"]) > max_rank:
      report.add("rank", "error", f"tensor '{t['name']}' has rank {len(t['shape'])} "
                 f"{t['shape']} {t['dtype']} (max {max_rank})")
  report.metrics["max_rank"] = worst


def run_analyzer(blob: bytes) -> str:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    tf.lite.experimental.Analyzer.analyze(model_content=blob, gpu_compatibility=True)
  return buf.getvalue()


def check_analyzer(blob: bytes, delegate: str, report: Report) -> str:
  text = run_analyzer(blob)
  warnings = [line.strip() for line in text.splitlines() if "GPU COMPATIBILITY WARNING" in line
              or "Not supported" in line]
  severity = "error" if delegate == "gpu" else "info"
  for w in dict.fromkeys(warnings):
    report.add("analyzer", severity, w)
  report.metrics["analyzer_gpu_warnings"] = len(warnings)
  return text


# -- running ------------------------------------------------------------------------------------


def make_interpreter(path_or_blob, *, num_threads: int = 2, preserve: bool = False):
  """A LiteRT interpreter; `preserve` keeps every intermediate (and disables XNNPACK, whose
  fused partitions would hide them)."""
  from ai_edge_litert import interpreter as litert  # pylint: disable=g-import-not-at-top
  kw: dict[str, Any] = dict(num_threads=num_threads)
  if isinstance(path_or_blob, (bytes, bytearray)):
    kw["model_content"] = bytes(path_or_blob)
  else:
    kw["model_path"] = path_or_blob
  if preserve:
    kw["experimental_preserve_all_tensors"] = True
    kw["experimental_op_resolver_type"] = (
        litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
  return litert.Interpreter(**kw)


def run(interp, inputs: dict) -> dict:
  runner = interp.get_signature_runner()
  details = runner.get_input_details()
  feed = {k: np.asarray(v, details[k]["dtype"]) for k, v in inputs.items()}
  return {k: np.asarray(v) for k, v in runner(**feed).items()}


def activation_ranges(path_or_blob, graph: dict, samples: Sequence[dict]) -> dict[str, dict]:
  """{tensor name: max |x|, subnormal fraction} over float32 op outputs of subgraph 0."""
  interp = make_interpreter(path_or_blob, preserve=True)
  runner = interp.get_signature_runner()
  details = runner.get_input_details()
  outs = {}
  consts = {t["index"] for t in graph["tensors"] if t["subgraph"] == 0 and t["const"]}
  for op in graph["ops"]:
    # A DEQUANTIZE of a constant is a weight (fp16/int8 storage), not an activation.
    if op["subgraph"] == 0 and not (op["op"] == "DEQUANTIZE" and set(op["input_ids"]) <= consts):
      for tid, name in zip([i for i in op["output_ids"] if i >= 0], op["outputs"]):
        if graph["tensors"][tid]["dtype"] == "float32":
          outs[tid] = name
  stats: dict[str, dict] = {}
  for sample in samples:
    runner(**{k: np.asarray(v, details[k]["dtype"]) for k, v in sample.items()})
    for tid, name in outs.items():
      try:
        x = np.asarray(interp.get_tensor(tid), np.float32)
      except ValueError:
        continue
      if not x.size:
        continue
      a = np.abs(x)
      nz = a[a > 0]
      sub = float(np.mean(nz < FP16_MIN_NORMAL)) if nz.size else 0.0
      s = stats.setdefault(name, dict(max_abs=0.0, subnormal_fraction=0.0, nonfinite=False))
      s["max_abs"] = max(s["max_abs"], float(np.max(a[np.isfinite(a)])) if np.any(
          np.isfinite(a)) else float("inf"))
      s["subnormal_fraction"] = max(s["subnormal_fraction"], sub)
      s["nonfinite"] = s["nonfinite"] or not bool(np.all(np.isfinite(x)))
  return stats


def check_ranges(stats: dict[str, dict], delegate: str, report: Report) -> None:
  limit = FP16_MAX / FP16_HEADROOM
  severity = "error" if delegate == "gpu" else "warning"
  for name, s in stats.items():
    if s["nonfinite"]:
      report.add("ranges", severity,
                 f"tensor '{name}' is not finite on representative inputs")
    elif s["max_abs"] > limit:
      report.add("ranges", severity,
                 f"fp16 overflow risk: tensor '{name}' reaches |x| = {s['max_abs']:.4g} "
                 f"(fp16 max {FP16_MAX:g}, headroom {FP16_HEADROOM:g}x)")
    elif s["max_abs"] > FP16_LARGE:
      report.add("ranges", "warning",
                 f"fp16 precision: tensor '{name}' reaches |x| = {s['max_abs']:.4g} "
                 f"(fp16 spacing >= 2 above {FP16_LARGE:g})")
    if s["subnormal_fraction"] > SUBNORMAL_FRACTION:
      report.add("ranges", "warning",
                 f"fp16 precision: {100 * s['subnormal_fraction']:.1f}% of tensor '{name}''s "
                 f"non-zero values are below fp16's smallest normal {FP16_MIN_NORMAL:.3g}")
  top = sorted(stats.items(), key=lambda kv: -kv[1]["max_abs"])[:5]
  report.metrics["max_abs_activation"] = {k: round(v["max_abs"], 4) for k, v in top}


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Images in [0, 1] to the uint8 pixels an app shows (round to nearest, clipped)."""
  return np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
  mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
  return float("inf") if mse == 0 else 10.0 * np.log10(peak ** 2 / mse)


def check_parity(path_or_blob, parity: dict, precision: str, role: str, report: Report, *,
                 tolerances: dict | None = None, decoder=None, component: str = "") -> None:
  """`parity` = dict(inputs={name: (N, ...)}, outputs={name: (N, ...)}) from the JAX function."""
  tol = dict(TOLERANCES[precision])
  tol.update((tolerances or {}).get(precision, {}))
  interp = make_interpreter(path_or_blob)
  n = len(next(iter(parity["inputs"].values())))
  got: dict[str, list] = {}
  for i in range(n):
    out = run(interp, {k: v[i] for k, v in parity["inputs"].items()})
    for k, v in out.items():
      got.setdefault(k, []).append(v)
  metrics = {}
  quantized = precision in ("dr8", "int8")
  for k, ref in parity["outputs"].items():
    if k not in got:
      report.add("parity", "error", f"output '{k}' missing from the TFLite model")
      continue
    y = np.stack(got[k]).reshape(ref.shape)
    err = float(np.max(np.abs(y - ref)))
    rel = err / max(float(np.max(np.abs(ref))), 1e-12)
    m = dict(max_abs=err, rel=rel)
    image_psnr = None
    if role == "decoder":
      image_psnr = psnr(y, ref)
    elif component == "unet_onestep" and decoder is not None:
      dec = make_interpreter(decoder)
      img = lambda z: np.stack([run(dec, {"latent": zi})["image"] for zi in z])
      image_psnr = psnr(img(y), img(ref))
    if image_psnr is not None:
      m["psnr_db"] = image_psnr
    metrics[k] = m
    if quantized and image_psnr is not None:
      if image_psnr < tol["psnr"]:
        report.add("parity", "error", f"output '{k}': decoded-image PSNR {image_psnr:.2f} dB "
                   f"< {tol['psnr']} dB vs JAX")
    elif rel > tol["rel"]:
      report.add("parity", "error", f"output '{k}': max-abs error {err:.3g}, relative {rel:.3g} "
                 f"> {tol['rel']:g} vs JAX")
  report.metrics["parity"] = metrics


# -- a whole model, a whole bundle ---------------------------------------------------------------


def check_model(path_or_blob, *, role: str, delegate: str, precision: str, component: str = "",
                representative: Sequence[dict] = (), parity: dict | None = None,
                decoder=None, tolerances: dict | None = None, max_range_samples: int = 4,
                file: str = "") -> Report:
  """All checks on one TFLite model (a path or the flatbuffer bytes)."""
  is_blob = isinstance(path_or_blob, (bytes, bytearray))
  if not is_blob:
    file = file or os.path.basename(path_or_blob)
  report = Report(file=file or component, component=component, role=role, delegate=delegate,
                  precision=precision)
  try:
    if is_blob:
      blob = bytes(path_or_blob)
    else:
      with open(path_or_blob, "rb") as f:
        blob = f.read()
    graph = read_graph(blob)
  except OSError as e:
    report.add("readable", "error", f"cannot read {path_or_blob}: {e.strerror or e}")
    return report
  except Exception as e:  # pylint: disable=broad-except  (the flatbuffer reader's many errors)
    report.add("readable", "error",
               f"not a TFLite flatbuffer ({type(e).__name__}: {e}); re-export the bundle")
    return report
  check_ops(graph, role, report)
  check_ranks(graph, report)
  check_analyzer(blob, delegate, report)
  if any(f.check == "builtin" for f in report.errors):
    return report  # a non-builtin op would not load in LiteRT: nothing to run
  if representative:
    stats = activation_ranges(blob, graph, list(representative)[:max_range_samples])
    check_ranges(stats, delegate, report)
  if parity is not None:
    check_parity(blob, parity, precision, role, report, tolerances=tolerances, decoder=decoder,
                 component=component)
  return report


def load_arrays(path: str) -> dict:
  """checks/<component>.npz -> dict(parity=dict(inputs, outputs), representative=[...])."""
  with np.load(path) as z:
    data = {k: z[k] for k in z.files}
  group = lambda prefix: {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
  rep = group("rep_in/")
  n = len(next(iter(rep.values()))) if rep else 0
  representative = [{k: v[i] for k, v in rep.items()} for i in range(n)]
  parity = dict(inputs=group("parity_in/"), outputs=group("parity_out/"))
  return dict(parity=parity if parity["inputs"] else None, representative=representative)


def save_arrays(path: str, *, representative: Sequence[dict], parity_inputs: dict,
                parity_outputs: dict) -> None:
  arrays = {}
  if representative:
    for k in representative[0]:
      arrays[f"rep_in/{k}"] = np.stack([np.asarray(s[k]) for s in representative])
  arrays.update({f"parity_in/{k}": np.asarray(v) for k, v in parity_inputs.items()})
  arrays.update({f"parity_out/{k}": np.asarray(v) for k, v in parity_outputs.items()})
  np.savez_compressed(path, **arrays)


def _float_decoder(bundle: str, manifest: dict) -> str | None:
  files = manifest.get("components", {}).get("decoder", {}).get("files", {})
  for p in ("fp32", "fp16"):
    if p in files:
      return os.path.join(bundle, files[p]["file"])
  return None


class BundleError(ValueError):
  """A bundle directory that cannot be checked at all (missing, or without a readable
  manifest)."""


def read_manifest(bundle: str) -> dict:
  if not os.path.isdir(bundle):
    what = "not a directory" if os.path.exists(bundle) else "no such directory"
    raise BundleError(f"{bundle}: {what} (pass the bundle directory tflite_export.export wrote)")
  path = os.path.join(bundle, "manifest.json")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise BundleError(f"{path} not found: not a bundle directory (tflite_export.export writes "
                      "one)") from None
  except ValueError as e:
    raise BundleError(f"{path} is not valid JSON ({e}): re-export the bundle") from None
  if not isinstance(manifest.get("components"), dict):
    raise BundleError(f"{path} has no 'components': re-export the bundle")
  return manifest


def check_bundle(bundle: str, *, log=print) -> list[Report]:
  """Checks every file of every component; an unreadable file is a failed report of its own and
  the others are still checked. Raises BundleError when there is no bundle to check."""
  manifest = read_manifest(bundle)
  decoder = _float_decoder(bundle, manifest)
  tolerances = manifest.get("tolerances")
  reports = []
  for name, comp in manifest["components"].items():
    arrays_path = os.path.join(bundle, comp["checks_data"]) if comp.get("checks_data") else None
    arrays = load_arrays(arrays_path) if arrays_path else dict(parity=None, representative=[])
    for precision, info in comp["files"].items():
      path = os.path.join(bundle, info["file"])
      rep = check_model(path, role=comp["role"], delegate=comp["delegate"], precision=precision,
                        component=name, representative=arrays["representative"],
                        parity=arrays["parity"], decoder=decoder, tolerances=tolerances)
      reports.append(rep)
      log(format_report(rep))
  return reports


def format_report(report: Report) -> str:
  head = (f"{'PASS' if report.ok else 'FAIL'} {report.file} ({report.component}, "
          f"{report.precision}, {report.delegate})")
  lines = [head]
  par = report.metrics.get("parity", {})
  for k, m in par.items():
    extra = f", PSNR {m['psnr_db']:.2f} dB" if "psnr_db" in m else ""
    lines.append(f"  parity {k}: max-abs {m['max_abs']:.3g}, rel {m['rel']:.3g}{extra}")
  if "max_abs_activation" in report.metrics:
    top = next(iter(report.metrics["max_abs_activation"].items()), None)
    if top:
      lines.append(f"  largest activation: '{top[0]}' |x| = {top[1]:g}")
  shown: dict[tuple, int] = {}
  for f in report.findings:
    if f.severity == "info":
      continue
    key = (f.severity, f.check)
    shown[key] = shown.get(key, 0) + 1
    if f.severity == "error" or shown[key] <= 3:
      lines.append(f"  {f.severity}: [{f.check}] {f.message}")
  for (sev, chk), n in shown.items():
    if sev != "error" and n > 3:
      lines.append(f"  ... {n - 3} more {sev}s of [{chk}] (see --json)")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("bundle")
  parser.add_argument("--json", help="write the reports here as JSON")
  args = parser.parse_args(argv)
  try:
    reports = check_bundle(args.bundle)
  except BundleError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    with open(args.json, "w") as f:
      json.dump([r.to_json() for r in reports], f, indent=1)
  bad = [r for r in reports if not r.ok]
  print(f"{len(reports) - len(bad)}/{len(reports)} models pass")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
