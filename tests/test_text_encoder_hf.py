"""Hugging Face CLIP text checkpoints load into our NNX text tower and match transformers' PyTorch.

Every checkpoint here is made in a tmp dir by transformers' own `save_pretrained` from seeded
random weights (nothing is downloaded); the tokenizer is the packaged shapes BPE tokenizer (a
CLIPTokenizer over a small vocabulary), copied next to the weights as a Hub directory holds it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from md_jax.data import pipeline
from md_jax.models import hf_clip
from md_jax.models import text_encoder as te

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
VOCAB, BOS, EOS = 681, 679, 680  # the shapes tokenizer's size and special ids

PROMPTS = [
    "a red circle in the upper left corner",
    "",  # the empty prompt of classifier-free guidance
    "A photo of a Purple Triangle, near the bottom-right edge!",
    # Far past 77 tokens (unknown words split into byte pieces): truncated, EOS kept last.
    "an extraordinarily verbose description of a magnificent cerulean dodecahedron " * 6,
    "Zebra café 123 #tags & émojis",
]


def _copy_tokenizer(directory: str) -> None:
  src = pipeline.default_tokenizer_path()
  for name in TOKENIZER_FILES:
    shutil.copy(os.path.join(src, name), os.path.join(directory, name))


def _randomize(model, seed: int) -> None:
  """Non-trivial values everywhere: transformers initialises biases to 0 and LN scales to 1."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "layer_norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif name.endswith("bias"):
        p.copy_(0.05 * noise)


def _tiny_text_config(**kw):
  values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=BOS,
                eos_token_id=EOS, pad_token_id=EOS)
  values.update(kw)
  return transformers.CLIPTextConfig(**values)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  """A CLIPTextModel directory: config.json, model.safetensors (no prefix), tokenizer."""
  torch.manual_seed(0)
  model = transformers.CLIPTextModel(_tiny_text_config()).eval()
  _randomize(model, 1)
  directory = str(tmp_path_factory.mktemp("clip_text"))
  model.save_pretrained(directory)
  _copy_tokenizer(directory)
  return directory


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
  """A full CLIPModel (vision tower, projections) saved in small shards: `text_model.` names."""
  torch.manual_seed(2)
  cfg = transformers.CLIPConfig(
      text_config=_tiny_text_config(num_hidden_layers=3).to_dict(),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, image_size=32, patch_size=16),
      projection_dim=16)
  model = transformers.CLIPModel(cfg).eval()
  _randomize(model, 3)
  directory = str(tmp_path_factory.mktemp("clip_full"))
  model.save_pretrained(directory, max_shard_size="20KB")
  _copy_tokenizer(directory)
  return directory


def _reference(model, ids: np.ndarray):
  with torch.inference_mode():
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64)))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _forward(model, ids):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids)


def _assert_parity(ours, ref, ids, tol=1e-4):
  hidden, pooled = _forward(ours, ids)
  ref_hidden, ref_pooled = _reference(ref, ids)
  assert hidden.shape == ref_hidden.shape and pooled.shape == ref_pooled.shape
  err_h = float(np.max(np.abs(np.asarray(hidden) - ref_hidden)))
  err_p = float(np.max(np.abs(np.asarray(pooled) - ref_pooled)))
  print(f"\nmax abs error: last_hidden_state {err_h:.2e}, pooled {err_p:.2e}")
  assert err_h <= tol and err_p <= tol, (err_h, err_p)


def _tokens(directory):
  tok = hf_clip.load_hf_tokenizer(directory)
  return hf_clip.tokenize(tok, PROMPTS, 77)


def test_tokenizer_from_model_dir_pads_and_truncates(text_dir):
  tok = hf_clip.load_hf_tokenizer(text_dir)
  assert isinstance(tok, (transformers.CLIPTokenizer, transformers.CLIPTokenizerFast))
  ids = hf_clip.tokenize(tok, PROMPTS, 77)
  assert ids.shape == (len(PROMPTS), 77) and ids.dtype == np.int32
  assert (ids[:, 0] == BOS).all()
  # The empty prompt: BOS, EOS, then EOS padding.
  assert ids[1, 1] == EOS and (ids[1, 2:] == EOS).all()
  # Short prompts are padded; the long one is cut to 77 with its EOS kept.
  assert ids[0, -1] == EOS and (ids[0] == EOS).sum() > 40
  long_row = ids[3]
  assert long_row[-1] == EOS and (long_row[:-1] != EOS).all()
  # The same ids as the packaged tokenizer and a direct transformers call.
  np.testing.assert_array_equal(ids, pipeline.tokenize(pipeline.load_tokenizer(), PROMPTS, 77))
  direct = tok(PROMPTS, padding="max_length", truncation=True, max_length=77)["input_ids"]
  np.testing.assert_array_equal(ids, np.asarray(direct))


def test_text_model_parity(text_dir):
  ours = hf_clip.load_hf_text_encoder(text_dir)
  ref = transformers.CLIPTextModel.from_pretrained(text_dir, local_files_only=True).eval()
  _assert_parity(ours, ref, _tokens(text_dir))


def test_legacy_eos_config_pools_at_argmax(text_dir, tmp_path):
  """Old configs (eos_token_id=2) pool at argmax(ids), in transformers and here."""
  directory = str(tmp_path / "legacy")
  shutil.copytree(text_dir, directory)
  with open(os.path.join(directory, "config.json")) as f:
    cfg = json.load(f)
  cfg["eos_token_id"] = 2
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f)
  ours = hf_clip.load_hf_text_encoder(directory)
  assert ours.eos_token_id == 2
  ref = transformers.CLIPTextModel.from_pretrained(directory, local_files_only=True).eval()
  _assert_parity(ours, ref, _tokens(directory))


def test_full_clip_model_sharded_parity(full_dir):
  files = os.listdir(full_dir)
  assert hf_clip.INDEX_FILE in files and hf_clip.SINGLE_FILE not in files
  cfg = hf_clip.read_text_config(full_dir)
  assert cfg.num_hidden_layers == 3 and cfg.hidden_size == 32
  ours = hf_clip.load_hf_text_encoder(full_dir)
  ref = transformers.CLIPModel.from_pretrained(full_dir, local_files_only=True).eval()
  _assert_parity(ours, ref.text_model, _tokens(full_dir))


def test_text_encoder_wrapper_and_bf16_params(full_dir):
  enc = hf_clip.TextEncoder.from_pretrained(full_dir)
  hidden, pooled = enc(PROMPTS[:2])
  assert hidden.shape == (2, 77, 32) and pooled.shape == (2, 32)
  np.testing.assert_allclose(hidden, _forward(enc.model, _tokens(full_dir)[:2])[0], atol=1e-6)
  params = hf_clip.load_text_params(full_dir, param_dtype="bfloat16")
  assert params["encoder"]["layers"]["2"]["mlp"]["fc1"]["kernel"].dtype.name == "bfloat16"


def test_prefixed_bf16_checkpoint_with_buffers(text_dir, tmp_path):
  """`text_model.`-prefixed names (older CLIPTextModel files), a position_ids buffer, BF16."""
  from safetensors.torch import save_file
  ref = transformers.CLIPTextModel.from_pretrained(text_dir, local_files_only=True).eval()
  tensors = {"text_model." + k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
  tensors["text_model.embeddings.position_ids"] = torch.arange(77)[None]
  directory = tmp_path / "prefixed"
  directory.mkdir()
  shutil.copy(os.path.join(text_dir, "config.json"), directory / "config.json")
  save_file(tensors, str(directory / "model.safetensors"))
  params = hf_clip.load_text_params(str(directory))
  want = ref.state_dict()["encoder.layers.1.self_attn.q_proj.weight"]
  got = params["encoder"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want.to(torch.bfloat16).float().numpy().T)
  np.testing.assert_array_equal(
      params["final_layer_norm"]["bias"],
      ref.state_dict()["final_layer_norm.bias"].to(torch.bfloat16).float().numpy())


def test_read_text_config_fills_defaults_like_transformers(tmp_path):
  """A CLIPModel config.json as old Hub files have it: partial text_config, legacy eos id."""
  raw = {"model_type": "clip", "projection_dim": 768, "text_config_dict": None,
         "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                         "eos_token_id": 2, "bos_token_id": 0, "projection_dim": 768},
         "vision_config": {"hidden_size": 1024, "patch_size": 14}}
  (tmp_path / "config.json").write_text(json.dumps(raw))
  ours = hf_clip.read_text_config(str(tmp_path))
  theirs = transformers.CLIPTextConfig(**raw["text_config"])
  for key in te.CONFIG_FIELDS:
    assert ours[key] == getattr(theirs, key), key
  assert ours.to_dict() == {k: v for k, v in te.default_config().to_dict().items()
                            if k != "eos_token_id"} | {"eos_token_id": 2}


def test_saved_text_encoder_round_trips_and_transformers_reads_it(text_dir, tmp_path):
  """save_text_encoder writes what load_text_params and transformers' CLIPTextModel read back
  to the same outputs (the directory train_shapes_clip ships), extra tensors beside it."""
  ours = hf_clip.load_hf_text_encoder(text_dir)
  cfg = hf_clip.read_text_config(text_dir)
  out = str(tmp_path / "saved")
  hf_clip.save_text_encoder(out, cfg, nnx.to_pure_dict(nnx.state(ours)), tokenizer_dir=text_dir,
                            extra_tensors={"text_projection.weight": np.ones((8, 32))},
                            extra_config={"projection_dim": 8})
  again = hf_clip.load_hf_text_encoder(out)
  ids = _tokens(out)
  np.testing.assert_array_equal(_forward(again, ids)[0], _forward(ours, ids)[0])
  ref = transformers.CLIPTextModel.from_pretrained(out, local_files_only=True).eval()
  _assert_parity(again, ref, ids)


def test_diffusion_trainer_trains_the_hf_text_encoder_from_its_weights(text_dir, vae_workdir,
                                                                       tmp_path):
  """config.text.hf_dir with frozen=False: the tower is a trainable group that starts from the
  directory's weights (params and EMA), not from its seed."""
  trainer = _diffusion_trainer_with_text(text_dir, vae_workdir, tmp_path, frozen=False)
  assert "text" in trainer.objective.trainable
  state = trainer.init_state()
  want = jax.tree_util.tree_flatten_with_path(hf_clip.load_text_params(text_dir))[0]
  for group in ("params", "ema_params"):
    got = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(state[group]["text"]))[0])
    assert len(got) == len(want)
    for path, value in want:
      np.testing.assert_array_equal(np.asarray(got[path]), value)
  assert "text" not in state["frozen"]


# ----------------------------------------------------------------------------- broken checkpoints
def _rewrite(src: str, dst, *, edit_tensors=None, edit_config=None) -> str:
  from safetensors.numpy import load_file, save_file
  os.makedirs(dst, exist_ok=True)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  if edit_tensors:
    edit_tensors(tensors)
  if edit_config:
    edit_config(cfg)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  return str(dst)


def test_missing_tensor_is_named(text_dir, tmp_path):
  d = _rewrite(text_dir, tmp_path / "m",
               edit_tensors=lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"))
  with pytest.raises(hf_clip.CheckpointError, match=r"missing tensor 'encoder\.layers\.1\.mlp\."
                                                    r"fc2\.bias'.*model\.safetensors"):
    hf_clip.load_hf_text_encoder(d)


def test_wrong_shape_is_named(text_dir, tmp_path):
  def edit(t):
    t["encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 16), np.float32)
  d = _rewrite(text_dir, tmp_path / "s", edit_tensors=edit)
  with pytest.raises(hf_clip.CheckpointError,
                     match=r"'encoder\.layers\.0\.self_attn\.q_proj\.weight'.*shape \(32, 16\), "
                           r"expected \(32, 32\)"):
    hf_clip.load_hf_text_encoder(d)


def test_wrong_hidden_size_is_named(text_dir, tmp_path):
  def edit(c):
    c.update(hidden_size=48, num_attention_heads=4)
  d = _rewrite(text_dir, tmp_path / "h", edit_config=edit)
  with pytest.raises(hf_clip.CheckpointError,
                     match=r"hidden size mismatch: .*config\.json says hidden_size=48.*"
                           r"'embeddings\.token_embedding\.weight'.*\(681, 32\)"):
    hf_clip.load_hf_text_encoder(d)
  # The caller's required width (the UNet's context_dim) is checked too.
  with pytest.raises(hf_clip.CheckpointError, match=r"hidden_size=32, but 768 is required"):
    hf_clip.load_hf_text_encoder(text_dir, hidden_size=768)


def test_extra_layers_and_missing_files_are_named(text_dir, full_dir, tmp_path):
  d = _rewrite(text_dir, tmp_path / "l", edit_config=lambda c: c.update(num_hidden_layers=1))
  with pytest.raises(hf_clip.CheckpointError, match=r"does not account.*encoder\.layers\.1\."):
    hf_clip.load_hf_text_encoder(d)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=r"config\.json"):
    hf_clip.load_hf_text_encoder(str(empty))
  shutil.copy(os.path.join(text_dir, "config.json"), empty / "config.json")
  with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors nor"):
    hf_clip.load_hf_text_encoder(str(empty))
  sharded = tmp_path / "sharded"
  shutil.copytree(full_dir, sharded)
  with open(sharded / hf_clip.INDEX_FILE) as f:
    gone = sorted(set(json.load(f)["weight_map"].values()))[0]
  os.remove(sharded / gone)
  with pytest.raises(FileNotFoundError, match=gone):
    hf_clip.load_hf_text_encoder(str(sharded))


def test_loading_needs_neither_torch_nor_transformers(text_dir):
  code = ("import sys; from md_jax.models import hf_clip; "
          f"m = hf_clip.load_hf_text_encoder({text_dir!r}); "
          "assert m.embeddings.token_embedding.embedding.shape == (681, 32); "
          "bad = [n for n in ('torch', 'transformers') if n in sys.modules]; "
          "assert not bad, bad")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo)
  proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- ViT-L/14 size
@pytest.mark.slow
def test_vit_l14_size_parity(tmp_path):
  """The ViT-L/14 text tower (12 x 768, 123M params) with random weights, end to end."""
  cfg = te.default_config()
  cfg.eos_token_id = EOS  # pool where the shapes tokenizer puts its end token
  hf_cfg = transformers.CLIPTextConfig(**{k: cfg[k] for k in te.CONFIG_FIELDS})
  with torch.device("meta"):
    model = transformers.CLIPTextModel(hf_cfg)
  # Materialise with cheap seeded noise instead of transformers' per-module init (~9 s).
  gen = torch.Generator().manual_seed(0)
  model = model.to_empty(device="cpu").eval()
  with torch.no_grad():
    model.embeddings.position_ids.copy_(torch.arange(cfg.max_position_embeddings)[None])
    for name, p in model.named_parameters():
      if "layer_norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.02 * torch.randn(p.shape, generator=gen))
      else:
        std = 0.02 if "embedding" in name else p.shape[-1] ** -0.5
        p.copy_(std * torch.randn(p.shape, generator=gen))
  directory = str(tmp_path / "vit_l14")
  model.save_pretrained(directory)
  _copy_tokenizer(directory)
  ours = hf_clip.load_hf_text_encoder(directory)
  assert sum(int(x.size) for x in jax.tree.leaves(nnx.state(ours))) == 123_060_480
  ids = _tokens(directory)  # shapes-vocabulary ids are valid CLIP ids; 77 tokens each
  _assert_parity(ours, model, ids)


def _diffusion_trainer_with_text(text_dir, vae_workdir, tmp_path, **text):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = tiny_config("lowres", vae_workdir=vae_workdir)
  with config.unlocked():
    config.text.update(dict(hf_dir=text_dir, tokenizer_dir=text_dir, vocab_size=VOCAB,
                            hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77,
                            eos_token_id=EOS, frozen=True))
    config.text.update(text)
    config.unet.context_dim = config.text.hidden_size
  return loop.Trainer(config, str(tmp_path))


def test_diffusion_trainer_freezes_the_hf_text_encoder(text_dir, vae_workdir, tmp_path):
  trainer = _diffusion_trainer_with_text(text_dir, vae_workdir, tmp_path)
  frozen = trainer.objective.init_frozen(trainer.frozen_shardings)
  want = hf_clip.load_text_params(text_dir)
  got = jax.device_get(frozen["text"])
  flat_w = jax.tree_util.tree_flatten_with_path(want)[0]
  flat_g = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  assert len(flat_w) == len(flat_g)
  for path, value in flat_w:
    np.testing.assert_array_equal(np.asarray(flat_g[path]), value)


def test_diffusion_trainer_names_a_text_size_that_differs_from_the_hf_dir(
    text_dir, vae_workdir, tmp_path):
  trainer = _diffusion_trainer_with_text(text_dir, vae_workdir, tmp_path, num_hidden_layers=1)
  with pytest.raises(ValueError, match="config.text.num_hidden_layers=1"):
    trainer.objective.init_frozen(trainer.frozen_shardings)
