"""Independent high-precision oracle for every bias family, the biased softmax and attention.

This module is a second, deliberately naive implementation of the library's mathematics. It
exists so that the array-API implementation can be checked against something that does not
share its code: every function here works on Python scalars and nested lists, loops over
elements one at a time, and evaluates transcendental functions with :mod:`mpmath` at a chosen
working precision (``dps``, default 50 decimal digits). It imports nothing from the rest of
:mod:`relpos_ref` and does not use NumPy, so a bug cannot hide in a helper shared by both.

Conventions (the same as the library's public contract):

* ``delta = i - j`` with ``i`` the absolute query position and ``j`` the absolute key position,
  so ``delta >= 0`` for keys at or before the query.
* Bias arrays are returned as nested lists indexed ``[head][query][key]``.
* Softmax masks are booleans with ``True`` meaning "may attend"; masked entries get probability
  exactly 0. A row with no attendable key gives zeros and ``lse = -inf`` (``fully_masked="zero"``)
  or NaN probabilities and NaN lse (``fully_masked="nan"``).
* ``lse`` is the natural-log log-sum-exp of the final logits (after scale and bias).

Inputs are converted to :class:`mpmath.mpf` exactly when they are ``int``, ``float``,
:class:`fractions.Fraction` (to the working precision) or ``mpf``; a ``float`` is a binary64
value and is taken at its exact value, so pass parameters *after* rounding them to the dtype
under test when the rounding of the inputs is not part of what is being measured.

T5 buckets are computed without any logarithm: the bucket test ``floor(log(n/E)/log(D/E)*(B'-E))
>= k`` is rewritten as the integer inequality ``n**(B'-E) * E**k >= E**(B'-E) * D**k`` (both
sides positive because ``D > E >= 1``), so every boundary, including the exact ones such as
``n = 16, 32, 64`` for the bidirectional defaults, is decided without rounding.
"""

from __future__ import annotations

import fractions
import math

import mpmath

__all__ = [
    "DEFAULT_DPS",
    "alibi_bias",
    "alibi_slope_log2",
    "alibi_slopes",
    "attention",
    "biased_softmax",
    "causal_mask",
    "context",
    "fire_bias",
    "kerple_log_bias",
    "kerple_power_bias",
    "offset_bias",
    "positions",
    "relative_offsets",
    "sandwich_bias",
    "t5_bias",
    "t5_bucket",
    "t5_bucket_thresholds",
    "to_decimal_string",
]

#: Default working precision in decimal digits.
DEFAULT_DPS = 50

_CONTEXTS: dict[int, mpmath.ctx_mp.MPContext] = {}


def context(dps: int = DEFAULT_DPS) -> mpmath.ctx_mp.MPContext:
    """Return a private mpmath context working at ``dps`` decimal digits.

    A private context (rather than the global ``mpmath.mp``) keeps the oracle's precision
    independent of whatever the caller has set globally.
    """
    if not isinstance(dps, int) or isinstance(dps, bool) or dps < 15:
        raise ValueError(f"dps must be an int >= 15, got {dps!r}")
    ctx = _CONTEXTS.get(dps)
    if ctx is None:
        ctx = mpmath.MPContext()
        ctx.dps = dps
        _CONTEXTS[dps] = ctx
    return ctx


def _num(ctx, x, name):
    """Convert one scalar input to ``mpf`` (exact for int, float and mpf inputs)."""
    if isinstance(x, bool):
        raise TypeError(f"{name} must be a real number, got bool {x!r}")
    if isinstance(x, fractions.Fraction):
        return ctx.mpf(x.numerator) / x.denominator
    if isinstance(x, (int, float, str, mpmath.mpf)):
        return ctx.mpf(x)
    # NumPy scalars and 0-d arrays: go through float(), which is exact for binary formats
    # up to 64 bits (float16, bfloat16, float32 and float64 all embed exactly in binary64).
    try:
        return ctx.mpf(float(x))
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r}") from None


def _int(x, name):
    if isinstance(x, bool) or not isinstance(x, int):
        try:
            if float(x) == int(x):
                return int(x)
        except (TypeError, ValueError, OverflowError):
            pass
        raise TypeError(f"{name} must be an integer, got {type(x).__name__} {x!r}")
    return x


def _vector(ctx, values, name):
    return [_num(ctx, v, f"{name}[{k}]") for k, v in enumerate(_flat_list(values, name))]


def _flat_list(values, name):
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (int, float)):
        return [values]
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            if len(v) != 1:
                raise ValueError(f"{name} must be 1-D (or (N, 1)), got a row of length {len(v)}")
            v = v[0]
        out.append(v)
    return out


def _int_list(values, name):
    if hasattr(values, "tolist"):
        values = values.tolist()
    return [_int(v, f"{name}[{k}]") for k, v in enumerate(values)]


def _heads(num_heads, heads):
    if heads is None:
        return list(range(num_heads))
    out = []
    for h in heads:
        h = _int(h, "heads")
        if not -num_heads <= h < num_heads:
            raise ValueError(f"heads must hold indices in [-{num_heads}, {num_heads}), got {h}")
        out.append(h % num_heads)
    return out


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------


def positions(q_len, k_len, *, align="bottom_right"):
    """Absolute query and key positions as lists of Python ints.

    ``bottom_right``: ``q_pos = (k_len - q_len) + arange(q_len)`` (the last query sits at the last
    key; entries are negative when ``q_len > k_len``). ``top_left``: ``q_pos = arange(q_len)``.
    ``k_pos = arange(k_len)`` in both cases.
    """
    q_len = _int(q_len, "q_len")
    k_len = _int(k_len, "k_len")
    if q_len < 0 or k_len < 0:
        raise ValueError(f"q_len and k_len must be >= 0, got q_len={q_len}, k_len={k_len}")
    if align == "bottom_right":
        start = k_len - q_len
    elif align == "top_left":
        start = 0
    else:
        raise ValueError(f"align must be 'bottom_right' or 'top_left', got {align!r}")
    return [start + t for t in range(q_len)], list(range(k_len))


def relative_offsets(q_pos, k_pos):
    """``delta[i][j] = q_pos[i] - k_pos[j]`` as Python ints."""
    q_pos = _int_list(q_pos, "q_pos")
    k_pos = _int_list(k_pos, "k_pos")
    return [[i - j for j in k_pos] for i in q_pos]


def causal_mask(q_pos, k_pos):
    """``mask[i][j] = k_pos[j] <= q_pos[i]`` (True where the key may be attended)."""
    q_pos = _int_list(q_pos, "q_pos")
    k_pos = _int_list(k_pos, "k_pos")
    return [[j <= i for j in k_pos] for i in q_pos]


# ---------------------------------------------------------------------------------------------
# T5 buckets (exact integer arithmetic)
# ---------------------------------------------------------------------------------------------


def _t5_half(bidirectional, num_buckets, max_distance):
    num_buckets = _int(num_buckets, "num_buckets")
    max_distance = _int(max_distance, "max_distance")
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional must be a bool, got {bidirectional!r}")
    half = num_buckets // 2 if bidirectional else num_buckets
    if bidirectional and num_buckets % 2:
        raise ValueError(f"num_buckets must be even when bidirectional, got {num_buckets}")
    exact = half // 2
    if exact < 1:
        raise ValueError(f"num_buckets must give at least one exact bucket (B'//2 >= 1), got {num_buckets}")
    if max_distance <= exact:
        raise ValueError(f"max_distance must exceed the number of exact buckets {exact}, got {max_distance}")
    return half, exact, max_distance


def _iroot_ceil(value, p):
    """Smallest integer ``n >= 0`` with ``n**p >= value`` (``value >= 0``, ``p >= 1``)."""
    if value <= 0:
        return 0
    # Start from a float estimate, then correct with exact integer comparisons; the float is
    # only a starting point and never decides the result.
    try:
        n = int(math.exp(math.log(value) / p))
    except OverflowError:
        n = 1 << (value.bit_length() // p + 1)
    n = max(n, 0)
    while n**p >= value:
        if n == 0:
            return 0
        n -= 1
    while n**p < value:
        n += 1
    return n


def t5_bucket_thresholds(*, bidirectional, num_buckets=32, max_distance=128):
    """Smallest distance ``n`` that lands in each half-bucket, from exact integer arithmetic.

    For ``b < E = B'//2`` the threshold is ``b``. For ``E <= b < B'`` it is the smallest ``n``
    with ``n**(B'-E) >= E**(B'-b) * D**(b-E)``, which is the exact-real-arithmetic form of
    ``floor(log(n/E) / log(D/E) * (B'-E)) >= b - E``. Here ``B' = num_buckets // 2`` when
    bidirectional (else ``num_buckets``) and ``D = max_distance``.

    Returns
    -------
    tuple of int
        ``B'`` thresholds (non-decreasing; equal thresholds mean the lower bucket is empty).
    """
    half, exact, dist = _t5_half(bidirectional, num_buckets, max_distance)
    p = half - exact
    out = list(range(exact))
    for b in range(exact, half):
        out.append(_iroot_ceil(exact ** (half - b) * dist ** (b - exact), p))
    return tuple(out)


def t5_bucket(delta, *, bidirectional, num_buckets=32, max_distance=128):
    """T5 bucket of one offset ``delta = i - j`` (Python int), exactly.

    Equal to Hugging Face ``T5Attention._relative_position_bucket(-delta, ...)`` evaluated in exact
    real arithmetic. Bidirectional: keys after the query (``delta < 0``) use ``[B', 2B')``. Causal:
    ``delta <= 0`` gives bucket 0.
    """
    delta = _int(delta, "delta")
    half, exact, dist = _t5_half(bidirectional, num_buckets, max_distance)
    if bidirectional:
        base = half if delta < 0 else 0
        n = abs(delta)
    else:
        base = 0
        n = max(delta, 0)
    if n < exact:
        return base + n
    p = half - exact
    # floor(log(n/E)/log(D/E) * p) >= k  <=>  n**p * E**k >= E**p * D**k  (exact, all positive);
    # the condition is monotone in k, so count the k in 1..p-1 that satisfy it (k = p would be
    # the clamp min(B'-1, ...)).
    n_p = n**p
    bucket = exact
    for k in range(1, p):
        if n_p * exact**k >= exact**p * dist**k:
            bucket = exact + k
        else:
            break
    return base + bucket


def t5_bias(
    table,
    q_pos,
    k_pos,
    *,
    bidirectional,
    max_distance=128,
    layout="heads_buckets",
    heads=None,
    dps=DEFAULT_DPS,
):
    """T5 bias ``b[h][i][j] = table[h, bucket(q_pos[i] - k_pos[j])]``.

    ``table`` is (H, B) for ``layout="heads_buckets"`` or (B, H) for ``"buckets_heads"``.
    """
    ctx = context(dps)
    if hasattr(table, "tolist"):
        table = table.tolist()
    rows = [list(r) for r in table]
    if layout == "buckets_heads":
        rows = [list(col) for col in zip(*rows)]
    elif layout != "heads_buckets":
        raise ValueError(f"layout must be 'heads_buckets' or 'buckets_heads', got {layout!r}")
    num_heads = len(rows)
    num_buckets = len(rows[0]) if rows else 0
    vals = [[_num(ctx, v, "table") for v in r] for r in rows]
    offs = relative_offsets(q_pos, k_pos)
    buckets = [
        [t5_bucket(d, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance) for d in row]
        for row in offs
    ]
    return [[[vals[h][b] for b in row] for row in buckets] for h in _heads(num_heads, heads)]


def offset_bias(table, q_pos, k_pos, *, heads=None, dps=DEFAULT_DPS):
    """Clipped per-offset bias ``b[h][i][j] = table[h, clip(i - j, -K, K) + K]``, table (H, 2K+1)."""
    ctx = context(dps)
    if hasattr(table, "tolist"):
        table = table.tolist()
    rows = [[_num(ctx, v, "table") for v in r] for r in table]
    width = len(rows[0])
    if width % 2 != 1:
        raise ValueError(f"table must have an odd number of columns 2K+1, got {width}")
    kk = (width - 1) // 2
    offs = relative_offsets(q_pos, k_pos)
    return [[[rows[h][min(max(d, -kk), kk) + kk] for d in row] for row in offs] for h in _heads(len(rows), heads)]


# ---------------------------------------------------------------------------------------------
# ALiBi
# ---------------------------------------------------------------------------------------------


def alibi_slope_log2(num_heads):
    """Exact base-2 logarithms of the official ALiBi slopes, as Fractions.

    Press et al. (arXiv 2108.12409), official ``get_slopes``: for a power of two ``n`` the slopes
    are ``2**(-8h/n)``, h = 1..n; otherwise, with ``c = 2**floor(log2 n)``, the ``c`` slopes of
    the ``c``-head rule come first and the odd-indexed slopes of the ``2c``-head rule,
    ``2**(-4(2k-1)/c)`` for k = 1..n-c, are appended (not sorted).
    """
    n = _int(num_heads, "num_heads")
    if n < 1:
        raise ValueError(f"num_heads must be >= 1, got {n}")
    c = 1 << (n.bit_length() - 1)
    out = [fractions.Fraction(-8 * h, c) for h in range(1, c + 1)]
    out += [fractions.Fraction(-4 * (2 * k - 1), c) for k in range(1, n - c + 1)]
    return out


def alibi_slopes(num_heads, *, dps=DEFAULT_DPS):
    """Official ALiBi slopes ``2**e`` for the exponents of :func:`alibi_slope_log2`."""
    ctx = context(dps)
    two = ctx.mpf(2)
    return [two ** (ctx.mpf(e.numerator) / e.denominator) for e in alibi_slope_log2(num_heads)]


def alibi_bias(slopes, q_pos, k_pos, *, heads=None, dps=DEFAULT_DPS):
    """Symmetric ALiBi bias ``b[h][i][j] = -slopes[h] * |q_pos[i] - k_pos[j]|``."""
    ctx = context(dps)
    m = _vector(ctx, slopes, "slopes")
    offs = relative_offsets(q_pos, k_pos)
    return [[[-m[h] * abs(d) for d in row] for row in offs] for h in _heads(len(m), heads)]


# ---------------------------------------------------------------------------------------------
# KERPLE (Chi et al., arXiv 2205.09921)
# ---------------------------------------------------------------------------------------------


def kerple_power_bias(r1, r2, q_pos, k_pos, *, heads=None, dps=DEFAULT_DPS):
    """KERPLE power kernel ``b[h][i][j] = -r1[h] * |i - j| ** r2[h]`` (``0**r2 = 0``)."""
    ctx = context(dps)
    a = _vector(ctx, r1, "r1")
    p = _vector(ctx, r2, "r2")
    if len(a) != len(p):
        raise ValueError(f"r1 and r2 must have the same length, got {len(a)} and {len(p)}")
    offs = relative_offsets(q_pos, k_pos)
    out = []
    for h in _heads(len(a), heads):
        out.append([[-a[h] * (ctx.mpf(abs(d)) ** p[h] if d else ctx.mpf(0)) for d in row] for row in offs])
    return out


def kerple_log_bias(r1, r2, q_pos, k_pos, *, heads=None, dps=DEFAULT_DPS):
    """KERPLE log kernel ``b[h][i][j] = -r1[h] * log(1 + r2[h] * |i - j|)``."""
    ctx = context(dps)
    a = _vector(ctx, r1, "r1")
    p = _vector(ctx, r2, "r2")
    if len(a) != len(p):
        raise ValueError(f"r1 and r2 must have the same length, got {len(a)} and {len(p)}")
    offs = relative_offsets(q_pos, k_pos)
    return [[[-a[h] * ctx.log1p(p[h] * abs(d)) for d in row] for row in offs] for h in _heads(len(a), heads)]


# ---------------------------------------------------------------------------------------------
# FIRE (Li et al., arXiv 2310.04418)
# ---------------------------------------------------------------------------------------------


def fire_inputs(q_pos, k_pos, *, c=0.1, L=512.0, eps=0.0, dps=DEFAULT_DPS):  # noqa: N803  (the paper's name)
    """Normalised FIRE input ``x[i][j] = psi(|i - j|) / (psi(max(L, i)) + eps)``, ``psi(t) = log1p(c t)``.

    ``i`` is the absolute query position (so a KV-cache decode step uses the true position).
    """
    ctx = context(dps)
    c = _num(ctx, c, "c")
    L = _num(ctx, L, "L")  # noqa: N806
    eps = _num(ctx, eps, "eps")
    qs = _int_list(q_pos, "q_pos")
    ks = _int_list(k_pos, "k_pos")
    out = []
    for i in qs:
        den = ctx.log1p(c * max(L, ctx.mpf(i))) + eps
        out.append([ctx.log1p(c * abs(i - j)) / den for j in ks])
    return out


def fire_bias(w1, b1, w2, b2, q_pos, k_pos, *, c=0.1, L=512.0, eps=0.0, heads=None, dps=DEFAULT_DPS):  # noqa: N803
    """FIRE bias ``b[h][i][j] = sum_k w2[h][k] * relu(w1[k] * x[i][j] + b1[k]) + b2[h]``.

    ``w1`` is (W, 1) (or (W,)), ``b1`` (W,), ``w2`` (H, W), ``b2`` (H,): PyTorch ``nn.Linear``
    layouts for ``Linear(1, W) -> ReLU -> Linear(W, H)``.
    """
    ctx = context(dps)
    a1 = _vector(ctx, w1, "w1")
    c1 = _vector(ctx, b1, "b1")
    if hasattr(w2, "tolist"):
        w2 = w2.tolist()
    a2 = [[_num(ctx, v, "w2") for v in row] for row in w2]
    c2 = _vector(ctx, b2, "b2")
    width = len(a1)
    if len(c1) != width or any(len(row) != width for row in a2) or len(c2) != len(a2):
        raise ValueError(
            f"FIRE shapes disagree: w1 ({len(a1)},1), b1 ({len(c1)},), "
            f"w2 ({len(a2)},{len(a2[0]) if a2 else 0}), b2 ({len(c2)},)"
        )
    x = fire_inputs(q_pos, k_pos, c=c, L=L, eps=eps, dps=dps)
    zero = ctx.mpf(0)
    out = []
    for h in _heads(len(a2), heads):
        plane = []
        for row in x:
            prow = []
            for xv in row:
                hidden = [max(a1[k] * xv + c1[k], zero) for k in range(width)]
                prow.append(ctx.fsum(a2[h][k] * hidden[k] for k in range(width)) + c2[h])
            plane.append(prow)
        out.append(plane)
    return out


# ---------------------------------------------------------------------------------------------
# Sandwich (Chi et al., arXiv 2212.10356; NeMo SandwichRelativePositionEmbedding)
# ---------------------------------------------------------------------------------------------


def sandwich_bias(num_heads, head_dim, q_pos, k_pos, *, heads=None, dps=DEFAULT_DPS):
    """Sandwich bias ``b_h = (sum_{k=1}^{d/2} cos(|i - j| * 10000**(-2k/d)) - d/2) / (8h/H)``.

    Heads are numbered ``h = 1..H`` in the formula (index ``h - 1`` in the output).
    """
    ctx = context(dps)
    num_heads = _int(num_heads, "num_heads")
    d = _int(head_dim, "head_dim")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if d < 2 or d % 2:
        raise ValueError(f"head_dim must be a positive even integer, got {d}")
    half = d // 2
    freqs = [ctx.power(10000, ctx.mpf(-2 * k) / d) for k in range(1, half + 1)]
    offs = relative_offsets(q_pos, k_pos)
    # The cosine sum depends only on |delta|; cache it because heads differ only by a factor.
    cache: dict[int, mpmath.mpf] = {}

    def s(n):
        if n not in cache:
            cache[n] = ctx.fsum(ctx.cos(n * w) for w in freqs) - half
        return cache[n]

    out = []
    for h in _heads(num_heads, heads):
        factor = ctx.mpf(num_heads) / (8 * (h + 1))
        out.append([[s(abs(dd)) * factor for dd in row] for row in offs])
    return out


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
    dps=DEFAULT_DPS,
):
    """Attention ``softmax(q k^T * scale + bias) v`` with grouped-query heads, exactly.

    Shapes: ``q`` (B, H, Sq, D), ``k`` (B, Hkv, Sk, D), ``v`` (B, Hkv, Sk, Dv); query head ``h``
    uses key/value head ``h // (H // Hkv)``. ``bias`` and ``mask`` (True = attend) are nested
    lists broadcastable to (B, H, Sq, Sk). ``causal`` adds the mask ``k_pos <= q_pos`` with
    positions from :func:`positions` and ``align``. ``scale`` defaults to ``1/sqrt(D)``.
    Returns ``(out, lse)``: ``out`` (B, H, Sq, Dv), ``lse`` (B, H, Sq).
    """
    ctx = context(dps)
    _check_options(placement, fully_masked)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if _rank(x.tolist() if hasattr(x, "tolist") else x) != 4:
            raise ValueError(f"{name} must be 4-D")
    q, k, v = (x.tolist() if hasattr(x, "tolist") else x for x in (q, k, v))
    nb, nh, sq, dim = len(q), len(q[0]), len(q[0][0]), len(q[0][0][0])
    nkv, sk = len(k[0]), len(k[0][0])
    if nh % nkv:
        raise ValueError(f"the number of query heads {nh} must be a multiple of kv heads {nkv}")
    group = nh // nkv
    sc = ctx.mpf(1) / ctx.sqrt(dim) if scale is None else _num(ctx, scale, "scale")
    get_bias = _as4(bias, "bias", (nb, nh, sq, sk)) if bias is not None else None
    get_mask = _as4(mask, "mask", (nb, nh, sq, sk)) if mask is not None else None
    q_pos, k_pos = positions(sq, sk, align=align)
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
            oh, lh = [], []
            for ii in range(sq):
                qi = [_num(ctx, t, "q") for t in q[bb][hh][ii]]
                z, keep = [], []
                for jj in range(sk):
                    s = ctx.fsum(qi[t] * kk[jj][t] for t in range(dim))
                    b = _num(ctx, get_bias(bb, hh, ii, jj), "bias") if get_bias else 0
                    z.append(s * sc + b if placement == "post_scale" else (s + b) * sc)
                    ok = bool(get_mask(bb, hh, ii, jj)) if get_mask else True
                    if causal:
                        ok = ok and k_pos[jj] <= q_pos[ii]
                    keep.append(ok)
                p, lse = _softmax_row(ctx, z, keep, fully_masked)
                width = len(vv[0]) if vv else 0
                # Masked keys have p = 0 exactly; a fully masked row already has p = 0 (zero)
                # or NaN (nan) everywhere, which this sum propagates.
                oh.append([ctx.fsum(p[jj] * vv[jj][t] for jj in range(sk)) for t in range(width)])
                lh.append(lse)
            ob.append(oh)
            lb.append(lh)
        out.append(ob)
        lse_out.append(lb)
    return out, lse_out


# ---------------------------------------------------------------------------------------------
# Output formatting
# ---------------------------------------------------------------------------------------------


def to_decimal_string(x, digits=20, *, dps=DEFAULT_DPS):
    """Decimal string of ``x`` with ``digits`` significant digits (``inf``, ``-inf``, ``nan`` as words).

    The string parses with any IEEE-754 ``strtod``; 20 digits (more than the 17 a binary64
    needs to round-trip) keep the string's own rounding far below every tolerance used here.
    """
    ctx = context(dps)
    x = _num(ctx, x, "x")
    if ctx.isnan(x):
        return "nan"
    if ctx.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0.0"
    return ctx.nstr(x, digits, strip_zeros=False, min_fixed=-4, max_fixed=digits)
