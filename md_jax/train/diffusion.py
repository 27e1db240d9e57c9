"""Latent diffusion pretraining of the MD UNet on the shared loop (paper sec. 3, 5.1).

Images go through the frozen stage-1 VAE encoder and its per-channel latent shift/scale, captions
through the frozen text encoder; the UNet learns the configured prediction (v by default, with
a zero-terminal-SNR schedule: docs/one_step_conventions.md). Progressive training (low then high
resolution) is two runs of this objective, the second with ``init_from`` the first.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from md_jax import config_base
from md_jax.data import latent_cache as latent_cache_lib
from md_jax.data import pipeline
from md_jax.data import shapes as shapes_lib
from md_jax.data import text_cache as text_cache_lib
from md_jax.diffusion import losses
from md_jax.diffusion import samplers
from md_jax.diffusion import schedule as sch
from md_jax.evaluators import samples as samples_lib
from md_jax.models import text_encoder as text_lib
from md_jax.models import unet as unet_lib
from md_jax.models import vae as vae_lib
from md_jax.train import checkpoint as ckpt_lib
from md_jax.train import loop
from md_jax.train import sharding as shd
from md_jax.train import vae as vae_obj
from md_jax.train import state as state_lib
from md_jax.train.state import ModelSpec


def unet_spec(config) -> ModelSpec:
  return ModelSpec("unet", lambda rngs: unet_lib.UNet(config.unet, rngs=rngs,
                                                       dtype=jnp.dtype(config.compute_dtype)))


def text_spec(config, eos_token_id: int) -> ModelSpec:
  cfg = ml_collections.ConfigDict(
      config.text.to_dict() if hasattr(config.text, "to_dict") else dict(config.text))
  cfg.eos_token_id = eos_token_id
  return ModelSpec("text", lambda rngs: text_lib.CLIPTextTransformer(cfg, rngs=rngs))


_TEXT_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "max_position_embeddings", "hidden_act")


def load_hf_text_params(config, hf_dir: str) -> dict:
  """The frozen text encoder's params from a Hugging Face CLIP directory (config.text.hf_dir).

  The run's config.text must describe the same tower (so the checkpoint and everything built
  from it agree); a difference fails naming the key and the file.
  """
  from md_jax.models import hf_clip  # pylint: disable=g-import-not-at-top
  hf_dir = config_base.resolve_asset(hf_dir)
  hf_cfg = hf_clip.read_text_config(hf_dir)
  for key in _TEXT_SIZE_KEYS:
    want, got = config.text[key], hf_cfg[key]
    if str(want) != str(got):
      raise ValueError(f"config.text.{key}={want!r} but {os.path.join(hf_dir, 'config.json')} "
                       f"has {key}={got!r}: set config.text to the checkpoint's sizes")
  return hf_clip.load_text_params(hf_dir, hf_cfg, hidden_size=int(config.unet.context_dim))


class LatentDiffusion:
  """The frozen pieces around the UNet: tokenizer, text encoder, VAE, latent statistics."""

  def __init__(self, config):
    self.config = config
    self.tokenizer = pipeline.load_tokenizer(pipeline.tokenizer_dir(config.text))
    eos = int(config.text.eos_token_id)
    if eos < 0:
      eos = int(self.tokenizer.eos_token_id)
    self.eos_token_id = eos
    self.unet = unet_spec(config)
    self.text = text_spec(config, eos)
    self.vae = vae_obj.vae_spec(config)
    self.schedule = sch.NoiseSchedule.from_config(config.diffusion)

  def tokenize(self, prompts):
    return np.asarray(pipeline.tokenize(self.tokenizer, list(prompts),
                                        int(self.config.data.max_length)), np.int32)

  def frozen_spec(self, with_text: bool = True):
    """(abstract, logical) of the frozen arrays; ``with_text=False`` leaves the text encoder
    out (a run that trains it keeps it in its params)."""
    stats_abs, stats_logical = vae_obj.latent_stats_spec(self.config)
    abstract = dict(vae=self.vae.abstract_params, **stats_abs)
    logical = dict(vae=self.vae.logical, **stats_logical)
    if with_text:
      abstract["text"], logical["text"] = self.text.abstract_params, self.text.logical
    return abstract, logical

  # -- traced helpers --------------------------------------------------------------------------
  def text_hidden(self, text_params, input_ids):
    """The text encoder's last hidden states (the UNet's context), differentiable."""
    hidden, _ = self.text.bind(text_params)(input_ids)
    return hidden

  def encode_text(self, frozen, input_ids):
    return jax.lax.stop_gradient(self.text_hidden(frozen["text"], input_ids))

  def encode_images(self, frozen, images, rng):
    mean, logvar = self.vae.bind(frozen["vae"]).encode(images)
    return self.latents_from_moments(frozen, mean, logvar, rng)

  def latents_from_moments(self, frozen, mean, logvar, rng):
    """A normalised latent drawn from the VAE posterior (the encoder's output, or a latent
    cache's row of it); rng=None: the posterior's mean."""
    z = mean if rng is None else vae_lib.sample_posterior(mean, logvar, rng)
    z = (z.astype(jnp.float32) - frozen["latent_shift"]) / frozen["latent_scale"]
    return jax.lax.stop_gradient(z)

  def decode_latents(self, frozen, z):
    z = z * frozen["latent_scale"] + frozen["latent_shift"]
    return self.vae.bind(frozen["vae"]).decode(z).astype(jnp.float32)

  def unet_apply(self, unet_params):
    model = self.unet.bind(unet_params)
    return lambda x, t, ctx: model(x, t, ctx)

  def latent_shape(self, image_size: int):
    f = vae_lib.downsample_factor(self.config.vae)
    return (image_size // f, image_size // f, int(self.config.vae.latent_channels))

  def sample(self, unet_params, frozen, input_ids, null_ids, noise, *, num_steps, guidance_scale,
             guidance_rescale=0.0, sampler="ddim"):
    """``sampler`` ('ddim', 'dpmpp2m' or 'onestep') with CFG from given noise; returns images in
    [-1, 1]. Traced under jit."""
    context = self.encode_text(frozen, input_ids)
    null = self.encode_text(frozen, null_ids[:1])
    kw = dict(null_context=null if guidance_scale != 1.0 else None, guidance_scale=guidance_scale,
              guidance_rescale=guidance_rescale)
    apply_fn = self.unet_apply(unet_params)
    if sampler == "ddim":
      z = samplers.ddim_sample(self.schedule, apply_fn, noise, context, num_steps=num_steps, **kw)
    elif sampler == "dpmpp2m":
      z = samplers.dpmpp_2m_sample(self.schedule, apply_fn, noise, context, num_steps=num_steps,
                                   **kw)
    elif sampler == "onestep":
      z = samplers.onestep_sample(self.schedule, apply_fn, noise, context, **kw)
    else:
      raise ValueError(f"unknown sampler {sampler!r}; expected one of {samplers.SAMPLERS}")
    return self.decode_latents(frozen, z)


def text_trained(config) -> bool:
  """Whether ``config`` (a ConfigDict, or a run's stored config as a dict) is a diffusion run
  that trains its text encoder with the UNet (config.text.frozen=False). Such a run keeps the
  encoder in its params (group "text", with an EMA copy), not in its frozen part; everything that
  reads a run (sampling, evaluation, export, UFOGen) takes it from there."""
  text = config.get("text") or {}
  return config.get("trainer") == "diffusion" and not bool(text.get("frozen", True))


def eval_params(state) -> dict:
  """The trainable params evaluation uses: the EMA copy when the run keeps one."""
  return state["ema_params"] if state.get("ema_params") is not None else state["params"]


def run_trained_text(workdir: str, step: int | None = None) -> bool:
  """Whether the run in ``workdir`` trained its text encoder (its stored config)."""
  return text_trained(ckpt_lib.read_config_json(workdir, step) or {})


def restore_run_text_encoder(workdir: str, text_abs, step: int | None = None,
                             use_ema: bool = True, others: dict | None = None
                             ) -> tuple[dict, dict, int, str]:
  """The text encoder another run's UNet was trained with: its trained copy (the EMA when kept
  and ``use_ema``) when that run trained it (its config's text.frozen=False), else its frozen
  one; plus ``others`` (top-level parts of that run's state, e.g. ``{"frozen": {...}}``) in the
  same read. Returns (params placed like ``text_abs``, others restored, step, where the encoder
  was read, e.g. "ema_params.text")."""
  others = dict(others or {})
  if run_trained_text(workdir, step):
    text, got, step_read, which = ckpt_lib.restore_preferring_ema(
        workdir, {"text": text_abs}, others=others, step=step, use_ema=use_ema)
    return text["text"], got, step_read, f"{which}.text"
  frozen = dict(others.get("frozen", {}), text=text_abs)
  got, step_read = ckpt_lib.restore_subset(workdir, dict(others, frozen=frozen), step)
  text = got["frozen"].pop("text")
  if "frozen" not in others:
    del got["frozen"]
  return text, got, step_read, "frozen.text"


def text_cache_dir(config) -> str:
  """config.text.cache_dir: precomputed caption embeddings (md_jax.tools.build_text_cache)."""
  return str(config.text.get("cache_dir", "") or "")


def latent_cache_dir(config) -> str:
  """config.vae.cache_dir: precomputed VAE posteriors of the training images
  (md_jax.tools.build_latent_cache)."""
  return str(config.vae.get("cache_dir", "") or "")


def sample_noise(seed: int, indices: np.ndarray, shape) -> jax.Array:
  """Per-sample noise from (seed, sample index): independent of batch split and device count."""
  base = jax.random.key(seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def generate(ld: LatentDiffusion, mesh, unet_params, frozen, prompts, *, seed, image_size,
             num_steps, guidance_scale, batch_size, guidance_rescale=0.0, progress=False,
             sampler="ddim", timings: list | None = None):
  """Images for ``prompts`` sharded over the mesh's batch axes, gathered to host as uint8.

  Sample i's noise depends only on (seed, i), so the images do not depend on the batch size or
  the number of devices or hosts. ``timings``, if a list, receives (rows, seconds) per batch
  (the first batch includes the compile)."""
  div = shd.batch_divisor(mesh)
  batch_size = max(div, (batch_size // div) * div)
  ids_all = ld.tokenize(prompts)
  null_ids = ld.tokenize([""] * div)
  shape = ld.latent_shape(image_size)
  fn = jax.jit(
      lambda p, fz, ids, nul, noise: ld.sample(p, fz, ids, nul, noise, num_steps=num_steps,
                                                guidance_scale=guidance_scale,
                                                guidance_rescale=guidance_rescale,
                                                sampler=sampler))
  out = []
  chunks = range(0, len(prompts), batch_size)
  if progress and jax.process_index() == 0:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    chunks = tqdm(chunks, desc=f"sampling ({sampler})", unit="batch")
  for start in chunks:
    idx = np.arange(start, min(start + batch_size, len(prompts)))
    n = len(idx)
    pad = (-n) % div
    idx_p = np.concatenate([idx, np.full((pad,), idx[-1])]) if pad else idx
    ids = ids_all[idx_p]
    noise = sample_noise(seed, idx_p, shape)
    sh = shd.batch_sharding(mesh, 2)
    ids = jax.device_put(ids, sh)
    noise = jax.device_put(noise, shd.batch_sharding(mesh, 4))
    nul = jax.device_put(null_ids, sh)
    t0 = time.perf_counter()
    imgs = fn(unet_params, frozen, ids, nul, noise)
    out.append(samples_lib.to_uint8(samples_lib.gather_to_host(imgs))[:n])
    if timings is not None:
      timings.append((n, time.perf_counter() - t0))
  return np.concatenate(out, axis=0)


def load_for_sampling(workdir: str, step: int | None = None, use_ema: bool = True,
                      config=None, compute_dtype: str | None = None):
  """(config, LatentDiffusion, mesh, unet params, frozen, step) restored from ``workdir``.

  A diffusion or UFOGen run; only the UNet's params (EMA when the run kept them and ``use_ema``)
  and the frozen text encoder / VAE / latent statistics are read, placed on this machine's
  devices whatever mesh saved them. ``config`` replaces the config stored with the checkpoint
  (its shapes must match the checkpoint's); ``compute_dtype`` replaces the run's (a pod run
  trains in bfloat16; TFLite export builds float32 graphs).
  """
  if step is not None:
    steps = ckpt_lib.steps_in(workdir)
    if int(step) not in steps:
      raise FileNotFoundError(f"{workdir} has no checkpoint at step {step}; it has "
                              f"{', '.join(map(str, steps)) or 'none'}")
  step = ckpt_lib.latest_step_in(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}")
  if config is None:
    cfg_json = ckpt_lib.read_config_json(workdir, step)
    if not cfg_json:
      raise FileNotFoundError(f"{workdir} step {step} holds no config (pass one with --config)")
    config = ml_collections.ConfigDict(cfg_json)
  if compute_dtype:
    config = config_base.with_compute_dtype(config, compute_dtype)
  if config.trainer not in ("diffusion", "ufogen"):
    raise ValueError(f"{workdir} is a {config.trainer!r} run; sampling needs a diffusion run "
                     "(or a UFOGen run)")
  # Sampling runs on whatever this machine has, not the training mesh.
  mesh = shd.make_mesh((-1, 1, 1), ("data", "fsdp", "tensor"))
  ld = LatentDiffusion(config)
  rules = shd.rules_dict([tuple(r) for r in config.sharding_rules])
  unet_sh = shd.tree_shardings(ld.unet.abstract_params, ld.unet.logical, rules, mesh)
  trained_text = text_trained(config)
  frozen_abs, frozen_logical = ld.frozen_spec(with_text=not trained_text)
  frozen_sh = shd.tree_shardings(frozen_abs, frozen_logical, rules, mesh)
  place = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  unet_abs = jax.tree.map(place, ld.unet.abstract_params, unet_sh)
  frozen_abs = jax.tree.map(place, frozen_abs, frozen_sh)
  which = "ema_params" if use_ema and config.ema_decay else "params"
  if config.trainer == "ufogen" and config.ufogen.finetune == "lora":
    # A LoRA finetune keeps the base UNet frozen and trains factors: sample with them merged,
    # so everything downstream (sampling, evaluation, TFLite export) sees a plain UNet.
    from md_jax.train import ufogen  # pylint: disable=g-import-not-at-top
    lora = ufogen.lora_spec(config, ld.unet)
    lora_sh = shd.tree_shardings(lora.abstract_params, lora.logical, rules, mesh)
    lora_abs = jax.tree.map(place, lora.abstract_params, lora_sh)
    factors, got, step, which = ckpt_lib.restore_preferring_ema(
        workdir, {"unet_lora": lora_abs}, {"frozen": dict(frozen_abs, unet=unet_abs)}, step,
        use_ema=which == "ema_params")
    frozen = dict(got["frozen"])
    unet = jax.jit(lora.merge, out_shardings=unet_sh)(frozen.pop("unet"), factors["unet_lora"])
    ld.restored_params = which
    return config, ld, mesh, unet, frozen, step
  group = {"unet": unet_abs}
  if trained_text:  # the encoder trained with the UNet: from the same params (EMA) as the UNet
    text_sh = shd.tree_shardings(ld.text.abstract_params, ld.text.logical, rules, mesh)
    group["text"] = jax.tree.map(place, ld.text.abstract_params, text_sh)
  params, got, step, which = ckpt_lib.restore_preferring_ema(
      workdir, group, {"frozen": frozen_abs}, step, use_ema=which == "ema_params")
  ld.restored_params = which
  frozen = dict(got["frozen"])
  if trained_text:
    frozen["text"] = params["text"]
  return config, ld, mesh, params["unet"], frozen, step


def restore_frozen_vae(cfg, vae_abs, stats_abs):
  """(VAE params, dict(latent_shift, latent_scale), description) of ``cfg.vae_workdir``.

  A VAE run gives its own encoder and decoder; a light-decoder run gives the encoder it was
  distilled against with its light decoder (paper sec. 3.5), so samples of every later stage
  decode with it. ``vae_abs`` / ``stats_abs``: abstract arrays (with shardings) to restore into.
  """
  if not cfg.vae_workdir:
    raise ValueError("config.vae_workdir is empty: the diffusion trainer reads latents through "
                     "a trained VAE; pass --config.vae_workdir=WORKDIR_OF_THE_VAE_RUN (or of a "
                     "light-decoder run, to decode with its light decoder)")
  src_config = ckpt_lib.read_config_json(cfg.vae_workdir) or {}
  trainer = src_config.get("trainer")
  if trainer not in (None, "vae", vae_obj.LIGHT_TRAINER):
    raise ValueError(f"config.vae_workdir={cfg.vae_workdir} is a {trainer!r} run, not a VAE or "
                     "light-decoder run: point --config.vae_workdir at the VAE stage's workdir "
                     "(the quickstart's QS/light_decoder)")
  if trainer == vae_obj.LIGHT_TRAINER:
    vae_params, stats, step, which = vae_obj.restore_vae_of_light_run(cfg, src_config, vae_abs,
                                                                       stats_abs)
    what = (f"encoder and light decoder ({which}) of the light-decoder run {cfg.vae_workdir} "
            f"step {step}")
  else:
    vae_params, got, step, which = ckpt_lib.restore_preferring_ema(
        cfg.vae_workdir, {"vae": vae_abs}, {"frozen": stats_abs})
    vae_params, stats = vae_params["vae"], got["frozen"]
    what = f"VAE ({which}) from {cfg.vae_workdir} step {step}"
  logging.info("VAE: %s", what)
  return vae_params, stats, what


@loop.register("diffusion")
class DiffusionObjective(loop.Objective):

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    self.train_text = text_trained(config)
    if self.train_text and text_cache_dir(config):
      raise ValueError(f"config.text.cache_dir={text_cache_dir(config)!r} holds a frozen "
                       "encoder's embeddings, but config.text.frozen=False trains the encoder: "
                       "clear config.text.cache_dir or set config.text.frozen=True")
    self.ld = LatentDiffusion(config)

  @property
  def trainable(self):
    if self.train_text:
      return {"unet": self.ld.unet, "text": self.ld.text}
    return {"unet": self.ld.unet}

  def init_params(self, rng):
    params = super().init_params(rng)
    if self.train_text:  # the same seeded start as a frozen encoder's (config.text.seed)
      params["text"] = self.ld.text.init(jax.random.key(int(self.config.text.seed)))
    return params

  def frozen_spec(self):
    return self.ld.frozen_spec(with_text=not self.train_text)

  def sampling_frozen(self, state):
    """The frozen arrays sampling needs: the state's, plus the text encoder being trained
    (EMA when kept) when this run trains it."""
    if not self.train_text:
      return state["frozen"]
    return dict(state["frozen"], text=eval_params(state)["text"])

  def init_frozen(self, shardings):
    cfg = self.config
    vae_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           self.ld.vae.abstract_params, shardings["vae"])
    stats_abs = {k: jax.ShapeDtypeStruct((int(cfg.vae.latent_channels),), jnp.float32,
                                         sharding=shardings[k])
                 for k in ("latent_shift", "latent_scale")}
    vae_params, stats, _ = restore_frozen_vae(cfg, vae_abs, stats_abs)
    got = {"frozen": stats}
    self.verify_latent_cache(vae_params)
    frozen = dict(vae=vae_params, latent_shift=got["frozen"]["latent_shift"],
                  latent_scale=got["frozen"]["latent_scale"])
    if self.train_text:  # the encoder is a trainable group (init_params)
      return frozen
    hf_dir = str(cfg.text.get("hf_dir", "") or "")
    if cfg.init_from:
      # The encoder the initialising run's UNet was trained with (trained there or not, from
      # hf_dir or not): any other would hand this stage's UNet features it has never seen.
      text_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              self.ld.text.abstract_params, shardings["text"])
      text_params, _, _, where = restore_run_text_encoder(cfg.init_from, text_abs)
      logging.info("text encoder (frozen here) from %s.%s", cfg.init_from, where)
    elif hf_dir:
      text_params = jax.device_put(load_hf_text_params(cfg, hf_dir), shardings["text"])
      logging.info("text encoder from %s", hf_dir)
    else:
      text_params = jax.jit(self.ld.text.init, out_shardings=shardings["text"],
                            compiler_options=state_lib.init_compiler_options())(
          jax.random.key(int(cfg.text.seed)))
    self.verify_text_cache(text_params)
    return dict(frozen, text=text_params)

  def load_init_from(self, abstract):
    cfg = self.config
    hf_dir = str(cfg.text.get("hf_dir", "") or "")
    if not cfg.init_from:
      if self.train_text and hf_dir:  # the pretrained tower is where the trained one starts
        logging.info("trainable text encoder initialised from %s", hf_dir)
        return {"params": {"text": load_hf_text_params(cfg, hf_dir)}}
      return None
    # A trainable text encoder starts from the one the initialising run's UNet was trained with:
    # that run's params (and EMA) when it trained it too, else its frozen part.
    from_frozen = self.train_text and not run_trained_text(cfg.init_from)
    strip = lambda tree: {k: v for k, v in tree.items() if not (from_frozen and k == "text")}
    want = {"params": strip(abstract["params"])}
    if from_frozen:  # read in the same restore
      want["frozen"] = {"text": abstract["params"]["text"]}
    if abstract.get("ema_params") is not None:
      want["ema_params"] = strip(abstract["ema_params"])
    try:
      got, step = ckpt_lib.restore_subset(cfg.init_from, want)
    except ckpt_lib.MissingStateError:  # the earlier stage kept no EMA: start EMA from params
      got, step = ckpt_lib.restore_subset(
          cfg.init_from, {k: v for k, v in want.items() if k != "ema_params"})
    if from_frozen:
      # The loop starts its EMA from params.
      got["params"] = dict(got["params"], text=got.pop("frozen")["text"])
      logging.info("trainable text encoder initialised from %s.frozen.text", cfg.init_from)
    logging.info("initialised from %s step %d", cfg.init_from, step)
    return got

  def data_iterator(self, process_index, process_count):
    return vae_obj.make_data_iterator(self.config, process_index, process_count,
                                      text_cache=text_cache_dir(self.config) or None,
                                      latent_cache=latent_cache_dir(self.config) or None)

  def validation_iterator(self, process_index, process_count):
    # No text cache: it is keyed by training records; the step's frozen tower encodes captions.
    return vae_obj.validation_data_iterator(self.config, process_index, process_count)

  def host_batch(self, element):
    out = {"input_ids": np.asarray(element["input_ids"], np.int32)}
    if "latent_mean" in element:  # a latent cache's posterior: the encoder is skipped in step
      out["latent_mean"] = np.asarray(element["latent_mean"], np.float32)
      out["latent_logvar"] = np.asarray(element["latent_logvar"], np.float32)
    else:
      out["image"] = np.asarray(element["image"], np.float32)
    if "text_embedding" in element:  # precomputed by the frozen encoder: it is skipped in step
      out["text_embedding"] = np.asarray(element["text_embedding"], np.float32)
    if "skipped" in element:  # real records: bad ones passed over (reported as a metric)
      out["skipped"] = np.asarray(element["skipped"], np.int32)
    return out

  def verify_text_cache(self, text_params) -> None:
    """Fails early if config.text.cache_dir was built with other text-encoder weights."""
    directory = text_cache_dir(self.config)
    if not directory:
      return
    cache = text_cache_lib.TextEmbeddingCache(directory)
    cache.check(hidden_size=int(self.config.unet.context_dim))
    fn = jax.jit(self.ld.encode_text, out_shardings=shd.replicated(self.mesh))
    cache.verify_encoder(lambda ids: jax.device_get(fn({"text": text_params}, ids)))

  def batch_spec(self, global_batch_size):
    spec = super().batch_spec(global_batch_size)
    if latent_cache_dir(self.config):
      h, w, c = self.ld.latent_shape(int(self.config.data.image_size))
      del spec["image"]
      for k in ("latent_mean", "latent_logvar"):
        spec[k] = jax.ShapeDtypeStruct((global_batch_size, h, w, c), jnp.float32)
    return spec

  def verify_latent_cache(self, vae_params) -> None:
    """Fails early if config.vae.cache_dir does not hold this data's latents under this VAE."""
    directory = latent_cache_dir(self.config)
    if not directory:
      return
    cfg = self.config
    if cfg.data.get("source", ""):
      raise ValueError("config.vae.cache_dir works with the shapes data only; clear it or "
                       f"config.data.source={cfg.data.source!r}")
    size = int(cfg.data.image_size)
    cache = latent_cache_lib.LatentCache(directory)
    cache.check(image_size=size, latent_shape=self.ld.latent_shape(size),
                num_records=int(cfg.data.num_records),
                **pipeline.shapes_cache_source("train", int(cfg.data.seed)))
    source = shapes_lib.ShapesSource("train", size, cache.num_rows, int(cfg.data.seed))
    fn = jax.jit(lambda p, x: self.ld.vae.bind(p).encode(x),
                 out_shardings=shd.replicated(self.mesh))
    err = cache.verify_encoder(
        lambda idx: pipeline.shapes_images(source, idx),
        lambda x: jax.device_get(fn(vae_params, x)))
    logging.info("latent cache %s: %d records, re-encoding matches to %.2g", directory,
                 cache.num_rows, err)

  def batch_latents(self, frozen, batch, rng):
    """Normalised latents of a batch: drawn from its cached posteriors when it carries them
    (config.vae.cache_dir), else from the frozen encoder's posterior of its images. rng=None:
    the posterior means."""
    if "latent_mean" in batch:
      return self.ld.latents_from_moments(frozen, batch["latent_mean"], batch["latent_logvar"],
                                          rng)
    return self.ld.encode_images(frozen, batch["image"], rng)

  def loss(self, params, frozen, batch, rng, step):
    ld = self.ld
    z_rng, d_rng = jax.random.split(rng)
    z = self.batch_latents(frozen, batch, z_rng)
    if "text_embedding" in batch:
      context = jax.lax.stop_gradient(batch["text_embedding"])
    elif self.train_text:
      context = ld.text_hidden(params["text"], batch["input_ids"])
    else:
      context = ld.encode_text(frozen, batch["input_ids"])
    loss, aux = losses.diffusion_loss(
        ld.schedule, ld.unet_apply(params["unet"]), z, context, d_rng,
        loss_weighting=self.config.diffusion.loss_weighting,
        min_snr_gamma=float(self.config.diffusion.min_snr_gamma))
    return loss, dict(mse=jnp.mean(aux["mse"]))

  def eval_unet_params(self, state):
    """The UNet params evaluation samples with (EMA when kept)."""
    return eval_params(state)["unet"]

  def evaluate(self, state, *, step, workdir, writer, final):
    """50-step DDIM samples for the evaluation prompts, judged; grid PNG + JSON."""
    from md_jax.data import shapes  # pylint: disable=g-import-not-at-top
    from md_jax.evaluators import shapes_judge  # pylint: disable=g-import-not-at-top
    cfg = self.config
    prompts_attrs = shapes.eval_prompts(int(cfg.sample.num_eval_samples), int(cfg.sample.eval_seed))
    prompts = [p for p, _ in prompts_attrs]
    held = [bool(a.get("held_out", False)) for _, a in prompts_attrs]
    images = generate(self.ld, self.mesh, self.eval_unet_params(state),
                      self.sampling_frozen(state), prompts, seed=int(cfg.sample.eval_seed),
                      image_size=int(cfg.data.image_size),
                      num_steps=int(cfg.sample.num_steps),
                      guidance_scale=float(cfg.sample.guidance_scale),
                      guidance_rescale=float(cfg.sample.guidance_rescale),
                      batch_size=int(cfg.sample.batch_size), progress=final)
    results = {}
    if jax.process_index() == 0:
      scores = shapes_judge.score(list(images), prompts, held_out=held)
      # Diagnostic only: the same samples with the judge's sharpness check off.
      lenient = shapes_judge.score(list(images), prompts, held_out=held, require_sharp=False)
      results = _flatten_scores(scores)
      results.update(_flatten_scores(lenient, "diagnostic_unsharp/"))
      grid = samples_lib.make_grid(images, columns=int(cfg.sample.grid_columns))
      tag = "final" if final else f"step_{step}"
      grid_path = samples_lib.save_png(grid, os.path.join(workdir, "samples", f"{tag}.png"))
      writer.write_images(step, {"samples/ddim": grid[None]})
      writer.write_scalars(step, {f"judge/{k}": v for k, v in results.items()
                                  if isinstance(v, (int, float))})
      report = dict(step=step, sampler="ddim", num_steps=int(cfg.sample.num_steps),
                    guidance_scale=float(cfg.sample.guidance_scale), num_samples=len(prompts),
                    grid=grid_path, scores=scores, chance=shapes_judge.chance(),
                    diagnostic_scores_without_sharpness_check=lenient)
      name = "eval.json" if final else f"eval_step_{step}.json"
      with open(os.path.join(workdir, name), "w") as f:
        json.dump(report, f, indent=1, default=_json_default)
    return results


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def _flatten_scores(scores, prefix=""):
  out = {}
  if isinstance(scores, dict):
    for k, v in scores.items():
      out.update(_flatten_scores(v, f"{prefix}{k}/" if isinstance(v, dict) else f"{prefix}{k}"))
  elif isinstance(scores, (int, float, np.floating, np.integer)):
    out[prefix.rstrip("/")] = float(scores)
  elif isinstance(scores, (list, tuple)) and len(scores) == 2 and all(
      isinstance(x, (int, float, np.floating)) for x in scores):
    out[prefix.rstrip("/") + "_lo"] = float(scores[0])
    out[prefix.rstrip("/") + "_hi"] = float(scores[1])
  return out
