"""MobileDiffusion (MD) at the paper's size: ``--config=configs/md.py:512`` (or ``:256``).

The UNet follows Table 6 (appendix B) and sections 3.1-3.4; Table 6 wins where the text differs
(DESIGN 2). Every field is written out here so this file reads as the spec; a test checks it
equals ``md_jax.models.unet.default_config("md")`` so the two cannot drift. The argument picks the
progressive-training resolution: 256 (latent 32x32) or 512 (latent 64x64, the model of Table 1).

Fixed facts (paper):                      Open choices (ours, reason on each line below):
  channels (320, 640, 1024)  sec. 3.2       head_dim, sep_expansion, time_embed_dim,
  Table 6 blocks and transformers           norm_groups, GLU split, skip handling
  11 conv blocks, 15 SA + 18 CA  Table 1
  8 latent channels, CLIP ViT-L/14 text (77 x 768)

The networks only: training them at this size needs a real image-text source (configs/shapes.py
is the embedded stand-in that keeps this structure at toy widths).
"""

from __future__ import annotations

import ml_collections

from md_jax import config_base
from md_jax.models import text_encoder
from md_jax.models import vae as vae_lib

RESOLUTIONS = (256, 512)


def unet_config(variant: str = "md") -> ml_collections.ConfigDict:
  """The paper's UNet; 'md-lite' differs in innermost width and the Up-3 transformer depth."""
  u = ml_collections.ConfigDict()
  u.in_channels = 8  # the paper's VAE latent has 8 channels (sec. 3.5)
  u.out_channels = 8
  u.context_dim = 768  # CLIP ViT-L/14 text features, 77 tokens x 768
  u.channels = (320, 640, 1024)  # Table 1; sec. 3.2: 1024 is the best innermost width
  u.down_blocks = (1, 1, 2)  # Table 6: Down-1 FullConv x1, Down-2 FullConv x1, Down-3 SPConv x2
  u.up_blocks = (2, 2, 3)  # Table 6: Up-1 FullConv x2, Up-2 FullConv x2, Up-3 SPConv x3
  u.down_conv = ("full", "full", "sep")  # Table 6: SPConv only at the innermost level
  u.up_conv = ("full", "full", "sep")
  u.down_depth = (0, 1, 3)  # Table 6: no transformer at 64x64; CA at 32x32; (SA+CA) x3 at 16x16
  u.up_depth = (0, 1, 3)
  u.self_attn = (False, False, True)  # sec. 3.2: SA dropped at 32x32, kept at 16x16 (Table 6)
  u.inner_skips = False  # sec. 3.4: innermost down/mid/up is one unified 5-layer stack
  u.head_dim = 64  # open: SD's and most ViTs' head width (10 heads at 640, 16 at 1024)
  u.num_heads = 0  # 0: heads follow head_dim
  u.ff_mult = 3  # sec. 3.2: GLU expansion trimmed from 4 to 3
  u.ff_activation = "swish"  # sec. 3.2 / appendix A: swish replaces gelu in the GLU
  u.shared_kv = True  # sec. 3.2: W_K = W_V in self-attention
  u.attention = "softmax"  # pretraining; configs/shapes_relu.py finetunes into 'relu' (sec. 3.2)
  u.sep_expansion = 4  # open: ConvNeXt's inverted-bottleneck ratio, which SPConv follows (Fig. 2)
  u.norm_groups = 32  # open: SD's value; divides every width and concatenated width here
  u.time_embed_dim = 1280  # open: SD's 4 x first-level width (320 -> 1280)
  u.remat = False  # memory switch, no effect on the function: nnx.remat per conv/transformer
  if variant == "md-lite":
    u.channels = (320, 640, 896)  # Table 6 caption: MD-Lite's innermost width is 896
    u.up_depth = (0, 1, 2)  # Table 6: Up-3 transformers are (SA x2 + CA x2)
  elif variant != "md":
    raise ValueError(f"unknown MobileDiffusion variant {variant!r}")
  return u


def network_config(arg: str | None, variant: str) -> ml_collections.ConfigDict:
  resolution = int(arg or 512)
  if resolution not in RESOLUTIONS:
    raise ValueError(f"configs/{variant.replace('-', '_')}.py:{arg}: resolution must be one of "
                     f"{RESOLUTIONS}")
  c = config_base.base_config()
  c.variant = variant
  c.resolution = resolution
  c.unet = unet_config(variant)
  c.text = text_encoder.default_config()  # CLIP ViT-L/14's text tower, frozen (sec. 3.1)
  c.vae = vae_lib.default_config()  # f = 8, 8 latent channels
  c.latent_size = resolution // vae_lib.downsample_factor(c.vae)  # 32 at 256, 64 at 512
  c.context_length = int(c.text.max_position_embeddings)  # 77
  c.data = ml_collections.ConfigDict(dict(image_size=resolution, max_length=c.context_length))
  # Progressive training (DESIGN 1): the 512 stage starts from the 256 run's workdir.
  c.init_from = ""
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return network_config(arg, "md")
