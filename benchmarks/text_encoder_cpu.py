"""Forward time of the CLIP ViT-L/14 text tower: ours (jitted JAX, NNX) vs transformers' PyTorch.

  python benchmarks/text_encoder_cpu.py [--runs 10] [--threads 2] [--hf_dir DIR]

Batch 1 x 77 tokens, fp32, random weights (or the checkpoint in --hf_dir, loaded into both).
Both sides get warm-up calls first; the medians of --runs timed calls are printed with their
ratio. PyTorch runs under torch.inference_mode with --threads intra-op threads; XLA:CPU sizes its
pool to the machine's cores (2 on the reference machine, so both sides use 2 threads there; the
core count is printed). Needs the `bench` (or `test`) extra for torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--hf_dir", default="", help="a CLIP text checkpoint; empty = random weights")
  return p.parse_args()


def _median_seconds(fn, runs: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  args = _parse()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from md_jax.models import hf_clip  # pylint: disable=g-import-not-at-top
  from md_jax.models import text_encoder as te  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  if args.hf_dir:
    cfg = hf_clip.read_text_config(args.hf_dir)
    ours = hf_clip.load_hf_text_encoder(args.hf_dir)
    ref = transformers.CLIPTextModel.from_pretrained(args.hf_dir, local_files_only=True)
  else:
    cfg = te.default_config()
    with nnx.use_eager_sharding(False):
      ours = te.CLIPTextTransformer(cfg, rngs=nnx.Rngs(0))
    hf_cfg = transformers.CLIPTextConfig(**{k: cfg[k] for k in te.CONFIG_FIELDS})
    with torch.device("meta"):
      ref = transformers.CLIPTextModel(hf_cfg)
    ref = ref.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    # Cheap seeded weights of realistic scale (LN scales ~1, kernels ~1/sqrt(fan_in)): values
    # that drive activations into subnormals would slow PyTorch (XLA flushes them) and skew it.
    with torch.no_grad():
      ref.embeddings.position_ids.copy_(torch.arange(cfg.max_position_embeddings)[None])
      for name, p in ref.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "layer_norm" in name and name.endswith("weight"):
          p.copy_(1.0 + 0.1 * noise)
        elif name.endswith("bias"):
          p.copy_(0.02 * noise)
        else:
          p.copy_((0.02 if "embedding" in name else p.shape[-1] ** -0.5) * noise)
  ref = ref.eval()
  length = int(cfg.max_position_embeddings)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, int(cfg.vocab_size) - 1, (args.batch, length)).astype(np.int32)
  ids[:, -1] = int(cfg.eos_token_id) if cfg.eos_token_id not in (None, 2) else cfg.vocab_size - 1

  graphdef, state = nnx.split(ours)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  ids_jax = jax.device_put(ids)
  t0 = time.perf_counter()
  jax.block_until_ready(fwd(state, ids_jax))
  compile_s = time.perf_counter() - t0
  jax_s = _median_seconds(lambda: jax.block_until_ready(fwd(state, ids_jax)), args.runs,
                          args.warmup)

  ids_torch = torch.from_numpy(ids.astype(np.int64))

  def torch_fwd():
    with torch.inference_mode():
      ref(input_ids=ids_torch)

  torch_s = _median_seconds(torch_fwd, args.runs, args.warmup)
  n_params = sum(int(x.size) for x in jax.tree.leaves(state))
  print(f"CLIP text tower: {cfg.num_hidden_layers} x {cfg.hidden_size}, {n_params:,} params, "
        f"batch {args.batch} x {length} tokens, fp32, torch threads {args.threads}, "
        f"{os.cpu_count()} CPU cores, "
        f"{'weights from ' + args.hf_dir if args.hf_dir else 'random weights'}")
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}; medians of {args.runs} runs after "
        f"{args.warmup} warm-up (jax compile {compile_s:.1f} s)")
  print(f"load average (1/5/15 min) {os.getloadavg()}: other work on the machine skews both")
  print(f"ours (JAX, jit):        {jax_s * 1e3:8.1f} ms")
  print(f"transformers (PyTorch): {torch_s * 1e3:8.1f} ms")
  print(f"ratio ours / PyTorch:   {jax_s / torch_s:8.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
