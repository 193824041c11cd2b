r"""Scaled dot-product attention with a relative positional bias, streamed over query blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import _checks
from ._checks import array_device, is_cupy_array, quiet_overflow
from .conventions import ALIGNMENTS, BACKENDS, FULLY_MASKED, PLACEMENTS, Alignment, FullyMasked, Placement
from .families.tiles import BiasTiles, tile
from .masks import Features, features, pad_rows, tile_keep
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
    window: Any = None,
    softcap: float | None = None,
    q_pos: Any = None,
    k_pos: Any = None,
    q_lens: Any = None,
    k_lens: Any = None,
    q_segment_ids: Any = None,
    k_segment_ids: Any = None,
    segment_positions: str = "global",
    xp: Any = None,
) -> Any:
    r"""Attention output :math:`O = \mathrm{softmax}(z)\,V` with a relative positional bias.

    .. math::

        z_{b h i j} = \begin{cases} \tau\, q_{bhi} \cdot k_{b g(h) j} + b_h(p_i, p_j) & \text{post\_scale} \\
                      \tau\,(q_{bhi} \cdot k_{b g(h) j} + b_h(p_i, p_j)) & \text{pre\_scale} \end{cases}

    with :math:`g(h) = \lfloor h / (H / H_{kv}) \rfloor` (grouped-query heads: consecutive query heads share a key/value
    head, as in HF ``repeat_kv`` and FlashAttention), :math:`p` the absolute positions of :func:`relpos_ref.positions`
    for ``align``, and keys after the query removed when ``causal``.

    The kernel features (all optional, keyword-only) change the positions, the score and the attended set. With
    :math:`\Delta_{bij} = p^q_{bi} - p^k_{bj}`, key j is attended by query i of batch row b exactly when

    .. math::

        j < L^k_b,\quad i < L^q_b,\quad (\text{causal} \Rightarrow \Delta_{bij} \ge 0),\quad
        -r \le \Delta_{bij} \le l \;(\text{window}),\quad \sigma^q_{bi} = \sigma^k_{bj} \;(\text{segments}),

    and the caller's ``mask`` allows it. A softcap :math:`c` replaces the scaled score :math:`s = \tau\,q \cdot k` by
    :math:`c \tanh(s / c)` before the bias is added and before masking (FlashAttention's and vLLM's order):
    :math:`z = c \tanh(\tau q \cdot k / c) + b` (``post_scale``) or :math:`c \tanh(\tau q \cdot k / c) + \tau b`
    (``pre_scale``: the cap acts on the scaled score alone).

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
        the kernel; ``block_size`` applies, ``kv_block_size`` does not. It takes none of the features below.
    window : (left, right), optional
        Local attention: key j only when :math:`-\mathit{right} \le p_i - p_j \le \mathit{left}`; each side an int
        >= 0, or None for unbounded. With ``causal`` the keys after the query go too. FlashAttention's
        ``window_size=(l, r)`` (-1 for unbounded, bottom-right positions) is ``window=(l if l >= 0 else None,
        r if r >= 0 else None)`` here with ``align="bottom_right"``.
    softcap : float, optional
        :math:`c > 0`: the scaled score becomes :math:`c \tanh(s / c)` (see above); None for none.
    q_pos : int array (Sq,) or (B, Sq), optional
    k_pos : int array (Sk,) or (B, Sk), optional
        Explicit absolute positions (KV-cache offsets, chunked prefill, per-row offsets); each overrides ``align``
        for its side (a missing ``k_pos`` is ``arange(Sk)``, a missing ``q_pos`` comes from ``align``). The bias
        family, ``causal`` (:math:`p_j \le p_i`) and ``window`` use them. Every offset must fit int64.
    q_lens : int array (B,), optional
        Real queries per batch row, in [0, Sq]. Rows :math:`i \ge L^q_b` are padding: output 0 and lse -inf
        whatever ``fully_masked`` says, and no gradient from or to them. A missing ``q_lens`` is Sq for every row.
    k_lens : int array (B,), optional
        Real keys per batch row, in [0, Sk]; keys :math:`j \ge L^k_b` are never attended. ``align`` applies to each
        row's own lengths: ``"bottom_right"`` puts query i at :math:`i + L^k_b - L^q_b` (FlashAttention's
        ``cache_seqlens``), ``"top_left"`` at i.
    q_segment_ids : int array (Sq,) or (B, Sq), optional
    k_segment_ids : int array (Sk,) or (B, Sk), optional
        Packed sequences, both or neither: a key of another segment than the query's is masked.
    segment_positions : {"global", "restart"}
        ``"global"``: positions as they are. ``"restart"``: each token's position is its index minus the index of
        the first token of its segment in its own (q or k) sequence (each segment one contiguous run; no
        ``q_pos``/``k_pos`` then). With Sq != Sk the two sequences are indexed separately, so a query block in
        the middle of a segment restarts at 0: pass explicit positions instead.
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
    never computed and only tiles crossing the diagonal are masked. With a window, lengths or explicit positions the
    tiles that no pair of a real query and a real key of the block can attend (from the batch-wide bounds of the
    positions per block) are skipped the same way; the masks of a tile are built for that tile only.
    float16 inputs are computed in float32. The scale
    multiplies q once per block (``pre_scale``: and the bias tile), which rounds differently from scaling each logit
    by at most an ulp of the logit.

    Finite inputs whose logits or intermediates would overflow (float32 ``q = 1e38`` with ``scale = 10``, float64
    ``q = k = 1e200``) are computed exactly: from :math:`\max|q|`, :math:`\max|k|` and :math:`\max|v|` (read
    once, in place of the finiteness check) the call bounds :math:`\tau D \max|q|\max|k|` and, when that bound or
    a bias array's largest magnitude approaches the dtype's range, computes the tiles on :math:`z / 2^k` and the
    exponentials as :math:`e^{2^k (z/2^k - m/2^k)}`, which is exact (a power of two scales without rounding) and
    otherwise bitwise the plain computation. A query block in which a family's bias made every logit of a row
    overflow, or a row maximum infinite, is recomputed the same way; values are pre-divided by a power of two when
    :math:`S_k \max|v|` would overflow the running sum. Only the lse can overflow, to :math:`\pm\infty`, when its
    exact value is outside the dtype's range.
    """
    options = {"causal": causal, "align": align, "scale": scale, "placement": placement, "fully_masked": fully_masked}
    options.update(
        window=window,
        softcap=softcap,
        q_pos=q_pos,
        k_pos=k_pos,
        q_lens=q_lens,
        k_lens=k_lens,
        q_segment_ids=q_segment_ids,
        k_segment_ids=k_segment_ids,
        segment_positions=segment_positions,
    )
    spec = _prepare(q, k, v, bias, mask, xp, options, block_size, kv_block_size)
    xp = spec.xp
    _checks.boolean("return_lse", return_lse)
    kc = xp.astype(k, spec.cdtype) if k.dtype != spec.cdtype else k
    vc = xp.astype(v, spec.cdtype) if v.dtype != spec.cdtype else v
    if _checks.option("backend", backend, BACKENDS) == "fused":
        if spec.feat is not None or spec.softcap is not None:
            msg = "backend: expected 'reference' with window, softcap, positions, lengths or segments, got 'fused'"
            raise ValueError(msg)
        if not is_cupy_array(q):
            msg = f"q: expected a CuPy array with backend='fused', got {type(q).__module__}.{type(q).__name__}"
            raise TypeError(msg)
        outs, lses = _fused(spec, q, kc, vc)
    else:
        outs, stats, exps = _stream(spec, q, kc, vc, fully_masked=spec.fully_masked)
        with quiet_overflow():  # an lse whose exact value is beyond the dtype's range is +-inf
            lses = [m * 2.0**e + log_sum if e else m + log_sum for (m, log_sum), e in zip(stats, exps, strict=True)]
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
    q_start: int  # absolute position of query 0 (keys are at 0..Sk-1); without features only
    # Tiles are computed on z / 2^exp_fast (0 unless the magnitudes approach the dtype's range); a query block whose
    # family bias overflowed its logits is recomputed on z / 2^exp_slow. Values are divided by 2^exp_v.
    exp_fast: int = 0
    exp_slow: int = 0
    exp_v: int = 0
    abs_max: tuple[float, float, float] = (0.0, 0.0, 0.0)  # max |q|, |k|, |v|
    softcap: float | None = None
    # Window, explicit positions, lengths, segments; None on the plain path (positions from align, causal only).
    # With features, q_pos and k_pos above are the features' (1-D, or (B, S) when they differ between rows).
    feat: Features | None = None


def _prepare(q: Any, k: Any, v: Any, bias: Any, mask: Any, xp: Any, options: dict[str, Any], bq: Any, bk: Any) -> _Spec:
    """Validate the arguments of :func:`attention` and :func:`relpos_ref.attention_vjp` (``options``: causal, align,
    scale, placement, fully_masked, and optionally softcap, window, segment_positions and :data:`_FEATURE_ARRAYS`)
    and resolve them into a :class:`_Spec`."""
    # A family with NumPy parameters follows q's library and device (converted once, cached on the family); one whose
    # parameters live elsewhere is checked against q, k, v below.
    family, array_bias, tensor = BiasTiles.split(bias, like=q)
    extra = {name: options.get(name) for name in _FEATURE_ARRAYS}
    # Messages name the feature arrays only when given, so a call without them reads as before they existed.
    given = {name: a for name, a in extra.items() if a is not None}
    names = ("q", "k", "v", "bias", "mask", *given)
    xp = _checks.namespace(q, k, v, array_bias, mask, *given.values(), xp=xp, names=names)
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
    softcap = options.get("softcap")
    if softcap is not None:
        softcap = _checks.real_scalar("softcap", softcap, positive=True)
    dev = array_device(q)
    feat = features(
        xp,
        dev,
        (nb, sq, sk, bq, bk),
        causal=causal,
        align=align,
        window=options.get("window"),
        segment_positions=options.get("segment_positions", "global"),
        **extra,
    )
    # Value checks last (they read the arrays): a NaN or infinite input has no attention output, and an inf in a
    # logit would surface as inf - inf inside the softmax. -inf in an array bias is a mask, as in TensorBias.
    # The largest magnitudes are the finiteness check (NaN propagates through max) and bound the logits.
    abs_max = tuple(_checks.abs_max_finite(name, arr, xp) for name, arr in (("q", q), ("k", k), ("v", v)))
    bias_max = 0.0
    if array_bias is not None:
        bias_max = _bias_abs_max(xp, array_bias, check=tensor is None)
    cdtype = _checks.compute_dtype(xp, q.dtype)
    emax = _checks.max_exponent(xp, cdtype)
    e_tau = _checks.log2_ceil(scale)
    e_q = e_tau + _checks.log2_ceil(abs_max[0])
    # |tau q . k| < 2^e_qk, every partial sum included
    e_qk = e_q + _checks.log2_ceil(abs_max[1]) + _checks.log2_ceil(d)
    e_b = _checks.log2_ceil(bias_max) + (e_tau if placement == "pre_scale" else 0)
    # |z| / 2^k below 2^(emax - 3): a quarter of the range, so that adding the bias and subtracting the row maximum
    # cannot overflow either; q times the scale and the scale itself must fit too.
    exp_fast = int(max(0, max(e_qk, e_b) + 1 + 3 - emax, e_q + 2 - emax, e_tau + 2 - emax))
    exp_slow = exp_fast
    if family is not None:  # a family's bias is finite in its dtype: at most its largest finite number
        e_fam = _family_exponent(xp, family.dtype, cdtype) + (e_tau if placement == "pre_scale" else 0)
        exp_slow = int(max(exp_fast, max(e_qk, e_fam) + 1 + 3 - emax))
    exp_v = int(max(0, _checks.log2_ceil(abs_max[2]) + _checks.log2_ceil(sk) + 2 - emax))  # the running sum of p v
    if feat is None:
        q_pos, k_pos = positions(sq, sk, align=align, xp=xp, device=dev)
    else:
        q_pos, k_pos = feat.q_pos, feat.k_pos
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
        cdtype=cdtype,
        dev=dev,
        q_pos=q_pos,
        k_pos=k_pos,
        q_start=sk - sq if align == "bottom_right" else 0,
        exp_fast=exp_fast,
        exp_slow=exp_slow,
        exp_v=exp_v,
        abs_max=abs_max,
        softcap=softcap,
        feat=feat,
    )


#: The array-valued feature arguments of attention (all optional, each checked by :func:`relpos_ref.masks.features`).
_FEATURE_ARRAYS = ("q_pos", "k_pos", "q_lens", "k_lens", "q_segment_ids", "k_segment_ids")


def _bias_abs_max(xp: Any, b: Any, *, check: bool) -> float:
    """Largest finite |b| of a bias array (-inf entries are a mask); NaN and +inf rejected when ``check``."""
    hi = float(xp.max(b))
    if check and not hi < math.inf:  # NaN or +inf somewhere (NaN propagates through max)
        msg = "bias: expected finite values or -inf (a mask), got NaN or +inf"
        raise ValueError(msg)
    lo = float(xp.min(xp.where(b == -math.inf, 0.0, b)))
    return max(abs(lo), hi if math.isfinite(hi) else 0.0)


def _family_exponent(xp: Any, dtype: Any, cdtype: Any) -> int:
    """The exponent bounding a family's (finite) bias: its dtype's largest number (float16: 65504 < 2^16)."""
    try:
        return _checks.max_exponent(xp, dtype)
    except (TypeError, ValueError):  # bfloat16 is unknown to NumPy's finfo; its range is float32's
        return _checks.max_exponent(xp, cdtype)


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
    spec: _Spec, q: Any, kc: Any, vc: Any, *, fully_masked: FullyMasked
) -> tuple[list[Any], list[Any], list[int]]:
    """Online-softmax attention over (query block, key block) tiles.

    Returns per-query-block outputs, per-block ``(m, log_sum)`` and exponents e, with lse = m 2^e + log_sum: m the
    row maximum on the block's scale 2^-e (0 on rows with nothing attended, whose log_sum is the lse fill) and
    log_sum the log of the row sum. e is 0 unless the magnitudes approach the dtype's range (see
    :func:`attention`); the backward keeps m and log_sum apart because m + log_sum can lose log_sum to rounding
    when |m| is large.
    """
    xp, cdtype, dev = spec.xp, spec.cdtype, spec.dev
    nb, nh, sq, _ = q.shape
    sk, dv = kc.shape[2], vc.shape[3]
    fill, lse_fill = fully_masked_fill(fully_masked)
    k_g = kc[:, :, None, :, :]  # (B, H_kv, 1, Sk, D): broadcasts over the query heads of each kv head
    v_g = vc[:, :, None, :, :]
    if spec.exp_v:
        v_g = v_g * 2.0**-spec.exp_v  # exact; the running sum of p v (up to Sk max|v|) then stays finite
    # Only a family's bias (whose magnitude is not read beforehand) can overflow the logits of a block.
    check = spec.exp_slow > spec.exp_fast
    outs, lses, exps = [], [], []
    with quiet_overflow():
        for qi, qs in enumerate(range(0, sq, spec.bq)):
            qe = min(sq, qs + spec.bq)
            rows = qe - qs
            spans = key_spans(spec, qi, qs, qe, sk)
            pad = pad_rows(spec.feat, xp, dev, qs, qe)
            if not spans:
                out = xp.full((nb, nh, rows, dv), fill, dtype=cdtype, device=dev)
                log_sum = xp.full((nb, nh, rows, 1), lse_fill, dtype=cdtype, device=dev)
                outs.append(out if pad is None else xp.where(pad, 0.0, out))
                lses.append((xp.zeros((nb, nh, rows), dtype=cdtype, device=dev), _padded_sum(xp, pad, log_sum)))
                exps.append(0)
                continue
            qb = q[:, :, qs:qe, :]
            qb = xp.astype(qb, cdtype) if qb.dtype != cdtype else qb
            e = spec.exp_fast
            acc, run_max, run_sum = _block(spec, qb, k_g, v_g, qs, qe, spans, e)
            if check and _overflowed(spec, run_max, run_sum, qs, qe, spans):
                e = spec.exp_slow
                acc, run_max, run_sum = _block(spec, qb, k_g, v_g, qs, qe, spans, e)
                _unrepresentable(spec, run_max, run_sum, qs, qe, spans)
            acc = xp.reshape(acc, (nb, nh, rows, dv))
            # The largest attended logit contributes exp(0) = 1, so the sum is 0 exactly when nothing was attended.
            empty = run_sum == 0
            safe_sum = xp.where(empty, 1.0, run_sum)
            out = acc / safe_sum
            if spec.exp_v:
                out = out * 2.0**spec.exp_v
            out = xp.where(empty, fill, out)
            log_sum = xp.where(empty, lse_fill, xp.log(safe_sum))
            # A padding query is not a query with nothing to attend: zeros and lse -inf whatever fully_masked says.
            outs.append(out if pad is None else xp.where(pad, 0.0, out))
            lses.append((xp.where(empty, 0.0, run_max)[..., 0], _padded_sum(xp, pad, log_sum)))
            exps.append(e)
    return outs, lses, exps


def _padded_sum(xp: Any, pad: Any, log_sum: Any) -> Any:
    """A block's (B, H, rows, 1) log of the row sum as (B, H, rows), -inf on padding rows."""
    return (log_sum if pad is None else xp.where(pad, -math.inf, log_sum))[..., 0]


def key_spans(spec: _Spec, qi: int, qs: int, qe: int, sk: int) -> list[tuple[int, int]]:
    """The key tiles (ks, ke) that query block ``qi`` (rows qs:qe) visits, in order; the forward's and the VJP's.

    Plain path: under ``causal`` no key after the block's last query (keys at 0..Sk-1), the last tile ending there.
    With features: the key blocks :func:`relpos_ref.masks.features` found reachable from the block's rows.
    """
    bk = spec.bk
    if spec.feat is not None:
        return [(kb * bk, min(sk, kb * bk + bk)) for kb in spec.feat.blocks[qi]]
    k_stop = min(sk, spec.q_start + qe) if spec.causal else sk
    return [(ks, min(k_stop, ks + bk)) for ks in range(0, k_stop, bk)]


def _block(spec: _Spec, qb: Any, k_g: Any, v_g: Any, qs: int, qe: int, spans: list, e: int) -> tuple[Any, Any, Any]:
    """The online softmax of one query block over the key tiles ``spans`` on logits divided by 2^e: (acc, run_max,
    run_sum), ``run_max`` on that scale, ``acc`` (B, H_kv, group, rows, Dv) and ``run_sum`` unnormalised."""
    xp, cdtype, dev = spec.xp, spec.cdtype, spec.dev
    nb, nh, rows, d = qb.shape
    nkv, dv = v_g.shape[1], v_g.shape[4]
    group = nh // nkv
    neg_inf = -math.inf
    up = 2.0**e
    # The scale is applied to q once per block rather than to every logit; pre_scale scales the bias instead.
    qs_ = xp.reshape(qb * (spec.scale * 2.0**-e) if e else qb * spec.scale, (nb, nkv, group, rows, d))
    run_max = xp.full((nb, nh, rows, 1), neg_inf, dtype=cdtype, device=dev)
    run_sum = xp.zeros((nb, nh, rows, 1), dtype=cdtype, device=dev)
    acc = xp.zeros((nb, nkv, group, rows, dv), dtype=cdtype, device=dev)
    for ks, ke in spans:
        cols = ke - ks
        z = _logits(spec, qs_, k_g, qs, qe, ks, ke, e)
        new_max = xp.maximum(run_max, xp.max(z, axis=-1, keepdims=True))
        # A row with nothing attended so far has max -inf; shifting by 0 keeps exp(-inf) = 0, never -inf - -inf.
        shift = xp.where(new_max == neg_inf, 0.0, new_max)
        if e:
            p = xp.exp((z - shift) * up)
            rescale = xp.exp((run_max - shift) * up)
        else:
            p = xp.exp(z - shift)
            rescale = xp.exp(run_max - shift)
        run_sum = run_sum * rescale + xp.sum(p, axis=-1, keepdims=True)
        pv = xp.reshape(p, (nb, nkv, group, rows, cols)) @ v_g[:, :, :, ks:ke, :]
        acc = acc * xp.reshape(rescale, (nb, nkv, group, rows, 1)) + pv
        run_max = new_max
    return acc, run_max, run_sum


def _overflowed(spec: _Spec, run_max: Any, run_sum: Any, qs: int, qe: int, spans: list) -> bool:
    """Whether a family's bias overflowed this block's logits: a row maximum of +inf or NaN, or a row with nothing
    attended that neither the causal mask (a query before every key), the features nor a caller's mask or bias array
    explains.

    A caller's mask or bias array can empty a row on purpose; with one, an empty row is recomputed on the slow scale,
    where the logits cannot overflow, and :func:`_unrepresentable` then tells the two apart.
    """
    xp = spec.xp
    if not bool(xp.all(run_max < math.inf)):
        return True
    empty = run_sum == 0
    if not bool(xp.any(empty)):
        return False
    if spec.feat is not None:  # windows, lengths and segments empty rows on purpose: which rows reach a key
        return spec.bias.array is not None or bool(xp.any(empty & _reach(spec, qs, qe, spans)))
    if spec.mask is not None or spec.bias.array is not None:
        return True
    if not spec.causal:
        return True  # every row attends every key
    # Causal: row i is empty exactly when its absolute position is before key 0.
    first_live = max(0, min(qe, -spec.q_start) - qs)  # rows qs .. -q_start - 1 are before every key
    return bool(xp.any(empty[:, :, first_live:, :]))


def _reach(spec: _Spec, qs: int, qe: int, spans: list) -> Any:
    """Rows qs:qe with a key that the features and the caller's mask let them attend, (B or 1, H or 1, rows, 1)."""
    xp, sq, sk = spec.xp, int(spec.q_pos.shape[-1]), int(spec.k_pos.shape[-1])
    reach = xp.zeros((1, 1, qe - qs, 1), dtype=xp.bool, device=spec.dev)
    for ks, ke in spans:
        keep = tile_keep(spec.feat, xp, spec.dev, qs, qe, ks, ke)
        if spec.mask is not None:
            user = tile(spec.mask, qs, qe, ks, ke, sq, sk)
            keep = user if keep is None else keep & user
        if keep is None:
            return xp.ones((1, 1, qe - qs, 1), dtype=xp.bool, device=spec.dev)
        reach = reach | xp.any(keep, axis=-1, keepdims=True)
    return reach


def _unrepresentable(spec: _Spec, run_max: Any, run_sum: Any, qs: int, qe: int, spans: list) -> None:
    """After the slow recompute, where q . k cannot overflow: a row maximum still +inf or NaN, or an empty row with
    attended keys, comes from the family's bias itself being +-inf (its exact value beyond the family's dtype on
    every key of a row, as ALiBi's -m|i - j| far from every key). Such a row has no representable softmax: say so."""
    xp = spec.xp
    bad = not bool(xp.all(run_max < math.inf))
    empty = run_sum == 0
    if not bad and spec.feat is not None:
        bad = bool(xp.any(empty & _reach(spec, qs, qe, spans)))
    elif not bad and bool(xp.any(empty)):
        k_stop = spans[-1][1]
        qp, kp = spec.q_pos[qs:qe], spec.k_pos[:k_stop]
        keep = causal_mask(qp, kp, xp=xp) if spec.causal else xp.ones((qe - qs, k_stop), dtype=xp.bool)
        if spec.mask is not None:
            keep = keep & tile(spec.mask, qs, qe, 0, k_stop, int(spec.q_pos.shape[0]), int(spec.k_pos.shape[0]))
        bad = bool(xp.any(empty & xp.any(keep, axis=-1, keepdims=True)))
    if bad:
        fam = spec.bias.family
        msg = (
            f"bias: expected a family whose bias is finite on some key of every query, got a bias of "
            f"{type(fam).__name__} beyond the range of {fam.dtype} (+-inf) on every key of a query among rows "
            f"{qs}..{qe - 1} (or +inf on one): the exact softmax of that row is not representable from it; a wider "
            "dtype (or smaller parameters) for the family keeps it finite"
        )
        raise ValueError(msg)


def _logits(
    spec: _Spec, qb: Any, k_g: Any, qs: int, qe: int, ks: int, ke: int, e: int = 0, *, with_tanh: bool = False
) -> Any:
    """Final logits divided by 2^e of the tile of query rows qs:qe and keys ks:ke, (B, H, rows, cols), -inf where
    masked; with ``with_tanh``, also the tile's tanh(s / c) of the softcap (None without a softcap).

    ``qb`` is the block of queries already multiplied by the scale (and 2^-e) and grouped, (B, H_kv, group, rows, D).
    The forward and the backward both build their tiles here, so the probabilities the backward recomputes are the
    forward's.
    """
    xp = spec.xp
    nb, nkv, group, rows, _ = qb.shape
    nh, cols = nkv * group, ke - ks
    sq, sk = int(spec.q_pos.shape[-1]), int(spec.k_pos.shape[-1])
    qp, kp = spec.q_pos[..., qs:qe], spec.k_pos[..., ks:ke]
    z = xp.reshape(qb @ xp.matrix_transpose(k_g[:, :, :, ks:ke, :]), (nb, nh, rows, cols))
    t = None
    if spec.softcap is not None:
        # c tanh(s / c) on the scaled score, before the bias and the mask (FlashAttention, vLLM); on z / 2^e the
        # cap is c / 2^e, and (s / 2^e) / (c / 2^e) = s / c exactly.
        cap = spec.softcap * 2.0**-e if e else spec.softcap
        t = xp.tanh(z / cap)
        z = cap * t
    if spec.bias is not None:
        b = spec.bias.tile(xp, qs, qe, ks, ke, qp, kp)
        b = xp.astype(b, spec.cdtype) if b.dtype != spec.cdtype else b
        f = 2.0**-e
        # pre_scale: the bias times the scale (and 2^-e); post_scale: the bias (times 2^-e).
        pre = spec.placement == "pre_scale"
        z = z + b * (spec.scale * f if e else spec.scale) if pre else z + (b * f if e else b)
    if spec.feat is not None:
        keep = tile_keep(spec.feat, xp, spec.dev, qs, qe, ks, ke)
    else:
        keep = causal_mask(qp, kp, xp=xp) if spec.causal and ke - 1 > spec.q_start + qs else None
    if spec.mask is not None:
        user = tile(spec.mask, qs, qe, ks, ke, sq, sk)
        keep = user if keep is None else (user & keep)
    if keep is not None:
        z = xp.where(keep, z, -math.inf)
    return (z, t) if with_tanh else z


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
