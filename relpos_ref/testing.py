"""Public helpers for testing code against relpos_ref on any array backend."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._host import host_numpy, max_errors
from .properties import (
    PropertyResult,
    causal_no_future_leak,
    heads_subset,
    kv_cache_suffix,
    offset_only,
    offset_only_horizon,
    penalty_monotone,
    probabilities,
    softmax_shift_invariance,
    t5_buckets,
    zero_at_zero,
)

__all__ = [
    "PropertyResult",
    "causal_no_future_leak",
    "heads_subset",
    "kv_cache_suffix",
    "max_errors",
    "offset_only",
    "offset_only_horizon",
    "penalty_monotone",
    "probabilities",
    "softmax_shift_invariance",
    "t5_buckets",
    "to_numpy",
    "zero_at_zero",
]


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy copy of an array of any namespace (CuPy, array_api_strict, NumPy, DLPack producers)."""
    return np.array(host_numpy(x), copy=True)
