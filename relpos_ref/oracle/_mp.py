"""Working-precision contexts, exact scalar and nested-list conversions, and decimal output shared by the oracle."""

from __future__ import annotations

import fractions
import math

import mpmath

#: Default working precision in decimal digits.
DEFAULT_DPS = 50

_CONTEXTS: dict[int, mpmath.ctx_mp.MPContext] = {}


def context(dps: int = DEFAULT_DPS) -> mpmath.ctx_mp.MPContext:
    """Return a private mpmath context working at ``dps`` decimal digits.

    A private context (rather than the global ``mpmath.mp``) keeps the oracle's precision
    independent of whatever the caller has set globally.
    """
    if not isinstance(dps, int) or isinstance(dps, bool) or dps < 15:
        raise ValueError(f"dps must be an int >= 15, got {dps!r}")
    ctx = _CONTEXTS.get(dps)
    if ctx is None:
        ctx = mpmath.MPContext()
        ctx.dps = dps
        _CONTEXTS[dps] = ctx
    return ctx


def _num(ctx, x, name):
    """Convert one scalar input to ``mpf`` (exact for int, float and mpf inputs)."""
    if isinstance(x, bool):
        raise TypeError(f"{name} must be a real number, got bool {x!r}")
    if isinstance(x, fractions.Fraction):
        return ctx.mpf(x.numerator) / x.denominator
    if isinstance(x, (int, float, str, mpmath.mpf)):
        return ctx.mpf(x)
    if hasattr(x, "_mpf_"):
        # An mpf of another working precision (each dps has its own context): keep every digit it carries,
        # rather than the 17 that float() would.
        return ctx.mpf(x)
    # NumPy scalars and 0-d arrays: go through float(), which is exact for binary formats
    # up to 64 bits (float16, bfloat16, float32 and float64 all embed exactly in binary64).
    try:
        return ctx.mpf(float(x))
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r}") from None


def _int(x, name):
    if isinstance(x, bool) or not isinstance(x, int):
        try:
            if float(x) == int(x):
                return int(x)
        except (TypeError, ValueError, OverflowError):
            pass
        raise TypeError(f"{name} must be an integer, got {type(x).__name__} {x!r}")
    return x


def _vector(ctx, values, name):
    return [_num(ctx, v, f"{name}[{k}]") for k, v in enumerate(_flat_list(values, name))]


def _flat_list(values, name):
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (int, float)):
        return [values]
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            if len(v) != 1:
                raise ValueError(f"{name} must be 1-D (or (N, 1)), got a row of length {len(v)}")
            v = v[0]
        out.append(v)
    return out


def _int_list(values, name):
    if hasattr(values, "tolist"):
        values = values.tolist()
    return [_int(v, f"{name}[{k}]") for k, v in enumerate(values)]


def _heads(num_heads, heads):
    if heads is None:
        return list(range(num_heads))
    out = []
    for h in heads:
        h = _int(h, "heads")
        if not -num_heads <= h < num_heads:
            raise ValueError(f"heads must hold indices in [-{num_heads}, {num_heads}), got {h}")
        out.append(h % num_heads)
    return out


# ---------------------------------------------------------------------------------------------
# Nested lists of mpf
# ---------------------------------------------------------------------------------------------


def _is_mp(x):
    return hasattr(x, "_mpf_")


def _tree(ctx, x, name):
    """Nested lists (or a scalar) of ``mpf`` at ``ctx``'s precision; exact for exact inputs."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [_tree(ctx, t, name) for t in x]
    if _is_mp(x):
        return ctx.mpf(x)
    return _num(ctx, x, name)


def _exact(x):
    """Hand ``mpf`` values of any precision to the scalar functions above without loss.

    Those functions convert their inputs with :func:`_num`, which is exact for a Fraction but takes an ``mpf`` of a
    private context through ``float()`` (such an ``mpf`` is not an instance of ``mpmath.mpf``): a perturbation of
    1e-50 would vanish there. A finite ``mpf`` is a dyadic rational, so its Fraction is exact.
    """
    if isinstance(x, list):
        return [_exact(t) for t in x]
    if _is_mp(x):
        if x != x or abs(x) == math.inf:
            return float(x)
        num, den = mpmath.libmp.to_rational(x._mpf_)
        return fractions.Fraction(num, den)
    return x


def _shape(x):
    dims = []
    while isinstance(x, list):
        dims.append(len(x))
        x = x[0] if x else None
    return tuple(dims)


def _leaves(x):
    if isinstance(x, list):
        for t in x:
            yield from _leaves(t)
    else:
        yield x


def _map(f, x):
    return [_map(f, t) for t in x] if isinstance(x, list) else f(x)


# ---------------------------------------------------------------------------------------------
# Output formatting
# ---------------------------------------------------------------------------------------------


def to_decimal_string(x, digits=20, *, dps=DEFAULT_DPS):
    """Decimal string of ``x`` with ``digits`` significant digits (``inf``, ``-inf``, ``nan`` as words).

    The string parses with any IEEE-754 ``strtod``; 20 digits (more than the 17 a binary64
    needs to round-trip) keep the string's own rounding far below every tolerance used here.
    """
    ctx = context(dps)
    x = _num(ctx, x, "x")
    if ctx.isnan(x):
        return "nan"
    if ctx.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0.0"
    return ctx.nstr(x, digits, strip_zeros=False, min_fixed=-4, max_fixed=digits)
