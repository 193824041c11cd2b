"""Biased softmax over the last axis and grouped-query attention, one element at a time."""

from __future__ import annotations

from ._mp import DEFAULT_DPS, _num, context
from .families import family_bias
from .positions import attention_layout

# ---------------------------------------------------------------------------------------------
# Biased softmax and attention
# ---------------------------------------------------------------------------------------------


def _softmax_row(ctx, z, keep, fully_masked):
    """Probabilities and lse of one row of final logits ``z`` with attend-flags ``keep``."""
    live = [zj for zj, kj in zip(z, keep) if kj]
    if not live:
        if fully_masked == "zero":
            return [ctx.mpf(0)] * len(z), ctx.mpf("-inf")
        return [ctx.nan] * len(z), ctx.nan
    top = max(live)
    total = ctx.fsum(ctx.exp(zj - top) for zj in live)
    lse = top + ctx.log(total)
    return [ctx.exp(zj - lse) if kj else ctx.mpf(0) for zj, kj in zip(z, keep)], lse


def _check_options(placement, fully_masked):
    if placement not in ("post_scale", "pre_scale"):
        raise ValueError(f"placement must be 'post_scale' or 'pre_scale', got {placement!r}")
    if fully_masked not in ("zero", "nan"):
        raise ValueError(f"fully_masked must be 'zero' or 'nan', got {fully_masked!r}")


def _rows(x):
    """Flatten a nested list to its list of last-axis rows (and remember the outer shape)."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if x and isinstance(x[0], (list, tuple)):
        shape_rows = []
        for sub in x:
            r, s = _rows(sub)
            shape_rows.append((r, s))
        rows = [row for r, _ in shape_rows for row in r]
        return rows, [len(x)] + shape_rows[0][1]
    return [list(x)], []


def _unflatten(rows, shape):
    if not shape:
        return rows[0]
    step = len(rows) // shape[0]
    return [_unflatten(rows[t * step : (t + 1) * step], shape[1:]) for t in range(shape[0])]


def biased_softmax(
    scores,
    bias=None,
    *,
    mask=None,
    scale=1.0,
    placement="post_scale",
    fully_masked="zero",
    dps=DEFAULT_DPS,
):
    """Softmax over the last axis of ``scores * scale + bias`` (post_scale) or ``(scores + bias) * scale``.

    ``scores``, ``bias`` and ``mask`` are nested lists of the same shape (``bias`` and ``mask`` may
    be None). Returns ``(probs, lse)`` with ``probs`` shaped like ``scores`` and ``lse`` shaped
    like ``scores`` without its last axis.
    """
    ctx = context(dps)
    _check_options(placement, fully_masked)
    s_rows, shape = _rows(scores)
    n_rows = len(s_rows)
    b_rows = _rows(bias)[0] if bias is not None else None
    m_rows = _rows(mask)[0] if mask is not None else None
    for name, rows in (("bias", b_rows), ("mask", m_rows)):
        if rows is not None and (len(rows) != n_rows or any(len(a) != len(b) for a, b in zip(rows, s_rows))):
            raise ValueError(f"{name} must have the same shape as scores")
    sc = _num(ctx, scale, "scale")
    probs, lses = [], []
    for r, srow in enumerate(s_rows):
        s = [_num(ctx, v, "scores") for v in srow]
        b = [_num(ctx, v, "bias") for v in b_rows[r]] if b_rows is not None else [0] * len(s)
        if placement == "post_scale":
            z = [sj * sc + bj for sj, bj in zip(s, b)]
        else:
            z = [(sj + bj) * sc for sj, bj in zip(s, b)]
        keep = [bool(v) for v in m_rows[r]] if m_rows is not None else [True] * len(s)
        p, lse = _softmax_row(ctx, z, keep, fully_masked)
        probs.append(p)
        lses.append(lse)
    return _unflatten(probs, shape), _unflatten(lses, shape)


def _as4(x, name, shape):
    """Broadcast a nested list of rank <= 4 to the 4-D ``shape``; returns ``get(b, h, i, j)``."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    rank = _rank(x)
    if rank > 4:
        raise ValueError(f"{name} must have at most 4 dimensions, got {rank}")
    dims = []
    probe = x
    while isinstance(probe, (list, tuple)):
        dims.append(len(probe))
        probe = probe[0] if probe else None
    dims = [1] * (4 - rank) + dims
    for got, want in zip(dims, shape):
        if got not in (1, want):
            raise ValueError(f"{name} of shape {tuple(dims)} does not broadcast to {tuple(shape)}")

    def get(*idx):
        val = x
        for axis in range(4 - rank, 4):
            val = val[idx[axis] if dims[axis] != 1 else 0]
        return val

    return get


def _rank(x):
    r = 0
    while isinstance(x, (list, tuple)):
        r += 1
        x = x[0] if x else None
    return r


def _softcap(ctx, softcap):
    """The softcap as an mpf (None: no cap); a positive finite real."""
    if softcap is None:
        return None
    c = _num(ctx, softcap, "softcap")
    if not (ctx.isfinite(c) and c > 0):
        raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap!r}")
    return c


def _logit(ctx, s, b, sc, cap, placement):
    """Final logit of raw score ``s = q.k``: the scaled score ``sc*s`` capped to ``cap*tanh(sc*s/cap)``, then
    ``+ b`` (post_scale) or ``+ sc*b`` (pre_scale); without a cap, pre_scale is ``(s + b)*sc`` as written."""
    if cap is None:
        return s * sc + b if placement == "post_scale" else (s + b) * sc
    capped = cap * ctx.tanh(s * sc / cap)
    return capped + b if placement == "post_scale" else capped + sc * b


def attention(
    q,
    k,
    v,
    *,
    bias=None,
    causal=False,
    align="bottom_right",
    scale=None,
    placement="post_scale",
    mask=None,
    fully_masked="zero",
    window=None,
    softcap=None,
    q_pos=None,
    k_pos=None,
    q_lens=None,
    k_lens=None,
    q_segment_ids=None,
    k_segment_ids=None,
    segment_positions="global",
    family=None,
    params=None,
    options=None,
    dps=DEFAULT_DPS,
):
    """Attention ``softmax(q k^T * scale + bias) v`` with grouped-query heads, exactly.

    Shapes: ``q`` (B, H, Sq, D), ``k`` (B, Hkv, Sk, D), ``v`` (B, Hkv, Sk, Dv); query head ``h``
    uses key/value head ``h // (H // Hkv)``. ``bias`` and ``mask`` (True = attend) are nested
    lists broadcastable to (B, H, Sq, Sk). ``causal`` adds the mask ``k_pos <= q_pos`` with
    positions from :func:`positions` and ``align``. ``scale`` defaults to ``1/sqrt(D)``.
    Returns ``(out, lse)``: ``out`` (B, H, Sq, Dv), ``lse`` (B, H, Sq).

    Further keywords (see :func:`attention_layout` for the positions and attend-flags they give):

    * ``window=(left, right)``: key j only when ``-right <= q_pos_i - k_pos_j <= left`` (a None side unbounded).
    * ``softcap=c``: the scaled score ``s = scale * q.k`` becomes ``c * tanh(s / c)`` before the bias is added
      (post_scale: ``+ b``; pre_scale: ``+ scale * b``) and before masking.
    * ``q_pos``/``k_pos`` ((S,) or (B, S) ints): positions overriding ``align``; the bias family (and causal,
      window) use them.
    * ``q_lens``/``k_lens`` (B,): queries ``i >= q_lens[b]`` are padding (output 0, lse -inf, whatever
      ``fully_masked`` says), keys ``j >= k_lens[b]`` are never attended; ``align`` applies to each row's lengths.
    * ``q_segment_ids``/``k_segment_ids`` (B, S): a key of another segment is masked; ``segment_positions``
      ``"global"`` keeps the positions, ``"restart"`` counts them from each segment's first token.
    * ``family``, ``params``, ``options``: a bias family named as in :func:`family_bias`, evaluated at each batch
      row's positions (instead of a ``bias`` array).
    """
    ctx = context(dps)
    _check_options(placement, fully_masked)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if _rank(x.tolist() if hasattr(x, "tolist") else x) != 4:
            raise ValueError(f"{name} must be 4-D")
    if family is not None and bias is not None:
        raise ValueError("family and bias: give a bias family or a bias array, not both")
    q, k, v = (x.tolist() if hasattr(x, "tolist") else x for x in (q, k, v))
    nb, nh, sq, dim = len(q), len(q[0]), len(q[0][0]), len(q[0][0][0])
    nkv, sk = len(k[0]), len(k[0][0])
    if nh % nkv:
        raise ValueError(f"the number of query heads {nh} must be a multiple of kv heads {nkv}")
    group = nh // nkv
    sc = ctx.mpf(1) / ctx.sqrt(dim) if scale is None else _num(ctx, scale, "scale")
    cap = _softcap(ctx, softcap)
    qp, kp, structural, padded = attention_layout(
        nb,
        sq,
        sk,
        causal=causal,
        align=align,
        window=window,
        q_pos=q_pos,
        k_pos=k_pos,
        q_lens=q_lens,
        k_lens=k_lens,
        q_segment_ids=q_segment_ids,
        k_segment_ids=k_segment_ids,
        segment_positions=segment_positions,
    )
    if family is not None:
        bias = [family_bias(family, params or {}, qp[b], kp[b], options=options, dps=dps) for b in range(nb)]
        if any(len(plane) != nh for plane in bias):
            raise ValueError(f"the bias family has {len(bias[0])} heads, q has {nh}")
    get_bias = _as4(bias, "bias", (nb, nh, sq, sk)) if bias is not None else None
    get_mask = _as4(mask, "mask", (nb, nh, sq, sk)) if mask is not None else None
    zero, ninf = ctx.mpf(0), ctx.mpf("-inf")
    out, lse_out = [], []
    for bb in range(nb):
        ob, lb = [], []
        kv_cache = {}
        for hh in range(nh):
            g = hh // group
            if g not in kv_cache:
                kv_cache[g] = (
                    [[_num(ctx, t, "k") for t in row] for row in k[bb][g]],
                    [[_num(ctx, t, "v") for t in row] for row in v[bb][g]],
                )
            kk, vv = kv_cache[g]
            width = len(vv[0]) if vv else 0
            oh, lh = [], []
            for ii in range(sq):
                if padded[bb][ii]:
                    # A padding query is not a query with nothing to attend: zeros and -inf in both modes.
                    oh.append([zero] * width)
                    lh.append(ninf)
                    continue
                qi = [_num(ctx, t, "q") for t in q[bb][hh][ii]]
                z, keep = [], []
                for jj in range(sk):
                    s = ctx.fsum(qi[t] * kk[jj][t] for t in range(dim))
                    b = _num(ctx, get_bias(bb, hh, ii, jj), "bias") if get_bias else 0
                    z.append(_logit(ctx, s, b, sc, cap, placement))
                    ok = bool(get_mask(bb, hh, ii, jj)) if get_mask else True
                    keep.append(ok and structural[bb][ii][jj])
                p, lse = _softmax_row(ctx, z, keep, fully_masked)
                # Masked keys have p = 0 exactly; a fully masked row already has p = 0 (zero)
                # or NaN (nan) everywhere, which this sum propagates.
                oh.append([ctx.fsum(p[jj] * vv[jj][t] for jj in range(sk)) for t in range(width)])
                lh.append(lse)
            ob.append(oh)
            lb.append(lh)
        out.append(ob)
        lse_out.append(lb)
    return out, lse_out
