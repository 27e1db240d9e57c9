"""The checker on small deliberately bad graphs: each defect is caught and named."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from md_jax.diffusion import schedule as sch  # pylint: disable=g-import-not-at-top
from tflite_export import check  # pylint: disable=g-import-not-at-top
from tflite_export import convert  # pylint: disable=g-import-not-at-top
from tflite_export import gpu_ops  # pylint: disable=g-import-not-at-top

S = convert.TensorSpec
X = (S("x", (1, 4, 4, 8), "float32"),)
W = dict(w=np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32) / 3)
REP = [dict(x=np.random.default_rng(i).standard_normal((1, 4, 4, 8)).astype(np.float32))
       for i in range(2)]


def _component(fn, params=W):
  return convert.Component(name="unet", role="unet", fn=fn, params=params, inputs=X,
                           outputs=("y",), delegate="gpu")


def _check(fn, params=W, parity=None):
  comp = _component(fn, params)
  blob = convert.convert(comp, "fp32")
  return check.check_model(blob, role="unet", delegate="gpu", precision="fp32",
                           component="unet", representative=REP, parity=parity)


def _errors(report, name):
  return [f.message for f in report.errors if f.check == name]


def test_good_graph_passes_with_parity():
  fn = lambda p, x: {"y": jnp.tanh(x @ p["w"]) + x}
  comp = _component(fn)
  inputs = dict(x=np.stack([r["x"] for r in REP]))
  outputs = dict(y=np.stack([comp.jax_apply(r["x"])["y"] for r in REP]))
  report = _check(fn, parity=dict(inputs=inputs, outputs=outputs))
  assert report.ok, check.format_report(report)
  assert report.metrics["parity"]["y"]["rel"] < 1e-5
  assert report.metrics["max_rank"] == 4


def test_catches_rank5_tensor():
  # jnp.repeat goes through a rank-5 broadcast (DESIGN 6); the Analyzer does not flag it.
  report = _check(lambda p, x: {"y": jnp.repeat(x @ p["w"], 2, axis=1)})
  ranks = _errors(report, "rank")
  assert ranks and all("rank 5" in m for m in ranks)
  assert any("[1, 4, 2, 4, 8]" in m for m in ranks)


def test_catches_op_outside_gpu_set():
  report = _check(lambda p, x: {"y": jnp.argmax(x @ p["w"], axis=-1).astype(jnp.float32)})
  msgs = _errors(report, "gpu_ops")
  assert any("ARG_MAX" in m and "not in the GPU delegate" in m for m in msgs), msgs
  assert "ARG_MAX" not in gpu_ops.GPU_DELEGATE_OPS


def test_catches_broadcast_to_the_analyzer_accepts():
  fn = lambda p, x: {"y": jnp.concatenate(
      [x, jnp.broadcast_to(jnp.max(x, axis=-1, keepdims=True), x.shape)], -1) @ p["w2"]}
  report = _check(fn, dict(w2=np.ones((16, 8), np.float32)))
  assert any("BROADCAST_TO" in m for m in _errors(report, "gpu_ops"))
  assert not [f for f in report.findings if f.check == "analyzer"]  # why we check ourselves


def test_catches_gather_in_unet_graph():
  fn = lambda p, x: {"y": p["w"][jnp.clip(x[0, 0, :, 0], 0, 7).astype(jnp.int32)][None, None]}
  report = _check(fn)
  assert any("GATHER" in m and "unet graph" in m for m in _errors(report, "gpu_ops"))


def test_catches_fp16_overflow():
  report = _check(lambda p, x: {"y": jnp.tanh((x @ p["w"]) * 1e5)})
  msgs = _errors(report, "ranges")
  assert msgs and "fp16 overflow" in msgs[0] and "dot_general" in msgs[0]
  # On a CPU-delegate graph the same range is only a warning.
  blob = convert.convert(_component(lambda p, x: {"y": jnp.tanh((x @ p["w"]) * 1e5)}), "fp32")
  cpu = check.check_model(blob, role="text", delegate="cpu", precision="fp32",
                          representative=REP)
  assert cpu.ok and any(f.check == "ranges" for f in cpu.findings)


def test_catches_parity_failure():
  fn = lambda p, x: {"y": jnp.tanh(x @ p["w"])}
  comp = _component(fn)
  inputs = dict(x=np.stack([r["x"] for r in REP]))
  # The "JAX function" the graph is compared with differs from the converted one.
  wrong = convert.Component(name="unet", role="unet", fn=fn, params=dict(w=W["w"] * 1.1),
                            inputs=X, outputs=("y",), delegate="gpu")
  outputs = dict(y=np.stack([wrong.jax_apply(r["x"])["y"] for r in REP]))
  report = check.check_model(convert.convert(comp, "fp32"), role="unet", delegate="gpu",
                             precision="fp32", parity=dict(inputs=inputs, outputs=outputs))
  msgs = _errors(report, "parity")
  assert msgs and "output 'y'" in msgs[0] and "relative" in msgs[0]


@pytest.mark.parametrize("ptype", ["v", "x0", "eps"])
def test_x0_from_prediction_matches_schedule(ptype):
  s = sch.NoiseSchedule.create(prediction_type=ptype, zero_terminal_snr=ptype != "eps")
  t = 999 if ptype != "eps" else 990
  c = convert.schedule_constants(s, t)
  rng = np.random.default_rng(0)
  x, pred = rng.standard_normal((2, 1, 4, 4, 8)).astype(np.float32)
  want = sch.pred_to_x0(s, jnp.asarray(pred), jnp.asarray(x), jnp.full((1,), t))
  got = convert.x0_from_prediction(jnp.asarray(pred), jnp.asarray(x), c["alpha"], c["sigma"],
                                   ptype)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bundle_with_unreadable_files_fails_them_and_checks_the_rest(tmp_path, capsys):
  """A .tflite that is not a flatbuffer, or is missing, is a FAIL of that file (no traceback)
  and the other files are still checked; no bundle at all is one `error:` line and exit 2."""
  import json  # pylint: disable=g-import-not-at-top
  good = convert.convert(_component(lambda p, x: {"y": x @ p["w"]}), "fp32")
  (tmp_path / "good.tflite").write_bytes(good)
  (tmp_path / "bad.tflite").write_bytes(b"definitely not a flatbuffer")
  comp = lambda f: dict(role="unet", delegate="gpu", files={"fp32": {"file": f}})
  manifest = dict(components={"a": comp("bad.tflite"), "b": comp("missing.tflite"),
                              "c": comp("good.tflite")})
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  assert check.main([str(tmp_path)]) == 1
  out = capsys.readouterr().out
  assert "FAIL bad.tflite" in out and "[readable] not a TFLite flatbuffer" in out
  assert "FAIL missing.tflite" in out and "[readable] cannot read" in out
  assert "PASS good.tflite" in out and "1/3 models pass" in out
  for bundle, message in ((tmp_path / "none", "no such directory"),
                          (tmp_path / "good.tflite", "not a directory"),
                          (tmp_path.parent, "manifest.json not found")):
    assert check.main([str(bundle)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
