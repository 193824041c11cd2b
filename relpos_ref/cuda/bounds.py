r"""Documented error bounds of the in-kernel bias (``bias.cuh``) against the float64 reference.

The kernel evaluates :math:`b_h(i, j)` in its accumulation precision (float32 for float16/float32 scores, float64
for float64 scores) from parameters rounded once to that precision. :func:`bias_error_bound` returns, elementwise, a
bound on :math:`|b^{\text{kernel}} - b^{\text{ref}}|` where :math:`b^{\text{ref}}` is the family's ``.bias`` in
NumPy float64 on the float64 parameters. With :math:`u` the unit roundoff (:math:`2^{-24}` float32; :math:`2^{-52}`
for float64, twice the unit roundoff because the float64 reference has rounding errors of the same size),
:math:`n = |i - j|`:

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
(``tests/test_cuda_host.py``) and the GPU tests measure the ratio error / bound and require it to be at most 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["bias_error_bound", "unit_roundoff"]

_FLOOR = {"float32": 2.0**-100, "float64": 2.0**-1000}


def unit_roundoff(precision: str) -> float:
    """:math:`u` used in the bounds: ``"float32"`` -> 2**-24, ``"float64"`` -> 2**-52 (see module docstring)."""
    if precision == "float32":
        return 2.0**-24
    if precision == "float64":
        return 2.0**-52
    msg = f"precision: expected 'float32' or 'float64', got {precision!r}"
    raise ValueError(msg)


def _host(value: Any) -> np.ndarray:
    from array_api_compat import to_device

    return np.asarray(value if isinstance(value, np.ndarray) else to_device(value, "cpu"), dtype=np.float64)


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
    from ..families import FIRE, ALiBi, KerpleLog, KerplePower, OffsetBias, Sandwich, T5Bias, TensorBias

    u = unit_roundoff(precision)
    q = np.asarray(_host(q_pos), dtype=np.int64)
    k = np.asarray(_host(k_pos), dtype=np.int64)
    n = np.abs(q[:, None] - k[None, :]).astype(np.float64)
    ref64 = family.astype(np.float64, xp=_np_ns())
    b = np.abs(np.asarray(ref64.bias(_np_ns().asarray(q), _np_ns().asarray(k)), dtype=np.float64))
    params = {key: _host(v) for key, v in ref64.parameters().items()}
    kind = type(family)
    if kind is ALiBi:
        out = 4 * u * b
    elif kind is KerplePower:
        r2 = params["r2"][:, None, None]
        out = (10 + r2 * np.log(np.maximum(n, 1.0))[None]) * u * b
    elif kind is KerpleLog:
        out = 10 * u * b
    elif kind in (T5Bias, OffsetBias):
        out = u * b
    elif kind is TensorBias:  # -inf entries (masks) stay exactly -inf: no error
        out = np.where(np.isinf(b), 0.0, u * b)
    elif kind is Sandwich:
        opts = ref64.options()
        heads, d = opts["num_heads"], opts["head_dim"]
        omega = np.array([10000.0 ** (-2.0 * kk / d) for kk in range(1, d // 2 + 1)])
        absolute = (1.0 + n[..., None] * omega).sum(axis=-1) * 2.0**-50
        factor = np.array([heads / (8.0 * h) for h in range(1, heads + 1)])[:, None, None]
        out = (5 * u + d * 2.0**-54) * b + factor * absolute[None]
    elif kind is FIRE:
        w1, b1, w2, b2 = params["w1"][:, 0], params["b1"], params["w2"], params["b2"]
        x = np.asarray(ref64.interpolant(_np_ns().asarray(q), _np_ns().asarray(k)), dtype=np.float64)
        hidden_mag = np.abs(w1)[:, None, None] * x[None] + np.abs(b1)[:, None, None]  # (W, Sq, Sk)
        mag = np.tensordot(np.abs(w2), hidden_mag, axes=1) + np.abs(b2)[:, None, None]
        out = 2 * (w1.shape[0] + 16) * u * mag
    else:
        msg = f"family: no documented bound for {kind.__name__}"
        raise TypeError(msg)
    return out + _FLOOR[precision]


def _np_ns() -> Any:
    import array_api_compat.numpy as xp

    return xp
