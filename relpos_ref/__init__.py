"""relpos_ref: numerically verified reference math for relative positional biases in self-attention.

Every function is written once against the Python array API standard and runs on NumPy, array_api_strict and CuPy;
the namespace comes from the inputs (array-api-compat) or an explicit ``xp=``. Conventions (offset sign, alignment,
bias placement, masking, fully masked rows, table layout, LSE base) are named parameters; ``spec/`` documents them.
"""

from .alibi import ALiBi, alibi_slopes
from .attention import attention
from .cuda import fused_biased_softmax
from .family import BiasFamily
from .fire import FIRE
from .gradients import AttentionGrads, attention_vjp
from .kerple import KerpleLog, KerplePower
from .offset import OffsetBias
from .positions import causal_mask, positions, relative_offsets
from .sandwich import Sandwich
from .softmax import biased_softmax
from .t5 import T5Bias, t5_bucket, t5_bucket_thresholds
from .tensor_bias import TensorBias

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
