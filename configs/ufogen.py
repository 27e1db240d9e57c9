"""UFOGen one-step finetune (paper sec. 4, Table 5) of a pretrained shapes diffusion run.

``--config=configs/ufogen.py:[RECON][,FINETUNE][,SIZE] --config.init_from=WORKDIR`` where
  RECON     diffusion (default, the paper's pick) | distill | ema   - the reconstruction term
  FINETUNE  full (default) | lora                                    - what of G is trained
  SIZE      full (default) | smoke | tiny                            - as configs/shapes.py
            md512: the paper's MD network at 512px on real data, on pods (configs/md_pretrain.py
            :512's network, data, precision, mesh and remat; init_from = that stage's run);
            md256: the same from the :256 stage (a cheaper one-step model; the size
            benchmarks/train_step_memory.py runs a paper-size GAN step at on a CPU)
in any order, so the six cells of Table 5 are six config args (e.g. ``distill,lora``).
``init_from`` is the pretrained diffusion run (for the shapes chain: QUICKSTART_DIR/highres, or
the relu-finetuned run when the attention is relu); text encoder, VAE and latent statistics come
from its checkpoint. The network is the shapes highres one (configs/shapes.py).
"""

from __future__ import annotations

import ml_collections

from md_jax import config_loading
from md_jax.train import ufogen

SIZES = ("full", "smoke", "tiny", "md512", "md256")


def parse_arg(arg: str | None) -> tuple[str, str, str]:
  got = {}
  for tok in [p for p in (arg or "").replace(":", ",").split(",") if p]:
    # 'full' is read as the finetune kind (the default size is full as well).
    kind = ("reconstruction term" if tok in ufogen.RECON_TERMS else
            "finetune kind" if tok in ufogen.FINETUNE_KINDS else
            "size" if tok in SIZES else None)
    if kind is None:
      raise ValueError(f"configs/ufogen.py:{arg}: unknown part {tok!r}; expected a "
                       f"reconstruction term {ufogen.RECON_TERMS}, {ufogen.FINETUNE_KINDS} or a "
                       f"size {SIZES}")
    if got.get(kind, tok) != tok:  # e.g. 'lora,full': a LoRA run silently became a full one
      raise ValueError(f"configs/ufogen.py:{arg}: two {kind}s, {got[kind]!r} and {tok!r} ('full' "
                       "is the finetune kind here; the size is full when none is given)")
    got[kind] = tok
  return (got.get("reconstruction term", "diffusion"), got.get("finetune kind", "full"),
          got.get("size", "full"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  recon, finetune, size = parse_arg(arg)
  if size in ("md512", "md256"):
    c = config_loading.config_module("md_pretrain", __file__).get_config(size[2:])
  else:
    c = config_loading.config_module("shapes", __file__).get_config(f"highres,{size}")
  c.stage = "ufogen"
  c.trainer = "ufogen"
  c.init_from = ""  # required: the pretrained diffusion run
  c.vae_workdir = ""  # unused: the VAE comes from init_from's checkpoint
  c.ufogen = ufogen.default_config()
  c.ufogen.recon = recon
  c.ufogen.finetune = finetune
  c.data.caption_dropout = 0.0  # the one-step generator runs without CFG
  # G and D condition on the pretrained run's text encoder, frozen here whether that run kept it
  # frozen or trained it (then it is read from that run's params).
  c.text.frozen = True
  if size not in ("md512", "md256"):
    # ours: D judges x_{t-500} (t >= 500), not the paper's x_{t-1}: at gap 1 the noise in x_{t-1}
    # hides what G gets wrong and the shapes D barely learns (docs/results.md); G is still
    # trained at t = T-1, where the one-step sampler runs it. The paper-size configs keep x_{t-1}.
    c.ufogen.timestep_gap = 500
    # The shapes highres stage trains on a cached pool of records; this short finetune encodes
    # its images in the step (config.vae.cache_dir works here too, with a matching pool).
    c.data.num_records = 1_000_000
  # Evaluation: the one-step generator (1 trailing DDIM step from t = T-1 is exactly
  # x0 = convert(G(x_T, T-1, c))), no guidance.
  c.sample.num_steps = 1
  c.sample.guidance_scale = 1.0
  # ours: a finetune at a tenth of pretraining's peak lr, short warmup.
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 20
  c.ufogen.disc.learning_rate = 1e-4
  if size in ("md512", "md256"):
    # ours (the paper gives no UFOGen batch or length): the 512 stage's batch, a short finetune.
    # G and D are two paper-size UNets, so half the batch runs per micro-batch.
    c.global_batch_size = 2048
    c.num_train_steps = 50_000
    c.optim.warmup_steps = 1_000
    c.optim.grad_accum_steps = 2
    c.sample.batch_size = 64
  elif size == "full":
    # The quickstart's last training stage (128 px, as its high-res run), sized to its 20-30 minute
    # budget (2 cores, cold compilation cache): restoring, compiling the GAN step and judging 256
    # one-step samples take most of it. A token finetune that exercises the chain; for a real one
    # raise --config.num_train_steps / --config.global_batch_size (benchmarks/ufogen_table.py).
    c.num_train_steps = 60
    c.global_batch_size = 8
    c.ufogen.probe_examples = 64  # 8 batches of G + 2 D passes in the evaluation
  elif size == "smoke":
    c.num_train_steps = 20
    c.optim.warmup_steps = 2
    c.ufogen.probe_examples = 16
  else:
    c.optim.warmup_steps = 1
    c.ufogen.probe_examples = 16
  return c
