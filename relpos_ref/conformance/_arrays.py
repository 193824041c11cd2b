"""Moving arrays between the harness (host NumPy, float64) and the candidate's library.

The harness never imports PyTorch, CuPy or JAX itself unless the caller names them: outputs are recognised by their
type's module and converted through the library's own host-copy method, DLPack or ``__array__``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..cases import to_layout
from ..conventions import TensorLayout

__all__ = ["hand_over"]


#: The namespaces ``xp`` may name: kind by name (the module is imported under that name).
_KINDS = {"numpy": "numpy", "torch": "torch", "cupy": "cupy", "array_api_strict": "array_api"}
#: The modules recognised as the three libraries (array_api_compat's wrappers too): library by module name.
_MODULES = {m: n for n in ("numpy", "torch", "cupy") for m in (n, f"array_api_compat.{n}")}


def resolve_namespace(xp: Any) -> tuple[str, Any]:
    """(kind, module) for ``xp`` given as None, a module or a name ("numpy", "torch", "cupy", "array_api_strict")."""
    if xp is None:
        return "numpy", np
    if isinstance(xp, str):
        if xp not in _KINDS:
            msg = f"xp: expected a namespace module or one of 'numpy', 'torch', 'cupy', 'array_api_strict', got {xp!r}"
            raise ValueError(msg)
        kind, name = _KINDS[xp], xp
    elif getattr(xp, "__name__", "") in _MODULES:
        kind = name = _MODULES[xp.__name__]
    elif hasattr(xp, "asarray"):
        return "array_api", xp
    else:
        msg = f"xp: expected an array namespace (module with asarray), got {xp!r}"
        raise TypeError(msg)
    return kind, np if name == "numpy" else importlib.import_module(name)


def from_host(arr: np.ndarray, kind: str, module: Any, device: Any = None) -> Any:
    """``arr`` (host NumPy, any float dtype incl. ml_dtypes.bfloat16) as an array of the chosen library."""
    is_bf16 = "bfloat16" in str(arr.dtype)
    if np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.int32)  # lengths, segment ids, block tables: what kernels take
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


def hand_over(
    arrays: Sequence[np.ndarray], *, xp: Any = None, device: Any = None, layout: TensorLayout = "bhsd"
) -> tuple[Any, ...]:
    """NumPy (B, H, S, D) arrays in ``layout``, converted to the namespace ``xp`` (module or name: numpy, torch, cupy,
    array_api_strict) on ``device``: what a reproduction snippet hands to a candidate. Integer arrays (lengths,
    segment ids, block tables, of any rank) are handed over as int32, the dtype kernels take, in their own layout."""
    kind, module = resolve_namespace(xp)
    return tuple(
        from_host(a if np.issubdtype(np.asarray(a).dtype, np.integer) else to_layout(a, layout), kind, module, device)
        for a in arrays
    )
