r"""The documented forward error-bound model: every family, the biased softmax and attention, per dtype, as code.

``spec/tolerances.md`` derives these bounds in prose; this module is the single source of the numbers, read by
the tests (``tests/bounds/test_error_bounds.py``), by the golden-vector generator (``spec/vectors/generate.py``,
which stores per-case tolerances) and, through :mod:`relpos_ref.bounds.measure`, by ``relpos-ref verify``, which
measures the implementation against the mpmath oracle and prints the measured error next to these bounds.

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
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import oracle

__all__ = [
    "DTYPES",
    "FORMATS",
    "HOST_POW_ULP",
    "LIBM_ULP",
    "SLACK",
    "alibi_bound",
    "alibi_slopes_bound",
    "attention_bound",
    "backend_name",
    "compute_dtype",
    "exact_bound",
    "fire_bound",
    "gamma",
    "kerple_log_bound",
    "kerple_power_bound",
    "libm_rel",
    "max_finite",
    "pairwise_depth",
    "representable",
    "sandwich_bound",
    "sandwich_omega_rel",
    "smallest_normal",
    "smallest_subnormal",
    "softmax_bound",
    "sum_depth",
    "ulp",
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
