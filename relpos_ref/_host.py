"""Host NumPy copies of arrays of any library, dtype names, rounding to a format, and the one error metric.

Used by ``testing``, the bound model, the conformance harness and the CUDA path, so that every comparison in the
project converts, rounds and measures the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .conventions import FLOAT_DTYPES

__all__ = ["abs_errors", "dtype_name", "host_numpy", "max_errors", "numpy_dtype", "round_to", "to_host"]


def host_numpy(value: Any) -> np.ndarray:
    """A host NumPy array with the data of ``value`` (any namespace; copies only when it must, keeps the dtype)."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.split(".")[0] == "cupy":
        return value.get()
    try:
        return np.from_dlpack(value)
    except (TypeError, ValueError, BufferError, RuntimeError, AttributeError):
        return np.asarray(value)


def dtype_name(dtype: Any) -> str:
    """Plain name of a dtype of any library ("float32", "bfloat16", "int64"), to look up its twin elsewhere."""
    name = getattr(dtype, "name", None)
    if isinstance(name, str):
        return name
    text = str(dtype)
    if text.startswith("<class"):  # a NumPy (or ml_dtypes) scalar type such as numpy.float64
        return np.dtype(dtype).name
    return text.rsplit(".", maxsplit=1)[-1]


def numpy_dtype(name: str) -> Any:
    """The NumPy dtype for a float format name; bfloat16 comes from ml_dtypes."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as exc:  # pragma: no cover - ml_dtypes is a base dependency
            msg = "dtype: 'bfloat16' needs the ml_dtypes package (pip install ml_dtypes)"
            raise ImportError(msg) from exc
        return np.dtype(ml_dtypes.bfloat16)
    if name not in FLOAT_DTYPES:
        msg = f"dtype: expected one of {', '.join(repr(d) for d in FLOAT_DTYPES)}, got {name!r}"
        raise ValueError(msg)
    return np.dtype(name)


def round_to(x: Any, name: str) -> np.ndarray:
    """``x`` rounded once to format ``name`` and widened back to float64 (exactly); overflow gives infinities."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float64).astype(numpy_dtype(name)).astype(np.float64)


def to_host(x: Any, *, name: str = "candidate output") -> tuple[np.ndarray, str]:
    """(host NumPy copy, dtype name) of an array from NumPy, PyTorch, CuPy, JAX or any DLPack producer.

    Floating values are widened to float64 (exactly); integer and boolean values become int64.
    """
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        src = dtype_name(x.dtype)
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.is_floating_point():
            t = t.double()  # also makes bfloat16 readable: NumPy has no native bfloat16
        arr = t.numpy()
    elif mod == "cupy":
        src = dtype_name(x.dtype)
        arr = x.get()
    elif isinstance(x, np.ndarray | np.generic):
        src = dtype_name(x.dtype)
        arr = np.asarray(x)
    elif hasattr(x, "__dlpack__") or hasattr(x, "__array__"):
        src = dtype_name(getattr(x, "dtype", "unknown"))
        try:
            arr = np.from_dlpack(x)
        except (TypeError, ValueError, BufferError, RuntimeError, AttributeError):
            try:
                arr = np.asarray(x)
            except Exception as exc:
                msg = f"{name}: could not copy a {type(x).__name__} to host memory ({type(exc).__name__}: {exc})"
                raise TypeError(msg) from exc
    else:
        msg = (
            f"{name}: expected an array (NumPy, PyTorch, CuPy, JAX, or any object with __dlpack__ or __array__), "
            f"got {type(x).__name__}"
        )
        raise TypeError(msg)
    arr = np.array(arr, copy=True)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64), src
    if arr.dtype.kind == "V" or "bfloat16" in str(arr.dtype):
        return arr.astype(np.float32).astype(np.float64), "bfloat16"
    if arr.dtype.kind == "c":
        msg = f"{name}: expected real values, got complex dtype {arr.dtype}"
        raise TypeError(msg)
    return arr.astype(np.float64), src


def abs_errors(actual: np.ndarray, desired: np.ndarray) -> np.ndarray:
    """|actual - desired| entrywise (float64 host arrays), with equal entries (matching infinities, NaN against NaN)
    counted 0 and a NaN or infinity on one side only counted infinite."""
    same = (actual == desired) | (np.isnan(actual) & np.isnan(desired))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(actual - desired)
    diff = np.where(same, 0.0, diff)
    return np.where(np.isnan(diff), np.inf, diff)


def max_errors(actual: Any, desired: Any, *, tiny: float = 1e-300) -> tuple[float, float]:
    """(max absolute error, max relative error) of :func:`abs_errors` over entries, in float64 on the host.

    The relative error divides by max(|desired|, tiny), with non-finite desired entries counted as 1.
    """
    a = np.array(host_numpy(actual), copy=True).astype(np.float64)
    d = np.array(host_numpy(desired), copy=True).astype(np.float64)
    a, d = np.broadcast_arrays(a, d)
    diff = abs_errors(a, d)
    if diff.size == 0:
        return 0.0, 0.0
    rel = diff / np.maximum(np.abs(np.where(np.isfinite(d), d, 1.0)), tiny)
    return float(diff.max()), float(rel.max())
