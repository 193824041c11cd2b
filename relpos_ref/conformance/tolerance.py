r"""The conformance tolerance rule.

Three cases, chosen by what is compared (``spec/tolerances.md``, section "Conformance tolerance rule", states the rule
with its sources):

* **Integer outputs** (T5 bucket indices): exact equality.
* **Attention outputs and log-sum-exp** (FlashAttention's rule, ``tests/test_flash_attn.py``): the candidate's max
  absolute error against the float64 reference may be at most :math:`k` times the max error of a *plain* computation
  in the candidate's dtype, plus a small absolute floor:

  .. math:: \max|c - r_{64}| \le k \max|p - r_{64}| + f_{\mathrm{dtype}}\,\max(1, \max|r_{64}|),\qquad k = 2,

  where :math:`p` is :func:`plain_attention` (every elementwise result rounded to the dtype, matrix products
  accumulated in float32, float64 for float64 inputs). In float32 and float64, where the plain error is the summation
  order's, :math:`\max|p - r_{64}|` is the larger of two plain computations: one through the host's BLAS and one
  accumulating term by term (:func:`_sequential_matmul`, a running row sum): IEEE arithmetic only, so the bound never
  rests on the host's BLAS being unusually accurate (FlashAttention compares with a plain computation in the
  candidate's own library, whose BLAS may be less accurate than NumPy's). The floor :math:`f` keeps float64 and
  float32, whose plain error can be a few ulps, from demanding less than the spread between correct summation orders.
* **Attention gradients** (dq, dk, dv and the bias family's parameter gradients, each array on its own): the same
  rule, with :math:`\max|p - r_{64}|` the larger error of the two plain materialised backwards of
  :func:`plain_attention_vjp` in the candidate's dtype (autograd's, and FlashAttention-2's recompute of the
  probabilities from the log-sum-exp). The second matters in float32 with large logits, where the lse's rounding
  (an ulp of the largest logit) moves every recomputed probability: a correct FlashAttention-style float32 backward
  measured up to 2.8x less accurate there than autograd's, and would fail a bound built from autograd alone.
* **Bias tensors** (no baseline applies: a bias is a short formula of the positions and the parameters, with no
  shape-dependent accumulation): a fixed elementwise tolerance per dtype,
  :math:`|c_{ij} - r_{ij}| \le t_{\mathrm{dtype}} \max(1, m_{ij})`, with :math:`m_{ij}` the magnitude of the entry
  as it is computed (:meth:`~relpos_ref.families.BiasFamily.bias_magnitude`: :math:`|r_{ij}|`, or for a sum that
  cancels, FIRE's MLP and Sandwich's cosines, the sum of its absolute terms).

``rtol``/``atol`` given by the user replace the rule by the elementwise :math:`|c - r| \le \mathrm{atol} +
\mathrm{rtol}\,|r|`; every report says which rule was used.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np

from .._host import numpy_dtype, round_to
from ..tolerances import ATTENTION_FLOORS, ATTENTION_K, BIAS_TOLERANCES

__all__ = [
    "ATTENTION_FLOORS",
    "ATTENTION_K",
    "BIAS_TOLERANCES",
    "Tolerance",
    "attention_tolerance",
    "bias_tolerance",
    "plain_attention",
    "plain_attention_vjp",
    "rule_text",
]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """One comparison's acceptance rule, resolved to numbers.

    Attributes
    ----------
    rule : {"exact", "fixed", "baseline", "user"}
    dtype : str
        The candidate dtype the numbers were chosen for.
    atol, rtol : float
        Elementwise acceptance :math:`|c - r| \\le atol + rtol\\,m` with m the magnitude named in ``text``.
    text : str
        Human-readable statement of the rule and the numbers.
    """

    rule: str
    dtype: str
    atol: float
    rtol: float
    text: str
    baseline_error: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _user(dtype: str, rtol: float | None, atol: float | None) -> Tolerance:
    r = 0.0 if rtol is None else float(rtol)
    a = 0.0 if atol is None else float(atol)
    if not (math.isfinite(r) and math.isfinite(a) and r >= 0 and a >= 0):
        msg = f"rtol, atol: expected finite numbers >= 0, got rtol={rtol!r}, atol={atol!r}"
        raise ValueError(msg)
    return Tolerance(
        "user", dtype, a, r, f"user override: |cand - ref| <= {a:.3g} + {r:.3g} * |ref| elementwise ({dtype})"
    )


def bias_tolerance(dtype: str, *, rtol: float | None = None, atol: float | None = None) -> Tolerance:
    """Tolerance of a bias comparison, elementwise: ``atol`` the floor t and ``rtol`` t of |c - r| <= t max(1, m)."""
    if rtol is not None or atol is not None:
        return _user(dtype, rtol, atol)
    if dtype not in BIAS_TOLERANCES:
        if dtype.startswith(("int", "uint")):
            return Tolerance("exact", dtype, 0.0, 0.0, f"exact equality ({dtype} output)")
        msg = f"dtype: expected one of {', '.join(BIAS_TOLERANCES)} for a bias, got {dtype!r}"
        raise ValueError(msg)
    t = BIAS_TOLERANCES[dtype]
    text = f"fixed per-dtype bias tolerance, elementwise: |cand - ref| <= {t:.1e} * max(1, m), m the entry's magnitude"
    return Tolerance("fixed", dtype, t, t, f"{text} ({dtype})")


def bias_bound(tol: Tolerance, magnitude: np.ndarray) -> np.ndarray:
    """The elementwise bound of a bias ``tol`` on entries of ``magnitude`` (non-finite entries: the floor, since
    only equal infinities agree): ``t max(1, m)``, or the user's ``atol + rtol m``."""
    m = np.where(np.isfinite(magnitude), magnitude, 0.0)
    return tol.atol + tol.rtol * m if tol.rule == "user" else np.maximum(tol.atol, tol.rtol * m)


def attention_tolerance(
    dtype: str, baseline_error: float, scale: float, *, rtol: float | None = None, atol: float | None = None
) -> Tolerance:
    """Tolerance of an attention-output or LSE comparison (FlashAttention's rule unless overridden)."""
    if rtol is not None or atol is not None:
        return _user(dtype, rtol, atol)
    floor = ATTENTION_FLOORS[dtype] * scale
    bound = ATTENTION_K * baseline_error + floor
    text = (
        f"max|cand - ref64| <= {ATTENTION_K:g} * {baseline_error:.3g} (plain {dtype} error) + "
        f"{ATTENTION_FLOORS[dtype]:.0e} * max(1, max|ref|) = {bound:.3g}"
    )
    return Tolerance("baseline", dtype, bound, 0.0, text, baseline_error=baseline_error)


def rule_text(kind: str = "all") -> str:
    """The rule in one line, printed in every report header.

    ``kind`` in {"bias", "attention", "backward", "buckets", "all"}; "all" states the three cases of the forward
    harness (the backward one is the attention rule with another baseline).
    """
    bias = ", ".join(f"{k} {v:.1e}" for k, v in BIAS_TOLERANCES.items())
    floors = ", ".join(f"{k} {v:.0e}" for k, v in ATTENTION_FLOORS.items())
    parts = {
        "buckets": "integer outputs: exact equality",
        "attention": (
            f"attention output/lse: max|cand - ref64| <= {ATTENTION_K:g} x max|plain same-dtype computation - ref64| "
            f"(float32/float64: the larger of BLAS and term-by-term accumulation) + floor x max(1, max|ref64|), "
            f"floor {floors} (FlashAttention's rule)"
        ),
        "bias": f"bias: |cand - ref64| <= t x max(1, m) per entry, m its magnitude (|ref64|; FIRE, Sandwich: the sum "
        f"of the absolute terms), t {bias} (fixed per dtype)",
    }
    if kind == "backward":
        text = (
            f"attention gradients (dq, dk, dv, parameter gradients): max|cand - ref64| <= {ATTENTION_K:g} x "
            f"max|plain same-dtype materialised backward - ref64| (the largest of autograd's and FlashAttention-2's "
            f"lse recompute, through BLAS and, in float32/float64, term by term) "
            f"+ floor x max(1, max|ref64|), floor {floors}, per array (FlashAttention's rule)"
        )
    else:
        text = " | ".join(parts.values()) if kind == "all" else parts[kind]
    return text + "; float64 reference on the inputs the candidate saw (spec/tolerances.md, conformance tolerance rule)"


def _header_rule(kind: str, rtol: float | None, atol: float | None) -> str:
    """A report header's tolerance rule: :func:`rule_text` of ``kind``, or the user's override."""
    if rtol is None and atol is None:
        return rule_text(kind)
    return f"user override: |cand - ref| <= atol + rtol |ref| with rtol={rtol}, atol={atol}"


def plain_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    bias: np.ndarray | None,
    keep: np.ndarray | None,
    *,
    scale: float,
    placement: str,
    dtype: str,
    softcap: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Naive attention in ``dtype``: the baseline of the attention tolerance rule.

    Every elementwise result is rounded to ``dtype``; the two matrix products accumulate in float32 (float64 for
    float64), as PyTorch's eager path and tensor cores do; the softmax subtracts the row maximum. Fully masked rows
    give 0 and lse -inf. Inputs are float64 arrays holding values already representable in ``dtype``; bias
    (B|1, H, Sq, Sk) float64 is rounded to ``dtype`` first (SDPA allocates its bias in the query dtype). ``keep``
    (broadcastable to (B, H, Sq, Sk)) is every mask as -inf (causal, window, lengths, segments); ``softcap`` c
    replaces the scaled score s by c tanh(s / c) before the bias is added, as the reference and FlashAttention do.

    Returns
    -------
    out (B, H, Sq, Dv), lse (B, H, Sq) as float64 arrays of the rounded values.
    """
    f = _plain_forward(q, k, v, bias, keep, scale=scale, placement=placement, dtype=dtype, softcap=softcap)
    return _plain_outputs(f)


def _plain_outputs(f: _Plain) -> tuple[np.ndarray, np.ndarray]:
    """:func:`plain_attention`'s output and lse from its materialised forward."""
    rnd, empty = f.rnd, f.empty
    out = rnd(f.mm(f.p, f.vv))
    out = np.where(empty, 0.0, out)
    lse = (f.m + np.log(f.total))[..., 0].astype(np.float64)
    lse = np.where(empty[..., 0], -np.inf, lse)
    if f.dtype in ("float64", "float32"):
        lse = round_to(lse, f.dtype)
    return out.astype(np.float64), lse


def plain_attention_vjp(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    d_out: np.ndarray,
    bias: np.ndarray | None,
    keep: np.ndarray | None,
    *,
    scale: float,
    placement: str,
    dtype: str,
    method: str = "autograd",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    r"""Naive attention backward in ``dtype``: the baseline of the gradient tolerance rule.

    The forward of :func:`plain_attention`, kept materialised, then the chain rule: :math:`\bar V = P^\top \bar O`,
    :math:`\bar P = \bar O V^\top`, :math:`\bar z = P \odot (\bar P - \delta)`, :math:`\bar Q = \tau \bar z K`,
    :math:`\bar K = \tau \bar z^\top Q` per query head, then summed over the query heads of each key/value head
    (the gradient of ``repeat_interleave``). Two ways to get :math:`P` and :math:`\delta`, both common:

    * ``method="autograd"``: what autograd of the plain forward does: the forward's probabilities and
      :math:`\delta_i = \sum_j P_{ij} \bar P_{ij}`.
    * ``method="recompute"``: FlashAttention-2's backward, materialised: :math:`P = \exp(z - \mathrm{lse})` from the
      rounded log-sum-exp and :math:`\delta_i = \bar O_i \cdot O_i` from the rounded output. Its probabilities carry
      the rounding of the lse, about one ulp of the largest logit, so it is the less accurate of the two when logits
      are large.

    Every elementwise result and every sum is rounded to ``dtype``; matrix products accumulate in float32 (float64
    for float64). Inputs are float64 arrays of values representable in ``dtype``; ``bias`` (B|1, H, Sq, Sk) is
    rounded to ``dtype`` first.

    Returns
    -------
    dq (B, H, Sq, D), dk (B, H_kv, Sk, D), dv (B, H_kv, Sk, Dv) and the cotangent of the bias summed over the batch,
    (H, Sq, Sk) (None without a bias), as float64 arrays of the rounded values. Queries that see no key get zero
    gradients.
    """
    if method not in ("autograd", "recompute"):
        msg = f"method: expected 'autograd' or 'recompute', got {method!r}"
        raise ValueError(msg)
    f = _plain_forward(q, k, v, bias, keep, scale=scale, placement=placement, dtype=dtype)
    parts = _plain_backward(f, d_out, recompute=method == "recompute")
    return parts["dq"], parts["dk"], parts["dv"], parts["dbias"]


def _plain_backward(f: _Plain, d_out: np.ndarray, *, recompute: bool = False) -> dict[str, Any]:
    """:func:`plain_attention_vjp` from the forward ``f``, with its intermediate ``dz`` (per query head)."""
    mm, acc, rnd, qq, kk, vv, sc, z, m, total, p = f.mm, f.acc, f.rnd, f.qq, f.kk, f.vv, f.sc, f.z, f.m, f.total, f.p

    def tr(x: np.ndarray) -> np.ndarray:
        return np.swapaxes(x, -1, -2)

    nb, nh = qq.shape[:2]
    group, nkv = f.group, nh // f.group
    do = d_out.astype(acc)
    dp = rnd(mm(do, tr(vv)))
    if recompute:
        out = rnd(mm(p, vv))
        lse = rnd(m + rnd(np.log(total)))  # empty rows: lse 0 and every z -inf, so P = 0
        p = rnd(np.exp(rnd(z - lse)))
        row = rnd(np.sum(rnd(do * out), axis=-1, keepdims=True, dtype=acc))
    else:
        row = rnd(np.sum(rnd(p * dp), axis=-1, keepdims=True, dtype=acc))
    dv_h = rnd(mm(tr(p), do))
    dz = rnd(p * rnd(dp - row))
    ds = rnd(dz * sc)
    db = dz if f.placement == "post_scale" else ds
    dq = rnd(mm(ds, kk))
    dk_h = rnd(mm(tr(ds), qq))

    def fold(x: np.ndarray) -> np.ndarray:
        if group == 1:
            return x
        return rnd(np.sum(np.reshape(x, (nb, nkv, group, *x.shape[2:])), axis=2, dtype=acc))

    return {
        "dq": dq.astype(np.float64),
        "dk": fold(dk_h).astype(np.float64),
        "dv": fold(dv_h).astype(np.float64),
        "dbias": rnd(np.sum(db, axis=0, dtype=acc)).astype(np.float64) if f.biased else None,
        "dz": dz.astype(np.float64),
    }


class _Plain(NamedTuple):
    dtype: str
    placement: str
    biased: bool
    group: int
    acc: Any
    rnd: Any
    qq: np.ndarray
    kk: np.ndarray
    vv: np.ndarray
    sc: Any
    z: np.ndarray
    m: np.ndarray
    empty: np.ndarray
    total: np.ndarray
    p: np.ndarray
    #: The matrix product of every step: BLAS (``np.matmul``) or :func:`_sequential_matmul`.
    mm: Any = np.matmul


def _plain_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    bias: np.ndarray | None,
    keep: np.ndarray | None,
    *,
    scale: float,
    placement: str,
    dtype: str,
    sequential: bool = False,
    softcap: float | None = None,
) -> _Plain:
    """The materialised forward shared by the plain baselines: logits, row maximum, sum (1 on empty rows), P.

    ``sequential`` accumulates every product and sum one term after the other in the accumulation dtype
    (:func:`_sequential_matmul`, a running sum) instead of through BLAS: IEEE arithmetic alone, the same bits on
    every host, and an error of the size a correct kernel's own summation order can reach.
    """
    acc = np.float64 if dtype == "float64" else np.float32
    mm = _sequential_matmul if sequential else np.matmul
    nd = numpy_dtype(dtype)

    def rnd(x: np.ndarray) -> np.ndarray:
        return np.asarray(x).astype(nd).astype(acc)

    group = q.shape[1] // k.shape[1]
    qq = q.astype(acc)
    kk = np.repeat(k, group, axis=1).astype(acc)
    vv = np.repeat(v, group, axis=1).astype(acc)
    s = rnd(mm(qq, np.swapaxes(kk, -1, -2)))
    sc = acc(scale) if dtype != "float64" else scale
    if softcap is not None:  # c tanh(tau s / c), then the bias: post_scale + b, pre_scale + tau b
        cap = acc(softcap) if dtype != "float64" else float(softcap)
        capped = rnd(cap * rnd(np.tanh(rnd(rnd(s * sc) / cap))))
        z = capped if bias is None else rnd(capped + (rnd(bias) if placement == "post_scale" else rnd(rnd(bias) * sc)))
    elif bias is not None:
        b = rnd(bias)
        z = rnd(rnd(s * sc) + b) if placement == "post_scale" else rnd(rnd(s + b) * sc)
    else:
        z = rnd(s * sc)
    if keep is not None:
        z = np.where(keep, z, -np.inf)
    m = np.max(z, axis=-1, keepdims=True)
    empty = m == -np.inf
    m = np.where(empty, 0.0, m).astype(acc)
    e = rnd(np.exp(rnd(z - m)))
    row_sum = np.cumsum(e, axis=-1, dtype=acc)[..., -1:] if sequential else np.sum(e, axis=-1, keepdims=True, dtype=acc)
    total = np.where(empty, 1.0, rnd(row_sum)).astype(acc)
    return _Plain(
        dtype, placement, bias is not None, group, acc, rnd, qq, kk, vv, sc, z, m, empty, total, rnd(e / total), mm
    )


def _sequential_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` accumulated term by term in ``a``'s dtype: each product and each partial sum rounded, no FMA, no
    blocking; what the baseline of the attention rule uses so that it does not depend on the host's BLAS."""
    k = a.shape[-1]
    out = np.zeros(np.broadcast_shapes((*a.shape[:-1], 1), (*b.shape[:-2], 1, b.shape[-1])), dtype=a.dtype)
    for n in range(k):
        out += a[..., :, n, None] * b[..., n, None, :]
    return out


def worse_of(ref: np.ndarray, *bases: np.ndarray) -> np.ndarray:
    """Elementwise, the baseline farther from ``ref``: its max error over any selection is the largest of theirs."""
    out = bases[0]
    for other in bases[1:]:
        with np.errstate(invalid="ignore"):
            out = np.where(np.abs(other - ref) > np.abs(out - ref), other, out)
    return out
