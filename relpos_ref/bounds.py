r"""Documented error bounds of every family, of the biased softmax and of attention, as code.

``spec/tolerances.md`` derives these bounds in prose; this module is the single source of the numbers, read by the
tests (``tests/test_error_bounds.py``), by the golden-vector generator (``spec/vectors/generate.py``, which stores
per-case tolerances) and by ``relpos-ref verify`` (:func:`oracle_table`). ``python -m relpos_ref.bounds`` measures
the implementation against the mpmath oracle and prints the table of measured error versus bound.

Model
-----
Every bound is a first-order rounding-error analysis in the standard model
:math:`\mathrm{fl}(a \circ b) = (a \circ b)(1 + \delta)`, :math:`|\delta| \le u`, with :math:`u = 2^{-p}` the unit
roundoff of the *compute* dtype (float64 for float64 data, float32 for float32, float16 and bfloat16 data). Library
functions (exp, log, log1p, sin, pow) are assumed accurate to :data:`LIBM_ULP` units in the last place of the
correctly rounded result, i.e. a relative error at most :math:`(e + \tfrac12)\cdot 2u`. A sum of ``n`` terms computed
by any tree of additions of depth ``d`` has error at most :math:`\gamma_d \sum |x_i|`, :math:`\gamma_d = d u/(1 - d
u)`; NumPy's pairwise summation has the depth of :func:`pairwise_depth`, matrix products (BLAS, cuBLAS) and unknown
reductions are charged the worst case ``d = n`` (products included). float16 and bfloat16 results are computed in
float32 and rounded once, which adds :math:`u_{out}(|v| + E_{32})` plus half the smallest subnormal. The bounds are
multiplied by :data:`SLACK` to cover the neglected second-order terms (all of order :math:`n u \cdot E` with
:math:`n u < 10^{-3}` in every case covered).

All bounds take the *exact* inputs (parameters as stored in the dtype under test, positions as integers) and return
elementwise absolute bounds as float64 NumPy arrays. They hold only for results inside the finite range of the output
dtype; overflow (e.g. ALiBi in float16 beyond :math:`|b| = 65504`) is a documented hazard, not an error covered here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import oracle

__all__ = [
    "DTYPES",
    "LIBM_ULP",
    "SLACK",
    "alibi_bound",
    "alibi_slopes_bound",
    "attention_bound",
    "backend_name",
    "fire_bound",
    "kerple_log_bound",
    "kerple_power_bound",
    "oracle_table",
    "pairwise_depth",
    "sandwich_bound",
    "softmax_bound",
    "unit_roundoff",
]

#: Floating formats: (precision p in bits including the hidden bit, minimum normal exponent, maximum finite value).
FORMATS: dict[str, tuple[int, int, float]] = {
    "float64": (53, -1022, float(np.finfo(np.float64).max)),
    "float32": (24, -126, float(np.finfo(np.float32).max)),
    "float16": (11, -14, 65504.0),
    "bfloat16": (8, -126, float.fromhex("0x1.fep127")),
}
DTYPES = tuple(FORMATS)

#: Safety factor on first-order bounds (second-order terms are below 0.1 % of the bound where n u < 1e-3).
SLACK = 1.001

#: Maximum error of the library functions in ulps of the correctly rounded result, per backend and compute dtype.
#: NumPy: the limits NumPy's own accuracy tests enforce (``numpy/_core/tests/data/umath-validation-set-*.csv``:
#: exp, log, log1p, sin, cos; float32 3, 4, 2, 2, 2 ulp, float64 1 ulp); NumPy has no validation set for ``power``,
#: glibc documents pow within 1 ulp (float64), and 2 ulp is assumed for float32 (0.97 ulp measured on 20000 integer
#: bases, exponents in [0.01, 2]). CUDA (CuPy): the "maximum ulp error" tables of the CUDA C++ Programming Guide,
#: mathematical-functions appendix (single: expf 2, logf 1, log1pf 1, sinf 2, powf 4; double: exp 1, log 1, log1p 1,
#: sin 2, pow 2); they are checked by running this module on a GPU, not assumed blindly. "portable" is the
#: maximum of the two and is what the golden vectors' tolerances use.
LIBM_ULP: dict[str, dict[str, dict[str, float]]] = {
    "numpy": {
        "float64": {"exp": 1, "log": 1, "log1p": 1, "sin": 1, "pow": 1},
        "float32": {"exp": 3, "log": 4, "log1p": 2, "sin": 2, "pow": 2},
    },
    "cuda": {
        "float64": {"exp": 1, "log": 1, "log1p": 1, "sin": 2, "pow": 2},
        "float32": {"exp": 2, "log": 1, "log1p": 1, "sin": 2, "pow": 4},
    },
}
LIBM_ULP["portable"] = {
    cd: {fn: max(LIBM_ULP[b][cd][fn] for b in ("numpy", "cuda")) for fn in LIBM_ULP["numpy"][cd]}
    for cd in ("float64", "float32")
}

#: Error of the float64 ``pow`` of the host Python (glibc), used where constants are computed once on the host
#: (ALiBi slopes, Sandwich frequencies) whatever the backend.
HOST_POW_ULP = 1.0

_LN_10000 = math.log(10000.0)


# ---------------------------------------------------------------------------------------------------------------------
# Formats and elementary quantities
# ---------------------------------------------------------------------------------------------------------------------


def _check_dtype(dtype: str) -> str:
    if dtype not in FORMATS:
        msg = f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}"
        raise ValueError(msg)
    return dtype


def unit_roundoff(dtype: str) -> float:
    """:math:`u = 2^{-p}` of a format name."""
    return 2.0 ** -FORMATS[_check_dtype(dtype)][0]


def compute_dtype(dtype: str) -> str:
    """The dtype the library computes in for data of ``dtype`` (float16 and bfloat16 go through float32)."""
    return "float64" if _check_dtype(dtype) == "float64" else "float32"


def smallest_subnormal(dtype: str) -> float:
    p, emin, _ = FORMATS[_check_dtype(dtype)]
    return 2.0 ** (emin - p + 1)


def smallest_normal(dtype: str) -> float:
    return 2.0 ** FORMATS[_check_dtype(dtype)][1]


def max_finite(dtype: str) -> float:
    return FORMATS[_check_dtype(dtype)][2]


def ulp(x: Any, dtype: str) -> np.ndarray:
    """Spacing of ``dtype`` at ``|x|`` (the ulp of the binade containing x; subnormal spacing below the normals)."""
    p, emin, _ = FORMATS[_check_dtype(dtype)]
    ax = np.abs(np.asarray(x, dtype=np.float64))
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(ax > 0, ax, 1.0)))
    e = np.maximum(e, emin)
    return np.ldexp(1.0, (e - p + 1).astype(np.int64))


def representable(x: float, dtype: str) -> bool:
    """True when the binary64 value ``x`` is exactly a finite value of ``dtype`` (exact integer arithmetic)."""
    p, emin, top = FORMATS[_check_dtype(dtype)]
    if not math.isfinite(x) or abs(x) > top:
        return False
    if x == 0:
        return True
    num, den = abs(x).as_integer_ratio()  # den is a power of two
    # x = num / den with num odd (or den == 1): needs at most p significant bits and no bits below 2**(emin - p + 1).
    while num % 2 == 0 and num > 0:
        num //= 2
        den *= 2
    exp_lsb = -(den.bit_length() - 1)  # weight of the lowest set bit
    return num.bit_length() <= p and exp_lsb >= emin - p + 1


def libm_rel(fn: str, cdtype: str, backend: str = "portable") -> float:
    """Relative error bound of one library-function evaluation: :math:`(e + 1/2)\\,2u`."""
    table = LIBM_ULP.get(backend, LIBM_ULP["portable"])
    return (table[cdtype][fn] + 0.5) * 2.0 * unit_roundoff(cdtype)


def gamma(n: Any, u: float) -> Any:
    """:math:`\\gamma_n = n u / (1 - n u)`."""
    n = np.asarray(n, dtype=np.float64)
    return n * u / (1.0 - n * u)


def pairwise_depth(n: int) -> int:
    """Rounding depth of NumPy's pairwise summation of ``n`` contiguous terms (``pairwise_sum`` in NumPy's loops).

    Fewer than 8 terms are added in order; up to 128 terms go to 8 interleaved accumulators combined by a 3-level
    tree, the ``n % 8`` leftovers being added in order; longer runs are split in halves (a multiple of 8) and added.
    """
    if n <= 1:
        return 0
    if n < 8:
        return n - 1
    if n <= 128:
        return (n - n % 8) // 8 - 1 + 3 + n % 8
    half = n // 2
    half -= half % 8
    return 1 + max(pairwise_depth(half), pairwise_depth(n - half))


def sum_depth(n: int, backend: str) -> int:
    """Depth charged to a reduction ``sum`` of ``n`` terms on ``backend`` (NumPy pairwise, else any order)."""
    return pairwise_depth(n) if backend == "numpy" else max(n - 1, 0)


def backend_name(xp: Any) -> str:
    """Error model of an array namespace: ``numpy`` (NumPy, array_api_strict), ``cuda`` (CuPy) or ``portable``."""
    name = getattr(xp, "__name__", "")
    if "cupy" in name:
        return "cuda"
    if "numpy" in name or "array_api_strict" in name:
        return "numpy"
    return "portable"


def _finish(err: np.ndarray, value: np.ndarray, dtype: str) -> np.ndarray:
    """Add the final rounding of float16/bfloat16 results (computed in float32) and the slack."""
    err = np.asarray(err, dtype=np.float64) * SLACK
    if dtype in ("float64", "float32"):
        return err + smallest_subnormal(dtype)
    uo = unit_roundoff(dtype)
    return err + uo * (np.abs(value) + err) + 0.5 * smallest_subnormal(dtype)


def _dist_rel(dist: np.ndarray, cdtype: str) -> np.ndarray:
    """Relative error of converting integer distances to the compute dtype (0 below 2**p)."""
    p = FORMATS[cdtype][0]
    return np.where(np.abs(dist) <= 2.0**p, 0.0, unit_roundoff(cdtype))


# ---------------------------------------------------------------------------------------------------------------------
# Bias families
# ---------------------------------------------------------------------------------------------------------------------


def exact_bound(value: Any, dtype: str) -> np.ndarray:
    """Table look-ups (T5, per-offset, tensor bias): the stored entry is returned unchanged, error 0."""
    return np.zeros(np.shape(value))


def alibi_slopes_bound(num_heads: int, dtype: str) -> np.ndarray:
    r"""``alibi_slopes``: the host evaluates :math:`2^{e}` in float64 (pow, exact dyadic e), then rounds to ``dtype``.

    :math:`|\hat m - m| \le \epsilon_{pow}\,m` in float64 and :math:`(u_{dt} + \epsilon_{pow}(1+u_{dt}))\,m` otherwise.
    """
    exps = oracle.alibi_slope_log2(num_heads)
    m = np.array([2.0 ** float(e) for e in exps])
    eps_host = (HOST_POW_ULP + 0.5) * 2.0 * unit_roundoff("float64")
    if dtype == "float64":
        return SLACK * eps_host * m + smallest_subnormal("float64")
    ud = unit_roundoff(dtype)
    return SLACK * (ud + eps_host * (1 + ud)) * m + 0.5 * smallest_subnormal(dtype)


def alibi_bound(value: Any, dist: Any, dtype: str, backend: str = "portable") -> np.ndarray:
    r"""ALiBi :math:`-m|\Delta|`: the distance converts exactly below :math:`2^p`, then one product.

    :math:`E = u\,|b|` (:math:`2u\,|b|` when :math:`|\Delta| > 2^p`).
    """
    cd = compute_dtype(dtype)
    u = unit_roundoff(cd)
    v = np.abs(np.asarray(value, dtype=np.float64))
    err = (u + _dist_rel(np.asarray(dist, dtype=np.float64), cd)) * v
    return _finish(err, v, dtype)


def kerple_power_bound(value: Any, dist: Any, r2: Any, dtype: str, backend: str = "portable") -> np.ndarray:
    r"""KERPLE power :math:`-r_1|\Delta|^{r_2}`: one ``pow`` and one product.

    :math:`E = (\epsilon_{pow} + u + r_2\,\epsilon_{dist})\,|b|`.
    """
    cd = compute_dtype(dtype)
    u = unit_roundoff(cd)
    v = np.abs(np.asarray(value, dtype=np.float64))
    dist = np.asarray(dist, dtype=np.float64)
    r2 = np.asarray(r2, dtype=np.float64)
    err = (libm_rel("pow", cd, backend) + u + r2 * _dist_rel(dist, cd)) * v
    return _finish(err, v, dtype)


def kerple_log_bound(value: Any, dist: Any, dtype: str, backend: str = "portable") -> np.ndarray:
    r"""KERPLE log :math:`-r_1\,\mathrm{log1p}(r_2|\Delta|)`.

    The product :math:`t = r_2|\Delta|` carries :math:`u`; log1p turns a relative perturbation :math:`\delta` of its
    argument into at most :math:`\delta\,t/((1+t)\,\mathrm{log1p}(t)) \le \delta` relative; then the library error and
    the final product: :math:`E = (2u + \epsilon_{log1p} + u + \epsilon_{dist})\,|b|`.
    """
    cd = compute_dtype(dtype)
    u = unit_roundoff(cd)
    v = np.abs(np.asarray(value, dtype=np.float64))
    err = (3 * u + libm_rel("log1p", cd, backend) + _dist_rel(np.asarray(dist, dtype=np.float64), cd)) * v
    return _finish(err, v, dtype)


def fire_bound(
    value: Any,
    x: Any,
    w1: Any,
    b1: Any,
    w2: Any,
    dtype: str,
    *,
    eps: float = 0.0,
    backend: str = "portable",
) -> np.ndarray:
    r"""FIRE :math:`W_2\,\mathrm{relu}(w_1 x + b_1) + b_2`, :math:`x = \psi(|\Delta|)/(\psi(\max(L,i)) + \varepsilon)`.

    Relative error of x: numerator :math:`u + \epsilon_{l}` (product then log1p), denominator :math:`u + \epsilon_l`
    (+ :math:`2u` when :math:`\varepsilon > 0`: its rounding to the compute dtype and the addition), division
    :math:`u`: :math:`\rho_x = 3u + 2\epsilon_l (+2u)`. Hidden pre-activation :math:`a_k = w_{1k}x + b_{1k}`:
    :math:`|w_{1k}x|(\rho_x + u) + u|a_k|`; relu is 1-Lipschitz; the (H, W) product adds
    :math:`\gamma_W \sum_k |w_{2hk}|\,\mathrm{relu}(a_k)`; the final ``+ b2`` adds :math:`u|b|`.

    ``x`` is the exact interpolant (Sq, Sk); ``w1`` (W,), ``b1`` (W,), ``w2`` (H, W) the exact parameters.
    """
    cd = compute_dtype(dtype)
    u = unit_roundoff(cd)
    el = libm_rel("log1p", cd, backend)
    rho = 3 * u + 2 * el + (2 * u if eps else 0.0)
    x = np.asarray(x, dtype=np.float64)
    w1 = np.asarray(w1, dtype=np.float64).reshape(-1)
    b1 = np.asarray(b1, dtype=np.float64).reshape(-1)
    w2 = np.asarray(w2, dtype=np.float64)
    width = w1.shape[0]
    pre = w1[:, None, None] * x[None] + b1[:, None, None]  # (W, Sq, Sk)
    err_pre = np.abs(w1[:, None, None] * x[None]) * (rho + u) + u * np.abs(pre)
    hid = np.maximum(pre, 0.0)
    aw2 = np.abs(w2)
    err = np.tensordot(aw2, err_pre, axes=1) + gamma(width, u) * np.tensordot(aw2, hid, axes=1)
    v = np.abs(np.asarray(value, dtype=np.float64))
    err = err + u * v
    return _finish(err, v, dtype)


def sandwich_omega_rel(head_dim: int, cdtype: str) -> np.ndarray:
    r"""Relative error of the frequencies :math:`\omega_k = 10000^{-2k/d}` as the library stores them.

    The host computes the exponent :math:`-2k/d` in float64 (relative error :math:`u_{64}`, which ``pow`` amplifies by
    :math:`\ln 10^4\,|e|`), then ``pow`` (:data:`HOST_POW_ULP`), then rounds to the compute dtype.
    """
    k = np.arange(1, head_dim // 2 + 1, dtype=np.float64)
    e = 2.0 * k / head_dim
    u64 = unit_roundoff("float64")
    rel64 = _LN_10000 * e * u64 + (HOST_POW_ULP + 0.5) * 2 * u64
    if cdtype == "float64":
        return rel64
    uc = unit_roundoff(cdtype)
    return uc + rel64 * (1 + uc)


def sandwich_bound(
    value: Any,
    dist: Any,
    head_dim: int,
    num_heads: int,
    heads: Sequence[int] | None,
    dtype: str,
    backend: str = "portable",
) -> np.ndarray:
    r"""Sandwich, evaluated as :math:`-2\sum_k \sin^2(|\Delta|\omega_k/2)\,/\,(8h/H)`.

    With :math:`\theta_k = |\Delta|\omega_k/2` and :math:`\rho_\omega` the frequency error: the argument is off by
    :math:`\theta_k(\rho_\omega + u)`, so :math:`|\Delta\sin| \le |\cos\theta_k|\,\theta_k(\rho_\omega + u) +
    \tfrac12\theta_k^2(\rho_\omega+u)^2 + \epsilon_{sin}|\sin\theta_k|`; squaring gives :math:`2|\sin|\,\Delta\sin
    + u\sin^2`; the in-order sum of d/2 squares :math:`\gamma_{d/2-1}\sum\sin^2`; the divisor :math:`8h/H` carries
    :math:`u_{64}` (+ :math:`u` when rounded to float32) and the division :math:`u`. Errors grow linearly with
    :math:`|\Delta|`: the frequencies are stored rounded, so the phase error is :math:`|\Delta|\omega_k\rho_\omega`.
    """
    cd = compute_dtype(dtype)
    u = unit_roundoff(cd)
    es = libm_rel("sin", cd, backend)
    d = np.abs(np.asarray(dist, dtype=np.float64))  # (Sq, Sk)
    half = head_dim // 2
    k = np.arange(1, half + 1, dtype=np.float64)
    omega = 10000.0 ** (-2.0 * k / head_dim)
    rw = sandwich_omega_rel(head_dim, cd)
    theta = 0.5 * d[..., None] * omega  # (Sq, Sk, d/2)
    dth = theta * (rw + u)
    s = np.sin(theta)
    ds = np.abs(np.cos(theta)) * dth + 0.5 * dth**2 + es * np.abs(s)
    sq_err = 2 * np.abs(s) * ds + ds**2 + u * s * s
    num_err = sq_err.sum(axis=-1) + gamma(max(half - 1, 0), u) * (s * s).sum(axis=-1)
    hs = np.arange(num_heads) if heads is None else np.asarray(heads)
    div = 8.0 * (hs + 1) / num_heads  # (h,)
    rel_div = unit_roundoff("float64") + (u if cd != "float64" else 0.0)
    v = np.abs(np.asarray(value, dtype=np.float64))
    err = 2.0 * num_err[None] / div[:, None, None] + (rel_div + u) * v
    return _finish(err, v, dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Softmax and attention
# ---------------------------------------------------------------------------------------------------------------------


def _scale_rel(scale: float, cdtype: str) -> float:
    """Error of passing a Python float scale to a compute-dtype array (rounded once unless representable)."""
    return 0.0 if representable(float(scale), cdtype) else unit_roundoff(cdtype)


def softmax_bound(
    z: Any,
    mask: Any,
    dtype: str,
    *,
    scores: Any,
    bias: Any = None,
    scale: float = 1.0,
    placement: str = "post_scale",
    backend: str = "portable",
    score_err: Any = None,
    bias_rel: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Bounds for the probabilities (elementwise, shape of ``z``) and the lse (shape ``z.shape[:-1]``).

    ``z`` are the exact final logits, ``scores``/``bias`` the exact inputs (broadcast to ``z``), ``mask`` True where
    attended (None = all). Logit error :math:`\zeta_j` (post_scale: :math:`|s\tau|(\epsilon_\tau + u) + u|z|`;
    pre_scale: :math:`u|s+b|\tau + (\epsilon_\tau + u)|z|`; no rounding when :math:`\tau = 1` or no bias, as
    applicable), plus ``score_err`` (error of the scores themselves, attention's :math:`q\cdot k`) times
    :math:`\tau`, plus ``bias_rel``:math:`\cdot|b|` (a bias already rounded to a lower precision). With
    :math:`w_j = z_j - \max z` and :math:`\rho_j = u|w_j| + \epsilon_{exp}` (the shift and the exponential), the
    probabilities obey

    .. math:: |\hat p_j - p_j| \le p_j\,\bigl(\zeta_j + \rho_j + \textstyle\sum_k p_k(\zeta_k + \rho_k)
              + \gamma_{d(n)} + u\bigr) + \text{(underflow)}

    and :math:`|\widehat{\mathrm{lse}} - \mathrm{lse}| \le \sum_k p_k(\zeta_k + \rho_k) + \gamma_{d(n)} +
    \epsilon_{log}\log T + u|\mathrm{lse}|` with :math:`T = \sum_k e^{w_k} \in [1, n]` and d(n) the summation depth.
    """
    cd = compute_dtype(dtype)
    u = unit_roundoff(cd)
    z = np.asarray(z, dtype=np.float64)
    s = np.broadcast_to(np.asarray(scores, dtype=np.float64), z.shape)
    keep = np.ones(z.shape, dtype=bool) if mask is None else np.broadcast_to(np.asarray(mask, dtype=bool), z.shape)
    et = _scale_rel(scale, cd)
    tau = float(scale)
    if bias is None:
        zeta = np.zeros(z.shape) if tau == 1.0 else (et + u) * np.abs(z)
        b = np.zeros(z.shape)
    else:
        b = np.broadcast_to(np.asarray(bias, dtype=np.float64), z.shape)
        if placement == "post_scale":
            zeta = (0.0 if tau == 1.0 else (et + u) * np.abs(s * tau)) + u * np.abs(z)
        else:
            zeta = u * np.abs(s + b) * tau + (0.0 if tau == 1.0 else (et + u) * np.abs(z))
        zeta = zeta + bias_rel * np.abs(b) * (tau if placement == "pre_scale" else 1.0)
    if score_err is not None:
        zeta = zeta + tau * np.broadcast_to(np.asarray(score_err, dtype=np.float64), z.shape)
    zm = np.where(keep, z, -np.inf)
    top = zm.max(axis=-1, keepdims=True)
    empty = ~np.isfinite(top)
    top = np.where(empty, 0.0, top)
    w = np.where(keep, z - top, -np.inf)
    e = np.exp(w)
    total = e.sum(axis=-1, keepdims=True)
    total = np.where(empty, 1.0, total)
    p = e / total
    rho = np.where(keep, u * np.abs(np.where(keep, w, 0.0)) + libm_rel("exp", cd, backend), 0.0)
    zeta = np.where(keep, zeta, 0.0)
    avg = (p * (zeta + rho)).sum(axis=-1, keepdims=True)
    n_att = keep.sum(axis=-1, keepdims=True)
    depth = np.vectorize(lambda n: sum_depth(int(n), backend))(n_att) if n_att.size else n_att
    g = gamma(depth, u)
    rel = zeta + rho + avg + g + u
    # Entries whose exponential underflows lose their relative accuracy but are below the smallest normal.
    p_err = SLACK * rel * p + smallest_normal(cd)
    p_err = np.where(keep, p_err, 0.0)
    lse = top + np.log(total)
    lse_err = SLACK * (avg + g + libm_rel("log", cd, backend) * np.log(total) + u * np.abs(lse))
    lse_err = np.where(empty, 0.0, lse_err)[..., 0]
    if dtype not in ("float64", "float32"):
        uo = unit_roundoff(dtype)
        p_err = p_err + uo * (p + p_err) + 0.5 * smallest_subnormal(dtype)
        p_err = np.where(keep, p_err, 0.0)
    return p_err, lse_err


def attention_bound(
    q: Any,
    k: Any,
    v: Any,
    z: Any,
    keep: Any,
    dtype: str,
    *,
    bias: Any = None,
    scale: float,
    placement: str = "post_scale",
    backend: str = "portable",
    bias_rel: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Bounds for the attention output (B, H, Sq, Dv) and lse (B, H, Sq).

    Scores :math:`q\cdot k` (a matrix product over D): :math:`\gamma_D \sum_t |q_t k_t|`; then the softmax bound of
    :func:`softmax_bound`; then :math:`o = \sum_j \hat p_j v_j` (a matrix product over the attended keys n):
    :math:`\sum_j |\hat p_j - p_j|\,|v_j| + \gamma_n \sum_j p_j |v_j|`.
    ``q`` (B, H, Sq, D), ``k``/``v`` (B, Hkv, Sk, .), ``z`` exact logits (B, H, Sq, Sk), ``keep`` bool (B, H, Sq, Sk).
    """
    cd = compute_dtype(dtype)
    u = unit_roundoff(cd)
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    group = q.shape[1] // k.shape[1]
    kk = np.repeat(k, group, axis=1)
    vv = np.repeat(v, group, axis=1)
    s = q @ np.swapaxes(kk, -1, -2)
    s_abs = np.abs(q) @ np.swapaxes(np.abs(kk), -1, -2)
    score_err = gamma(q.shape[-1], u) * s_abs
    p_err, lse_err = softmax_bound(
        z,
        keep,
        "float32" if cd == "float32" else "float64",
        scores=s,
        bias=bias,
        scale=scale,
        placement=placement,
        backend=backend,
        score_err=score_err,
        bias_rel=bias_rel,
    )
    z = np.asarray(z, dtype=np.float64)
    keep = np.broadcast_to(np.asarray(keep, dtype=bool), z.shape)
    zm = np.where(keep, z, -np.inf)
    top = zm.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(keep, np.exp(zm - top), 0.0)
    tot = e.sum(axis=-1, keepdims=True)
    p = e / np.where(tot > 0, tot, 1.0)
    n_att = keep.sum(axis=-1)
    av = np.abs(vv)
    out = p @ vv
    err = p_err @ av + gamma(n_att, u)[..., None] * (p @ av)
    err = SLACK * err
    if dtype not in ("float64", "float32"):
        uo = unit_roundoff(dtype)
        err = err + uo * (np.abs(out) + err) + 0.5 * smallest_subnormal(dtype)
    return err, lse_err


# ---------------------------------------------------------------------------------------------------------------------
# Measurement against the oracle
# ---------------------------------------------------------------------------------------------------------------------


def hilo(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Split nested oracle values (mpf) into float64 arrays ``hi + lo`` (a double-double, ~106 bits)."""
    ctx = oracle.context(oracle.DEFAULT_DPS)

    def walk(x):
        if isinstance(x, list | tuple):
            pairs = [walk(t) for t in x]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        x = ctx.mpf(x)
        if ctx.isnan(x) or ctx.isinf(x):
            f = float(x)
            return f, 0.0
        hi = float(x)
        return hi, float(x - hi)

    hi, lo = walk(values)
    return np.asarray(hi, dtype=np.float64), np.asarray(lo, dtype=np.float64)


def abs_error(actual: Any, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """``|actual - (hi + lo)|`` in float64 without the rounding of ``hi`` (the subtraction ``actual - hi`` is exact
    when they agree to within a factor 2, Sterbenz). Equal infinities and matching NaNs count as 0; one-sided
    non-finite values as inf."""
    a = np.asarray(actual, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs((a - hi) - lo)
    same = (a == hi) | (np.isnan(a) & np.isnan(hi))
    d = np.where(same & (lo == 0), 0.0, d)
    return np.where(np.isnan(d), np.inf, d)


def to_host(x: Any) -> np.ndarray:
    """Host float64 (or int/bool) NumPy copy of an array of any namespace."""
    from .testing import to_numpy

    arr = to_numpy(x)
    if arr.dtype.kind in "fV" or "bfloat16" in str(arr.dtype):
        return arr.astype(np.float64)
    return arr


def np_dtype(dtype: str) -> Any:
    """NumPy dtype object of a format name (bfloat16 through ml_dtypes)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_check_dtype(dtype))


def xp_dtype(xp: Any, dtype: str) -> Any:
    """The dtype object of ``xp`` for a format name; None when the namespace lacks it (bfloat16 off NumPy)."""
    if dtype == "bfloat16":
        return np_dtype("bfloat16") if backend_name(xp) == "numpy" and "strict" not in xp.__name__ else None
    return getattr(xp, dtype, None)


def round_to(values: Any, dtype: str) -> np.ndarray:
    """Round float64 values to ``dtype`` and back (exact values the library will see)."""
    a = np.asarray(values, dtype=np.float64)
    if dtype == "float64":
        return a.copy()
    with np.errstate(over="ignore"):
        return (
            a.astype(np.float32).astype(np_dtype(dtype)).astype(np.float64)
            if dtype == "bfloat16"
            else (a.astype(np_dtype(dtype)).astype(np.float64))
        )


@dataclass
class Measurement:
    """Errors of one computation against the oracle, elementwise."""

    err: np.ndarray
    bound: np.ndarray
    value: np.ndarray
    excluded: int = 0  # entries outside the finite range of the dtype (documented hazard, not measured)
    extra: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: Measurement) -> Measurement:
        return Measurement(
            np.concatenate([self.err.ravel(), other.err.ravel()]),
            np.concatenate([self.bound.ravel(), other.bound.ravel()]),
            np.concatenate([self.value.ravel(), other.value.ravel()]),
            self.excluded + other.excluded,
        )

    @property
    def ratio(self) -> float:
        if self.err.size == 0:
            return 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(self.err == 0, 0.0, self.err / self.bound)
        return float(np.max(r))

    def summary(self) -> dict[str, Any]:
        if self.err.size == 0:
            return {"max_abs_err": 0.0, "max_rel_err": 0.0, "bound": 0.0, "ratio": 0.0, "n": 0}
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(self.err == 0, 0.0, self.err / self.bound)
            rel = np.where(self.value != 0, self.err / np.abs(self.value), np.where(self.err == 0, 0.0, np.inf))
        worst = int(np.argmax(r))
        return {
            "max_abs_err": float(self.err.max()),
            "max_rel_err": float(rel.max()),
            "bound": float(self.bound.ravel()[worst]),
            "ratio": float(r.ravel()[worst]),
            "n": int(self.err.size),
        }


def _in_range(value: np.ndarray, bound: np.ndarray, dtype: str) -> np.ndarray:
    """Entries the bound covers: finite results inside the dtype's range, and exact infinities/NaNs (which must be
    reproduced exactly: -inf lse of a fully masked row, NaN of ``fully_masked="nan"``)."""
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(value) | (np.abs(value) + bound <= max_finite(dtype))


def _measure(actual: Any, exact: Any, bound_fn: Callable[[np.ndarray], np.ndarray], dtype: str) -> Measurement:
    hi, lo = hilo(exact)
    value = hi + lo
    bound = np.where(np.isfinite(value), bound_fn(value), 0.0)
    ok = _in_range(value, bound, dtype)
    err = abs_error(to_host(actual), hi, lo)
    return Measurement(err[ok], bound[ok], value[ok], excluded=int((~ok).sum()))


# -- family specifications: one function per family builds the library object, the oracle values and the bound ------


def _positions_arrays(xp: Any, q_pos: Sequence[int], k_pos: Sequence[int]) -> tuple[Any, Any]:
    return xp.asarray(list(q_pos), dtype=xp.int64), xp.asarray(list(k_pos), dtype=xp.int64)


def measure_family(
    name: str,
    params: dict[str, Any],
    options: dict[str, Any],
    q_pos: Sequence[int],
    k_pos: Sequence[int],
    xp: Any,
    dtype: str,
    *,
    dps: int = 30,
    heads: Sequence[int] | None = None,
) -> Measurement:
    """Run one family on ``xp`` in ``dtype`` and compare with the oracle.

    ``params`` hold float64 NumPy arrays whose values are exactly representable in ``dtype`` (see :func:`round_to`);
    the family is built in NumPy float64 and moved with ``family.astype(dtype, xp=xp)``.
    """
    import array_api_compat.numpy as npc

    import relpos_ref as rp

    target = xp_dtype(xp, dtype)
    if target is None:
        msg = f"dtype: {dtype} is not available in {getattr(xp, '__name__', xp)}"
        raise ValueError(msg)
    backend = backend_name(xp)
    dist = np.abs(np.subtract.outer(np.asarray(q_pos, dtype=np.float64), np.asarray(k_pos, dtype=np.float64)))
    qh, kh = list(q_pos), list(k_pos)
    p64 = {k: npc.asarray(np.asarray(v, dtype=np.float64)) for k, v in params.items()}
    if name == "alibi":
        fam = rp.ALiBi(p64["slopes"])
        exact = oracle.alibi_bias(params["slopes"].tolist(), qh, kh, heads=heads, dps=dps)

        def bound(v):
            return alibi_bound(v, dist[None], dtype, backend)
    elif name == "kerple_power":
        fam = rp.KerplePower(p64["r1"], p64["r2"])
        exact = oracle.kerple_power_bias(params["r1"].tolist(), params["r2"].tolist(), qh, kh, heads=heads, dps=dps)
        r2 = np.asarray(params["r2"])[list(heads) if heads is not None else slice(None)]

        def bound(v):
            return kerple_power_bound(v, dist[None], r2[:, None, None], dtype, backend)
    elif name == "kerple_log":
        fam = rp.KerpleLog(p64["r1"], p64["r2"])
        exact = oracle.kerple_log_bias(params["r1"].tolist(), params["r2"].tolist(), qh, kh, heads=heads, dps=dps)

        def bound(v):
            return kerple_log_bound(v, dist[None], dtype, backend)
    elif name == "fire":
        c = float(params["c"])
        L = float(params["L"])  # noqa: N806
        eps = float(options.get("eps", 0.0))
        fam = rp.FIRE(p64["w1"], p64["b1"], p64["w2"], p64["b2"], c=p64["c"], L=p64["L"], eps=eps)
        w1 = np.asarray(params["w1"]).reshape(-1)
        b1 = np.asarray(params["b1"])
        w2 = np.asarray(params["w2"])
        b2 = np.asarray(params["b2"])
        exact = oracle.fire_bias(
            w1.tolist(), b1.tolist(), w2.tolist(), b2.tolist(), qh, kh, c=c, L=L, eps=eps, heads=heads, dps=dps
        )
        xh, xl = hilo(oracle.fire_inputs(qh, kh, c=c, L=L, eps=eps, dps=dps))
        w2h = w2[list(heads)] if heads is not None else w2

        def bound(v):
            return fire_bound(v, xh + xl, w1, b1, w2h, dtype, eps=eps, backend=backend)
    elif name == "sandwich":
        nh, hd = int(options["num_heads"]), int(options["head_dim"])
        fam = rp.Sandwich(nh, hd)
        exact = oracle.sandwich_bias(nh, hd, qh, kh, heads=heads, dps=dps)

        def bound(v):
            return sandwich_bound(v, dist, hd, nh, heads, dtype, backend)
    elif name in ("t5", "offset"):
        if name == "t5":
            fam = rp.T5Bias(
                p64["table"], bidirectional=options["bidirectional"], max_distance=options.get("max_distance", 128)
            )
            exact = oracle.t5_bias(
                params["table"].tolist(),
                qh,
                kh,
                bidirectional=options["bidirectional"],
                max_distance=options.get("max_distance", 128),
                heads=heads,
                dps=dps,
            )
        else:
            fam = rp.OffsetBias(p64["table"])
            exact = oracle.offset_bias(params["table"].tolist(), qh, kh, heads=heads, dps=dps)

        def bound(v):
            return exact_bound(v, dtype)
    else:
        msg = f"name: unknown family {name!r}"
        raise ValueError(msg)
    fam = fam.astype(target, xp=xp)
    qp, kp = _positions_arrays(xp, q_pos, k_pos)
    with np.errstate(over="ignore"):
        actual = fam.bias(qp, kp, heads=list(heads) if heads is not None else None)
    return _measure(actual, exact, bound, dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Deterministic case sets for the table (the tests draw their own with Hypothesis)
# ---------------------------------------------------------------------------------------------------------------------

_LONG = [0, 1, 2, 3, 7, 100, 1000, 4095, 4097, 65535, 131071, 524289, 1_000_000]


def _dist_cap(dtype: str, top_value: float) -> int:
    """Largest distance keeping a bias of slope-like size ``top_value`` per unit distance inside the dtype's range."""
    return int(max_finite(dtype) / (2 * top_value)) if dtype == "float16" else 1_000_000


def _family_cases(name: str, dtype: str, thorough: bool, rng: np.random.Generator) -> Iterable[tuple]:
    """Yield (params, options, q_pos, k_pos) with parameters exactly representable in ``dtype``."""
    reps = 3 if thorough else 1
    for _ in range(reps):
        if name == "alibi":
            for h in (8, 12, 256) if thorough else (8, 12):
                slopes = round_to(np.array([2.0 ** float(e) for e in oracle.alibi_slope_log2(h)]), dtype)
                cap = _dist_cap(dtype, float(slopes.max()))
                pos = sorted({p for p in _LONG if p <= cap} | {cap})
                yield {"slopes": slopes}, {}, pos, pos[: max(2, len(pos) // 2)]
            slopes = round_to(np.exp(rng.uniform(np.log(1e-4), np.log(1.0), 6)), dtype)
            cap = _dist_cap(dtype, float(slopes.max()))
            pos = sorted({int(t) for t in rng.integers(0, cap, 24)} | {0})
            yield {"slopes": slopes}, {}, pos, pos
        elif name in ("kerple_power", "kerple_log"):
            h = 6
            r1 = round_to(np.exp(rng.uniform(np.log(1e-6), np.log(4.0), h)), dtype)
            if name == "kerple_power":
                r2 = round_to(np.concatenate([[2.0, 1.0, 0.01], rng.uniform(0.01, 2.0, h - 3)]), dtype)
                cap = 200 if dtype == "float16" else 1_000_000
            else:
                r2 = round_to(np.exp(rng.uniform(np.log(1e-3), np.log(8.0), h)), dtype)
                cap = 1_000_000
            r1[0] = round_to(np.array([1e-6 if dtype != "float16" else 2.0**-14]), dtype)[0]
            pos = sorted({p for p in _LONG if p <= cap} | {int(t) for t in rng.integers(0, cap, 16)})
            yield {"r1": r1, "r2": r2}, {}, pos, pos
        elif name == "fire":
            w = 32
            L = 512.0  # noqa: N806
            for c in (2.0**-10, 0.1, 16.0):
                params = {
                    "w1": round_to(rng.normal(0, 1, (w, 1)), dtype),
                    "b1": round_to(rng.normal(0, 1, w), dtype),
                    "w2": round_to(rng.normal(0, 1 / math.sqrt(w), (4, w)), dtype),
                    "b2": round_to(rng.normal(0, 1, 4), dtype),
                    "c": round_to(np.array(c), dtype),
                    "L": round_to(np.array(L), dtype),
                }
                q = [0, 1, 100, 510, 511, 512, 513, 2000, 65535, 1_000_000]
                if dtype == "float16":
                    q = [t for t in q if t <= 65504]
                k = sorted({0, 1, 255, 509, 510, 511, 512, 513} | {t - 1 for t in q if t > 0})
                yield params, {"eps": 0.0 if c != 0.1 else 1e-6}, q, k
        elif name == "sandwich":
            for hd in (32, 64, 128):
                pos = [0, 1, 2, 13, 14, 100, 1000, 4096] + ([65536, 1_000_000] if thorough else [])
                yield {}, {"num_heads": 8, "head_dim": hd}, pos, pos
        elif name == "t5":
            for bidir in (True, False):
                for nb, md in ((32, 128), (8, 20)):
                    thr = oracle.t5_bucket_thresholds(bidirectional=bidir, num_buckets=nb, max_distance=md)
                    offs = sorted(set(thr) | {t - 1 for t in thr if t > 0} | {md, 1_000_000})
                    q = [1_000_000]
                    k = sorted({1_000_000 - o for o in offs} | {1_000_000 + o for o in offs})
                    table = round_to(rng.normal(0, 1, (3, nb)), dtype)
                    yield {"table": table}, {"bidirectional": bidir, "max_distance": md}, q, k
        elif name == "offset":
            table = round_to(rng.normal(0, 1, (3, 9)), dtype)
            yield {"table": table}, {}, [0, 3, 100], [0, 1, 2, 3, 4, 5, 6, 7, 100, 200]


FAMILIES = ("t5", "offset", "alibi", "kerple_power", "kerple_log", "fire", "sandwich")


def _softmax_cases(dtype: str, thorough: bool, rng: np.random.Generator) -> Iterable[dict[str, Any]]:
    lengths = (1, 7, 128, 1000) + ((8192,) if thorough else ())
    for n in lengths:
        for spread, placement, scale in (
            (1.0, "post_scale", 0.125),
            (30.0, "pre_scale", 1 / math.sqrt(48)),
            (3.0, "post_scale", 1.0),
        ):
            rows = 3
            s = round_to(rng.normal(0, spread, (rows, n)), dtype)
            b = round_to(-np.abs(rng.normal(0, 2, (rows, n))), dtype)
            mask = rng.random((rows, n)) < 0.9
            mask[:, 0] = True
            yield {"scores": s, "bias": b, "mask": mask, "scale": scale, "placement": placement}
    # logits and biases near +-1e4, one dominant key, all-equal logits
    big = 1e4 if dtype != "float16" else 6e3
    s = round_to(np.array([[big, big - 1, big - 2.5, -big], [0.0] * 4, [1.0, 40.0, 1.0, 1.0]]), dtype)
    b = round_to(np.array([[-big, 3.0, -big + 7, big], [0.0] * 4, [0.0, 0.0, 0.0, 0.0]]), dtype)
    yield {"scores": s, "bias": b, "mask": None, "scale": 1.0, "placement": "post_scale"}


def measure_softmax(case: dict[str, Any], xp: Any, dtype: str, *, dps: int = 30) -> tuple[Measurement, Measurement]:
    """Probabilities and lse of :func:`relpos_ref.biased_softmax` against the oracle."""
    import relpos_ref as rp

    target = xp_dtype(xp, dtype)
    backend = backend_name(xp)
    s, b, mask = case["scores"], case.get("bias"), case.get("mask")
    scale, placement = case.get("scale", 1.0), case.get("placement", "post_scale")
    probs_x, lse_x = rp.biased_softmax(
        xp.asarray(s.astype(np_dtype(dtype))) if dtype == "bfloat16" else xp.asarray(s, dtype=target),
        None
        if b is None
        else (xp.asarray(b.astype(np_dtype(dtype))) if dtype == "bfloat16" else xp.asarray(b, dtype=target)),
        mask=None if mask is None else xp.asarray(mask),
        scale=scale,
        placement=placement,
        return_lse=True,
    )
    p_exact, lse_exact = oracle.biased_softmax(
        s.tolist(),
        None if b is None else b.tolist(),
        mask=None if mask is None else mask.tolist(),
        scale=scale,
        placement=placement,
        dps=dps,
    )
    zh, zl = hilo(_logits(s, b, scale, placement, dps))
    p_bound, lse_bound = softmax_bound(
        zh + zl, mask, dtype, scores=s, bias=b, scale=scale, placement=placement, backend=backend
    )
    return (
        _measure(probs_x, p_exact, lambda v: p_bound, dtype),
        _measure(lse_x, lse_exact, lambda v: lse_bound, compute_dtype(dtype)),
    )


def _logits(s: np.ndarray, b: np.ndarray | None, scale: float, placement: str, dps: int) -> list:
    """Exact final logits (mpf) from exact inputs."""
    ctx = oracle.context(dps)
    tau = ctx.mpf(float(scale))
    sb = np.zeros_like(s) if b is None else np.broadcast_to(b, s.shape)
    flat = [
        (ctx.mpf(float(a)) * tau + ctx.mpf(float(c)))
        if placement == "post_scale"
        else (ctx.mpf(float(a)) + ctx.mpf(float(c))) * tau
        for a, c in zip(s.ravel().tolist(), sb.ravel().tolist())
    ]
    return np.array(flat, dtype=object).reshape(s.shape).tolist()


def _attention_cases(dtype: str, thorough: bool, rng: np.random.Generator) -> Iterable[dict[str, Any]]:
    shapes = [
        (1, 4, 2, 5, 7, 16, True, "bottom_right"),
        (1, 4, 4, 6, 3, 8, True, "bottom_right"),
        (2, 2, 1, 4, 64, 16, True, "top_left"),
        (1, 2, 2, 3, 512, 32, False, "bottom_right"),
    ]
    if thorough:
        shapes.append((1, 2, 1, 2, 8192, 16, True, "bottom_right"))
    for nb, nh, nkv, sq, sk, d, causal, align in shapes:
        q = round_to(rng.normal(0, 1, (nb, nh, sq, d)), dtype)
        k = round_to(rng.normal(0, 1, (nb, nkv, sk, d)), dtype)
        v = round_to(rng.normal(0, 1, (nb, nkv, sk, d)), dtype)
        bias = round_to(-np.abs(rng.normal(0, 3, (nh, sq, sk))), dtype)
        for placement in ("post_scale", "pre_scale"):
            yield {"q": q, "k": k, "v": v, "bias": bias, "causal": causal, "align": align, "placement": placement}


def measure_attention(case: dict[str, Any], xp: Any, dtype: str, *, dps: int = 30) -> tuple[Measurement, Measurement]:
    """Output and lse of :func:`relpos_ref.attention` (array bias) against the oracle."""
    import relpos_ref as rp

    target = xp_dtype(xp, dtype)
    backend = backend_name(xp)

    def put(a):
        return xp.asarray(a.astype(np_dtype(dtype))) if dtype == "bfloat16" else xp.asarray(a, dtype=target)

    q, k, v, bias = case["q"], case["k"], case["v"], case.get("bias")
    causal, align, placement = case["causal"], case["align"], case["placement"]
    scale = case.get("scale", 1.0 / math.sqrt(q.shape[-1]))
    out_x, lse_x = rp.attention(
        put(q),
        put(k),
        put(v),
        bias=None if bias is None else put(bias),
        causal=causal,
        align=align,
        scale=scale,
        placement=placement,
        return_lse=True,
    )
    out_e, lse_e = oracle.attention(
        q.tolist(),
        k.tolist(),
        v.tolist(),
        bias=None if bias is None else bias.tolist(),
        causal=causal,
        align=align,
        scale=scale,
        placement=placement,
        dps=dps,
    )
    # logits and mask for the bound (float64 logits are accurate enough to evaluate a bound)
    group = q.shape[1] // k.shape[1]
    kk = np.repeat(k, group, axis=1)
    qpos, kpos = oracle.positions(q.shape[2], k.shape[2], align=align)
    keep = np.ones((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dtype=bool)
    if causal:
        keep &= np.asarray(oracle.causal_mask(qpos, kpos))[None, None]
    sexact = np.einsum("bhid,bhjd->bhij", q, kk)  # float64 approximation suffices for the bound's z
    bb = np.zeros(keep.shape) if bias is None else np.broadcast_to(bias, keep.shape)
    z = sexact * scale + bb if placement == "post_scale" else (sexact + bb) * scale
    o_bound, l_bound = attention_bound(
        q, k, v, z, keep, dtype, bias=None if bias is None else bb, scale=scale, placement=placement, backend=backend
    )
    return (
        _measure(out_x, out_e, lambda val: o_bound, dtype),
        _measure(lse_x, lse_e, lambda val: l_bound, compute_dtype(dtype)),
    )


# ---------------------------------------------------------------------------------------------------------------------
# The verify table
# ---------------------------------------------------------------------------------------------------------------------

BOUND_TEXT = {
    "t5": "exact (table look-up)",
    "t5_bucket": "exact (integer)",
    "offset": "exact (table look-up)",
    "alibi_slopes": "(1.5 ulp pow) + rounding to dtype",
    "alibi": "u|b| (one product)",
    "kerple_power": "(eps_pow + u)|b|",
    "kerple_log": "(3u + eps_log1p)|b|",
    "fire": "sum|w2|(|w1 x| rho_x + u|a|) + gamma_W sum|w2 h| + u|b|",
    "sandwich": "phase error |D| w_k (rho_w + u), sin, gamma_{d/2} sum",
    "softmax": "p (zeta + rho + <zeta + rho> + gamma_d(n) + u)",
    "softmax_lse": "<zeta + rho> + gamma_d(n) + eps_log log T + u|lse|",
    "attention": "sum|dp||v| + gamma_n sum p|v|",
    "attention_lse": "as softmax lse, scores with gamma_D",
}


def _row(family: str, xp: Any, dtype: str, m: Measurement, seconds: float) -> dict[str, Any]:
    s = m.summary()
    return {
        "family": family,
        "backend": getattr(xp, "__name__", str(xp)),
        "dtype": dtype,
        "cases": s["n"],
        "max_abs_err": s["max_abs_err"],
        "max_rel_err": s["max_rel_err"],
        "bound": s["bound"],
        "ratio": s["ratio"],
        "bound_formula": BOUND_TEXT.get(family, ""),
        "excluded_out_of_range": m.excluded,
        "passed": bool(s["ratio"] <= 1.0),
        "seconds": round(seconds, 2),
    }


def _empty() -> Measurement:
    return Measurement(np.zeros(0), np.zeros(0), np.zeros(0))


def oracle_table(
    backends: Sequence[Any],
    dtypes: Sequence[str] = DTYPES,
    thorough: bool = False,
    *,
    families: Sequence[str] | None = None,
    seed: int = 20240611,
) -> list[dict[str, Any]]:
    """Measure every family, the softmax and attention against the oracle on each backend and dtype.

    Parameters
    ----------
    backends : sequence of array namespaces
        E.g. ``[array_api_compat.numpy, array_api_strict]``; bfloat16 rows are produced for NumPy only.
    dtypes : sequence of str
        Format names among ``float64``, ``float32``, ``float16``, ``bfloat16``.
    thorough : bool
        More cases (256 ALiBi heads, Sandwich at distance 1e6, softmax rows of 8192, attention with 8192 keys).
    families : sequence of str, optional
        Subset of ``FAMILIES + ("alibi_slopes", "t5_bucket", "softmax", "attention")``.

    Returns
    -------
    list of dict
        One row per (family, backend, dtype): ``family, backend, dtype, cases`` (entries compared),
        ``max_abs_err, max_rel_err``, ``bound`` (the bound at the entry closest to it), ``ratio`` (max of
        error / bound; the check passes when <= 1), ``bound_formula``, ``excluded_out_of_range`` (entries beyond the
        dtype's finite range, a documented hazard), ``passed``, ``seconds``.
    """
    import relpos_ref as rp

    names = (
        list(families)
        if families is not None
        else [
            "t5_bucket",
            *FAMILIES,
            "alibi_slopes",
            "softmax",
            "softmax_lse",
            "attention",
            "attention_lse",
        ]
    )
    rows: list[dict[str, Any]] = []
    for xp in backends:
        for dtype in dtypes:
            _check_dtype(dtype)
            if xp_dtype(xp, dtype) is None:
                continue
            done: set[str] = set()
            for name in names:
                if name in done:
                    continue
                rng = np.random.default_rng([seed, DTYPES.index(dtype), len(name)])
                t0 = time.perf_counter()
                if name == "t5_bucket":
                    if dtype != DTYPES[0]:
                        continue  # integer output: one row per backend
                    m = _empty()
                    for bidir in (True, False):
                        for nb, md in ((32, 128), (16, 128), (64, 256), (32, 256), (8, 20)):
                            thr = oracle.t5_bucket_thresholds(bidirectional=bidir, num_buckets=nb, max_distance=md)
                            offs = sorted(set(thr) | {t - 1 for t in thr if t > 0} | {md, 10**6})
                            offs = sorted(set(offs) | {-o for o in offs})
                            want = np.array(
                                [
                                    oracle.t5_bucket(o, bidirectional=bidir, num_buckets=nb, max_distance=md)
                                    for o in offs
                                ],
                                dtype=np.float64,
                            )
                            got = to_host(
                                rp.t5_bucket(
                                    xp.asarray(offs, dtype=xp.int64),
                                    bidirectional=bidir,
                                    num_buckets=nb,
                                    max_distance=md,
                                )
                            ).astype(np.float64)
                            m = m.merge(Measurement(np.abs(got - want), np.zeros(len(offs)), want))
                    rows.append(_row(name, xp, "int64", m, time.perf_counter() - t0))
                    continue
                if name == "alibi_slopes":
                    m = _empty()
                    for h in range(1, 257 if thorough else 65):
                        exact = oracle.alibi_slopes(h, dps=30)
                        got = rp.alibi_slopes(h, dtype=xp_dtype(xp, dtype), xp=xp)
                        bnd = alibi_slopes_bound(h, dtype)
                        m = m.merge(_measure(got, exact, lambda v, bnd=bnd: bnd, dtype))
                    rows.append(_row(name, xp, dtype, m, time.perf_counter() - t0))
                    continue
                if name in ("softmax", "softmax_lse"):
                    mp_, ml_ = _empty(), _empty()
                    for case in _softmax_cases(dtype, thorough, rng):
                        a, b = measure_softmax(case, xp, dtype)
                        mp_, ml_ = mp_.merge(a), ml_.merge(b)
                    rows.append(_row("softmax", xp, dtype, mp_, time.perf_counter() - t0))
                    rows.append(_row("softmax_lse", xp, dtype, ml_, 0.0))
                    done |= {"softmax", "softmax_lse"}
                    continue
                if name in ("attention", "attention_lse"):
                    mo, ml_ = _empty(), _empty()
                    for case in _attention_cases(dtype, thorough, rng):
                        a, b = measure_attention(case, xp, dtype)
                        mo, ml_ = mo.merge(a), ml_.merge(b)
                    rows.append(_row("attention", xp, dtype, mo, time.perf_counter() - t0))
                    rows.append(_row("attention_lse", xp, dtype, ml_, 0.0))
                    done |= {"attention", "attention_lse"}
                    continue
                m = _empty()
                for params, options, q, k in _family_cases(name, dtype, thorough, rng):
                    m = m.merge(measure_family(name, params, options, q, k, xp, dtype))
                rows.append(_row(name, xp, dtype, m, time.perf_counter() - t0))
    return rows


def format_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """Render :func:`oracle_table` rows as aligned text or a Markdown table."""
    head = ["family", "backend", "dtype", "entries", "max abs err", "max rel err", "bound there", "err/bound", "ok"]
    body = []
    for r in rows:
        body.append(
            [
                r["family"],
                r["backend"].replace("array_api_compat.", ""),
                r["dtype"],
                str(r["cases"]),
                f"{r['max_abs_err']:.3g}",
                f"{r['max_rel_err']:.3g}",
                f"{r['bound']:.3g}",
                f"{r['ratio']:.3f}",
                "yes" if r["passed"] else "NO",
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(out)


_MD_BEGIN = "<!-- BEGIN MEASURED TABLE (python -m relpos_ref.bounds --update-md spec/tolerances.md) -->"
_MD_END = "<!-- END MEASURED TABLE -->"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m relpos_ref.bounds [--thorough] [--update-md PATH]``: print the measured table."""
    import argparse

    import array_api_compat.numpy as npc

    parser = argparse.ArgumentParser(prog="python -m relpos_ref.bounds", description=main.__doc__)
    parser.add_argument("--thorough", action="store_true")
    parser.add_argument("--backends", default="numpy,array_api_strict")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--update-md", metavar="PATH", help="rewrite the measured table block of this Markdown file")
    args = parser.parse_args(argv)
    backends = []
    for b in args.backends.split(","):
        if b == "numpy":
            backends.append(npc)
        elif b == "array_api_strict":
            import array_api_strict

            backends.append(array_api_strict)
        elif b == "cupy":
            import array_api_compat.cupy as cpc

            backends.append(cpc)
        else:
            parser.error(f"unknown backend {b!r}")
    rows = oracle_table(backends, args.dtypes.split(","), thorough=args.thorough)
    print(format_table(rows))
    if args.update_md:
        import platform

        import mpmath

        with open(args.update_md, encoding="utf-8") as fh:
            text = fh.read()
        if _MD_BEGIN not in text or _MD_END not in text:
            parser.error(f"{args.update_md} lacks the table markers")
        info = (
            f"Measured with numpy {np.__version__}, mpmath {mpmath.__version__}, Python {platform.python_version()}, "
            f"{platform.machine()}; {'thorough' if args.thorough else 'default'} case set; bound = the documented "
            "bound at the entry where error/bound is largest."
        )
        block = f"{_MD_BEGIN}\n\n{info}\n\n{format_table(rows, markdown=True)}\n\n{_MD_END}"
        text = text[: text.index(_MD_BEGIN)] + block + text[text.index(_MD_END) + len(_MD_END) :]
        with open(args.update_md, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
