"""relpos_ref: numerically verified reference math for relative positional biases in self-attention.

Every function is written once against the Python array API standard and runs on NumPy, array_api_strict and CuPy;
the namespace comes from the inputs (array-api-compat) or an explicit ``xp=``. Conventions (offset sign, alignment,
bias placement, masking, fully masked rows, table layout, LSE base) are named parameters; ``spec/`` documents them.
"""

from .attention import attention
from .cuda import fused_biased_softmax
from .families import (
    FIRE,
    ALiBi,
    BiasFamily,
    KerpleLog,
    KerplePower,
    OffsetBias,
    Sandwich,
    T5Bias,
    TensorBias,
    alibi_slopes,
    t5_bucket,
    t5_bucket_thresholds,
)
from .gradients import AttentionGrads, attention_vjp
from .positions import causal_mask, positions, relative_offsets
from .softmax import biased_softmax

__version__ = "0.1.0"

__all__ = [
    "FIRE",
    "ALiBi",
    "AttentionGrads",
    "BiasFamily",
    "KerpleLog",
    "KerplePower",
    "OffsetBias",
    "Sandwich",
    "T5Bias",
    "TensorBias",
    "__version__",
    "alibi_slopes",
    "attention",
    "attention_vjp",
    "biased_softmax",
    "fused_biased_softmax",
    "causal_mask",
    "positions",
    "relative_offsets",
    "t5_bucket",
    "t5_bucket_thresholds",
]
