"""UFOGen one-step finetuning of a pretrained diffusion UNet (paper sec. 4, eq. 1-3; DESIGN 3).

Two trainable groups on the shared loop:
  * ``unet`` - the generator G, initialised from the pretrained run (its EMA when it kept one).
    Named like the diffusion objective's UNet, so sampling, evaluation and export read a UFOGen
    checkpoint exactly as a diffusion one; its one-step output is x0' = convert(G(x_t, t, c)).
  * ``disc`` - the discriminator D: the same UNet structure with a one-channel output layer,
    initialised from the same pretrained weights, the output layer reset to zero. Its per-location
    logits are averaged over locations (paper 4.1), so D is exactly 0 (undecided) at the start.

One train step runs two phases on the same batch and the same noise draws: D first
(softplus(-D(x_{t-1})) + softplus(D(x'_{t-1}))), then G against the updated D
(softplus(-D(x'_{t-1})) plus the reconstruction term), where x_t ~ q(x_t|x0),
x0' = G(x_t, t), x_{t-1} ~ q(x_{t-1}|x0), x'_{t-1} ~ q(x_{t-1}|x0') and D sees timestep t-1
(``config.ufogen.timestep_gap`` replaces the 1; ``shared_noise`` diffuses both with one draw).
``disc.steps`` > 1 adds D updates before those two, each on its own draw of the same batch.
Every evaluation also asks whether D learns: ``discriminator_probe`` on held-out draws.

The frozen text encoder, VAE and latent statistics are read from the pretrained run's
checkpoint, so a finetune needs nothing but ``init_from``. The ``distill`` reconstruction term
also keeps the pretrained UNet as a frozen teacher; the ``ema`` term regresses onto G's EMA as it
stands at the start of the step (the loop passes it to G's phase).

``finetune='lora'``: the trainable G group is ``unet_lora``, low-rank factors on the kernels
``config.ufogen.lora.targets`` names (models/lora.py), and the pretrained UNet is kept as
``frozen['unet']`` (also the ``distill`` teacher then). G = the base with the factors merged;
sampling and export read that merged, plain UNet (``train.diffusion.load_for_sampling``).
``disc.encoder_only``: D is the UNet's down path and middle stack with a zero-initialised logit
head at the innermost resolution (models/unet.UNetEncoder).
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from md_jax.diffusion import schedule as sch
from md_jax.evaluators.two_sample import roc_auc
from md_jax.models import lora as lora_lib
from md_jax.models import unet as unet_lib
from md_jax.train import checkpoint as ckpt_lib
from md_jax.train import diffusion as diff_obj
from md_jax.train import loop
from md_jax.train import sharding as shd
from md_jax.train import vae as vae_obj
from md_jax.train.state import ModelSpec

RECON_TERMS = ("diffusion", "distill", "ema")
FINETUNE_KINDS = ("full", "lora")
RECON_WEIGHTINGS = ("prediction", "none", "min_snr")
REAL_LATENTS = ("sample", "mean")


def default_config() -> ml_collections.ConfigDict:
  """``config.ufogen``: the GAN finetune's own knobs."""
  return ml_collections.ConfigDict(dict(
      recon="diffusion",  # diffusion | distill | ema (Table 5 rows)
      finetune="full",  # full | lora (Table 5 columns; LoRA on G only)
      recon_weight=1.0,  # lambda
      # gamma_t: 'prediction' makes lambda*gamma_t*||x0 - x0'||^2 the pretraining loss of the
      # prediction type at t (v: snr + 1, eps: snr, x0: 1); 'none': 1; 'min_snr': min(snr, 5).
      recon_weighting="prediction",
      min_snr_gamma=5.0,
      # 0 turns the adversarial term off (one-step regression only). Larger is not sharper: at
      # 4.0 D fell to chance and G blurred like the no-adversary control (docs/results.md).
      adv_weight=1.0,
      timestep_gap=1,  # D judges x_{t-gap}; the paper's x_{t-1}
      # True: x_{t-1} and x'_{t-1} diffuse x0 and x0' with one shared noise draw. Each term of
      # eq. 1 is still an expectation over a correctly distributed sample, so the objective is
      # unchanged; D's gradient (real minus fake) then carries sqrt(alpha_bar)(x0 - x0') instead
      # of that plus two independent noise draws (common random numbers); D learned a little
      # faster with it on shapes (docs/results.md).
      shared_noise=True,
      # x0, the real data of both terms: 'sample' draws it from the VAE posterior, as the
      # pretraining loss does; 'mean' takes the posterior mean, so D cannot tell real from fake by
      # the posterior's per-location noise (which G's x0' lacks and the decoder mostly ignores).
      # 'mean' was no sharper on shapes and worse by fd_shapes (docs/results.md).
      real_latents="sample",
      disc=ml_collections.ConfigDict(dict(
          learning_rate=1e-4,
          # Momentum: D is a pretrained UNet learning from a few examples per step; without it
          # (b1=0, common for GANs trained from scratch) every weight steps by ~lr along one
          # small batch's noise, and the shapes D stayed undecided (docs/results.md).
          b1=0.9,
          b2=0.99,
          every=1,  # D updates at steps where step % every == 0
          # D updates per train step (each on the step's batch with its own timesteps and noise,
          # the last on the draws G's update then uses): > 1 lets D keep up with G without a
          # larger learning rate. D's optimizer counts every update, so its warmup ends sooner.
          steps=1,
          # True: D is the UNet's down path + middle stack with a logit head at the innermost
          # resolution (models/unet.UNetEncoder); False: the whole UNet (paper 4.1).
          encoder_only=False,
      )),
      lora=lora_lib.default_config(),  # used when finetune='lora'
      # Evaluation also measures how well D separates real from fake x_{t-gap} on this many
      # held-out draws (discriminator_probe); 0 skips it.
      probe_examples=256,
  ))


def disc_unet_config(config) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(config.unet.to_dict())
  cfg.out_channels = 1  # one logit per location
  return cfg


def disc_spec(config) -> ModelSpec:
  cfg = disc_unet_config(config)
  cls = unet_lib.UNetEncoder if bool(config.ufogen.disc.encoder_only) else unet_lib.UNet
  return ModelSpec("disc", lambda rngs: cls(cfg, rngs=rngs, dtype=jnp.dtype(config.compute_dtype)))


def lora_spec(config, unet: ModelSpec) -> lora_lib.LoraSpec:
  """The generator's LoRA factors (the trainable group ``unet_lora`` of a LoRA finetune)."""
  return lora_lib.LoraSpec("unet_lora", unet.abstract_params, unet.logical, config.ufogen.lora)


def _check_config(config) -> None:
  u = config.ufogen
  if u.recon not in RECON_TERMS:
    raise ValueError(f"config.ufogen.recon={u.recon!r}: expected one of {RECON_TERMS}")
  if u.finetune not in FINETUNE_KINDS:
    raise ValueError(f"config.ufogen.finetune={u.finetune!r}: expected one of {FINETUNE_KINDS}")
  if u.recon == "ema" and not config.ema_decay:
    raise ValueError("config.ufogen.recon='ema' regresses onto the generator's EMA, but "
                     "config.ema_decay=0 keeps none: set config.ema_decay > 0")
  if u.recon_weighting not in RECON_WEIGHTINGS:
    raise ValueError(f"config.ufogen.recon_weighting={u.recon_weighting!r}: expected one of "
                     f"{RECON_WEIGHTINGS}")
  if u.real_latents not in REAL_LATENTS:
    raise ValueError(f"config.ufogen.real_latents={u.real_latents!r}: expected one of "
                     f"{REAL_LATENTS}")
  if int(u.timestep_gap) < 1:
    raise ValueError(f"config.ufogen.timestep_gap={u.timestep_gap} must be >= 1")
  if int(u.disc.steps) < 1:
    raise ValueError(f"config.ufogen.disc.steps={u.disc.steps}: D updates per train step must "
                     "be >= 1 (use config.ufogen.disc.every to update D less often than G)")


def recon_weight(sched: sch.NoiseSchedule, t: jax.Array, kind: str, gamma: float) -> jax.Array:
  """gamma_t, the per-timestep weight of ||x0 - x0'||^2."""
  s = sch.snr(sched, t)
  if kind == "none":
    return jnp.ones_like(s)
  if kind == "min_snr":
    return jnp.minimum(s, gamma)
  p = sched.prediction_type
  if p == "v":
    return s + 1.0
  if p == "eps":
    return s
  return jnp.ones_like(s)


@loop.register("ufogen")
class UFOGenObjective(diff_obj.DiffusionObjective):
  """G and D from one pretrained diffusion run; D's phase, then G's, in every step."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    if not bool(config.text.get("frozen", True)):
      raise ValueError("config.text.frozen=False: UFOGen keeps the pretrained run's text encoder "
                       "frozen (paper sec. 4; trained or not, it is read from config.init_from); "
                       "set --config.text.frozen=True")
    self.u = config.ufogen
    _check_config(config)
    self.disc = disc_spec(config)
    self.lora = lora_spec(config, self.ld.unet) if self.u.finetune == "lora" else None
    self._decoder_shape_checked = False  # see _require_decoder_shape_of_init_from
    self._probe_fn = None
    self._probe_batches = None  # this process's rows of the probe's held-out batches
    if not config.init_from:
      raise ValueError("config.init_from is empty: UFOGen finetunes a pretrained diffusion run; "
                       "pass --config.init_from=WORKDIR_OF_THE_DIFFUSION_RUN")

  # -- groups -----------------------------------------------------------------------------------
  @property
  def g_group(self) -> str:
    """G's trainable group: the whole UNet, or only its LoRA factors (the base is frozen)."""
    return "unet_lora" if self.lora is not None else "unet"

  @property
  def trainable(self):
    return {self.g_group: self.lora or self.ld.unet, "disc": self.disc}

  def generator(self, params, frozen):
    """G's plain UNet params: the trained UNet, or the frozen base with the factors merged."""
    if self.lora is None:
      return params["unet"]
    return self.lora.merge(frozen["unet"], params["unet_lora"])

  def eval_unet_params(self, state):
    use = diff_obj.eval_params(state)
    if self.lora is None:
      return use["unet"]
    return jax.jit(self.lora.merge)(state["frozen"]["unet"], use["unet_lora"])

  def optim_config(self, group):
    if group != "disc":
      return self.config.optim
    d = self.u.disc
    cfg = ml_collections.ConfigDict(self.config.optim.to_dict())
    cfg.learning_rate = float(d.learning_rate)
    cfg.b1, cfg.b2 = float(d.b1), float(d.b2)
    cfg.weight_decay = 0.0
    return cfg

  def phases(self):
    # disc.steps = k: D phases d1 .. d{k-1} on draws 1 .. k-1, then 'd' on draw 0, the draws G's
    # phase shares (k = 1 is the single D update of the paper's step).
    k = int(self.u.disc.steps)
    d = [loop.Phase(f"d{j}" if j else "d", ("disc",), functools.partial(self.d_loss, draw=j),
                    every=int(self.u.disc.every)) for j in [*range(1, k), 0]]
    return d + [loop.Phase("g", (self.g_group,), self.loss, with_ema=self.u.recon == "ema")]

  def ema_groups(self):
    return (self.g_group,)

  def validation_iterator(self, process_index, process_count):
    # A GAN's two losses move against each other: no single held-out loss to track.
    return loop.Objective.validation_iterator(self, process_index, process_count)

  @property
  def uses_teacher(self) -> bool:
    """A separate frozen teacher copy (under LoRA the frozen base UNet is the teacher)."""
    return self.u.recon == "distill" and self.lora is None

  def teacher(self, frozen):
    return frozen["unet"] if self.lora is not None else frozen["teacher"]

  # -- frozen: text encoder, VAE, latent stats (and the teacher) from the pretrained run ---------
  def frozen_spec(self):
    abstract, logical = self.ld.frozen_spec()
    if self.uses_teacher:
      abstract = dict(abstract, teacher=self.ld.unet.abstract_params)
      logical = dict(logical, teacher=self.ld.unet.logical)
    if self.lora is not None:  # the base UNet the factors adapt
      abstract = dict(abstract, unet=self.ld.unet.abstract_params)
      logical = dict(logical, unet=self.ld.unet.logical)
    return abstract, logical

  def _restore_unet(self, abstract_unet):
    """The pretrained UNet (its EMA if the run kept one) placed like ``abstract_unet``."""
    params, _, step, which = ckpt_lib.restore_preferring_ema(self.config.init_from,
                                                             {"unet": abstract_unet})
    return params["unet"], step, which

  def _require_decoder_shape_of_init_from(self):
    """The pretrained run's frozen VAE may hold a light decoder (its vae_workdir was a
    light-decoder run): this config's decoder shape must be that one. Checked before the first
    restore from init_from, once."""
    if not self._decoder_shape_checked:
      vae_obj.require_decoder_shape_of(
          self.config, ckpt_lib.read_config_json(self.config.init_from) or {},
          f"the pretrained run {self.config.init_from} (config.init_from) carries")
      self._decoder_shape_checked = True

  def init_frozen(self, shardings):
    abstract, _ = self.ld.frozen_spec()
    want = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, {k: shardings[k] for k in abstract})
    self._require_decoder_shape_of_init_from()
    init_from = self.config.init_from
    # The text encoder the pretrained UNet was trained with (from its params when that run
    # trained it), frozen here like the VAE.
    rest = {k: v for k, v in want.items() if k != "text"}
    text, got, step, where = diff_obj.restore_run_text_encoder(init_from, want["text"],
                                                              others={"frozen": rest})
    frozen = dict(got["frozen"], text=text)
    logging.info("text encoder (%s), VAE and latent stats from %s step %d", where, init_from,
                 step)
    self.verify_text_cache(frozen["text"])
    self.verify_latent_cache(frozen["vae"])
    if self.uses_teacher:
      teacher_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 self.ld.unet.abstract_params, shardings["teacher"])
      frozen["teacher"], _, which = self._restore_unet(teacher_abs)
      logging.info("teacher: %s.unet of %s", which, self.config.init_from)
    if self.lora is not None:
      base_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              self.ld.unet.abstract_params, shardings["unet"])
      frozen["unet"], _, which = self._restore_unet(base_abs)
      logging.info("frozen base of G (LoRA): %s.unet of %s", which, self.config.init_from)
    return frozen

  def load_init_from(self, abstract):
    """G (and its EMA) = the pretrained UNet (or zero-effect LoRA factors on it); D = a copy of
    it with a zero one-channel head (the encoder-only D: its down path and middle stack)."""
    self._require_decoder_shape_of_init_from()
    unet_abs = self.ld.unet.abstract_params
    if self.lora is None:
      unet_abs = abstract["params"]["unet"]
    else:  # placed like the frozen base (only its structure is read here)
      unet_abs = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unet_abs,
          shd.tree_shardings(unet_abs, self.ld.unet.logical, self.rules, self.mesh))
    unet, step, which = self._restore_unet(unet_abs)
    logging.info("G and D initialised from %s.unet of %s step %d", which, self.config.init_from,
                 step)
    d_abs = abstract["params"]["disc"]
    if self.u.disc.encoder_only:
      disc = _encoder_disc_params(unet, d_abs)
    else:
      disc = {}
      for k, v in unet.items():
        if k == "conv_out":
          disc[k] = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding),
                                 d_abs[k])
        else:
          # Distinct buffers: the step donates its state, and G and D must not share one.
          disc[k] = jax.tree.map(jnp.copy, v)
      if set(disc) != set(d_abs):
        raise ValueError(f"discriminator params {sorted(d_abs)} do not match the pretrained "
                         f"UNet's {sorted(unet)}")
    if self.lora is None:
      g = unet
    else:
      g_abs = abstract["params"]["unet_lora"]
      g = jax.jit(self.lora.init, out_shardings=jax.tree.map(lambda a: a.sharding, g_abs))()
      logging.info("G: LoRA rank %d on %d kernels (%d params), base frozen", self.lora.rank,
                   len(self.lora.paths), self.lora.num_params)
    out = {"params": {self.g_group: g, "disc": disc}}
    if abstract.get("ema_params") is not None:
      out["ema_params"] = {self.g_group: jax.tree.map(jnp.copy, g)}
    return out

  # -- is D learning? ---------------------------------------------------------------------------
  def discriminator_probe(self, state, host_batches) -> dict[str, float]:
    """How well D tells real from fake x_{t-gap} on held-out draws, with the trained G and D.

    ``disc_probe/auc``: ROC AUC of D's logits, real against fake (0.5: D cannot tell them apart,
    1: it always can), over all draws and per quarter of t-gap's range (``auc_q0`` lowest noise).
    ``disc_probe/hf_auc*``: the same AUC of a fixed statistic, the latents' high-frequency
    energy (``latent_high_freq_energy``): how separable real and fake are at each noise level
    without any learning. A D at 0.5 where the statistic is well above it is not learning.
    Batch i draws like training step 2**30 + i, so the value moves only with the params."""
    if self._probe_fn is None:
      rep = shd.replicated(self.mesh)

      def fn(params, frozen, batch, step):
        d = self._draws(params, frozen, batch, step)
        real, fake, fake_prev = self.judge(params["disc"], d)
        return dict(real=real, fake=fake, hf_real=latent_high_freq_energy(d["real_prev"]),
                    hf_fake=latent_high_freq_energy(fake_prev), t_prev=d["t_prev"])

      self._probe_fn = jax.jit(fn, out_shardings=rep)
    got = []
    for i, host in enumerate(host_batches):
      batch = shd.global_batch_from_local(host, self.mesh)
      got.append(jax.device_get(self._probe_fn(state["params"], state["frozen"], batch,
                                               jnp.int32(2**30 + i))))
    got = {k: np.concatenate([g[k] for g in got]) for k in got[0]}
    out = {"disc_probe/n": float(len(got["real"])),
           "disc_probe/auc": roc_auc(got["real"], got["fake"]),
           "disc_probe/hf_auc": roc_auc(got["hf_real"], got["hf_fake"]),
           "disc_probe/logit_gap": float(np.mean(got["real"] - got["fake"]))}
    span = self.ld.schedule.num_timesteps - int(self.u.timestep_gap)
    quarter = np.minimum(got["t_prev"] * 4 // max(span, 1), 3)
    for q in range(4):
      m = quarter == q
      if m.sum() >= 2:
        out[f"disc_probe/auc_q{q}"] = roc_auc(got["real"][m], got["fake"][m])
        out[f"disc_probe/hf_auc_q{q}"] = roc_auc(got["hf_real"][m], got["hf_fake"][m])
    return out

  def evaluate(self, state, *, step, workdir, writer, final):
    """The one-step samples judged (as a diffusion run's), plus ``discriminator_probe`` on
    ``config.ufogen.probe_examples`` held-out draws (disc_probe.json, TensorBoard)."""
    results = super().evaluate(state, step=step, workdir=workdir, writer=writer, final=final)
    n = int(self.u.probe_examples)
    if n <= 0:
      return results
    if self._probe_batches is None:  # read once: every evaluation probes the same records
      it = diff_obj.DiffusionObjective.validation_iterator(self, jax.process_index(),
                                                           jax.process_count())
      per = int(self.config.global_batch_size)
      self._probe_batches = [self.host_batch(next(it)) for _ in range(-(-n // per))]
    probe = self.discriminator_probe(state, self._probe_batches)
    if jax.process_index() == 0:
      writer.write_scalars(step, probe)
      name = "disc_probe.json" if final else f"disc_probe_step_{step}.json"
      with open(os.path.join(workdir, name), "w") as f:
        json.dump(dict(step=int(step), timestep_gap=int(self.u.timestep_gap), **probe), f,
                  indent=1)
      logging.info("discriminator probe: %s", {k: round(v, 3) for k, v in probe.items()})
    return dict(results, **probe)

  # -- the step -------------------------------------------------------------------------------
  def discriminate(self, disc_params, x, t, context):
    """D's logit per example: the mean of its per-location logits."""
    logits = self.disc.bind(disc_params)(x, t.astype(jnp.float32), context)
    return jnp.mean(logits.astype(jnp.float32), axis=tuple(range(1, logits.ndim)))

  def generate_x0(self, unet_params, x_t, t, context):
    pred = self.ld.unet_apply(unet_params)(x_t, t.astype(jnp.float32), context)
    return sch.pred_to_x0(self.ld.schedule, pred.astype(jnp.float32), x_t, t)

  def _draws(self, params, frozen, batch, step, draw: int = 0):
    """Everything both phases share: the same latents, timesteps, noisy inputs and G's x0'.
    ``draw`` > 0: another independent draw on the same batch (D's extra updates)."""
    ld = self.ld
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(int(self.config.seed)), step),
                             0x0F06)
    if draw:
      key = jax.random.fold_in(key, draw)
    z_rng, t_rng, n_rng, r_rng, f_rng = jax.random.split(key, 5)
    z = self.batch_latents(frozen, batch, z_rng if self.u.real_latents == "sample" else None)
    if "text_embedding" in batch:
      context = jax.lax.stop_gradient(batch["text_embedding"])
    else:
      context = ld.encode_text(frozen, batch["input_ids"])
    b = z.shape[0]
    gap = int(self.u.timestep_gap)
    t = jax.random.randint(t_rng, (b,), gap, ld.schedule.num_timesteps, dtype=jnp.int32)
    t_prev = t - gap
    x_t = sch.q_sample(ld.schedule, z, t, jax.random.normal(n_rng, z.shape, jnp.float32))
    x0_fake = self.generate_x0(self.generator(params, frozen), x_t, t, context)
    noise_real = jax.random.normal(r_rng, z.shape, jnp.float32)
    real_prev = sch.q_sample(ld.schedule, z, t_prev, noise_real)
    noise_fake = (noise_real if bool(self.u.shared_noise) else
                  jax.random.normal(f_rng, z.shape, jnp.float32))
    return dict(z=z, context=context, t=t, t_prev=t_prev, x_t=x_t, x0_fake=x0_fake,
                real_prev=real_prev, noise_fake=noise_fake)

  def judge(self, disc_params, d):
    """D's logits on a draw's real x_{t-gap} and on x'_{t-gap} diffused from G's x0' (no
    gradient to G), and that x'_{t-gap}."""
    fake_prev = sch.q_sample(self.ld.schedule, jax.lax.stop_gradient(d["x0_fake"]), d["t_prev"],
                             d["noise_fake"])
    # One D pass over real and fake together: half the D graph to compile and run (every op of
    # D is per example). Interleaved (real_i, fake_i), so a batch sharded over devices stays
    # where it is.
    both = lambda a, b: jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])
    logits = self.discriminate(disc_params, both(d["real_prev"], fake_prev),
                               both(d["t_prev"], d["t_prev"]), both(d["context"], d["context"]))
    return logits[0::2], logits[1::2], fake_prev

  def d_loss(self, params, frozen, batch, rng, step, draw: int = 0):
    real, fake, _ = self.judge(params["disc"], self._draws(params, frozen, batch, step, draw))
    loss = jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))
    acc = 0.5 * (jnp.mean((real > 0).astype(jnp.float32)) + jnp.mean((fake < 0).astype(jnp.float32)))
    return loss, dict(real_logit=jnp.mean(real), fake_logit=jnp.mean(fake), accuracy=acc)

  def loss(self, params, frozen, batch, rng, step, ema=None):
    u = self.u
    sched = self.ld.schedule
    d = self._draws(params, frozen, batch, step)
    x0_fake = d["x0_fake"]
    fake_prev = sch.q_sample(sched, x0_fake, d["t_prev"], d["noise_fake"])
    # D's params are not differentiated in this phase; the gradient reaches G through x'_{t-1}.
    fake = self.discriminate(params["disc"], fake_prev, d["t_prev"], d["context"])
    adv = jnp.mean(jax.nn.softplus(-fake))
    if u.recon == "distill":
      pred = self.ld.unet_apply(self.teacher(frozen))(d["x_t"], d["t"].astype(jnp.float32),
                                                       d["context"])
      target = jax.lax.stop_gradient(sch.pred_to_x0(sched, pred.astype(jnp.float32), d["x_t"],
                                                    d["t"]))
    elif u.recon == "ema":  # G's EMA (as at the start of this step) predicts the target
      target = jax.lax.stop_gradient(
          self.generate_x0(self.generator(ema, frozen), d["x_t"], d["t"], d["context"]))
    else:  # diffusion
      target = d["z"]
    err = jnp.mean(jnp.square(target - x0_fake), axis=tuple(range(1, x0_fake.ndim)))
    gamma = recon_weight(sched, d["t"], u.recon_weighting, float(u.min_snr_gamma))
    recon = jnp.mean(gamma * err)
    loss = float(u.adv_weight) * adv + float(u.recon_weight) * recon
    return loss, dict(g_adv=adv, recon=recon, x0_mse=jnp.mean(err), g_fake_logit=jnp.mean(fake))


def latent_high_freq_energy(x: jax.Array) -> jax.Array:
  """Per example: mean square of x minus its 3x3 box blur over interior locations (NHWC), the
  probe's fixed reference (0 on a flat latent)."""
  c = x.shape[-1]
  box = jnp.full((3, 3, 1, c), 1.0 / 9.0, x.dtype)
  blur = jax.lax.conv_general_dilated(x, box, (1, 1), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=c)
  return jnp.mean(jnp.square(x[:, 1:-1, 1:-1] - blur), axis=(1, 2, 3))


def _encoder_disc_params(unet: dict, d_abs: dict) -> dict:
  """The encoder-only D from a pretrained UNet: the shared parts copied, ``middle`` = the UNet's
  innermost up stack, the head fresh (GroupNorm identity, zero logit conv)."""
  inner = str(len(unet["up_levels"]) - 1)

  def take(src, abs_tree, where):
    if isinstance(abs_tree, dict):
      if not isinstance(src, dict) or not set(abs_tree) <= set(src):
        raise ValueError(f"encoder-only discriminator: {where} has no counterpart in the "
                         "pretrained UNet")
      return {k: take(src[k], v, f"{where}/{k}") for k, v in abs_tree.items()}
    if tuple(src.shape) != tuple(abs_tree.shape):
      raise ValueError(f"encoder-only discriminator: {where} is {tuple(abs_tree.shape)} but the "
                       f"pretrained UNet's is {tuple(src.shape)}")
    return jnp.copy(src)

  out = {}
  for k, v in d_abs.items():
    if k == "middle":
      out[k] = take(unet["up_levels"][inner], v, f"up_levels/{inner}")
    elif k == "norm_head":
      out[k] = {n: (jnp.ones if n == "scale" else jnp.zeros)(a.shape, a.dtype, device=a.sharding)
                for n, a in v.items()}
    elif k == "conv_out":
      out[k] = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding), v)
    else:
      out[k] = take(unet[k], v, k)
  return out
