"""Public helpers for testing code against relpos_ref on any array backend."""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import is_array_api_obj

from ._checks import host_numpy

__all__ = ["max_errors", "to_numpy"]


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy copy of an array of any namespace (CuPy, array_api_strict, NumPy, DLPack producers)."""
    if is_array_api_obj(x):
        return np.array(host_numpy(x), copy=True)
    return np.array(x, copy=True)


def max_errors(actual: Any, desired: Any, *, tiny: float = 1e-300) -> tuple[float, float]:
    """(max absolute error, max relative error) over entries, computed in float64 on the host.

    Entries equal in both (including matching infinities and NaNs) count as error 0; a NaN or infinity on one side
    only counts as an infinite error. The relative error divides by max(|desired|, tiny).
    """
    a = to_numpy(actual).astype(np.float64)
    d = to_numpy(desired).astype(np.float64)
    a, d = np.broadcast_arrays(a, d)
    same = (a == d) | (np.isnan(a) & np.isnan(d))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(same, 0.0, np.abs(a - d))
    diff = np.where(np.isnan(diff), np.inf, diff)
    rel = diff / np.maximum(np.abs(np.where(np.isfinite(d), d, 1.0)), tiny)
    if diff.size == 0:
        return 0.0, 0.0
    return float(diff.max()), float(rel.max())
