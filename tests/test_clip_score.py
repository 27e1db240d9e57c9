"""CLIP score: our NNX CLIPModel (vision tower + projections, loaded offline from a Hugging Face
directory) against transformers' PyTorch CLIPModel with seeded random weights, and CLIP's image
preprocessing against transformers' image processor."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from md_jax.evaluators import clip_score
from md_jax.models import hf_clip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_text_encoder_hf import (_copy_tokenizer, _randomize, _tiny_text_config,  # noqa: E402
                                  PROMPTS)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A small CLIPModel (gelu vision tower as OpenCLIP's ViT-g/14 uses) saved by transformers."""
  torch.manual_seed(4)
  cfg = transformers.CLIPConfig(
      text_config=_tiny_text_config().to_dict(),
      vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=3, image_size=32, patch_size=8, hidden_act="gelu"),
      projection_dim=24)
  model = transformers.CLIPModel(cfg).eval()
  _randomize(model, 5)
  with torch.no_grad():  # _randomize leaves these at their init; make them non-trivial too
    model.vision_model.embeddings.class_embedding.normal_(0, 1, generator=torch.Generator().manual_seed(6))
    for name in ("pre_layrnorm", "post_layernorm"):
      getattr(model.vision_model, name).weight.uniform_(0.8, 1.2)
  directory = str(tmp_path_factory.mktemp("clip_model"))
  model.save_pretrained(directory)
  _copy_tokenizer(directory)
  transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                     crop_size={"height": 32, "width": 32}).save_pretrained(directory)
  return directory, model


def _pooled(out):
  return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_clip_vision_and_projections_match_transformers(clip_dir):
  directory, ref = clip_dir
  ours = hf_clip.load_clip_model(directory)
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  graphdef, state = nnx.split(ours)
  hidden, pooled = jax.jit(lambda s, x: nnx.merge(graphdef, s).vision_model(x))(state, pixels)
  img = jax.jit(lambda s, x: nnx.merge(graphdef, s).get_image_features(x))(state, pixels)
  ids = hf_clip.tokenize(hf_clip.load_hf_tokenizer(directory), PROMPTS, 77)
  txt = jax.jit(lambda s, x: nnx.merge(graphdef, s).get_text_features(x))(state, ids)
  px = torch.from_numpy(pixels).permute(0, 3, 1, 2)
  with torch.inference_mode():
    vis = ref.vision_model(pixel_values=px)
    ref_img = _pooled(ref.get_image_features(pixel_values=px)).numpy()
    ref_txt = _pooled(ref.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))).numpy()
  errs = dict(
      last_hidden=np.abs(np.asarray(hidden) - vis.last_hidden_state.numpy()).max(),
      pooled=np.abs(np.asarray(pooled) - vis.pooler_output.numpy()).max(),
      image_features=np.abs(np.asarray(img) - ref_img).max(),
      text_features=np.abs(np.asarray(txt) - ref_txt).max())
  print("\nmax abs error vs transformers:", {k: f"{v:.2e}" for k, v in errs.items()})
  assert img.shape == (3, 24) and txt.shape == (len(PROMPTS), 24)
  assert all(v <= 1e-4 for v in errs.values()), errs


def test_preprocessing_matches_clip_image_processor(clip_dir):
  directory, _ = clip_dir
  processor = transformers.CLIPImageProcessorPil.from_pretrained(directory)
  pre = clip_score.read_preprocess(directory, 32)
  assert pre.shortest_edge == 32 and pre.crop_size == 32
  rng = np.random.default_rng(1)
  for h, w in ((45, 70), (64, 64), (80, 33)):
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    want = np.asarray(processor(images=img, return_tensors="np")["pixel_values"][0])
    got = clip_score.preprocess([img], pre)[0]
    np.testing.assert_allclose(got, np.transpose(want, (1, 2, 0)), atol=1e-5,
                               err_msg=f"{h}x{w}")


def test_clip_score_is_the_raw_cosine(clip_dir):
  directory, ref = clip_dir
  scorer = clip_score.CLIPScorer(directory, batch_size=4)
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
  prompts = PROMPTS[:5]
  got = scorer.scores(images, prompts)
  processor = transformers.CLIPImageProcessorPil.from_pretrained(directory)
  px = torch.from_numpy(np.asarray(processor(images=list(images), return_tensors="np")["pixel_values"]))
  ids = hf_clip.tokenize(scorer.tokenizer, prompts, 77)
  with torch.inference_mode():
    a = _pooled(ref.get_image_features(pixel_values=px))
    b = _pooled(ref.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))))
    want = torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5)
  results = dict(clip_score.run(scorer, images, prompts))
  assert results["clip_score_count"] == 5
  assert abs(results["clip_score"] - float(np.mean(want))) < 1e-5


def test_missing_vision_config_is_named(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32}))
  with pytest.raises(hf_clip.CheckpointError, match="vision_config"):
    hf_clip.read_vision_config(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_clip.read_vision_config(str(tmp_path / "nowhere"))
