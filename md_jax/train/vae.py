"""VAE objectives (paper sec. 3.5) on the shared loop.

``vae``: L2 reconstruction + KL, plus LPIPS (``config.vae.perceptual``) and a patch-GAN term
(``config.vae.adversarial``) when their weights are positive. ``vae_light_decoder``: a pruned
decoder distilled against the frozen encoder of a VAE run (``config.vae_workdir``) with L2 and a
reduced GAN weight, no KL; its params are saved as group ``light_decoder``.

After training, the per-channel latent shift and scale are measured on data and stored in the
checkpoint's ``frozen`` part; every later stage (diffusion, sampling, export) reads them from
there so latents reach the UNet with zero mean and unit variance per channel.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from md_jax.data import pipeline
from md_jax.models import discriminator as disc_lib
from md_jax.models import vae as vae_lib
from md_jax.train import loop
from md_jax.train import sharding as shd
from md_jax.train.state import ModelSpec
from md_jax.evaluators import samples as images_lib


def compute_dtype(config):
  return jnp.dtype(config.compute_dtype)


def vae_spec(config) -> ModelSpec:
  return ModelSpec("vae", lambda rngs: vae_lib.VAE(config.vae, rngs=rngs,
                                                    dtype=compute_dtype(config)))


def default_adversarial_config() -> ml_collections.ConfigDict:
  """``config.vae.adversarial``: the patch-GAN term of the VAE loss (weight 0 turns it off)."""
  return ml_collections.ConfigDict(dict(
      weight=0.0,  # weight of the generator's non-saturating GAN loss
      start_step=0,  # both D and the GAN term switch on here (after the autoencoder settles)
      channels=(64, 128, 256),  # discriminator stages (each halves the resolution)
      norm_groups=32,
      # The discriminator's own AdamW (the usual GAN betas); weight decay off.
      learning_rate=1e-4,
      b1=0.5,
      b2=0.9,
  ))


def default_perceptual_config() -> ml_collections.ConfigDict:
  """``config.vae.perceptual``: the LPIPS(VGG16) term of the VAE loss (weight 0 turns it off).

  ``weights`` is a local .npz made by ``python -m md_jax.tools.convert_lpips`` from a torchvision
  VGG16 file the user supplies and LPIPS' linear heads; nothing is downloaded.
  """
  return ml_collections.ConfigDict(dict(weight=0.0, weights=""))


def perceptual_config(config) -> ml_collections.ConfigDict | None:
  """The perceptual settings when the term is on; fails naming the key when its file is missing."""
  per = config.vae.get("perceptual")
  if per is None or not float(per.weight):
    return None
  path = per.get("weights")
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(
        f"config.vae.perceptual.weight={per.weight} needs LPIPS weights: "
        f"config.vae.perceptual.weights={path!r} is {'empty' if not path else 'not a file'}. "
        "Convert local files with `python -m md_jax.tools.convert_lpips --vgg16=VGG16.pth "
        "--heads=LPIPS_VGG.pth --out=FILE.npz` (nothing is downloaded), or set "
        "config.vae.perceptual.weight=0 to train without the perceptual term")
  return per


def lpips_spec(config) -> ModelSpec:
  from md_jax.models import lpips as lpips_lib  # pylint: disable=g-import-not-at-top
  return ModelSpec("lpips", lambda rngs: lpips_lib.LPIPS(rngs=rngs, dtype=compute_dtype(config)))


def _str_keys(tree):
  return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


class _Perceptual:
  """The frozen LPIPS net shared by the VAE and light-decoder objectives (in ``frozen['lpips']``)."""

  def _init_perceptual(self, config):
    self.perceptual = perceptual_config(config)
    self.lpips = lpips_spec(config) if self.perceptual is not None else None

  def _perceptual_frozen_spec(self):
    if self.lpips is None:
      return {}, {}
    return {"lpips": self.lpips.abstract_params}, {"lpips": self.lpips.logical}

  def _perceptual_frozen(self, shardings):
    if self.lpips is None:
      return {}
    from md_jax.models import lpips as lpips_lib  # pylint: disable=g-import-not-at-top
    params = _str_keys(lpips_lib.load_params(self.perceptual.weights))
    return {"lpips": jax.device_put(params, shardings["lpips"])}

  def _perceptual_loss(self, frozen, recon, x):
    net = self.lpips.bind(jax.lax.stop_gradient(frozen["lpips"]))
    return jnp.mean(net(recon, x))


def adversarial_config(config) -> ml_collections.ConfigDict | None:
  adv = config.vae.get("adversarial")
  if adv is None or not float(adv.weight):
    return None
  return adv


def disc_spec(config) -> ModelSpec:
  adv = adversarial_config(config)
  cfg = ml_collections.ConfigDict(dict(channels=tuple(adv.channels), norm_groups=adv.norm_groups,
                                       in_channels=int(config.vae.get("in_channels", 3))))
  return ModelSpec("disc", lambda rngs: disc_lib.PatchDiscriminator(
      cfg, rngs=rngs, dtype=compute_dtype(config)))


def latent_stats_spec(config):
  c = int(config.vae.latent_channels)
  abstract = dict(latent_shift=jax.ShapeDtypeStruct((c,), jnp.float32),
                  latent_scale=jax.ShapeDtypeStruct((c,), jnp.float32))
  return abstract, dict(latent_shift=None, latent_scale=None)


def validation_data_iterator(config, process_index, process_count):
  """Held-out batches for ``config.val``: the shapes data's eval split, every caption kept.
  Real records (``config.data.source``) have no split here: their batches come from the same
  records in another order (seed + 1), a fixed probe rather than unseen data."""
  return make_data_iterator(config, process_index, process_count, split="eval", seed_offset=1,
                            caption_dropout=0.0)


def make_data_iterator(config, process_index, process_count, *, split="train", seed_offset=0,
                       image_size=None, caption_dropout=None, text_cache=None,
                       latent_cache=None):
  tokenizer = pipeline.load_tokenizer(pipeline.tokenizer_dir(config.text))
  source = str(config.data.get("source", "") or "")
  if not source and config.data.get("name", "shapes") != "shapes":
    raise ValueError(f"config.data.name={config.data.name!r} needs --config.data.source (a "
                     "directory written by `python -m md_jax.data.prepare` or tfds:NAME[:SPLIT])")
  if source:
    # Real image-text records (python -m md_jax.data.prepare, or tfds:NAME[:SPLIT]).
    for key, cache in (("config.text.cache_dir", text_cache),
                       ("config.vae.cache_dir", latent_cache)):
      if cache:
        raise ValueError(f"{key} works with the shapes data only; clear it or "
                         f"config.data.source={source!r}")
    return pipeline.make_records_iterator(
        source=source,
        tfds_data_dir=str(config.data.get("tfds_data_dir", "") or "") or None,
        image_size=int(image_size or config.data.image_size),
        global_batch_size=int(config.global_batch_size),
        process_index=process_index,
        process_count=process_count,
        seed=int(config.data.seed) + seed_offset,
        tokenizer=tokenizer,
        max_length=int(config.data.max_length),
        caption_dropout=float(config.data.caption_dropout if caption_dropout is None
                              else caption_dropout),
    )
  return pipeline.make_shapes_iterator(
      split=split,
      image_size=int(image_size or config.data.image_size),
      global_batch_size=int(config.global_batch_size),
      process_index=process_index,
      process_count=process_count,
      seed=int(config.data.seed) + seed_offset,
      tokenizer=tokenizer,
      max_length=int(config.data.max_length),
      num_records=int(config.data.num_records),
      caption_dropout=float(config.data.caption_dropout if caption_dropout is None
                            else caption_dropout),
      text_cache=text_cache,
      latent_cache=latent_cache,
  )


def _gradient_l1(a, b):
  dy = lambda t: t[:, 1:, :, :] - t[:, :-1, :, :]
  dx = lambda t: t[:, :, 1:, :] - t[:, :, :-1, :]
  return jnp.mean(jnp.abs(dy(a) - dy(b))) + jnp.mean(jnp.abs(dx(a) - dx(b)))


def random_crop(x, size: int, align: int, rng):
  """Per-example random ``size`` crops at offsets aligned to the latent grid (0: no crop).

  The VAE is fully convolutional, so training on crops of the full-resolution images keeps the
  object scale it will see while costing (size/H)^2 of the compute.
  """
  b, h, w, c = x.shape
  if not size or size >= h:
    return x
  if size % align or h % align:
    raise ValueError(f"config.vae.train_crop={size} must be a multiple of the VAE factor {align}")
  n = (h - size) // align + 1
  offs = jax.random.randint(rng, (b, 2), 0, n) * align
  return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (size, size, c)))(
      x, offs)


def train_crop(config, images, rng):
  """The training crop of ``config.vae.train_crop`` (0: whole images), aligned to the latent grid."""
  return random_crop(images, int(config.vae.get("train_crop", 0) or 0),
                     vae_lib.downsample_factor(config.vae), rng)


def kl_term_weight(config, image_shape) -> float:
  """The KL's weight against our per-value mean reconstruction loss.

  ``config.vae.kl_weight`` is in SD's convention (the paper gives no weight; SD's VAE used
  1e-6): there the reconstruction error is summed over an image's H*W*C values and the KL
  (summed over latent values) is added with that weight. Our reconstruction terms average over
  the values instead, so the same balance needs the weight divided by H*W*C of the trained
  images (crops).
  """
  _, h, w, c = image_shape
  return float(config.vae.kl_weight) / float(h * w * c)


def reconstruction_terms(config, recon, x):
  """(reconstruction loss as config.vae.recon_loss + grad_loss_weight ask, metrics dict).

  Metrics hold mse, l1 and psnr whatever the loss is, so runs with different losses compare.
  """
  mse = jnp.mean(jnp.square(recon - x))
  l1 = jnp.mean(jnp.abs(recon - x))
  kind = config.vae.recon_loss
  if kind == "l2":
    loss = mse
  elif kind == "l1":
    loss = l1
  elif kind == "l1+l2":
    loss = l1 + mse
  else:
    raise ValueError(f"config.vae.recon_loss={kind!r}: expected l2|l1|l1+l2")
  grad_w = float(config.vae.get("grad_loss_weight", 0.0) or 0.0)
  if grad_w:
    # Gradient-difference term (Mathieu et al. 2016): pixel losses average over the
    # uncertain position of an edge and blur it; matching image gradients penalises that.
    loss = loss + grad_w * _gradient_l1(recon, x)
  psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))  # images span [-1, 1]
  return loss, dict(mse=mse, l1=l1, psnr=psnr)


@loop.register("vae")
class VAEObjective(_Perceptual, loop.Objective):
  """L2 reconstruction + KL, plus a patch-GAN term when ``config.vae.adversarial.weight`` > 0.

  With the GAN term the discriminator is a second trainable group ("disc") with its own
  optimizer state in the same sharded train state. Both groups take their gradients from one
  loss in one pass: the generator's GAN term reads the discriminator through stop_gradient and
  the discriminator's term reads the reconstruction through stop_gradient, so each group learns
  only from its own objective while the autoencoder's forward pass is shared.
  """

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    self._init_perceptual(config)
    self.spec = vae_spec(config)
    self.adv = adversarial_config(config)
    self.disc = disc_spec(config) if self.adv is not None else None

  @property
  def trainable(self):
    out = {"vae": self.spec}
    if self.disc is not None:
      out["disc"] = self.disc
    return out

  def optim_config(self, group):
    if group != "disc":
      return self.config.optim
    cfg = ml_collections.ConfigDict(self.config.optim.to_dict())
    cfg.learning_rate = float(self.adv.learning_rate)
    cfg.b1, cfg.b2 = float(self.adv.b1), float(self.adv.b2)
    cfg.weight_decay = 0.0
    return cfg

  def ema_groups(self):
    return ("vae",)

  def frozen_spec(self):
    abstract, logical = latent_stats_spec(self.config)
    p_abs, p_logical = self._perceptual_frozen_spec()
    return dict(abstract, **p_abs), dict(logical, **p_logical)

  def init_frozen(self, shardings):
    c = int(self.config.vae.latent_channels)
    stats = jax.device_put(dict(latent_shift=np.zeros((c,), np.float32),
                                latent_scale=np.ones((c,), np.float32)),
                           {k: shardings[k] for k in ("latent_shift", "latent_scale")})
    return dict(stats, **self._perceptual_frozen(shardings))

  def data_iterator(self, process_index, process_count):
    return make_data_iterator(self.config, process_index, process_count, caption_dropout=0.0)

  def validation_iterator(self, process_index, process_count):
    return validation_data_iterator(self.config, process_index, process_count)

  def batch_spec(self, global_batch_size):
    return {"image": super().batch_spec(global_batch_size)["image"]}

  def host_batch(self, element):
    out = {"image": np.asarray(element["image"], np.float32)}
    if "skipped" in element:  # real records: bad ones passed over (reported as a metric)
      out["skipped"] = np.asarray(element["skipped"], np.int32)
    return out

  def loss(self, params, frozen, batch, rng, step):
    model = self.spec.bind(params["vae"])
    crop_rng, rng = jax.random.split(rng)
    x = train_crop(self.config, batch["image"], crop_rng)
    recon, mean, logvar = model(x, rng)
    recon = recon.astype(jnp.float32)
    recon_loss, metrics = reconstruction_terms(self.config, recon, x)
    kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar,
                                axis=(1, 2, 3)))
    loss = recon_loss + kl_term_weight(self.config, x.shape) * kl
    metrics["kl"] = kl
    if self.lpips is not None:
      metrics["lpips"] = self._perceptual_loss(frozen, recon, x)
      loss = loss + float(self.perceptual.weight) * metrics["lpips"]
    if self.disc is not None:
      adv_loss, adv_metrics = self._adversarial(params, x, recon, step)
      loss = loss + adv_loss
      metrics.update(adv_metrics)
    return loss, metrics

  def _adversarial(self, params, x, recon, step):
    """Non-saturating GAN terms: D on real vs stop_gradient(recon); G through a frozen D."""
    on = (step >= int(self.adv.start_step)).astype(jnp.float32)
    d_train = self.disc.bind(params["disc"])
    real_logits = d_train(x)
    fake_logits = d_train(jax.lax.stop_gradient(recon))
    d_loss = jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))
    d_frozen = self.disc.bind(jax.lax.stop_gradient(params["disc"]))
    g_loss = jnp.mean(jax.nn.softplus(-d_frozen(recon)))
    weight = on * float(self.adv.weight)
    total = on * d_loss + weight * g_loss
    return total, dict(d_loss=d_loss, g_adv=g_loss, adv_weight=weight,
                       d_real_logit=jnp.mean(real_logits), d_fake_logit=jnp.mean(fake_logits))

  # -- after training ------------------------------------------------------------------------
  eval_name = "vae"  # names the evaluation's json / png files

  def reconstruct(self, params, frozen, x):
    """Decoded posterior means of images ``x`` (traced)."""
    del frozen
    model = self.spec.bind(params["vae"])
    mean, _ = model.encode(x)
    return model.decode(mean).astype(jnp.float32)

  def _baseline_eval(self, recon, state, x, images) -> dict:
    """Extra final metrics to read the trained model against (none for the VAE)."""
    return {}

  def _params_for_eval(self, state):
    return state["ema_params"] if state.get("ema_params") is not None else state["params"]

  def finalize(self, state):
    """Measures per-channel latent mean/std on fresh data and stores them in ``frozen``.

    Measured on posterior samples z = mean + std * eps, the latents the diffusion stages train
    on (as SD's scale factor was), not on the posterior means: where the posterior std is not
    small next to the spread of the means, mean-based statistics under-scale and the diffusion
    stage sees latents of variance well above 1 (its v-loss then starts above the trivial 1.0).
    """
    cfg = self.config
    it = make_data_iterator(cfg, jax.process_index(), jax.process_count(), split="eval",
                            seed_offset=7919, caption_dropout=0.0)
    spec = self.spec
    mesh = self.mesh

    @jax.jit
    def moments(params, x, rng):
      mean, logvar = spec.bind(params["vae"]).encode(x)
      mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
      z = vae_lib.sample_posterior(mean, logvar, rng)
      return jnp.mean(z, axis=(0, 1, 2)), jnp.mean(jnp.square(z), axis=(0, 1, 2))

    params = self._params_for_eval(state)
    m1, m2 = [], []
    key = jax.random.key(int(cfg.seed) + 7919)
    for i in range(int(cfg.vae.stats_batches)):
      el = next(it)
      x = shd.global_batch_from_local({"image": np.asarray(el["image"], np.float32)}, mesh)
      a, b = moments(params, x["image"], jax.random.fold_in(key, i))
      m1.append(np.asarray(a))
      m2.append(np.asarray(b))
    mu = np.mean(m1, axis=0)
    var = np.maximum(np.mean(m2, axis=0) - mu ** 2, 1e-8)
    stats = dict(latent_shift=mu.astype(np.float32), latent_scale=np.sqrt(var).astype(np.float32))
    logging.info("latent shift %s scale %s", np.round(mu, 3), np.round(np.sqrt(var), 3))
    state = dict(state)
    frozen = dict(state["frozen"])
    frozen.update(jax.device_put(stats, {k: frozen[k].sharding for k in stats}))
    state["frozen"] = frozen
    return state

  def evaluate(self, state, *, step, workdir, writer, final):
    """Reconstruction PSNR and the shapes judge on reconstructions of evaluation images.

    The judge's accuracy on reconstructions is the ceiling for everything decoded later: a
    sample can only be judged right if the decoder draws sharp, correctly coloured shapes.
    """
    from md_jax.data import shapes  # pylint: disable=g-import-not-at-top
    cfg = self.config
    n = int(cfg.sample.num_eval_samples)
    div = shd.batch_divisor(self.mesh)
    n = max(div, (n // div) * div)

    def held_out(size):  # the evaluation records rendered at ``size``, and as model input
      records = [shapes.make_record("eval", i, size, seed=int(cfg.sample.eval_seed))
                 for i in range(n)]
      return records, np.stack([r["image"] for r in records]).astype(np.float32) / 127.5 - 1.0

    records, images = held_out(int(cfg.data.image_size))
    recon = jax.jit(self.reconstruct)
    params = self._params_for_eval(state)
    x = jax.device_put(images, shd.batch_sharding(self.mesh, 4))
    y_host = images_lib.gather_to_host(recon(params, state["frozen"], x))
    mse = float(np.mean((np.clip(y_host, -1, 1) - images) ** 2))
    psnr = float(10 * np.log10(4.0 / max(mse, 1e-10)))
    results = {"eval/recon_psnr": psnr, "eval/recon_mse": mse}
    if final:
      results.update(self._baseline_eval(recon, state, x, images))
    # The autoencoder is fully convolutional: reconstructions of the same records rendered at
    # larger sizes tell how much of the judge's verdict is the decoder's absolute blur (the judge
    # measures edges in 64-px units), i.e. the ceiling a diffusion stage at that size would have.
    extra = {}
    for extra_size in tuple(cfg.vae.get("judge_extra_sizes", ()) or ()):
      xs = jax.device_put(held_out(int(extra_size))[1], shd.batch_sharding(self.mesh, 4))
      extra[int(extra_size)] = images_lib.gather_to_host(recon(params, state["frozen"], xs))
    if jax.process_index() == 0:
      recon_u8 = images_lib.to_uint8(y_host)
      captions = [r["caption"] for r in records]
      results.update(_judge_reconstructions(recon_u8, captions, "eval/recon"))
      for extra_size, y in extra.items():
        results.update(_judge_reconstructions(images_lib.to_uint8(y), captions,
                                              f"eval/recon{extra_size}"))
      k = min(16, n)
      pairs = np.concatenate([images_lib.to_uint8(images[:k]), recon_u8[:k]], axis=0)
      grid = images_lib.make_grid(pairs, columns=k)
      name = self.eval_name
      path = images_lib.save_png(grid, os.path.join(workdir, "samples", f"{name}_step_{step}.png"))
      writer.write_images(step, {f"{name}/reconstructions": grid[None]})
      writer.write_scalars(step, results)
      with open(os.path.join(workdir, f"eval_{name}.json" if final else f"eval_{name}_{step}.json"),
                "w") as f:
        json.dump(dict(step=step, grid=path, num_images=n, **results), f, indent=1)
    return results


def _judge_reconstructions(recon_u8, captions, prefix: str) -> dict:
  """The shapes judge on reconstructions (strict, and without its sharpness check) and the
  median edge width (64-px units), as ``{prefix}_judge_<key>``, ``{prefix}_judge_unsharp_<key>``
  and ``{prefix}_edge_width_median``."""
  from md_jax.evaluators import shapes_judge  # pylint: disable=g-import-not-at-top
  judged = shapes_judge.score(list(recon_u8), captions)
  # One lenient pass per image gives both the diagnostic score and the edge widths.
  verdicts = [shapes_judge.judge(im, c, require_sharp=False) for im, c in zip(recon_u8, captions)]
  lenient = shapes_judge.summarise(verdicts)
  out = {}
  for key in ("colour", "shape", "position", "all", "rejected"):
    out[f"{prefix}_judge_{key}"] = float(judged[key])
    out[f"{prefix}_judge_unsharp_{key}"] = float(lenient[key])
  if lenient["edge_width_n"]:
    out[f"{prefix}_edge_width_median"] = lenient["edge_width_median"]
  return out


# -- the light decoder (paper sec. 3.5) ------------------------------------------------------------
LIGHT_TRAINER = "vae_light_decoder"  # config.trainer of a light-decoder run
LIGHT_DECODER = "light_decoder"  # the params group name later stages and export restore


def encoder_spec(config) -> ModelSpec:
  return ModelSpec("encoder", lambda rngs: vae_lib.Encoder(config.vae, rngs=rngs,
                                                            dtype=compute_dtype(config)))


def light_decoder_spec(config) -> ModelSpec:
  """The decoder ``config.vae.decoder_channels`` / ``decoder_res_blocks`` describe."""
  return ModelSpec(LIGHT_DECODER, lambda rngs: vae_lib.Decoder(config.vae, rngs=rngs,
                                                                dtype=compute_dtype(config)))


def restore_encoder_and_stats(config, encoder_abstract, stats_abstract):
  """(encoder params, {latent_shift, latent_scale}, step) of the VAE run ``config.vae_workdir``.

  Reads the EMA copy of the encoder when the run kept one, else its params. Abstract leaves may
  carry shardings (the arrays are then restored onto them).
  """
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  params, got, step, which = ckpt_lib.restore_preferring_ema(
      config.vae_workdir, {"vae": {"encoder": encoder_abstract}}, {"frozen": stats_abstract})
  logging.info("encoder (%s) and latent stats from %s step %d", which, config.vae_workdir, step)
  return params["vae"]["encoder"], got["frozen"], step


def restore_light_run(workdir: str, decoder_abstract, stats_abstract: dict,
                      encoder_abstract=None, step: int | None = None, use_ema: bool = True):
  """What a light-decoder run's checkpoint holds for later stages and export: its light decoder
  (the EMA copy when ``use_ema`` and the run kept one), the VAE's latent statistics it carries
  and, with ``encoder_abstract``, the frozen encoder it was distilled against. Returns (decoder,
  frozen, step, "ema_params" | "params"); frozen has the stats keys (and ``encoder``)."""
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  frozen_abs = dict(stats_abstract)
  if encoder_abstract is not None:
    frozen_abs["encoder"] = encoder_abstract
  dec, got, step, which = ckpt_lib.restore_preferring_ema(
      workdir, {LIGHT_DECODER: decoder_abstract}, {"frozen": frozen_abs}, step, use_ema)
  return dec[LIGHT_DECODER], got["frozen"], step, which


DECODER_SHAPE_KEYS = ("decoder_channels", "decoder_res_blocks")


def require_decoder_shape_of(config, stored_config: dict, whose: str) -> None:
  """Refuses ``config`` unless its ``vae.decoder_channels`` / ``decoder_res_blocks`` are those of
  ``stored_config`` (another run's config.json), naming the key and the flag that fixes it.

  Every stage that takes a VAE from another run's checkpoint builds its decoder from its own
  config; a light decoder there has other shapes than the default full one.
  """
  stored_vae = stored_config.get("vae", {})
  norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  for key in DECODER_SHAPE_KEYS:
    have, want = norm(config.vae.get(key)), norm(stored_vae.get(key))
    if have != want:
      raise ValueError(f"config.vae.{key} is {have!r}, but {whose} a decoder with {want!r}: "
                       f"pass --config.vae.{key}={want!r}")


def restore_vae_of_light_run(config, light_config: dict, vae_abstract, stats_abstract):
  """The VAE a light-decoder run ``config.vae_workdir`` (stored config ``light_config``) stands
  for: the encoder it was distilled against with its latent statistics (both carried in its
  checkpoint) and its own (EMA) light decoder. Returns ({encoder, decoder}, {latent_shift,
  latent_scale}, step, "ema_params" | "params").

  ``config.vae``'s decoder widths and depth must be the run's: they shape the decoder every
  later stage, sampler and export builds.
  """
  run = config.vae_workdir
  require_decoder_shape_of(config, light_config, f"the light-decoder run {run} "
                           "(config.vae_workdir) trained")
  dec, frozen, step, which = restore_light_run(run, vae_abstract["decoder"], stats_abstract,
                                               encoder_abstract=vae_abstract["encoder"])
  return (dict(encoder=frozen["encoder"], decoder=dec),
          {k: frozen[k] for k in stats_abstract}, step, which)


def full_decoder_spec(config) -> ModelSpec:
  """The VAE run's own decoder (``vae.channels`` / ``num_res_blocks``), whatever the light
  decoder's widths in ``config``."""
  vae_cfg = ml_collections.ConfigDict(config.vae.to_dict())
  vae_cfg.decoder_channels = None
  vae_cfg.decoder_res_blocks = None
  return ModelSpec("decoder", lambda rngs: vae_lib.Decoder(vae_cfg, rngs=rngs,
                                                          dtype=compute_dtype(config)))


def prune_to(full: dict, abstract: dict) -> dict:
  """A narrower, shallower copy of ``full``: for every leaf of ``abstract`` the same path in
  ``full``, cut to the leaf's shape by keeping the leading entries of each axis.

  Keeping channels 0..c-1 everywhere is consistent across layers (what one conv writes to
  channel i the next reads from channel i, the residual stream included), and a level's
  first resblocks are kept when the light decoder has fewer: a trained starting point for
  distillation rather than a random one (paper sec. 3.5 prunes the decoder).
  """
  flat_full = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(full)[0]}

  def cut(path, a):
    key = jax.tree_util.keystr(path)
    if key not in flat_full:
      raise ValueError(f"cannot prune decoder: the full decoder has no {key}")
    src = flat_full[key]
    if src.ndim != len(a.shape) or any(n > m for n, m in zip(a.shape, src.shape)):
      raise ValueError(f"cannot prune decoder{key}: {tuple(src.shape)} -> {tuple(a.shape)} "
                       "(the light decoder must be narrower, not wider)")
    return src[tuple(slice(0, n) for n in a.shape)].astype(a.dtype)

  return jax.tree_util.tree_map_with_path(cut, abstract)


@loop.register(LIGHT_TRAINER)
class LightDecoderObjective(VAEObjective):
  """Distils a pruned decoder against the VAE's frozen encoder (paper sec. 3.5).

  Trainable: the light decoder (group ``light_decoder``) and, with the GAN term, the patch
  discriminator; frozen: the VAE run's encoder and its latent shift/scale, carried unchanged
  into this run's checkpoint so it is self-contained for later stages and export. The loss is
  the VAE's reconstruction loss on decoded posterior samples plus the (reduced) GAN term; no KL,
  since the encoder does not learn.
  """

  eval_name = "light_decoder"

  def __init__(self, config, mesh):
    loop.Objective.__init__(self, config, mesh)
    if not config.vae_workdir:
      raise ValueError("config.vae_workdir is empty: the light decoder trains against the frozen "
                       "encoder of a VAE run (and with vae.light_init='prune' starts from its "
                       "decoder); pass --config.vae_workdir=WORKDIR_OF_THE_VAE_RUN")
    self._init_perceptual(config)
    self.encoder = encoder_spec(config)
    self.decoder = light_decoder_spec(config)
    self.light_init = str(config.vae.get("light_init", "random"))
    if self.light_init not in ("prune", "random"):
      raise ValueError(f"config.vae.light_init must be 'prune' or 'random', got "
                       f"{self.light_init!r}")
    self.adv = adversarial_config(config)
    self.disc = disc_spec(config) if self.adv is not None else None
    self._psnr_at_init: float | None = None  # computed by the first evaluation (_baseline_eval)

  @property
  def trainable(self):
    out = {LIGHT_DECODER: self.decoder}
    if self.disc is not None:
      out["disc"] = self.disc
    return out

  def ema_groups(self):
    return (LIGHT_DECODER,)

  def frozen_spec(self):
    stats_abs, stats_logical = latent_stats_spec(self.config)
    p_abs, p_logical = self._perceptual_frozen_spec()
    return (dict(encoder=self.encoder.abstract_params, **stats_abs, **p_abs),
            dict(encoder=self.encoder.logical, **stats_logical, **p_logical))

  def load_init_from(self, abstract):
    """With ``vae.light_init = "prune"``: the light decoder (and its EMA) starts as the VAE
    run's decoder cut to its widths and depth (``prune_to``); D, if any, starts fresh."""
    if self.light_init == "random":
      return None
    light = self.pruned_decoder(abstract["params"][LIGHT_DECODER])
    params = {LIGHT_DECODER: light}
    if self.disc is not None:
      d_abs = abstract["params"]["disc"]
      params["disc"] = jax.jit(self.disc.init, out_shardings=jax.tree.map(lambda a: a.sharding,
                                                                          d_abs))(
          jax.random.fold_in(jax.random.key(int(self.config.seed)), 1))
    return {"params": params, "ema_params": {LIGHT_DECODER: jax.tree.map(jnp.copy, light)}}

  def pruned_decoder(self, target=None) -> dict:
    """The VAE run's decoder (EMA if kept) cut to the light decoder's shapes, placed like
    ``target`` (abstract leaves with shardings; default: this machine's first device)."""
    from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    target = self.decoder.abstract_params if target is None else target
    full, _, step, which = ckpt_lib.restore_preferring_ema(
        self.config.vae_workdir,
        {"vae": {"decoder": full_decoder_spec(self.config).abstract_params}})
    leaves = jax.tree.leaves(target)
    shardings = (jax.tree.map(lambda a: a.sharding, target)
                 if all(getattr(a, "sharding", None) is not None for a in leaves) else None)
    light = jax.jit(lambda f: prune_to(f, target), out_shardings=shardings)(full["vae"]["decoder"])
    logging.info("light decoder pruned from the decoder (%s) of %s step %d", which,
                 self.config.vae_workdir, step)
    return light

  def init_frozen(self, shardings):
    enc_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           self.encoder.abstract_params, shardings["encoder"])
    c = int(self.config.vae.latent_channels)
    stats_abs = {k: jax.ShapeDtypeStruct((c,), jnp.float32, sharding=shardings[k])
                 for k in ("latent_shift", "latent_scale")}
    enc, stats, _ = restore_encoder_and_stats(self.config, enc_abs, stats_abs)
    return dict(encoder=enc, **stats, **self._perceptual_frozen(shardings))

  def loss(self, params, frozen, batch, rng, step):
    crop_rng, rng = jax.random.split(rng)
    x = train_crop(self.config, batch["image"], crop_rng)
    mean, logvar = self.encoder.bind(jax.lax.stop_gradient(frozen["encoder"]))(x)
    z = vae_lib.sample_posterior(mean, logvar, rng)
    z = jax.lax.stop_gradient(z)
    recon = self.decoder.bind(params[LIGHT_DECODER])(z).astype(jnp.float32)
    loss, metrics = reconstruction_terms(self.config, recon, x)
    if self.lpips is not None:
      metrics["lpips"] = self._perceptual_loss(frozen, recon, x)
      loss = loss + float(self.perceptual.weight) * metrics["lpips"]
    if self.disc is not None:
      adv_loss, adv_metrics = self._adversarial(params, x, recon, step)
      loss = loss + adv_loss
      metrics.update(adv_metrics)
    return loss, metrics

  def finalize(self, state):
    return state  # the latent stats are the VAE run's, carried over in ``frozen``

  def _baseline_eval(self, recon, state, x, images) -> dict:
    """PSNR of the decoder distillation starts from (freshly initialised with seed
    ``config.seed``, or pruned from the VAE's with ``vae.light_init = "prune"``): what
    distillation gains over it. The start and the held-out images are the same at every
    evaluation: computed once per process."""
    if self._psnr_at_init is not None:
      return {"eval/recon_psnr_at_init": self._psnr_at_init}
    if self.light_init == "prune":
      init = self.pruned_decoder()
    else:
      init = jax.jit(self.decoder.init)(jax.random.key(int(self.config.seed)))
    y = images_lib.gather_to_host(recon({LIGHT_DECODER: init}, state["frozen"], x))
    mse = float(np.mean((np.clip(y, -1, 1) - images) ** 2))
    self._psnr_at_init = float(10 * np.log10(4.0 / max(mse, 1e-10)))
    return {"eval/recon_psnr_at_init": self._psnr_at_init}

  def reconstruct(self, params, frozen, x):
    mean, _ = self.encoder.bind(frozen["encoder"])(x)
    return self.decoder.bind(params[LIGHT_DECODER])(mean).astype(jnp.float32)
