"""Per-family bias formulas (T5, offset, ALiBi, KERPLE, FIRE, Sandwich) and dispatch by family name."""

from __future__ import annotations

import fractions
import math

import mpmath

from ._mp import DEFAULT_DPS, _exact, _heads, _int, _int_list, _num, _shape, _vector, context
from .positions import relative_offsets

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
# Families by name
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
