"""The comparison of read probabilities with a reference bias, elementwise up to a row constant, and its findings."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _checks
from ..bounds.model import FORMATS, unit_roundoff
from ..conventions import FLOAT_DTYPES
from ..families import BiasFamily
from ..positions import causal_mask
from ..tolerances import BIAS_TOLERANCES

__all__ = [
    "READABLE_RATIO",
    "READOUT_ULPS",
    "SMALLEST_NORMAL",
    "UNIT_ROUNDOFF",
    "EffectiveBiasResult",
    "HeadSummary",
    "WorstGroup",
    "compare_bias",
    "reference_bias",
    "reference_magnitude",
]

#: Unit roundoff u (half an ulp of 1, relative) and smallest normal number of each format (bounds.model.FORMATS).
UNIT_ROUNDOFF = {d: unit_roundoff(d) for d in FORMATS}
SMALLEST_NORMAL = {d: 2.0 ** FORMATS[d][1] for d in FORMATS}
#: Roundings of a probability a correct kernel may make, in units of u: the output, P before ``P @ V``, the
#: exponential, the division by the row sum, and a few rescalings of an online softmax.
READOUT_ULPS = 8
#: Probabilities below this fraction of the row's largest are not readable: a kernel computing exp(s - m) in float32
#: (or with flush-to-zero) may lose them, and they carry no information about the bias that larger ones lack.
READABLE_RATIO = 1e-30
#: Worst (head, offset range) groups kept in a result.
WORST_GROUPS = 10


def reference_bias(family: BiasFamily, q_pos: Any, k_pos: Any, /, *, causal: bool = False) -> np.ndarray:
    """The family's bias (H, Sq, Sk) in float64 NumPy at these positions, -inf on keys a causal mask removes."""
    if not isinstance(family, BiasFamily):
        msg = f"family: expected a relpos_ref bias family, got {type(family).__name__}"
        raise TypeError(msg)
    import array_api_compat.numpy as np_xp

    qp, kp = (np.asarray(a) for a in (q_pos, k_pos))
    fam = family.astype(np_xp.float64, xp=np_xp)
    bias = np.array(fam.bias(qp, kp), dtype=np.float64)
    if _checks.boolean("causal", causal):
        bias = np.where(np.asarray(causal_mask(qp, kp))[None], bias, -np.inf)
    return bias


def reference_magnitude(family: BiasFamily, q_pos: Any, k_pos: Any, /) -> np.ndarray:
    """The family's :meth:`~relpos_ref.families.BiasFamily.bias_magnitude` (H, Sq, Sk) in float64 NumPy."""
    import array_api_compat.numpy as np_xp

    fam = family.astype(np_xp.float64, xp=np_xp)
    with np.errstate(invalid="ignore"):
        return np.abs(np.array(fam.bias_magnitude(np.asarray(q_pos), np.asarray(k_pos)), dtype=np.float64))


@dataclass(frozen=True)
class WorstGroup:
    """The failing entries of one head in one range of offsets (Delta = q_pos - k_pos, binned by powers of two).

    ``kind`` is "value" (effective - reference off by more than the bound), "zero" (P = 0 where the reference
    keeps the key with a readable probability), "masked" (P > 0 on a key the reference masks) or "invalid" (NaN,
    infinite or negative P). ``error`` is the signed effective - reference of
    the entry that misses its bound by the largest factor (for "masked": log P - row constant), ``bound`` its
    bound, ``probability`` the candidate's P there.
    """

    head: int
    kind: str
    delta_lo: int
    delta_hi: int
    count: int
    error: float
    bound: float
    probability: float

    def text(self) -> str:
        lo, hi = self.delta_lo, self.delta_hi
        deltas = f"Delta {lo}" if lo == hi else f"Delta {lo}..{hi}"
        where = f"head {self.head}, {deltas} ({self.count} {'entry' if self.count == 1 else 'entries'})"
        if self.kind == "masked":
            return f"{where}: P = {self.probability:.3g} > 0 on keys the reference masks"
        if self.kind == "invalid":
            return f"{where}: the candidate's probability is {self.probability!r} (NaN, infinite or negative)"
        if self.kind == "zero":
            return f"{where}: P = 0 on keys the reference keeps with a readable probability"
        return f"{where}: effective - reference = {self.error:+.3g} (bound {self.bound:.2g})"


@dataclass(frozen=True)
class HeadSummary:
    """One head's comparison: counts, the largest error, a straight-line fit against |Delta|, and findings.

    ``slope`` and ``reference_slope`` are least-squares slopes of the effective and the reference bias against
    |Delta| with one intercept per row (over the head's readable entries where P is a normal number);
    ``linear`` says whether effective - reference is itself a straight line in |Delta| within the bound.
    ``failed`` counts readable entries off their bound, ``failed_unreadable`` unreadable ones above the reference.
    """

    head: int
    readable: int
    failed: int
    failed_unreadable: int
    max_error: float
    slope: float
    reference_slope: float
    linear: bool
    findings: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class EffectiveBiasResult:
    r"""The effective bias of a candidate against a reference bias, elementwise, up to one constant per row.

    An entry (b, h, i, j) on a row that sees a key is one of: *readable* (the reference probability is a normal
    number of the dtype and at least :data:`READABLE_RATIO` of the row's largest): compared both ways;
    *unreadable*: the candidate may be smaller than the reference by any amount (its probability underflows) but
    not larger than the bound allows; *masked* (reference bias -inf): the candidate's P must be exactly 0; *not
    read* (no probe read the key). A row passes when one constant c makes every entry pass:
    :math:`|\log P_j - \beta_j - c| \le \tau_j` (readable), :math:`\log P_j - \beta_j - c \le \tau_j` (unreadable),
    with :math:`\beta` the reference effective bias and :math:`\tau` the bound (``tolerance``).

    Attributes
    ----------
    passed : bool
    dtype : str
    max_error : float
        Largest :math:`|\log P_j - \beta_j - c|` over readable entries (inf for a P = 0 there, a masked key with
        P > 0, or an invalid P).
    bound : float
        Largest bound :math:`\tau_j` over readable entries.
    worst_ratio : float
        Largest error / bound.
    counts : dict
        readable, unreadable, masked, not_read, empty_rows (rows that see no key: skipped), failed, masked_leaks.
    worst : tuple of WorstGroup
        The worst (head, offset range) groups, worst first.
    heads : tuple of HeadSummary
    findings : tuple of str
        Explanations that concern all heads (a mask off by one).
    residual : numpy.ndarray
        (B, H, Sq, Sk): :math:`\log P - \beta - c` on readable entries (and failing unreadable ones), +inf on
        masked keys with P > 0, NaN elsewhere.
    q_pos, k_pos : numpy.ndarray
    worst_index : tuple or None
        (b, h, i, j) of the entry that misses its bound by the largest factor.
    worst_values : tuple or None
        (effective, reference) there: :math:`\log P - c` and :math:`\beta`.
    tolerance : str
    """

    passed: bool
    dtype: str
    max_error: float
    bound: float
    worst_ratio: float
    counts: dict[str, int]
    worst: tuple[WorstGroup, ...]
    heads: tuple[HeadSummary, ...]
    findings: tuple[str, ...]
    residual: np.ndarray = field(repr=False)
    q_pos: np.ndarray = field(repr=False)
    k_pos: np.ndarray = field(repr=False)
    worst_index: tuple[int, ...] | None
    worst_values: tuple[float, float] | None
    tolerance: str

    def diagnosis(self, limit: int = 5) -> list[str]:
        """Findings first (all heads, then each head's), then the ``limit`` worst groups."""
        out = list(self.findings)
        for hs in self.heads:
            out += list(hs.findings)
        return out + [g.text() for g in self.worst[:limit]]

    def details(self) -> list[str]:
        """Counts, every worst group, and each failing head's summary, one line each."""
        c = self.counts
        out = [
            f"{c['readable']} readable entries compared, {c['unreadable']} below what {self.dtype} resolves (only "
            f"checked not to exceed the reference), {c['masked']} masked, {c['not_read']} not read, "
            f"{c['empty_rows']} rows without a key skipped; worst error / bound {self.worst_ratio:.3g}"
        ]
        out += [f"worst: {g.text()}" for g in self.worst]
        for hs in self.heads:
            if hs.failed or hs.failed_unreadable:
                above = f" (and {hs.failed_unreadable} unreadable above the reference)" if hs.failed_unreadable else ""
                out.append(
                    f"head {hs.head}: {hs.failed} of {hs.readable} readable entries off{above}, max error "
                    f"{hs.max_error:.3g}; "
                    f"slope against |Delta| {hs.slope:.6g} (reference {hs.reference_slope:.6g})"
                )
        return out

    def text(self) -> str:
        head = (
            f"effective bias: {'PASSED' if self.passed else 'FAILED'}, max error {self.max_error:.3g} "
            f"(worst error / bound {self.worst_ratio:.3g}); {self.tolerance}"
        )
        return "\n".join([head, *self.diagnosis(), *self.details()])


def _tolerance_text(dtype: str, bias_scale: float, rtol: float | None, atol: float | None) -> str:
    u = UNIT_ROUNDOFF[dtype]
    read = f"{READOUT_ULPS} u (1 + tiny / P), u = 2^{round(math.log2(u))}, tiny = {SMALLEST_NORMAL[dtype]:.3g}"
    if rtol is not None or atol is not None:
        part = f"user override {atol or 0.0:.3g} + {rtol or 0.0:.3g} |beta|"
    else:
        s = "" if bias_scale == 1.0 else f" * {bias_scale:.4g} (the scale the bias is multiplied by)"
        part = f"{BIAS_TOLERANCES[dtype]:.1e} * max(1, |b|){s}"
    return (
        f"|log P - beta - c_row| <= {part} + {read} ({dtype}); entries whose reference probability is below "
        f"tiny or {READABLE_RATIO:.0e} of the row's largest are not readable"
    )


def compare_bias(
    probs: Any,
    bias: Any,
    q_pos: Any,
    k_pos: Any,
    /,
    *,
    dtype: str,
    bias_scale: float = 1.0,
    keys: Sequence[int] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    magnitude: Any = None,
) -> EffectiveBiasResult:
    r"""Compare probabilities P read from a candidate with a reference bias, up to a constant per row.

    Parameters
    ----------
    probs : array (B, H, Sq, Sk)
        The candidate's probabilities (:func:`read_probabilities`).
    bias : array (H, Sq, Sk) or (B, H, Sq, Sk)
        The reference bias b in float64, -inf on masked keys (:func:`reference_bias`); no NaN or +inf.
    q_pos, k_pos : integer arrays (Sq,), (Sk,)
        The positions, for the offsets Delta = q_pos - k_pos of the report.
    dtype : {"float64", "float32", "float16", "bfloat16"}
        The candidate's output dtype: it decides what is readable and the bound.
    bias_scale : float
        The factor softmax applies to the bias: the attention scale for ``placement="pre_scale"``
        (softmax((q k^T + b) * scale)), 1 for "post_scale". The reference effective bias is
        :math:`\beta = \mathrm{bias\_scale} \cdot b`.
    keys : sequence of int, optional
        The key indices that were read (:func:`probe_keys`); the other columns are "not read". Default: all.
    rtol, atol : float, optional
        Replace the bias part of the bound by ``atol + rtol * |beta|``.
    magnitude : array_like, optional
        The magnitude m of each entry as an implementation computes it (the family's
        :meth:`~relpos_ref.families.BiasFamily.bias_magnitude`: the sum of the absolute terms for a sum with
        cancellation), (H, Sq, Sk) like ``bias``; default :math:`|b|`. The bias part of the bound uses
        :math:`\max(1, m)`, as ``check_bias`` does.

    Returns
    -------
    EffectiveBiasResult

    Notes
    -----
    The bound of entry j is :math:`\tau_j = t\,s \max(1, m_j) + 8u\,(1 + \mathrm{tiny} / P_j)`: the bias
    tolerance of the dtype (``BIAS_TOLERANCES``, elementwise, times the scale s = ``bias_scale``) plus the readout's
    own error, a few roundings of P to a format with unit roundoff u (relative, larger for subnormal P).
    """
    p = np.array(probs, dtype=np.float64, copy=True)
    if p.ndim != 4:
        msg = f"probs: expected probabilities of shape (B, H, Sq, Sk), got shape {p.shape}"
        raise ValueError(msg)
    b = np.asarray(bias, dtype=np.float64)
    if b.ndim == 3:
        b = b[None]
    if b.ndim != 4 or b.shape[1:] != p.shape[1:] or b.shape[0] not in (1, p.shape[0]):
        msg = f"bias: expected shape (H, Sq, Sk) or (B, H, Sq, Sk) matching probs {p.shape}, got {np.shape(bias)}"
        raise ValueError(msg)
    if np.isnan(b).any() or (b == np.inf).any():
        msg = "bias: expected finite values or -inf (masked keys), got NaN or +inf"
        raise ValueError(msg)
    qp, kp = np.asarray(q_pos), np.asarray(k_pos)
    if qp.shape != (p.shape[2],) or kp.shape != (p.shape[3],) or qp.dtype.kind not in "iu" or kp.dtype.kind not in "iu":
        want = f"({p.shape[2]}, {p.shape[3]})"
        got = f"{qp.shape} {qp.dtype}, {kp.shape} {kp.dtype}"
        msg = f"q_pos, k_pos: expected integer arrays of lengths {want}, got {got}"
        raise ValueError(msg)
    _checks.option("dtype", dtype, FLOAT_DTYPES)
    s = _checks.real_scalar("bias_scale", bias_scale, positive=True)
    if rtol is not None:
        _checks.real_scalar("rtol", rtol, nonnegative=True)
    if atol is not None:
        _checks.real_scalar("atol", atol, nonnegative=True)
    read = np.zeros(p.shape[3], dtype=bool)
    if keys is None:
        read[:] = True
    else:
        idx = np.asarray(keys)
        if idx.ndim != 1 or idx.dtype.kind not in "iu" or (idx.size and (idx.min() < 0 or idx.max() >= p.shape[3])):
            msg = f"keys: expected key indices in [0, {p.shape[3]}), got {keys!r}"
            raise ValueError(msg)
        read[idx] = True
    b = np.broadcast_to(b, p.shape)
    if magnitude is None:
        mag = np.abs(b)
    else:
        mag = np.asarray(magnitude, dtype=np.float64)
        mag = mag[None] if mag.ndim == 3 else mag
        try:
            mag = np.broadcast_to(mag, p.shape)
        except ValueError:
            msg = f"magnitude: expected the shape of bias {np.shape(bias)}, got {np.shape(magnitude)}"
            raise ValueError(msg) from None
    return _compare(p, b, mag, qp, kp, read, dtype=dtype, scale=s, rtol=rtol, atol=atol)


def _compare(
    p: np.ndarray,
    b: np.ndarray,
    mag: np.ndarray,
    qp: np.ndarray,
    kp: np.ndarray,
    read: np.ndarray,
    *,
    dtype: str,
    scale: float,
    rtol: float | None,
    atol: float | None,
) -> EffectiveBiasResult:
    masked = b == -np.inf
    beta = np.where(masked, -np.inf, b * scale)
    empty_row = masked.all(axis=-1)
    active = ~empty_row[..., None] & read
    # The reference log-probabilities (exact enough in float64) decide what the dtype can resolve.
    top = np.max(beta, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", under="ignore"):
        lse = top + np.log(np.sum(np.exp(beta - top), axis=-1, keepdims=True))
    logp_ref = beta - np.where(np.isfinite(lse), lse, 0.0)
    kept = active & ~masked
    tiny = SMALLEST_NORMAL[dtype]
    readable = kept & (logp_ref >= math.log(tiny)) & (beta - top >= math.log(READABLE_RATIO))
    unreadable = kept & ~readable
    invalid = active & ~(np.isfinite(p) & (p >= 0))
    leak = active & masked & ~invalid & (p > 0)
    good = kept & ~invalid
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(np.where(good, p, np.nan))
        d = np.where(good, logp - beta, np.nan)
        read_err = READOUT_ULPS * UNIT_ROUNDOFF[dtype] * (1.0 + tiny / np.where(p > 0, p, np.inf))
    if rtol is not None or atol is not None:
        bias_tol = (atol or 0.0) + (rtol or 0.0) * np.abs(np.where(kept, beta, 0.0))
    else:
        bias_tol = BIAS_TOLERANCES[dtype] * scale * np.maximum(1.0, np.where(kept, mag, 0.0))
    tol = bias_tol + read_err
    # One constant per row: feasible when some c lies within every readable entry's interval and above every
    # unreadable entry's lower limit; then c is the middle of what is allowed, else the median (most entries right).
    rd = readable & good
    lo = np.max(np.where((rd | (unreadable & good & (p > 0))), d - tol, -np.inf), axis=-1)
    hi = np.min(np.where(rd, d + tol, np.inf), axis=-1)
    hi = np.where((readable & ~good).any(axis=-1), -np.inf, hi)
    feasible = lo <= hi
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice": rows without a readable entry
        med = np.nanmedian(np.where(rd & np.isfinite(d), d, np.nan), axis=-1)
    med = np.where(np.isfinite(med), med, 0.0)
    with np.errstate(invalid="ignore"):  # -inf + inf on rows without entries; np.where drops it
        mid = np.where(np.isfinite(lo) & np.isfinite(hi), 0.5 * (lo + hi), np.where(np.isfinite(lo), lo, hi))
    c = np.where(feasible, np.where(np.isfinite(mid), mid, 0.0), med)[..., None]
    e = d - c
    with np.errstate(invalid="ignore"):
        ratio = np.where(readable, np.abs(e) / tol, 0.0)
        ratio = np.where(unreadable & good, np.maximum(e, 0.0) / tol, ratio)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    ratio = np.where(leak | invalid, np.inf, ratio)
    failed = ratio > 1.0
    residual = np.where(readable | (failed & unreadable), e, np.nan)
    residual = np.where(leak, np.inf, residual)
    err_r = np.where(readable, np.abs(np.where(np.isnan(e), np.inf, e)), 0.0)
    max_error = float(np.max(np.where(leak | invalid, np.inf, err_r), initial=0.0))
    if (failed & unreadable).any():
        max_error = max(max_error, float(np.max(np.where(failed & unreadable, e, 0.0))))
    counts = {
        "readable": int(readable.sum()),
        "unreadable": int(unreadable.sum()),
        "masked": int((active & masked).sum()),
        "not_read": int((~empty_row[..., None] & ~read).sum()),
        "empty_rows": int(empty_row.sum()),
        "failed": int(failed.sum()),
        "masked_leaks": int(leak.sum()),
    }
    delta = qp[:, None].astype(np.int64) - kp[None, :].astype(np.int64)
    worst_index = worst_values = None
    if failed.any():
        flat = int(np.argmax(np.where(failed, ratio, -1.0)))
        worst_index = tuple(int(i) for i in np.unravel_index(flat, p.shape))
        pv, cv = float(p[worst_index]), float(c[worst_index[:3]][0])
        eff = math.log(pv) - cv if math.isfinite(pv) and pv > 0 else (-math.inf if pv == 0 else math.nan)
        worst_values = (eff, float(beta[worst_index]))
    kinds = np.where(invalid, 3, np.where(leak, 2, np.where(readable & (p == 0), 1, 0)))
    groups = _worst_groups(failed, kinds, ratio, e, tol, p, delta)
    fit = readable & good & (p >= tiny)  # a subnormal P has too few digits to fit a slope to
    heads = _head_summaries(e, logp, beta, tol, (readable, fit, failed & readable, failed & unreadable), delta)
    return EffectiveBiasResult(
        passed=not bool(failed.any()),
        dtype=dtype,
        max_error=max_error,
        bound=float(np.max(np.where(readable, tol, 0.0), initial=0.0)),
        worst_ratio=float(np.max(ratio, initial=0.0)),
        counts=counts,
        worst=groups,
        heads=heads,
        findings=_mask_findings(leak, delta),
        residual=residual,
        q_pos=qp.copy(),
        k_pos=kp.copy(),
        worst_index=worst_index,
        worst_values=worst_values,
        tolerance=_tolerance_text(dtype, scale, rtol, atol),
    )


def _delta_bin(delta: np.ndarray) -> np.ndarray:
    """0 for Delta = 0, +-(k + 1) for 2^k <= |Delta| < 2^(k+1)."""
    mag = np.abs(delta)
    k = np.where(mag > 0, np.floor(np.log2(np.maximum(mag, 1))).astype(np.int64) + 1, 0)
    return np.sign(delta) * k


def _worst_groups(
    failed: np.ndarray,
    kinds: np.ndarray,
    ratio: np.ndarray,
    e: np.ndarray,
    tol: np.ndarray,
    p: np.ndarray,
    delta: np.ndarray,
) -> tuple[WorstGroup, ...]:
    idx = np.nonzero(failed)
    if not len(idx[0]):
        return ()
    h, i, j = idx[1], idx[2], idx[3]
    dl = delta[i, j]
    key = np.stack([h, kinds[idx], _delta_bin(dl)], axis=1)
    uniq, inverse = np.unique(key, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    r = ratio[idx]
    groups = []
    for g in range(len(uniq)):
        sel = np.nonzero(inverse == g)[0]
        best = sel[np.argmax(r[sel])]
        at = tuple(a[best] for a in idx)
        groups.append(
            (
                float(r[best]),
                WorstGroup(
                    head=int(uniq[g, 0]),
                    kind=("value", "zero", "masked", "invalid")[int(uniq[g, 1])],
                    delta_lo=int(dl[sel].min()),
                    delta_hi=int(dl[sel].max()),
                    count=len(sel),
                    error=float(e[at]),
                    bound=float(tol[at]),
                    probability=float(p[at]),
                ),
            )
        )
    groups.sort(key=lambda t: -t[0])
    return tuple(g for _, g in groups[:WORST_GROUPS])


def _row_fit(x: np.ndarray, y: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per head: the least-squares slope of y against x with one intercept per (batch, row), the largest residual,
    and sum of squared deviations of x (0: no row with two distinct x)."""
    n = sel.sum(axis=-1, keepdims=True)
    x = np.broadcast_to(x, y.shape)
    xs, ys = np.where(sel, x, 0.0), np.where(sel, y, 0.0)
    mx = xs.sum(axis=-1, keepdims=True) / np.maximum(n, 1)
    my = ys.sum(axis=-1, keepdims=True) / np.maximum(n, 1)
    dx, dy = np.where(sel, x - mx, 0.0), np.where(sel, y - my, 0.0)
    sxx = (dx * dx).sum(axis=(0, 2, 3))
    slope = np.where(sxx > 0, (dx * dy).sum(axis=(0, 2, 3)) / np.where(sxx > 0, sxx, 1.0), 0.0)
    resid = np.abs(np.where(sel, dy - slope[None, :, None, None] * dx, 0.0)).max(axis=(0, 2, 3), initial=0.0)
    return slope, resid, sxx


def _head_summaries(
    e: np.ndarray,
    logp: np.ndarray,
    beta: np.ndarray,
    tol: np.ndarray,
    masks: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    delta: np.ndarray,
) -> tuple[HeadSummary, ...]:
    """Each head's summary; ``masks``: readable, fitted (readable with a normal P), failed readable, failed
    unreadable entries."""
    readable, ok, bad_read, bad_unread = masks
    dist = np.abs(delta).astype(np.float64)[None, None]
    with np.errstate(invalid="ignore"):
        y_eff = np.where(ok, logp, 0.0)
        y_ref = np.where(ok, beta, 0.0)
        slope_e, _, sxx = _row_fit(dist, y_eff, ok)
        slope_r, resid_r, _ = _row_fit(dist, y_ref, ok)
        slope_d, resid_d, _ = _row_fit(dist, y_eff - y_ref, ok)
    out = []
    for h in range(e.shape[1]):
        sel, bad_h = ok[:, h], bad_read[:, h] | bad_unread[:, h]
        n_bad = int(bad_h.sum())
        max_err = float(np.max(np.abs(e[:, h][readable[:, h] | bad_h]), initial=0.0))
        tmax = float(np.max(tol[:, h][sel], initial=0.0))
        span = float(np.ptp(dist[0, 0][np.any(sel, axis=0)])) if sel.any() else 0.0
        linear = bool(sxx[h] > 0 and resid_d[h] <= 2 * tmax and abs(slope_d[h]) * span > tmax)
        findings: list[str] = []
        if n_bad:
            findings += _slope_finding(h, linear, float(slope_e[h]), float(slope_r[h]), float(resid_r[h]), tmax)
            if not linear:
                findings += _distance_finding(h, e[:, h], sel, bad_h, np.abs(delta))
                findings += _query_finding(h, logp[:, h], beta[:, h], sel, tmax)
        out.append(
            HeadSummary(
                head=h,
                readable=int(readable[:, h].sum()),
                failed=int(bad_read[:, h].sum()),
                failed_unreadable=int(bad_unread[:, h].sum()),
                max_error=max_err,
                slope=float(slope_e[h]),
                reference_slope=float(slope_r[h]),
                linear=linear,
                findings=tuple(findings),
            )
        )
    return tuple(out)


def _slope_finding(h: int, linear: bool, s_eff: float, s_ref: float, resid_ref: float, tmax: float) -> list[str]:
    if not linear:
        return []
    if resid_ref <= tmax and s_ref != 0:
        text = (
            f"head {h}: the effective bias is linear in |Delta| with slope {s_eff:.6g} where the reference's is "
            f"{s_ref:.6g} ({s_eff / s_ref:.4g} times): a wrong slope"
        )
        if s_ref < 0:
            text += f" (a penalty of {-s_eff:.6g} per position instead of {-s_ref:.6g})"
        return [text]
    return [
        f"head {h}: effective - reference grows linearly with |Delta|, {s_eff - s_ref:+.6g} per position: a linear "
        "term added to the bias (a slope on top of the family's)"
    ]


def _distance_finding(h: int, e: np.ndarray, sel: np.ndarray, bad: np.ndarray, dist: np.ndarray) -> list[str]:
    """The bias right up to a distance and wrong past it (a format that stops holding integers)."""
    dist = np.broadcast_to(dist, e.shape)
    dmin = int(dist[bad].min())
    good_below = sel & ~bad & (dist < dmin)
    if dmin < 128 or not good_below.any() or int(dist[good_below].max()) < dmin // 2:
        return []
    t = 2 ** math.floor(math.log2(dmin - 1))
    worst = float(np.max(np.abs(e[bad & np.isfinite(e)]), initial=0.0))
    head = f"head {h}: right for |Delta| <= {dmin - 1}, wrong from |Delta| = {dmin} on (up to {worst:.3g})"
    fmt = {2048: ("float16", 2048), 256: ("bfloat16", 256)}.get(t)
    if fmt is not None:
        return [f"{head}: distances held in {fmt[0]}, whose integers are exact only up to {fmt[1]}"]
    return [f"{head}: an error that starts at a distance (a precision or range limit of the distance)"]


def _query_finding(h: int, logp: np.ndarray, beta: np.ndarray, sel: np.ndarray, tmax: float) -> list[str]:
    """Every query row with the same bias over the keys (up to a constant) while the reference's rows differ."""
    if logp.shape[1] < 2:
        return []
    same, ref_differs = True, False
    for bi in range(logp.shape[0]):
        counts = sel[bi].sum(axis=-1)
        r = int(np.argmax(counts))
        both = sel[bi] & sel[bi, r][None]
        use = both.sum(axis=-1) >= 2
        if not use.sum() >= 2:
            return []
        with np.errstate(invalid="ignore"):
            de = np.where(both, logp[bi] - logp[bi, r][None], np.nan)[use]
            dr = np.where(both, beta[bi] - beta[bi, r][None], np.nan)[use]
        spread_e = np.nanmax(de, axis=-1) - np.nanmin(de, axis=-1)
        spread_r = np.nanmax(dr, axis=-1) - np.nanmin(dr, axis=-1)
        same &= bool(np.all(spread_e <= 2 * tmax))
        ref_differs |= bool(np.any(spread_r > 4 * tmax))
    if same and ref_differs:
        return [
            f"head {h}: every query row gets the same bias over the keys (up to a row constant) while the "
            "reference's rows differ: the bias ignores the query position (as a decode path that takes one query "
            "position for all rows)"
        ]
    return []


def _mask_findings(leak: np.ndarray, delta: np.ndarray) -> tuple[str, ...]:
    if not leak.any():
        return ()
    dl = np.broadcast_to(delta, leak.shape)[leak]
    heads = sorted(set(np.nonzero(leak)[1].tolist()))
    where = f"heads {heads[0]}..{heads[-1]}" if len(heads) > 1 else f"head {heads[0]}"
    if np.all(dl == -1):
        return (
            f"probability on the key right after the query (Delta = -1) in {where}: the causal mask is off by one "
            "(k_pos <= q_pos + 1)",
        )
    if np.all(dl < 0):
        return (f"probability on keys after the query (Delta {int(dl.min())}..{int(dl.max())}) in {where}",)
    return (f"probability on keys the reference masks (Delta {int(dl.min())}..{int(dl.max())}) in {where}",)
