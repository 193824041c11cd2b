r"""Documented error bounds of the in-kernel bias (``bias.cuh``) against the float64 reference.

The kernel evaluates :math:`b_h(i, j)` in its accumulation precision (float32 for float16/float32 scores, float64
for float64 scores) from parameters rounded once to that precision. :func:`bias_error_bound` returns, elementwise, a
bound on :math:`|b^{\text{kernel}} - b^{\text{ref}}|` where :math:`b^{\text{ref}}` is the family's ``.bias`` in
NumPy float64 on the float64 parameters. With :math:`u` = :func:`kernel_roundoff` (the unit roundoff
:math:`2^{-24}` for float32; :math:`2^{-52}` for float64, twice the unit roundoff because the float64 reference has
rounding errors of the same size), :math:`n = |i - j|`:

=================  ===============================================================================================
family             bound
=================  ===============================================================================================
ALiBi              :math:`4u\,|b|` (slope rounding, ``n`` exact below :math:`2^{24}`, one product)
KERPLE power       :math:`(10 + r_2 \ln \max(n, 1))\,u\,|b|`: rounding :math:`r_2` by :math:`u` changes
                   :math:`n^{r_2}` by a factor :math:`n^{r_2 u}`, i.e. :math:`r_2 u \ln n` relative; ``powf`` is
                   within 4 ulp (CUDA Math API), plus the rounding of :math:`r_1` and of the product
KERPLE log         :math:`10u\,|b|`: a relative error :math:`\delta` of the argument :math:`x = r_2 n` changes
                   :math:`\log(1+x)` by :math:`\delta x/(1+x) \le \delta \log(1+x)` (since
                   :math:`\log(1+x) \ge x/(1+x)`), so it passes through unamplified; plus ``log1pf`` (1 ulp),
                   the rounding of :math:`r_1` and the product
T5, OffsetBias     :math:`u\,|b|`: a table lookup (the bucket is exact), only the table entry is rounded
TensorBias         :math:`u\,|b|`
Sandwich           :math:`(5u + 2^{-54} d)\,|b| + \frac{H}{8h}\, 2^{-50} \sum_k (1 + n\,\omega_k)`: the profile
                   is computed in float64 in both (the argument :math:`n\omega_k/2` carries about
                   :math:`n \omega_k 2^{-53}` of absolute error from rounding :math:`\omega_k`, each ``sin`` a few
                   ulp, the sum of d/2 terms :math:`(d/2) 2^{-53}` relative), then rounded to the kernel precision,
                   times the rounded head factor
FIRE               :math:`2 (W + 16)\,u\,\big(|b_{2,h}| + \sum_k |w_{2,hk}| (|w_{1,k}|\,x + |b_{1,k}|)\big)`: the input
                   :math:`x` is within :math:`\approx 12u` relative (two ``log1p``, roundings of :math:`c, L,
                   \varepsilon`, one division); ReLU is 1-Lipschitz; the hidden and output sums are dot products
                   of length :math:`W` (error :math:`\le W u \sum |\cdot|`, Higham, *Accuracy and Stability of
                   Numerical Algorithms*, 2nd ed., eq. 3.5); the factor 2 covers second-order terms and the
                   ulps of ``log1pf``
=================  ===============================================================================================

All bounds also get an absolute floor, :math:`2^{-100}` (float32) or :math:`2^{-1000}` (float64), which covers
parameters and intermediate products below the normal range (flushed to zero or made subnormal when rounded).
They are first-order forward error bounds, written to be tight within a small factor; the host check
(``tests/cuda/test_host.py``) and the GPU tests measure the ratio error / bound and require it to be at most 1.

**Softcap.** With ``softcap=c`` the kernel computes the capped score as ``fma(c, tanh((s * alpha) * inv_c), bb)``
(``bias.cuh``, ``softcap_logit``; ``inv_c`` = 1/c and c each rounded once from float64, ``bb`` = bias * beta);
a -inf score stays -inf (a masked key).
:func:`softcap_error_bound` bounds the error of the capped term :math:`c \tanh(\alpha s / c)` by
:math:`(5 + 2k)\,u\,c\,|\tanh(\alpha s / c)|` with :math:`k` = :data:`TANH_ULP` the maximum ulp error of
``tanhf``/``tanh``: the argument :math:`y = \alpha s / c` is within :math:`3u` relative (the product
:math:`s\alpha`, the rounding of :math:`1/c`, the product by it), which moves :math:`\tanh y` by at most
:math:`3u\,|\tanh y|` because :math:`y\,\tanh'(y) = y\,\mathrm{sech}^2 y \le \tanh y` (the derivative of
:math:`c\tanh(x/c)` is at most 1); ``tanh`` adds :math:`k` ulp, at most :math:`2ku\,|\tanh y|`; rounding
:math:`c` adds :math:`u`. The fma's final rounding and the product ``bias * beta`` (:math:`u|z| + u\beta|b|`)
are the bias term's :math:`3u\beta|b|` of the check plus :math:`u` of the capped term, counted in the 5.
:data:`TANH_ULP` is 2 for both precisions: the CUDA C++ Programming Guide, appendix "Mathematical Functions",
tables "Single-Precision Mathematical Standard Library Functions with Maximum ULP Error" (``tanhf(x)``: 2, full
range) and the double-precision table (``tanh(x)``: 2, full range). That figure is quoted from the guide as
recalled, not re-read here; the guide says its bounds come from extensive but not exhaustive tests. The CPU
emulation uses glibc's ``tanhf``, also within 2 ulp (glibc manual, "Errors in Math Functions").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .._host import host_numpy
from ..bounds.model import unit_roundoff as _unit_roundoff
from ..families import FAMILIES

__all__ = ["TANH_ULP", "bias_error_bound", "kernel_roundoff", "softcap_error_bound"]

#: Maximum ulp error of CUDA's ``tanhf`` (float32) and ``tanh`` (float64), from the CUDA C++ Programming Guide's
#: tables of mathematical functions (see the module docstring).
TANH_ULP = {"float32": 2, "float64": 2}

_FLOOR = {"float32": 2.0**-100, "float64": 2.0**-1000}


def kernel_roundoff(precision: str) -> float:
    """:math:`u` of the bounds above: ``"float32"`` -> 2**-24, ``"float64"`` -> 2**-52 (see module docstring).

    Not the unit roundoff :math:`2^{-p}` of :func:`relpos_ref.bounds.unit_roundoff` in float64, where it is twice it.
    """
    if precision == "float32":
        return _unit_roundoff("float32")  # 2**-24, the unit roundoff of the kernel's float32 arithmetic
    if precision == "float64":
        # Twice the unit roundoff 2**-53: the float64 reference rounds as much as the float64 kernel does.
        return 2 * _unit_roundoff("float64")
    msg = f"precision: expected 'float32' or 'float64', got {precision!r}"
    raise ValueError(msg)


def softcap_error_bound(scores: Any, alpha: float, softcap: float, precision: str) -> np.ndarray:
    """Elementwise bound, float64 NumPy of the shape of ``scores``, on the error of the kernel's capped score
    against :math:`c \tanh(\alpha s / c)` in exact arithmetic (see the module docstring).

    Parameters
    ----------
    scores : array
        The raw scores :math:`s` as the kernel reads them (float16 values are exact in float32).
    alpha : float
        The scale :math:`\tau` (``alpha`` of the kernel in both placements).
    softcap : float
        :math:`c > 0`.
    precision : {"float32", "float64"}
        The kernel's accumulation precision.
    """
    u = kernel_roundoff(precision)
    s = np.asarray(host_numpy(scores), dtype=np.float64)
    capped = softcap * np.abs(np.tanh(alpha * s / softcap))
    return (5 + 2 * TANH_ULP[precision]) * u * capped + _FLOOR[precision]


def bias_error_bound(family: Any, q_pos: Any, k_pos: Any, precision: str) -> np.ndarray:
    """Elementwise bound (H, Sq, Sk), float64 NumPy, on |kernel bias - float64 reference bias|.

    Parameters
    ----------
    family : BiasFamily
    q_pos, k_pos : 1-D integer arrays
        Absolute positions.
    precision : {"float32", "float64"}
        The kernel's accumulation precision.
    """
    u = kernel_roundoff(precision)
    q = np.asarray(host_numpy(q_pos), dtype=np.int64)
    k = np.asarray(host_numpy(k_pos), dtype=np.int64)
    n = np.abs(q[:, None] - k[None, :]).astype(np.float64)
    ref64 = family.astype(np.float64, xp=_np_ns())
    b = np.abs(np.asarray(ref64.bias(_np_ns().asarray(q), _np_ns().asarray(k)), dtype=np.float64))
    params = {key: np.asarray(host_numpy(v), dtype=np.float64) for key, v in ref64.parameters().items()}
    name = getattr(type(family), "name", None)
    # Only the registered class itself: a subclass may change the arithmetic the bound was derived for.
    rule = _BOUNDS.get(name) if FAMILIES.get(name) is type(family) else None
    if rule is None:
        msg = f"family: no documented bound for {type(family).__name__}"
        raise TypeError(msg)
    out = rule(_Inputs(ref64, params, q, k, n, b, u))
    return out + _FLOOR[precision]


class _Inputs(NamedTuple):
    """What the per-family rules read."""

    ref64: Any  # the family with float64 NumPy parameters
    params: dict[str, np.ndarray]  # its parameters, host float64
    q: np.ndarray  # query positions, int64
    k: np.ndarray  # key positions, int64
    n: np.ndarray  # |i - j|, float64 (Sq, Sk)
    b: np.ndarray  # |reference bias|, float64 (H, Sq, Sk)
    u: float  # kernel_roundoff(precision)


def _kerple_power(a: _Inputs) -> np.ndarray:
    r2 = a.params["r2"][:, None, None]
    return (10 + r2 * np.log(np.maximum(a.n, 1.0))[None]) * a.u * a.b


def _sandwich(a: _Inputs) -> np.ndarray:
    opts = a.ref64.options()
    heads, d = opts["num_heads"], opts["head_dim"]
    omega = np.array([10000.0 ** (-2.0 * kk / d) for kk in range(1, d // 2 + 1)])
    absolute = (1.0 + a.n[..., None] * omega).sum(axis=-1) * 2.0**-50
    factor = np.array([heads / (8.0 * h) for h in range(1, heads + 1)])[:, None, None]
    return (5 * a.u + d * 2.0**-54) * a.b + factor * absolute[None]


def _fire(a: _Inputs) -> np.ndarray:
    w1, b1, w2, b2 = a.params["w1"][:, 0], a.params["b1"], a.params["w2"], a.params["b2"]
    x = np.asarray(a.ref64.interpolant(_np_ns().asarray(a.q), _np_ns().asarray(a.k)), dtype=np.float64)
    hidden_mag = np.abs(w1)[:, None, None] * x[None] + np.abs(b1)[:, None, None]  # (W, Sq, Sk)
    mag = np.tensordot(np.abs(w2), hidden_mag, axes=1) + np.abs(b2)[:, None, None]
    return 2 * (w1.shape[0] + 16) * a.u * mag


#: The bound of each family before the floor, by registry name (``family.name``).
_BOUNDS: dict[str, Callable[[_Inputs], np.ndarray]] = {
    "alibi": lambda a: 4 * a.u * a.b,
    "kerple_power": _kerple_power,
    "kerple_log": lambda a: 10 * a.u * a.b,
    "t5": lambda a: a.u * a.b,
    "offset": lambda a: a.u * a.b,
    "tensor": lambda a: np.where(np.isinf(a.b), 0.0, a.u * a.b),  # -inf entries (masks) stay exactly -inf: no error
    "sandwich": _sandwich,
    "fire": _fire,
}


def _np_ns() -> Any:
    import array_api_compat.numpy as xp

    return xp
