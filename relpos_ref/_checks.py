"""Argument validation shared by the public functions.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (right kind, wrong value or shape)
with a message that names the argument, what was expected and what was given. Checks that read array values (finite,
positive) synchronise a GPU array once; they run in constructors, never inside per-block loops.
"""

from __future__ import annotations

import importlib
import math
import numbers
import types
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


#: Plain library modules that array-api-compat wraps, by module name: ``xp=torch`` is how users write it, and the
#: plain module lacks parts of the standard (``torch.astype``, ``numpy.concat`` before NumPy 2) that the wrapper has.
_COMPAT_WRAPPED = {"numpy": "numpy", "cupy": "cupy", "torch": "torch", "dask.array": "dask.array"}


def namespace_arg(xp: Any) -> Any:
    """The ``xp`` argument of a public function: NumPy (array-api-compat) when None, the array-api-compat wrapper of a
    plain library module (``numpy``, ``torch``, ``cupy``, ``dask.array``), else checked to be a namespace."""
    if xp is None:
        return default_namespace()
    library = _COMPAT_WRAPPED.get(getattr(xp, "__name__", None)) if isinstance(xp, types.ModuleType) else None
    if library is not None:
        return compat_namespace(library)
    if isinstance(xp, type) or not all(callable(getattr(xp, a, None)) for a in ("asarray", "astype", "arange")):
        msg = (
            "xp: expected an array namespace (a module such as numpy, torch, array_api_compat.numpy or "
            f"array_api_strict), got {xp!r}"
        )
        raise TypeError(msg)
    return xp


def namespace(*arrays: Any, xp: Any = None, names: tuple[str, ...] = ()) -> Any:
    """Array namespace of ``arrays`` (``None`` entries skipped), or ``xp`` when given.

    Raises ``TypeError`` naming the arguments when they come from different libraries.
    """
    labels = names or ("array",) * len(arrays)
    pairs = [(a, n) for a, n in zip(arrays, labels, strict=False) if a is not None]
    present = [a for a, _ in pairs]
    present_names = tuple(n for _, n in pairs)
    if xp is not None:
        xp = namespace_arg(xp)
        if present:
            got = _namespace_or_raise(present, names, present_names)
            if not same_namespace(got, xp):
                msg = (
                    f"{_names(names)}: expected arrays of {_ns_name(xp)} (the namespace in use), "
                    f"got arrays of {_ns_name(got)}"
                )
                raise TypeError(msg)
        return xp
    if not present:
        return default_namespace()
    return _namespace_or_raise(present, names, present_names)


def _namespace_or_raise(arrays: list[Any], names: tuple[str, ...], present_names: tuple[str, ...]) -> Any:
    # Each array is checked under its own name (the None arguments were dropped with their names, so a list given as
    # ``mask`` is reported as ``mask``); the one-library message names every argument that could hold an array.
    for a, n in zip(arrays, present_names, strict=False):
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


#: Largest array, in bytes, that a size argument (a sequence length, a number of heads or frequencies) may ask
#: for: 8 GiB. A typo such as ``positions(1, 10**10)`` then fails at once, naming the argument, instead of
#: allocating for minutes or raising MemoryError; arrays given by the caller are not limited.
MAX_ARRAY_BYTES = 1 << 33

#: Largest number of heads, of ALiBi slopes and of Sandwich frequencies (their constants are built as Python lists).
MAX_HEADS = 1 << 16


def show_number(value: Any) -> str:
    """``repr`` of a number, shortened for integers too long to read (``10**400`` is shown as about 1.000e+400)."""
    text = repr(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and len(text) > 24:
        digits = text.lstrip("-")
        sign = "-" if text.startswith("-") else ""
        return f"about {sign}{digits[0]}.{digits[1:4]}e+{len(digits) - 1}"
    return text


def integer(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None, why: str = "") -> int:
    """A Python integer (bools rejected), optionally bounded below and above (``why`` explains the upper bound)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"{name}: expected an integer, got {value!r} of type {type(value).__name__}"
        raise TypeError(msg)
    value = int(value)
    if minimum is not None and value < minimum:
        msg = f"{name}: expected an integer >= {minimum}, got {show_number(value)}"
        raise ValueError(msg)
    if maximum is not None and value > maximum:
        msg = f"{name}: expected an integer <= {maximum}{f' ({why})' if why else ''}, got {show_number(value)}"
        raise ValueError(msg)
    return value


def size(name: str, value: Any, *, itemsize: int = 8, minimum: int = 1) -> int:
    """An integer count of array elements, at least ``minimum``, whose array of ``itemsize``-byte elements fits in
    :data:`MAX_ARRAY_BYTES`."""
    limit = MAX_ARRAY_BYTES // itemsize
    why = f"an array of that many {itemsize}-byte elements would exceed the {MAX_ARRAY_BYTES >> 30} GiB size limit"
    return integer(name, value, minimum=minimum, maximum=limit, why=why)


def result_size(names: str, shape: tuple[int, ...], itemsize: int, *, what: str = "result") -> None:
    """ValueError naming ``names`` when an array of ``shape`` and ``itemsize``-byte elements, which a call is about to
    allocate from its arguments' sizes, would exceed :data:`MAX_ARRAY_BYTES`: checked before allocating, so a
    (2**28, 2**28) offsets array from two small (or zero-stride) position arrays fails at once instead of raising
    MemoryError, or allocating for minutes."""
    nbytes = math.prod(int(n) for n in shape) * itemsize
    if nbytes > MAX_ARRAY_BYTES:
        msg = (
            f"{names}: expected sizes whose {what} fits the {MAX_ARRAY_BYTES >> 30} GiB size limit, got shape "
            f"{tuple(int(n) for n in shape)} ({itemsize}-byte elements, {nbytes / 2**30:.4g} GiB)"
        )
        raise ValueError(msg)


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
    try:
        value = float(value)
    except OverflowError:  # an integer (or Fraction) beyond the float64 range
        msg = f"{name}: expected a finite number within the float64 range (|x| < 1.8e308), got {show_number(value)}"
        raise ValueError(msg) from None
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


def is_long_double(xp: Any, dtype: Any) -> bool:
    """NumPy's long double (float128/float96 on x86): a real floating dtype that the package does not compute in.

    Every compute path, error bound and tolerance exists for float16, bfloat16, float32 and float64 only; a long
    double would be computed in float32 and labelled float128, so it is rejected instead. Where long double is
    float64 (itemsize 8, as on Windows), it is float64.
    """
    if "numpy" not in _ns_name(xp):
        return False
    import numpy as np

    try:
        d = np.dtype(dtype)
    except TypeError:
        return False
    return d.kind == "f" and d.itemsize > 8


def _long_double_message(name: str, dtype: Any) -> str:
    return (
        f"{name}: expected float16, bfloat16, float32 or float64 (long double is not supported: it would be computed "
        f"in float32), got {dtype}"
    )


def _foreign(name: str, value: Any, xp: Any) -> None:
    """TypeError when ``value`` is an array of another library than ``xp``: its dtype is then no dtype of ``xp``,
    and saying so (two libraries) is the useful message, not "expected a floating-point dtype"."""
    try:
        own = array_namespace(value)
    except TypeError:
        return
    if not same_namespace(own, xp):
        msg = (
            f"{name}: expected an array of {_ns_name(xp)} (the library of the other arguments), "
            f"got an array of {_ns_name(own)}"
        )
        raise TypeError(msg)


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
        _foreign(name, value, xp)
        msg = f"{name}: expected a real floating-point dtype, got {value.dtype}"
        raise TypeError(msg)
    if is_long_double(xp, value.dtype):
        raise TypeError(_long_double_message(name, value.dtype))
    _rank(name, value, ndim)
    return value


def integer_array(name: str, value: Any, xp: Any, *, ndim: int | None = None) -> Any:
    """An integer array (bool rejected) of the given rank."""
    if not is_array_api_obj(value):
        msg = f"{name}: expected an integer array, got {type(value).__name__}"
        raise TypeError(msg)
    _foreign(name, value, xp)
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
        _foreign(name, value, xp)
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
        msg = f"{name}: expected finite values, got NaN or infinity in {_preview(value, ~xp.isfinite(value))}"
        raise ValueError(msg)


def positive(name: str, value: Any, xp: Any, *, upper: float | None = None) -> None:
    """Values > 0 (and <= upper when given); NaN fails too."""
    ok = value > 0
    if upper is not None:
        ok = ok & (value <= upper)
    if not bool(xp.all(ok)):
        top = "" if upper is None else (repr(upper) if len(repr(upper)) <= 8 else f"{upper:.3g}")
        rng = "> 0" if upper is None else f"in (0, {top}]"
        msg = f"{name}: expected values {rng}, got {_preview(value, ~ok)}"
        raise ValueError(msg)


#: Arrays up to this many entries are printed whole in a message; larger ones by a count and the first bad entry.
_PREVIEW_ENTRIES = 64


def _preview(value: Any, bad: Any = None) -> str:
    """The values of a small array on one line; for a larger one, how many entries are ``bad`` and the first one.

    A (1, 4, 64, 64) array printed by NumPy takes some 50 lines even summarised; the count and the index of the
    first offending entry say more in one.
    """
    try:
        import numpy as np

        arr = np.asarray(host_numpy(value), dtype=float)
        flags = None if bad is None else np.asarray(host_numpy(bad), dtype=bool)
    except Exception:
        return f"array of shape {tuple(value.shape)}"
    if arr.size <= _PREVIEW_ENTRIES or flags is None or not flags.any():
        with np.printoptions(threshold=8, precision=6, edgeitems=2):
            return " ".join(str(arr).split("\n")) if arr.ndim > 1 else str(arr)
    flags = np.broadcast_to(flags, arr.shape)
    first = tuple(int(i) for i in np.argwhere(flags)[0])
    return (
        f"{int(flags.sum())} of {arr.size} entries of an array of shape {arr.shape}, the first at index {first}: "
        f"{float(arr[first])!r}"
    )


def as_param(name: str, value: Any, xp: Any, dtype: Any, device: Any) -> Any:
    """Turn a parameter given as an array, a Python number or a sequence into a floating array.

    Arrays keep their namespace and dtype (integer and boolean arrays are rejected: a silent cast of an integer table
    would hide a caller's mistake); Python numbers and sequences become arrays of ``xp`` (NumPy by default) with
    ``dtype`` (float64 by default). Booleans inside a sequence are rejected as a boolean array is. A conversion to
    ``dtype`` that turns a nonzero value into 0 or a finite one into infinity is rejected, showing the value given.
    """
    if is_array_api_obj(value):
        ns = namespace(value, xp=xp, names=(name,))
        float_array(name, value, ns)
        if dtype is not None and value.dtype != float_dtype("dtype", dtype, ns):
            with quiet_overflow():  # an overflow to inf is reported below, with the value given
                converted = ns.astype(value, dtype)
            _representable(name, value, converted, ns)
            value = converted
        return value
    if isinstance(value, bool | str | bytes) or value is None or _holds_bool(value):
        msg = f"{name}: expected a floating-point array or real numbers, got {value!r}"
        raise TypeError(msg)
    ns = namespace_arg(xp)
    if dtype is not None:
        float_dtype("dtype", dtype, ns)
    device_arg(ns, device)
    target = dtype if dtype is not None else ns.float64
    try:
        exact = ns.asarray(value, dtype=ns.float64, device=device)
    except OverflowError:
        msg = f"{name}: expected real numbers within the float64 range (|x| < 1.8e308), got {_short_repr(value)}"
        raise ValueError(msg) from None
    except (TypeError, ValueError) as exc:
        msg = f"{name}: expected a floating-point array or real numbers, got {_short_repr(value)}"
        raise TypeError(msg) from exc
    if target == ns.float64:
        return exact
    with quiet_overflow():
        converted = ns.astype(exact, target)
    _representable(name, exact, converted, ns, given=value)
    return converted


def _holds_bool(value: Any) -> bool:
    """A bool (Python or NumPy) anywhere in a nested list/tuple: ``[1.0, True]`` would otherwise become [1.0, 1.0]."""
    import numpy as np

    if isinstance(value, bool | np.bool_):
        return True
    if isinstance(value, list | tuple):
        return any(_holds_bool(v) for v in value)
    return False


def _short_repr(value: Any) -> str:
    text = show_number(value) if isinstance(value, numbers.Number) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _representable(name: str, before: Any, after: Any, xp: Any, *, given: Any = None) -> None:
    """Reject a dtype conversion that flushed nonzero values to 0 or overflowed finite ones to infinity.

    The message shows the value as given (``given``, else ``before``), not the converted one: "got [0.]" for a slope of
    1e-10 in float16 would blame the caller for a zero they never wrote.
    """
    lost = ((after == 0) & (before != 0)) | (~xp.isfinite(after) & xp.isfinite(before))
    if bool(xp.any(lost)):
        shown = _short_repr(given) if given is not None else _preview(before, lost)
        msg = (
            f"{name}: expected values that {after.dtype} represents (nonzero and finite after rounding), got "
            f"{shown}, which rounds to {_preview(after, lost)} in {after.dtype}"
        )
        raise ValueError(msg)


def device_arg(xp: Any, device: Any) -> Any:
    """The ``device`` argument: None, or a device that ``xp`` can create arrays on (checked with an empty array)."""
    if device is None:
        return None
    try:
        xp.empty((0,), device=device)
    except Exception as exc:  # each library raises its own type (ValueError, TypeError, RuntimeError, ...)
        msg = f"device: expected a device of {_ns_name(xp)} (or None), got {device!r} ({exc})"
        raise ValueError(msg) from None
    return device


def float_dtype(name: str, dtype: Any, xp: Any) -> Any:
    """A real floating dtype of ``xp`` (the ``dtype=`` argument of constructors and conversions); not long double."""
    if not is_float_dtype(xp, dtype):
        msg = f"{name}: expected a real floating-point dtype, got {dtype!r}"
        raise TypeError(msg)
    if is_long_double(xp, dtype):
        raise TypeError(_long_double_message(name, dtype))
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


def quiet_overflow() -> Any:
    """A context in which NumPy does not warn about overflow and invalid results (thread-local in NumPy 2).

    The numerics here let an overflow happen, detect it and recompute or report it; the warning of the detected case
    is noise (and an error under ``-W error``). Other libraries do not warn.
    """
    import numpy as np

    return np.errstate(over="ignore", invalid="ignore")


def abs_max_finite(name: str, arr: Any, xp: Any) -> float:
    """max |arr| as a Python float, with the finiteness check's error when it is not finite (NaN propagates)."""
    top = float(xp.max(xp.abs(arr)))
    if not math.isfinite(top):
        finite(name, arr, xp)
    return top


def max_exponent(xp: Any, dtype: Any) -> int:
    """e with the largest finite number of ``dtype`` in [2^(e-1), 2^e): 1024 for float64, 128 for float32."""
    return math.frexp(float(xp.finfo(dtype).max))[1]


def log2_ceil(x: float) -> float:
    """An integer e with x < 2^e (-inf for x = 0)."""
    return math.frexp(x)[1] if x > 0 else -math.inf


def precision(xp: Any, dtype: Any) -> int:
    """Significand bits of ``dtype``: 53 for float64, 24 for float32."""
    return 1 - int(math.log2(float(xp.finfo(dtype).eps)))
