"""Moving arrays between the harness (host NumPy, float64) and the candidate's library.

The harness never imports PyTorch, CuPy or JAX itself unless the caller names them: outputs are recognised by their
type's module and converted through the library's own host-copy method, DLPack or ``__array__``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__: list[str] = []

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


def numpy_dtype(name: str) -> Any:
    """The NumPy dtype for a float dtype name; bfloat16 comes from ml_dtypes."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as exc:  # pragma: no cover - ml_dtypes is in the test extra
            msg = "dtype: 'bfloat16' needs the ml_dtypes package (pip install ml_dtypes)"
            raise ImportError(msg) from exc
        return np.dtype(ml_dtypes.bfloat16)
    if name not in FLOAT_DTYPES:
        msg = f"dtype: expected one of {', '.join(repr(d) for d in FLOAT_DTYPES)}, got {name!r}"
        raise ValueError(msg)
    return np.dtype(name)


def dtype_name(dtype: Any) -> str:
    """Plain name ("float32", "bfloat16", "int64") of a dtype of any library."""
    text = str(getattr(dtype, "name", dtype))
    text = text.rsplit(".", maxsplit=1)[-1]
    return text.replace("<class '", "").replace("'>", "")


def round_to(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` rounded to dtype ``name`` and widened back to float64 (exactly)."""
    return np.asarray(x, dtype=np.float64).astype(numpy_dtype(name)).astype(np.float64)


def to_host(x: Any, *, name: str = "candidate output") -> tuple[np.ndarray, str]:
    """(host NumPy copy, dtype name) of an array from NumPy, PyTorch, CuPy, JAX or any DLPack producer.

    Floating values are widened to float64 (exactly); integer values keep an integer dtype (int64).
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


def resolve_namespace(xp: Any) -> tuple[str, Any]:
    """(kind, module) for ``xp`` given as None, a module or a name ("numpy", "torch", "cupy", "array_api_strict")."""
    if xp is None:
        return "numpy", np
    if isinstance(xp, str):
        name = xp
        if name == "numpy":
            return "numpy", np
        if name == "torch":
            import torch

            return "torch", torch
        if name == "cupy":
            import cupy

            return "cupy", cupy
        if name == "array_api_strict":
            import array_api_strict

            return "array_api", array_api_strict
        msg = f"xp: expected a namespace module or one of 'numpy', 'torch', 'cupy', 'array_api_strict', got {xp!r}"
        raise ValueError(msg)
    name = getattr(xp, "__name__", "")
    if name in ("numpy", "array_api_compat.numpy"):
        return "numpy", np
    if name in ("torch", "array_api_compat.torch"):
        import torch

        return "torch", torch
    if name in ("cupy", "array_api_compat.cupy"):
        import cupy

        return "cupy", cupy
    if hasattr(xp, "asarray"):
        return "array_api", xp
    msg = f"xp: expected an array namespace (module with asarray), got {xp!r}"
    raise TypeError(msg)


def from_host(arr: np.ndarray, kind: str, module: Any, device: Any = None) -> Any:
    """``arr`` (host NumPy, any float dtype incl. ml_dtypes.bfloat16) as an array of the chosen library."""
    is_bf16 = "bfloat16" in str(arr.dtype)
    if kind == "numpy":
        return np.array(arr, copy=True)
    if kind == "torch":
        if is_bf16:
            t = module.from_numpy(arr.astype(np.float32)).to(module.bfloat16)
        else:
            t = module.from_numpy(np.array(arr, copy=True))
        return t.to(device) if device is not None else t
    if is_bf16:
        msg = f"dtype: bfloat16 inputs can be handed over as NumPy (ml_dtypes) or PyTorch arrays, not {kind}"
        raise TypeError(msg)
    if kind == "cupy":
        if device is not None:
            with module.cuda.Device(device):
                return module.asarray(arr)
        return module.asarray(arr)
    dt = getattr(module, str(arr.dtype), None)
    if dt is None:
        msg = f"dtype: the namespace {getattr(module, '__name__', module)} has no {arr.dtype}"
        raise TypeError(msg)
    return module.asarray(arr, dtype=dt) if device is None else module.asarray(arr, dtype=dt, device=device)
