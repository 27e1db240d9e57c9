"""Hugging Face CLIP checkpoints -> `CLIPTextTransformer` (and, for the CLIP score, the full
two-tower `clip_vision.CLIPModel` via `load_clip_model`), offline and without torch.

A model directory as `save_pretrained` / the Hub lays it out (e.g. openai/clip-vit-large-patch14,
or the `text_encoder/` folder of a diffusion pipeline):

  config.json                       a CLIPTextConfig, or a CLIPConfig whose `text_config` is used
  model.safetensors                 or model.safetensors.index.json + the shards it names
  vocab.json, merges.txt, ...       the CLIP BPE tokenizer (tokenizer.json also works)

Tensors are read with safetensors' numpy API (bfloat16 ones, which numpy lacks, straight from the
file's byte ranges), so loading needs neither torch nor transformers. Names are matched with or
without a leading `text_model.` (a full CLIPModel, or a CLIPTextModel saved by older transformers);
everything else in the file (vision tower, projections, `position_ids` buffers) is ignored.
A missing tensor, a tensor of the wrong shape or a hidden size that disagrees with config.json
raises `CheckpointError` naming the tensor and the file.

  encoder = load_hf_text_encoder("/ckpt/clip-vit-large-patch14")      # nnx module
  tokenizer = load_hf_tokenizer("/ckpt/clip-vit-large-patch14")
  hidden, pooled = encoder(tokenize(tokenizer, ["a photo of a cat"]))  # (1, 77, 768), (1, 768)
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from md_jax.models import text_encoder as text_lib
from md_jax.models import layers
from md_jax.models.layers import KeyStream

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
TOKEN_EMBEDDING = "embeddings.token_embedding.weight"

# transformers.CLIPTextConfig's defaults (5.x), for keys a config.json leaves out; kept here so
# reading a checkpoint does not import transformers (which imports torch when it is installed).
HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                        num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                        layer_norm_eps=1e-5, eos_token_id=49407, hidden_act="quick_gelu")

# transformers.CLIPVisionConfig's defaults (5.x).
HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, image_size=224, patch_size=32, num_channels=3,
                          layer_norm_eps=1e-5, hidden_act="quick_gelu")

# Non-parameter entries a CLIP text checkpoint may carry next to the weights.
_IGNORED_SUFFIXES = ("embeddings.position_ids",)


class CheckpointError(ValueError):
  """A model directory that does not match what the config (or the caller) asks for."""


# --------------------------------------------------------------------------------------- config
def read_text_config(directory: str) -> ml_collections.ConfigDict:
  """The text tower's config (`text_encoder.CONFIG_FIELDS`) from `directory/config.json`."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: not a Hugging Face model directory")
  with open(path) as f:
    raw = json.load(f)
  for key in ("text_config", "text_config_dict"):  # a full CLIPModel (CLIPConfig), new or old
    if isinstance(raw.get(key), dict):
      raw = raw[key]
      break
  values = {k: raw.get(k, HF_TEXT_DEFAULTS[k]) for k in text_lib.CONFIG_FIELDS}
  if values["eos_token_id"] is None:
    values["eos_token_id"] = 2  # the legacy marker: pool at argmax(ids), as transformers does
  return ml_collections.ConfigDict(values)


def read_vision_config(directory: str) -> tuple[ml_collections.ConfigDict, int]:
  """(vision tower config, projection_dim) from a full CLIPModel's `directory/config.json`."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: not a Hugging Face model directory")
  with open(path) as f:
    raw = json.load(f)
  vision = raw.get("vision_config") or raw.get("vision_config_dict")
  if not isinstance(vision, dict):
    raise CheckpointError(f"{path} has no 'vision_config': a CLIP score needs a full CLIPModel "
                          "directory (both towers and their projections)")
  from md_jax.models import clip_vision  # pylint: disable=g-import-not-at-top
  values = {k: vision.get(k, HF_VISION_DEFAULTS[k]) for k in clip_vision.VISION_CONFIG_FIELDS}
  return ml_collections.ConfigDict(values), int(raw.get("projection_dim", 512))


# ------------------------------------------------------------------------------- name mapping
def _linear(ours: tuple, hf: str, d_in: int, d_out: int) -> list:
  # torch Linear keeps (out, in); our Dense kernel is (in, out).
  return [(ours + ("kernel",), hf + ".weight", (d_out, d_in), True),
          (ours + ("bias",), hf + ".bias", (d_out,), False)]


def _norm(ours: tuple, hf: str, dim: int) -> list:
  return [(ours + ("scale",), hf + ".weight", (dim,), False),
          (ours + ("bias",), hf + ".bias", (dim,), False)]


def _encoder_mapping(cfg) -> list:
  d, inner = int(cfg.hidden_size), int(cfg.intermediate_size)
  out = []
  for i in range(int(cfg.num_hidden_layers)):
    ours, hf = ("encoder", "layers", str(i)), f"encoder.layers.{i}"
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      out += _linear(ours + ("self_attn", proj), f"{hf}.self_attn.{proj}", d, d)
    out += _norm(ours + ("layer_norm1",), f"{hf}.layer_norm1", d)
    out += _linear(ours + ("mlp", "fc1"), f"{hf}.mlp.fc1", d, inner)
    out += _linear(ours + ("mlp", "fc2"), f"{hf}.mlp.fc2", inner, d)
    out += _norm(ours + ("layer_norm2",), f"{hf}.layer_norm2", d)
  return out


def param_mapping(cfg) -> list[tuple[tuple[str, ...], str, tuple[int, ...], bool]]:
  """(our param path, HF name without prefix, HF shape, transpose?) for every parameter."""
  d = int(cfg.hidden_size)
  out = [(("embeddings", "token_embedding", "embedding"), "embeddings.token_embedding.weight",
          (int(cfg.vocab_size), d), False),
         (("embeddings", "position_embedding", "embedding"),
          "embeddings.position_embedding.weight", (int(cfg.max_position_embeddings), d), False)]
  out += _encoder_mapping(cfg)
  out += _norm(("final_layer_norm",), "final_layer_norm", d)
  return out


def vision_param_mapping(cfg) -> list[tuple[tuple[str, ...], str, tuple[int, ...], Any]]:
  """The vision tower's (path, HF name without 'vision_model.', HF shape, transpose) entries;
  transpose is True (Linear), False, or an axes tuple (the patch conv, OIHW -> HWIO)."""
  d, p, c = int(cfg.hidden_size), int(cfg.patch_size), int(cfg.num_channels)
  n = (int(cfg.image_size) // p) ** 2 + 1
  out = [(("embeddings", "class_embedding"), "embeddings.class_embedding", (d,), False),
         (("embeddings", "patch_embedding", "kernel"), "embeddings.patch_embedding.weight",
          (d, c, p, p), (2, 3, 1, 0)),
         (("embeddings", "position_embedding", "embedding"),
          "embeddings.position_embedding.weight", (n, d), False)]
  out += _norm(("pre_layrnorm",), "pre_layrnorm", d)
  out += _encoder_mapping(cfg)
  out += _norm(("post_layernorm",), "post_layernorm", d)
  return out


# -------------------------------------------------------------------------------- safetensors
def _read_bf16(path: str, name: str) -> np.ndarray:
  """A BF16 tensor from its byte range (safetensors' numpy API has no bfloat16)."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (ships with jax)
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    info = json.loads(f.read(n))[name]
    start, end = info["data_offsets"]
    f.seek(8 + n + start)
    data = f.read(end - start)
  return np.frombuffer(data, dtype=ml_dtypes.bfloat16).reshape(info["shape"])


class SafetensorsReader:
  """Lazy name -> tensor view over a single-file or sharded safetensors checkpoint."""

  def __init__(self, directory: str):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._safe_open = safe_open
    single = os.path.join(directory, SINGLE_FILE)
    index = os.path.join(directory, INDEX_FILE)
    self._handles: dict[str, Any] = {}
    if os.path.isfile(single):
      self.description = single
      with safe_open(single, framework="numpy") as f:
        self._where = {k: single for k in f.keys()}
    elif os.path.isfile(index):
      self.description = index
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no 'weight_map'")
      self._where = {k: os.path.join(directory, v) for k, v in weight_map.items()}
      for shard in sorted(set(self._where.values())):
        if not os.path.isfile(shard):
          raise FileNotFoundError(f"{shard} (named by {index}) not found")
    else:
      found = sorted(os.listdir(directory)) if os.path.isdir(directory) else "no such directory"
      raise FileNotFoundError(
          f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} (found: {found}); "
          "convert .bin checkpoints to safetensors first")

  def keys(self) -> set[str]:
    return set(self._where)

  def file_of(self, name: str) -> str:
    return self._where[name]

  def _handle(self, path: str):
    if path not in self._handles:
      self._handles[path] = self._safe_open(path, framework="numpy")
    return self._handles[path]

  def shape(self, name: str) -> tuple[int, ...]:
    try:
      return tuple(self._handle(self._where[name]).get_slice(name).get_shape())
    except Exception as e:  # a weight_map entry its shard does not hold
      raise CheckpointError(f"tensor {name!r} not readable from {self._where[name]}: {e}") from e

  def get(self, name: str) -> np.ndarray:
    path = self._where[name]
    handle = self._handle(path)
    if handle.get_slice(name).get_dtype() == "BF16":
      return _read_bf16(path, name)
    return handle.get_tensor(name)

  def close(self):
    for h in self._handles.values():
      h.__exit__(None, None, None)
    self._handles.clear()


def _find_prefix(keys: Sequence[str], where: str) -> str:
  hits = [k[:-len(TOKEN_EMBEDDING)] for k in keys if k.endswith(TOKEN_EMBEDDING)]
  text_hits = [p for p in hits if p in ("", "text_model.")] or hits
  if len(text_hits) != 1:
    raise CheckpointError(
        f"{where}: expected one '{TOKEN_EMBEDDING}' (optionally prefixed 'text_model.'), found "
        f"{[p + TOKEN_EMBEDDING for p in hits] or 'none'}: not a CLIP text encoder checkpoint")
  return text_hits[0]


# ------------------------------------------------------------------------------------- params
def _read_mapped(reader: SafetensorsReader, mapping, prefix: str, np_dtype,
                 cfg_where: str) -> dict[tuple[str, ...], np.ndarray]:
  """Reads every mapped tensor, checked by name and shape, into our layout."""
  names = reader.keys()
  flat = {}
  for ours, hf_name, hf_shape, transpose in mapping:
    name = prefix + hf_name
    if name not in names:
      raise CheckpointError(f"missing tensor {name!r} in {reader.description} (needed for "
                            f"{'.'.join(ours)}; config {cfg_where})")
    shape = reader.shape(name)
    if shape != tuple(hf_shape):
      raise CheckpointError(f"tensor {name!r} in {reader.file_of(name)} has shape {shape}, "
                            f"expected {tuple(hf_shape)} from {cfg_where}")
    value = reader.get(name)
    if transpose is True:
      value = value.T
    elif transpose:
      value = np.transpose(value, transpose)
    flat[ours] = np.ascontiguousarray(value.astype(np_dtype))
  return flat


def load_text_params(directory: str, cfg=None, *, param_dtype=jnp.float32,
                     hidden_size: int | None = None, strict: bool = True) -> dict:
  """The params of `CLIPTextTransformer(cfg)` from `directory`'s safetensors, as numpy arrays.

  Returns the nested dict with string keys that `nnx.to_pure_dict` gives (list indices as
  strings, the layout `train.state.ModelSpec` uses). `cfg` defaults to `read_text_config`.
  `hidden_size`, if given, is what the caller needs (e.g. the UNet's context_dim). `strict`
  also rejects text-tower tensors the config does not account for (e.g. extra layers).
  """
  cfg = read_text_config(directory) if cfg is None else cfg
  d = int(cfg.hidden_size)
  cfg_where = os.path.join(directory, CONFIG_FILE)
  if hidden_size is not None and int(hidden_size) != d:
    raise CheckpointError(f"{cfg_where}: hidden_size={d}, but {int(hidden_size)} is required "
                          "(the UNet's context_dim / the configured text hidden size)")
  reader = SafetensorsReader(directory)
  try:
    prefix = _find_prefix(reader.keys(), reader.description)
    token = prefix + TOKEN_EMBEDDING
    got = reader.shape(token)
    if len(got) != 2 or got[1] != d:
      raise CheckpointError(
          f"hidden size mismatch: {cfg_where} says hidden_size={d}, but tensor {token!r} in "
          f"{reader.file_of(token)} has shape {got}")
    mapping = param_mapping(cfg)
    names = reader.keys()
    flat = _read_mapped(reader, mapping, prefix, jnp.dtype(param_dtype), cfg_where)
    if strict:
      used = {prefix + m[1] for m in mapping}
      extra = sorted(k for k in names
                     if k.startswith(prefix) and k not in used
                     and not k.endswith(_IGNORED_SUFFIXES)
                     and (prefix or k.startswith(("embeddings.", "encoder.", "final_layer_norm."))))
      if extra:
        raise CheckpointError(
            f"{reader.description} has text-encoder tensors that {cfg_where} does not account "
            f"for (wrong num_hidden_layers?): {extra[:8]}{' ...' if len(extra) > 8 else ''}")
  finally:
    reader.close()
  return layers.nest_paths(flat)


def _restore_keys(tree, template):
  if isinstance(template, dict):
    by_str = {str(k): k for k in template}
    return {by_str[k]: _restore_keys(v, template[by_str[k]]) for k, v in tree.items()}
  return tree


def build_text_encoder(cfg, params: dict, *, dtype=jnp.float32,
                       param_dtype=jnp.float32) -> text_lib.CLIPTextTransformer:
  """A `CLIPTextTransformer(cfg)` holding `params` (as `load_text_params` returns them)."""
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: text_lib.CLIPTextTransformer(
        cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
  graphdef, state = nnx.split(abstract)
  template = nnx.to_pure_dict(state)
  values = jax.tree.map(lambda a: jnp.asarray(a, param_dtype), params)
  nnx.replace_by_pure_dict(state, _restore_keys(values, template))
  return nnx.merge(graphdef, state)


def load_hf_text_encoder(directory: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                         hidden_size: int | None = None) -> text_lib.CLIPTextTransformer:
  """The CLIP text tower saved in `directory` as an NNX `CLIPTextTransformer`."""
  cfg = read_text_config(directory)
  params = load_text_params(directory, cfg, param_dtype=param_dtype, hidden_size=hidden_size)
  return build_text_encoder(cfg, params, dtype=dtype, param_dtype=param_dtype)


def load_clip_model(directory: str, *, dtype=jnp.float32, param_dtype=jnp.float32):
  """A full CLIPModel directory (both towers and projections, any size: ViT-B/32, ViT-L/14,
  OpenCLIP ViT-g/14 as Hugging Face lays them out) as an NNX `clip_vision.CLIPModel`."""
  from md_jax.models import clip_vision  # pylint: disable=g-import-not-at-top
  text_cfg = read_text_config(directory)
  vision_cfg, projection_dim = read_vision_config(directory)
  cfg_where = os.path.join(directory, CONFIG_FILE)
  np_dtype = jnp.dtype(param_dtype)
  reader = SafetensorsReader(directory)
  try:
    flat = {("text_model",) + k: v for k, v in _read_mapped(
        reader, param_mapping(text_cfg), "text_model.", np_dtype, cfg_where).items()}
    flat.update({("vision_model",) + k: v for k, v in _read_mapped(
        reader, vision_param_mapping(vision_cfg), "vision_model.", np_dtype, cfg_where).items()})
    heads = [(("visual_projection", "kernel"), "visual_projection.weight",
              (projection_dim, int(vision_cfg.hidden_size)), True),
             (("text_projection", "kernel"), "text_projection.weight",
              (projection_dim, int(text_cfg.hidden_size)), True)]
    flat.update(_read_mapped(reader, heads, "", np_dtype, cfg_where))
  finally:
    reader.close()
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: clip_vision.CLIPModel(
        text_cfg, vision_cfg, projection_dim, rngs=KeyStream(0), dtype=dtype,
        param_dtype=param_dtype))
  graphdef, state = nnx.split(abstract)
  template = nnx.to_pure_dict(state)
  values = jax.tree.map(lambda a: jnp.asarray(a, param_dtype), layers.nest_paths(flat))
  nnx.replace_by_pure_dict(state, _restore_keys(values, template))
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------ writing
def text_tensors(cfg, params: dict, prefix: str = "text_model.") -> dict[str, np.ndarray]:
  """The HF-named float32 tensors of a `CLIPTextTransformer(cfg)`'s params (the nested dict
  `nnx.to_pure_dict` gives); the inverse of `load_text_params`."""
  flat = {}
  for ours, hf_name, hf_shape, transpose in param_mapping(cfg):
    node = params
    for key in ours:
      node = node[key] if key in node else node[int(key)]
    value = np.asarray(node, np.float32)
    value = value.T if transpose is True else value
    if value.shape != tuple(hf_shape):
      raise CheckpointError(f"{'.'.join(ours)} has shape {value.shape}, expected {hf_shape}")
    flat[prefix + hf_name] = np.ascontiguousarray(value)
  return flat


def save_text_encoder(directory: str, cfg, params: dict, *, tokenizer_dir: str | None = None,
                      extra_tensors: dict[str, np.ndarray] | None = None,
                      extra_config: dict | None = None) -> str:
  """Writes `directory` as a Hugging Face CLIP directory that `load_text_params` (and
  transformers) read: config.json (a CLIPConfig whose `text_config` is `cfg`, plus
  `extra_config`), model.safetensors (`text_model.*` and `extra_tensors`) and the tokenizer
  files of `tokenizer_dir`."""
  import shutil  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  tensors = text_tensors(cfg, params)
  tensors.update({k: np.ascontiguousarray(np.asarray(v, np.float32))
                  for k, v in (extra_tensors or {}).items()})
  save_file(tensors, os.path.join(directory, SINGLE_FILE))
  text_config = {k: (v.item() if hasattr(v, "item") else v)
                 for k, v in dict(cfg).items() if k in text_lib.CONFIG_FIELDS}
  text_config["model_type"] = "clip_text_model"
  config = dict(model_type="clip", architectures=["CLIPModel"], text_config=text_config,
                **(extra_config or {}))
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  if tokenizer_dir:
    for name in sorted(os.listdir(tokenizer_dir)):
      if os.path.isfile(os.path.join(tokenizer_dir, name)):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(directory, name))
  return directory


# ------------------------------------------------------------------------------------ tokenizer
def load_hf_tokenizer(directory: str):
  """transformers' CLIPTokenizer (the `tokenizers`-backed one) from `directory`, offline."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top  (heavy)
  return CLIPTokenizer.from_pretrained(directory, local_files_only=True)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = 77) -> np.ndarray:
  """int32 (B, max_length): BOS, tokens, EOS, padding; too-long prompts truncated, EOS kept."""
  from md_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.tokenize(tokenizer, prompts, max_length)


class TextEncoder:
  """Tokenizer + encoder + one jitted forward: prompts -> (last_hidden_state, pooled)."""

  def __init__(self, model: text_lib.CLIPTextTransformer, tokenizer, max_length: int = 77):
    self.model = model
    self.tokenizer = tokenizer
    self.max_length = int(max_length)
    graphdef, state = nnx.split(model)
    self.params = state
    self._fwd = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))

  @classmethod
  def from_pretrained(cls, directory: str, *, dtype=jnp.float32,
                      param_dtype=jnp.float32) -> "TextEncoder":
    model = load_hf_text_encoder(directory, dtype=dtype, param_dtype=param_dtype)
    return cls(model, load_hf_tokenizer(directory), model.max_positions)

  def encode_ids(self, input_ids) -> tuple[jax.Array, jax.Array]:
    return self._fwd(self.params, jnp.asarray(input_ids, jnp.int32))

  def __call__(self, prompts: str | Sequence[str]) -> tuple[jax.Array, jax.Array]:
    return self.encode_ids(tokenize(self.tokenizer, prompts, self.max_length))


__all__ = ["CheckpointError", "HF_TEXT_DEFAULTS", "SafetensorsReader", "TextEncoder",
           "build_text_encoder", "load_clip_model", "load_hf_text_encoder", "load_hf_tokenizer",
           "load_text_params", "save_text_encoder", "text_tensors",
           "param_mapping", "read_text_config", "read_vision_config", "tokenize",
           "vision_param_mapping"]
