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

Gradients (:func:`bias_vjp`, :func:`attention_vjp`) are central differences of the functions above, evaluated at
``2 * dps + 10`` digits with a relative step of ``10**-dps``: no derivative formula is written down anywhere in this
module, so none can share a mistake with the library's backward. The error budget is in :func:`bias_vjp`.
"""

from __future__ import annotations

import fractions
import math

import mpmath

__all__ = [
    "DEFAULT_DPS",
    "FAMILY_PARAMS",
    "alibi_bias",
    "alibi_slope_log2",
    "alibi_slopes",
    "attention",
    "attention_vjp",
    "bias_vjp",
    "biased_softmax",
    "causal_mask",
    "context",
    "family_bias",
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
    "work_dps",
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
    if hasattr(x, "_mpf_"):
        # An mpf of another working precision (each dps has its own context): keep every digit it carries,
        # rather than the 17 that float() would.
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
# Gradients by central differences
# ---------------------------------------------------------------------------------------------

#: Parameter names of each family, as the library's constructor arguments.
FAMILY_PARAMS = {
    "alibi": ("slopes",),
    "kerple_power": ("r1", "r2"),
    "kerple_log": ("r1", "r2"),
    "t5": ("table",),
    "offset": ("table",),
    "fire": ("w1", "b1", "w2", "b2", "c", "L"),
    "sandwich": (),
    "tensor": ("array",),
}


def work_dps(dps=DEFAULT_DPS):
    """Digits at which the central differences evaluate the loss: ``2 * dps + 10``."""
    context(dps)  # validates dps
    return 2 * dps + 10


def _is_mp(x):
    return hasattr(x, "_mpf_")


def _tree(ctx, x, name):
    """Nested lists (or a scalar) of ``mpf`` at ``ctx``'s precision; exact for exact inputs."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [_tree(ctx, t, name) for t in x]
    if _is_mp(x):
        return ctx.mpf(x)
    return _num(ctx, x, name)


def _exact(x):
    """Hand ``mpf`` values of any precision to the scalar functions above without loss.

    Those functions convert their inputs with :func:`_num`, which is exact for a Fraction but takes an ``mpf`` of a
    private context through ``float()`` (such an ``mpf`` is not an instance of ``mpmath.mpf``): a perturbation of
    1e-50 would vanish there. A finite ``mpf`` is a dyadic rational, so its Fraction is exact.
    """
    if isinstance(x, list):
        return [_exact(t) for t in x]
    if _is_mp(x):
        if x != x or abs(x) == math.inf:
            return float(x)
        num, den = mpmath.libmp.to_rational(x._mpf_)
        return fractions.Fraction(num, den)
    return x


def _shape(x):
    dims = []
    while isinstance(x, list):
        dims.append(len(x))
        x = x[0] if x else None
    return tuple(dims)


def _leaves(x):
    if isinstance(x, list):
        for t in x:
            yield from _leaves(t)
    else:
        yield x


def _map(f, x):
    return [_map(f, t) for t in x] if isinstance(x, list) else f(x)


def _difference(holder, key, f, step):
    """Central difference of ``f()`` with respect to ``holder[key]`` (restored afterwards).

    The step is ``step * max(1, |x|)``. The divisor is the step actually taken, ``(x + h) - (x - h)``, which is exact
    (the two values are within a factor 2 of each other, or ``x = 0``), so rounding ``x +- h`` costs nothing.
    """
    x = holder[key]
    h = step * max(1, abs(x))
    xp, xm = x + h, x - h
    holder[key] = xp
    fp = f()
    holder[key] = xm
    fm = f()
    holder[key] = x
    return (fp - fm) / (xp - xm)


def _gradient(holder, key, f, step, leaf=None):
    """Gradient of ``f()`` with respect to every leaf under ``holder[key]``, with its nesting.

    ``f`` receives the index path of the perturbed leaf below ``holder[key]``. ``leaf(x)`` may return a value to use
    instead of a difference (None: differentiate).
    """

    def walk(parent, k, path):
        val = parent[k]
        if isinstance(val, list):
            return [walk(val, s, (*path, s)) for s in range(len(val))]
        if leaf is not None:
            got = leaf(val)
            if got is not None:
                return got
        return _difference(parent, k, lambda: f(path), step)

    return walk(holder, key, ())


def _family_params(cw, family, params):
    if family not in FAMILY_PARAMS:
        raise ValueError(f"family must be one of {', '.join(FAMILY_PARAMS)}, got {family!r}")
    want = FAMILY_PARAMS[family]
    got = sorted(params or {})
    if got != sorted(want):
        raise ValueError(f"params for family {family!r} must have the keys {list(want)}, got {got}")
    return {name: _tree(cw, params[name], name) for name in want}


def _option(options, name, family, default=None):
    if name in options:
        return options[name]
    if default is None:
        raise ValueError(f"options for family {family!r} must give {name!r}, got {sorted(options)}")
    return default


def family_bias(family, params, q_pos, k_pos, *, options=None, dps=DEFAULT_DPS):
    """Bias (H, Sq, Sk) of a family named as in :func:`bias_vjp`, from the bias functions above.

    ``params`` holds the parameters named as the library's constructor arguments (:data:`FAMILY_PARAMS`), ``options``
    the non-array arguments (T5 ``bidirectional``, ``max_distance``, ``layout``; FIRE ``eps``; Sandwich
    ``num_heads``, ``head_dim``). A ``tensor`` family's bias is its ``array``.
    """
    if family not in FAMILY_PARAMS:
        raise ValueError(f"family must be one of {', '.join(FAMILY_PARAMS)}, got {family!r}")
    o = dict(options or {})
    p = {k: _exact(v) for k, v in params.items()}
    if family == "alibi":
        return alibi_bias(p["slopes"], q_pos, k_pos, dps=dps)
    if family == "kerple_power":
        return kerple_power_bias(p["r1"], p["r2"], q_pos, k_pos, dps=dps)
    if family == "kerple_log":
        return kerple_log_bias(p["r1"], p["r2"], q_pos, k_pos, dps=dps)
    if family == "t5":
        return t5_bias(
            p["table"],
            q_pos,
            k_pos,
            bidirectional=_option(o, "bidirectional", family),
            max_distance=_option(o, "max_distance", family, 128),
            layout=_option(o, "layout", family, "heads_buckets"),
            dps=dps,
        )
    if family == "offset":
        return offset_bias(p["table"], q_pos, k_pos, dps=dps)
    if family == "fire":
        eps = _exact(_option(o, "eps", family, 0.0))
        return fire_bias(p["w1"], p["b1"], p["w2"], p["b2"], q_pos, k_pos, c=p["c"], L=p["L"], eps=eps, dps=dps)
    if family == "sandwich":
        nh = _option(o, "num_heads", family)
        return sandwich_bias(nh, _option(o, "head_dim", family), q_pos, k_pos, dps=dps)
    arr = params["array"]
    if len(_shape(arr)) != 3 or _shape(arr)[1:] != (len(q_pos), len(k_pos)):
        raise ValueError(f"params['array'] must be (H, Sq, Sk) = (H, {len(q_pos)}, {len(k_pos)}), got {_shape(arr)}")
    return arr


def _check_relu_margin(params, q_pos, k_pos, options, dps):
    """Raise if a FIRE relu pre-activation ``w1[w] * x + b1[w]`` is within ``10**-(dps//2)`` (relative) of 0.

    A central difference across relu's kink measures the average of its one-sided slopes (half the active one),
    while the library's convention is relu'(0) = 0. Away from the kink (perturbations are ~10**-dps) both agree.
    """
    ctx = context(dps)
    eps = _exact(_option(dict(options or {}), "eps", "fire", 0.0))
    x = fire_inputs(q_pos, k_pos, c=_exact(params["c"]), L=_exact(params["L"]), eps=eps, dps=dps)
    w1 = [ctx.mpf(t) for t in _leaves(params["w1"])]
    b1 = [ctx.mpf(t) for t in _leaves(params["b1"])]
    tol = ctx.mpf(10) ** (-(dps // 2))
    for w, (a, c) in enumerate(zip(w1, b1)):
        for r, row in enumerate(x):
            for col, xv in enumerate(row):
                pre = a * xv + c
                if abs(pre) <= tol * (1 + abs(a * xv) + abs(c)):
                    raise ValueError(
                        f"FIRE relu pre-activation w1[{w}]*x + b1[{w}] = {ctx.nstr(pre, 5)} at query {q_pos[r]}, key "
                        f"{k_pos[col]} is within {ctx.nstr(tol, 3)} (relative) of 0: a central difference there "
                        "averages relu's one-sided slopes, the library takes relu'(0) = 0; choose w1, b1 that keep "
                        "every pre-activation away from 0"
                    )


def _step(dps, step):
    cw = context(work_dps(dps))
    if step is None:
        return cw.mpf(10) ** (-dps)
    step = _tree(cw, step, "step")
    if not step > 0:
        raise ValueError(f"step must be positive, got {step}")
    return step


def bias_vjp(family, params, q_pos, k_pos, d_bias, *, options=None, dps=DEFAULT_DPS, step=None):
    """Parameter gradients of ``sum(d_bias * bias)`` by central differences of the bias functions above.

    Parameters
    ----------
    family : str
        ``alibi``, ``kerple_power``, ``kerple_log``, ``t5``, ``offset``, ``fire``, ``sandwich`` or ``tensor`` (the
        array itself is the bias).
    params : dict
        The family's parameters named as the library's constructor arguments (:data:`FAMILY_PARAMS`): ``slopes``;
        ``r1``, ``r2``; ``table`` (T5: in the layout ``options["layout"]``); ``w1`` (W, 1), ``b1``, ``w2`` (H, W),
        ``b2``, ``c``, ``L``; nothing for Sandwich; ``array`` (H, Sq, Sk) for a tensor.
    q_pos, k_pos : sequences of int
    d_bias : nested list (H, Sq, Sk)
        Cotangent of the bias; finite.
    options : dict, optional
        T5 ``bidirectional``, ``max_distance``, ``layout``; FIRE ``eps``; Sandwich ``num_heads``, ``head_dim``.
    dps : int
        Digits of the result. The loss is evaluated at :func:`work_dps` digits.
    step : number, optional
        Relative step; ``10**-dps`` by default.

    Returns
    -------
    dict
        ``{name: gradient}`` with each parameter's nesting (0-d ``c`` and ``L`` as plain ``mpf``); ``{}`` for
        Sandwich.

    Notes
    -----
    Step and error budget. Each parameter ``x`` moves by ``h = step * max(1, |x|)`` (``10**-dps`` relative) and the
    loss is evaluated at ``w = 2 dps + 10`` digits.

    * Truncation: ``h**2 |f'''| / 6``, about ``10**-(2 dps)`` relative where the loss is smooth. At a kink the
      central difference gives the average of the one-sided slopes plus ``O(h)``, about ``10**-dps``.
    * Rounding: ``10**-w * sum|terms| / h``, about ``10**-(dps + 10)`` relative to the sum of the absolute terms of
      the loss.

    At dps = 50 each part is below 1e-45, far below the 1e-25 asked of the oracle and the 20 digits stored in the
    golden vectors.

    The only kinks are FIRE's ``max(L, i)`` at ``L == i``, where the average (half the slope for ``L > i``) is also
    the library's convention, and relu at 0, where it is not (the library takes relu'(0) = 0): FIRE parameters must
    keep every pre-activation away from 0, and a ``ValueError`` says so otherwise. KERPLE's ``|Delta|**r2`` is 0 at
    ``Delta = 0`` for every r2, so its r2-derivative there is 0, as in the library. A tensor entry at -inf gets its
    ``d_bias`` (the derivative of the identity is 1 at every entry; no difference exists there).
    """
    ctx = context(dps)
    wdps = work_dps(dps)
    cw = context(wdps)
    h_rel = _step(dps, step)
    holder = _family_params(cw, family, params)
    q_pos = _int_list(q_pos, "q_pos")
    k_pos = _int_list(k_pos, "k_pos")
    g = _tree(cw, d_bias, "d_bias")
    base = family_bias(family, holder, q_pos, k_pos, options=options, dps=wdps)
    if _shape(g) != _shape(base):
        raise ValueError(f"d_bias must have the bias's shape (H, Sq, Sk) = {_shape(base)}, got {_shape(g)}")
    if not all(cw.isfinite(t) for t in _leaves(g)):
        raise ValueError("d_bias must be finite")
    if family == "fire":
        _check_relu_margin(holder, q_pos, k_pos, options, dps)
    g_flat = list(_leaves(g))

    def loss(_path):
        b = family_bias(family, holder, q_pos, k_pos, options=options, dps=wdps)
        # An infinite entry (a tensor's -inf) is a constant term of the loss: leaving it out changes no difference.
        return cw.fsum(gv * bv for gv, bv in zip(g_flat, _leaves(b)) if cw.isfinite(bv))

    out = {}
    for name in FAMILY_PARAMS[family]:
        grad = _gradient(holder, name, loss, h_rel)
        if family == "tensor":
            # The bias is the array itself; d loss / d array = d_bias, also at -inf where no difference exists.
            grad = [
                [[g[h][i][j] if cw.isinf(holder[name][h][i][j]) else val for j, val in enumerate(row)]
                 for i, row in enumerate(plane)]
                for h, plane in enumerate(grad)
            ]  # fmt: skip
        out[name] = _map(ctx.mpf, grad)
    return out


def attention_vjp(
    q,
    k,
    v,
    d_out,
    *,
    family=None,
    params=None,
    options=None,
    bias=None,
    causal=False,
    align="bottom_right",
    scale=None,
    placement="post_scale",
    mask=None,
    fully_masked="zero",
    d_lse=None,
    dps=DEFAULT_DPS,
    step=None,
):
    """Gradients of ``L = sum(d_out * out) + sum(d_lse * lse)`` through :func:`attention`, by central differences.

    Parameters
    ----------
    q, k, v, causal, align, scale, placement, mask, fully_masked
        As in :func:`attention`.
    d_out : nested list (B, H, Sq, Dv)
    family, params, options : optional
        A bias family as in :func:`bias_vjp`. Its bias (H, Sq, Sk) is built inside the perturbed function from the
        parameters and the positions ``positions(Sq, Sk, align=align)``.
    bias : nested list, optional
        A bias array broadcastable to (B, H, Sq, Sk) (not together with ``family``).
    d_lse : nested list (B, H, Sq), optional
    dps, step
        As in :func:`bias_vjp` (same step rule and error budget).

    Returns
    -------
    dict
        ``dq`` (B, H, Sq, D), ``dk`` (B, Hkv, Sk, D), ``dv`` (B, Hkv, Sk, Dv); ``params`` (as :func:`bias_vjp`)
        for a family, or ``dbias`` (the bias array's own shape) for a bias array.

    Notes
    -----
    The loss is a sum over (batch, key/value head) blocks that do not interact. A perturbation of q, k, v or of a
    bias-array entry re-evaluates only the blocks it reaches; a family parameter re-evaluates all of them.

    * A bias entry at -inf is a mask (probability exactly 0, as in the library); its gradient is 0, as that of every
      masked entry.
    * ``fully_masked="zero"``: the loss is evaluated with zero rows and lse -inf, and the d_lse of a row with nothing
      to attend is left out (its lse is -inf whatever the inputs). Such a row contributes exactly nothing: every
      difference it could enter is a difference of two equal numbers.
    * ``fully_masked="nan"``: the same differences, then NaN written where autograd through a naive softmax puts it,
      per the library's convention: the dq row and the bias-array gradient entries of an empty row, dk and dv of its
      (batch, key/value head), and every family parameter gradient. This part is a rule, not a measurement: a NaN
      loss has no differences to take.
    """
    ctx = context(dps)
    _check_options(placement, fully_masked)
    if family is not None and bias is not None:
        raise ValueError("family and bias: give a bias family or a bias array, not both")
    wdps = work_dps(dps)
    cw = context(wdps)
    h_rel = _step(dps, step)
    qkv = {name: _tree(cw, x, name) for name, x in (("q", q), ("k", k), ("v", v))}
    for name, x in qkv.items():
        if len(_shape(x)) != 4:
            raise ValueError(f"{name} must be 4-D, got shape {_shape(x)}")
    nb, nh, sq, dim = _shape(qkv["q"])
    nkv, sk = _shape(qkv["k"])[1:3]
    dv = _shape(qkv["v"])[3]
    if _shape(qkv["k"]) != (nb, nkv, sk, dim) or _shape(qkv["v"])[:3] != (nb, nkv, sk):
        raise ValueError(f"k, v must be (B, Hkv, Sk, D), (B, Hkv, Sk, Dv), got {_shape(qkv['k'])}, {_shape(qkv['v'])}")
    if nh % nkv:
        raise ValueError(f"the number of query heads {nh} must be a multiple of kv heads {nkv}")
    group = nh // nkv
    d_o = _tree(cw, d_out, "d_out")
    if _shape(d_o) != (nb, nh, sq, dv):
        raise ValueError(f"d_out must have the output's shape {(nb, nh, sq, dv)}, got {_shape(d_o)}")
    d_l = None if d_lse is None else _tree(cw, d_lse, "d_lse")
    if d_l is not None and _shape(d_l) != (nb, nh, sq):
        raise ValueError(f"d_lse must have the lse's shape {(nb, nh, sq)}, got {_shape(d_l)}")
    if not all(cw.isfinite(x) for x in (*_leaves(d_o), *(_leaves(d_l) if d_l is not None else ()))):
        raise ValueError("d_out and d_lse must be finite")
    sc = None if scale is None else _exact(_tree(cw, scale, "scale"))
    q_pos, k_pos = positions(sq, sk, align=align)
    shape4 = (nb, nh, sq, sk)

    # What gets perturbed for the bias: a family's parameters, or an array. A tensor family's array is perturbed as
    # an array (each entry reaches one head); it stays a family for the NaN rule and the result's keys.
    fam = None
    if family is not None:
        fam = _family_params(cw, family, params)
        family_bias(family, fam, q_pos, k_pos, options=options, dps=wdps)  # validates the options and shapes
        if family == "fire":
            _check_relu_margin(fam, q_pos, k_pos, options, dps)
    holder, hkey = ({"bias": _tree(cw, bias, "bias")}, "bias") if bias is not None else (fam, "array")
    has_array = bias is not None or family == "tensor"

    def current_bias():
        if has_array:
            return holder[hkey]
        return None if family is None else family_bias(family, fam, q_pos, k_pos, options=options, dps=wdps)

    base = current_bias()
    get_b = _as4(base, "bias", shape4) if base is not None else None
    if base is not None and any(cw.isnan(x) or x == cw.inf for x in _leaves(base)):
        raise ValueError("bias must be finite or -inf (a mask)")
    get_m = _as4(mask, "mask", shape4) if mask is not None else None

    def attend(b, h, i, j):
        return (
            (get_m is None or bool(get_m(b, h, i, j)))
            and (get_b is None or get_b(b, h, i, j) != cw.ninf)
            and (not causal or k_pos[j] <= q_pos[i])
        )

    keep = [[[[attend(b, h, i, j) for j in range(sk)] for i in range(sq)] for h in range(nh)] for b in range(nb)]

    def block_loss(b, g, bias_now, heads=None):
        """The loss terms of batch b, kv head g (only query ``heads`` of that group, when given)."""
        heads = range(g * group, (g + 1) * group) if heads is None else heads
        bs = None
        if bias_now is not None:
            getb = _as4(bias_now, "bias", shape4)
            # Masked entries (the -inf ones among them) are excluded by the mask; their value does not matter.
            bs = [
                [[[getb(b, h, i, j) if keep[b][h][i][j] else 0 for j in range(sk)] for i in range(sq)] for h in heads]
            ]
        out, lse = attention(
            _exact([[qkv["q"][b][h] for h in heads]]),
            _exact([[qkv["k"][b][g]]]),
            _exact([[qkv["v"][b][g]]]),
            bias=_exact(bs) if bs is not None else None,
            scale=sc,
            placement=placement,
            mask=[[keep[b][h] for h in heads]],
            fully_masked="zero",
            dps=wdps,
        )
        terms = []
        for hh, h in enumerate(heads):
            for i in range(sq):
                terms.extend(d_o[b][h][i][c] * out[0][hh][i][c] for c in range(dv))
                if d_l is not None and cw.isfinite(lse[0][hh][i]):
                    terms.append(d_l[b][h][i] * lse[0][hh][i])
        return cw.fsum(terms)

    def reached(name, b, hd):
        """The loss terms an entry of q[b][hd] (its own query head) or of k, v[b][hd] (every head of group hd) reach."""
        if name == "q":
            return lambda _path: block_loss(b, hd // group, base, [hd])
        return lambda _path: block_loss(b, hd, base)

    res = {
        "d" + name: [[_gradient(qkv[name][b], hd, reached(name, b, hd), h_rel) for hd in range(len(qkv[name][b]))]
                     for b in range(nb)]
        for name in ("q", "k", "v")
    }  # fmt: skip

    grads = {}
    if has_array:
        rank = len(_shape(holder[hkey]))
        dims = (1,) * (4 - rank) + _shape(holder[hkey])

        def array_loss(path):
            # an entry reaches its own batch and head, or all of them along an axis it is broadcast over
            path4 = (0,) * (4 - rank) + path
            bs_ = range(nb) if dims[0] == 1 else [path4[0]]
            if dims[1] == 1:
                return cw.fsum(block_loss(b, g, holder[hkey]) for b in bs_ for g in range(nkv))
            h = path4[1]
            return cw.fsum(block_loss(b, h // group, holder[hkey], [h]) for b in bs_)

        grads[hkey] = _gradient(holder, hkey, array_loss, h_rel, leaf=lambda x: cw.mpf(0) if x == cw.ninf else None)
    elif family is not None:

        def family_loss(_path):
            now = current_bias()
            return cw.fsum(block_loss(b, g, now) for b in range(nb) for g in range(nkv))

        for name in FAMILY_PARAMS[family]:
            grads[name] = _gradient(fam, name, family_loss, h_rel)

    if fully_masked == "nan":
        _nan_rule(cw, keep, res, grads, family, group)

    result = {name: _map(ctx.mpf, res[name]) for name in ("dq", "dk", "dv")}
    if family is not None:
        result["params"] = {n: _map(ctx.mpf, gr) for n, gr in grads.items()}
    elif bias is not None:
        result["dbias"] = _map(ctx.mpf, grads["bias"])
    return result


def _nan_rule(cw, keep, res, grads, family, group):
    """Write NaN where autograd through a naive softmax puts it for rows with nothing to attend (in place)."""
    nb, nh, sq = len(keep), len(keep[0]), len(keep[0][0])
    empty = [[[not any(keep[b][h][i]) for i in range(sq)] for h in range(nh)] for b in range(nb)]
    if not any(_leaves(empty)):
        return
    nan = cw.nan
    for b in range(nb):
        for h in range(nh):
            for i in range(sq):
                if empty[b][h][i]:
                    res["dq"][b][h][i] = _map(lambda _: nan, res["dq"][b][h][i])
        # A NaN probability row reaches every key of its (batch, kv head) through P^T dO and dz^T q.
        for g in range(len(res["dk"][b])):
            if any(empty[b][h][i] for h in range(g * group, (g + 1) * group) for i in range(sq)):
                res["dk"][b][g] = _map(lambda _: nan, res["dk"][b][g])
                res["dv"][b][g] = _map(lambda _: nan, res["dv"][b][g])
    if family == "tensor":
        # The tensor is the bias itself: only the rows of empty queries are NaN, as autograd gives.
        arr = grads["array"]
        for b in range(nb):
            for h in range(nh):
                for i in range(sq):
                    if empty[b][h][i]:
                        arr[h][i] = [nan] * len(arr[h][i])
        return
    if family is not None:
        for name in grads:
            grads[name] = _map(lambda _: nan, grads[name])
        return
    if "bias" in grads:
        arr = grads["bias"]
        rank = len(_shape(arr))
        dims = (1,) * (4 - rank) + _shape(arr)
        for b in range(nb):
            for h in range(nh):
                for i in range(sq):
                    if empty[b][h][i]:
                        row = arr
                        for ax, ix in enumerate((b, h, i)):
                            if ax >= 4 - rank:
                                row = row[ix if dims[ax] > 1 else 0]
                        # the entries this row reads: the whole key axis (or its single broadcast entry)
                        if rank == 0:
                            grads["bias"] = nan
                        else:
                            for j in range(len(row)):
                                row[j] = nan


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
