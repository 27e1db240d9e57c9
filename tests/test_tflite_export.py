"""A tiny shapes bundle end to end: export (fp16, int8), checks, manifest, LiteRT pipeline."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from conftest import REPO, cli_env, run_module, tiny_config  # pylint: disable=g-import-not-at-top
from tflite_export import check  # pylint: disable=g-import-not-at-top
from tflite_export import convert  # pylint: disable=g-import-not-at-top
from tflite_export import export  # pylint: disable=g-import-not-at-top
from tflite_export import pipeline  # pylint: disable=g-import-not-at-top

PROMPT = "a blue square in the middle"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  config = tiny_config("lowres")
  # 64 px (latent 8x8): at 32 px the UNet's innermost map is 1x1 and its upsample converts to
  # GATHER_ND, which the checker rightly refuses.
  comps, ld = convert.components_from_config(
      config, names=("text_encoder", "unet_onestep", "decoder"), image_size=64,
      num_representative=3)
  out = str(tmp_path_factory.mktemp("bundle") / "b")
  manifest = export.write_bundle(out, comps, ld, config, precisions=("fp16", "int8"),
                                 prompt=PROMPT, seed=3, source=dict(config="tiny"))
  return dict(dir=out, manifest=manifest, comps=comps, ld=ld, config=config)


@pytest.mark.slow
def test_bundle_passes_checks_and_manifest_is_complete(bundle):
  m = bundle["manifest"]
  assert set(m["components"]) == {"text_encoder", "unet_onestep", "decoder"}
  assert all(r["ok"] for r in m["checks"].values()), m["checks"]
  assert len(m["checks"]) == 6
  unet = m["components"]["unet_onestep"]
  assert unet["delegate"] == "gpu" and m["components"]["text_encoder"]["delegate"] == "cpu"
  assert unet["inputs"][0] == dict(name="noise", shape=[1, 8, 8, 8], dtype="float32")
  assert unet["outputs"][0]["name"] == "x0"
  assert m["schedule"]["t"] == 999 and m["schedule"]["alpha"] == 0.0
  assert m["model_config"]["unet"]["channels"] == [16, 32, 32]
  for info in [f for c in m["components"].values() for f in c["files"].values()]:
    assert os.path.getsize(os.path.join(bundle["dir"], info["file"])) == info["bytes"]
  for f in m["tokenizer"]["files"]:
    assert os.path.exists(os.path.join(bundle["dir"], "tokenizer", f))
  golden = np.load(os.path.join(bundle["dir"], m["golden"]["file"]))
  assert golden["image_u8"].shape == (1, 64, 64, 3) and golden["x0"].shape == (1, 8, 8, 8)
  ops = m["checks"]["unet_onestep_fp16.tflite"]["metrics"]["ops"]
  assert "GATHER" not in ops and "GATHER_ND" not in ops and "CONV_2D" in ops


def test_bf16_trained_config_exports_float32_graphs():
  """Pod stages train in bfloat16; their TFLite graphs must still be float32 (a bf16 matmul of
  the paper-size UNet failed to convert: an illegal BATCH_MATMUL)."""
  config = tiny_config("lowres")
  with config.unlocked():
    config.compute_dtype = "bfloat16"
  comps, ld = convert.components_from_config(config, names=("unet_onestep",), image_size=64,
                                             num_representative=1)
  assert ld.config.compute_dtype == "float32" and config.compute_dtype == "bfloat16"
  unet = comps["unet_onestep"]
  jaxpr = str(jax.make_jaxpr(unet.fn)(unet.params, *unet.representative[0]))
  assert "bf16" not in jaxpr and "f32" in jaxpr


def test_golden_of_a_bundle_without_text_encoder(bundle):
  """A UNet-only bundle (e.g. to convert or time the paper-size UNet alone) keeps the golden
  noise and ids but has no end-to-end image to store."""
  full = export.golden_vectors(bundle["comps"], bundle["ld"], PROMPT, 3)
  unet_only = export.golden_vectors({"unet_onestep": bundle["comps"]["unet_onestep"]},
                                    bundle["ld"], PROMPT, 3)
  assert sorted(unet_only) == ["input_ids", "noise"]
  np.testing.assert_array_equal(unet_only["noise"], full["noise"])
  assert "x0" in full and "image_u8" in full


@pytest.mark.slow
def test_litert_pipeline_matches_jax_one_call_image(bundle, tmp_path):
  golden = np.load(os.path.join(bundle["dir"], "golden", "golden.npz"))
  out = pipeline.BundlePipeline(bundle["dir"], "fp16")(PROMPT, seed=3)
  np.testing.assert_array_equal(out["input_ids"], golden["input_ids"])
  np.testing.assert_array_equal(out["noise"], golden["noise"])
  assert check.psnr(out["image"], golden["image"]) >= 40.0
  # The golden image is the JAX one-call image: check that independently of the bundle.
  comps = bundle["comps"]
  ids = bundle["ld"].tokenize([PROMPT])
  hidden = comps["text_encoder"].jax_apply(ids)["hidden"]
  x0 = comps["unet_onestep"].jax_apply(golden["noise"], hidden)["x0"]
  np.testing.assert_allclose(comps["decoder"].jax_apply(x0)["image"], golden["image"],
                             atol=1e-5)
  int8 = pipeline.BundlePipeline(bundle["dir"], "int8")(PROMPT, seed=3)
  assert check.psnr(int8["image"], golden["image"]) > 10.0  # reported, not a quality bar
  png = str(tmp_path / "out.png")
  proc = run_module("tflite_export.pipeline", "--bundle", bundle["dir"], PROMPT, png,
                    "--seed", "3", env=cli_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert os.path.getsize(png) > 0


@pytest.mark.slow
def test_check_cli_passes_bundle(bundle, tmp_path):
  report = str(tmp_path / "r.json")
  proc = run_module("tflite_export.check", bundle["dir"], "--json", report, env=cli_env())
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert "6/6 models pass" in proc.stdout
  assert len(json.load(open(report))) == 6


@pytest.mark.slow
def test_export_refuses_failing_bundle_and_names_tensor(bundle, tmp_path):
  # A "decoder" whose graph holds a rank-5 tensor (jnp.repeat).
  bad = convert.Component(
      name="decoder", role="decoder",
      fn=lambda p, z: {"image": jnp.repeat(z * p["s"], 2, axis=1)},
      params=dict(s=np.ones((1, 1, 1, 8), np.float32)),
      inputs=(convert.TensorSpec("latent", (1, 8, 8, 8), "float32"),), outputs=("image",),
      delegate="gpu", representative=[(np.zeros((1, 8, 8, 8), np.float32),)])
  out = str(tmp_path / "bad")
  with pytest.raises(export.BundleCheckError, match=r"decoder_fp32.tflite: \[rank\] tensor"):
    export.write_bundle(out, {"decoder": bad}, bundle["ld"], bundle["config"],
                        precisions=("fp32",), log=lambda s: None)
  assert not os.path.exists(out) and not os.path.exists(out + ".partial")
  export.write_bundle(out, {"decoder": bad}, bundle["ld"], bundle["config"],
                      precisions=("fp32",), force=True, log=lambda s: None)
  m = json.load(open(os.path.join(out, "manifest.json")))
  assert not m["checks"]["decoder_fp32.tflite"]["ok"]
