"""The shared loop: config errors, workdir errors, resume after SIGKILL, SIGTERM, NaN, mismatch."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import MICRO_UNET, REPO, cli_env, run_module, sigkill_after_checkpoint, tiny_config
from md_jax.train import checkpoint as ckpt_lib
from md_jax.train import loop
from md_jax.train import sharding as shd


def _params(workdir, step=None):
  from md_jax.train import vae as vae_obj  # pylint: disable=g-import-not-at-top
  config = tiny_config("vae")
  spec = vae_obj.vae_spec(config)
  got, step = ckpt_lib.restore_subset(
      workdir, {"params": {"vae": spec.abstract_params}, "ema_params": {"vae": spec.abstract_params}},
      step)
  return got, step


def _data_state(workdir, step):
  files = sorted(glob.glob(os.path.join(workdir, "checkpoints", str(step), "data", "*")))
  states = []
  for f in files:
    try:
      states.append(json.loads(open(f).read()))
    except ValueError:  # orbax's commit marker, not iterator state
      continue
  assert states, f"no data iterator state saved at step {step}"
  return states


def test_unknown_config_key_fails_before_any_work(tmp_path):
  workdir = tmp_path / "w"
  proc = run_module("md_jax.main", "--config=configs/shapes.py:vae,tiny", f"--workdir={workdir}",
                    "--config.optim.learnig_rate=0.1", timeout=300)
  assert proc.returncode != 0
  assert "learnig_rate" in proc.stderr
  assert not workdir.exists(), "nothing should be created for a bad config"


def test_quickstart_overrides_name_the_key_they_cannot_apply():
  """--override=KEY=VALUE (the quickstart's per-stage overrides): unknown keys at any depth and
  values that do not parse as the key's type fail naming the flag and the key."""
  from md_jax import config_loading  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config("configs/shapes.py:lowres,tiny")
  with config.unlocked():
    config_loading.apply_overrides(config, ["unet.channels=[8,16,16]", "seed=3",
                                            "vae.cache_dir=/x", "eval_at_end=false"])
    assert tuple(config.unet.channels) == (8, 16, 16) and config.seed == 3
    assert config.vae.cache_dir == "/x" and config.eval_at_end is False
    for bad in ("unett.channels=[1]", "unet.chanels=[1]", "seed.x=1"):
      with pytest.raises(KeyError, match=f"--override={re.escape(bad)}: config has no key"):
        config_loading.apply_overrides(config, [bad])
    with pytest.raises(ValueError, match=r"--override=unet.channels=\(8,16\): '\(8,16\)' is "
                                         r"not a JSON tuple for 'unet.channels'"):
      config_loading.apply_overrides(config, ["unet.channels=(8,16)"])


@pytest.mark.parametrize("key,value", [("num_train_steps", -3), ("global_batch_size", 0),
                                       ("checkpoint.every", 0), ("log_every", -1)])
def test_a_count_below_one_is_refused_before_the_workdir_exists(key, value, tmp_path):
  config = tiny_config("vae")
  with config.unlocked():
    parent, _, leaf = key.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
  with pytest.raises(ValueError, match=rf"config\.{re.escape(key)}={value}: must be a positive"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_bad_config_value_names_the_key(tmp_path):
  config = tiny_config("vae")
  with config.unlocked():
    config.optim.schedule = "cosin"
  with pytest.raises(ValueError, match="config.optim.schedule"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))


@pytest.mark.parametrize("key,value,match", [
    ("text.cache_dir", "CACHE", r"config.text.cache_dir=.* config.text.frozen=False"),
    ("trainer", "ufogen", r"config.text.frozen=False: UFOGen keeps"),
])
def test_what_cannot_train_the_text_encoder_is_refused_naming_the_key(key, value, match,
                                                                      tmp_path):
  """config.text.frozen=False trains the shapes encoder with the UNet; a text cache (frozen
  embeddings) and UFOGen (which reads the pretrained run's encoder) refuse it before any work
  instead of ignoring it."""
  from md_jax import config_loading  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config(
      "configs/ufogen.py:tiny" if value == "ufogen" else "configs/shapes.py:lowres,tiny")
  with config.unlocked():
    config.compilation_cache_dir = os.environ["MD_JAX_COMPILATION_CACHE"]
    config.init_from = str(tmp_path / "pretrained")
    config.vae_workdir = str(tmp_path / "vae")
    config.text.frozen = False
    if value != "ufogen":
      config.text[key.split(".")[1]] = str(tmp_path / value)
  with pytest.raises(ValueError, match=match):
    loop.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_trained_text_encoder_trains_and_is_what_sampling_and_the_next_stage_read(
    vae_workdir, tmp_path):
  """config.text.frozen=False: the encoder is a trainable group with an EMA
  copy, absent from the frozen part, it leaves its seeded init, and load_for_sampling hands the
  EMA copy to sampling as frozen["text"]; a stage initialised from the run continues that copy,
  frozen or trained there."""
  from md_jax.train import diffusion  # pylint: disable=g-import-not-at-top
  # The UNet only has to consume the context: conftest.MICRO_UNET (three step compilations).
  config = tiny_config("lowres", vae_workdir=vae_workdir, eval_at_end=False, num_train_steps=2,
                       **MICRO_UNET, **{"text.frozen": False})
  workdir = str(tmp_path / "w")
  obj = diffusion.DiffusionObjective(config, shd.make_mesh(config.mesh_shape, config.mesh_axes))
  assert "text" in obj.trainable and "text" in obj.ema_groups()
  assert "text" not in obj.frozen_spec()[0]
  loop.train_and_evaluate(config, workdir)
  _, ld, _, _, frozen, _ = diffusion.load_for_sampling(workdir)
  got, _ = ckpt_lib.restore_subset(workdir, {"ema_params": {"text": ld.text.abstract_params}})
  init = jax.jit(ld.text.init)(jax.random.key(int(config.text.seed)))
  sampled = jax.tree.leaves(jax.device_get(frozen["text"]))
  for s, e in zip(sampled, jax.tree.leaves(jax.device_get(got["ema_params"]["text"]))):
    np.testing.assert_array_equal(s, e)
  assert max(float(np.max(np.abs(s - np.asarray(i))))
             for s, i in zip(sampled, jax.tree.leaves(init))) > 0

  # A next stage (init_from) continues the encoder this run's UNet was trained with, whichever
  # side trains it. Frozen there: this run's trained (EMA) copy, not a fresh seeded encoder.
  high = str(tmp_path / "high")
  loop.train_and_evaluate(tiny_config("highres", vae_workdir=vae_workdir, eval_at_end=False,
                                      num_train_steps=1, init_from=workdir, **MICRO_UNET), high)
  _, _, _, _, high_frozen, _ = diffusion.load_for_sampling(high)
  assert _leaves_equal(high_frozen["text"], frozen["text"])
  # Trained again after that frozen stage (its own seed differs; lr 0 keeps the start): it starts
  # from the frozen stage's encoder, not from its seed.
  again = str(tmp_path / "again")
  loop.train_and_evaluate(tiny_config("highres", vae_workdir=vae_workdir, eval_at_end=False,
                                      num_train_steps=1, init_from=high, **MICRO_UNET,
                                      **{"text.frozen": False, "text.seed": 7,
                                         "optim.learning_rate": 0.0}), again)
  start, _ = ckpt_lib.restore_subset(again, {"params": {"text": ld.text.abstract_params}})
  assert _leaves_equal(start["params"]["text"], frozen["text"])


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jax.device_get(a)),
                                                  jax.tree.leaves(jax.device_get(b))))


# Every config file (with its stage args): a None default must still take a command-line value.
_CONFIG_SPECS = ("shapes.py:vae", "shapes.py:light_decoder", "shapes.py:lowres",
                 "shapes.py:highres", "shapes_relu.py", "ufogen.py", "ufogen.py:md512",
                 "md_pretrain.py:256", "md_pretrain.py:512", "md.py:512", "md_lite.py",
                 "vae.py", "vae_light_decoder.py")


def test_every_config_file_is_covered_by_the_none_default_check():
  files = {os.path.basename(f) for f in glob.glob(os.path.join(REPO, "configs", "*.py"))}
  assert files == {s.split(":")[0] for s in _CONFIG_SPECS}, files


@pytest.mark.parametrize("spec", _CONFIG_SPECS)
def test_none_config_defaults_take_command_line_values(spec):
  """ml_collections cannot override an untyped None field from the command line ("--config.k=v"
  fails on NoneType); every None default must be a typed FieldReference."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from md_jax import config_loading  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config(os.path.join(REPO, "configs", spec))

  def untyped_nones(c, prefix):
    for k in c.keys():
      if isinstance(c[k], ml_collections.ConfigDict):
        yield from untyped_nones(c[k], f"{prefix}{k}.")
      elif c[k] is None:
        ref = c._fields[k]  # pylint: disable=protected-access
        if not (isinstance(ref, ml_collections.FieldReference)
                and ref.get_type() is not type(None)):
          yield prefix + k

  assert not list(untyped_nones(config, "config.")), spec


def test_light_decoder_shape_flags_override_their_none_defaults():
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["main", f"--config={os.path.join(REPO, 'configs', 'shapes.py')}:highres",
          "--config.vae.decoder_channels=(16,24,48,48)", "--config.vae.decoder_res_blocks=0"]
  fv = absl_flags.FlagValues()  # md_jax.main's flag, parsing this argv instead of sys.argv
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  assert fv.config.vae.decoder_channels == (16, 24, 48, 48)
  assert fv.config.vae.decoder_res_blocks == 0


def test_workdir_that_is_a_file_fails(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(loop.WorkdirError, match="not a directory"):
    loop.prepare_workdir(str(f))


def test_unwritable_workdir_fails_with_one_line(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  os.chmod(locked, 0o500)
  target = str(locked / "run")
  code = ("import sys; from md_jax.train import loop\n"
          "try:\n  loop.prepare_workdir(sys.argv[1])\n"
          "except loop.WorkdirError as e:\n  print(e); sys.exit(3)\n")
  cmd = [sys.executable, "-c", code, target]
  if os.geteuid() == 0:
    # Root ignores permission bits: drop to an unprivileged user to see what a user sees.
    if shutil.which("setpriv") is None:
      pytest.skip("running as root without setpriv")
    os.chmod(tmp_path, 0o755)
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
  proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 3, proc.stderr[-2000:]
  message = proc.stdout.strip()
  assert "\n" not in message and "--workdir" in message and "run" in message


def test_checkpoint_of_another_model_shape_fails_clearly(tmp_path):
  workdir = str(tmp_path / "w")
  loop.train_and_evaluate(tiny_config("vae", num_train_steps=2, eval_at_end=False), workdir)
  other = tiny_config("vae", eval_at_end=False)
  with other.unlocked():
    other.vae.channels = (8, 16, 24, 24)
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as err:
    loop.train_and_evaluate(other, workdir)
  message = str(err.value)
  assert "\n" not in message
  assert "another model" in message and workdir in message


def test_nan_stops_run_and_last_good_checkpoint_restores(tmp_path):
  workdir = str(tmp_path / "w")
  config = tiny_config("vae", num_train_steps=8, eval_at_end=False)
  with config.unlocked():
    config.debug.inject_nan_at_step = 4  # the 5th step
    config.checkpoint.every = 2
    config.checkpoint.async_save = False
  with pytest.raises(loop.NonFiniteLossError, match="step 5") as err:
    loop.train_and_evaluate(config, workdir)
  assert "\n" not in str(err.value)
  assert ckpt_lib.latest_step_in(workdir) == 4
  got, step = _params(workdir)
  assert step == 4
  leaves = jax.tree.leaves(got)
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
  # The run resumes from it once the cause is gone.
  with config.unlocked():
    config.debug.inject_nan_at_step = -1
  result = loop.train_and_evaluate(config, workdir)
  assert result["step"] == 8

  # Rerunning the finished run with the same config reports it (final.json) and leaves the
  # final checkpoint alone; a changed config finalizes and writes it again.
  final_ckpt = os.path.join(workdir, "checkpoints", "8")
  with open(os.path.join(workdir, loop.FINAL_JSON)) as f:
    assert json.load(f)["step"] == 8
  stamp = os.stat(final_ckpt).st_ino, os.stat(final_ckpt).st_mtime_ns
  again = loop.train_and_evaluate(config, workdir)
  assert again["step"] == 8 and not again["preempted"]
  assert (os.stat(final_ckpt).st_ino, os.stat(final_ckpt).st_mtime_ns) == stamp
  with config.unlocked():
    config.log_every = 3
  loop.train_and_evaluate(config, workdir)
  assert (os.stat(final_ckpt).st_ino, os.stat(final_ckpt).st_mtime_ns) != stamp


def _main_args(workdir, steps, every, sleep=0.0):
  return ["--config=configs/shapes.py:vae,tiny", f"--workdir={workdir}",
          f"--config.num_train_steps={steps}", f"--config.checkpoint.every={every}",
          "--config.eval_at_end=False", f"--config.debug.step_sleep_s={sleep}"]


def test_sigkill_then_restart_matches_uninterrupted_run(tmp_path):
  steps = 8
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  run_module("md_jax.main", *_main_args(straight, steps, 2), check=True)

  interrupted_at = sigkill_after_checkpoint(_main_args(killed, steps, 2, sleep=1.0), killed, (2, 4))
  assert interrupted_at < steps
  run_module("md_jax.main", *_main_args(killed, steps, 2), check=True)

  a, step_a = _params(straight)
  b, step_b = _params(killed)
  assert step_a == step_b == steps
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  assert _data_state(straight, steps) == _data_state(killed, steps)


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
  workdir = str(tmp_path / "w")
  cmd = [sys.executable, "-m", "md_jax.main", *_main_args(workdir, 40, 1000, sleep=0.5)]
  proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while time.time() < deadline:
    if os.path.isdir(os.path.join(workdir, "tensorboard")) and glob.glob(
        os.path.join(workdir, "tensorboard", "*")):
      break
    time.sleep(0.2)
  time.sleep(4.0)  # well inside the loop
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["preempted"] is True
  saved = ckpt_lib.latest_step_in(workdir)
  assert saved == summary["step"] and 0 < saved < 40
  proc = run_module("md_jax.main", *_main_args(workdir, saved + 2, 1000), check=True)
  assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == saved + 2


def test_sigterm_on_a_scheduled_checkpoint_step_saves_once_and_stops_cleanly(tmp_path):
  """SIGTERM handled at a step that is also a checkpoint step: that save is the preemption save
  (saving the step a second time failed with 'Checkpoint for step 4 already exists')."""
  workdir = str(tmp_path / "w")
  config = tiny_config("vae", num_train_steps=8, eval_at_end=False)
  with config.unlocked():
    config.checkpoint.every = 2
    config.debug.sigterm_at_step = 4
  result = loop.train_and_evaluate(config, workdir)
  assert result["preempted"] and result["step"] == 4
  assert ckpt_lib.latest_step_in(workdir) == 4
  assert not os.path.exists(os.path.join(workdir, loop.FINAL_JSON))
  with config.unlocked():
    config.debug.sigterm_at_step = -1
  again = loop.train_and_evaluate(config, workdir)
  assert again["step"] == 8 and not again["preempted"]


def test_held_out_loss_is_logged_and_reproducible_from_the_checkpoint(tmp_path):
  workdir = str(tmp_path / "w")
  config = tiny_config("vae", num_train_steps=4, eval_at_end=False)
  with config.unlocked():
    config.val.num_batches = 2
    config.val.every = 2
    config.checkpoint.async_save = False
  result = loop.train_and_evaluate(config, workdir)
  records = loop.read_jsonl(workdir)
  assert [r["step"] for r in records] == [0, 2, 4]
  assert all(np.isfinite(r["val/loss"]) and np.isfinite(r["val/loss_ema"]) for r in records)
  # Step 0: the EMA copy equals the params, and both see the same fixed noise.
  assert records[0]["val/loss_ema"] == records[0]["val/loss"]
  assert records[2]["val/loss"] != records[0]["val/loss"]
  assert result["metrics"]["val/loss"] == records[2]["val/loss"]
  with open(os.path.join(workdir, loop.FINAL_JSON)) as f:
    assert json.load(f)["metrics"]["val/loss_ema"] == records[2]["val/loss_ema"]

  # The batches are the eval split, not the first training batches.
  trainer = loop.Trainer(config, workdir)
  obj = trainer.objective
  held = obj.host_batch(next(obj.validation_iterator(0, 1)))
  assert not np.array_equal(held["image"], obj.host_batch(next(obj.data_iterator(0, 1)))["image"])
  # Recomputed from the saved state in a fresh trainer, the logged value comes back exactly.
  got, step = ckpt_lib.restore_subset(workdir, {k: trainer.abstract_state_sharded[k]
                                                for k in ("params", "ema_params", "frozen")})
  assert step == 4
  state = dict(got, step=jax.numpy.asarray(step, jax.numpy.int32))
  batches = loop._validation_batches(config, obj)  # pylint: disable=protected-access
  again = trainer.validation_loss(state, batches)
  assert again == {k: records[2][k] for k in ("val/loss", "val/loss_ema")}
  # The noise does not follow the step counter: the same params score the same at any step.
  assert trainer.validation_loss(dict(state, step=jax.numpy.asarray(0, jax.numpy.int32)),
                                 batches) == again


def test_held_out_loss_refused_where_the_objective_has_none():
  from md_jax.train import ufogen  # pylint: disable=g-import-not-at-top
  config = tiny_config("vae")
  with config.unlocked():
    config.val.num_batches = 1
  obj = loop.get_objective("vae")(config, loop.shd.make_mesh((-1, 1, 1), config.mesh_axes))
  assert len(loop._validation_batches(config, obj)) == 1  # pylint: disable=protected-access
  # UFOGen (two opposed losses) refuses; the method reads only the config.
  with pytest.raises(ValueError, match=r"config.val.num_batches=1: the 'vae' trainer has no"):
    ufogen.UFOGenObjective.validation_iterator(obj, 0, 1)
  with config.unlocked():
    config.val.num_batches = -1
  with pytest.raises(ValueError, match="config.val.num_batches=-1"):
    loop._validation_batches(config, obj)  # pylint: disable=protected-access
