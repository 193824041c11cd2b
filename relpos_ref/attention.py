r"""Scaled dot-product attention with a relative positional bias, streamed over query blocks."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from array_api_compat import device as array_device
from array_api_compat import is_cupy_array

from . import _checks
from .conventions import ALIGNMENTS, BACKENDS, FULLY_MASKED, PLACEMENTS
from .families import BiasFamily, TensorBias
from .positions import causal_mask, positions
from .softmax import broadcast_to

__all__ = ["attention"]


# Logits per (query block, key block) tile when the caller does not choose: 1 Mi elements, 4 MiB in float32, so
# a tile and its bias stay near the cache while the per-tile Python overhead stays small.
_BLOCK_ELEMENTS = 1 << 20


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
    kv_block_size: int | None = None,
    backend: str = "reference",
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
        Queries per tile. By default at most 256, fewer when B * H is large.
    kv_block_size : int, optional
        Keys per tile. By default chosen so a tile holds about 1 Mi logits (all of a KV cache of ordinary length
        when Sq = 1).
    backend : {"reference", "fused"}
        ``"fused"`` (CuPy inputs only) computes each query block's full rows of scores with one matrix product and
        their biased softmax with :func:`relpos_ref.cuda.fused_biased_softmax`, the family's bias evaluated inside
        the kernel; ``block_size`` applies, ``kv_block_size`` does not.
    xp : array namespace, optional

    Returns
    -------
    out : array (B, H, Sq, Dv) in the dtype of ``q``
    lse : array (B, H, Sq), only with ``return_lse=True``

    Notes
    -----
    Streamed over (query block, key block) tiles with an online softmax (running maximum and running sum, as in
    FlashAttention): working memory is one tile of logits, (B, H, block_size, kv_block_size), plus that tile's bias,
    generated from the family inside the loop. Under ``causal`` the tiles entirely after a block's last query are
    never computed and only tiles crossing the diagonal are masked. float16 inputs are computed in float32. The scale
    multiplies q once per block (``pre_scale``: and the bias tile), which rounds differently from scaling each logit
    by at most an ulp of the logit.
    """
    a = _prepare(q, k, v, bias, causal, align, scale, placement, mask, fully_masked, block_size, kv_block_size, xp)
    xp, family, array_bias, mask = a.xp, a.family, a.array_bias, a.mask
    _checks.boolean("return_lse", return_lse)
    sq, sk = q.shape[2], k.shape[2]
    dev = array_device(q)
    cdtype = _checks.compute_dtype(xp, q.dtype)
    q_pos, k_pos = positions(sq, sk, align=align, xp=xp, device=dev)
    kc = xp.astype(k, cdtype) if k.dtype != cdtype else k
    vc = xp.astype(v, cdtype) if v.dtype != cdtype else v
    if _checks.option("backend", backend, BACKENDS) == "fused":
        if not is_cupy_array(q):
            msg = f"q: expected a CuPy array with backend='fused', got {type(q).__module__}.{type(q).__name__}"
            raise TypeError(msg)
        outs, lses = _fused(
            xp,
            q,
            kc,
            vc,
            bias=family if family is not None else array_bias,
            mask=mask,
            causal=a.causal,
            q_pos=q_pos,
            k_pos=k_pos,
            scale=a.scale,
            placement=placement,
            fully_masked=fully_masked,
            cdtype=cdtype,
            bq=a.bq,
        )
    else:
        outs, lses = _stream(
            xp,
            q,
            kc,
            vc,
            family=family,
            array_bias=array_bias,
            mask=mask,
            causal=a.causal,
            q_pos=q_pos,
            k_pos=k_pos,
            q_start=sk - sq if align == "bottom_right" else 0,
            scale=a.scale,
            placement=placement,
            fully_masked=fully_masked,
            cdtype=cdtype,
            bq=a.bq,
            bk=a.bk,
            dev=dev,
        )
    out = outs[0] if len(outs) == 1 else xp.concat(outs, axis=2)
    if out.dtype != q.dtype:
        out = xp.astype(out, q.dtype)
    if not return_lse:
        return out
    lse = lses[0] if len(lses) == 1 else xp.concat(lses, axis=2)
    return out, lse


class _Args(NamedTuple):
    """Checked arguments shared by :func:`attention` and :func:`relpos_ref.attention_vjp`."""

    xp: Any
    family: Any  # a BiasFamily other than TensorBias, or None
    tensor: Any  # the (H, Sq, Sk) array of a TensorBias, or None
    array_bias: Any  # a bias array reshaped to 4-D (a TensorBias's included), or None
    mask: Any  # 4-D or None
    causal: bool
    scale: float
    bq: int
    bk: int


def _prepare(
    q: Any,
    k: Any,
    v: Any,
    bias: Any,
    causal: Any,
    align: Any,
    scale: Any,
    placement: Any,
    mask: Any,
    fully_masked: Any,
    block_size: Any,
    kv_block_size: Any,
    xp: Any,
) -> _Args:
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
    scale = 1.0 / math.sqrt(d) if scale is None else _checks.real_scalar("scale", scale, positive=True)
    if block_size is not None:
        block_size = _checks.integer("block_size", block_size, minimum=1)
    if kv_block_size is not None:
        kv_block_size = _checks.integer("kv_block_size", kv_block_size, minimum=1)
    block_size, kv_block_size = _block_sizes(nb, nh, sq, sk, block_size, kv_block_size)
    # Value checks last (they read the arrays): a NaN or infinite input has no attention output, and an inf in a
    # logit would surface as inf - inf inside the softmax. -inf in an array bias is a mask, as in TensorBias.
    for name, arr in (("q", q), ("k", k), ("v", v)):
        _checks.finite(name, arr, xp)
    if array_bias is not None and tensor is None and bool(xp.any(xp.isnan(array_bias) | (array_bias == math.inf))):
        msg = "bias: expected finite values or -inf (a mask), got NaN or +inf"
        raise ValueError(msg)

    return _Args(xp, family, tensor, array_bias, mask, causal, scale, block_size, kv_block_size)


def _block_sizes(nb: int, nh: int, sq: int, sk: int, bq: int | None, bk: int | None) -> tuple[int, int]:
    """Query and key block sizes: about ``_BLOCK_ELEMENTS`` logits per block unless the caller chose.

    Sq = 1 (decoding) gets one query and up to ``_BLOCK_ELEMENTS / (B H)`` keys per block, so a KV cache of ordinary
    length is one block: a single row softmax with no rescaling.
    """
    if bq is None:
        bq = max(1, min(sq, 256, _BLOCK_ELEMENTS // max(1, nb * nh * 64)))
    if bk is None:
        bk = max(64, _BLOCK_ELEMENTS // max(1, nb * nh * bq))
    return bq, min(bk, sk)


def _stream(
    xp: Any,
    q: Any,
    kc: Any,
    vc: Any,
    *,
    family: Any,
    array_bias: Any,
    mask: Any,
    causal: bool,
    q_pos: Any,
    k_pos: Any,
    q_start: int,
    scale: float,
    placement: str,
    fully_masked: str,
    cdtype: Any,
    bq: int,
    bk: int,
    dev: Any,
) -> tuple[list[Any], list[Any]]:
    """Online-softmax attention over (query block, key block) tiles; returns per-query-block outputs and lse."""
    nb, nh, sq, d = q.shape
    nkv, sk, dv = kc.shape[1], kc.shape[2], vc.shape[3]
    group = nh // nkv
    neg_inf = -math.inf
    fill = 0.0 if fully_masked == "zero" else math.nan
    lse_fill = neg_inf if fully_masked == "zero" else math.nan
    k_g = kc[:, :, None, :, :]  # (B, H_kv, 1, Sk, D): broadcasts over the query heads of each kv head
    v_g = vc[:, :, None, :, :]
    outs, lses = [], []
    for qs in range(0, sq, bq):
        qe = min(sq, qs + bq)
        rows = qe - qs
        first_q, last_q = q_start + qs, q_start + qe - 1  # absolute positions (k_pos = arange(Sk))
        # Under a causal mask no query of this block sees a key after its last query: those tiles are skipped.
        k_stop = min(sk, last_q + 1) if causal else sk
        if k_stop <= 0:
            outs.append(xp.full((nb, nh, rows, dv), fill, dtype=cdtype, device=dev))
            lses.append(xp.full((nb, nh, rows), lse_fill, dtype=cdtype, device=dev))
            continue
        qb = q[:, :, qs:qe, :]
        qb = xp.astype(qb, cdtype) if qb.dtype != cdtype else qb
        # The scale is applied to q once per block rather than to every logit; pre_scale scales the bias instead.
        qb = xp.reshape(qb * scale, (nb, nkv, group, rows, d))
        qp = q_pos[qs:qe]
        run_max = xp.full((nb, nh, rows, 1), neg_inf, dtype=cdtype, device=dev)
        run_sum = xp.zeros((nb, nh, rows, 1), dtype=cdtype, device=dev)
        acc = xp.zeros((nb, nkv, group, rows, dv), dtype=cdtype, device=dev)
        for ks in range(0, k_stop, bk):
            ke = min(k_stop, ks + bk)
            cols = ke - ks
            z = _logits(
                xp,
                qb,
                k_g,
                qs,
                qe,
                sq,
                ks,
                ke,
                family,
                array_bias,
                mask,
                causal,
                qp,
                k_pos,
                first_q,
                scale,
                placement,
                cdtype,
            )
            new_max = xp.maximum(run_max, xp.max(z, axis=-1, keepdims=True))
            # A row with nothing attended so far has max -inf; shifting by 0 keeps exp(-inf) = 0, never -inf - -inf.
            shift = xp.where(new_max == neg_inf, 0.0, new_max)
            p = xp.exp(z - shift)
            rescale = xp.exp(run_max - shift)
            run_sum = run_sum * rescale + xp.sum(p, axis=-1, keepdims=True)
            pv = xp.reshape(p, (nb, nkv, group, rows, cols)) @ v_g[:, :, :, ks:ke, :]
            acc = acc * xp.reshape(rescale, (nb, nkv, group, rows, 1)) + pv
            run_max = new_max
        acc = xp.reshape(acc, (nb, nh, rows, dv))
        # The largest attended logit contributes exp(0) = 1, so the sum is 0 exactly when nothing was attended.
        empty = run_sum == 0
        safe_sum = xp.where(empty, 1.0, run_sum)
        outs.append(xp.where(empty, fill, acc / safe_sum))
        lse = xp.where(empty, lse_fill, xp.where(empty, 0.0, run_max) + xp.log(safe_sum))
        lses.append(lse[..., 0])
    return outs, lses


def _logits(
    xp: Any,
    qb: Any,
    k_g: Any,
    qs: int,
    qe: int,
    sq: int,
    ks: int,
    ke: int,
    family: Any,
    array_bias: Any,
    mask: Any,
    causal: bool,
    qp: Any,
    k_pos: Any,
    first_q: int,
    scale: float,
    placement: str,
    cdtype: Any,
) -> Any:
    """Final logits of one (query block, key block) tile, (B, H, rows, cols), -inf where masked.

    ``qb`` is the block of queries already multiplied by the scale and grouped, (B, H_kv, group, rows, D). The
    forward and the backward both build their tiles here, so the probabilities the backward recomputes are the
    forward's.
    """
    nb, nkv, group, rows, _ = qb.shape
    nh, cols = nkv * group, ke - ks
    sk = int(k_pos.shape[0])
    z = xp.reshape(qb @ xp.matrix_transpose(k_g[:, :, :, ks:ke, :]), (nb, nh, rows, cols))
    b = None
    if family is not None:
        b = family.bias(qp, k_pos[ks:ke])
    elif array_bias is not None:
        b = _tile(array_bias, qs, qe, ks, ke, sq, sk)
    if b is not None:
        b = xp.astype(b, cdtype) if b.dtype != cdtype else b
        z = z + (b * scale if placement == "pre_scale" else b)
    keep = causal_mask(qp, k_pos[ks:ke], xp=xp) if causal and ke - 1 > first_q else None
    if mask is not None:
        user = _tile(mask, qs, qe, ks, ke, sq, sk)
        keep = user if keep is None else (user & keep)
    if keep is not None:
        z = xp.where(keep, z, -math.inf)
    return z


def _fused(
    xp: Any,
    q: Any,
    kc: Any,
    vc: Any,
    *,
    bias: Any,
    mask: Any,
    causal: bool,
    q_pos: Any,
    k_pos: Any,
    scale: float,
    placement: str,
    fully_masked: str,
    cdtype: Any,
    bq: int,
) -> tuple[list[Any], list[Any]]:
    """Per query block: full score rows by one product, then the fused CUDA biased softmax, then P @ V."""
    from .cuda import fused_biased_softmax

    nb, nh, sq, d = q.shape
    nkv, sk, dv = kc.shape[1], kc.shape[2], vc.shape[3]
    group = nh // nkv
    k_t = xp.matrix_transpose(kc[:, :, None, :, :])
    v_g = vc[:, :, None, :, :]
    outs, lses = [], []
    for qs in range(0, sq, bq):
        qe = min(sq, qs + bq)
        rows = qe - qs
        qb = q[:, :, qs:qe, :]
        qb = xp.astype(qb, cdtype) if qb.dtype != cdtype else qb
        scores = xp.reshape(xp.reshape(qb, (nb, nkv, group, rows, d)) @ k_t, (nb, nh, rows, sk))
        b = bias if bias is None or isinstance(bias, BiasFamily) else _tile(bias, qs, qe, 0, sk, sq, sk)
        m = None if mask is None else _tile(mask, qs, qe, 0, sk, sq, sk)
        probs, lse = fused_biased_softmax(
            scores,
            b,
            q_pos=q_pos[qs:qe],
            k_pos=k_pos,
            causal=causal,
            mask=m,
            scale=scale,
            placement=placement,
            fully_masked=fully_masked,
            return_lse=True,
        )
        out = xp.reshape(probs, (nb, nkv, group, rows, sk)) @ v_g
        outs.append(xp.reshape(out, (nb, nh, rows, dv)))
        lses.append(lse)
    return outs, lses


def _tile(arr: Any, qs: int, qe: int, ks: int, ke: int, sq: int, sk: int) -> Any:
    """Rows qs:qe and columns ks:ke of a (., ., Sq or 1, Sk or 1) array, keeping broadcast axes."""
    if arr.shape[2] == sq:
        arr = arr[:, :, qs:qe, :]
    if arr.shape[3] == sk:
        arr = arr[:, :, :, ks:ke]
    return arr
