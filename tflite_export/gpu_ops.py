"""Builtin ops the TFLite/LiteRT GPU delegate accepts, for graphs meant to run on it.

Read from the delegate's compatibility code, the switch in `CheckGpuDelegateCompatibility` of
  tensorflow/tensorflow  tensorflow/lite/tools/versioning/gpu_compatibility.cc
  (commit 03a5e4e19a9c8200e13c85f1c637877fdf589be6)
whose comment says the checks of the delegate's model builder
(tensorflow/lite/delegates/gpu/common/model_builder.cc) were all moved there. Every op with a
`case` is listed; per-op conditions (e.g. SLICE/STRIDED_SLICE only at rank 3-4, MEAN/SUM with
constant int32 axes, FULLY_CONNECTED without a constant input) are left to the Analyzer with
gpu_compatibility=True, which runs that same code.

Settled from the source:
  * BROADCAST_TO has no `case`: it falls through to "Not supported op". (The Analyzer was seen
    to pass a graph holding one; it is rejected here regardless.) GATHER_ND, SCATTER_ND and
    STABLEHLO_COMPOSITE are absent too.
  * GATHER has a case (float params, 1-D int32 indices) but is refused in UNet/decoder graphs
    anyway: a gather there means an index table slipped into the graph (DESIGN 6).
  * QUANTIZE / DEQUANTIZE are supported: int8 and fp16-weight models run on the delegate by
    dequantising their weights (it computes in float, fp16 by default).
  * CUSTOM is supported only for a few named kernels (Convolution2DTransposeBias,
    MaxPoolingWithArgmax2D, MaxUnpooling2D, Resampler); our graphs use no custom ops.
"""

from __future__ import annotations

SOURCE = ("tensorflow/tensorflow tensorflow/lite/tools/versioning/gpu_compatibility.cc "
          "@ 03a5e4e19a9c8200e13c85f1c637877fdf589be6, CheckGpuDelegateCompatibility")

GPU_DELEGATE_OPS = frozenset("""
ABS ADD ADD_N ATAN2 AVERAGE_POOL_2D BATCH_MATMUL CAST CEIL CONCATENATION CONV_2D COS CUMSUM
DENSIFY DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE DIV DYNAMIC_UPDATE_SLICE ELU EMBEDDING_LOOKUP
EQUAL EXP FLOOR FLOOR_DIV FLOOR_MOD FULLY_CONNECTED GATHER GELU GREATER GREATER_EQUAL HARD_SWISH
LEAKY_RELU LESS LESS_EQUAL LOG LOGICAL_AND LOGISTIC LSTM MAXIMUM MAX_POOL_2D MEAN MINIMUM
MIRROR_PAD MUL NEG NOT_EQUAL ONE_HOT PACK PAD PADV2 POW PRELU QUANTIZE REDUCE_MAX REDUCE_MIN
REDUCE_PROD RELU RELU6 RELU_N1_TO_1 RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR RSQRT SELECT
SELECT_V2 SIGN SIN SLICE SOFTMAX SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE
STABLEHLO_CLAMP STRIDED_SLICE SUB SUM TANH TILE TRANSPOSE TRANSPOSE_CONV
""".split())

# Supported by the delegate but refused in UNet/decoder graphs (see above).
FORBIDDEN_IN_GPU_GRAPHS = frozenset({"GATHER", "GATHER_ND", "EMBEDDING_LOOKUP"})

# Never acceptable in an exported graph: no builtin kernel in a plain LiteRT runtime.
NON_BUILTIN_PREFIXES = ("Flex",)
NON_BUILTIN_OPS = frozenset({"CUSTOM", "STABLEHLO_COMPOSITE", "DELEGATE"})

MAX_RANK = 4
