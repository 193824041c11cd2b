"""Generate the golden vectors in ``spec/vectors/*.json`` from the mpmath oracle.

Usage (from the repository root)::

    python spec/vectors/generate.py            # rewrite every file
    python spec/vectors/generate.py --check    # exit 1 if a committed file differs from a fresh generation

Expected values come only from ``relpos_ref/oracle/`` (scalar mpmath loops, no array code). Tolerances come from the
documented bounds in ``relpos_ref/bounds.py`` (the "portable" error model: any summation order, library functions
within the larger of the NumPy and CUDA ulp limits), fitted per case as ``atol + rtol * |expected|``. Gradients
(``gradients.json``) come from ``oracle.attention_vjp`` (central differences of the oracle's attention) with the
running-error bound of ``spec/tolerances.md`` ("Gradients"), evaluated below. Inputs are
deterministic (closed-form or a fixed integer recurrence); no random number generator of any library is used, so the
output does not depend on library versions other than mpmath's arithmetic.

See ``spec/vectors/README.md`` for the schema.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from collections.abc import Callable, Iterator
from decimal import ROUND_CEILING, Decimal
from fractions import Fraction
from pathlib import Path

import mpmath
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from relpos_ref import bounds, oracle  # noqa: E402

SCHEMA_VERSION = 1
DPS = 50
DIGITS = 20
COMMAND = "python spec/vectors/generate.py"
ALL = ("float64", "float32", "float16", "bfloat16")

# ---------------------------------------------------------------------------------------------------------------------
# Helpers: exact rounding of inputs, deterministic pseudo-random dyadic numbers, formatting, tolerance fitting
# ---------------------------------------------------------------------------------------------------------------------


def round_float(x: float, dtype: str) -> float:
    """Round a binary64 value to ``dtype`` (round half to even), exactly, with integer arithmetic."""
    if x == 0 or dtype == "float64":
        return float(x)
    p, emin, top = bounds.FORMATS[dtype]
    fx = Fraction(x)
    sign = -1 if fx < 0 else 1
    fx = abs(fx)
    e = math.floor(math.log2(fx))
    # correct a possibly off-by-one floor(log2) from the float log
    while Fraction(2) ** e > fx:
        e -= 1
    while Fraction(2) ** (e + 1) <= fx:
        e += 1
    e = max(e, emin)
    quantum = Fraction(2) ** (e - p + 1)
    q = fx / quantum
    n = math.floor(q)
    rem = q - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
        n += 1
    out = n * quantum
    if out > top:
        return sign * math.inf
    return sign * float(out)


def dtypes_for(values, candidates=ALL) -> list[str]:
    """The candidate dtypes in which every value is exactly representable."""
    flat = list(_flatten(values))
    return [d for d in candidates if all(bounds.representable(float(v), d) for v in flat)]


def _flatten(x) -> Iterator:
    if isinstance(x, list | tuple):
        for t in x:
            yield from _flatten(t)
    else:
        yield x


class Lcg:
    """Deterministic integer recurrence (Knuth's MMIX constants) for reproducible dyadic inputs."""

    def __init__(self, seed: int) -> None:
        self.state = seed & ((1 << 64) - 1)

    def next(self) -> int:
        self.state = (6364136223846793005 * self.state + 1442695040888963407) & ((1 << 64) - 1)
        return self.state >> 33

    def dyadic(self, lo: int, hi: int, denom: int) -> float:
        """A value k/denom with k uniform in [lo, hi] (exact in every dtype when |k| < 256 and denom a power of 2)."""
        return (lo + self.next() % (hi - lo + 1)) / denom


def s(x) -> str:
    """Decimal string of an input value (binary64 repr: parses back to exactly this value)."""
    return repr(float(x))


def nested(f, x):
    if isinstance(x, list | tuple):
        return [nested(f, t) for t in x]
    return f(x)


def out(x):
    """Expected values: nested lists of decimal strings with DIGITS significant digits."""
    return nested(lambda v: oracle.to_decimal_string(v, DIGITS, dps=DPS), x)


def values(x) -> np.ndarray:
    """Float64 array of nested mpf (for the bound computations only)."""
    hi, lo = bounds.hilo(x)
    return hi + lo


def fit_tolerance(bound: np.ndarray, value: np.ndarray) -> dict[str, str]:
    """Smallest (looseness-wise) ``atol + rtol*|v|`` that covers an elementwise bound, as decimal strings.

    Rounded up to 3 significant digits; ``rtol`` also covers the 20-digit rounding of the expected strings.
    """
    b = np.asarray(bound, dtype=np.float64).ravel()
    v = np.abs(np.asarray(value, dtype=np.float64)).ravel()
    fin = np.isfinite(v)
    b, v = b[fin], v[fin]
    if b.size == 0 or not np.any(b > 0):
        return {"atol": "0.0", "rtol": "0.0"}
    cands = [0.0]
    nz = v > 0
    if np.any(nz):
        ratios = np.sort(b[nz] / v[nz])
        cands += [float(ratios[int(t)]) for t in np.linspace(0, ratios.size - 1, min(64, ratios.size))]
    best = None
    for r in cands:
        a = float(np.max(np.maximum(b - r * v, 0.0)))
        loose = float(np.mean((a + r * v) / np.maximum(b, 1e-300)))
        if best is None or loose < best[0]:
            best = (loose, a, r)
    _, a, r = best
    r = r + 1e-19 if r > 0 else 0.0

    def up(x):
        if x == 0:
            return "0.0"
        d = Decimal(x)  # exact value of the binary64
        q = d.quantize(Decimal(1).scaleb(d.adjusted() - 2), rounding=ROUND_CEILING)
        return f"{q:e}"

    return {"atol": up(a), "rtol": up(r)}


def tolerances(dtypes: list[str], bound_fn: Callable[[str], np.ndarray], value: np.ndarray) -> dict[str, dict]:
    return {d: fit_tolerance(bound_fn(d), value) for d in dtypes}


def in_range(value: np.ndarray, dtypes: list[str]) -> list[str]:
    """Drop dtypes in which the largest expected value would round to infinity."""
    top = float(np.max(np.abs(value[np.isfinite(value)]))) if np.any(np.isfinite(value)) else 0.0
    return [d for d in dtypes if math.isfinite(round_float(top, d))]


def distances(q_pos, k_pos) -> np.ndarray:
    return np.abs(np.subtract.outer(np.asarray(q_pos, dtype=np.float64), np.asarray(k_pos, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------------------------------
# Case builders. Each returns a list of (case id, thunk) so a subset can be regenerated quickly.
# ---------------------------------------------------------------------------------------------------------------------

T5_CONFIGS = ((32, 128), (16, 128), (64, 256), (32, 256), (8, 20))


def t5_cases():
    cases = []
    for nb, md in T5_CONFIGS:
        for bidir in (True, False):
            cid = f"t5-bucket-B{nb}-D{md}-{'bidirectional' if bidir else 'causal'}"

            def build(nb=nb, md=md, bidir=bidir, cid=cid):
                thr = oracle.t5_bucket_thresholds(bidirectional=bidir, num_buckets=nb, max_distance=md)
                mags = set()
                for t in thr:
                    mags |= {t, max(t - 1, 0), t + 1}
                mags |= {md - 1, md, md + 1, 10**6 - 1, 10**6}
                offs = sorted(mags | {-m for m in mags})
                return {
                    "id": cid,
                    "kind": "bucket",
                    "description": "every bucket boundary (first distance of each bucket, one below, one above), "
                    "the clamp at max_distance and offsets up to 1e6, both signs",
                    "options": {"bidirectional": bidir, "num_buckets": nb, "max_distance": md},
                    "thresholds": list(thr),
                    "delta": offs,
                    "expected": {
                        "bucket": [
                            oracle.t5_bucket(o, bidirectional=bidir, num_buckets=nb, max_distance=md) for o in offs
                        ]
                    },
                    "tolerance": "exact",
                }

            cases.append((cid, build))
    for nh, layout in ((1, "heads_buckets"), (12, "heads_buckets"), (12, "buckets_heads")):
        for nb, md, bidir in ((32, 128, True), (32, 128, False), (8, 20, True)):
            cid = f"t5-bias-H{nh}-B{nb}-D{md}-{'bidirectional' if bidir else 'causal'}-{layout}"

            def build(nh=nh, layout=layout, nb=nb, md=md, bidir=bidir, cid=cid):
                rng = Lcg(nh * 1000 + nb * 10 + md + bidir)
                table_hb = [[rng.dyadic(-64, 64, 16) for _ in range(nb)] for _ in range(nh)]
                table = table_hb if layout == "heads_buckets" else [list(c) for c in zip(*table_hb)]
                thr = oracle.t5_bucket_thresholds(bidirectional=bidir, num_buckets=nb, max_distance=md)
                base = 10**6
                offs = sorted(set(thr) | {max(t - 1, 0) for t in thr} | {md, 10**6})
                q_pos = [base, base + 1]
                k_pos = sorted({base - o for o in offs} | {base + o for o in offs[:6]})
                bias = oracle.t5_bias(table, q_pos, k_pos, bidirectional=bidir, max_distance=md, layout=layout, dps=DPS)
                return {
                    "id": cid,
                    "kind": "bias",
                    "description": "table look-up at bucket boundaries; distances up to 1e6 (absolute positions "
                    "near 1e6)",
                    "q_pos": q_pos,
                    "k_pos": k_pos,
                    "parameters": {"table": nested(s, table)},
                    "options": {"bidirectional": bidir, "max_distance": md, "layout": layout},
                    "dtypes": dtypes_for(table),
                    "expected": {"bias": out(bias)},
                    "tolerance": {d: {"atol": "0.0", "rtol": "0.0"} for d in dtypes_for(table)},
                }

            cases.append((cid, build))
    return cases


def offset_cases():
    def build():
        rng = Lcg(7)
        table = [[rng.dyadic(-64, 64, 16) for _ in range(7)] for _ in range(3)]
        q_pos, k_pos = [0, 2, 10**6], [0, 1, 2, 3, 4, 5, 10**6 - 3, 10**6, 10**6 + 5]
        return {
            "id": "offset-K3-H3",
            "kind": "bias",
            "description": "clipped per-offset table (H, 2K+1), K = 3: clipping on both sides, distances up to 1e6",
            "q_pos": q_pos,
            "k_pos": k_pos,
            "parameters": {"table": nested(s, table)},
            "options": {},
            "dtypes": dtypes_for(table),
            "expected": {"bias": out(oracle.offset_bias(table, q_pos, k_pos, dps=DPS))},
            "tolerance": {d: {"atol": "0.0", "rtol": "0.0"} for d in dtypes_for(table)},
        }

    return [("offset-K3-H3", build)]


def _family_case(cid, description, kind, q_pos, k_pos, params, options, exact, bound_fn, dtypes, extra=None):
    v = values(exact)
    dts = in_range(v, dtypes)
    case = {
        "id": cid,
        "kind": kind,
        "description": description,
        "q_pos": list(q_pos),
        "k_pos": list(k_pos),
        "parameters": {k: nested(s, p) for k, p in params.items()},
        "options": options,
        "dtypes": dts,
        "expected": {"bias": out(exact)},
        "tolerance": tolerances(dts, bound_fn, v),
    }
    if extra:
        case.update(extra)
    return case


ALIBI_POS_Q = [0, 1, 1000, 65535, 131071, 131072, 10**6]
ALIBI_POS_K = [0, 1, 999, 1000, 65536, 10**6 - 1, 10**6]


def alibi_cases():
    cases = []

    def slopes_case(h):
        cid = f"alibi-slopes-H{h}"

        def build(h=h, cid=cid):
            exact = oracle.alibi_slopes(h, dps=DPS)
            v = values(exact)
            return {
                "id": cid,
                "kind": "slopes",
                "description": "official slopes (Press et al. get_slopes), exact values of 2**e",
                "num_heads": h,
                "dtypes": list(ALL),
                "expected": {"slopes": out(exact)},
                "tolerance": {d: fit_tolerance(bounds.alibi_slopes_bound(h, d), v) for d in ALL},
            }

        return cid, build

    cases += [slopes_case(h) for h in range(1, 257)]

    def bias_case(cid, description, slopes, q_pos, k_pos, candidates=ALL, extra=None):
        def build():
            exact = oracle.alibi_bias(slopes, q_pos, k_pos, dps=DPS)
            dist = distances(q_pos, k_pos)[None]
            return _family_case(
                cid,
                description,
                "bias",
                q_pos,
                k_pos,
                {"slopes": slopes},
                {},
                exact,
                lambda d: bounds.alibi_bound(values(exact), dist, d),
                dtypes_for(slopes, candidates),
                extra,
            )

        return cid, build

    exact8 = [2.0 ** float(e) for e in oracle.alibi_slope_log2(8)]
    cases.append(
        bias_case(
            "alibi-bias-H8-long",
            "official 8-head slopes (powers of two, exact in every dtype); "
            "distances up to 1e6 (float16 is absent: the values exceed its range)",
            exact8,
            ALIBI_POS_Q,
            ALIBI_POS_K,
        )
    )
    cases.append(
        bias_case(
            "alibi-bias-H8-float16-range",
            "official 8-head slopes; distances up to 131000 keep "
            "-0.5*|delta| inside float16's range (the float16 overflow starts at |delta| = 131040)",
            exact8,
            [0, 7, 4096, 131000],
            [0, 1, 2048, 65536, 131000],
        )
    )
    for h in (1, 12, 256):
        sl = [2.0 ** float(e) for e in oracle.alibi_slope_log2(h)]
        qp, kp = ([0, 1000, 10**6], [0, 1, 10**6 - 1]) if h == 256 else (ALIBI_POS_Q, ALIBI_POS_K)
        cases.append(
            bias_case(
                f"alibi-bias-H{h}-official-float64",
                f"official {h}-head slopes as binary64 values (not all exact in narrower dtypes)",
                sl,
                qp,
                kp,
            )
        )
    sl12 = [2.0 ** float(e) for e in oracle.alibi_slope_log2(12)]
    for d in ("float32", "bfloat16"):
        rounded = [round_float(x, d) for x in sl12]
        dev = max(abs(a - b) / b for a, b in zip(rounded, sl12))
        cases.append(
            bias_case(
                f"alibi-bias-H12-slopes-{d}",
                f"official 12-head slopes rounded to {d} (the bias follows the stored "
                f"slopes: relative deviation from the official slopes up to {dev:.3g})",
                rounded,
                ALIBI_POS_Q,
                ALIBI_POS_K,
                extra={"slope_deviation_from_official": f"{dev:.6g}"},
            )
        )
    return cases


def kerple_power_cases():
    r1 = [2.0**-20, 0.5, 1.0, 3.0, 0.25, 1.0]
    r2 = [2.0, 2.0**-7, 0.5, 1.0, 1.5, 1.9921875]
    cases = []
    for cid, qp, kp, note in (
        (
            "kerple-power-long",
            [10**6],
            [0, 1, 10**6 - 65536, 10**6 - 1000, 10**6 - 100, 10**6 - 3, 10**6 - 1, 10**6, 10**6 + 1, 10**6 + 1000],
            "|delta| up to 1e6",
        ),
        ("kerple-power-short", [0, 5, 100], [0, 1, 2, 3, 50, 99, 100], "|delta| <= 100 (inside float16 range)"),
    ):

        def build(cid=cid, qp=qp, kp=kp, note=note):
            exact = oracle.kerple_power_bias(r1, r2, qp, kp, dps=DPS)
            dist = distances(qp, kp)[None]
            r2a = np.asarray(r2)[:, None, None]
            return _family_case(
                cid,
                "r2 = 2, r2 just below 2, tiny r2 = 2**-7, tiny r1 = 2**-20; " + note,
                "bias",
                qp,
                kp,
                {"r1": r1, "r2": r2},
                {},
                exact,
                lambda d: bounds.kerple_power_bound(values(exact), dist, r2a, d),
                dtypes_for(r1 + r2),
            )

        cases.append((cid, build))
    return cases


def kerple_log_cases():
    r1 = [2.0**-20, 0.5, 2.0, 8.0, 1.0]
    r2 = [1.0, 2.0**-10, 0.5, 64.0, 2.0**-20]

    def build():
        qp = [10**6]
        kp = [0, 1, 10**6 - 65536, 10**6 - 1000, 10**6 - 3, 10**6 - 1, 10**6, 10**6 + 1, 10**6 + 4096]
        exact = oracle.kerple_log_bias(r1, r2, qp, kp, dps=DPS)
        dist = distances(qp, kp)[None]
        return _family_case(
            "kerple-log-long",
            "tiny r1 = 2**-20, tiny r2 = 2**-10 and 2**-20, large r2 = 64; |delta| up to 1e6",
            "bias",
            qp,
            kp,
            {"r1": r1, "r2": r2},
            {},
            exact,
            lambda d: bounds.kerple_log_bound(values(exact), dist, d),
            dtypes_for(r1 + r2),
        )

    return [("kerple-log-long", build)]


def fire_cases():
    cases = []
    for c, L, eps in (
        (2.0**-10, 512.0, 0.0),
        (0.125, 512.0, 2.0**-20),
        (16.0, 512.0, 0.0),
        (0.125, 1.0, 0.0),
        (0.125, 100.5, 0.0),
    ):
        cid = f"fire-c{c:g}-L{L:g}-eps{eps:g}"

        def build(c=c, L=L, eps=eps, cid=cid):
            rng = Lcg(int(c * 4096) + int(L * 2))
            w = 4
            w1 = [[rng.dyadic(-32, 32, 16)] for _ in range(w)]
            b1 = [rng.dyadic(-16, 16, 16) for _ in range(w)]
            w2 = [[rng.dyadic(-32, 32, 32) for _ in range(w)] for _ in range(2)]
            b2 = [rng.dyadic(-16, 16, 16) for _ in range(2)]
            li = math.floor(L)
            qp = sorted({0, 1, li - 1, li, li + 1, 2 * li + 3, 65504, 10**6} - {-1})
            kp = sorted({0, 1, max(li - 2, 0), li - 1 if li > 0 else 0, li, 1000, 65503, 10**6 - 1})
            exact = oracle.fire_bias(w1, b1, w2, b2, qp, kp, c=c, L=L, eps=eps, dps=DPS)
            x = values(oracle.fire_inputs(qp, kp, c=c, L=L, eps=eps, dps=DPS))
            w1a, b1a, w2a = np.asarray(w1).ravel(), np.asarray(b1), np.asarray(w2)
            params = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "c": c, "L": L}
            return _family_case(
                cid,
                "query positions L-1, L, L+1 around the threshold, up to 1e6; one hidden layer of width 4",
                "bias",
                qp,
                kp,
                params,
                {"eps": s(eps)},
                exact,
                lambda d: bounds.fire_bound(values(exact), x, w1a, b1a, w2a, d, eps=eps),
                dtypes_for([*_flatten(w1), *b1, *_flatten(w2), *b2, c, L]),
            )

        cases.append((cid, build))
    return cases


def sandwich_cases():
    cases = []
    for hd in (32, 64, 128):
        for tag, offs in (("short", [0, 1, 2, 7, 8, 13, 14, 100, 1000, 4096]), ("long", [0, 65536, 10**5 + 7, 10**6])):
            cid = f"sandwich-d{hd}-H8-{tag}"

            def build(hd=hd, offs=offs, cid=cid):
                base = 10**6
                qp = [base]
                kp = sorted({base - o for o in offs} | {base + 1})
                exact = oracle.sandwich_bias(8, hd, qp, kp, dps=DPS)
                dist = distances(qp, kp)
                return _family_case(
                    cid,
                    f"head_dim {hd}, 8 heads, |delta| in {offs}",
                    "bias",
                    qp,
                    kp,
                    {},
                    {"num_heads": 8, "head_dim": hd},
                    exact,
                    lambda d: bounds.sandwich_bound(values(exact), dist, hd, 8, None, d),
                    list(ALL),
                )

            cases.append((cid, build))
    return cases


# -- softmax and attention -----------------------------------------------------------------------------------------


def generated(shape, a, c, mod, offset, divisor):
    """The closed-form input of the README: ((sum_k a[k]*idx[k] + c) mod M - offset) / divisor."""
    spec = {
        "formula": "affine_mod",
        "shape": list(shape),
        "a": list(a),
        "c": c,
        "mod": mod,
        "offset": offset,
        "divisor": divisor,
    }
    arr = np.zeros(shape)
    for idx in np.ndindex(*shape):
        arr[idx] = ((sum(ai * ii for ai, ii in zip(a, idx)) + c) % mod - offset) / divisor
    return spec, arr


def _softmax_case(
    cid,
    description,
    scores,
    bias,
    mask,
    scale,
    placement,
    fully_masked,
    dtypes=ALL,
    sample=None,
    scores_spec=None,
    bias_spec=None,
):
    scores = np.asarray(scores, dtype=np.float64)
    b = None if bias is None else np.asarray(bias, dtype=np.float64)
    m = None if mask is None else np.asarray(mask, dtype=bool)
    probs, lse = oracle.biased_softmax(
        scores.tolist(),
        None if b is None else b.tolist(),
        mask=None if m is None else m.tolist(),
        scale=scale,
        placement=placement,
        fully_masked=fully_masked,
        dps=DPS,
    )
    z = _exact_logits(scores, b, scale, placement)
    inputs = [*scores.ravel().tolist(), *([] if b is None else b.ravel().tolist())]
    dts = dtypes_for(inputs, dtypes)
    pv, lv = values(probs), values(lse)

    def pb(d):
        return bounds.softmax_bound(z, m, d, scores=scores, bias=b, scale=scale, placement=placement)

    case = {
        "id": cid,
        "kind": "softmax",
        "description": description,
        "scores": scores_spec if scores_spec is not None else nested(s, scores.tolist()),
        "bias": None if b is None else (bias_spec if bias_spec is not None else nested(s, b.tolist())),
        "mask": None if m is None else m.astype(int).tolist(),
        "scale": s(scale),
        "placement": placement,
        "fully_masked": fully_masked,
        "dtypes": dts,
    }
    if sample is None:
        case["expected"] = {"probs": out(probs), "lse": out(lse)}
        case["tolerance"] = {d: {"probs": fit_tolerance(pb(d)[0], pv), "lse": fit_tolerance(pb(d)[1], lv)} for d in dts}
    else:
        idx = [tuple(i) for i in sample]
        flat_p = [probs[r][cidx] for r, cidx in idx]
        case["expected"] = {"lse": out(lse), "probs_at": [[r, cidx, out(v)] for (r, cidx), v in zip(idx, flat_p)]}
        tol = {}
        for d in dts:
            pbd, lbd = pb(d)
            sel = np.array([pbd[r, cidx] for r, cidx in idx])
            tol[d] = {
                "probs": fit_tolerance(sel, np.array([pv[r, cidx] for r, cidx in idx])),
                "lse": fit_tolerance(lbd, lv),
            }
        case["tolerance"] = tol
    return case


def _exact_logits(scores, b, scale, placement):
    ctx = oracle.context(DPS)
    tau = ctx.mpf(float(scale))
    bb = np.zeros_like(scores) if b is None else np.broadcast_to(b, scores.shape)
    zs = []
    for sv, bv in zip(scores.ravel().tolist(), bb.ravel().tolist()):
        zs.append(ctx.mpf(sv) * tau + ctx.mpf(bv) if placement == "post_scale" else (ctx.mpf(sv) + ctx.mpf(bv)) * tau)
    hi, lo = bounds.hilo(zs)
    return (hi + lo).reshape(scores.shape)


def softmax_cases():
    cases = []
    rng = Lcg(11)

    def small(shape, lo=-64, hi=64, den=16):
        return [[rng.dyadic(lo, hi, den) for _ in range(shape[1])] for _ in range(shape[0])]

    sc = small((3, 5))
    bi = small((3, 5), -64, 0, 8)
    mk = [[1, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    for fm in ("zero", "nan"):
        cases.append(
            (
                f"softmax-mask-fully-masked-{fm}",
                lambda fm=fm: _softmax_case(
                    f"softmax-mask-fully-masked-{fm}",
                    f"mask with a fully masked row (fully_masked={fm!r}) and a row with one attendable key",
                    sc,
                    bi,
                    mk,
                    0.125,
                    "post_scale",
                    fm,
                ),
            )
        )
    for placement, scale in (
        ("post_scale", 1 / math.sqrt(48)),
        ("pre_scale", 1 / math.sqrt(48)),
        ("pre_scale", 0.125),
        ("post_scale", 1.0),
    ):
        cid = f"softmax-{placement}-scale{scale:.6g}"
        cases.append(
            (
                cid,
                lambda cid=cid, placement=placement, scale=scale: _softmax_case(
                    cid,
                    f"{placement} with scale {scale!r} (1/sqrt(48) is not exact in any dtype)",
                    sc,
                    bi,
                    None,
                    scale,
                    placement,
                    "zero",
                ),
            )
        )
    for sq, sk in ((3, 5), (5, 3)):
        for align in ("bottom_right", "top_left"):
            cid = f"softmax-causal-Sq{sq}-Sk{sk}-{align}"

            def build(sq=sq, sk=sk, align=align, cid=cid):
                qp, kp = oracle.positions(sq, sk, align=align)
                m = oracle.causal_mask(qp, kp)
                # Own generator per case: the inputs must not depend on which cases were built before.
                local = Lcg(zlib.crc32(cid.encode()))
                sc_ = [[local.dyadic(-64, 64, 16) for _ in range(sk)] for _ in range(sq)]
                bi_ = [[local.dyadic(-32, 0, 8) for _ in range(sk)] for _ in range(sq)]
                case = _softmax_case(
                    cid,
                    f"causal mask of positions({sq}, {sk}, align={align!r}); rows with no key give zeros and lse -inf",
                    sc_,
                    bi_,
                    m,
                    0.5,
                    "post_scale",
                    "zero",
                )
                case["positions"] = {"q_len": sq, "k_len": sk, "align": align, "q_pos": qp, "k_pos": kp}
                return case

            cases.append((cid, build))
    big = [
        [9984.0, 9920.0, -9984.0, 10048.0, 0.0],
        [10048.0, 10048.0, 10048.0, 9984.0, -10048.0],
        [-9984.0, -9984.0, -10048.0, -9920.0, -9984.0],
    ]
    bigb = [[-9984.0, 64.0, 9984.0, -10048.0, 0.0], [0.0, -64.0, 9984.0, 0.0, 9920.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    cases.append(
        (
            "softmax-logits-near-1e4",
            lambda: _softmax_case(
                "softmax-logits-near-1e4",
                "scores and biases near +-1e4 that cancel or dominate (values exact in bfloat16 and float16)",
                big,
                bigb,
                None,
                1.0,
                "post_scale",
                "zero",
            ),
        )
    )
    dom = [[0.0, 0.0, 40.0, 0.0, 0.0, 0.0, 0.0, 0.0], [-3.0, 25.0, -3.0, -3.0, 24.0, -3.0, -3.0, -3.0]]
    cases.append(
        (
            "softmax-dominant-key",
            lambda: _softmax_case(
                "softmax-dominant-key",
                "one dominant key (others ~e-40) and two near-tied dominant keys",
                dom,
                None,
                None,
                1.0,
                "post_scale",
                "zero",
            ),
        )
    )
    for n in (1000, 8192):
        cid = f"softmax-all-equal-n{n}"
        cases.append(
            (
                cid,
                lambda n=n, cid=cid: _softmax_case(
                    cid,
                    f"all-equal logits over {n} keys: p = 1/{n}, lse = log({n}) + logit",
                    [[1.5] * n, [-7.25] * n],
                    None,
                    None,
                    1.0,
                    "post_scale",
                    "zero",
                    sample=[(0, 0), (0, n - 1), (1, n // 2)],
                ),
            )
        )
    n = 8192
    for placement, scale in (("post_scale", 0.125), ("pre_scale", 1 / math.sqrt(64))):
        cid = f"softmax-long-n{n}-{placement}"

        def build(placement=placement, scale=scale, cid=cid):
            sspec, sarr = generated((2, n), [37, 11], 5, 64, 32, 4)
            bspec, barr = generated((2, n), [13, 7], 3, 64, 0, -8)
            cols = sorted({0, 1, 2, 3, 7, 8, 100, 1000, 4095, 4096, n - 2, n - 1})
            sample = [(r, cidx) for r in range(2) for cidx in cols]
            return _softmax_case(
                cid,
                f"rows of {n} keys with closed-form inputs; lse of every row and the probabilities at selected columns",
                sarr,
                barr,
                None,
                scale,
                placement,
                "zero",
                sample=sample,
                scores_spec=sspec,
                bias_spec=bspec,
            )

        cases.append((cid, build))
    return cases


def _attention_case(
    cid,
    description,
    q,
    k,
    v,
    bias,
    causal,
    align,
    scale,
    placement,
    mask=None,
    fully_masked="zero",
    specs=None,
    dtypes=ALL,
):
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    b = None if bias is None else np.asarray(bias, dtype=np.float64)
    m = None if mask is None else np.asarray(mask, dtype=bool)
    o, lse = oracle.attention(
        q.tolist(),
        k.tolist(),
        v.tolist(),
        bias=None if b is None else b.tolist(),
        causal=causal,
        align=align,
        scale=scale,
        placement=placement,
        mask=None if m is None else m.tolist(),
        fully_masked=fully_masked,
        dps=DPS,
    )
    tau = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    kk = np.repeat(k, group, axis=1)
    z_s = np.einsum("bhid,bhjd->bhij", q, kk)
    shape4 = z_s.shape
    bb = np.zeros(shape4) if b is None else np.broadcast_to(b.reshape((1,) * (4 - b.ndim) + b.shape), shape4)
    z = z_s * tau + bb if placement == "post_scale" else (z_s + bb) * tau
    keep = np.ones(shape4, dtype=bool)
    if causal:
        qp, kp = oracle.positions(q.shape[2], k.shape[2], align=align)
        keep &= np.asarray(oracle.causal_mask(qp, kp), dtype=bool)[None, None]
    if m is not None:
        keep &= np.broadcast_to(m.reshape((1,) * (4 - m.ndim) + m.shape), shape4)
    inputs = [*q.ravel().tolist(), *k.ravel().tolist(), *v.ravel().tolist(), *([] if b is None else b.ravel().tolist())]
    dts = dtypes_for(inputs, dtypes)
    ov, lv = values(o), values(lse)
    sp = specs or {}

    def arr(name, x):
        return sp[name] if name in sp else nested(s, x.tolist())

    return {
        "id": cid,
        "kind": "attention",
        "description": description,
        "q": arr("q", q),
        "k": arr("k", k),
        "v": arr("v", v),
        "bias": None if b is None else arr("bias", b),
        "mask": None if m is None else m.astype(int).tolist(),
        "causal": causal,
        "align": align,
        "scale": None if scale is None else s(scale),
        "placement": placement,
        "fully_masked": fully_masked,
        "dtypes": dts,
        "expected": {"out": out(o), "lse": out(lse)},
        "tolerance": {
            d: dict(
                zip(
                    ("out", "lse"),
                    (
                        fit_tolerance(t, val)
                        for t, val in zip(
                            bounds.attention_bound(
                                q, k, v, z, keep, d, bias=None if b is None else bb, scale=tau, placement=placement
                            ),
                            (ov, lv),
                        )
                    ),
                )
            )
            for d in dts
        },
    }


def attention_cases():
    cases = []
    rng = Lcg(23)

    def arr(*shape, lo=-32, hi=32, den=16):
        return np.array([rng.dyadic(lo, hi, den) for _ in range(int(np.prod(shape)))]).reshape(shape)

    q, k, v = arr(1, 4, 3, 4), arr(1, 2, 5, 4), arr(1, 2, 5, 4)
    bias = arr(4, 3, 5, lo=-32, hi=0, den=8)
    for align in ("bottom_right", "top_left"):
        for placement in ("post_scale", "pre_scale"):
            cid = f"attention-gqa-H4-Hkv2-Sq3-Sk5-causal-{align}-{placement}"
            cases.append(
                (
                    cid,
                    lambda cid=cid, align=align, placement=placement: _attention_case(
                        cid,
                        f"grouped-query heads (4 query heads on 2 kv heads), Sq < Sk, causal {align}, {placement}, "
                        "default scale 1/sqrt(D)",
                        q,
                        k,
                        v,
                        bias,
                        True,
                        align,
                        None,
                        placement,
                    ),
                )
            )
    q2, k2, v2 = arr(1, 2, 5, 4), arr(1, 1, 3, 4), arr(1, 1, 3, 2)
    for fm in ("zero", "nan"):
        cid = f"attention-mqa-Sq5-Sk3-bottom_right-fully-masked-{fm}"
        cases.append(
            (
                cid,
                lambda cid=cid, fm=fm: _attention_case(
                    cid,
                    f"Sq > Sk bottom-right causal: the first two queries see no key (fully_masked={fm!r}); one kv "
                    "head for two query heads; Dv != D",
                    q2,
                    k2,
                    v2,
                    None,
                    True,
                    "bottom_right",
                    0.125,
                    "post_scale",
                    fully_masked=fm,
                ),
            )
        )
    q3, k3, v3 = arr(2, 2, 4, 8), arr(2, 2, 6, 8), arr(2, 2, 6, 8)
    mask3 = np.array([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=bool)
    cases.append(
        (
            "attention-B2-mask-t5-scale1",
            lambda: _attention_case(
                "attention-B2-mask-t5-scale1",
                "batch 2, explicit boolean mask (Sq, Sk) broadcast over batch and heads, "
                "scale 1.0 (T5), bias (H, Sq, Sk), not causal",
                q3,
                k3,
                v3,
                arr(2, 4, 6, lo=-64, hi=64, den=8),
                False,
                "bottom_right",
                1.0,
                "post_scale",
                mask=mask3,
            ),
        )
    )
    big_q = np.array([[[[64.0, 0.0], [0.0, 64.0]]]])
    big_k = np.array([[[[64.0, 0.0], [62.0, 0.0], [0.0, 64.0]]]])
    big_v = np.array([[[[1.0, -1.0], [2.0, 0.5], [-3.0, 4.0]]]])
    cases.append(
        (
            "attention-large-logits",
            lambda: _attention_case(
                "attention-large-logits",
                "q.k up to 4096 with scale 1: near-one-hot rows (logits about 4e3 apart)",
                big_q,
                big_k,
                big_v,
                None,
                False,
                "bottom_right",
                1.0,
                "post_scale",
            ),
        )
    )
    sk, sq, d = 8192, 2, 8
    for placement, scale in (("post_scale", None), ("pre_scale", 0.25)):
        cid = f"attention-long-Sk{sk}-{placement}"

        def build(placement=placement, scale=scale, cid=cid):
            qs, qa = generated((1, 2, sq, d), [0, 5, 3, 7], 1, 64, 32, 32)
            ks, ka = generated((1, 1, sk, d), [0, 0, 29, 3], 2, 64, 32, 32)
            vs, va = generated((1, 1, sk, d), [0, 0, 17, 5], 9, 64, 32, 16)
            bs, ba = generated((2, sq, sk), [1, 3, 1], 0, 64, 0, -4)
            return _attention_case(
                cid,
                f"{sk} keys, 2 queries (bottom-right causal: they see {sk - 1} and {sk} keys), 2 query heads "
                f"on 1 kv head, closed-form inputs, {placement}",
                qa,
                ka,
                va,
                ba,
                True,
                "bottom_right",
                scale,
                placement,
                specs={"q": qs, "k": ks, "v": vs, "bias": bs},
            )

        cases.append((cid, build))
    return cases


# -- gradients -----------------------------------------------------------------------------------------------------
#
# Expected gradients: oracle.attention_vjp (central differences of the oracle's attention, no derivative formula).
# Tolerances: the running-error bound of spec/tolerances.md ("Gradients"), evaluated below on the exact inputs. It
# follows the backward's arithmetic one operation at a time and never looks at any computed gradient.

GRAD_DTYPES = ("float64", "float32")

#: ulps charged to a tanh evaluation (softcap). bounds/model.py has no tanh entry; this assumes the largest limit
#: that model charges any library function (float32 log, 4 ulp).
TANH_ULP = 4.0


def tanh_rel(cdtype: str) -> float:
    """Relative error bound of one tanh evaluation, (TANH_ULP + 1/2) 2u, as bounds.libm_rel for the others."""
    return (TANH_ULP + 0.5) * 2.0 * bounds.unit_roundoff(cdtype)


class Run:
    """One quantity of the computation in the running-error model: exact value ``v``, magnitude ``a`` (the same
    formula on absolute values, ``|v| <= a``) and error bound ``e`` of the computed value; float64 arrays."""

    def __init__(self, v, a=None, e=None):
        self.v = np.asarray(v, dtype=np.float64)
        self.a = np.abs(self.v) if a is None else np.asarray(a, dtype=np.float64)
        self.e = np.zeros_like(self.v) if e is None else np.asarray(e, dtype=np.float64)

    def __getitem__(self, idx):
        return Run(self.v[idx], self.a[idx], self.e[idx])

    def where(self, cond):
        """Entries outside ``cond`` are exact zeros (masked entries, inactive relu units)."""
        return Run(np.where(cond, self.v, 0.0), np.where(cond, self.a, 0.0), np.where(cond, self.e, 0.0))

    def map(self, f):
        return Run(f(self.v), f(self.a), f(self.e))


def r_mul(x, y, u):
    """A rounded product: first-order error ``e_x a_y + a_x e_y + u a_x a_y``."""
    a = x.a * y.a
    return Run(x.v * y.v, a, x.e * y.a + x.a * y.e + u * a)


def r_add(x, y, u, sign=1.0):
    """A rounded sum or difference: ``e_x + e_y + u (a_x + a_y)``."""
    a = x.a + y.a
    return Run(x.v + sign * y.v, a, x.e + y.e + u * a)


def r_div(x, y, u):
    """A rounded quotient by a quantity bounded away from 0: ``e_x/|y| + a_x e_y/y^2 + u a_x/|y|``."""
    ay = np.abs(y.v)
    a = x.a / ay
    return Run(x.v / y.v, a, x.e / ay + x.a * y.e / ay**2 + u * a)


def r_fn(x, value, slope, rel):
    """A library function: its result within ``rel`` (ulps of the function) and the argument's error times ``|f'|``."""
    v = np.asarray(value, dtype=np.float64)
    return Run(v, np.abs(v), np.abs(slope) * x.e + rel * np.abs(v))


def r_total(x, axes, u, keepdims=False):
    """A sum of n terms in any order (any tree of additions): ``sum e + gamma_n sum a``."""
    axes = tuple(ax % x.v.ndim for ax in ((axes,) if isinstance(axes, int) else axes))
    n = int(np.prod([x.v.shape[ax] for ax in axes])) if axes else 1
    sa = x.a.sum(axis=axes, keepdims=keepdims)
    return Run(
        x.v.sum(axis=axes, keepdims=keepdims), sa, x.e.sum(axis=axes, keepdims=keepdims) + bounds.gamma(n, u) * sa
    )


def _scale_err(tau, default, cd):
    """Relative error of the library's scale against the exact one: 1/sqrt(D) by default is two binary64 roundings
    (sqrt, division); a Python float is exact in float64 and rounded once to float32 unless representable."""
    u = bounds.unit_roundoff(cd)
    if default and not bounds.representable(tau, "float64"):
        err = 2 * bounds.unit_roundoff("float64")
        return err + (u if cd == "float32" else 0.0)
    return 0.0 if bounds.representable(tau, cd) else u


def family_bias_error(name, params, options, q_pos, k_pos, exact, dtype):
    """Error bound of the family's bias as the library computes it in the compute dtype (spec/tolerances.md)."""
    val = values(exact)
    dist = distances(q_pos, k_pos)
    cd = bounds.compute_dtype(dtype)
    if name == "alibi":
        return bounds.alibi_bound(val, dist[None], cd)
    if name == "kerple_power":
        return bounds.kerple_power_bound(val, dist[None], np.asarray(params["r2"])[:, None, None], cd)
    if name == "kerple_log":
        return bounds.kerple_log_bound(val, dist[None], cd)
    if name == "fire":
        eps = float(options.get("eps", 0.0))
        x = values(oracle.fire_inputs(q_pos, k_pos, c=params["c"], L=params["L"], eps=eps, dps=DPS))
        w1, b1, w2 = (np.asarray(params[n], dtype=np.float64) for n in ("w1", "b1", "w2"))
        return bounds.fire_bound(val, x, w1.ravel(), b1, w2, cd, eps=eps)
    if name == "sandwich":
        return bounds.sandwich_bound(val, dist, options["head_dim"], options["num_heads"], None, cd)
    return np.zeros(val.shape)  # T5, offset, tensor: table look-ups, exact


def attention_grad_bound(q, k, v, d_out, d_lse, bias4, bias_err4, keep, tau, tau_rel, placement, dtype, softcap=None):
    """Elementwise bounds of dq, dk, dv and of the bias cotangent (B, H, Sq, Sk) of the library's backward.

    The forward logits, probabilities, lse and output follow ``bounds.softmax_bound``/``attention_bound``; the
    backward is FlashAttention-2's: P recomputed as exp(z - lse), delta = rowsum(dO * O) - d_lse, dP = dO v^T,
    dz = P (dP - delta), dq = tau dz K, dk = tau dz^T q, dv = P^T dO, bias cotangent dz (post_scale) or tau dz.
    With a softcap c the scaled score s becomes c tanh(s / c) (see softcap_logit_error) and dq, dk take
    dz (1 - t^2), t = tanh(s / c) charged one more rounding (recovered from the capped logit as z_c / c, or
    recomputed).
    """
    cd = bounds.compute_dtype(dtype)
    u = bounds.unit_roundoff(cd)
    e_exp, e_log = bounds.libm_rel("exp", cd), bounds.libm_rel("log", cd)
    tiny = bounds.smallest_normal(cd)
    nb, nh = q.shape[:2]
    nkv = k.shape[1]
    group = nh // nkv
    big_t = Run(tau, tau, tau_rel * tau)
    qq, kk, vv = Run(q), Run(np.repeat(k, group, axis=1)), Run(np.repeat(v, group, axis=1))
    do = Run(d_out)
    # Logits: (q * tau) . k over D, then + b (post_scale) or + b * tau (pre_scale); the bias carries its own error.
    s = r_total(r_mul(r_mul(qq, big_t, u)[..., :, None, :], kk[..., None, :, :], u), -1, u)
    if softcap is not None:
        cap = Run(softcap)
        # s / c as a division or a product with a rounded reciprocal: two roundings charged
        x = r_div(s, cap, 2 * u)
        th = np.tanh(x.v)
        t_run = r_fn(x, th, 1.0 - th**2, tanh_rel(cd))
        s = r_mul(t_run, cap, u)
    z = s
    if bias4 is not None:
        b = Run(np.where(keep, bias4, 0.0), None, np.where(keep, bias_err4, 0.0))
        z = r_add(s, r_mul(b, big_t, u) if placement == "pre_scale" else b, u)
    zeta = np.where(keep, z.e, 0.0)
    # Exact forward values.
    zm = np.where(keep, z.v, -np.inf)
    top = zm.max(axis=-1, keepdims=True)
    live = np.isfinite(top)
    top = np.where(live, top, 0.0)
    w = np.where(keep, z.v - top, 0.0)
    ex = np.where(keep, np.exp(w), 0.0)
    tot = np.where(live, ex.sum(axis=-1, keepdims=True), 1.0)
    p = ex / tot
    lse = top + np.log(tot)
    n = keep.sum(axis=-1, keepdims=True)
    g_n = bounds.gamma(n, u)
    rho = np.where(keep, u * np.abs(w) + e_exp, 0.0)
    avg = (p * (zeta + rho)).sum(axis=-1, keepdims=True)
    e_lse = np.where(live, avg + g_n + e_log * np.abs(np.log(tot)) + u * np.abs(lse), 0.0)
    # Forward output (for delta), as bounds.attention_bound.
    e_pf = np.where(keep, p * (zeta + rho + avg + g_n + u) + tiny, 0.0)
    pv_abs = p @ vv.a
    out = Run(p @ vv.v, pv_abs, e_pf @ vv.a + g_n * pv_abs)
    # Probabilities recomputed from the lse: exp(z - lse) with z's error, lse's error and the subtraction's rounding.
    e_p = np.where(keep, p * (zeta + e_lse + u * np.abs(z.v - lse) + e_exp) + tiny, 0.0)
    pp = Run(p, p, e_p)
    delta = r_total(r_mul(do, out, u), -1, u, keepdims=True)
    if d_lse is not None:
        delta = r_add(delta, Run(np.where(live[..., 0], d_lse, 0.0)[..., None]), u, sign=-1.0)
    dp = r_total(r_mul(do[..., :, None, :], vv[..., None, :, :], u), -1, u)
    dz = r_mul(pp, r_add(dp, delta.map(lambda x: np.broadcast_to(x, dp.v.shape)), u, sign=-1.0), u).where(keep)

    def per_kv(x):  # (B, H, ...) -> (B, Hkv, group, ...)
        return x.map(lambda t: t.reshape(nb, nkv, group, *t.shape[2:]))

    dv = r_total(per_kv(r_mul(pp[..., :, :, None], do[..., :, None, :], u)), (2, 3), u)
    dzs = dz
    if softcap is not None:
        tt = Run(t_run.v, t_run.a, t_run.e + u * t_run.a)
        dzs = r_mul(dz, r_add(Run(np.ones_like(tt.v)), r_mul(tt, tt, u), u, sign=-1.0), u).where(keep)
    dk = r_mul(r_total(per_kv(r_mul(dzs[..., :, :, None], qq[..., :, None, :], u)), (2, 3), u), big_t, u)
    dq = r_mul(r_total(r_mul(dzs[..., :, :, None], kk[..., None, :, :], u), -2, u), big_t, u)
    db = r_mul(dz, big_t, u) if placement == "pre_scale" else dz
    return {"dq": dq, "dk": dk, "dv": dv, "dbias": db}


def family_grad_bound(name, params, options, q_pos, k_pos, g, dtype):
    """Bounds of a family's parameter gradients from its cotangent ``g`` (H, Sq, Sk) (a Run summed over the batch),
    following the operations of each family's backward."""
    cd = bounds.compute_dtype(dtype)
    u = bounds.unit_roundoff(cd)
    dist = Run(distances(q_pos, k_pos)[None])  # exact integers
    if name == "alibi":
        return {"slopes": r_total(r_mul(g, dist, u), (1, 2), u)}
    if name in ("kerple_power", "kerple_log"):
        r1 = Run(np.asarray(params["r1"], dtype=np.float64)[:, None, None])
        r2 = Run(np.asarray(params["r2"], dtype=np.float64)[:, None, None])
        if name == "kerple_power":
            pw = dist.v**r2.v
            power = Run(pw, pw, bounds.libm_rel("pow", cd) * pw)
            lg = np.log(np.where(dist.v == 0, 1.0, dist.v))
            log_d = Run(lg, np.abs(lg), bounds.libm_rel("log", cd) * np.abs(lg))
            return {
                "r1": r_total(r_mul(g, power, u), (1, 2), u),
                "r2": r_total(r_mul(g, r_mul(r_mul(r1, power, u), log_d, u), u), (1, 2), u),
            }
        t = r_mul(r2, dist, u)
        l1p = r_fn(t, np.log1p(t.v), 1.0 / (1.0 + t.v), bounds.libm_rel("log1p", cd))
        ratio = r_div(r_mul(r1, dist, u), r_add(Run(1.0), t, u), u)
        return {"r1": r_total(r_mul(g, l1p, u), (1, 2), u), "r2": r_total(r_mul(g, ratio, u), (1, 2), u)}
    if name in ("t5", "offset"):
        delta = np.subtract.outer(np.asarray(q_pos), np.asarray(k_pos))
        if name == "t5":
            nbk = len(params["table"][0] if options["layout"] == "heads_buckets" else params["table"])
            idx = np.vectorize(
                lambda x: oracle.t5_bucket(
                    int(x),
                    bidirectional=options["bidirectional"],
                    num_buckets=nbk,
                    max_distance=options["max_distance"],
                )
            )(delta)
        else:
            kk = (len(params["table"][0]) - 1) // 2
            nbk = 2 * kk + 1
            idx = np.clip(delta, -kk, kk) + kk
        # A scatter-add: each bucket's entries summed (a one-hot product adds exact zeros; n counts every entry).
        cols = [r_total(g.where((idx == c)[None]), (1, 2), u) for c in range(nbk)]
        tab = Run(*(np.stack([getattr(c, f) for c in cols], axis=1) for f in ("v", "a", "e")))
        if name == "t5" and options["layout"] == "buckets_heads":
            tab = tab.map(lambda x: x.T)
        return {"table": tab}
    if name == "sandwich":
        return {}
    if name == "tensor":
        return {"array": g}
    return _fire_grad_bound(params, options, q_pos, k_pos, g, cd)


def _fire_grad_bound(params, options, q_pos, k_pos, g, cd):
    """FIRE's backward (relpos_ref's order): x = log1p(c|D|) / (log1p(c max(L, i)) + eps), the MLP's backward unit by
    unit, then dc and dL through x. Raises if a relu pre-activation is within its own error bound of 0 (the branch
    the library takes would not be certain)."""
    u = bounds.unit_roundoff(cd)
    el = bounds.libm_rel("log1p", cd)
    c = Run(float(params["c"]))
    big_l = float(params["L"])
    eps = float(options.get("eps", 0.0))
    dist = Run(distances(q_pos, k_pos))
    qf = np.asarray(q_pos, dtype=np.float64)
    top = Run(np.maximum(qf, big_l))  # max is exact
    ct = r_mul(c, top, u)
    den = r_fn(ct, np.log1p(ct.v), 1.0 / (1.0 + ct.v), el)
    if eps:
        den = r_add(den, Run(eps), u)
    cd_ = r_mul(c, dist, u)
    num = r_fn(cd_, np.log1p(cd_.v), 1.0 / (1.0 + cd_.v), el)
    x = r_div(num, den.map(lambda t: t[:, None]), u)  # (Sq, Sk)
    w1 = np.asarray(params["w1"], dtype=np.float64).ravel()
    b1 = np.asarray(params["b1"], dtype=np.float64)
    w2 = np.asarray(params["w2"], dtype=np.float64)
    grads = {"b2": r_total(g, (1, 2), u)}
    g_w1, g_b1, g_w2 = [], [], []
    g_x = Run(np.zeros(x.v.shape))
    for w in range(w1.shape[0]):
        pre = r_add(r_mul(Run(w1[w]), x, u), Run(b1[w]), u)
        if np.any(np.abs(pre.v) <= pre.e * bounds.SLACK):
            msg = f"FIRE unit {w}: a relu pre-activation is within its {cd} error bound of 0 (branch uncertain)"
            raise ValueError(msg)
        on = pre.v > 0
        hidden = pre.where(on)
        g_w2.append(r_total(r_mul(g, hidden[None], u), (1, 2), u))
        g_hidden = r_total(r_mul(g, Run(w2[:, w, None, None]), u), 0, u)
        g_pre = g_hidden.where(on)
        g_b1.append(r_total(g_pre, (0, 1), u))
        g_w1.append(r_total(r_mul(g_pre, x, u), (0, 1), u))
        g_x = r_add(g_x, r_mul(g_pre, Run(w1[w]), u), u)

    def stack(items, axis):
        return Run(*(np.stack([getattr(t, f) for t in items], axis=axis) for f in ("v", "a", "e")))

    grads["w1"] = stack(g_w1, 0).map(lambda t: t[:, None])
    grads["b1"] = stack(g_b1, 0)
    grads["w2"] = stack(g_w2, 1)
    # dc = sum_i [sum_j g_x |D| / (1 + c|D|)] / den_i - sum_i (sum_j g_x x) top_i / ((1 + c top_i) den_i)
    # dL = -sum_i (sum_j g_x x) c slope_i / ((1 + c top_i) den_i), slope 1 below the tie, 1/2 at it, 0 above
    g_xx = r_total(r_mul(g_x, x, u), 1, u)
    f1 = r_div(dist, r_add(Run(1.0), cd_, u), u)
    part1 = r_total(r_div(r_total(r_mul(g_x, f1, u), 1, u), den, u), 0, u)
    one_ct = r_add(Run(1.0), ct, u)
    part2 = r_total(r_div(r_mul(g_xx, top, u), r_mul(one_ct, den, u), u), 0, u)
    grads["c"] = r_add(part1, part2, u, sign=-1.0)
    slope = Run(np.where(qf < big_l, 1.0, np.where(qf == big_l, 0.5, 0.0)))
    grads["L"] = r_total(r_div(r_mul(r_mul(g_xx, c, u), slope, u), r_mul(one_ct, den, u), u), 0, u)
    return grads


def _finish_bound(r, cd):
    """First-order bound times bounds.SLACK, plus the smallest subnormal (as bounds._finish for float64/float32)."""
    return bounds.SLACK * r.e + bounds.smallest_subnormal(cd)


def _grad_inputs(cid, shape, salt, den, mod=64):
    """Closed-form input for one case: the README's affine_mod with coefficients from the case id (crc32)."""
    seed = zlib.crc32(f"{cid}/{salt}".encode())
    a = [(seed >> (5 * t)) % 23 + 1 for t in range(len(shape))]
    return generated(shape, a, (seed >> 27) % mod, mod, mod // 2, den)


def _gradient_case(
    cid,
    description,
    *,
    dims,
    causal=False,
    align="bottom_right",
    scale=None,
    placement="post_scale",
    family=None,
    params=None,
    options=None,
    bias=None,
    mask=None,
    fully_masked="zero",
    with_d_lse=False,
    features=None,
):
    """One attention_vjp case; ``features`` (features.json only) holds the keywords of FEATURE_KEYS."""
    nb, nh, nkv, sq, sk, d, dv = dims
    qs, q = _grad_inputs(cid, (nb, nh, sq, d), "q", 16)
    ks, k = _grad_inputs(cid, (nb, nkv, sk, d), "k", 16)
    vs, v = _grad_inputs(cid, (nb, nkv, sk, dv), "v", 32)
    dos, d_out = _grad_inputs(cid, (nb, nh, sq, dv), "d_out", 32)
    dls, d_lse = _grad_inputs(cid, (nb, nh, sq), "d_lse", 32) if with_d_lse else (None, None)
    bias_spec, bias_arr = (None, None) if bias is None else bias
    mask_arr = None if mask is None else np.asarray(mask, dtype=bool)
    options = dict(options or {})
    got = oracle.attention_vjp(
        q.tolist(),
        k.tolist(),
        v.tolist(),
        d_out.tolist(),
        family=family,
        params=params,
        options=options,
        bias=None if bias_arr is None else bias_arr.tolist(),
        causal=causal,
        align=align,
        scale=scale,
        placement=placement,
        mask=None if mask_arr is None else mask_arr.tolist(),
        fully_masked=fully_masked,
        d_lse=None if d_lse is None else d_lse.tolist(),
        dps=DPS,
        **(features or {}),
    )
    # Exact bias (B, H, Sq, Sk) and its error in each dtype, for the bound.
    shape4 = (nb, nh, sq, sk)
    softcap = None if features is None else features.get("softcap")
    if features is None:
        q_pos, k_pos = oracle.positions(sq, sk, align=align)
        groups = [(q_pos, k_pos, list(range(nb)))]
        structural = None
    else:
        layout = {n: x for n, x in features.items() if n != "softcap"}
        qps, kps, structural, _ = oracle.attention_layout(nb, sq, sk, causal=causal, align=align, **layout)
        groups = _position_groups(qps, kps)
    fam_exact = None
    if family in ("tensor",):
        bias4 = np.broadcast_to(np.asarray(params["array"], dtype=np.float64), shape4)
    elif family is not None:
        fam_exact = [
            (qp, kp, rows, oracle.family_bias(family, params, qp, kp, options=options, dps=DPS))
            for qp, kp, rows in groups
        ]
        bias4 = np.zeros(shape4)
        for _, _, rows, ex in fam_exact:
            bias4[rows] = values(ex)
    elif bias_arr is not None:
        bias4 = np.broadcast_to(bias_arr.reshape((1,) * (4 - bias_arr.ndim) + bias_arr.shape), shape4)
    else:
        bias4 = None
    keep = np.ones(shape4, dtype=bool)
    if structural is not None:
        keep &= np.asarray(structural, dtype=bool)[:, None]
    elif causal:
        keep &= np.asarray(oracle.causal_mask(q_pos, k_pos), dtype=bool)
    if mask_arr is not None:
        keep &= np.broadcast_to(mask_arr.reshape((1,) * (4 - mask_arr.ndim) + mask_arr.shape), shape4)
    if bias4 is not None:
        keep &= bias4 != -np.inf
    tau = 1 / math.sqrt(d) if scale is None else scale
    finite_inputs = [*q.ravel(), *k.ravel(), *v.ravel(), *d_out.ravel(), *([] if d_lse is None else d_lse.ravel())]
    if softcap is not None:
        finite_inputs.append(softcap)
    if bias_arr is not None:
        finite_inputs += [x for x in bias_arr.ravel().tolist() if math.isfinite(x)]
    if params:
        finite_inputs += [x for x in _flatten(list(params.values())) if math.isfinite(x)]
    dts = dtypes_for(finite_inputs, GRAD_DTYPES)
    if scale is not None:
        dts = [t for t in dts if bounds.representable(float(scale), t)] or dts

    expected = {"dq": got["dq"], "dk": got["dk"], "dv": got["dv"]}
    if family is not None:
        expected["dbias"] = got["params"]
    elif bias_arr is not None:
        expected["dbias"] = got["dbias"]
    else:
        expected["dbias"] = None

    tolerance = {}
    for dt in dts:
        cd = bounds.compute_dtype(dt)
        if fam_exact is not None:
            berr = np.zeros(shape4)
            for qp, kp, rows, ex in fam_exact:
                berr[rows] = family_bias_error(family, params, options, qp, kp, ex, dt)
        else:
            berr = np.zeros(shape4)
        r = attention_grad_bound(
            q,
            k,
            v,
            d_out,
            d_lse,
            bias4,
            berr,
            keep,
            tau,
            _scale_err(tau, scale is None, cd),
            placement,
            dt,
            softcap=softcap,
        )
        # features.json fits without the exactly computed entries (fit_tolerance_tiny); the older files keep theirs.
        fit = fit_tolerance if features is None else (lambda b_, v_, dt=dt: fit_tolerance_tiny(b_, v_, dt))
        tol = {n: fit(_finish_bound(r[n], cd), values(expected[n])) for n in ("dq", "dk", "dv")}
        db = r["dbias"]
        u = bounds.unit_roundoff(cd)
        if family is not None:
            pb = None
            for qp, kp, rows, _ in fam_exact or [(*grp, None) for grp in groups]:
                one = family_grad_bound(family, params, options, qp, kp, r_total(db[rows], 0, u), dt)
                pb = one if pb is None else {n: r_add(pb[n], one[n], u) for n in pb}
            tol["dbias"] = {n: fit(_finish_bound(pb[n], cd), values(expected["dbias"][n])) for n in pb}
        elif bias_arr is not None:
            dims4 = (1,) * (4 - bias_arr.ndim) + bias_arr.shape
            axes = tuple(ax for ax in range(4) if dims4[ax] == 1 and shape4[ax] != 1)
            red = r_total(db, axes, u, keepdims=True) if axes else db
            tol["dbias"] = fit(_finish_bound(red, cd).reshape(bias_arr.shape), values(expected["dbias"]))
        else:
            tol["dbias"] = None
        tolerance[dt] = tol

    def exact_out(x):
        return None if x is None else nested(_decimal, x)

    return {
        "id": cid,
        "kind": "attention_vjp",
        "description": description,
        "q": qs,
        "k": ks,
        "v": vs,
        "d_out": dos,
        "d_lse": dls,
        "family": None
        if family is None
        else {
            "name": family,
            "parameters": {n: nested(s, p) for n, p in params.items()},
            "options": {n: (s(o) if n == "eps" else o) for n, o in options.items()},
        },
        "bias": None if bias_arr is None else (bias_spec if bias_spec is not None else nested(s, bias_arr.tolist())),
        "mask": None if mask_arr is None else mask_arr.astype(int).tolist(),
        "causal": causal,
        "align": align,
        "scale": None if scale is None else s(scale),
        "placement": placement,
        "fully_masked": fully_masked,
        **({} if features is None else _feature_fields(features)),
        "dtypes": dts,
        "expected": {
            n: (
                {m: exact_out(t) for m, t in expected[n].items()}
                if isinstance(expected[n], dict)
                else exact_out(expected[n])
            )
            for n in ("dq", "dk", "dv", "dbias")
        },
        "tolerance": tolerance,
    }


def _decimal(x) -> str:
    """An oracle mpf as DIGITS significant digits, exactly.

    ``oracle.to_decimal_string`` converts its argument with ``oracle._num``, which passes an mpf of the oracle's
    private context through ``float()`` (it is not an instance of ``mpmath.mpf``), keeping only 17 digits; the exact
    Fraction of the mpf goes through unchanged.
    """
    if x != x or abs(x) == math.inf:
        return oracle.to_decimal_string(float(x), DIGITS, dps=DPS)
    num, den = mpmath.libmp.to_rational(x._mpf_)
    return oracle.to_decimal_string(Fraction(num, den), DIGITS, dps=DPS)


FIRE_W = {
    "w1": [[1.5], [-2.25], [0.75]],
    "b1": [-0.375, 1.0625, 0.0625],
    "w2": [[0.5, -1.0, 2.0], [-0.25, 0.75, 1.25]],
    "b2": [0.125, -0.5],
}


def gradient_cases():
    h2 = (1, 2, 1, 4, 6, 4, 4)  # B, H, Hkv, Sq, Sk, D, Dv
    sq6 = (1, 2, 2, 6, 6, 4, 3)
    specs = [
        (
            "grad-none-H2-Sq4-Sk4",
            "no bias, not causal, two query heads on one kv head, default scale 1/sqrt(4)",
            {"dims": (1, 2, 1, 4, 4, 4, 4)},
        ),
        (
            "grad-none-D3-Sq3-Sk5-causal-top_left",
            "no bias, Sq < Sk, causal top_left, D = 3 (default scale 1/sqrt(3), not representable)",
            {"dims": (1, 2, 2, 3, 5, 3, 2), "causal": True, "align": "top_left"},
        ),
    ]
    for placement in ("post_scale", "pre_scale"):
        specs.append(
            (
                f"grad-alibi-H2-Sq4-Sk6-causal-{placement}",
                f"ALiBi slopes 0.5, 0.25; causal bottom_right, Sq < Sk, {placement}",
                {"dims": h2, "causal": True, "placement": placement, "family": "alibi",
                 "params": {"slopes": [0.5, 0.25]}},
            )
        )  # fmt: skip
    specs += [
        (
            "grad-alibi-B2-H4-Hkv2-Sq5-Sk5-causal",
            "grouped-query heads (4 query heads on 2 kv heads), batch 2, official 4-head ALiBi slopes, causal",
            {"dims": (2, 4, 2, 5, 5, 4, 4), "causal": True, "family": "alibi",
             "params": {"slopes": [0.25, 0.0625, 0.015625, 0.00390625]}},
        ),
        (
            "grad-kerple_power-Sq5-Sk5-causal",
            "KERPLE power r1 = (0.75, 1.5), r2 = (2, 0.5); causal square: Delta = 0 on the diagonal (d/dr2 is 0 there)",
            {"dims": (1, 2, 1, 5, 5, 4, 4), "causal": True, "family": "kerple_power",
             "params": {"r1": [0.75, 1.5], "r2": [2.0, 0.5]}},
        ),
        (
            "grad-kerple_log-Sq3-Sk6-causal-top_left",
            "KERPLE log r1 = (0.5, 2), r2 = (1, 0.125); Sq < Sk, causal top_left",
            {"dims": (1, 2, 2, 3, 6, 4, 4), "causal": True, "align": "top_left", "family": "kerple_log",
             "params": {"r1": [0.5, 2.0], "r2": [1.0, 0.125]}},
        ),
        (
            "grad-t5-bidirectional-heads_buckets-Sq5-Sk6",
            "T5 table (H, B) = (2, 8), bidirectional, max_distance 5, not causal (keys on both sides), scale 1",
            {"dims": (1, 2, 1, 5, 6, 4, 4), "scale": 1.0, "family": "t5",
             "params": {"table": [[(3 * j - 11 * h) % 17 / 8 - 1 for j in range(8)] for h in range(2)]},
             "options": {"bidirectional": True, "max_distance": 5, "layout": "heads_buckets"}},
        ),
        (
            "grad-t5-causal-buckets_heads-Sq6-Sk6",
            "T5 table (B, H) = (8, 2), unidirectional, max_distance 6, causal, scale 1",
            {"dims": sq6, "causal": True, "scale": 1.0, "family": "t5",
             "params": {"table": [[(5 * j + 7 * h) % 13 / 8 - 0.75 for h in range(2)] for j in range(8)]},
             "options": {"bidirectional": False, "max_distance": 6, "layout": "buckets_heads"}},
        ),
        (
            "grad-offset-K2-Sq5-Sk6-pre_scale",
            "per-offset table (H, 2K+1), K = 2, clipped on both sides; not causal, pre_scale",
            {"dims": (1, 2, 1, 5, 6, 4, 4), "placement": "pre_scale", "family": "offset",
             "params": {"table": [[(7 * j + 3 * h) % 11 / 4 - 1.25 for j in range(5)] for h in range(2)]}},
        ),
        (
            "grad-fire-L3-tie-Sq6-Sk6-causal",
            "FIRE width 3, c = 0.25, L = 3: query positions 0..5 give rows with i < L, i == L (dL counted 1/2) and "
            "i > L; causal",
            {"dims": sq6, "causal": True, "family": "fire", "params": {**FIRE_W, "c": 0.25, "L": 3.0},
             "options": {"eps": 0.0}},
        ),
        (
            "grad-fire-L8-eps-Sq4-Sk6-pre_scale",
            "FIRE width 3, c = 0.125, L = 8 (every i < L), eps = 2**-10; causal, pre_scale",
            {"dims": h2, "causal": True, "placement": "pre_scale", "family": "fire",
             "params": {**FIRE_W, "c": 0.125, "L": 8.0}, "options": {"eps": 2.0**-10}},
        ),
        (
            "grad-sandwich-d8-Sq4-Sk6-causal",
            "Sandwich (no parameters), head_dim 8, 2 heads; causal",
            {"dims": h2, "causal": True, "family": "sandwich", "params": {},
             "options": {"num_heads": 2, "head_dim": 8}},
        ),
        (
            "grad-tensor-minus-inf-Sq4-Sk5-pre_scale",
            "TensorBias (H, Sq, Sk) with one -inf entry (a mask: zero gradient there); not causal, pre_scale",
            {"dims": (1, 2, 1, 4, 5, 4, 4), "placement": "pre_scale", "family": "tensor",
             "params": {"array": [[[-np.inf if (h, i, j) == (1, 2, 3) else ((5 * i + 3 * j + 7 * h) % 13) / 8 - 1
                                    for j in range(5)] for i in range(4)] for h in range(2)]}},
        ),
        (
            "grad-array-bias-B2-H4-Hkv2-Sq3-Sk5-causal",
            "bias array (H, Sq, Sk) broadcast over batch 2 (its gradient sums the batch); 4 query heads on 2 kv "
            "heads; causal bottom_right",
            {"dims": (2, 4, 2, 3, 5, 4, 4), "causal": True, "bias": _grad_inputs("array-bias-B2", (4, 3, 5), "b", 8)},
        ),
        (
            "grad-alibi-Sq6-Sk3-causal-fully-masked-zero-d_lse",
            "Sq > Sk causal bottom_right: queries 0..2 see no key (fully_masked='zero': zero gradients, their d_lse "
            "ignored); d_lse on every row",
            {"dims": (1, 2, 1, 6, 3, 4, 4), "causal": True, "family": "alibi", "params": {"slopes": [0.5, 0.25]},
             "with_d_lse": True},
        ),
        (
            "grad-d_lse-B2-full-bias-Sq4-Sk5",
            "d_lse (lse cotangent) with a full (B, H, Sq, Sk) bias array, not causal",
            {"dims": (2, 2, 1, 4, 5, 4, 4), "with_d_lse": True,
             "bias": _grad_inputs("d_lse-B2-full-bias", (2, 2, 4, 5), "b", 8)},
        ),
        (
            "grad-mask-Sq5-Sk4-bias-Sq-Sk",
            "boolean mask (Sq, Sk) with one fully masked row (fully_masked='zero') and a bias (Sq, Sk) broadcast "
            "over batch and heads",
            {"dims": (1, 2, 1, 5, 4, 4, 4),
             "mask": [[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 0]],
             "bias": _grad_inputs("mask-bias", (5, 4), "b", 8)},
        ),
        (
            "grad-none-Sq5-Sk3-causal-fully-masked-nan",
            "Sq > Sk causal bottom_right with fully_masked='nan': NaN dq rows, NaN dk and dv of the kv head",
            {"dims": (1, 2, 1, 5, 3, 4, 4), "causal": True, "fully_masked": "nan"},
        ),
    ]  # fmt: skip
    return [(cid, lambda cid=cid, desc=desc, kw=kw: _gradient_case(cid, desc, **kw)) for cid, desc, kw in specs]


# -- attention features (features.json): windows, softcap, explicit positions, lengths, segments -------------------
#
# Expected values: oracle.attention / oracle.attention_vjp with the same keywords. Forward tolerances:
# feature_attention_bound below (bounds.attention_bound's model with the logit error written out, so that a family
# bias's own error and a softcap's tanh enter it); gradient tolerances: attention_grad_bound with its softcap terms.

#: The keywords these cases add to attention / attention_vjp (besides a bias family), in the order of the JSON.
FEATURE_KEYS = (
    "window",
    "softcap",
    "q_pos",
    "k_pos",
    "q_lens",
    "k_lens",
    "q_segment_ids",
    "k_segment_ids",
    "segment_positions",
)


def fit_tolerance_tiny(bound, value, dtype: str) -> dict[str, str]:
    """fit_tolerance on the entries whose bound exceeds the smallest normal of ``dtype``; atol then covers the rest.

    An entry computed exactly (a product with an exact 0, a row with one key) has a bound at or near 0; in the fit
    it forces atol to about 0 and leaves rtol to the smallest output. Fitted without them and covered by atol, every
    entry still passes within its bound.
    """
    b = np.asarray(bound, dtype=np.float64)
    v = np.asarray(value, dtype=np.float64)
    tiny = b <= bounds.smallest_normal(dtype)
    tol = fit_tolerance(b, np.where(tiny, np.nan, v))
    rest = b[tiny & np.isfinite(v)]
    if rest.size and float(tol["atol"]) < float(rest.max()):
        tol["atol"] = fit_tolerance(np.array([rest.max()]), np.array([0.0]))["atol"]
    return tol


def _feature_fields(features: dict) -> dict:
    """Every feature keyword of a case, null where unused (the JSON spelling: window [left, right], softcap a
    decimal string)."""
    out = {}
    for key in FEATURE_KEYS:
        val = features.get(key)
        if key == "window" and val is not None:
            val = list(val)
        elif key == "softcap" and val is not None:
            val = s(val)
        elif key == "segment_positions" and val is None:
            val = "global"
        out[key] = val
    return out


def _position_groups(qps, kps):
    """Batch rows grouped by their (q positions, k positions): [(q_pos, k_pos, rows)]."""
    groups: dict[tuple, list[int]] = {}
    for b, (qp, kp) in enumerate(zip(qps, kps)):
        groups.setdefault((tuple(qp), tuple(kp)), []).append(b)
    return [(list(qp), list(kp), rows) for (qp, kp), rows in groups.items()]


def feature_attention_bound(q, k, v, z, keep, dtype, *, bias4, bias_err4, tau, tau_rel, placement, softcap):
    """Bounds for out (B, H, Sq, Dv) and lse (B, H, Sq): bounds.attention_bound's model with the logit error zeta
    written out here and handed to bounds.softmax_bound as its score error (scale 1, no bias, so nothing is counted
    twice).

    Scaled score s = tau q.k: gamma_D tau sum|q k| (the dot product) + (eps_tau + u) tau sum|q k| (tau applied to q
    or to the score). Softcap c: s / c two roundings, tanh within tanh_rel, times c one rounding; the argument's
    error passes through tanh' = 1 - t^2. Bias: its own error (a family's, per bounds) plus the addition,
    pre_scale also tau b (both orders, tau (s + b) and tau s + tau b, are covered).
    """
    cd = bounds.compute_dtype(dtype)
    u = bounds.unit_roundoff(cd)
    group = q.shape[1] // k.shape[1]
    kk, vv = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = q @ np.swapaxes(kk, -1, -2)
    s_abs = np.abs(q) @ np.swapaxes(np.abs(kk), -1, -2)
    zeta = tau * (bounds.gamma(q.shape[-1], u) + tau_rel + u) * s_abs
    b = np.zeros(z.shape) if bias4 is None else np.where(keep, bias4, 0.0)
    if softcap is not None:
        x = tau * s / softcap
        th = np.tanh(x)
        e_t = (1.0 - th**2) * (zeta / softcap + 2 * u * np.abs(x)) + tanh_rel(cd) * np.abs(th)
        zeta = softcap * e_t + u * softcap * np.abs(th)
    if bias4 is not None:
        berr = np.where(keep, bias_err4, 0.0)
        if placement == "post_scale":
            zeta = zeta + berr + u * np.abs(np.where(keep, z, 0.0))
        else:
            zeta = zeta + tau * berr + (tau_rel + u) * tau * np.abs(b) + u * np.abs(np.where(keep, z, 0.0))
            if softcap is None:
                zeta = zeta + u * tau * np.abs(s + b)
    p_err, lse_err = bounds.softmax_bound(
        z,
        keep,
        "float32" if cd == "float32" else "float64",
        scores=np.zeros(z.shape),
        scale=1.0,
        score_err=np.where(keep, zeta, 0.0),
    )
    zm = np.where(keep, z, -np.inf)
    top = zm.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(keep, np.exp(zm - top), 0.0)
    tot = e.sum(axis=-1, keepdims=True)
    p = e / np.where(tot > 0, tot, 1.0)
    av = np.abs(vv)
    err = bounds.SLACK * (p_err @ av + bounds.gamma(keep.sum(axis=-1), u)[..., None] * (p @ av))
    if dtype not in ("float64", "float32"):
        uo = bounds.unit_roundoff(dtype)
        err = err + uo * (np.abs(p @ vv) + err) + 0.5 * bounds.smallest_subnormal(dtype)
    return err, lse_err


def _feature_attention_case(
    cid,
    description,
    q,
    k,
    v,
    *,
    bias=None,
    family=None,
    params=None,
    options=None,
    causal=False,
    align="bottom_right",
    scale=None,
    placement="post_scale",
    mask=None,
    fully_masked="zero",
    features=None,
    dtypes=ALL,
):
    features = dict(features or {})
    options = dict(options or {})
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    b = None if bias is None else np.asarray(bias, dtype=np.float64)
    m = None if mask is None else np.asarray(mask, dtype=bool)
    o, lse = oracle.attention(
        q.tolist(),
        k.tolist(),
        v.tolist(),
        bias=None if b is None else b.tolist(),
        family=family,
        params=params,
        options=options,
        causal=causal,
        align=align,
        scale=scale,
        placement=placement,
        mask=None if m is None else m.tolist(),
        fully_masked=fully_masked,
        dps=DPS,
        **features,
    )
    nb, nh, sq, d = q.shape
    sk = k.shape[2]
    shape4 = (nb, nh, sq, sk)
    layout = {n: x for n, x in features.items() if n != "softcap"}
    qps, kps, structural, _ = oracle.attention_layout(nb, sq, sk, causal=causal, align=align, **layout)
    softcap = features.get("softcap")
    tau = 1 / math.sqrt(d) if scale is None else scale
    bias4 = None
    fam_exact = []
    if family is not None:
        fam_exact = [
            (qp, kp, rows, oracle.family_bias(family, params, qp, kp, options=options, dps=DPS))
            for qp, kp, rows in _position_groups(qps, kps)
        ]
        bias4 = np.zeros(shape4)
        for _, _, rows, ex in fam_exact:
            bias4[rows] = values(ex)
    elif b is not None:
        bias4 = np.broadcast_to(b.reshape((1,) * (4 - b.ndim) + b.shape), shape4)
    keep = np.broadcast_to(np.asarray(structural, dtype=bool)[:, None], shape4).copy()
    if m is not None:
        keep &= np.broadcast_to(m.reshape((1,) * (4 - m.ndim) + m.shape), shape4)
    if bias4 is not None:
        keep &= bias4 != -np.inf
    z_s = tau * np.einsum("bhid,bhjd->bhij", q, np.repeat(k, nh // k.shape[1], axis=1))
    if softcap is not None:
        z_s = softcap * np.tanh(z_s / softcap)
    bb = np.zeros(shape4) if bias4 is None else np.where(keep, bias4, 0.0)
    z = z_s + (bb if placement == "post_scale" else tau * bb)
    inputs = [*q.ravel().tolist(), *k.ravel().tolist(), *v.ravel().tolist()]
    inputs += [x for x in ([] if b is None else b.ravel().tolist()) if math.isfinite(x)]
    inputs += list(_flatten(list((params or {}).values()))) + ([] if softcap is None else [softcap])
    dts = dtypes_for(inputs, dtypes)
    ov, lv = values(o), values(lse)
    # Rows with nothing attended (padding, or fully masked under "zero") are exactly 0, checked exactly by the rule
    # of the README; left in the fit, their zero bound would force atol = 0 and an rtol set by the smallest output.
    ov_fit = np.where(keep.any(axis=-1, keepdims=True), ov, np.nan)

    def bias_err(dt):
        err = np.zeros(shape4)
        for qp, kp, rows, ex in fam_exact:
            err[rows] = family_bias_error(family, params, options, qp, kp, ex, dt)
        if fam_exact and dt not in ("float64", "float32"):
            # A family's bias in a 16-bit dtype may be rounded to it (as a family's bias() output is) before the
            # float32 logits use it: the bound covers either.
            err = err + bounds.unit_roundoff(dt) * (np.abs(bias4) + err) + 0.5 * bounds.smallest_subnormal(dt)
        return err

    tolerance = {}
    for dt in dts:
        cd = bounds.compute_dtype(dt)
        bo, bl = feature_attention_bound(
            q,
            k,
            v,
            z,
            keep,
            dt,
            bias4=bias4,
            bias_err4=bias_err(dt),
            tau=tau,
            tau_rel=_scale_err(tau, scale is None, cd),
            placement=placement,
            softcap=softcap,
        )
        tolerance[dt] = {"out": fit_tolerance_tiny(bo, ov_fit, dt), "lse": fit_tolerance_tiny(bl, lv, dt)}
    return {
        "id": cid,
        "kind": "attention",
        "description": description,
        "q": nested(s, q.tolist()),
        "k": nested(s, k.tolist()),
        "v": nested(s, v.tolist()),
        "bias": None if b is None else nested(s, b.tolist()),
        "family": None
        if family is None
        else {
            "name": family,
            "parameters": {n: nested(s, p) for n, p in params.items()},
            "options": {n: (s(x) if n == "eps" else x) for n, x in options.items()},
        },
        "mask": None if m is None else m.astype(int).tolist(),
        "causal": causal,
        "align": align,
        "scale": None if scale is None else s(scale),
        "placement": placement,
        "fully_masked": fully_masked,
        **_feature_fields(features),
        "dtypes": dts,
        "expected": {"out": out(o), "lse": out(lse)},
        "tolerance": tolerance,
    }


def feature_cases():
    """Forward cases of features.json: (case id, thunk)."""
    rng = Lcg(41)

    def arr(*shape, lo=-32, hi=32, den=16):
        return np.array([rng.dyadic(lo, hi, den) for _ in range(int(np.prod(shape)))]).reshape(shape)

    specs = []

    def add(cid, description, q, k, v, **kw):
        specs.append((cid, description, q, k, v, kw))

    alibi2 = {"family": "alibi", "params": {"slopes": [0.5, 0.125]}}
    # Windows
    q, k, v = arr(1, 2, 6, 4), arr(1, 2, 6, 4), arr(1, 2, 6, 4)
    add(
        "feat-window-L2-R1-Sq6-Sk6",
        "window (2, 1) on both sides, not causal, bias array (H, Sq, Sk)",
        q,
        k,
        v,
        bias=arr(2, 6, 6, lo=-16, hi=16, den=8),
        features={"window": (2, 1)},
    )
    q, k, v = arr(1, 4, 4, 4), arr(1, 2, 7, 4), arr(1, 2, 7, 2)
    add(
        "feat-window-L3-causal-Sq4-Sk7-bottom_right",
        "sliding window: left 3 (right unbounded) with causal bottom_right, Sq < Sk, grouped-query heads, ALiBi",
        q,
        k,
        v,
        causal=True,
        family="alibi",
        params={"slopes": [0.5, 0.25, 0.125, 0.0625]},
        features={"window": (3, None)},
    )
    q, k, v = arr(1, 2, 5, 4), arr(1, 1, 3, 4), arr(1, 1, 3, 4)
    add(
        "feat-window-R1-Sq5-Sk3-top_left",
        "window right 1 only (left unbounded), Sq > Sk, top_left, not causal",
        q,
        k,
        v,
        align="top_left",
        features={"window": (None, 1)},
    )
    q, k, v = arr(1, 2, 3, 4), arr(1, 2, 5, 4), arr(1, 2, 5, 2)
    add(
        "feat-window-L0-R0-causal-Sq3-Sk5",
        "window (0, 0) with causal: each query attends its diagonal key only (out = v of that key)",
        q,
        k,
        v,
        causal=True,
        features={"window": (0, 0)},
    )
    q, k, v = arr(1, 2, 6, 4), arr(1, 1, 4, 4), arr(1, 1, 4, 4)
    for fm in ("zero", "nan"):
        add(
            f"feat-window-L1-causal-Sq6-Sk4-fully-masked-{fm}",
            f"window (1, 0) with causal bottom_right, Sq > Sk: the first two queries see no key (fully_masked={fm!r})",
            q,
            k,
            v,
            causal=True,
            fully_masked=fm,
            features={"window": (1, 0)},
            **alibi2,
        )
    # Softcap: logits up to ~8 (|q|, |k| <= 2, D = 4, scale 1/2): c = 0.5 saturates, c = 4 is near, c = 64 far above
    q, k, v = arr(1, 2, 3, 4), arr(1, 2, 5, 4), arr(1, 2, 5, 4)
    bias = arr(2, 3, 5, lo=-16, hi=16, den=8)
    for c in (0.5, 4.0, 64.0):
        for placement in ("post_scale", "pre_scale"):
            add(
                f"feat-softcap-c{c:g}-{placement}-bias",
                f"softcap {c:g} (|scaled scores| up to ~8), {placement}, bias array, causal bottom_right",
                q,
                k,
                v,
                bias=bias,
                causal=True,
                placement=placement,
                features={"softcap": c},
            )
        add(
            f"feat-softcap-c{c:g}-nobias",
            f"softcap {c:g} without a bias, not causal, scale 1/2",
            q,
            k,
            v,
            scale=0.5,
            features={"softcap": c},
        )
    q, k, v = arr(1, 2, 4, 4), arr(1, 2, 6, 4), arr(1, 2, 6, 4)
    add(
        "feat-softcap-c8-window-alibi-pre_scale",
        "softcap 8 with a sliding window (2, 0), causal, ALiBi, pre_scale (Gemma-2 style local layer)",
        q,
        k,
        v,
        causal=True,
        placement="pre_scale",
        features={"softcap": 8.0, "window": (2, 0)},
        **alibi2,
    )
    # Explicit positions
    q, k, v = arr(2, 2, 3, 4), arr(2, 2, 5, 4), arr(2, 2, 5, 4)
    add(
        "feat-positions-B2-per-row-alibi-causal",
        "q_pos and k_pos per batch row (B, S): causal is k_pos <= q_pos "
        "and ALiBi is evaluated at the positions of each row",
        q,
        k,
        v,
        causal=True,
        features={"q_pos": [[2, 4, 5], [100, 103, 104]], "k_pos": [[0, 1, 2, 4, 5], [99, 100, 101, 102, 104]]},
        **alibi2,
    )
    q, k, v = arr(1, 2, 2, 4), arr(1, 1, 6, 4), arr(1, 1, 6, 4)
    fire = {"family": "fire", "params": {"w1": [[1.5], [-2.25]], "b1": [-0.375, 1.0625],
            "w2": [[0.5, -1.0], [-0.25, 0.75]], "b2": [0.125, -0.5], "c": 0.25, "L": 8.0},
            "options": {"eps": 0.0}}  # fmt: skip
    add(
        "feat-positions-kv-cache-offset-fire",
        "a KV cache at an offset: keys at positions 1000..1005 (shape (Sk,)), "
        "two new queries at 1004, 1005; FIRE (which sees the absolute query position) at those positions, causal",
        q,
        k,
        v,
        causal=True,
        features={"q_pos": [1004, 1005], "k_pos": list(range(1000, 1006))},
        **fire,
    )
    # Lengths
    q, k, v = arr(3, 2, 4, 4), arr(3, 1, 6, 4), arr(3, 1, 6, 4)
    for align in ("bottom_right", "top_left"):
        add(
            f"feat-lengths-B3-causal-{align}",
            f"q_lens (4, 2, 3), k_lens (6, 3, 5): padded queries give 0 and lse "
            f"-inf, keys past k_lens are never attended; causal {align} on each row's own lengths; ALiBi",
            q,
            k,
            v,
            causal=True,
            align=align,
            features={"q_lens": [4, 2, 3], "k_lens": [6, 3, 5]},
            **alibi2,
        )
    q, k, v = arr(2, 2, 3, 4), arr(2, 2, 4, 4), arr(2, 2, 4, 4)
    add(
        "feat-lengths-B2-k_lens0-fully-masked-nan",
        "k_lens 0 in row 1 (its real queries are fully masked: NaN) and "
        "q_lens (2, 1) (padding: 0 and -inf even under fully_masked='nan'), not causal",
        q,
        k,
        v,
        fully_masked="nan",
        features={"q_lens": [2, 1], "k_lens": [4, 0]},
    )
    # Segments
    seg = [[0, 0, 0, 1, 1, 2], [5, 5, 7, 7, 7, 7]]
    q, k, v = arr(2, 2, 6, 4), arr(2, 2, 6, 4), arr(2, 2, 6, 4)
    for sp in ("global", "restart"):
        add(
            f"feat-segments-packed-{sp}-causal-alibi",
            f"two packed rows of segments, causal, ALiBi, positions {sp}",
            q,
            k,
            v,
            causal=True,
            features={"q_segment_ids": seg, "k_segment_ids": seg, "segment_positions": sp},
            **alibi2,
        )
        add(
            f"feat-segments-packed-{sp}-causal-fire",
            f"packed segments, causal, FIRE (absolute query positions: restart changes the bias), positions {sp}",
            q[:1],
            k[:1],
            v[:1],
            causal=True,
            features={"q_segment_ids": seg[:1], "k_segment_ids": seg[:1], "segment_positions": sp},
            **fire,
        )
    q, k, v = arr(1, 2, 3, 4), arr(1, 2, 6, 4), arr(1, 2, 6, 4)
    add(
        "feat-segments-restart-q-differs-from-k",
        "q segments (0, 1, 1) over k segments (0, 0, 0, 1, 1, 1), "
        "restart: the segment-1 queries sit at 0, 1 and their keys at 0, 1, 2 (the segment alone), ALiBi, not "
        "causal",
        q,
        k,
        v,
        features={"q_segment_ids": [[0, 1, 1]], "k_segment_ids": [[0, 0, 0, 1, 1, 1]], "segment_positions": "restart"},
        **alibi2,
    )
    q, k, v = arr(2, 2, 5, 4), arr(2, 2, 5, 4), arr(2, 2, 5, 4)
    add(
        "feat-segments-lengths-packed-restart",
        "packed rows with a padded tail (q_lens = k_lens = (4, 5)), segments restart, causal, ALiBi",
        q,
        k,
        v,
        causal=True,
        features={
            "q_lens": [4, 5],
            "k_lens": [4, 5],
            "q_segment_ids": [[0, 0, 1, 1, 9], [3, 4, 4, 4, 4]],
            "k_segment_ids": [[0, 0, 1, 1, 9], [3, 4, 4, 4, 4]],
            "segment_positions": "restart",
        },
        **alibi2,
    )
    return [
        (cid, lambda cid=cid, d=d, q=q, k=k, v=v, kw=kw: _feature_attention_case(cid, d, q, k, v, **kw))
        for cid, d, q, k, v, kw in specs
    ]


def feature_gradient_cases():
    """Gradient cases of features.json (tiny: Sq, Sk <= 4, D <= 2)."""
    alibi = {"family": "alibi", "params": {"slopes": [0.5, 0.25]}}
    specs = [
        (
            "grad-feat-window-L1-R0-alibi-Sq4-Sk4",
            "window (1, 0) (with the causal side implied), ALiBi, not causal",
            {"dims": (1, 2, 1, 4, 4, 2, 2), "features": {"window": (1, 0)}, **alibi},
        ),
        (
            "grad-feat-window-R1-causal-Sq3-Sk4-top_left",
            "window right 1 with causal top_left (the window's right side is then inert), bias array",
            {"dims": (1, 2, 2, 3, 4, 2, 2), "causal": True, "align": "top_left",
             "bias": _grad_inputs("feat-window-R1", (2, 3, 4), "b", 8), "features": {"window": (None, 1)}},
        ),
        (
            "grad-feat-softcap-c2-post_scale-bias",
            "softcap 2 (logits near it), post_scale, bias array (Sq, Sk), causal bottom_right",
            {"dims": (1, 2, 1, 3, 4, 2, 2), "causal": True, "scale": 1.0,
             "bias": _grad_inputs("feat-softcap-c2", (3, 4), "b", 8), "features": {"softcap": 2.0}},
        ),
        (
            "grad-feat-softcap-c0.5-pre_scale-alibi-d_lse",
            "softcap 0.5 (saturated logits: tanh' small), pre_scale, ALiBi, an lse cotangent",
            {"dims": (1, 2, 1, 3, 3, 2, 2), "placement": "pre_scale", "scale": 2.0, "with_d_lse": True,
             "features": {"softcap": 0.5}, **alibi},
        ),
        (
            "grad-feat-positions-B2-per-row-alibi-causal",
            "q_pos, k_pos per batch row: causal is k_pos <= q_pos, ALiBi (and its slope gradient) at each row's "
            "positions",
            {"dims": (2, 2, 1, 2, 4, 2, 2), "causal": True,
             "features": {"q_pos": [[1, 3], [52, 50]], "k_pos": [[0, 1, 2, 3], [48, 49, 50, 51]]}, **alibi},
        ),
        (
            "grad-feat-lengths-B2-nan-d_lse",
            "q_lens (2, 3), k_lens (3, 1), not causal, fully_masked='nan' with a d_lse on every row: padded "
            "queries contribute nothing (no NaN), keys past k_lens get zero gradients",
            {"dims": (2, 2, 1, 3, 3, 2, 2), "fully_masked": "nan", "with_d_lse": True,
             "features": {"q_lens": [2, 3], "k_lens": [3, 1]}, **alibi},
        ),
        (
            "grad-feat-segments-restart-alibi",
            "packed segments (0, 0, 1, 1) restart, causal, ALiBi",
            {"dims": (1, 2, 1, 4, 4, 2, 2), "causal": True,
             "features": {"q_segment_ids": [[0, 0, 1, 1]], "k_segment_ids": [[0, 0, 1, 1]],
                          "segment_positions": "restart"}, **alibi},
        ),
        (
            "grad-feat-segments-global-B2-bias",
            "segments per row, global positions, not causal, bias array broadcast over batch",
            {"dims": (2, 2, 2, 4, 4, 2, 2),
             "bias": _grad_inputs("feat-segments-global", (2, 4, 4), "b", 8),
             "features": {"q_segment_ids": [[0, 1, 1, 2], [4, 4, 4, 6]],
                          "k_segment_ids": [[0, 1, 1, 2], [4, 4, 4, 6]]}},
        ),
    ]  # fmt: skip
    return [(cid, lambda cid=cid, desc=desc, kw=kw: _gradient_case(cid, desc, **kw)) for cid, desc, kw in specs]


def features_cases():
    return feature_cases() + feature_gradient_cases()


FILES: dict[str, tuple[str, Callable[[], list]]] = {
    "t5.json": ("t5", t5_cases),
    "offset.json": ("offset", offset_cases),
    "alibi.json": ("alibi", alibi_cases),
    "kerple_power.json": ("kerple_power", kerple_power_cases),
    "kerple_log.json": ("kerple_log", kerple_log_cases),
    "fire.json": ("fire", fire_cases),
    "sandwich.json": ("sandwich", sandwich_cases),
    "softmax.json": ("softmax", softmax_cases),
    "attention.json": ("attention", attention_cases),
    "gradients.json": ("gradients", gradient_cases),
    "features.json": ("features", features_cases),
}


def header(name: str) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "family": name,
        "generator": {
            "script": "spec/vectors/generate.py",
            "command": COMMAND,
            "mpmath_version": mpmath.__version__,
            "dps": DPS,
            "digits": DIGITS,
        },
        "conventions": "delta = q_pos - k_pos; bias arrays are [head][query][key]; mask 1 = attend; lse is the "
        "natural-log log-sum-exp of the final logits; see spec/vectors/README.md",
        "tolerance_rule": "|actual - expected| <= atol + rtol * |expected| elementwise, per dtype; 'exact' or "
        "atol = rtol = 0 means bit-exact; non-finite expected values must match exactly",
    }


def build_case(filename: str, case_id: str) -> dict:
    """Regenerate one case of one file (used by the fast regeneration test)."""
    for cid, thunk in FILES[filename][1]():
        if cid == case_id:
            return thunk()
    msg = f"case_id: no case {case_id!r} in {filename}"
    raise KeyError(msg)


def build_file(filename: str) -> dict:
    name, builder = FILES[filename]
    doc = header(name)
    doc["cases"] = [thunk() for _, thunk in builder()]
    return doc


def dumps(doc: dict) -> str:
    """JSON text: a readable header, one case per line (compact), trailing newline."""
    head = {k: v for k, v in doc.items() if k != "cases"}
    text = json.dumps(head, indent=1)[:-2]
    cases = ",\n".join(json.dumps(c, separators=(",", ":")) for c in doc["cases"])
    return f'{text},\n "cases": [\n{cases}\n ]\n}}\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    parser.add_argument("files", nargs="*", help="subset of the files (default: all)")
    args = parser.parse_args(argv)
    names = args.files or list(FILES)
    bad = []
    for fn in names:
        text = dumps(build_file(fn))
        path = HERE / fn
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                bad.append(fn)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)} ({len(text) / 1024:.0f} KiB)")
    if bad:
        print("differs from a fresh generation: " + ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
