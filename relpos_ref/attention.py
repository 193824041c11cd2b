r"""Scaled dot-product attention with a relative positional bias, streamed over query blocks."""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import device as array_device

from . import _checks
from .family import BiasFamily
from .positions import ALIGNMENTS, causal_mask, positions
from .softmax import FULLY_MASKED, PLACEMENTS, broadcast_to, softmax_core
from .tensor_bias import TensorBias

__all__ = ["attention"]

# Logit elements per query block when the caller does not choose: 4 Mi elements = 32 MiB in float64, small enough
# to stay in a laptop's memory at any sequence length, large enough to amortise per-block overhead.
_BLOCK_ELEMENTS = 1 << 22


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    bias: Any = None,
    causal: bool = False,
    align: str = "bottom_right",
    scale: float | None = None,
    placement: str = "post_scale",
    mask: Any = None,
    fully_masked: str = "zero",
    return_lse: bool = False,
    block_size: int | None = None,
    xp: Any = None,
) -> Any:
    r"""Attention output :math:`O = \mathrm{softmax}(z)\,V` with a relative positional bias.

    .. math::

        z_{b h i j} = \begin{cases} \tau\, q_{bhi} \cdot k_{b g(h) j} + b_h(p_i, p_j) & \text{post\_scale} \\
                      \tau\,(q_{bhi} \cdot k_{b g(h) j} + b_h(p_i, p_j)) & \text{pre\_scale} \end{cases}

    with :math:`g(h) = \lfloor h / (H / H_{kv}) \rfloor` (grouped-query heads: consecutive query heads share a key/value
    head, as in HF ``repeat_kv`` and FlashAttention), :math:`p` the absolute positions of :func:`relpos_ref.positions`
    for ``align``, and keys after the query removed when ``causal``.

    Parameters
    ----------
    q : float array (B, H, Sq, D)
    k : float array (B, H_kv, Sk, D)
    v : float array (B, H_kv, Sk, Dv)
        Same dtype as ``q``; H divisible by H_kv.
    bias : BiasFamily or float array, optional
        A family object with ``num_heads == H`` (its bias is generated one query block at a time, never as a whole
        (H, Sq, Sk) array), or an array broadcastable to (B, H, Sq, Sk) (-inf entries mask).
    causal : bool, default False
        Keep only keys with :math:`p_j \le p_i`.
    align : {"bottom_right", "top_left"}
        Query positions when Sq != Sk; see :func:`relpos_ref.positions`.
    scale : float, optional
        :math:`\tau`; :math:`1/\sqrt{D}` by default. T5 uses 1.0.
    placement : {"post_scale", "pre_scale"}
    mask : bool array broadcastable to (B, H, Sq, Sk), optional
        True where the key may be attended; combined with ``causal``.
    fully_masked : {"zero", "nan"}
        Output (and lse) of a query with nothing to attend: zeros and -inf, or NaN.
    return_lse : bool, default False
        Also return the natural-log log-sum-exp of the final logits, (B, H, Sq), in the compute dtype.
    block_size : int, optional
        Queries per block. By default chosen so one block's logits hold about 4 Mi elements.
    xp : array namespace, optional

    Returns
    -------
    out : array (B, H, Sq, Dv) in the dtype of ``q``
    lse : array (B, H, Sq), only with ``return_lse=True``

    Notes
    -----
    Working memory is one query block of logits, (B, H, block, Sk), plus that block's bias; under ``causal`` keys
    that no query of a block can see are not computed. float16 inputs are computed in float32.
    """
    tensor = bias._params["array"] if isinstance(bias, TensorBias) else None
    family = bias if isinstance(bias, BiasFamily) and tensor is None else None
    array_bias = tensor if tensor is not None else (bias if family is None else None)
    xp = _checks.namespace(q, k, v, array_bias, mask, xp=xp, names=("q", "k", "v", "bias", "mask"))
    for name, arr in (("q", q), ("k", k), ("v", v)):
        _checks.float_array(name, arr, xp, ndim=4)
        _checks.nonempty(name, arr)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        msg = f"k, v: expected the dtype of q ({q.dtype}), got k {k.dtype} and v {v.dtype}"
        raise TypeError(msg)
    nb, nh, sq, d = q.shape
    if k.shape[0] != nb or v.shape[0] != nb:
        msg = f"k, v: expected batch size {nb} (from q), got {k.shape[0]} and {v.shape[0]}"
        raise ValueError(msg)
    nkv, sk = k.shape[1], k.shape[2]
    if tuple(v.shape[1:3]) != (nkv, sk):
        msg = f"v: expected (H_kv, Sk) = {(nkv, sk)} from k, got {tuple(v.shape[1:3])}"
        raise ValueError(msg)
    if k.shape[3] != d:
        msg = f"k: expected head dim D = {d} (from q), got {k.shape[3]}"
        raise ValueError(msg)
    if nh % nkv:
        msg = f"k: expected a number of kv heads dividing the {nh} query heads, got {nkv}"
        raise ValueError(msg)
    if family is not None:
        if family.num_heads != nh:
            msg = f"bias: expected a family with num_heads = {nh} (query heads of q), got {family.num_heads}"
            raise ValueError(msg)
        if not _checks.same_namespace(family.xp, xp):
            msg = f"bias: expected a family whose parameters live in {xp.__name__}, got {family.xp.__name__}"
            raise TypeError(msg)
    elif array_bias is not None:
        _checks.float_array("bias", array_bias, xp)
        broadcast_to("bias", array_bias, (nb, nh, sq, sk))
        array_bias = xp.reshape(array_bias, (1,) * (4 - array_bias.ndim) + tuple(array_bias.shape))
    if mask is not None:
        _checks.bool_array("mask", mask, xp)
        broadcast_to("mask", mask, (nb, nh, sq, sk))
        mask = xp.reshape(mask, (1,) * (4 - mask.ndim) + tuple(mask.shape))
    causal = _checks.boolean("causal", causal)
    _checks.option("align", align, ALIGNMENTS)
    _checks.option("placement", placement, PLACEMENTS)
    _checks.option("fully_masked", fully_masked, FULLY_MASKED)
    _checks.boolean("return_lse", return_lse)
    scale = 1.0 / math.sqrt(d) if scale is None else _checks.real_scalar("scale", scale, positive=True)
    if block_size is None:
        block_size = max(1, min(sq, _BLOCK_ELEMENTS // max(1, nb * nh * sk)))
    else:
        block_size = _checks.integer("block_size", block_size, minimum=1)

    dev = array_device(q)
    cdtype = _checks.compute_dtype(xp, q.dtype)
    q_pos, k_pos = positions(sq, sk, align=align, xp=xp, device=dev)
    q_start = sk - sq if align == "bottom_right" else 0
    group = nh // nkv
    dv = v.shape[3]
    kc = xp.astype(k, cdtype) if k.dtype != cdtype else k
    vc = xp.astype(v, cdtype) if v.dtype != cdtype else v

    outs, lses = [], []
    for start in range(0, sq, block_size):
        stop = min(sq, start + block_size)
        rows = stop - start
        # Under a causal mask no query of this block sees a key beyond its last query's position.
        k_end = min(sk, max(0, q_start + stop)) if causal else sk
        if k_end == 0:
            fill = 0.0 if fully_masked == "zero" else float("nan")
            outs.append(xp.full((nb, nh, rows, dv), fill, dtype=cdtype, device=dev))
            lses.append(
                xp.full((nb, nh, rows), -math.inf if fully_masked == "zero" else math.nan, dtype=cdtype, device=dev)
            )
            continue
        qb = q[:, :, start:stop, :]
        qb = xp.astype(qb, cdtype) if qb.dtype != cdtype else qb
        qb = xp.reshape(qb, (nb, nkv, group, rows, d))
        kb = kc[:, :, None, :k_end, :]
        scores = xp.reshape(qb @ xp.matrix_transpose(kb), (nb, nh, rows, k_end))
        bias_b = None
        if family is not None:
            bias_b = family.bias(q_pos[start:stop], k_pos[:k_end])[None, ...]
        elif array_bias is not None:
            bias_b = _rows_cols(array_bias, start, stop, k_end, sq, sk)
        mask_b = causal_mask(q_pos[start:stop], k_pos[:k_end], xp=xp) if causal else None
        if mask is not None:
            user = _rows_cols(mask, start, stop, k_end, sq, sk)
            mask_b = user if mask_b is None else (user & mask_b)
        probs, lse = softmax_core(xp, scores, bias_b, mask_b, scale, placement, fully_masked, cdtype)
        probs = xp.reshape(probs, (nb, nkv, group, rows, k_end))
        out = probs @ vc[:, :, None, :k_end, :]
        outs.append(xp.reshape(out, (nb, nh, rows, dv)))
        lses.append(lse)

    out = outs[0] if len(outs) == 1 else xp.concat(outs, axis=2)
    if out.dtype != q.dtype:
        out = xp.astype(out, q.dtype)
    if not return_lse:
        return out
    lse = lses[0] if len(lses) == 1 else xp.concat(lses, axis=2)
    return out, lse


def _rows_cols(arr: Any, start: int, stop: int, k_end: int, sq: int, sk: int) -> Any:
    """Rows start:stop and columns :k_end of a (., ., Sq or 1, Sk or 1) array, keeping broadcast axes."""
    if arr.shape[2] == sq:
        arr = arr[:, :, start:stop, :]
    if arr.shape[3] == sk and k_end != sk:
        arr = arr[:, :, :, :k_end]
    return arr
