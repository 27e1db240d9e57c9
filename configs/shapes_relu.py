"""softmax -> ReLU attention finetune on shapes (paper sec. 3.2, appendix A).

``--config=configs/shapes_relu.py:SIZE --config.init_from=WORKDIR_OF_A_SOFTMAX_RUN`` with SIZE
full|smoke|tiny. The network is the shapes highres one (configs/shapes.py) with
``unet.attention='relu'``: relu(QK^T/sqrt(d))/L has no parameters, so the relu model restores
the softmax run's params (and EMA) unchanged and trains on. The paper finetunes ~10k steps at
full scale; here a fraction of the highres stage's steps. Measured from a finished quickstart
(``benchmarks/relu_recovery.py``): the ReLU model starts at 1.016x the softmax model's held-out
loss, reaches it by step 75 and ends level with a softmax control finetuned alike (0.5898 vs
0.5897 at step 300), judged the same within the CIs.
"""

from __future__ import annotations

import ml_collections

from md_jax import config_loading


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size = arg or "full"
  c = config_loading.config_module("shapes", __file__).get_config(f"highres,{size}")
  c.stage = "relu"
  c.unet.attention = "relu"
  c.init_from = ""  # required: the softmax-attention run (e.g. QUICKSTART_DIR/highres)
  if size == "full":
    # ours: a finetune; shorter warmup than pretraining, same peak lr as the highres stage.
    c.num_train_steps = 300
    c.optim.warmup_steps = 20
  return c
