"""Orbax checkpointing: train state + data iterator state + config, in one step directory.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config}``. ``state`` is a plain dict
(step, params, opt_state, ema_params, frozen) so another stage or the evaluator can restore any
part of it by name (``restore_subset``) without reading the rest, onto any mesh.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

try:
  import grain
  _GRAIN_SAVE = grain.checkpoint.CheckpointSave
  _GRAIN_RESTORE = grain.checkpoint.CheckpointRestore
except Exception:  # pragma: no cover - grain is a hard dependency; keep import errors readable
  _GRAIN_SAVE = _GRAIN_RESTORE = None


class CheckpointMismatchError(ValueError):
  """The checkpoint in a workdir does not fit the model the config describes."""


class UnreadableCheckpointError(RuntimeError):
  """A checkpoint step is corrupt or half-written (e.g. the job died while saving it)."""


class MissingStateError(KeyError):
  """The checkpoint has no such top-level part (e.g. no EMA params); ``missing`` names them."""

  def __init__(self, message: str, missing=()):
    super().__init__(message)
    self.missing = tuple(missing)


def is_remote(path: str) -> bool:
  """gs://... and other URLs: opened through etils.epath, never as local paths."""
  return "://" in str(path)


def checkpoint_dir(workdir: str) -> str:
  if is_remote(workdir):  # a bucket shared by all workers of a pod
    return str(workdir).rstrip("/") + "/checkpoints"
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _isdir(path: str) -> bool:
  if is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(path).is_dir()
  return os.path.isdir(path)


def _manager(directory: str, *, max_to_keep: int | None = None, async_save: bool = True,
             read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=not read_only,
      read_only=read_only)
  # Handlers are named up front so a fresh process can read metadata before any save/restore.
  # A read-only manager restores parts of the state, which needs the PyTree handler; both
  # handlers read and write the same on-disk format.
  handlers = dict(
      state=ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler(),
      config=ocp.JsonCheckpointHandler())
  if not read_only and _GRAIN_SAVE is not None:
    handlers["data"] = grain.checkpoint.CheckpointHandler()
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _flat_shapes(tree) -> dict[str, tuple]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      out[key] = tuple(shape)
  return out


def check_compatible(saved_tree, abstract_tree, where: str) -> None:
  """Raises a one-line error naming the first array whose shape differs."""
  saved = _flat_shapes(saved_tree)
  wanted = _flat_shapes(abstract_tree)
  for key, shape in wanted.items():
    if key not in saved:
      raise CheckpointMismatchError(
          f"{where} holds a checkpoint of another model: it has no array '{key}' "
          f"(this config expects shape {shape}); use a fresh --workdir or the matching config")
    if tuple(saved[key]) != tuple(shape):
      raise CheckpointMismatchError(
          f"{where} holds a checkpoint of another model shape: '{key}' is {tuple(saved[key])} "
          f"there but {shape} in this config; use a fresh --workdir or the matching config")


def _restore_args(abstract_tree):
  def one(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
      return ocp.RestoreArgs(restore_type=np.ndarray)
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=x.shape, dtype=x.dtype)
  return jax.tree.map(one, abstract_tree)


class Checkpointer:
  """Saves and resumes one run's state, data position and config."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    self.workdir = workdir
    self.manager = _manager(self.directory, max_to_keep=max_to_keep, async_save=async_save)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_iterator, config_json: dict, *, force=False) -> bool:
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(config_json))
    if data_iterator is not None and _GRAIN_SAVE is not None:
      items["data"] = _GRAIN_SAVE(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def saved_state_shapes(self, step: int):
    meta = self.manager.item_metadata(step)
    state_meta = meta["state"] if isinstance(meta, dict) or hasattr(meta, "__getitem__") else None
    tree = getattr(state_meta, "tree", state_meta)
    return tree

  def restore(self, step: int, abstract_state: dict, data_iterator=None) -> dict:
    """The state saved at ``step``, placed with ``abstract_state``'s shardings: any mesh, any
    device count (arrays are stored whole, not per device)."""
    try:
      saved = self.saved_state_shapes(step)
    except Exception as e:  # pylint: disable=broad-except
      raise UnreadableCheckpointError(
          f"{self.directory}/{step} cannot be read as an md_jax checkpoint: {e}") from e
    check_compatible(saved, abstract_state, f"{self.workdir} (step {step})")
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None and _GRAIN_RESTORE is not None:
      items["data"] = _GRAIN_RESTORE(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise UnreadableCheckpointError(
          f"{self.directory}/{step} is corrupt or incomplete: {type(e).__name__}: {e}") from e
    return restored["state"]

  def restore_latest(self, abstract_state: dict, data_iterator=None) -> tuple[dict, int]:
    """The newest readable checkpoint: a corrupt or half-written latest step is skipped (with a
    warning naming it) for the one before; a checkpoint of another model still fails."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    errors = []
    for step in steps:
      try:
        return self.restore(step, abstract_state, data_iterator), step
      except UnreadableCheckpointError as e:
        errors.append(str(e))
        logging.warning("checkpoint step %d is unreadable (%s); trying the previous one",
                        step, str(e).splitlines()[0][:300])
    raise UnreadableCheckpointError(f"no readable checkpoint under {self.directory}: "
                                    + " | ".join(errors))

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def steps_in(workdir: str) -> list[int]:
  """The checkpoint steps of a run, oldest first ([] when it has none)."""
  directory = checkpoint_dir(workdir)
  if not _isdir(directory):
    return []
  mngr = _manager(directory, read_only=True, async_save=False)
  try:
    return sorted(int(s) for s in mngr.all_steps())
  finally:
    mngr.close()


def latest_step_in(workdir: str) -> int | None:
  steps = steps_in(workdir)
  return steps[-1] if steps else None


def restore_subset(workdir: str, abstract_subset: dict, step: int | None = None) -> tuple[dict, int]:
  """Restores only the named top-level parts of another run's state (e.g. params, frozen).

  ``abstract_subset`` is a dict like ``{"ema_params": tree_of_ShapeDtypeStruct}``; leaves with a
  ``sharding`` are placed on the mesh directly, so restoring onto another mesh works.
  """
  directory = checkpoint_dir(workdir)
  if not _isdir(directory):
    raise FileNotFoundError(f"no checkpoints under {directory}")
  mngr = _manager(directory, read_only=True, async_save=False)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint step under {directory}")
    meta = mngr.item_metadata(step)["state"]
    saved = getattr(meta, "tree", meta)
    missing = [k for k in abstract_subset if k not in saved or saved[k] is None]
    if missing:
      raise MissingStateError(f"{workdir} (step {step}) has no {missing} in its state", missing)
    check_compatible({k: saved[k] for k in abstract_subset}, abstract_subset,
                     f"{workdir} (step {step})")
    args = ocp.args.PyTreeRestore(item=abstract_subset, restore_args=_restore_args(abstract_subset),
                                  partial_restore=True)
    restored = mngr.restore(step, args=ocp.args.Composite(state=args))["state"]
    return {k: restored[k] for k in abstract_subset}, step
  finally:
    mngr.close()


def restore_preferring_ema(workdir: str, group: dict, others: dict | None = None,
                            step: int | None = None, use_ema: bool = True
                            ) -> tuple[dict, dict, int, str]:
  """Restores one group of another run's params: its EMA copy when ``use_ema`` and the run kept
  one, else its params; plus ``others`` (top-level parts, e.g. ``{"frozen": ...}``) in the same
  read. Returns (group, others restored, step, "ema_params" | "params")."""
  others = dict(others or {})
  for which in ("ema_params", "params") if use_ema else ("params",):
    try:
      got, step_read = restore_subset(workdir, {which: group, **others}, step)
    except MissingStateError as e:
      if which == "params" or set(e.missing) != {"ema_params"}:
        raise
      continue  # the run kept no EMA copy
    return got[which], {k: got[k] for k in others}, step_read, which
  raise AssertionError("unreachable")


def read_config_json(workdir: str, step: int | None = None) -> dict[str, Any]:
  directory = checkpoint_dir(workdir)
  step = latest_step_in(workdir) if step is None else step
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(directory) / str(step) / "config" / "metadata"
  if path.exists():
    return json.loads(path.read_text())
  logging.warning("no config stored at %s", path)
  return {}
