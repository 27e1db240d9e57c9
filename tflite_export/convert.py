"""JAX components -> TFLite flatbuffers (DESIGN 6).

A `Component` is a pure JAX function `fn(params, *inputs) -> {name: array}` plus its params,
fixed input specs and the delegate it is meant for. `build_components` makes the four the app
needs from a diffusion config and its params (restored from an Orbax workdir by
`components_from_workdir`, or fresh ones for tests by `components_from_config`):

  text_encoder   input_ids int32 (1, L)            -> hidden (1, L, D)         CPU (XNNPACK)
  unet_onestep   noise (1, h, w, c), context       -> x0 latent (t = T-1 baked)  GPU
  unet           x_t, t float32 (1,), context      -> the model's prediction     GPU
  decoder        latent (1, h, w, c), normalised   -> image (1, H, W, 3) in [0, 1]  GPU

The decoder applies the VAE's latent scale/shift itself, so the app hands it the UNet's x0 as is.
It is built from a VAE config and a decoder params subtree only, so a separately trained light
decoder (a `vae.Decoder` with narrower `decoder_channels`) drops in by passing its config and
params.

Conversion: the params are flattened to a list and passed to the jax2tf-converted function as
an argument, held in `tf.Variable`s on a `tf.Module`, saved as a SavedModel and converted with
`TFLiteConverter.from_saved_model`. Params closed over as graph constants made the fp16
conversion of the full-size UNet run out of memory (DESIGN 6).

Precisions (`PRECISIONS`): fp32; fp16 (float16 weights, dequantised on load); dr8 (dynamic-range
int8 weights, float activations); int8 (int8 weights and activations calibrated on a
representative dataset, float inputs and outputs).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PRECISIONS = ("fp32", "fp16", "dr8", "int8")
ROLES = ("text", "unet", "decoder")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  name: str
  shape: tuple[int, ...]
  dtype: str  # numpy dtype name

  def to_json(self) -> dict:
    return dict(name=self.name, shape=list(self.shape), dtype=self.dtype)


@dataclasses.dataclass
class Component:
  """One exported graph: a pure function of (params, *inputs) and what the app needs to know."""
  name: str
  role: str  # 'text' | 'unet' | 'decoder': decides which checks apply (check.py)
  fn: Callable[..., dict]
  params: Any  # pytree of numpy arrays
  inputs: tuple[TensorSpec, ...]
  outputs: tuple[str, ...]
  delegate: str  # 'gpu' | 'cpu'
  description: str = ""
  # Representative inputs, a list of tuples ordered as `inputs` (int8 calibration, ranges).
  representative: list = dataclasses.field(default_factory=list)
  metadata: dict = dataclasses.field(default_factory=dict)
  # False: 'int8' converts with dynamic-range int8 instead of calibrated int8 activations.
  full_int8: bool = True

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f"component {self.name}: role {self.role!r} not in {ROLES}")

  def jax_apply(self, *inputs) -> dict:
    """The JAX reference, jitted, on numpy inputs -> dict of numpy outputs."""
    if not hasattr(self, "_jitted"):
      self._jitted = jax.jit(self.fn)
    out = self._jitted(self.params, *[jnp.asarray(x) for x in inputs])
    return {k: np.asarray(v) for k, v in out.items()}


# -- the four components ------------------------------------------------------------------------


def x0_from_prediction(pred, x_t, alpha: float, sigma: float, prediction_type: str):
  """x0 from the model output with Python-float schedule constants (no table lookup in the graph).

  Terms with a zero coefficient are dropped rather than multiplied by 0, so the one-step graph
  at the zero-terminal-SNR step is just a negation of the UNet output.
  """
  if prediction_type == "v":
    x0 = -sigma * pred if sigma != 1.0 else -pred
    return x0 + alpha * x_t if alpha != 0.0 else x0
  if prediction_type == "x0":
    return pred
  if prediction_type == "eps":
    if alpha == 0.0:
      raise ValueError("prediction_type='eps' has no x0 at alpha=0 (docs/one_step_conventions.md)")
    return (x_t - sigma * pred) / alpha
  raise ValueError(f"unknown prediction_type {prediction_type!r}")


def schedule_constants(schedule, t: int | None = None) -> dict:
  """The constants the one-step graph bakes in, also written to the manifest."""
  t = schedule.num_timesteps - 1 if t is None else int(t)
  return dict(num_timesteps=int(schedule.num_timesteps), t=t,
              alpha=float(np.asarray(schedule.sqrt_alphas_cumprod)[t]),
              sigma=float(np.asarray(schedule.sqrt_one_minus_alphas_cumprod)[t]),
              prediction_type=schedule.prediction_type,
              zero_terminal_snr=bool(schedule.zero_terminal_snr))


def text_encoder_component(text_spec, params, *, max_length: int, batch: int = 1,
                           representative=()) -> Component:
  def fn(p, input_ids):
    hidden, _ = text_spec.bind(p)(input_ids)
    return {"hidden": hidden.astype(jnp.float32)}
  return Component(
      name="text_encoder", role="text", fn=fn, params=params,
      inputs=(TensorSpec("input_ids", (batch, max_length), "int32"),), outputs=("hidden",),
      # Its token lookup is a GATHER with 2-D indices, outside the GPU delegate's support
      # (GATHER needs 1-D indices there); it runs once per image, on the CPU.
      delegate="cpu", description="token ids -> last hidden state (the UNet's context)",
      representative=list(representative),
      # Calibrated int8 activations fail here: the causal mask puts -inf into the attention
      # logits, so their range cannot be quantised (relative error 0.77 on the shapes encoder).
      full_int8=False)


def unet_onestep_component(unet_spec, params, schedule, *, latent_shape, context_shape,
                           batch: int = 1, t: int | None = None, representative=()) -> Component:
  consts = schedule_constants(schedule, t)
  if consts["prediction_type"] == "eps" and consts["alpha"] == 0.0:
    raise ValueError("one-step export of an eps-prediction model at alpha=0 is undefined")

  def fn(p, noise, context):
    tt = jnp.full((noise.shape[0],), float(consts["t"]), jnp.float32)
    pred = unet_spec.bind(p)(noise, tt, context)
    x0 = x0_from_prediction(pred, noise, consts["alpha"], consts["sigma"],
                            consts["prediction_type"])
    return {"x0": x0.astype(jnp.float32)}
  return Component(
      name="unet_onestep", role="unet", fn=fn, params=params,
      inputs=(TensorSpec("noise", (batch, *latent_shape), "float32"),
              TensorSpec("context", (batch, *context_shape), "float32")),
      outputs=("x0",), delegate="gpu",
      description=f"x_T ~ N(0, I) + context -> x0 latent (t={consts['t']} baked in)",
      representative=list(representative), metadata=dict(schedule=consts))


def unet_component(unet_spec, params, schedule, *, latent_shape, context_shape, batch: int = 1,
                   representative=()) -> Component:
  def fn(p, x_t, t, context):
    return {"prediction": unet_spec.bind(p)(x_t, t, context).astype(jnp.float32)}
  return Component(
      name="unet", role="unet", fn=fn, params=params,
      inputs=(TensorSpec("x_t", (batch, *latent_shape), "float32"),
              TensorSpec("t", (batch,), "float32"),
              TensorSpec("context", (batch, *context_shape), "float32")),
      outputs=("prediction",), delegate="gpu",
      description=f"(x_t, t, context) -> {schedule.prediction_type}-prediction, for multi-step",
      representative=list(representative),
      metadata=dict(prediction_type=schedule.prediction_type))


def decoder_spec(vae_cfg):
  """ModelSpec of a VAE decoder alone (the SD-size one or a light one from its config)."""
  from md_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from md_jax.train.state import ModelSpec  # pylint: disable=g-import-not-at-top
  return ModelSpec("decoder", lambda rngs: vae_lib.Decoder(vae_cfg, rngs=rngs))


def decoder_component(vae_cfg, decoder_params, latent_shift, latent_scale, *, latent_shape,
                      batch: int = 1, name: str = "decoder", representative=()) -> Component:
  """Normalised latent -> RGB in [0, 1]; `decoder_params` is the decoder subtree only."""
  spec = decoder_spec(vae_cfg)
  params = dict(decoder=decoder_params,
                latent_shift=np.asarray(latent_shift, np.float32).reshape(1, 1, 1, -1),
                latent_scale=np.asarray(latent_scale, np.float32).reshape(1, 1, 1, -1))

  def fn(p, latent):
    z = latent * p["latent_scale"] + p["latent_shift"]
    x = spec.bind(p["decoder"])(z).astype(jnp.float32)
    # Clipped in [-1, 1] (RELU_N1_TO_1, which the GPU delegate runs) and then mapped to [0, 1];
    # clip(., 0, 1) after the affine map converts to RELU_0_TO_1, which it does not.
    return {"image": jnp.clip(x, -1.0, 1.0) * 0.5 + 0.5}
  f = 2 ** (len(vae_cfg.channels) - 1)
  h, w, _ = latent_shape
  return Component(
      name=name, role="decoder", fn=fn, params=params,
      inputs=(TensorSpec("latent", (batch, *latent_shape), "float32"),),
      outputs=("image",), delegate="gpu",
      description=f"normalised latent -> RGB (1, {h * f}, {w * f}, 3) in [0, 1] "
                  "(latent scale/shift applied inside)",
      representative=list(representative),
      metadata=dict(decoder_channels=list(vae_cfg.decoder_channels or vae_cfg.channels)))


# -- params ------------------------------------------------------------------------------------


def _to_numpy(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def representative_inputs(ld, config, *, text_params, vae_params, latent_shift, latent_scale,
                          image_size: int, num_samples: int, seed: int = 0) -> dict:
  """Real inputs per component: eval prompts' ids and embeddings, encoder latents of images.

  Returns {component: [tuple of numpy inputs, ...]} for every component `build_components`
  makes. Noise for the UNet is N(0, I) as in sampling; its t for the plain graph is drawn over
  the whole schedule.
  """
  from md_jax.data import shapes  # pylint: disable=g-import-not-at-top
  prompts = [p for p, _ in shapes.eval_prompts(num_samples, seed)]
  ids = ld.tokenize(prompts)
  hidden = np.asarray(jax.jit(lambda p, i: ld.text.bind(p)(i)[0])(text_params, ids))
  records = [shapes.make_record("eval", i, image_size, seed=seed + 1) for i in range(num_samples)]
  images = np.stack([r["image"] for r in records]).astype(np.float32) / 127.5 - 1.0

  @jax.jit
  def encode(p, x):
    mean, _ = ld.vae.bind(p).encode(x)
    return (mean - latent_shift) / latent_scale
  latents = np.asarray(encode(vae_params, images))
  rng = np.random.default_rng(seed)
  noise = rng.standard_normal(latents.shape).astype(np.float32)
  ts = rng.integers(0, ld.schedule.num_timesteps, size=(num_samples,)).astype(np.float32)
  a = np.asarray(ld.schedule.sqrt_alphas_cumprod)[ts.astype(int)].reshape(-1, 1, 1, 1)
  s = np.asarray(ld.schedule.sqrt_one_minus_alphas_cumprod)[ts.astype(int)].reshape(-1, 1, 1, 1)
  x_t = (a * latents + s * noise).astype(np.float32)
  one = lambda a: [a[i:i + 1] for i in range(num_samples)]
  return dict(
      text_encoder=[(x,) for x in one(ids)],
      unet_onestep=list(zip(one(noise), one(hidden))),
      unet=list(zip(one(x_t), one(ts), one(hidden))),
      decoder=[(x,) for x in one(latents)],
  )


def build_components(config, ld, *, unet_params, frozen, image_size: int | None = None,
                     names: Sequence[str] = ("text_encoder", "unet_onestep", "unet", "decoder"),
                     num_representative: int = 16, seed: int = 0,
                     decoder: tuple | None = None) -> dict[str, Component]:
  """The bundle's components from a diffusion config, its UNet params and its frozen part.

  ``decoder``: (vae config, decoder params) of another decoder of the same VAE (the light
  decoder, paper sec. 3.5) to export instead of the VAE's own.
  """
  dec_cfg, dec_params = decoder if decoder is not None else (config.vae, None)
  image_size = int(image_size or config.data.image_size)
  unet_params = _to_numpy(unet_params)
  frozen = _to_numpy(frozen)
  latent_shape = ld.latent_shape(image_size)
  max_length = int(config.data.max_length)
  context_shape = (max_length, int(config.text.hidden_size))
  reps = representative_inputs(
      ld, config, text_params=frozen["text"], vae_params=frozen["vae"],
      latent_shift=frozen["latent_shift"], latent_scale=frozen["latent_scale"],
      image_size=image_size, num_samples=num_representative, seed=seed)
  makers = dict(
      text_encoder=lambda: text_encoder_component(
          ld.text, frozen["text"], max_length=max_length, representative=reps["text_encoder"]),
      unet_onestep=lambda: unet_onestep_component(
          ld.unet, unet_params, ld.schedule, latent_shape=latent_shape,
          context_shape=context_shape, representative=reps["unet_onestep"]),
      unet=lambda: unet_component(
          ld.unet, unet_params, ld.schedule, latent_shape=latent_shape,
          context_shape=context_shape, representative=reps["unet"]),
      decoder=lambda: decoder_component(
          dec_cfg, frozen["vae"]["decoder"] if dec_params is None else _to_numpy(dec_params),
          frozen["latent_shift"], frozen["latent_scale"], latent_shape=latent_shape,
          representative=reps["decoder"]),
  )
  unknown = [n for n in names if n not in makers]
  if unknown:
    raise ValueError(f"unknown components {unknown}; choose from {list(makers)}")
  return {n: makers[n]() for n in names}


def random_params(abstract, seed: int = 0):
  """Seeded random params of the abstract tree's shapes, drawn in numpy.

  Kernels ~ N(0, 1/fan_in) (activations stay O(1) through depth), embeddings ~ N(0, 0.02^2),
  norm scales 1, biases ~ N(0, 0.02^2): non-trivial outputs everywhere (no zero-init output
  conv), and no per-shape XLA compiles, which on a small CPU cost more than the conversion.
  """
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  out = []
  for path, leaf in flat:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    last = name.rsplit("/", 1)[-1]
    if "embedding" in name:
      x = 0.02 * rng.standard_normal(shape)
    elif last == "scale":
      x = np.ones(shape)
    elif len(shape) >= 2:
      x = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    else:
      x = 0.02 * rng.standard_normal(shape)
    out.append(x.astype(dtype))
  return jax.tree.unflatten(treedef, out)


def fresh_params(config, ld, seed: int = 0) -> tuple[dict, dict]:
  """(unet params, frozen) with seeded random weights and identity latent statistics."""
  c = int(config.vae.latent_channels)
  frozen = dict(text=random_params(ld.text.abstract_params, seed + 1),
                vae=random_params(ld.vae.abstract_params, seed + 2),
                latent_shift=np.zeros((c,), np.float32), latent_scale=np.ones((c,), np.float32))
  return random_params(ld.unet.abstract_params, seed), frozen


def _compilation_cache(config) -> None:
  from md_jax.train import loop  # pylint: disable=g-import-not-at-top
  path = (config.get("compilation_cache_dir") if config is not None else None) or \
      os.environ.get("MD_JAX_COMPILATION_CACHE")
  loop.setup_compilation_cache(path)


# TFLite graphs compute in float32 whatever the run trained in: a bfloat16 graph lowers to ops
# the builtin set lacks (the paper-size UNet's bf16 dot_general becomes an illegal BATCH_MATMUL);
# the fp16 files quantise weights, and the GPU delegate chooses its own precision.
EXPORT_COMPUTE_DTYPE = "float32"


def components_from_config(config, **kw) -> tuple[dict[str, Component], Any]:
  """Components with fresh (seeded) weights: tests and benchmarks."""
  from md_jax import config_base  # pylint: disable=g-import-not-at-top
  from md_jax.train import diffusion as diff  # pylint: disable=g-import-not-at-top
  _compilation_cache(config)
  config = config_base.with_compute_dtype(config, EXPORT_COMPUTE_DTYPE)
  ld = diff.LatentDiffusion(config)
  seed = kw.pop("seed", 0)
  unet, frozen = fresh_params(config, ld, seed)
  return build_components(config, ld, unet_params=unet, frozen=frozen, seed=seed, **kw), ld


def light_decoder_from_workdir(workdir: str, step: int | None = None, use_ema: bool = True
                               ) -> dict[str, Any]:
  """A light-decoder run's decoder (``configs/vae_light_decoder.py``, ``shapes.py:light_decoder``):
  dict(vae_config, params, latent_shift, latent_scale, step, params_kind), EMA params by default.
  The latent statistics are the VAE run's, carried in the light run's checkpoint."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from md_jax import config_base  # pylint: disable=g-import-not-at-top
  from md_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from md_jax.train import vae as vae_obj  # pylint: disable=g-import-not-at-top
  step = ckpt_lib.latest_step_in(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f"decoder run {workdir}: no checkpoint there")
  cfg = ml_collections.ConfigDict(ckpt_lib.read_config_json(workdir, step) or {})
  if cfg.get("trainer") != vae_obj.LIGHT_TRAINER:
    raise ValueError(f"decoder run {workdir} is a {cfg.get('trainer')!r} run; expected a "
                     f"light-decoder run (trainer {vae_obj.LIGHT_TRAINER!r})")
  cfg = config_base.with_compute_dtype(cfg, EXPORT_COMPUTE_DTYPE)
  dec_abs = vae_obj.light_decoder_spec(cfg).abstract_params
  c = int(cfg.vae.latent_channels)
  stats_abs = {k: jax.ShapeDtypeStruct((c,), np.float32) for k in ("latent_shift", "latent_scale")}
  params, frozen, step, which = vae_obj.restore_light_run(
      workdir, dec_abs, stats_abs, step=step, use_ema=bool(use_ema and cfg.ema_decay))
  return dict(vae_config=cfg.vae, params=_to_numpy(params),
              latent_shift=np.asarray(frozen["latent_shift"]),
              latent_scale=np.asarray(frozen["latent_scale"]), step=step, params_kind=which)


def check_same_latent_stats(frozen: dict, decoder: dict, run: str, decoder_run: str) -> None:
  """A decoder only fits the latents of the VAE it was distilled against: refuse another's."""
  for k in ("latent_shift", "latent_scale"):
    a, b = np.asarray(frozen[k], np.float32), np.asarray(decoder[k], np.float32)
    if a.shape != b.shape or not np.allclose(a, b, rtol=1e-6, atol=1e-7):
      raise ValueError(f"decoder run {decoder_run} was distilled against another VAE than "
                       f"{run}: their {k} differ ({b.tolist()} vs {a.tolist()})")


def components_from_workdir(workdir: str, *, step: int | None = None, use_ema: bool = True,
                            decoder_from: str | None = None, decoder_step: int | None = None,
                            **kw) -> tuple[dict[str, Component], Any, Any, int]:
  """Components from a diffusion run's Orbax checkpoint (EMA UNet params by default);
  ``decoder_from``: a light-decoder run of the same VAE whose decoder (at ``decoder_step``,
  default its latest) replaces the VAE's."""
  from md_jax.train import diffusion as diff  # pylint: disable=g-import-not-at-top
  _compilation_cache(None)
  config, ld, _, unet, frozen, step = diff.load_for_sampling(
      workdir, step, use_ema, compute_dtype=EXPORT_COMPUTE_DTYPE)
  decoder = None
  if decoder_from:
    light = light_decoder_from_workdir(decoder_from, decoder_step, use_ema=use_ema)
    check_same_latent_stats(frozen, light, workdir, decoder_from)
    decoder = (light["vae_config"], light["params"])
    ld.decoder_source = dict(workdir=os.path.abspath(decoder_from), step=light["step"],
                             params=light["params_kind"])
  comps = build_components(config, ld, unet_params=unet, frozen=frozen, decoder=decoder, **kw)
  return comps, ld, config, step


# -- conversion --------------------------------------------------------------------------------


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def save_tf(component: Component, directory: str) -> str:
  """jax2tf (native serialization, CPU, no gradient) -> SavedModel with params as Variables."""
  tf = _tf()
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree.flatten(component.params)
  outputs = component.outputs

  def flat_fn(flat_params, *inputs):
    out = component.fn(jax.tree.unflatten(treedef, flat_params), *inputs)
    return tuple(out[k] for k in outputs)

  tf_fn = jax2tf.convert(flat_fn, native_serialization_platforms=("cpu",), with_gradient=False)
  module = tf.Module()
  module.params = [tf.Variable(np.asarray(x), trainable=False, name=f"p{i}")
                   for i, x in enumerate(leaves)]
  signature = [tf.TensorSpec(s.shape, tf.as_dtype(s.dtype), name=s.name)
               for s in component.inputs]

  @tf.function(input_signature=signature, autograph=False)
  def serve(*inputs):
    out = tf_fn(module.params, *inputs)
    return {k: tf.identity(v, name=k) for k, v in zip(outputs, out)}

  module.serve = serve
  tf.saved_model.save(module, directory, signatures={"serving_default": serve})
  return directory


def convert(component: Component, precision: str, *, saved_model_dir: str | None = None,
            representative: Iterable | None = None) -> bytes:
  """One component at one precision -> TFLite flatbuffer bytes (builtin ops only)."""
  tf = _tf()
  if precision not in PRECISIONS:
    raise ValueError(f"precision {precision!r} not in {PRECISIONS}")
  tmp = None
  if saved_model_dir is None:
    tmp = tempfile.mkdtemp(prefix=f"tfl_{component.name}_")
    saved_model_dir = save_tf(component, os.path.join(tmp, "saved_model"))
  try:
    conv = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    # Builtins only: a Flex (SELECT_TF_OPS) fallback would not load in a plain LiteRT app.
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if precision == "fp16":
      conv.optimizations = [tf.lite.Optimize.DEFAULT]
      conv.target_spec.supported_types = [tf.float16]
    elif precision == "dr8":
      conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif precision == "int8" and not component.full_int8:
      conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif precision == "int8":
      samples = list(representative if representative is not None
                     else component.representative)
      if not samples:
        raise ValueError(f"{component.name}: full int8 needs a representative dataset")
      names = [s.name for s in component.inputs]
      dtypes = [s.dtype for s in component.inputs]

      def gen():
        for sample in samples:
          yield {n: np.asarray(x, d) for n, x, d in zip(names, sample, dtypes)}
      conv.optimizations = [tf.lite.Optimize.DEFAULT]
      conv.representative_dataset = gen
    return conv.convert()
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


def quantization(component: Component, precision: str) -> str:
  if precision == "int8" and not component.full_int8:
    return "dynamic-range int8 (calibrated activations not used for this component)"
  return dict(fp32="none", fp16="float16 weights", dr8="dynamic-range int8 weights",
              int8="int8 weights and activations (representative dataset)")[precision]


def convert_all(component: Component, precisions: Sequence[str], out_dir: str,
                *, log: Callable[[str], None] = print) -> dict[str, dict]:
  """Writes `<name>_<precision>.tflite` for each precision; returns {precision: info}."""
  os.makedirs(out_dir, exist_ok=True)
  info = {}
  with tempfile.TemporaryDirectory(prefix=f"tfl_{component.name}_") as tmp:
    t0 = time.time()
    sm = save_tf(component, os.path.join(tmp, "saved_model"))
    t_saved = round(time.time() - t0, 2)
    log(f"{component.name}: SavedModel in {t_saved} s")
    for p in precisions:
      t0 = time.time()
      blob = convert(component, p, saved_model_dir=sm)
      path = os.path.join(out_dir, f"{component.name}_{p}.tflite")
      with open(path, "wb") as f:
        f.write(blob)
      info[p] = dict(file=os.path.basename(path), bytes=len(blob),
                     convert_s=round(time.time() - t0, 2), saved_model_s=t_saved,
                     quantization=quantization(component, p))
      log(f"{component.name} {p}: {len(blob) / 1e6:.2f} MB in {info[p]['convert_s']} s")
  return info
