"""The one train loop every objective runs on.

An objective (VAE, diffusion, ...) says which modules it trains, which frozen arrays it reads,
how a batch becomes a loss, and how to evaluate; this loop owns everything else: the mesh,
sharded state creation, the jitted step, checkpoints and resume, preemption, metrics, MFU,
non-finite detection and the progress bar. The same code runs on one CPU, fake CPU devices,
several processes, a GPU or a TPU pod.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding

from md_jax.train import checkpoint as ckpt_lib
from md_jax.train import optim
from md_jax.train import sharding as shd
from md_jax.train import state as state_lib
from md_jax.train.state import ModelSpec


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss or gradient; the last good checkpoint is kept."""


class WorkdirError(RuntimeError):
  """The workdir cannot be used (not writable, not a directory)."""


# --------------------------------------------------------------------------------------------
# Objectives


@dataclasses.dataclass(frozen=True)
class Phase:
  """One update inside the train step: ``loss(params, frozen, batch, rng, step)`` differentiated
  with respect to ``groups`` (names of trainable modules), applied with each group's optimizer
  when ``step % every == 0``.

  ``with_ema=True`` also passes ``ema=`` the EMA params as they stand at the start of the step
  (``{group: params}`` for the objective's ``ema_groups``); they are not differentiated.
  """
  name: str
  groups: tuple[str, ...]
  loss: Callable[..., Any]
  every: int = 1
  with_ema: bool = False


class Objective(abc.ABC):
  """What a trainer supplies to the loop."""

  def __init__(self, config: ml_collections.ConfigDict, mesh):
    self.config = config
    self.mesh = mesh
    self.rules = shd.rules_dict(config.sharding_rules)

  # Modules whose params are trained, by name (the params tree is {name: params}).
  @property
  @abc.abstractmethod
  def trainable(self) -> dict[str, ModelSpec]:
    ...

  def frozen_spec(self) -> tuple[dict, dict]:
    """(abstract tree, logical-axes tree) of the frozen arrays; empty by default."""
    return {}, {}

  def init_frozen(self, shardings) -> dict:
    """Creates or loads the frozen arrays, placed with ``shardings``."""
    return {}

  def optim_config(self, group: str) -> ml_collections.ConfigDict:
    """Optimizer settings of one trainable group (each group has its own optimizer state)."""
    return self.config.optim

  def phases(self) -> list[Phase]:
    """The updates one train step makes, in order; by default one loss over every group.

    A GAN lists its discriminator phase before its generator phase: the generator's loss
    then sees the discriminator as updated on the same batch. A phase that names several
    groups takes one gradient of one loss for all of them (stop-gradients inside the loss
    decide who learns from which term).
    """
    return [Phase("main", tuple(sorted(self.trainable)), self.loss)]

  def ema_groups(self) -> tuple[str, ...]:
    """Groups whose EMA is kept (a discriminator's EMA would only cost memory)."""
    return tuple(sorted(self.trainable))

  def init_params(self, rng: jax.Array) -> dict:
    """Fresh trainable params (traced under jit)."""
    keys = jax.random.split(rng, len(self.trainable))
    return {name: spec.init(k) for (name, spec), k in zip(sorted(self.trainable.items()), keys)}

  def load_init_from(self, abstract: dict) -> dict | None:
    """Params (and EMA) from ``config.init_from``, or None to initialise fresh; groups missing
    from the returned params are initialised fresh."""
    return None

  @abc.abstractmethod
  def loss(self, params: dict, frozen: dict, batch: dict, rng: jax.Array, step: jax.Array):
    """Returns (scalar loss, dict of scalar metrics). Traced inside the jitted step."""

  @abc.abstractmethod
  def data_iterator(self, process_index: int, process_count: int):
    """A checkpointable iterator of this process's rows of each global batch."""

  def validation_iterator(self, process_index: int, process_count: int):
    """This process's rows of held-out batches for ``config.val`` (same layout as training)."""
    raise ValueError(f"config.val.num_batches={self.config.val.num_batches}: the "
                     f"{self.config.trainer!r} trainer has no held-out loss; set it to 0")

  def host_batch(self, element: dict) -> dict[str, np.ndarray]:
    """The arrays of one data element the step consumes (dropping strings and such)."""
    return {k: np.asarray(v) for k, v in element.items()
            if isinstance(v, np.ndarray) and v.dtype != object}

  def batch_spec(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of the global batch the step consumes (what ``host_batch`` gives, all processes
    together), for compiling the step ahead of time: images and caption token ids by default."""
    size = int(self.config.data.image_size)
    return dict(
        image=jax.ShapeDtypeStruct((global_batch_size, size, size, 3), jnp.float32),
        input_ids=jax.ShapeDtypeStruct((global_batch_size, int(self.config.data.max_length)),
                                       jnp.int32))

  def evaluate(self, state: dict, *, step: int, workdir: str, writer, final: bool) -> dict:
    return {}

  def finalize(self, state: dict) -> dict:
    """Last chance to fill frozen arrays computed from the trained model (e.g. latent stats)."""
    return state

  def examples_per_step(self) -> int:
    return int(self.config.global_batch_size)


_OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register(name: str):
  def deco(cls):
    _OBJECTIVES[name] = cls
    return cls
  return deco


def get_objective(name: str):
  # Trainer modules register themselves on import.
  from md_jax.train import diffusion as _diffusion  # noqa: F401  pylint: disable=g-import-not-at-top
  from md_jax.train import vae as _vae  # noqa: F401  pylint: disable=g-import-not-at-top
  from md_jax.train import ufogen as _ufogen  # noqa: F401  pylint: disable=g-import-not-at-top
  if name not in _OBJECTIVES:
    raise ValueError(f"config.trainer={name!r} is unknown; choose one of {sorted(_OBJECTIVES)}")
  return _OBJECTIVES[name]


# --------------------------------------------------------------------------------------------
# Workdir, caches, peaks


def prepare_workdir(workdir: str) -> str:
  if ckpt_lib.is_remote(workdir):
    # gs://BUCKET/PATH: what pods use, as every worker must see the same checkpoints.
    from etils import epath  # pylint: disable=g-import-not-at-top
    try:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    except Exception as e:  # pylint: disable=broad-except
      raise WorkdirError(f"--workdir={workdir} cannot be created: {e}") from None
    return workdir
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} exists and is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be created: {e.strerror}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={workdir} is not writable by this user")
  probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
  try:
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} is not writable: {e.strerror}") from None
  return workdir


def setup_compilation_cache(path: str | None) -> None:
  if not path:
    return
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Dense peak FLOP/s per device for the compute dtype MFU is quoted in (bf16 on accelerators).
_PEAK_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12,
}


def peak_flops_per_device(config) -> float:
  if config.peak_flops_per_device:
    return float(config.peak_flops_per_device)
  kind = jax.devices()[0].device_kind.lower()
  for name, peak in _PEAK_FLOPS.items():
    if name in kind:
      return peak
  # CPU: no meaningful vendor number; a measured fp32 matmul rate of a 2-core host.
  return 1.67e11 / max(1, jax.local_device_count())


def _cost_flops(compiled) -> float:
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost.get("flops", 0.0))
  except Exception:  # pylint: disable=broad-except
    return 0.0


# --------------------------------------------------------------------------------------------
# Preemption


class _Preemption:
  """SIGTERM (what TPU VMs and schedulers send) asks the loop to save and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._old = None

  def install(self):
    def handler(signum, frame):  # pylint: disable=unused-argument
      logging.warning("signal %d received: will save a checkpoint and stop", signum)
      self.requested = True
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
      self._old = None

  def uninstall(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def agreed(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray(int(self.requested), np.int32))
    return bool(np.any(flags))


# --------------------------------------------------------------------------------------------
# The loop


def _config_json(config) -> dict:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


class Trainer:
  """Builds the sharded state and the jitted step for one objective."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh=None):
    self.config = config
    self.workdir = workdir
    self.mesh = mesh if mesh is not None else shd.make_mesh(config.mesh_shape, config.mesh_axes)
    self.objective = get_objective(config.trainer)(config, self.mesh)
    self.txs = {name: optim.make_optimizer(self.objective.optim_config(name),
                                           config.num_train_steps)
                for name in sorted(self.objective.trainable)}
    self.phases = self.objective.phases()
    self.ema_groups = tuple(self.objective.ema_groups()) if config.ema_decay else ()
    _check_phases(self.phases, self.txs, self.ema_groups)
    self.rules = shd.rules_dict(config.sharding_rules)
    self._build_shardings()
    self._compiled_step = None
    self._val_fn = None
    self.step_flops = 0.0

  # -- state ---------------------------------------------------------------------------------
  def _build_shardings(self):
    obj, mesh = self.objective, self.mesh
    specs = obj.trainable
    self.abstract_params = {n: s.abstract_params for n, s in specs.items()}
    logical = {n: s.logical for n, s in specs.items()}
    self.param_shardings = shd.tree_shardings(self.abstract_params, logical, self.rules, mesh)
    frozen_abs, frozen_logical = obj.frozen_spec()
    self.frozen_abstract = frozen_abs
    self.frozen_shardings = shd.tree_shardings(frozen_abs, frozen_logical, self.rules, mesh)
    rep = shd.replicated(mesh)
    abstract_opt, opt_shardings = {}, {}
    for name, tx in self.txs.items():
      abstract_opt[name] = jax.eval_shape(tx.init, self.abstract_params[name])
      opt_shardings[name] = optax.tree_map_params(
          tx, lambda _, s: s, abstract_opt[name], self.param_shardings[name],
          transform_non_params=lambda _: rep,
          is_leaf=lambda x: isinstance(x, NamedSharding))
    ema = self.ema_groups
    self.state_shardings = dict(
        step=rep, params=self.param_shardings, opt_state=opt_shardings,
        ema_params={g: self.param_shardings[g] for g in ema} if ema else None,
        frozen=self.frozen_shardings)
    self.abstract_state = dict(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=self.abstract_params,
        opt_state=abstract_opt,
        ema_params={g: self.abstract_params[g] for g in ema} if ema else None,
        frozen=frozen_abs)
    self.abstract_state_sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract_state, self.state_shardings)

  def init_state(self, frozen: dict | None = None, random_init: bool = False) -> dict:
    """Fresh state, created directly with its shardings (no host copy of the full model).

    ``frozen``: arrays to use for the frozen part instead of ``objective.init_frozen`` (which
    reads them from earlier runs' workdirs); ``random_init``: random trainable params even where
    ``config.init_from`` names a run. Benchmarks use both to run a stage with nothing on disk.
    """
    obj = self.objective
    init_from = None if random_init else obj.load_init_from(self.abstract_state_sharded)
    ema_groups = self.ema_groups

    def make(rng, loaded):
      # A loaded group replaces its fresh init (XLA drops the unused init); groups it lacks
      # start fresh.
      params = {**obj.init_params(rng), **(loaded["params"] if loaded is not None else {})}
      opt_state = {name: tx.init(params[name]) for name, tx in self.txs.items()}
      ema = None
      if ema_groups:
        src = loaded.get("ema_params") if loaded is not None else None
        ema = {g: (src[g] if src and g in src else params[g]) for g in ema_groups}
        ema = jax.tree.map(lambda x: x + 0, ema)  # a distinct buffer so donation is safe
      return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                  ema_params=ema)

    out_sh = {k: v for k, v in self.state_shardings.items() if k != "frozen"}
    state = jax.jit(make, out_shardings=out_sh,
                    compiler_options=state_lib.init_compiler_options())(
                        jax.random.key(self.config.seed), init_from)
    state["frozen"] = obj.init_frozen(self.frozen_shardings) if frozen is None else frozen
    return state

  # -- step ------------------------------------------------------------------------------------
  def _train_step(self, state: dict, batch: dict):
    cfg = self.config
    step = state["step"]
    base_rng = jax.random.fold_in(jax.random.key(cfg.seed), step)
    params, opt_state = dict(state["params"]), dict(state["opt_state"])
    finite = jnp.asarray(True)
    out: dict = {}
    for i, phase in enumerate(self.phases):
      # The single default phase keeps the step's key as is (runs stay reproducible).
      rng = base_rng if len(self.phases) == 1 else jax.random.fold_in(base_rng, i)

      def loss_fn(sub, batch, rng, phase=phase):
        extra = {"ema": jax.lax.stop_gradient(state["ema_params"])} if phase.with_ema else {}
        return phase.loss({**params, **sub}, state["frozen"], batch, rng, step, **extra)

      sub = {g: params[g] for g in phase.groups}
      (loss, metrics), grads = self._value_and_grad(loss_fn, sub, batch, rng)
      if cfg.debug.inject_nan_at_step >= 0:
        # Test hook: poison the loss at one step to exercise non-finite handling end to end.
        poison = jnp.where(step == cfg.debug.inject_nan_at_step, jnp.nan, 1.0)
        loss = loss * poison
        grads = jax.tree.map(lambda g: g * poison, grads)
      grad_norm = optax.global_norm(grads)
      finite = finite & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      active = (step % phase.every) == 0 if phase.every > 1 else None
      for g in phase.groups:
        updates, new_opt = self.txs[g].update(grads[g], opt_state[g], params[g])
        new_params = optax.apply_updates(params[g], updates)
        if active is not None:
          new_params = _select(active, new_params, params[g])
          new_opt = _select(active, new_opt, opt_state[g])
        params[g], opt_state[g] = new_params, new_opt
      prefix = "" if len(self.phases) == 1 or i == len(self.phases) - 1 else f"{phase.name}/"
      out[prefix + "loss"] = loss
      out[prefix + "grad_norm"] = grad_norm
      out.update({(k if not prefix else prefix + k): v for k, v in metrics.items()})
    # A non-finite step changes nothing, so the state in memory stays the last good one.
    params = _select(finite, params, state["params"])
    opt_state = _select(finite, opt_state, state["opt_state"])
    ema = state["ema_params"]
    if ema is not None:
      ema = _select(finite, optim.ema_update(ema, {g: params[g] for g in ema},
                                             optim.ema_decay(cfg, step)), ema)
    new_state = dict(step=step + 1, params=params, opt_state=opt_state, ema_params=ema,
                     frozen=state["frozen"])
    out["learning_rate"] = optim.learning_rate_schedule(cfg.optim, cfg.num_train_steps)(step)
    if "skipped" in batch:  # input records that failed to decode and were passed over
      out["data/skipped_records"] = jnp.sum(batch["skipped"]).astype(jnp.float32)
    out["finite"] = finite.astype(jnp.float32)
    out["param_norm"] = optax.global_norm(params)
    return new_state, out

  def _value_and_grad(self, loss_fn, sub, batch, rng):
    """((loss, metrics), grads) of ``loss_fn`` on the whole batch.

    With ``config.optim.grad_accum_steps = k > 1`` the batch is cut into k micro-batches that run
    one after another (a scan), and loss, metrics and gradients are their means: the same global
    batch and the same update on a slice with 1/k of the activation memory. Micro-batch j takes
    rows j, j+k, j+2k, ..., so every device contributes rows to every micro-batch and none idles.
    """
    k = optim.grad_accum_steps(self.config)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k <= 1:
      return grad_fn(sub, batch, rng)
    rows = {v.shape[0] for v in batch.values()}
    if len(rows) != 1 or next(iter(rows)) % k:
      raise ValueError(f"config.optim.grad_accum_steps={k} must divide the batch rows {rows}")
    n = next(iter(rows))
    micro_sh = {key: shd.batch_sharding(self.mesh, v.ndim) for key, v in batch.items()}

    def split(v):
      v = v.reshape((n // k, k) + v.shape[1:])
      return jnp.swapaxes(v, 0, 1)

    micro = {key: split(v) for key, v in batch.items()}

    def body(carry, xs):
      j, mb = xs
      mb = {key: jax.lax.with_sharding_constraint(v, micro_sh[key]) for key, v in mb.items()}
      (loss, metrics), grads = grad_fn(sub, mb, jax.random.fold_in(rng, j))
      acc = jax.tree.map(jnp.add, carry, ((loss, metrics), grads))
      return acc, None

    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32 if a.dtype == jnp.bfloat16
                                            else a.dtype),
                        jax.eval_shape(grad_fn, sub, jax.tree.map(lambda v: v[0], micro), rng))
    total, _ = jax.lax.scan(body, zero, (jnp.arange(k), micro))
    return jax.tree.map(lambda a: a / k, total)

  def compile_step(self, batch_abstract: dict):
    rep = shd.replicated(self.mesh)
    batch_sh = {k: shd.batch_sharding(self.mesh, len(v.shape)) for k, v in batch_abstract.items()}
    jitted = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_sh),
                     out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
    batch_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
                 for k, v in batch_abstract.items()}
    t0 = time.time()
    compiled = jitted.lower(self.abstract_state_sharded, batch_abs).compile()
    logging.info("train step compiled in %.1fs", time.time() - t0)
    # XLA's cost analysis counts a while loop's body once, and with grad_accum_steps = k the
    # micro-batches run as a k-trip scan: scale by k (the optimizer update outside the loop is
    # then over-counted; under 1% at k = 2 on the tiny test config, less at paper size).
    self.step_flops = _cost_flops(compiled) * optim.grad_accum_steps(self.config)
    self._compiled_step = compiled
    return compiled

  # -- held-out loss ---------------------------------------------------------------------------
  def validation_loss(self, state: dict, host_batches: list[dict]) -> dict[str, float]:
    """Mean objective loss over ``host_batches`` (this process's rows of each), with the
    training params and, when kept, the EMA params. Batch i always draws its noise from
    ``fold_in(key(config.val.seed), i)``, so the value moves only when the params do."""
    if self._val_fn is None:
      rep = shd.replicated(self.mesh)

      def fn(params, frozen, batch, rng, step):
        return self.objective.loss(params, frozen, batch, rng, step)[0].astype(jnp.float32)

      self._val_fn = jax.jit(fn, out_shardings=rep)
    key = jax.random.key(int(self.config.val.seed))
    weights = {"val/loss": state["params"]}
    if state.get("ema_params") is not None:
      weights["val/loss_ema"] = {**state["params"], **state["ema_params"]}
    sums = {name: 0.0 for name in weights}
    for i, host in enumerate(host_batches):
      batch = shd.global_batch_from_local(host, self.mesh)
      for name, params in weights.items():
        loss = self._val_fn(params, state["frozen"], batch, jax.random.fold_in(key, i),
                            state["step"])
        sums[name] += float(jax.device_get(loss))
    return {name: total / len(host_batches) for name, total in sums.items()}


def _select(pred, new, old):
  return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def _check_phases(phases, txs, ema_groups) -> None:
  if not phases:
    raise ValueError("an objective must define at least one phase")
  seen = set()
  for ph in phases:
    unknown = [g for g in ph.groups if g not in txs]
    if unknown or not ph.groups:
      raise ValueError(f"phase {ph.name!r} trains {unknown or 'no groups'}; trainable groups "
                       f"are {sorted(txs)}")
    if int(ph.every) < 1:
      raise ValueError(f"phase {ph.name!r}: every={ph.every} must be >= 1")
    if ph.with_ema and not ema_groups:
      raise ValueError(f"phase {ph.name!r} reads the EMA params, but none are kept: set "
                       "config.ema_decay > 0")
    seen.update(ph.groups)
  if seen != set(txs):
    raise ValueError(f"trainable groups {sorted(set(txs) - seen)} are in no phase")
  bad = [g for g in ema_groups if g not in txs]
  if bad:
    raise ValueError(f"ema_groups {bad} are not trainable groups {sorted(txs)}")


def _make_writer(workdir: str):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers.create_default_writer(
      os.path.join(workdir, "tensorboard"), just_logging=jax.process_index() > 0, asynchronous=False)


_POSITIVE_KEYS = ("num_train_steps", "global_batch_size", "checkpoint.every", "log_every")


def check_counts(config) -> None:
  """Counts the loop reads must be positive integers; a ValueError names the key."""
  for key in _POSITIVE_KEYS:
    node = config
    for part in key.split("."):
      node = node[part]
    if isinstance(node, bool) or not isinstance(node, int) or node < 1:
      raise ValueError(f"config.{key}={node!r}: must be a positive integer")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config.trainer`` in ``workdir`` (resuming if it holds a checkpoint).

  Returns a dict with the final step, the last metrics and the evaluation results, plus
  ``preempted=True`` when a SIGTERM stopped the run early (after saving).
  """
  from md_jax import logs  # pylint: disable=g-import-not-at-top
  logs.quiet_libraries()
  check_counts(config)  # before the workdir exists: a refused run leaves nothing behind
  workdir = prepare_workdir(workdir)
  setup_compilation_cache(config.compilation_cache_dir)
  trainer = Trainer(config, workdir)
  obj, mesh = trainer.objective, trainer.mesh
  if config.global_batch_size % shd.batch_divisor(mesh):
    raise ValueError(
        f"config.global_batch_size={config.global_batch_size} is not divisible by the "
        f"{shd.batch_divisor(mesh)} devices of the data axes of mesh {dict(mesh.shape)}")
  accum = optim.grad_accum_steps(config)
  if accum < 1 or (config.global_batch_size // shd.batch_divisor(mesh)) % accum:
    raise ValueError(
        f"config.optim.grad_accum_steps={accum} must divide the per-device batch "
        f"{config.global_batch_size // shd.batch_divisor(mesh)} (config.global_batch_size="
        f"{config.global_batch_size} over {shd.batch_divisor(mesh)} devices)")
  is_lead = jax.process_index() == 0
  checkpointer = ckpt_lib.Checkpointer(
      workdir, max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save)
  latest = checkpointer.latest_step()
  total = int(config.num_train_steps)
  config_json = _config_json(config)
  done = _read_final(workdir)
  if (latest is not None and latest == total and done is not None
      and done.get("step") == total
      and done.get("config") == json.loads(json.dumps(config_json, default=str))):
    # Finished, finalized and evaluated with this very config: a rerun (e.g. of the quickstart)
    # reports instead of redoing; any config change (steps, evaluation settings) redoes it.
    logging.info("%s already finished at step %d; see %s (md_jax.evaluate evaluates again)",
                 workdir, total, os.path.join(workdir, FINAL_JSON))
    checkpointer.close()
    return dict(step=total, metrics=done.get("metrics", {}), eval=done.get("eval", {}),
                preempted=False, workdir=workdir)
  data_iter = obj.data_iterator(jax.process_index(), jax.process_count())
  val_batches = _validation_batches(config, obj)
  if latest is not None:
    state, resumed = checkpointer.restore_latest(trainer.abstract_state_sharded, data_iter)
    if resumed != latest:
      logging.warning("resuming from step %d: the latest checkpoint, step %d, is unreadable",
                      resumed, latest)
      for bad in [s for s in checkpointer.manager.all_steps() if s > resumed]:
        checkpointer.manager.delete(bad)  # the rerun saves these steps again
    logging.info("resuming from %s step %d", workdir, resumed)
    state["step"] = jnp.asarray(state["step"], jnp.int32)
  else:
    state = trainer.init_state()
  step = int(jax.device_get(state["step"]))
  writer = _make_writer(workdir)

  def validate(state, step):
    values = trainer.validation_loss(state, val_batches)
    writer.write_scalars(step, values)
    if is_lead:
      _append_jsonl(workdir, VAL_JSONL, dict(step=step, **values))
    logging.info("step %d: %s", step, ", ".join(f"{k} {v:.5f}" for k, v in values.items()))
    return values

  last_val: dict[str, float] = {}
  if val_batches and latest is None:
    last_val = validate(state, step)
  if latest is None and is_lead:
    writer.write_hparams({k: v for k, v in _flat_config(config).items()})
    n_params = sum(int(x.size) for x in jax.tree.leaves(trainer.abstract_params))
    logging.info("%s: %d trainable params, mesh %s", config.trainer, n_params, dict(mesh.shape))

  preempt = _Preemption()
  preempt.install()
  last_metrics: dict[str, float] = {}
  eval_results: dict[str, Any] = {}
  preempted = False
  peak = peak_flops_per_device(config) * jax.device_count()
  examples = obj.examples_per_step()
  progress = None
  if is_lead and config.progress_bar:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm(total=total, initial=step, desc=config.trainer, unit="step",
                    mininterval=2.0, dynamic_ncols=True, file=sys.stderr)
  try:
    t_last, step_last = time.time(), step
    while step < total:
      element = next(data_iter)
      batch = shd.global_batch_from_local(obj.host_batch(element), mesh)
      if trainer._compiled_step is None:  # pylint: disable=protected-access
        trainer.compile_step({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()})
        t_last = time.time()
      state, metrics = trainer._compiled_step(state, batch)  # pylint: disable=protected-access
      step += 1
      if config.debug.step_sleep_s:
        time.sleep(float(config.debug.step_sleep_s))
      if config.check_finite_every and step % config.check_finite_every == 0:
        finite = float(jax.device_get(metrics["finite"]))
        if finite < 1.0:
          checkpointer.wait()
          loss = float(jax.device_get(metrics["loss"]))
          raise NonFiniteLossError(
              f"non-finite loss ({loss}) or gradient at step {step} of {config.trainer}; "
              f"training stopped. The last good checkpoint is step "
              f"{checkpointer.latest_step()} in {checkpointer.directory}")
      if progress is not None:
        progress.update(1)
      if step % config.log_every == 0 or step == total:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        dt = (now - t_last) / max(1, step - step_last)
        t_last, step_last = now, step
        m["steps_per_sec"] = 1.0 / dt if dt > 0 else 0.0
        m["examples_per_sec"] = examples / dt if dt > 0 else 0.0
        if trainer.step_flops:
          # cost_analysis counts one device's program; all devices run the same program.
          m["mfu"] = trainer.step_flops * jax.device_count() / dt / peak if dt > 0 else 0.0
          m["tflops_per_step"] = trainer.step_flops * jax.device_count() / 1e12
        writer.write_scalars(step, m)
        last_metrics = m
        if progress is not None:
          progress.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
      if val_batches and (step == total or (config.val.every and step % config.val.every == 0)):
        last_val = validate(state, step)
      if config.eval_every and step % config.eval_every == 0 and step < total:
        eval_results = obj.evaluate(state, step=step, workdir=workdir, writer=writer, final=False)
      if int(config.debug.get("sigterm_at_step", -1)) == step:
        os.kill(os.getpid(), signal.SIGTERM)
      saved = False
      if step % config.checkpoint.every == 0 and step < total:
        saved = bool(checkpointer.save(step, state, data_iter, config_json))
      if preempt.agreed() or checkpointer.manager.reached_preemption(step):
        # A step that is also a scheduled checkpoint is already being saved.
        logging.warning("preemption: %s step %d and exiting", "saved" if saved else "saving", step)
        if not saved:
          checkpointer.save(step, state, data_iter, config_json, force=True)
        checkpointer.wait()
        preempted = True
        break
    if not preempted:
      state = obj.finalize(state)
      checkpointer.wait()
      if checkpointer.latest_step() == step:
        # Resumed at the last step (or preempted there): rewrite it with the finalized state.
        checkpointer.manager.delete(step)
      checkpointer.save(step, state, data_iter, config_json, force=True)
      checkpointer.wait()
      if config.eval_at_end:
        eval_results = obj.evaluate(state, step=step, workdir=workdir, writer=writer, final=True)
      if is_lead:
        _write_final(workdir, dict(step=step, config=config_json,
                                   metrics={**last_metrics, **last_val}, eval=eval_results))
  finally:
    if progress is not None:
      progress.close()
    preempt.uninstall()
    checkpointer.close()
    writer.flush()
  return dict(step=step, metrics={**last_metrics, **last_val}, eval=eval_results,
              preempted=preempted, workdir=workdir)


FINAL_JSON = "final.json"
VAL_JSONL = "val.jsonl"


def _validation_batches(config, obj) -> list[dict]:
  """This process's rows of the ``config.val.num_batches`` held-out batches (host arrays)."""
  n = int(config.val.num_batches)
  if n < 0:
    raise ValueError(f"config.val.num_batches={n} must be >= 0")
  if not n:
    return []
  it = obj.validation_iterator(jax.process_index(), jax.process_count())
  return [obj.host_batch(next(it)) for _ in range(n)]


def _append_jsonl(workdir: str, name: str, record: dict) -> None:
  from etils import epath  # pylint: disable=g-import-not-at-top
  line = json.dumps(record) + "\n"
  if ckpt_lib.is_remote(workdir):  # object stores have no append: rewrite the small file
    path = epath.Path(workdir) / name
    old = path.read_text() if path.exists() else ""
    path.write_text(old + line)
    return
  with open(os.path.join(workdir, name), "a") as f:
    f.write(line)


def read_jsonl(workdir: str, name: str = VAL_JSONL) -> list[dict]:
  """The records of WORKDIR/NAME, the last one per step (a resumed run may log a step twice)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / name
  if not path.exists():
    return []
  by_step = {}
  for line in path.read_text().splitlines():
    if line.strip():
      rec = json.loads(line)
      by_step[rec["step"]] = rec
  return [by_step[s] for s in sorted(by_step)]


def _read_final(workdir: str) -> dict | None:
  """The record a finished run leaves (step, last metrics, evaluation), or None."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  try:
    return json.loads((epath.Path(workdir) / FINAL_JSON).read_text())
  except (OSError, ValueError):
    return None


def _write_final(workdir: str, record: dict) -> None:
  text = json.dumps(record, indent=1, default=str)
  if ckpt_lib.is_remote(workdir):  # an object store writes whole objects on close
    from etils import epath  # pylint: disable=g-import-not-at-top
    (epath.Path(workdir) / FINAL_JSON).write_text(text)
    return
  path = os.path.join(workdir, FINAL_JSON)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)  # never a half-written record


def _flat_config(config, prefix="") -> dict:
  out = {}
  for k, v in config.items():
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat_config(v, key + "."))
    elif isinstance(v, (int, float, str, bool)):
      out[key] = v
  return out
