"""Independent worked examples for the spec pages.

Every number quoted in ``spec/*.md`` is printed by this script. It does not
import ``relpos_ref``: integers and rationals are computed exactly (``int``,
``fractions.Fraction``) and real values with mpmath at 50 significant digits,
so the pages can serve as golden values for the library.

Usage::

    python spec/examples.py            # every section
    python spec/examples.py t5 alibi   # only the named sections

Sections: t5, offset, alibi, kerple, fire, sandwich, masks, softmax.
"""

import math
import sys
from fractions import Fraction

import mpmath

mpmath.mp.dps = 50

SIG = 17  # significant digits printed for real values (round-trips float64)


def fmt(x, sig=SIG):
    """Format an mpmath/Fraction/int value with ``sig`` significant digits."""
    if isinstance(x, int):
        return str(x)
    x = mpmath.mpf(x.numerator) / x.denominator if isinstance(x, Fraction) else x
    if x == 0:
        return "0"
    return mpmath.nstr(x, sig, strip_zeros=True, min_fixed=-6, max_fixed=6)


def header(title):
    print()
    print("=" * 78)
    print(title)
    print("=" * 78)


# ---------------------------------------------------------------------------
# T5 buckets
# ---------------------------------------------------------------------------


def _t5_half(num_buckets, bidirectional):
    if bidirectional:
        if num_buckets < 4 or num_buckets % 2:
            raise ValueError("bidirectional T5 needs an even num_buckets >= 4")
        return num_buckets // 2
    if num_buckets < 2:
        raise ValueError("causal T5 needs num_buckets >= 2")
    return num_buckets


def t5_log_floor(n, E, D, span):
    """floor(ln(n/E) / ln(D/E) * span) for integers n >= E, by integer comparison.

    ln(n/E)/ln(D/E)*span >= k  <=>  (n/E)**span >= (D/E)**k
                               <=>  n**span * E**k >= D**k * E**span.
    """
    lhs = n**span
    k = 0
    while lhs * E ** (k + 1) >= D ** (k + 1) * E**span:
        k += 1
    return k


def t5_bucket_exact(delta, bidirectional, num_buckets=32, max_distance=128):
    """T5 bucket for delta = i - j, exact integer arithmetic (r = j - i = -delta)."""
    half = _t5_half(num_buckets, bidirectional)
    E = half // 2
    if not max_distance > E:
        raise ValueError("max_distance must exceed max_exact")
    r = -delta
    if bidirectional:
        off = half if r > 0 else 0
        n = abs(r)
    else:
        off = 0
        n = max(-r, 0)
    if n < E:
        return off + n
    return off + min(half - 1, E + t5_log_floor(n, E, max_distance, half - E))


def t5_bucket_mp(delta, bidirectional, num_buckets=32, max_distance=128):
    """Same bucket via mpmath logarithms (a second, independent route)."""
    half = _t5_half(num_buckets, bidirectional)
    E = half // 2
    r = -delta
    off = (half if r > 0 else 0) if bidirectional else 0
    n = abs(r) if bidirectional else max(-r, 0)
    if n < E:
        return off + n
    val = mpmath.log(mpmath.mpf(n) / E) / mpmath.log(mpmath.mpf(max_distance) / E)
    return off + min(half - 1, E + int(mpmath.floor(val * (half - E))))


def t5_thresholds(bidirectional, num_buckets=32, max_distance=128):
    """t[b] = smallest n with half-bucket b (n = |delta|, or max(delta, 0) causal)."""
    half = _t5_half(num_buckets, bidirectional)
    E = half // 2
    D = max_distance
    out = list(range(E))
    for b in range(E, half):
        target = E ** (half - b) * D ** (b - E)
        lo, hi = E, D  # t[b] <= D for b <= half-1 because D**(half-E) >= target
        while lo < hi:
            mid = (lo + hi) // 2
            if mid ** (half - E) >= target:
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
    return out


T5_OFFSETS_R = [
    -200,
    -128,
    -127,
    -100,
    -64,
    -63,
    -45,
    -32,
    -31,
    -20,
    -16,
    -15,
    -12,
    -8,
    -7,
    -1,
    0,
    1,
    2,
    7,
    8,
    12,
    15,
    16,
    31,
    32,
    63,
    64,
    127,
    128,
    200,
]


def section_t5():
    header("T5 buckets, defaults B=32, D=128 (delta = i - j, r = j - i = -delta)")
    print("   delta      r   bidirectional   causal")
    for r in T5_OFFSETS_R:
        d = -r
        bb = t5_bucket_exact(d, True)
        bc = t5_bucket_exact(d, False)
        assert bb == t5_bucket_mp(d, True)
        assert bc == t5_bucket_mp(d, False)
        print(f"{d:8d} {r:6d} {bb:15d} {bc:8d}")

    for bidir in (True, False):
        t = t5_thresholds(bidir)
        name = "bidirectional (half-buckets 0..15)" if bidir else "causal (0..31)"
        header(f"T5 bucket start thresholds, defaults, {name}")
        print("  b: " + " ".join(f"{b:3d}" for b in range(len(t))))
        print("t[b]:" + " ".join(f"{x:3d}" for x in t))
        # Consistency: half-bucket(n) == (#thresholds <= n) - 1 for all n.
        half = len(t)
        for n in range(4 * 128):
            hb = sum(1 for x in t if x <= n) - 1
            assert t5_bucket_exact(n, bidir) == hb, (bidir, n)  # past side / causal
            future = t5_bucket_exact(-n, bidir)
            if bidir:
                assert future == (hb + half if n > 0 else 0), (n, future)
            else:
                assert future == 0, (n, future)

    header("T5 hazard: exact boundaries, bidirectional defaults (B'=16, E=8, D=128)")
    print("Exact value v = ln(n/8)/ln(16)*8; bucket start test n**8 >= 8**(16-b)*128**(b-8)")
    print("   n   exact v        naive float64 v         floor  past bucket  future bucket")
    for n in (15, 16, 17, 31, 32, 33, 63, 64, 65):
        v = mpmath.log(mpmath.mpf(n) / 8) / mpmath.log(16) * 8
        naive = math.log(n / 8) / math.log(128 / 8) * 8
        print(
            f"{n:4d}   {fmt(v, 12):14s} {naive!r:22s} {int(mpmath.floor(v)):5d}"
            f"  {t5_bucket_exact(n, True):11d}  {t5_bucket_exact(-n, True):13d}"
        )
    for n, b in ((16, 10), (32, 12), (64, 14)):
        lhs, rhs = n**8, 8 ** (16 - b) * 128 ** (b - 8)
        print(
            f"n={n}: n**8 = {lhs} = 8**{16 - b} * 128**{b - 8} = {rhs}: "
            f"{'equal' if lhs == rhs else 'NOT equal'} -> n starts bucket {b}"
        )

    header("T5 exact interior boundaries (t[b]**(B'-E) == E**(B'-b) * D**(b-E), b > E)")
    for bidir in (True, False):
        half = 16 if bidir else 32
        E = half // 2
        t = t5_thresholds(bidir)
        exact = [(b, t[b]) for b in range(E + 1, half) if t[b] ** (half - E) == E ** (half - b) * 128 ** (b - E)]
        print(f"defaults, bidirectional={bidir!s:5s}: (bucket, n) = {exact}")

    header("T5 other configurations (threshold tables)")
    for nb, md, bidir in ((16, 128, True), (64, 256, True), (32, 256, False), (4, 8, True), (2, 4, False)):
        print(f"B={nb:3d} D={md:4d} bidirectional={bidir!s:5s}: {t5_thresholds(bidir, nb, md)}")
    # Repeated thresholds (D barely above E): the higher bucket wins.
    t = t5_thresholds(True, 32, 9)
    print(f"B=32 D=9 bidirectional=True (repeats): {t}")
    print("  buckets for delta = -8..-10:", [t5_bucket_exact(d, True, 32, 9) for d in (-8, -9, -10)])


# ---------------------------------------------------------------------------
# OffsetBias
# ---------------------------------------------------------------------------


def section_offset():
    header("OffsetBias clipping example: K=2, table[0] = [10, 20, 30, 40, 50]")
    K = 2
    table = [10, 20, 30, 40, 50]
    sq, sk = 3, 6
    q_pos = [sk - sq + i for i in range(sq)]  # bottom_right
    print(f"Sq={sq}, Sk={sk}, align=bottom_right: q_pos={q_pos}, k_pos={list(range(sk))}")
    for name, fn in (
        ("delta", lambda d: d),
        ("index clip(delta,-2,2)+2", lambda d: max(-K, min(K, d)) + K),
        ("bias", lambda d: table[max(-K, min(K, d)) + K]),
    ):
        print(name)
        for i in q_pos:
            print("   " + " ".join(f"{fn(i - j):3d}" for j in range(sk)))


# ---------------------------------------------------------------------------
# ALiBi
# ---------------------------------------------------------------------------


def alibi_log2_slopes(n):
    """log2 of the official slopes (Press et al. get_slopes), as Fractions."""
    if n < 1:
        raise ValueError("n must be >= 1")
    if n & (n - 1) == 0:
        return [Fraction(-8 * h, n) for h in range(1, n + 1)]
    c = 1 << (n.bit_length() - 1)
    return alibi_log2_slopes(c) + alibi_log2_slopes(2 * c)[0::2][: n - c]


def section_alibi():
    header("ALiBi slopes, official rule: log2(m_h), heads in API order (index 0 first)")
    for n in (1, 6, 8, 12, 16, 20):
        logs = alibi_log2_slopes(n)
        print(f"H={n:2d}: [" + ", ".join(str(x) for x in logs) + "]")
    print(
        "Closed form 2**(-8h/H) for all h (a divergent port), H=6: ["
        + ", ".join(str(Fraction(-8 * h, 6)) for h in range(1, 7))
        + "]"
    )
    print()
    print("Decimal slopes (2**log2), H=6 and H=12:")
    for n in (6, 12):
        vals = [mpmath.power(2, mpmath.mpf(x.numerator) / x.denominator) for x in alibi_log2_slopes(n)]
        print(f"H={n}: " + ", ".join(fmt(v) for v in vals))

    header("ALiBi relative vs key-only form: LSE shift (scores 0, m=1/2, Sq=Sk=4, causal)")
    m = mpmath.mpf(1) / 2
    print("  i   LSE relative (-m(i-j))   LSE key-only (+m j)        difference   m*i")
    for i in range(4):
        rel = mpmath.log(mpmath.fsum(mpmath.exp(-m * (i - j)) for j in range(i + 1)))
        ko = mpmath.log(mpmath.fsum(mpmath.exp(m * j) for j in range(i + 1)))
        print(f"{i:3d}   {fmt(rel):24s} {fmt(ko):24s}  {fmt(ko - rel):10s} {fmt(m * i)}")
    print(
        "Probabilities agree: row i=3 relative:",
        ", ".join(
            fmt(mpmath.exp(-m * (3 - j)) / mpmath.fsum(mpmath.exp(-m * (3 - jj)) for jj in range(4)), 12)
            for j in range(4)
        ),
    )


# ---------------------------------------------------------------------------
# KERPLE
# ---------------------------------------------------------------------------


KERPLE_DELTAS = [0, 1, 2, 10, 100]


def section_kerple():
    header("KERPLE power  b = -r1 * |delta|**r2")
    for r1, r2 in ((Fraction(1, 2), Fraction(3, 2)), (Fraction(1), Fraction(2)), (Fraction(1), Fraction(1, 2))):
        r1m = mpmath.mpf(r1.numerator) / r1.denominator
        r2m = mpmath.mpf(r2.numerator) / r2.denominator
        vals = [-r1m * mpmath.power(d, r2m) if d else mpmath.mpf(0) for d in KERPLE_DELTAS]
        print(f"r1={r1}, r2={r2}: " + ", ".join(f"|d|={d}: {fmt(v)}" for d, v in zip(KERPLE_DELTAS, vals)))
    header("KERPLE log  b = -r1 * log1p(r2 * |delta|)")
    for r1, r2 in ((Fraction(1), Fraction(1, 2)), (Fraction(2), Fraction(1, 10))):
        r1m = mpmath.mpf(r1.numerator) / r1.denominator
        r2m = mpmath.mpf(r2.numerator) / r2.denominator
        vals = [-r1m * mpmath.log1p(r2m * d) for d in KERPLE_DELTAS]
        print(f"r1={r1}, r2={r2}: " + ", ".join(f"|d|={d}: {fmt(v)}" for d, v in zip(KERPLE_DELTAS, vals)))


# ---------------------------------------------------------------------------
# FIRE
# ---------------------------------------------------------------------------


def fire_x(i, j, c, L, eps=0):
    c = mpmath.mpf(c)
    psi = lambda t: mpmath.log1p(c * t)  # noqa: E731
    return psi(abs(i - j)) / (psi(max(mpmath.mpf(L), i)) + eps)


FIRE_PAIRS = [
    (0, 0),
    (10, 9),
    (10, 0),
    (5, 10),
    (511, 0),
    (512, 0),
    (513, 0),
    (511, 500),
    (512, 500),
    (513, 500),
    (1000, 0),
    (2000, 1000),
    (-3, 0),
]


def section_fire():
    c = mpmath.mpf(1) / 10
    L = 512
    header("FIRE x = psi(|i-j|) / (psi(max(L, i)) + eps), psi(t) = log1p(c t); c=0.1, L=512")
    print("     i      j   x (eps=0)                x (eps=1e-6)")
    for i, j in FIRE_PAIRS:
        print(f"{i:6d} {j:6d}   {fmt(fire_x(i, j, c, L)):24s} {fmt(fire_x(i, j, c, L, mpmath.mpf('1e-6')))}")
    print(f"psi(L) = log1p(51.2) = {fmt(mpmath.log1p(c * L))}")

    header("FIRE full bias, W=2, H=2 (eps=0, c=0.1, L=512)")
    w1 = [1, -1]
    b1 = [Fraction(0), Fraction(1, 2)]
    w2 = [[1, 2], [-1, 1]]
    b2 = [Fraction(0), Fraction(1, 4)]
    print("w1 = [[1], [-1]], b1 = [0, 0.5], w2 = [[1, 2], [-1, 1]], b2 = [0, 0.25]")
    print("     i      j   x                        b_0                      b_1")
    for i, j in ((0, 0), (10, 0), (513, 0)):
        x = fire_x(i, j, c, L)
        hid = [max(mpmath.mpf(0), w1[w] * x + mpmath.mpf(b1[w].numerator) / b1[w].denominator) for w in range(2)]
        out = [
            mpmath.fsum(w2[h][w] * hid[w] for w in range(2)) + mpmath.mpf(b2[h].numerator) / b2[h].denominator
            for h in range(2)
        ]
        print(f"{i:6d} {j:6d}   {fmt(x):24s} {fmt(out[0]):24s} {fmt(out[1])}")


# ---------------------------------------------------------------------------
# Sandwich
# ---------------------------------------------------------------------------


def sandwich_g(delta, d):
    """g(delta) = sum_{k=1}^{d/2} cos(|delta| * 10000**(-2k/d)) - d/2."""
    return (
        mpmath.fsum(mpmath.cos(abs(delta) * mpmath.power(10000, mpmath.mpf(-2 * k) / d)) for k in range(1, d // 2 + 1))
        - d // 2
    )


def section_sandwich():
    header("Sandwich g(|delta|) = sum_k cos(|delta| w_k) - d/2;  b_h = g * H / (8 h), h = 1..H")
    for d in (64, 128):
        print(f"d={d}:")
        for delta in range(5):
            print(f"  |delta|={delta}: g = {fmt(sandwich_g(delta, d))}")
    for d in (64, 128, 256):
        prev = sandwich_g(0, d)
        delta = 1
        while True:
            cur = sandwich_g(delta, d)
            if cur > prev:
                break
            prev, delta = cur, delta + 1
        print(f"d={d}: first increase g({delta - 1}) = {fmt(prev)} < g({delta}) = {fmt(cur)}")
    print(
        "Example, d=64, H=8: b at |delta|=1 for h=1 (factor 1) and h=8 (factor 1/8):",
        fmt(sandwich_g(1, 64)),
        fmt(sandwich_g(1, 64) / 8),
    )


# ---------------------------------------------------------------------------
# Masks and alignment
# ---------------------------------------------------------------------------


def q_positions(sq, sk, align):
    return [(sk - sq) + i for i in range(sq)] if align == "bottom_right" else list(range(sq))


def section_masks():
    header("Causal masks, 1 = attend (k_pos[j] <= q_pos[i])")
    for sq, sk in ((2, 5), (5, 2), (3, 4)):
        for align in ("bottom_right", "top_left"):
            qp = q_positions(sq, sk, align)
            rows = ["".join("1" if j <= i else "0" for j in range(sk)) for i in qp]
            print(f"Sq={sq} Sk={sk} {align:12s} q_pos={qp}: " + " / ".join(rows))


# ---------------------------------------------------------------------------
# Softmax
# ---------------------------------------------------------------------------


def _softmax_row(logits):
    """Probabilities and natural-log LSE over the unmasked entries (None = masked)."""
    live = [x for x in logits if x is not None]
    if not live:
        return [mpmath.mpf(0)] * len(logits), mpmath.ninf
    mx = max(live)
    tot = mpmath.fsum(mpmath.exp(x - mx) for x in live)
    probs = [mpmath.mpf(0) if x is None else mpmath.exp(x - mx) / tot for x in logits]
    return probs, mx + mpmath.log(tot)


def section_softmax():
    header("Biased softmax, one row: s=[1,2,3,4], b=[0,-1,-2,-3], mask=[1,1,1,0], scale=1/2")
    s = [mpmath.mpf(v) for v in (1, 2, 3, 4)]
    b = [mpmath.mpf(v) for v in (0, -1, -2, -3)]
    mask = [True, True, True, False]
    scale = mpmath.mpf(1) / 2
    post = [s[k] * scale + b[k] if mask[k] else None for k in range(4)]
    pre = [(s[k] + b[k]) * scale if mask[k] else None for k in range(4)]
    pre_eq = [s[k] * scale + b[k] * scale if mask[k] else None for k in range(4)]
    for name, lg in (("post_scale", post), ("pre_scale", pre), ("post_scale with bias*scale", pre_eq)):
        p, lse = _softmax_row(lg)
        print(f"{name}: logits={[None if x is None else fmt(x, 6) for x in lg]}")
        print(f"   probs = [{', '.join(fmt(x) for x in p)}]")
        print(f"   lse   = {fmt(lse)}   lse/ln2 (base-2) = {fmt(lse / mpmath.log(2))}")
    p, lse = _softmax_row([None] * 4)
    print(f"fully masked row (fully_masked='zero'): probs={[fmt(x) for x in p]}, lse={lse}")
    shift = mpmath.mpf(7)
    p1, l1 = _softmax_row(post)
    p2, l2 = _softmax_row([None if x is None else x + shift for x in post])
    assert all(abs(a - c) < mpmath.mpf(10) ** -45 for a, c in zip(p1, p2))
    print(f"row shift +7: probs unchanged, lse {fmt(l1)} -> {fmt(l2)} (difference {fmt(l2 - l1)})")


SECTIONS = {
    "t5": section_t5,
    "offset": section_offset,
    "alibi": section_alibi,
    "kerple": section_kerple,
    "fire": section_fire,
    "sandwich": section_sandwich,
    "masks": section_masks,
    "softmax": section_softmax,
}


def main(argv):
    names = argv or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    for n in names:
        SECTIONS[n]()


if __name__ == "__main__":
    main(sys.argv[1:])
