r"""The biased softmax: probabilities from scores, an additive bias, a boolean mask and a scale."""

from __future__ import annotations

import math
from typing import Any

from . import _checks
from ._checks import quiet_overflow
from .conventions import BACKENDS, FULLY_MASKED, PLACEMENTS

__all__ = ["biased_softmax", "fully_masked_fill"]


def biased_softmax(
    scores: Any,
    bias: Any = None,
    *,
    mask: Any = None,
    scale: float = 1.0,
    placement: str = "post_scale",
    fully_masked: str = "zero",
    return_lse: bool = False,
    backend: str = "reference",
    xp: Any = None,
) -> Any:
    r"""Softmax over the last axis of biased, scaled, masked scores.

    .. math::

        z_{ij} = \begin{cases} s_{ij}\,\tau + b_{ij} & \text{post\_scale} \\
                               (s_{ij} + b_{ij})\,\tau & \text{pre\_scale} \end{cases}
        \qquad p_{ij} = \frac{[M_{ij}]\, e^{z_{ij}}}{\sum_k [M_{ik}]\, e^{z_{ik}}},
        \qquad \mathrm{lse}_i = \log \sum_k [M_{ik}]\, e^{z_{ik}}

    with :math:`\tau` the scale and :math:`M` the mask. ``post_scale`` is the form of the official ALiBi code,
    FlashAttention, PyTorch SDPA and BLOOM; ``pre_scale`` is the textbook form and Falcon's.
    ``pre_scale`` with bias b equals ``post_scale`` with bias :math:`b\tau`.

    Parameters
    ----------
    scores : float array (..., Sk)
        Raw query-key products.
    bias : float array broadcastable to ``scores``, optional
        Additive bias; -inf entries act as a mask.
    mask : bool array broadcastable to ``scores``, optional
        True where the key may be attended. Masked entries get probability exactly 0.
    scale : float, default 1.0
        :math:`\tau > 0`.
    placement : {"post_scale", "pre_scale"}
    fully_masked : {"zero", "nan"}
        Rows with nothing to attend: ``"zero"`` gives all-zero probabilities and lse = -inf (PyTorch SDPA >= 2.5,
        FlashAttention); ``"nan"`` gives the NaN of a naive softmax and lse = NaN.
    return_lse : bool, default False
        Also return the natural-log log-sum-exp of the final logits, shape ``scores.shape[:-1]``.
    backend : {"reference", "fused"}
        ``"fused"`` runs :func:`relpos_ref.cuda.fused_biased_softmax`: one CUDA kernel on CuPy (B, H, Sq, Sk) or
        (H, Sq, Sk) scores (a ``TypeError`` naming ``scores`` for other inputs); its probabilities have the dtype of
        ``scores``. To compute a family's bias inside the kernel, call that function with the family directly.
    xp : array namespace, optional

    Returns
    -------
    probs : array of the dtype of ``scores`` and ``bias`` combined
    lse : array, only with ``return_lse=True``
        In the compute dtype: float64 for float64 inputs, float32 otherwise.

    Raises
    ------
    TypeError, ValueError
        A bad argument, named in the message; NaN or +inf on attended entries; probabilities (the scores' shape in
        the compute dtype) larger than ``_checks.MAX_ARRAY_BYTES`` (8 GiB), checked before allocating:
        :func:`relpos_ref.attention` streams instead.

    Notes
    -----
    Evaluated as :math:`e^{z - m}` with :math:`m` the row maximum over attended entries, so logits of any finite
    magnitude neither overflow nor lose the dominant key. float16 (and bfloat16) inputs are computed in float32 and
    the probabilities rounded once.

    Finite inputs whose logit or an intermediate (:math:`s\tau`, :math:`s + b`) overflows the compute dtype, such as
    ``scores = [1e308, 0]`` with ``bias = [1e308, 0]``, are detected after the first pass (a row maximum of +inf or
    NaN, an intermediate infinity, or an empty row that has attended entries) and recomputed exactly on
    :math:`z / 2^k`, with :math:`z - m = 2^k (z/2^k - m/2^k)`; dividing by a power of two is exact, so the
    probabilities are those of the exact logits. Only the lse can then overflow, to :math:`\pm\infty`, and only
    when its exact value lies outside the dtype's range.
    """
    _checks.option("backend", backend, BACKENDS)
    if backend == "fused":
        from .cuda import fused_biased_softmax

        return fused_biased_softmax(
            scores,
            bias,
            mask=mask,
            scale=scale,
            placement=placement,
            fully_masked=fully_masked,
            return_lse=return_lse,
        )
    xp = _checks.namespace(scores, bias, mask, xp=xp, names=("scores", "bias", "mask"))
    _checks.float_array("scores", scores, xp)
    if scores.ndim < 1:
        msg = "scores: expected an array with at least one axis (the key axis), got a 0-d array"
        raise ValueError(msg)
    _checks.nonempty("scores", scores)
    if bias is not None:
        _checks.float_array("bias", bias, xp)
        _checks.broadcastable("bias", bias, tuple(scores.shape))
    if mask is not None:
        _checks.bool_array("mask", mask, xp)
        _checks.broadcastable("mask", mask, tuple(scores.shape))
    scale = _checks.real_scalar("scale", scale, positive=True)
    _checks.option("placement", placement, PLACEMENTS)
    _checks.option("fully_masked", fully_masked, FULLY_MASKED)
    _checks.boolean("return_lse", return_lse)
    out_dtype = scores.dtype if bias is None else _result_dtype(xp, scores.dtype, bias.dtype)
    cdtype = _checks.compute_dtype(xp, out_dtype)
    # The probabilities have the scores' full shape, and so have the checks' temporaries: a zero-stride view of a
    # few bytes must fail here, not as a MemoryError inside the finiteness check.
    nbytes = xp.finfo(cdtype).bits // 8
    _checks.result_size("scores", tuple(scores.shape), nbytes, what=f"probabilities (computed in {cdtype})")
    _attended_values("scores", scores, mask, xp)
    if bias is not None:
        _attended_values("bias", bias, mask, xp)
    probs, lse = softmax_core(xp, scores, bias, mask, scale, placement, fully_masked, cdtype)
    if probs.dtype != out_dtype:
        probs = xp.astype(probs, out_dtype)
    return (probs, lse) if return_lse else probs


def _attended_values(name: str, value: Any, mask: Any, xp: Any) -> None:
    """Reject NaN and +inf on attended entries: the softmax of such a row is undefined (inf - inf).

    -inf is a mask; masked entries may hold anything, since they never reach the result.
    """
    bad = xp.isnan(value) | (value == float("inf"))
    if mask is not None:
        bad = bad & mask
    if bool(xp.any(bad)):
        msg = (
            f"{name}: expected finite values or -inf on attended entries, got NaN or +inf in "
            f"{_checks._preview(value, bad)}"
        )
        raise ValueError(msg)


def _result_dtype(xp: Any, a: Any, b: Any) -> Any:
    try:
        return xp.result_type(a, b)
    except (TypeError, ValueError):  # extension dtypes (bfloat16) do not promote through the standard table
        return a if a == b else xp.float32


def fully_masked_fill(fully_masked: str) -> tuple[float, float]:
    """(output, lse) of a row with nothing to attend: (0, -inf) for ``"zero"``, (NaN, NaN) for ``"nan"``.

    The one statement of the rule: the softmax, the streamed attention and its backward all fill empty rows here.
    """
    return (0.0, -math.inf) if fully_masked == "zero" else (math.nan, math.nan)


def softmax_core(
    xp: Any,
    scores: Any,
    bias: Any,
    mask: Any,
    scale: float,
    placement: str,
    fully_masked: str,
    cdtype: Any,
) -> tuple[Any, Any]:
    """Unchecked biased softmax in ``cdtype``; returns (probs, lse), both in ``cdtype``.

    One pass as written; an overflow (see :func:`biased_softmax`) is detected from quantities that pass computes
    anyway or, for the two placements whose intermediate can overflow while the logit does not, from one extra
    reduction, and then the whole array is recomputed by the exact rescaled pass.
    """
    s = xp.astype(scores, cdtype) if scores.dtype != cdtype else scores
    b = None if bias is None else (xp.astype(bias, cdtype) if bias.dtype != cdtype else bias)
    emax = _checks.max_exponent(xp, cdtype)
    fill, lse_fill = fully_masked_fill(fully_masked)
    neg_inf = -math.inf
    with quiet_overflow():
        if math.frexp(scale)[1] < emax - 1:  # the scale itself fits the compute dtype
            probs, lse, ok = _fast_pass(xp, s, b, mask, scale, placement, fill, lse_fill)
            if ok:
                return probs, lse
        # The exact pass: the exponent k makes every attended z / 2^k, and each intermediate, at most a quarter of
        # the largest finite number; masked entries stay -inf and rows with nothing attended get the fill.
        k = _rescale_exponent(xp, s, b, scale, placement, emax)
        f = 2.0**-k
        attended = _attended(xp, s, b, mask)
        h = xp.where(attended, _biased(xp, s, b, scale, placement, f), neg_inf)
        m = xp.max(h, axis=-1, keepdims=True)
        empty = m == neg_inf
        m = xp.where(empty, 0.0, m)
        d = h - m
        e = xp.exp(d * 2.0**k if k else d)
        total = xp.where(empty, 1.0, xp.sum(e, axis=-1, keepdims=True))
        probs = xp.where(empty, fill, e / total)
        lse = m + xp.log(total) * f if k else m + xp.log(total)
        lse = xp.where(empty, lse_fill, lse * 2.0**k if k else lse)
    return probs, lse[..., 0]


def _fast_pass(
    xp: Any, s: Any, b: Any, mask: Any, scale: float, placement: str, fill: float, lse_fill: float
) -> tuple[Any, Any, bool]:
    """The biased softmax as written, and whether it is exact (False: an overflow, recompute with a rescale)."""
    neg_inf = -math.inf
    z = _biased(xp, s, b, scale, placement, 1.0)
    if b is not None and _intermediate_overflow(xp, s, b, scale, placement):
        return z, z, False
    if mask is not None:
        z = xp.where(mask, z, neg_inf)
    m = xp.max(z, axis=-1, keepdims=True)
    # NaN (inf - inf) or +inf in a row maximum: a logit overflowed upwards.
    if not bool(xp.all(m < math.inf)):
        return z, z, False
    empty = m == neg_inf
    if bool(xp.any(empty)) and bool(xp.any(empty & xp.any(_attended(xp, s, b, mask), axis=-1, keepdims=True))):
        return z, z, False  # every attended logit of a row overflowed downwards
    # A row with nothing to attend has max -inf; shifting by 0 instead keeps exp(-inf) = 0 and avoids -inf - -inf.
    m = xp.where(empty, 0.0, m)
    e = xp.exp(z - m)
    total = xp.sum(e, axis=-1, keepdims=True)
    safe_total = xp.where(empty, 1.0, total)
    probs = e / safe_total
    lse = m + xp.log(safe_total)
    probs = xp.where(empty, fill, probs)
    lse = xp.where(empty, lse_fill, lse)
    return probs, lse[..., 0], True


def _biased(xp: Any, s: Any, b: Any, scale: float, placement: str, f: float) -> Any:
    """Logits times ``f`` (a power of two; 1 computes exactly the documented formula, with the same roundings)."""
    if b is None:
        return s * (scale * f) if scale * f != 1.0 else s
    if f == 1.0:
        return s * scale + b if placement == "post_scale" else (s + b) * scale
    return s * (scale * f) + b * f if placement == "post_scale" else (s * f + b * f) * scale


def _intermediate_overflow(xp: Any, s: Any, b: Any, scale: float, placement: str) -> bool:
    r"""Whether :math:`s\tau` overflowed (post_scale, :math:`\tau > 1`) on an entry with finite operands: the bias
    can bring such a logit back into range, above others, so its -inf is not the harmless overflow of a logit below
    the range (whose exponential is 0 next to any finite logit). In the other cases the only overflow is that of the
    logit itself or, pre_scale, of :math:`s + b`, which the positive scale keeps below every finite entry: no check,
    no cost. Here: one more reduction.
    """
    if placement != "post_scale" or scale <= 1.0:
        return False
    t = s * scale
    inf = xp.isinf(t)
    if not bool(xp.any(inf)):
        return False
    return bool(xp.any(inf & xp.isfinite(s) & xp.isfinite(b)))


def _attended(xp: Any, s: Any, b: Any, mask: Any) -> Any:
    """True where an entry enters the softmax: not masked, and no -inf in its score or bias."""
    keep = s > -math.inf
    if b is not None:
        keep = keep & (b > -math.inf)
    return keep if mask is None else keep & mask


def _finite_abs_max(xp: Any, a: Any) -> float:
    return float(xp.max(xp.where(xp.isfinite(a), xp.abs(a), 0.0)))


def _rescale_exponent(xp: Any, s: Any, b: Any, scale: float, placement: str, emax: int) -> int:
    r"""The smallest k >= 0 with every attended :math:`|z| / 2^k`, and the intermediates, below :math:`2^{e-3}`."""
    es = _checks.log2_ceil(_finite_abs_max(xp, s))
    eb = -math.inf if b is None else _checks.log2_ceil(_finite_abs_max(xp, b))
    et = _checks.log2_ceil(scale)
    # post_scale: |s| tau + |b|; pre_scale: (|s| + |b|) tau, and the sum before the scale.
    e = max(es + et, eb) + 1 if placement == "post_scale" else max(es, eb) + 1 + max(et, 0)
    # The scale times 2^-k must itself be finite (a scale above the dtype's range with tiny scores).
    return int(max(0, e + 3 - emax, et + 2 - emax))
