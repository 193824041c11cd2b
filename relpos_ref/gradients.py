r"""Reference gradients of attention with a relative positional bias: the vector-Jacobian product of
:func:`relpos_ref.attention` with respect to q, k, v and the bias (its family's parameters, or the bias array).

The backward is FlashAttention-2's (Dao, arXiv 2307.08691, Algorithm 2): the forward's log-sum-exp is kept, each tile
of probabilities is recomputed from it, and the softmax backward uses the row quantity
:math:`\delta_i = \sum_c \bar O_{ic} O_{ic}` instead of a second pass over the row. The derivation and every
convention are in ``spec/gradients.md``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from . import _checks
from ._checks import quiet_overflow
from .attention import _logits, _prepare, _stream, key_spans
from .masks import pad_rows

__all__ = ["AttentionGrads", "attention_vjp"]


class AttentionGrads(NamedTuple):
    """Gradients returned by :func:`attention_vjp`.

    Attributes
    ----------
    dq : array (B, H, Sq, D)
    dk : array (B, H_kv, Sk, D)
        Summed over the query heads that share each key/value head.
    dv : array (B, H_kv, Sk, Dv)
    dbias : None, dict or array
        None without a bias. For a family, a dict keyed by its constructor argument names, each gradient with that
        parameter's shape and dtype (a T5 table in the layout it was given in; ``{}`` for Sandwich;
        ``{"array": (H, Sq, Sk)}`` for a TensorBias). For a bias array, an array of that array's own shape (summed
        over the axes it was broadcast along).
    """

    dq: Any
    dk: Any
    dv: Any
    dbias: Any


def attention_vjp(
    q: Any,
    k: Any,
    v: Any,
    d_out: Any,
    *,
    bias: Any = None,
    causal: bool = False,
    align: str = "bottom_right",
    scale: float | None = None,
    placement: str = "post_scale",
    mask: Any = None,
    fully_masked: str = "zero",
    d_lse: Any = None,
    block_size: int | None = None,
    kv_block_size: int | None = None,
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
) -> AttentionGrads:
    r"""Gradients of :func:`relpos_ref.attention` for an output cotangent: the vector-Jacobian product.

    For the loss :math:`\mathcal{L} = \sum \bar O \odot O + \sum \bar\ell \odot \mathrm{lse}`, with :math:`P` the
    probabilities and :math:`z` the final logits of :func:`relpos_ref.attention`:

    .. math::

        \bar V = P^\top \bar O, \qquad \bar P = \bar O V^\top, \qquad
        \bar z_{ij} = P_{ij}\,(\bar P_{ij} - \delta_i + \bar\ell_i), \quad \delta_i = \sum_c \bar O_{ic} O_{ic},

        \bar Q = \tau\, \bar z K, \qquad \bar K = \tau\, \bar z^\top Q, \qquad
        \bar b = \bar z \;(\text{post\_scale}) \text{ or } \tau \bar z \;(\text{pre\_scale}),

    summed over batches (and, for :math:`\bar K, \bar V`, over the query heads of each key/value head); the
    family's parameter gradients are :meth:`BiasFamily.bias_vjp` of :math:`\bar b`.

    Parameters
    ----------
    q, k, v, bias, causal, align, scale, placement, mask, fully_masked, block_size, kv_block_size, xp
        As in :func:`relpos_ref.attention`.
    window, softcap, q_pos, k_pos, q_lens, k_lens, q_segment_ids, k_segment_ids, segment_positions
        The kernel features of :func:`relpos_ref.attention`, with the same meaning. A softcap multiplies the score
        part of the gradient by its derivative: :math:`\bar s = \bar z\,(1 - \tanh^2(s / c))` enters
        :math:`\bar Q` and :math:`\bar K`, while :math:`\bar b` stays :math:`\bar z` (or :math:`\tau \bar z`).
        Padding queries (:math:`i \ge L^q_b`) get zero dq rows and contribute nothing to dk, dv or the bias
        gradient, in both ``fully_masked`` modes; keys :math:`j \ge L^k_b` get zero dk and dv.
    d_out : float array (B, H, Sq, Dv)
        Cotangent of the output, dtype of ``q``; finite.
    d_lse : float array (B, H, Sq), optional
        Cotangent of the log-sum-exp (FlashAttention returns it for ring and split-KV attention); finite. Ignored on
        rows with nothing to attend.

    Returns
    -------
    AttentionGrads
        ``(dq, dk, dv, dbias)``; dq, dk, dv in the dtype of ``q``, computed in the compute dtype (float32 for
        float16).

    Notes
    -----
    Block-streamed like the forward: one forward pass for the log-sum-exp, then one pass over the same
    (query block, key block) tiles recomputing the probabilities. No (B, H, Sq, Sk) array exists at once; a family's
    parameter gradients accumulate tile by tile. Masked entries have zero gradient. A query with nothing to attend
    contributes nothing under ``fully_masked="zero"``; under ``"nan"`` its NaN spreads as through autograd of a naive
    softmax: its dq row and bias-gradient row, dk and dv of its (batch, key/value head), and every parameter gradient
    of a family are NaN (for a TensorBias or a bias array, only its row).
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
    xp, cdtype, dev = spec.xp, spec.cdtype, spec.dev
    nb, nh, sq, d = q.shape
    nkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    _checks.float_array("d_out", d_out, xp, ndim=4)
    if d_out.dtype != q.dtype:
        msg = f"d_out: expected the dtype of q ({q.dtype}), got {d_out.dtype}"
        raise TypeError(msg)
    if tuple(d_out.shape) != (nb, nh, sq, dv):
        msg = f"d_out: expected the output's shape (B, H, Sq, Dv) = {(nb, nh, sq, dv)}, got {tuple(d_out.shape)}"
        raise ValueError(msg)
    do_max = _checks.abs_max_finite("d_out", d_out, xp)
    dl_max = 0.0
    if d_lse is not None:
        _checks.float_array("d_lse", d_lse, xp, ndim=3)
        if tuple(d_lse.shape) != (nb, nh, sq):
            msg = f"d_lse: expected the lse's shape (B, H, Sq) = {(nb, nh, sq)}, got {tuple(d_lse.shape)}"
            raise ValueError(msg)
        dl_max = _checks.abs_max_finite("d_lse", d_lse, xp)
    # Whether a gradient (or a partial sum of one) could overflow: bounds from the largest magnitudes, in log2.
    risky = _gradient_may_overflow(spec, (nb, nh, sq, sk, d, dv), do_max, dl_max)

    qc, kc, vc = (xp.astype(t, cdtype) if t.dtype != cdtype else t for t in (q, k, v))
    doc = xp.astype(d_out, cdtype) if d_out.dtype != cdtype else d_out
    dlc = None if d_lse is None else (xp.astype(d_lse, cdtype) if d_lse.dtype != cdtype else d_lse)
    # The forward with empty rows as zeros and lse -inf: the recomputed probabilities of such rows are then exactly 0.
    # Its lse is on each query block's scale 2^exps[block] (0 unless the logits approach the dtype's range).
    outs, stats, exps = _stream(spec, q, kc, vc, fully_masked="zero")
    out = outs[0] if len(outs) == 1 else xp.concat(outs, axis=2)
    # Past |m| = 2^(p - 16) (p the precision: 256 in float32, 1.4e11 in float64) m + log_sum would round log_sum by
    # more than 2^-16: such blocks recompute the probabilities from m and log_sum kept apart (one more subtraction).
    split_at = 2.0 ** (_checks.precision(xp, cdtype) - 16)

    tiles = spec.bias
    family = None if tiles is None else tiles.family
    group = nh // nkv
    neg_inf = -math.inf
    k_g = kc[:, :, None, :, :]
    v_g = vc[:, :, None, :, :]
    bk = spec.bk
    key_blocks = list(range(0, sk, bk))
    dk_blocks = [None] * len(key_blocks)
    dv_blocks = [None] * len(key_blocks)
    param_grads: dict[str, Any] | None = None
    bias_tiles: dict[tuple[int, int], Any] = {}  # array-bias gradient pieces keyed by (query block, key block)
    dq_blocks = []
    with quiet_overflow():  # a gradient that overflows is reported below, not warned about on the way
        for qi, qs in enumerate(range(0, sq, spec.bq)):
            qe = min(sq, qs + spec.bq)
            rows = qe - qs
            # The forward's key blocks, each taken whole (the forward's last causal tile may end before it).
            spans = [(ks, min(sk, ks + bk)) for ks, _ in key_spans(spec, qi, qs, qe, sk)]
            qb = qc[:, :, qs:qe, :]
            e = exps[qi]
            qb_scaled = xp.reshape(qb * (spec.scale * 2.0**-e) if e else qb * spec.scale, (nb, nkv, group, rows, d))
            qb_g = xp.reshape(qb, (nb, nkv, group, rows, d))
            qp = spec.q_pos[..., qs:qe]
            m_b, log_sum_b = (t[..., None] for t in stats[qi])
            live = log_sum_b != neg_inf
            log_sum_safe = xp.where(live, log_sum_b, xp.zeros_like(log_sum_b))
            split = bool(e) or float(xp.max(xp.abs(m_b))) >= split_at
            lse_safe = None if split else m_b + log_sum_safe
            do_b = doc[:, :, qs:qe, :]
            # delta_i = sum_c dO_ic O_ic: the row sum of P * dP, obtained from the output instead of a second row pass.
            delta = xp.sum(do_b * out[:, :, qs:qe, :], axis=-1, keepdims=True)
            if dlc is not None:
                delta = delta - xp.where(live, dlc[:, :, qs:qe, None], xp.zeros_like(log_sum_b))
            do_g = xp.reshape(do_b, (nb, nkv, group, rows, dv))
            dq_b = xp.zeros((nb, nkv, group, rows, d), dtype=cdtype, device=dev)
            for ks, ke in spans:
                kb = ks // bk
                cols = ke - ks
                z, t = _logits(spec, qb_scaled, k_g, qs, qe, ks, ke, e, with_tanh=True)
                # Rows with nothing attended have lse -inf and every z -inf: shifting them by 0 gives exp(-inf) = 0.
                # split: (z - m) - log_sum, kept apart; else z - lse, FlashAttention's one subtraction.
                p = xp.exp(((z - m_b) * 2.0**e if e else z - m_b) - log_sum_safe) if split else xp.exp(z - lse_safe)
                p_g = xp.reshape(p, (nb, nkv, group, rows, cols))
                dp = xp.reshape(do_g @ xp.matrix_transpose(v_g[:, :, :, ks:ke, :]), (nb, nh, rows, cols))
                dz = p * (dp - delta)
                # The softcap's c tanh(s / c) has derivative 1 - tanh^2 in s; the bias enters after it.
                ds = dz if t is None else dz * (1.0 - t * t)
                ds_g = xp.reshape(ds, (nb, nkv, group, rows, cols))
                dv_t = xp.sum(xp.matrix_transpose(p_g) @ do_g, axis=2)
                dk_t = xp.sum(xp.matrix_transpose(ds_g) @ qb_g, axis=2) * spec.scale
                dq_b = dq_b + (ds_g @ k_g[:, :, :, ks:ke, :]) * spec.scale
                dk_blocks[kb] = dk_t if dk_blocks[kb] is None else dk_blocks[kb] + dk_t
                dv_blocks[kb] = dv_t if dv_blocks[kb] is None else dv_blocks[kb] + dv_t
                if tiles is None:
                    continue
                db = dz * spec.scale if spec.placement == "pre_scale" else dz
                if family is not None:
                    tile = tiles.family_vjp_batch(xp, qp, spec.k_pos[..., ks:ke], db)
                    param_grads = tile if param_grads is None else {n: param_grads[n] + tile[n] for n in param_grads}
                else:
                    bias_tiles[(qi, kb)] = _reduce_to(xp, db, tiles.array, sq, sk)
            dq_blocks.append(xp.reshape(dq_b, (nb, nh, rows, d)))

    dq = dq_blocks[0] if len(dq_blocks) == 1 else xp.concat(dq_blocks, axis=2)
    dk = _assemble(xp, dk_blocks, key_blocks, bk, sk, (nb, nkv), d, cdtype, dev)
    dv_ = _assemble(xp, dv_blocks, key_blocks, bk, sk, (nb, nkv), dv, cdtype, dev)
    dbias = None
    if family is not None:
        if param_grads is None:  # no tile computed: every query sees nothing
            zero = xp.zeros((nh, sq, sk), dtype=cdtype, device=dev)
            qp1, kp1 = (p if p.ndim == 1 else p[0, :] for p in (spec.q_pos, spec.k_pos))
            param_grads = tiles.family_vjp(xp, qp1, kp1, zero)
        if risky:
            _finite_gradients(xp, cdtype, param_grads.values(), "bias", "of the family's parameters")
        dbias = tiles.family_grads(xp, param_grads)
    elif tiles is not None:
        dbias = _assemble_bias(xp, bias_tiles, tiles.array, sq, sk, spec.bq, bk, cdtype, dev)
    if risky:
        grads = (dq, dk, dv_) if family is not None or dbias is None else (dq, dk, dv_, dbias)
        _finite_gradients(xp, cdtype, grads, "q, k, v, d_out", "dq, dk, dv")
    if spec.fully_masked == "nan":
        log_sum = xp.concat([t[1] for t in stats], axis=2) if len(stats) > 1 else stats[0][1]
        empty = ~(log_sum != neg_inf)
        pad = pad_rows(spec.feat, xp, dev, 0, sq)
        if pad is not None:  # padding queries have zero gradients in both modes: no NaN from them
            empty = empty & ~pad[..., 0]
        dq, dk, dv_, dbias = _nan_rows(xp, empty, dq, dk, dv_, dbias, family is not None, group)
    dq, dk, dv_ = (t if t.dtype == q.dtype else xp.astype(t, q.dtype) for t in (dq, dk, dv_))
    if tiles is not None and tiles.tensor is not None:
        dbias = {"array": _as_dtype(xp, xp.reshape(dbias, tuple(tiles.array.shape[1:])), tiles.array.dtype)}
    elif family is None and dbias is not None:
        dbias = xp.reshape(_as_dtype(xp, dbias, bias.dtype), tuple(bias.shape))
    return AttentionGrads(dq, dk, dv_, dbias)


def _gradient_may_overflow(spec: Any, sizes: tuple[int, ...], do_max: float, dl_max: float) -> bool:
    r"""Whether a bound on a gradient or a partial sum of one reaches a quarter of the compute dtype's range.

    With :math:`P` the probabilities (rows summing to 1), :math:`|\bar P|, |\delta| \le D_v \max|\bar O| \max|V|`,
    so :math:`|\bar z_{ij}| \le P_{ij} C` with :math:`C = 2 D_v \max|\bar O|\max|V| + \max|\bar\ell|`; then
    :math:`|\bar Q| \le \tau C \max|K|`, :math:`|\bar K| \le \tau n C \max|Q|`, :math:`|\bar V| \le n \max|\bar O|`
    and :math:`|\bar b| \le N C` (summed over at most :math:`N = B H S_q S_k` entries), :math:`n = H S_q`. When all
    stay below the range, nothing can overflow and no result is read; otherwise the results are checked.
    """
    nb, nh, sq, sk, _, dv = sizes
    emax = _checks.max_exponent(spec.xp, spec.cdtype)
    qm, km, vm = (_checks.log2_ceil(x) for x in spec.abs_max)
    e_c = max(_checks.log2_ceil(dv) + _checks.log2_ceil(do_max) + vm + 1, _checks.log2_ceil(dl_max)) + 1
    e_tau = _checks.log2_ceil(spec.scale)
    e_n = _checks.log2_ceil(nh * sq)
    e_all = _checks.log2_ceil(nb * nh * sq * sk)
    worst = max(e_c + e_all, e_tau + e_c + km, e_tau + e_n + e_c + qm, e_n + _checks.log2_ceil(do_max))
    return worst > emax - 2


def _finite_gradients(xp: Any, cdtype: Any, grads: Any, names: str, what: str) -> None:
    """Reject gradients with an infinity or NaN (every input is finite, so an overflow produced it)."""
    for g in grads:
        if not bool(xp.all(xp.isfinite(g))):
            msg = (
                f"{names}: expected inputs whose gradients {what} fit {cdtype} (the compute dtype), got an overflow "
                "to infinity: the exact gradient, or a sum inside it, exceeds the largest finite number. The VJP is "
                "linear in d_out: scale d_out down by a power of two and the gradients up"
            )
            raise ValueError(msg)


def _as_dtype(xp: Any, x: Any, dtype: Any) -> Any:
    return x if x.dtype == dtype else xp.astype(x, dtype)


def _reduce_to(xp: Any, db: Any, array_bias: Any, sq: int, sk: int) -> Any:
    """Sum a (B, H, rows, cols) tile of bias cotangent over the axes ``array_bias`` (4-D) broadcasts along."""
    axes = tuple(ax for ax in (0, 1) if array_bias.shape[ax] == 1 and db.shape[ax] != 1)
    if array_bias.shape[2] == 1 and sq != 1:
        axes += (2,)
    if array_bias.shape[3] == 1 and sk != 1:
        axes += (3,)
    return xp.sum(db, axis=axes, keepdims=True) if axes else db


def _assemble(
    xp: Any, blocks: list, starts: list[int], bk: int, sk: int, lead: tuple, width: int, dtype: Any, dev: Any
) -> Any:
    """Concatenate per-key-block gradients; blocks no query saw (after every query, under causal) are zero."""
    parts = []
    for n, ks in enumerate(starts):
        ke = min(sk, ks + bk)
        blk = blocks[n]
        parts.append(blk if blk is not None else xp.zeros((*lead, ke - ks, width), dtype=dtype, device=dev))
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=2)


def _assemble_bias(
    xp: Any, tiles: dict, array_bias: Any, sq: int, sk: int, bq: int, bk: int, dtype: Any, dev: Any
) -> Any:
    """The gradient of a 4-D bias array from its tiles: concatenated along full axes, summed along broadcast ones."""
    full_q, full_k = array_bias.shape[2] == sq and sq != 1, array_bias.shape[3] == sk and sk != 1
    lead = [int(n) for n in array_bias.shape[:2]]
    q_starts, k_starts = list(range(0, sq, bq)), list(range(0, sk, bk))

    def piece(qi: int, kb: int) -> Any:
        if (qi, kb) in tiles:
            return tiles[(qi, kb)]
        rows = min(sq, q_starts[qi] + bq) - q_starts[qi] if full_q else 1
        cols = min(sk, k_starts[kb] + bk) - k_starts[kb] if full_k else 1
        return xp.zeros((*lead, rows, cols), dtype=dtype, device=dev)

    row_parts = []
    for qi in range(len(q_starts)):
        cells = [piece(qi, kb) for kb in range(len(k_starts))]
        row_parts.append(xp.concat(cells, axis=3) if full_k else _total(cells))
    return xp.concat(row_parts, axis=2) if full_q else _total(row_parts)


def _total(parts: list) -> Any:
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


def _nan_rows(xp: Any, empty: Any, dq: Any, dk: Any, dv: Any, dbias: Any, of_family: bool, group: int) -> tuple:
    """fully_masked="nan": spread the NaN of empty rows the way autograd through a naive softmax does."""
    if not bool(xp.any(empty)):
        return dq, dk, dv, dbias
    nan = math.nan
    dq = xp.where(empty[..., None], xp.full_like(dq, nan), dq)
    nb, nh, sq = empty.shape
    # A NaN probability row feeds every key of its (batch, kv head) through P^T dO and dz^T Q.
    per_kv = xp.any(xp.reshape(empty, (nb, nh // group, group * sq)), axis=-1)[:, :, None, None]
    dk = xp.where(per_kv, xp.full_like(dk, nan), dk)
    dv = xp.where(per_kv, xp.full_like(dv, nan), dv)
    if of_family:
        dbias = {n: xp.full_like(g, nan) for n, g in dbias.items()}
    elif dbias is not None:
        rows = empty[..., None]
        shape = tuple(dbias.shape)
        axes = tuple(ax for ax in range(3) if shape[ax] == 1 and rows.shape[ax] != 1)
        rows = xp.any(rows, axis=axes, keepdims=True) if axes else rows
        dbias = xp.where(rows, xp.full_like(dbias, nan), dbias)
    return dq, dk, dv, dbias
