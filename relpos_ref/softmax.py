r"""The biased softmax: probabilities from scores, an additive bias, a boolean mask and a scale."""

from __future__ import annotations

import math
from typing import Any

from . import _checks
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

    Notes
    -----
    Evaluated as :math:`e^{z - m}` with :math:`m` the row maximum over attended entries, so logits of any finite
    magnitude neither overflow nor lose the dominant key. float16 (and bfloat16) inputs are computed in float32 and
    the probabilities rounded once.
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
    _attended_values("scores", scores, mask, xp)
    if bias is not None:
        _attended_values("bias", bias, mask, xp)
    out_dtype = scores.dtype if bias is None else _result_dtype(xp, scores.dtype, bias.dtype)
    cdtype = _checks.compute_dtype(xp, out_dtype)
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
            f"{name}: expected finite values or -inf on attended entries, got NaN or +inf in {_checks._preview(value)}"
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
    """Unchecked biased softmax in ``cdtype``; returns (probs, lse), both in ``cdtype``."""
    z = xp.astype(scores, cdtype) if scores.dtype != cdtype else scores
    if bias is not None:
        b = xp.astype(bias, cdtype) if bias.dtype != cdtype else bias
        z = z * scale + b if placement == "post_scale" else (z + b) * scale
    elif scale != 1.0:
        z = z * scale
    neg_inf = -float("inf")
    if mask is not None:
        z = xp.where(mask, z, neg_inf)
    m = xp.max(z, axis=-1, keepdims=True)
    empty = m == neg_inf
    # A row with nothing to attend has max -inf; shifting by 0 instead keeps exp(-inf) = 0 and avoids -inf - -inf.
    m = xp.where(empty, 0.0, m)
    e = xp.exp(z - m)
    total = xp.sum(e, axis=-1, keepdims=True)
    safe_total = xp.where(empty, 1.0, total)
    probs = e / safe_total
    lse = m + xp.log(safe_total)
    fill, lse_fill = fully_masked_fill(fully_masked)
    probs = xp.where(empty, fill, probs)
    lse = xp.where(empty, lse_fill, lse)
    return probs, lse[..., 0]
