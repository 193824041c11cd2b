"""Argument validation shared by the public functions.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (right kind, wrong value or shape)
with a message that names the argument, what was expected and what was given. Checks that read array values (finite,
positive) synchronise a GPU array once; they run in constructors, never inside per-block loops.
"""

from __future__ import annotations

import importlib
import math
import numbers
import warnings
from typing import Any

# The only module that imports array-api-compat: the rest of the package takes these names from here (F401).
from array_api_compat import array_namespace, is_array_api_obj, is_cupy_array, to_device  # noqa: F401
from array_api_compat import device as array_device  # noqa: F401

from ._host import host_numpy

__all__: list[str] = []


def compat_namespace(library: str) -> Any:
    """The array-api-compat namespace of ``library`` ("numpy", "cupy", "torch", ...), imported on first use."""
    return importlib.import_module(f"array_api_compat.{library}")


def default_namespace() -> Any:
    """The namespace used when nothing else decides one: NumPy through array-api-compat."""
    return compat_namespace("numpy")


def namespace_arg(xp: Any) -> Any:
    """The ``xp`` argument of a public function: NumPy (array-api-compat) when None, else checked to be a namespace."""
    if xp is None:
        return default_namespace()
    if isinstance(xp, type) or not all(callable(getattr(xp, a, None)) for a in ("asarray", "astype", "arange")):
        msg = (
            f"xp: expected an array namespace (a module such as array_api_compat.numpy or array_api_strict), got {xp!r}"
        )
        raise TypeError(msg)
    return xp


def namespace(*arrays: Any, xp: Any = None, names: tuple[str, ...] = ()) -> Any:
    """Array namespace of ``arrays`` (``None`` entries skipped), or ``xp`` when given.

    Raises ``TypeError`` naming the arguments when they come from different libraries.
    """
    present = [a for a in arrays if a is not None]
    if xp is not None:
        xp = namespace_arg(xp)
        if present:
            got = _namespace_or_raise(present, names)
            if not same_namespace(got, xp):
                msg = (
                    f"{_names(names)}: expected arrays of {_ns_name(xp)} (the namespace in use), "
                    f"got arrays of {_ns_name(got)}"
                )
                raise TypeError(msg)
        return xp
    if not present:
        return default_namespace()
    return _namespace_or_raise(present, names)


def _namespace_or_raise(arrays: list[Any], names: tuple[str, ...]) -> Any:
    for a, n in zip(arrays, names or ("array",) * len(arrays), strict=False):
        if not is_array_api_obj(a):
            msg = f"{n}: expected an array (NumPy, CuPy, array_api_strict, ...), got {type(a).__name__}"
            raise TypeError(msg)
    try:
        return array_namespace(*arrays)
    except TypeError as exc:
        libs = sorted({type(a).__module__.split(".")[0] for a in arrays})
        msg = f"{_names(names)}: expected arrays from one array library, got arrays from {libs}"
        raise TypeError(msg) from exc


def _names(names: tuple[str, ...]) -> str:
    return ", ".join(names) if names else "arrays"


def _ns_name(xp: Any) -> str:
    """Library name of a namespace; the array-api-compat wrapper of a library counts as that library."""
    name = getattr(xp, "__name__", repr(xp))
    return name.removeprefix("array_api_compat.")


def same_namespace(a: Any, b: Any) -> bool:
    return _ns_name(a) == _ns_name(b)


def option(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Check a string option against its allowed values."""
    if not isinstance(value, str) or value not in choices:
        msg = f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}"
        raise ValueError(msg)
    return value


def integer(name: str, value: Any, *, minimum: int | None = None) -> int:
    """A Python integer (bools rejected), optionally bounded below."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"{name}: expected an integer, got {value!r} of type {type(value).__name__}"
        raise TypeError(msg)
    value = int(value)
    if minimum is not None and value < minimum:
        msg = f"{name}: expected an integer >= {minimum}, got {value}"
        raise ValueError(msg)
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        msg = f"{name}: expected True or False, got {value!r}"
        raise TypeError(msg)
    return value


def real_scalar(
    name: str,
    value: Any,
    *,
    positive: bool = False,
    nonnegative: bool = False,
) -> float:
    """A finite Python real number (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name}: expected a real number, got {value!r} of type {type(value).__name__}"
        raise TypeError(msg)
    value = float(value)
    if not math.isfinite(value):
        msg = f"{name}: expected a finite number, got {value}"
        raise ValueError(msg)
    if positive and not value > 0:
        msg = f"{name}: expected a number > 0, got {value}"
        raise ValueError(msg)
    if nonnegative and not value >= 0:
        msg = f"{name}: expected a number >= 0, got {value}"
        raise ValueError(msg)
    return value


def is_float_dtype(xp: Any, dtype: Any) -> bool:
    try:
        # A dtype of another library (array_api_strict's against NumPy) makes isdtype compare across libraries,
        # which warns before it fails; the failure is the answer, the warning is noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(xp.isdtype(dtype, "real floating"))
    except (TypeError, ValueError):
        # ml_dtypes.bfloat16 and other extension dtypes are not known to isdtype; NumPy marks them floating.
        if "numpy" not in _ns_name(xp):
            return False
        if isinstance(dtype, type) and getattr(dtype, "__name__", "") == "bfloat16":
            import numpy as np

            dtype = np.dtype(dtype)  # the scalar type ml_dtypes.bfloat16 -> its NumPy dtype
        kind = getattr(dtype, "kind", None)
        return kind == "V" and "bfloat16" in str(dtype)


def float_array(
    name: str,
    value: Any,
    xp: Any,
    *,
    ndim: int | tuple[int, ...] | None = None,
) -> Any:
    """A real-floating array of the given rank(s), no copy made."""
    if not is_array_api_obj(value):
        msg = f"{name}: expected a floating-point array, got {type(value).__name__}"
        raise TypeError(msg)
    if not is_float_dtype(xp, value.dtype):
        msg = f"{name}: expected a real floating-point dtype, got {value.dtype}"
        raise TypeError(msg)
    _rank(name, value, ndim)
    return value


def integer_array(name: str, value: Any, xp: Any, *, ndim: int | None = None) -> Any:
    """An integer array (bool rejected) of the given rank."""
    if not is_array_api_obj(value):
        msg = f"{name}: expected an integer array, got {type(value).__name__}"
        raise TypeError(msg)
    if not xp.isdtype(value.dtype, "integral"):
        msg = f"{name}: expected an integer dtype, got {value.dtype}"
        raise TypeError(msg)
    _rank(name, value, ndim)
    return value


def bool_array(name: str, value: Any, xp: Any) -> Any:
    if not is_array_api_obj(value):
        msg = f"{name}: expected a boolean array, got {type(value).__name__}"
        raise TypeError(msg)
    if value.dtype != xp.bool:
        msg = f"{name}: expected a boolean dtype, got {value.dtype}"
        raise TypeError(msg)
    return value


def _rank(name: str, value: Any, ndim: int | tuple[int, ...] | None) -> None:
    if ndim is None:
        return
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if value.ndim not in allowed:
        want = " or ".join(str(n) for n in allowed)
        msg = f"{name}: expected a {want}-dimensional array, got shape {tuple(value.shape)}"
        raise ValueError(msg)


def nonempty(name: str, value: Any) -> None:
    if any(s == 0 for s in value.shape):
        msg = f"{name}: expected a non-empty array, got shape {tuple(value.shape)}"
        raise ValueError(msg)


def finite(name: str, value: Any, xp: Any) -> None:
    if not bool(xp.all(xp.isfinite(value))):
        msg = f"{name}: expected finite values, got NaN or infinity in {_preview(value)}"
        raise ValueError(msg)


def positive(name: str, value: Any, xp: Any, *, upper: float | None = None) -> None:
    """Values > 0 (and <= upper when given); NaN fails too."""
    ok = value > 0
    if upper is not None:
        ok = ok & (value <= upper)
    if not bool(xp.all(ok)):
        rng = "> 0" if upper is None else f"in (0, {upper}]"
        msg = f"{name}: expected values {rng}, got {_preview(value)}"
        raise ValueError(msg)


def _preview(value: Any) -> str:
    try:
        import numpy as np

        arr = np.asarray(host_numpy(value), dtype=float)
    except Exception:
        return f"array of shape {tuple(value.shape)}"
    with np.printoptions(threshold=8, precision=6):
        return str(arr)


def as_param(name: str, value: Any, xp: Any, dtype: Any, device: Any) -> Any:
    """Turn a parameter given as an array, a Python number or a sequence into a floating array.

    Arrays keep their namespace and dtype (integer and boolean arrays are rejected: a silent cast of an integer table
    would hide a caller's mistake); Python numbers and sequences become arrays of ``xp`` (NumPy by default) with
    ``dtype`` (float64 by default).
    """
    if is_array_api_obj(value):
        ns = namespace(value, xp=xp, names=(name,))
        float_array(name, value, ns)
        if dtype is not None and value.dtype != float_dtype("dtype", dtype, ns):
            value = ns.astype(value, dtype)
        return value
    if isinstance(value, bool | str | bytes) or value is None:
        msg = f"{name}: expected a floating-point array or real numbers, got {value!r}"
        raise TypeError(msg)
    ns = namespace_arg(xp)
    if dtype is not None:
        float_dtype("dtype", dtype, ns)
    target = dtype if dtype is not None else ns.float64
    try:
        return ns.asarray(value, dtype=target, device=device)
    except (TypeError, ValueError) as exc:
        msg = f"{name}: expected a floating-point array or real numbers, got {value!r}"
        raise TypeError(msg) from exc


def float_dtype(name: str, dtype: Any, xp: Any) -> Any:
    """A real floating dtype of ``xp`` (the ``dtype=`` argument of constructors and conversions)."""
    if not is_float_dtype(xp, dtype):
        msg = f"{name}: expected a real floating-point dtype, got {dtype!r}"
        raise TypeError(msg)
    return dtype


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """Dtype the arithmetic runs in: the input dtype, but at least float32.

    float16 (and bfloat16) results are computed in float32 and rounded once at the end, so the reference is as close
    to the exact value as the output dtype allows.
    """
    if dtype == xp.float64 or dtype == xp.float32:
        return dtype
    return xp.float32


def broadcastable(name: str, value: Any, shape: tuple[int, ...]) -> None:
    """Check that ``value`` broadcasts to ``shape`` without enlarging it."""
    ok = value.ndim <= len(shape) and all(
        s in (1, t) for s, t in zip(reversed(tuple(value.shape)), reversed(shape), strict=False)
    )
    if not ok:
        msg = f"{name}: expected a shape broadcastable to {shape}, got {tuple(value.shape)}"
        raise ValueError(msg)
