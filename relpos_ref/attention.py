r"""Scaled dot-product attention with a relative positional bias, streamed over query blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import _checks
from ._checks import array_device, is_cupy_array
from .conventions import ALIGNMENTS, BACKENDS, FULLY_MASKED, PLACEMENTS, Alignment, FullyMasked, Placement
from .families.tiles import BiasTiles, tile
from .positions import causal_mask, positions
from .softmax import fully_masked_fill

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
    options = {"causal": causal, "align": align, "scale": scale, "placement": placement, "fully_masked": fully_masked}
    spec = _prepare(q, k, v, bias, mask, xp, options, block_size, kv_block_size)
    xp = spec.xp
    _checks.boolean("return_lse", return_lse)
    kc = xp.astype(k, spec.cdtype) if k.dtype != spec.cdtype else k
    vc = xp.astype(v, spec.cdtype) if v.dtype != spec.cdtype else v
    if _checks.option("backend", backend, BACKENDS) == "fused":
        if not is_cupy_array(q):
            msg = f"q: expected a CuPy array with backend='fused', got {type(q).__module__}.{type(q).__name__}"
            raise TypeError(msg)
        outs, lses = _fused(spec, q, kc, vc)
    else:
        outs, lses = _stream(spec, q, kc, vc, fully_masked=spec.fully_masked)
    out = outs[0] if len(outs) == 1 else xp.concat(outs, axis=2)
    if out.dtype != q.dtype:
        out = xp.astype(out, q.dtype)
    if not return_lse:
        return out
    lse = lses[0] if len(lses) == 1 else xp.concat(lses, axis=2)
    return out, lse


@dataclass(frozen=True)
class _Spec:
    """Checked and resolved arguments of one call, shared by the streamed forward, the fused path and the VJP."""

    xp: Any
    bias: BiasTiles | None  # the bias as tiles, or None without a bias
    mask: Any  # 4-D bool array or None
    causal: bool
    align: Alignment
    placement: Placement
    fully_masked: FullyMasked
    scale: float
    bq: int  # queries per tile
    bk: int  # keys per tile
    cdtype: Any  # compute dtype
    dev: Any
    q_pos: Any  # absolute positions for ``align``
    k_pos: Any
    q_start: int  # absolute position of query 0 (keys are at 0..Sk-1)


def _prepare(q: Any, k: Any, v: Any, bias: Any, mask: Any, xp: Any, options: dict[str, Any], bq: Any, bk: Any) -> _Spec:
    """Validate the arguments of :func:`attention` and :func:`relpos_ref.attention_vjp` (``options``: causal, align,
    scale, placement, fully_masked) and resolve them into a :class:`_Spec`."""
    family, array_bias, tensor = BiasTiles.split(bias)
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
        _checks.broadcastable("bias", array_bias, (nb, nh, sq, sk))
        array_bias = xp.reshape(array_bias, (1,) * (4 - array_bias.ndim) + tuple(array_bias.shape))
    if mask is not None:
        _checks.bool_array("mask", mask, xp)
        _checks.broadcastable("mask", mask, (nb, nh, sq, sk))
        mask = xp.reshape(mask, (1,) * (4 - mask.ndim) + tuple(mask.shape))
    causal = _checks.boolean("causal", options["causal"])
    align = _checks.option("align", options["align"], ALIGNMENTS)
    placement = _checks.option("placement", options["placement"], PLACEMENTS)
    fully_masked = _checks.option("fully_masked", options["fully_masked"], FULLY_MASKED)
    scale = options["scale"]
    scale = 1.0 / math.sqrt(d) if scale is None else _checks.real_scalar("scale", scale, positive=True)
    if bq is not None:
        bq = _checks.integer("block_size", bq, minimum=1)
    if bk is not None:
        bk = _checks.integer("kv_block_size", bk, minimum=1)
    bq, bk = _block_sizes(nb, nh, sq, sk, bq, bk)
    # Value checks last (they read the arrays): a NaN or infinite input has no attention output, and an inf in a
    # logit would surface as inf - inf inside the softmax. -inf in an array bias is a mask, as in TensorBias.
    for name, arr in (("q", q), ("k", k), ("v", v)):
        _checks.finite(name, arr, xp)
    if array_bias is not None and tensor is None and bool(xp.any(xp.isnan(array_bias) | (array_bias == math.inf))):
        msg = "bias: expected finite values or -inf (a mask), got NaN or +inf"
        raise ValueError(msg)
    dev = array_device(q)
    q_pos, k_pos = positions(sq, sk, align=align, xp=xp, device=dev)
    tiles = None if family is None and array_bias is None else BiasTiles(family, array_bias, tensor, sq, sk)
    return _Spec(
        xp=xp,
        bias=tiles,
        mask=mask,
        causal=causal,
        align=align,
        placement=placement,
        fully_masked=fully_masked,
        scale=scale,
        bq=bq,
        bk=bk,
        cdtype=_checks.compute_dtype(xp, q.dtype),
        dev=dev,
        q_pos=q_pos,
        k_pos=k_pos,
        q_start=sk - sq if align == "bottom_right" else 0,
    )


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


def _stream(spec: _Spec, q: Any, kc: Any, vc: Any, *, fully_masked: FullyMasked) -> tuple[list[Any], list[Any]]:
    """Online-softmax attention over (query block, key block) tiles; returns per-query-block outputs and lse."""
    xp, cdtype, dev = spec.xp, spec.cdtype, spec.dev
    nb, nh, sq, d = q.shape
    nkv, sk, dv = kc.shape[1], kc.shape[2], vc.shape[3]
    group = nh // nkv
    neg_inf = -math.inf
    fill, lse_fill = fully_masked_fill(fully_masked)
    k_g = kc[:, :, None, :, :]  # (B, H_kv, 1, Sk, D): broadcasts over the query heads of each kv head
    v_g = vc[:, :, None, :, :]
    outs, lses = [], []
    for qs in range(0, sq, spec.bq):
        qe = min(sq, qs + spec.bq)
        rows = qe - qs
        last_q = spec.q_start + qe - 1  # absolute position (k_pos = arange(Sk))
        # Under a causal mask no query of this block sees a key after its last query: those tiles are skipped.
        k_stop = min(sk, last_q + 1) if spec.causal else sk
        if k_stop <= 0:
            outs.append(xp.full((nb, nh, rows, dv), fill, dtype=cdtype, device=dev))
            lses.append(xp.full((nb, nh, rows), lse_fill, dtype=cdtype, device=dev))
            continue
        qb = q[:, :, qs:qe, :]
        qb = xp.astype(qb, cdtype) if qb.dtype != cdtype else qb
        # The scale is applied to q once per block rather than to every logit; pre_scale scales the bias instead.
        qb = xp.reshape(qb * spec.scale, (nb, nkv, group, rows, d))
        run_max = xp.full((nb, nh, rows, 1), neg_inf, dtype=cdtype, device=dev)
        run_sum = xp.zeros((nb, nh, rows, 1), dtype=cdtype, device=dev)
        acc = xp.zeros((nb, nkv, group, rows, dv), dtype=cdtype, device=dev)
        for ks in range(0, k_stop, spec.bk):
            ke = min(k_stop, ks + spec.bk)
            cols = ke - ks
            z = _logits(spec, qb, k_g, qs, qe, ks, ke)
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


def _logits(spec: _Spec, qb: Any, k_g: Any, qs: int, qe: int, ks: int, ke: int) -> Any:
    """Final logits of the tile of query rows qs:qe and keys ks:ke, (B, H, rows, cols), -inf where masked.

    ``qb`` is the block of queries already multiplied by the scale and grouped, (B, H_kv, group, rows, D). The
    forward and the backward both build their tiles here, so the probabilities the backward recomputes are the
    forward's.
    """
    xp = spec.xp
    nb, nkv, group, rows, _ = qb.shape
    nh, cols = nkv * group, ke - ks
    sq, sk = int(spec.q_pos.shape[0]), int(spec.k_pos.shape[0])
    qp, kp = spec.q_pos[qs:qe], spec.k_pos[ks:ke]
    z = xp.reshape(qb @ xp.matrix_transpose(k_g[:, :, :, ks:ke, :]), (nb, nh, rows, cols))
    if spec.bias is not None:
        b = spec.bias.tile(xp, qs, qe, ks, ke, qp, kp)
        b = xp.astype(b, spec.cdtype) if b.dtype != spec.cdtype else b
        z = z + (b * spec.scale if spec.placement == "pre_scale" else b)
    keep = causal_mask(qp, kp, xp=xp) if spec.causal and ke - 1 > spec.q_start + qs else None
    if spec.mask is not None:
        user = tile(spec.mask, qs, qe, ks, ke, sq, sk)
        keep = user if keep is None else (user & keep)
    if keep is not None:
        z = xp.where(keep, z, -math.inf)
    return z


def _fused(spec: _Spec, q: Any, kc: Any, vc: Any) -> tuple[list[Any], list[Any]]:
    """Per query block: full score rows by one product, then the fused CUDA biased softmax, then P @ V."""
    from .cuda import fused_biased_softmax

    xp, cdtype = spec.xp, spec.cdtype
    nb, nh, sq, d = q.shape
    nkv, sk, dv = kc.shape[1], kc.shape[2], vc.shape[3]
    group = nh // nkv
    k_t = xp.matrix_transpose(kc[:, :, None, :, :])
    v_g = vc[:, :, None, :, :]
    outs, lses = [], []
    for qs in range(0, sq, spec.bq):
        qe = min(sq, qs + spec.bq)
        rows = qe - qs
        qb = q[:, :, qs:qe, :]
        qb = xp.astype(qb, cdtype) if qb.dtype != cdtype else qb
        scores = xp.reshape(xp.reshape(qb, (nb, nkv, group, rows, d)) @ k_t, (nb, nh, rows, sk))
        probs, lse = fused_biased_softmax(
            scores,
            None if spec.bias is None else spec.bias.rows(qs, qe),
            q_pos=spec.q_pos[qs:qe],
            k_pos=spec.k_pos,
            causal=spec.causal,
            mask=None if spec.mask is None else tile(spec.mask, qs, qe, 0, sk, sq, sk),
            scale=spec.scale,
            placement=spec.placement,
            fully_masked=spec.fully_masked,
            return_lse=True,
        )
        out = xp.reshape(probs, (nb, nkv, group, rows, sk)) @ v_g
        outs.append(xp.reshape(out, (nb, nh, rows, dv)))
        lses.append(lse)
    return outs, lses
