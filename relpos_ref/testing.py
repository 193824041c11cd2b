"""Public helpers for testing code against relpos_ref on any array backend."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._host import host_numpy, max_errors

__all__ = ["max_errors", "to_numpy"]


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy copy of an array of any namespace (CuPy, array_api_strict, NumPy, DLPack producers)."""
    return np.array(host_numpy(x), copy=True)
