"""Each point on which attention implementations disagree, named once: a ``Literal`` type and its tuple of values.

Validators, the CLI's ``choices=`` and the conformance harness all read these tuples; ``spec/conventions.md`` states
what each value means and which peers use it.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "ALIGNMENTS",
    "BACKENDS",
    "EQUIVALENCES",
    "FLOAT_DTYPES",
    "FULLY_MASKED",
    "LAYOUTS",
    "LEVELS",
    "PLACEMENTS",
    "SEGMENT_POSITIONS",
    "TENSOR_LAYOUTS",
    "Alignment",
    "Backend",
    "Equivalence",
    "FloatDtype",
    "FullyMasked",
    "Layout",
    "Level",
    "Placement",
    "SegmentPositions",
    "TensorLayout",
]

#: Where the bias joins the logits: after the 1/sqrt(d) scale (T5 without scale, ALiBi, FlashAttention) or before it.
Placement = Literal["post_scale", "pre_scale"]
#: Output of a row with no attended key: zeros (FlashAttention, xformers) or NaN (a plain softmax over -inf).
FullyMasked = Literal["zero", "nan"]
#: How queries line up with keys when Sq != Sk: the last query sees the last key, or the first sees the first.
Alignment = Literal["bottom_right", "top_left"]
#: Positions of packed sequences (``q_segment_ids``/``k_segment_ids``): kept as they are, or restarted at 0 at the
#: first token of each segment (each sequence of the pack then sees the positions it would see alone).
SegmentPositions = Literal["global", "restart"]
#: Which implementation computes the softmax: the streamed reference, or the fused CUDA kernel.
Backend = Literal["reference", "fused"]
#: Axis order of a T5 table: (heads, buckets) here and in Mesh TensorFlow, (buckets, heads) in an HF embedding.
Layout = Literal["heads_buckets", "buckets_heads"]
#: What the harness accepts as equal biases: entry by entry, or up to a constant per row (same probabilities).
Equivalence = Literal["exact", "row_shift"]
#: Floating-point formats the harness and the bound model know by name.
FloatDtype = Literal["float64", "float32", "float16", "bfloat16"]
#: The memory layout of q, k, v and the output a kernel takes: PyTorch SDPA's (B, H, S, D) or FlashAttention's,
#: xformers' and vLLM's (B, S, H, D). The log-sum-exp is (B, H, Sq) in both (FlashAttention's softmax_lse).
TensorLayout = Literal["bhsd", "bshd"]
#: How many kernel-shaped cases a conformance check draws: a smoke test, the default, a nightly run.
Level = Literal["quick", "default", "thorough"]

PLACEMENTS: tuple[Placement, ...] = get_args(Placement)
FULLY_MASKED: tuple[FullyMasked, ...] = get_args(FullyMasked)
ALIGNMENTS: tuple[Alignment, ...] = get_args(Alignment)
SEGMENT_POSITIONS: tuple[SegmentPositions, ...] = get_args(SegmentPositions)
BACKENDS: tuple[Backend, ...] = get_args(Backend)
LAYOUTS: tuple[Layout, ...] = get_args(Layout)
EQUIVALENCES: tuple[Equivalence, ...] = get_args(Equivalence)
FLOAT_DTYPES: tuple[FloatDtype, ...] = get_args(FloatDtype)
TENSOR_LAYOUTS: tuple[TensorLayout, ...] = get_args(TensorLayout)
LEVELS: tuple[Level, ...] = get_args(Level)
