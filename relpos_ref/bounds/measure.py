"""Measurement of the implementation against the mpmath oracle, and the error-versus-bound table verify prints.

Each measurement runs the library on exact inputs (parameters exactly representable in the dtype under test), asks
:mod:`relpos_ref.oracle` for the exact result and evaluates the documented bound of :mod:`relpos_ref.bounds.model`
there; :func:`oracle_table` collects one row per family, backend and dtype, and :func:`format_table` renders them for
``relpos-ref verify`` (and, as Markdown, for ``tools/bounds_table.py``, which writes the table of
``spec/tolerances.md``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import oracle
from .._host import numpy_dtype, round_to
from .._host import to_host as _to_host_named
from ..attention import attention
from ..families import FAMILIES as _REGISTRY
from ..families import FIRE, ALiBi, KerpleLog, KerplePower, OffsetBias, Sandwich, T5Bias, alibi_slopes, t5_bucket
from ..softmax import biased_softmax
from .model import (
    DTYPES,
    _check_dtype,
    alibi_bound,
    alibi_slopes_bound,
    attention_bound,
    backend_name,
    compute_dtype,
    exact_bound,
    fire_bound,
    kerple_log_bound,
    kerple_power_bound,
    max_finite,
    sandwich_bound,
    softmax_bound,
)

__all__ = [
    "BOUND_TEXT",
    "FAMILIES",
    "Measurement",
    "abs_error",
    "format_table",
    "hilo",
    "measure_attention",
    "measure_family",
    "measure_softmax",
    "oracle_table",
    "to_host",
    "xp_dtype",
]

#: Row order of the families in the verify table and in the measured table of ``spec/tolerances.md`` (table
#: look-ups first, then the penalties, the learned FIRE and the parameter-free Sandwich). The registry lists the
#: families in class-definition order, which differs; a family missing here goes last, in registry order.
_ROW_ORDER = ("t5", "offset", "alibi", "kerple_power", "kerple_log", "fire", "sandwich")

#: Families measured against the oracle: every registered family but ``tensor`` (a stored array, nothing computed).
FAMILIES: tuple[str, ...] = tuple(
    sorted(
        (name for name in _REGISTRY if name != "tensor"),
        key=lambda name: _ROW_ORDER.index(name) if name in _ROW_ORDER else len(_ROW_ORDER),
    )
)


# ---------------------------------------------------------------------------------------------------------------------
# Host copies and the double-double error
# ---------------------------------------------------------------------------------------------------------------------


def hilo(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Split nested oracle values (mpf) into float64 arrays ``hi + lo`` (a double-double, ~106 bits)."""
    ctx = oracle.context(oracle.DEFAULT_DPS)

    def walk(x):
        if isinstance(x, list | tuple):
            pairs = [walk(t) for t in x]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        x = ctx.mpf(x)
        if ctx.isnan(x) or ctx.isinf(x):
            f = float(x)
            return f, 0.0
        hi = float(x)
        return hi, float(x - hi)

    hi, lo = walk(values)
    return np.asarray(hi, dtype=np.float64), np.asarray(lo, dtype=np.float64)


def abs_error(actual: Any, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """``|actual - (hi + lo)|`` in float64 without the rounding of ``hi`` (the subtraction ``actual - hi`` is exact
    when they agree to within a factor 2, Sterbenz). Equal infinities and matching NaNs count as 0; one-sided
    non-finite values as inf."""
    a = np.asarray(actual, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs((a - hi) - lo)
    same = (a == hi) | (np.isnan(a) & np.isnan(hi))
    d = np.where(same & (lo == 0), 0.0, d)
    return np.where(np.isnan(d), np.inf, d)


def to_host(x: Any) -> np.ndarray:
    """Host NumPy copy of an array of any namespace, as :func:`relpos_ref._host.to_host` without the dtype name
    (floating values widened to float64, integers and booleans as int64)."""
    return _to_host_named(x)[0]


def xp_dtype(xp: Any, dtype: str) -> Any:
    """The dtype object of ``xp`` for a format name; None when the namespace lacks it (bfloat16 off NumPy)."""
    if dtype == "bfloat16":
        return numpy_dtype("bfloat16") if backend_name(xp) == "numpy" and "strict" not in xp.__name__ else None
    return getattr(xp, dtype, None)


# ---------------------------------------------------------------------------------------------------------------------
# Measurement against the oracle
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """Errors of one computation against the oracle, elementwise."""

    err: np.ndarray
    bound: np.ndarray
    value: np.ndarray
    excluded: int = 0  # entries outside the finite range of the dtype (documented hazard, not measured)
    extra: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: Measurement) -> Measurement:
        return Measurement(
            np.concatenate([self.err.ravel(), other.err.ravel()]),
            np.concatenate([self.bound.ravel(), other.bound.ravel()]),
            np.concatenate([self.value.ravel(), other.value.ravel()]),
            self.excluded + other.excluded,
        )

    @property
    def ratio(self) -> float:
        if self.err.size == 0:
            return 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(self.err == 0, 0.0, self.err / self.bound)
        return float(np.max(r))

    def summary(self) -> dict[str, Any]:
        if self.err.size == 0:
            return {"max_abs_err": 0.0, "max_rel_err": 0.0, "bound": 0.0, "ratio": 0.0, "n": 0}
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(self.err == 0, 0.0, self.err / self.bound)
            rel = np.where(self.value != 0, self.err / np.abs(self.value), np.where(self.err == 0, 0.0, np.inf))
        worst = int(np.argmax(r))
        return {
            "max_abs_err": float(self.err.max()),
            "max_rel_err": float(rel.max()),
            "bound": float(self.bound.ravel()[worst]),
            "ratio": float(r.ravel()[worst]),
            "n": int(self.err.size),
        }


def _in_range(value: np.ndarray, bound: np.ndarray, dtype: str) -> np.ndarray:
    """Entries the bound covers: finite results inside the dtype's range, and exact infinities/NaNs (which must be
    reproduced exactly: -inf lse of a fully masked row, NaN of ``fully_masked="nan"``)."""
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(value) | (np.abs(value) + bound <= max_finite(dtype))


def _measure(actual: Any, exact: Any, bound_fn: Callable[[np.ndarray], np.ndarray], dtype: str) -> Measurement:
    hi, lo = hilo(exact)
    value = hi + lo
    bound = np.where(np.isfinite(value), bound_fn(value), 0.0)
    ok = _in_range(value, bound, dtype)
    err = abs_error(to_host(actual), hi, lo)
    return Measurement(err[ok], bound[ok], value[ok], excluded=int((~ok).sum()))


# -- family specifications: one function per family builds the library object, the oracle values and the bound ------


def _positions_arrays(xp: Any, q_pos: Sequence[int], k_pos: Sequence[int]) -> tuple[Any, Any]:
    return xp.asarray(list(q_pos), dtype=xp.int64), xp.asarray(list(k_pos), dtype=xp.int64)


def measure_family(
    name: str,
    params: dict[str, Any],
    options: dict[str, Any],
    q_pos: Sequence[int],
    k_pos: Sequence[int],
    xp: Any,
    dtype: str,
    *,
    dps: int = 30,
    heads: Sequence[int] | None = None,
) -> Measurement:
    """Run one family on ``xp`` in ``dtype`` and compare with the oracle.

    ``params`` hold float64 NumPy arrays whose values are exactly representable in ``dtype`` (see
    :func:`relpos_ref._host.round_to`); the family is built in NumPy float64 and moved with
    ``family.astype(dtype, xp=xp)``.
    """
    import array_api_compat.numpy as npc

    target = xp_dtype(xp, dtype)
    if target is None:
        msg = f"dtype: {dtype} is not available in {getattr(xp, '__name__', xp)}"
        raise ValueError(msg)
    backend = backend_name(xp)
    dist = np.abs(np.subtract.outer(np.asarray(q_pos, dtype=np.float64), np.asarray(k_pos, dtype=np.float64)))
    qh, kh = list(q_pos), list(k_pos)
    p64 = {k: npc.asarray(np.asarray(v, dtype=np.float64)) for k, v in params.items()}
    if name == "alibi":
        fam = ALiBi(p64["slopes"])
        exact = oracle.alibi_bias(params["slopes"].tolist(), qh, kh, heads=heads, dps=dps)

        def bound(v):
            return alibi_bound(v, dist[None], dtype, backend)
    elif name == "kerple_power":
        fam = KerplePower(p64["r1"], p64["r2"])
        exact = oracle.kerple_power_bias(params["r1"].tolist(), params["r2"].tolist(), qh, kh, heads=heads, dps=dps)
        r2 = np.asarray(params["r2"])[list(heads) if heads is not None else slice(None)]

        def bound(v):
            return kerple_power_bound(v, dist[None], r2[:, None, None], dtype, backend)
    elif name == "kerple_log":
        fam = KerpleLog(p64["r1"], p64["r2"])
        exact = oracle.kerple_log_bias(params["r1"].tolist(), params["r2"].tolist(), qh, kh, heads=heads, dps=dps)

        def bound(v):
            return kerple_log_bound(v, dist[None], dtype, backend)
    elif name == "fire":
        c = float(params["c"])
        L = float(params["L"])  # noqa: N806
        eps = float(options.get("eps", 0.0))
        fam = FIRE(p64["w1"], p64["b1"], p64["w2"], p64["b2"], c=p64["c"], L=p64["L"], eps=eps)
        w1 = np.asarray(params["w1"]).reshape(-1)
        b1 = np.asarray(params["b1"])
        w2 = np.asarray(params["w2"])
        b2 = np.asarray(params["b2"])
        exact = oracle.fire_bias(
            w1.tolist(), b1.tolist(), w2.tolist(), b2.tolist(), qh, kh, c=c, L=L, eps=eps, heads=heads, dps=dps
        )
        xh, xl = hilo(oracle.fire_inputs(qh, kh, c=c, L=L, eps=eps, dps=dps))
        w2h = w2[list(heads)] if heads is not None else w2

        def bound(v):
            return fire_bound(v, xh + xl, w1, b1, w2h, dtype, eps=eps, backend=backend)
    elif name == "sandwich":
        nh, hd = int(options["num_heads"]), int(options["head_dim"])
        fam = Sandwich(nh, hd)
        exact = oracle.sandwich_bias(nh, hd, qh, kh, heads=heads, dps=dps)

        def bound(v):
            return sandwich_bound(v, dist, hd, nh, heads, dtype, backend)
    elif name in ("t5", "offset"):
        if name == "t5":
            fam = T5Bias(
                p64["table"],
                bidirectional=options["bidirectional"],
                max_distance=options.get("max_distance", 128),
                layout="heads_buckets",
            )
            exact = oracle.t5_bias(
                params["table"].tolist(),
                qh,
                kh,
                bidirectional=options["bidirectional"],
                max_distance=options.get("max_distance", 128),
                heads=heads,
                dps=dps,
            )
        else:
            fam = OffsetBias(p64["table"])
            exact = oracle.offset_bias(params["table"].tolist(), qh, kh, heads=heads, dps=dps)

        def bound(v):
            return exact_bound(v, dtype)
    else:
        msg = f"name: unknown family {name!r}"
        raise ValueError(msg)
    fam = fam.astype(target, xp=xp)
    qp, kp = _positions_arrays(xp, q_pos, k_pos)
    with np.errstate(over="ignore"):
        actual = fam.bias(qp, kp, heads=list(heads) if heads is not None else None)
    return _measure(actual, exact, bound, dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Deterministic case sets for the table (the tests draw their own with Hypothesis)
# ---------------------------------------------------------------------------------------------------------------------

_LONG = [0, 1, 2, 3, 7, 100, 1000, 4095, 4097, 65535, 131071, 524289, 1_000_000]


def _dist_cap(dtype: str, top_value: float) -> int:
    """Largest distance keeping a bias of slope-like size ``top_value`` per unit distance inside the dtype's range."""
    return int(max_finite(dtype) / (2 * top_value)) if dtype == "float16" else 1_000_000


def _family_cases(name: str, dtype: str, thorough: bool, rng: np.random.Generator) -> Iterable[tuple]:
    """Yield (params, options, q_pos, k_pos) with parameters exactly representable in ``dtype``."""
    reps = 3 if thorough else 1
    for _ in range(reps):
        if name == "alibi":
            for h in (8, 12, 256) if thorough else (8, 12):
                slopes = round_to(np.array([2.0 ** float(e) for e in oracle.alibi_slope_log2(h)]), dtype)
                cap = _dist_cap(dtype, float(slopes.max()))
                pos = sorted({p for p in _LONG if p <= cap} | {cap})
                yield {"slopes": slopes}, {}, pos, pos[: max(2, len(pos) // 2)]
            slopes = round_to(np.exp(rng.uniform(np.log(1e-4), np.log(1.0), 6)), dtype)
            cap = _dist_cap(dtype, float(slopes.max()))
            pos = sorted({int(t) for t in rng.integers(0, cap, 24)} | {0})
            yield {"slopes": slopes}, {}, pos, pos
        elif name in ("kerple_power", "kerple_log"):
            h = 6
            r1 = round_to(np.exp(rng.uniform(np.log(1e-6), np.log(4.0), h)), dtype)
            if name == "kerple_power":
                r2 = round_to(np.concatenate([[2.0, 1.0, 0.01], rng.uniform(0.01, 2.0, h - 3)]), dtype)
                cap = 200 if dtype == "float16" else 1_000_000
            else:
                r2 = round_to(np.exp(rng.uniform(np.log(1e-3), np.log(8.0), h)), dtype)
                cap = 1_000_000
            r1[0] = round_to(np.array([1e-6 if dtype != "float16" else 2.0**-14]), dtype)[0]
            pos = sorted({p for p in _LONG if p <= cap} | {int(t) for t in rng.integers(0, cap, 16)})
            yield {"r1": r1, "r2": r2}, {}, pos, pos
        elif name == "fire":
            w = 32
            L = 512.0  # noqa: N806
            for c in (2.0**-10, 0.1, 16.0):
                params = {
                    "w1": round_to(rng.normal(0, 1, (w, 1)), dtype),
                    "b1": round_to(rng.normal(0, 1, w), dtype),
                    "w2": round_to(rng.normal(0, 1 / math.sqrt(w), (4, w)), dtype),
                    "b2": round_to(rng.normal(0, 1, 4), dtype),
                    "c": round_to(np.array(c), dtype),
                    "L": round_to(np.array(L), dtype),
                }
                q = [0, 1, 100, 510, 511, 512, 513, 2000, 65535, 1_000_000]
                if dtype == "float16":
                    q = [t for t in q if t <= 65504]
                k = sorted({0, 1, 255, 509, 510, 511, 512, 513} | {t - 1 for t in q if t > 0})
                yield params, {"eps": 0.0 if c != 0.1 else 1e-6}, q, k
        elif name == "sandwich":
            for hd in (32, 64, 128):
                pos = [0, 1, 2, 13, 14, 100, 1000, 4096] + ([65536, 1_000_000] if thorough else [])
                yield {}, {"num_heads": 8, "head_dim": hd}, pos, pos
        elif name == "t5":
            for bidir in (True, False):
                for nb, md in ((32, 128), (8, 20)):
                    thr = oracle.t5_bucket_thresholds(bidirectional=bidir, num_buckets=nb, max_distance=md)
                    offs = sorted(set(thr) | {t - 1 for t in thr if t > 0} | {md, 1_000_000})
                    q = [1_000_000]
                    k = sorted({1_000_000 - o for o in offs} | {1_000_000 + o for o in offs})
                    table = round_to(rng.normal(0, 1, (3, nb)), dtype)
                    yield {"table": table}, {"bidirectional": bidir, "max_distance": md}, q, k
        elif name == "offset":
            table = round_to(rng.normal(0, 1, (3, 9)), dtype)
            yield {"table": table}, {}, [0, 3, 100], [0, 1, 2, 3, 4, 5, 6, 7, 100, 200]


def _softmax_cases(dtype: str, thorough: bool, rng: np.random.Generator) -> Iterable[dict[str, Any]]:
    lengths = (1, 7, 128, 1000) + ((8192,) if thorough else ())
    for n in lengths:
        for spread, placement, scale in (
            (1.0, "post_scale", 0.125),
            (30.0, "pre_scale", 1 / math.sqrt(48)),
            (3.0, "post_scale", 1.0),
        ):
            rows = 3
            s = round_to(rng.normal(0, spread, (rows, n)), dtype)
            b = round_to(-np.abs(rng.normal(0, 2, (rows, n))), dtype)
            mask = rng.random((rows, n)) < 0.9
            mask[:, 0] = True
            yield {"scores": s, "bias": b, "mask": mask, "scale": scale, "placement": placement}
    # logits and biases near +-1e4, one dominant key, all-equal logits
    big = 1e4 if dtype != "float16" else 6e3
    s = round_to(np.array([[big, big - 1, big - 2.5, -big], [0.0] * 4, [1.0, 40.0, 1.0, 1.0]]), dtype)
    b = round_to(np.array([[-big, 3.0, -big + 7, big], [0.0] * 4, [0.0, 0.0, 0.0, 0.0]]), dtype)
    yield {"scores": s, "bias": b, "mask": None, "scale": 1.0, "placement": "post_scale"}


def measure_softmax(case: dict[str, Any], xp: Any, dtype: str, *, dps: int = 30) -> tuple[Measurement, Measurement]:
    """Probabilities and lse of :func:`relpos_ref.biased_softmax` against the oracle."""
    target = xp_dtype(xp, dtype)
    backend = backend_name(xp)
    s, b, mask = case["scores"], case.get("bias"), case.get("mask")
    scale, placement = case.get("scale", 1.0), case.get("placement", "post_scale")
    probs_x, lse_x = biased_softmax(
        xp.asarray(s.astype(numpy_dtype(dtype))) if dtype == "bfloat16" else xp.asarray(s, dtype=target),
        None
        if b is None
        else (xp.asarray(b.astype(numpy_dtype(dtype))) if dtype == "bfloat16" else xp.asarray(b, dtype=target)),
        mask=None if mask is None else xp.asarray(mask),
        scale=scale,
        placement=placement,
        return_lse=True,
    )
    p_exact, lse_exact = oracle.biased_softmax(
        s.tolist(),
        None if b is None else b.tolist(),
        mask=None if mask is None else mask.tolist(),
        scale=scale,
        placement=placement,
        dps=dps,
    )
    zh, zl = hilo(_logits(s, b, scale, placement, dps))
    p_bound, lse_bound = softmax_bound(
        zh + zl, mask, dtype, scores=s, bias=b, scale=scale, placement=placement, backend=backend
    )
    return (
        _measure(probs_x, p_exact, lambda v: p_bound, dtype),
        _measure(lse_x, lse_exact, lambda v: lse_bound, compute_dtype(dtype)),
    )


def _logits(s: np.ndarray, b: np.ndarray | None, scale: float, placement: str, dps: int) -> list:
    """Exact final logits (mpf) from exact inputs."""
    ctx = oracle.context(dps)
    tau = ctx.mpf(float(scale))
    sb = np.zeros_like(s) if b is None else np.broadcast_to(b, s.shape)
    flat = [
        (ctx.mpf(float(a)) * tau + ctx.mpf(float(c)))
        if placement == "post_scale"
        else (ctx.mpf(float(a)) + ctx.mpf(float(c))) * tau
        for a, c in zip(s.ravel().tolist(), sb.ravel().tolist())
    ]
    return np.array(flat, dtype=object).reshape(s.shape).tolist()


def _attention_cases(dtype: str, thorough: bool, rng: np.random.Generator) -> Iterable[dict[str, Any]]:
    shapes = [
        (1, 4, 2, 5, 7, 16, True, "bottom_right"),
        (1, 4, 4, 6, 3, 8, True, "bottom_right"),
        (2, 2, 1, 4, 64, 16, True, "top_left"),
        (1, 2, 2, 3, 512, 32, False, "bottom_right"),
    ]
    if thorough:
        shapes.append((1, 2, 1, 2, 8192, 16, True, "bottom_right"))
    for nb, nh, nkv, sq, sk, d, causal, align in shapes:
        q = round_to(rng.normal(0, 1, (nb, nh, sq, d)), dtype)
        k = round_to(rng.normal(0, 1, (nb, nkv, sk, d)), dtype)
        v = round_to(rng.normal(0, 1, (nb, nkv, sk, d)), dtype)
        bias = round_to(-np.abs(rng.normal(0, 3, (nh, sq, sk))), dtype)
        for placement in ("post_scale", "pre_scale"):
            yield {"q": q, "k": k, "v": v, "bias": bias, "causal": causal, "align": align, "placement": placement}
    # The structural kernel features (they only decide which keys a query attends, so the bound is the same model
    # on their mask): a window, per-row positions, ragged lengths with padding rows, packed segments. Softcap changes
    # the logits through tanh, whose error the bound model does not have: it is covered by spec/vectors/features.json.
    nb, nh, nkv, sq, sk, d = 3, 4, 2, 9, 21, 16
    q = round_to(rng.normal(0, 1, (nb, nh, sq, d)), dtype)
    k = round_to(rng.normal(0, 1, (nb, nkv, sk, d)), dtype)
    v = round_to(rng.normal(0, 1, (nb, nkv, sk, d)), dtype)
    bias = round_to(-np.abs(rng.normal(0, 3, (nh, sq, sk))), dtype)
    seg_q = [[0] * 4 + [1] * 5, [0] * 9, [0, 0, 1, 1, 1, 2, 2, 2, 2]]
    seg_k = [[0] * 10 + [1] * 11, [0] * 21, [0] * 5 + [1] * 8 + [2] * 8]
    features = (
        {"window": (5, 1)},
        {"window": (None, 0), "causal": True},
        {"q_pos": [[3 + i for i in range(sq)], [12 + i for i in range(sq)], list(range(sq))], "causal": True},
        {"q_lens": [9, 1, 5], "k_lens": [21, 8, 13], "causal": True},
        {"q_segment_ids": seg_q, "k_segment_ids": seg_k, "segment_positions": "restart"},
    )
    for feat in features:
        opts = {"causal": False, **feat}
        yield {"q": q, "k": k, "v": v, "bias": bias, "align": "bottom_right", "placement": "post_scale", **opts}


#: The kernel-feature keywords an attention case may carry (the same names in relpos_ref.attention and the oracle).
_FEATURES = ("window", "q_pos", "k_pos", "q_lens", "k_lens", "q_segment_ids", "k_segment_ids", "segment_positions")


def measure_attention(case: dict[str, Any], xp: Any, dtype: str, *, dps: int = 30) -> tuple[Measurement, Measurement]:
    """Output and lse of :func:`relpos_ref.attention` (array bias) against the oracle."""
    target = xp_dtype(xp, dtype)
    backend = backend_name(xp)

    def put(a):
        return xp.asarray(a.astype(numpy_dtype(dtype))) if dtype == "bfloat16" else xp.asarray(a, dtype=target)

    q, k, v, bias = case["q"], case["k"], case["v"], case.get("bias")
    causal, align, placement = case["causal"], case["align"], case["placement"]
    scale = case.get("scale", 1.0 / math.sqrt(q.shape[-1]))
    feats = {n: case[n] for n in _FEATURES if n in case}
    ints = {
        n: (xp.asarray(np.asarray(a), dtype=xp.int64) if n not in ("window", "segment_positions") else a)
        for n, a in feats.items()
    }
    out_x, lse_x = attention(
        put(q),
        put(k),
        put(v),
        bias=None if bias is None else put(bias),
        causal=causal,
        align=align,
        scale=scale,
        placement=placement,
        return_lse=True,
        **ints,
    )
    out_e, lse_e = oracle.attention(
        q.tolist(),
        k.tolist(),
        v.tolist(),
        bias=None if bias is None else bias.tolist(),
        causal=causal,
        align=align,
        scale=scale,
        placement=placement,
        dps=dps,
        **feats,
    )
    # logits and mask for the bound (float64 logits are accurate enough to evaluate a bound); the oracle's layout
    # decides which keys each query of each batch row attends
    group = q.shape[1] // k.shape[1]
    kk = np.repeat(k, group, axis=1)
    layout = oracle.attention_layout(q.shape[0], q.shape[2], k.shape[2], causal=causal, align=align, **feats)
    keep = np.broadcast_to(np.asarray(layout[2], dtype=bool)[:, None], (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    sexact = np.einsum("bhid,bhjd->bhij", q, kk)  # float64 approximation suffices for the bound's z
    bb = np.zeros(keep.shape) if bias is None else np.broadcast_to(bias, keep.shape)
    z = sexact * scale + bb if placement == "post_scale" else (sexact + bb) * scale
    o_bound, l_bound = attention_bound(
        q, k, v, z, keep, dtype, bias=None if bias is None else bb, scale=scale, placement=placement, backend=backend
    )
    return (
        _measure(out_x, out_e, lambda val: o_bound, dtype),
        _measure(lse_x, lse_e, lambda val: l_bound, compute_dtype(dtype)),
    )


# ---------------------------------------------------------------------------------------------------------------------
# The verify table
# ---------------------------------------------------------------------------------------------------------------------

BOUND_TEXT = {
    "t5": "exact (table look-up)",
    "t5_bucket": "exact (integer)",
    "offset": "exact (table look-up)",
    "alibi_slopes": "(1.5 ulp pow) + rounding to dtype",
    "alibi": "u|b| (one product)",
    "kerple_power": "(eps_pow + u)|b|",
    "kerple_log": "(3u + eps_log1p)|b|",
    "fire": "sum|w2|(|w1 x| rho_x + u|a|) + gamma_W sum|w2 h| + u|b|",
    "sandwich": "phase error |D| w_k (rho_w + u), sin, gamma_{d/2} sum",
    "softmax": "p (zeta + rho + <zeta + rho> + gamma_d(n) + u)",
    "softmax_lse": "<zeta + rho> + gamma_d(n) + eps_log log T + u|lse|",
    "attention": "sum|dp||v| + gamma_n sum p|v|",
    "attention_lse": "as softmax lse, scores with gamma_D",
}


def _row(family: str, xp: Any, dtype: str, m: Measurement, seconds: float) -> dict[str, Any]:
    s = m.summary()
    return {
        "family": family,
        "backend": getattr(xp, "__name__", str(xp)),
        "dtype": dtype,
        "cases": s["n"],
        "max_abs_err": s["max_abs_err"],
        "max_rel_err": s["max_rel_err"],
        "bound": s["bound"],
        "ratio": s["ratio"],
        "bound_formula": BOUND_TEXT.get(family, ""),
        "excluded_out_of_range": m.excluded,
        "passed": bool(s["ratio"] <= 1.0),
        "seconds": round(seconds, 2),
    }


def _empty() -> Measurement:
    return Measurement(np.zeros(0), np.zeros(0), np.zeros(0))


def oracle_table(
    backends: Sequence[Any],
    dtypes: Sequence[str] = DTYPES,
    thorough: bool = False,
    *,
    families: Sequence[str] | None = None,
    seed: int = 20240611,
) -> list[dict[str, Any]]:
    """Measure every family, the softmax and attention against the oracle on each backend and dtype.

    Parameters
    ----------
    backends : sequence of array namespaces
        E.g. ``[array_api_compat.numpy, array_api_strict]``; bfloat16 rows are produced for NumPy only.
    dtypes : sequence of str
        Format names among ``float64``, ``float32``, ``float16``, ``bfloat16``.
    thorough : bool
        More cases (256 ALiBi heads, Sandwich at distance 1e6, softmax rows of 8192, attention with 8192 keys).
    families : sequence of str, optional
        Subset of ``FAMILIES + ("alibi_slopes", "t5_bucket", "softmax", "attention")``.

    Returns
    -------
    list of dict
        One row per (family, backend, dtype): ``family, backend, dtype, cases`` (entries compared),
        ``max_abs_err, max_rel_err``, ``bound`` (the bound at the entry closest to it), ``ratio`` (max of
        error / bound; the check passes when <= 1), ``bound_formula``, ``excluded_out_of_range`` (entries beyond the
        dtype's finite range, a documented hazard), ``passed``, ``seconds``.
    """
    names = (
        list(families)
        if families is not None
        else [
            "t5_bucket",
            *FAMILIES,
            "alibi_slopes",
            "softmax",
            "softmax_lse",
            "attention",
            "attention_lse",
        ]
    )
    rows: list[dict[str, Any]] = []
    for xp in backends:
        for dtype in dtypes:
            _check_dtype(dtype)
            if xp_dtype(xp, dtype) is None:
                continue
            done: set[str] = set()
            for name in names:
                if name in done:
                    continue
                rng = np.random.default_rng([seed, DTYPES.index(dtype), len(name)])
                t0 = time.perf_counter()
                if name == "t5_bucket":
                    if dtype != DTYPES[0]:
                        continue  # integer output: one row per backend
                    m = _empty()
                    for bidir in (True, False):
                        for nb, md in ((32, 128), (16, 128), (64, 256), (32, 256), (8, 20)):
                            thr = oracle.t5_bucket_thresholds(bidirectional=bidir, num_buckets=nb, max_distance=md)
                            offs = sorted(set(thr) | {t - 1 for t in thr if t > 0} | {md, 10**6})
                            offs = sorted(set(offs) | {-o for o in offs})
                            want = np.array(
                                [
                                    oracle.t5_bucket(o, bidirectional=bidir, num_buckets=nb, max_distance=md)
                                    for o in offs
                                ],
                                dtype=np.float64,
                            )
                            got = to_host(
                                t5_bucket(
                                    xp.asarray(offs, dtype=xp.int64),
                                    bidirectional=bidir,
                                    num_buckets=nb,
                                    max_distance=md,
                                )
                            ).astype(np.float64)
                            m = m.merge(Measurement(np.abs(got - want), np.zeros(len(offs)), want))
                    rows.append(_row(name, xp, "int64", m, time.perf_counter() - t0))
                    continue
                if name == "alibi_slopes":
                    m = _empty()
                    for h in range(1, 257 if thorough else 65):
                        exact = oracle.alibi_slopes(h, dps=30)
                        got = alibi_slopes(h, dtype=xp_dtype(xp, dtype), xp=xp)
                        bnd = alibi_slopes_bound(h, dtype)
                        m = m.merge(_measure(got, exact, lambda v, bnd=bnd: bnd, dtype))
                    rows.append(_row(name, xp, dtype, m, time.perf_counter() - t0))
                    continue
                if name in ("softmax", "softmax_lse"):
                    mp_, ml_ = _empty(), _empty()
                    for case in _softmax_cases(dtype, thorough, rng):
                        a, b = measure_softmax(case, xp, dtype)
                        mp_, ml_ = mp_.merge(a), ml_.merge(b)
                    rows.append(_row("softmax", xp, dtype, mp_, time.perf_counter() - t0))
                    rows.append(_row("softmax_lse", xp, dtype, ml_, 0.0))
                    done |= {"softmax", "softmax_lse"}
                    continue
                if name in ("attention", "attention_lse"):
                    mo, ml_ = _empty(), _empty()
                    for case in _attention_cases(dtype, thorough, rng):
                        a, b = measure_attention(case, xp, dtype)
                        mo, ml_ = mo.merge(a), ml_.merge(b)
                    rows.append(_row("attention", xp, dtype, mo, time.perf_counter() - t0))
                    rows.append(_row("attention_lse", xp, dtype, ml_, 0.0))
                    done |= {"attention", "attention_lse"}
                    continue
                m = _empty()
                for params, options, q, k in _family_cases(name, dtype, thorough, rng):
                    m = m.merge(measure_family(name, params, options, q, k, xp, dtype))
                rows.append(_row(name, xp, dtype, m, time.perf_counter() - t0))
    return rows


def format_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """Render :func:`oracle_table` rows as aligned text or a Markdown table."""
    head = ["family", "backend", "dtype", "entries", "max abs err", "max rel err", "bound there", "err/bound", "ok"]
    body = []
    for r in rows:
        body.append(
            [
                r["family"],
                r["backend"].replace("array_api_compat.", ""),
                r["dtype"],
                str(r["cases"]),
                f"{r['max_abs_err']:.3g}",
                f"{r['max_rel_err']:.3g}",
                f"{r['bound']:.3g}",
                f"{r['ratio']:.3f}",
                "yes" if r["passed"] else "NO",
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(out)
