"""Convention hypotheses that explain a failed check.

Each hypothesis is the reference recomputed under one known convention difference (offset sign, alignment, slopes,
parameter roles, table layout, scale placement, causal off-by-one, kv-head mapping, ...). When the candidate matches a
hypothesis within the same tolerance it failed the reference by, the report names that convention. The hypotheses are
computed from the reference family's parameters, never from the candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .._host import abs_errors, round_to
from ..families import (
    FIRE,
    ALiBi,
    BiasFamily,
    KerpleLog,
    KerplePower,
    Sandwich,
    T5Bias,
    alibi_slopes,
    t5_bucket,
    t5_bucket_thresholds,
)
from ..positions import relative_offsets
from .tolerance import attention_tolerance

__all__: list[str] = []

#: The lower precisions a candidate may compute in while it returns the suite's dtype, the tightest first.
LOWER: dict[str, tuple[str, ...]] = {"float64": ("float32",), "float32": ("float16", "bfloat16")}


def precision_text(lower: str, dtype: str) -> str:
    """The precision hypothesis: the candidate agrees with the reference to ``lower`` precision, not ``dtype``'s."""
    return (
        f"agrees to {lower} precision: the candidate computes in a lower precision than it returns ({lower} "
        f"arithmetic, {dtype} out: a float32 softmax for float64 inputs as in BLOOM and x-transformers' Attend, or "
        "JAX without jax_enable_x64)"
    )


def precision_fit(
    dtype: str, ref: np.ndarray, cand: np.ndarray, sel: np.ndarray, plain: Callable[[str], np.ndarray]
) -> str | None:
    """The precision hypothesis for attention: ``cand`` meets the attention rule of a lower dtype, whose plain
    computation from the inputs rounded to it is ``plain(lower)``, and its error is of that size (at least a tenth of
    the plain one: a candidate merely a little beyond its own dtype's bound does not compute in a lower one)."""
    mine = float(np.max(abs_errors(cand, ref)[sel], initial=0.0))
    for lower in LOWER.get(dtype, ()):
        err = float(np.max(abs_errors(plain(lower), ref)[sel], initial=0.0))
        mag = max(1.0, float(np.max(np.abs(ref[sel & np.isfinite(ref)]), initial=0.0)))
        if 0.1 * err <= mine <= attention_tolerance(lower, err, mag).atol:
            return precision_text(lower, dtype)
    return None


def logit_growth(alt_lse: np.ndarray, ref_lse: np.ndarray) -> float:
    """How much larger the logits of a hypothesis are than the reference's, by their lse (at least 1): a candidate
    that computes larger logits rounds them proportionally more, so its bound grows by this factor."""
    fin = np.isfinite(alt_lse) & np.isfinite(ref_lse)
    big = float(np.max(np.abs(alt_lse[fin]), initial=0.0))
    return max(1.0, big / max(1.0, float(np.max(np.abs(ref_lse[fin]), initial=0.0))))


def alignment_text(fits: bool, align: str, m: int, worst: float) -> str:
    """alignment_consistency's diagnosis: the other alignment, only when it ``fits`` the rows of the ``m`` queries."""
    other = "top-left" if align == "bottom_right" else "bottom-right"
    if fits:
        return (
            f"rows move when Sq changes: the candidate places queries {other} rather than {align.replace('_', '-')} "
            f"(its {m}-query call matches the reference aligned {other})"
        )
    return (
        f"the rows depend on how many queries are given ({worst:.3g} apart), and neither alignment explains them: "
        f"e.g. query tiles that lose their offset, or another kernel path for {m} rows"
    )


def one_of(labels: list[str]) -> str:
    """One explanation, or several that one query cannot tell apart, listed without picking one."""
    if len(labels) == 1:
        return labels[0]
    return (
        f"with one query these {len(labels)} explanations give the same result (a case with more queries tells them "
        "apart): " + "; ".join(labels)
    )


BiasFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _np(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def bf16(x: Any) -> np.ndarray:
    return round_to(x, "bfloat16")


def _abs_delta(q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(relative_offsets(q_pos, k_pos))).astype(np.float64)


AddFn = Callable[[str, Callable[[], np.ndarray]], None]


def bias_hypotheses(
    ref: BiasFamily, q_pos: np.ndarray, k_pos: np.ndarray, *, positions: bool = True, keep: np.ndarray | None = None
) -> list[tuple[str, np.ndarray]]:
    """(explanation, alternative (H, Sq, Sk) float64 bias) for a NumPy float64 family at these positions.

    ``positions=False`` leaves out the hypotheses about query positions (alignment), which attention checks test
    with the mask as well. Two conventions that agree on the entries ``keep`` selects (a causal mask) are one
    explanation with both names; one that agrees with the reference there is none.
    """
    out: list[tuple[str, np.ndarray]] = []
    h = ref.num_heads
    sq, sk = len(q_pos), len(k_pos)
    kind = type(ref).name
    base = _np(ref.bias(q_pos, k_pos)) if kind != "tensor" else None

    def kept(arr: np.ndarray) -> np.ndarray:
        return arr if keep is None else np.where(keep, arr, 0.0)

    def add(label: str, fn: Callable[[], np.ndarray]) -> None:
        try:
            arr = _np(fn())
        except (ValueError, TypeError, ZeroDivisionError, FloatingPointError):
            return
        if arr.shape != (h, sq, sk) or (base is not None and np.array_equal(kept(arr), kept(base))):
            return
        for n, (other, alt) in enumerate(out):
            if np.array_equal(kept(alt), kept(arr)):
                out[n] = (f"{other} (identical here: {label})", alt)
                return
        out.append((label, arr))

    if kind == "tensor":
        arr = _np(ref.bias(q_pos, k_pos))
        add("bias negated (sign of the whole bias flipped)", lambda: -arr)
        if h > 1:
            add("head order reversed", lambda: arr[::-1])
        return out

    assert base is not None
    # -- positions ------------------------------------------------------------------------------------------
    top_left = k_pos[0] + np.arange(sq, dtype=np.int64)
    bottom_right = k_pos[-1] - (sq - 1) + np.arange(sq, dtype=np.int64)
    if positions and not np.array_equal(top_left, q_pos):
        add(
            "query positions taken as row indices 0..Sq-1 (top-left alignment; the absolute query positions "
            f"{_span(q_pos)} were ignored)",
            lambda: ref.bias(top_left, k_pos),
        )
    if positions and not np.array_equal(bottom_right, q_pos):
        add(
            "query positions taken as the last Sq key positions (bottom-right alignment; the absolute query "
            f"positions {_span(q_pos)} were ignored)",
            lambda: ref.bias(bottom_right, k_pos),
        )
    for fmt, exact in (("bfloat16", 256), ("float16", 2048)):
        add(
            f"positions rounded to {fmt} before the offset is taken (integers exact only up to {exact}, so "
            "neighbouring keys share a bias; vLLM's make_alibi_bias builds arange(S, dtype=the model dtype))",
            lambda f=fmt: ref.bias(*(round_to(p, f).astype(np.int64) for p in (q_pos, k_pos))),
        )
    if q_pos[0] > k_pos[0]:
        below = (k_pos[None, :] - k_pos[0]) <= np.arange(sq)[:, None]  # a top-left tril of the (Sq, Sk) block
        at_zero = _np(ref.bias(q_pos[:1], q_pos[:1]))[:, :, :1]
        add(
            "a top-left tril applied to the bottom-right block (NeMo's causal KERPLE and Sandwich): keys after the "
            "query's row index get the bias of distance 0, wrong under a KV cache",
            lambda: np.where(below[None], base, at_zero),
        )
    # -- signs ----------------------------------------------------------------------------------------------
    if ref.offset_only:  # b(k, q) transposed is b(j - i) only for a function of i - j (not FIRE)
        add(
            "offset sign flipped: the bias of j - i was used for i - j (T5 code's memory - query vs query - key)",
            lambda: np.transpose(_np(ref.bias(k_pos, q_pos)), (0, 2, 1)),
        )
    add(
        "bias negated: a penalty became a bonus (e.g. the signed ALiBi form +m*(i - j), whose offset sign is "
        "flipped, as in the FlexAttention blog's score_mod)",
        lambda: -base,
    )
    add(
        "the bias ignores the query position (every query taken at position 0: a bias of the key alone, or a KV "
        "cache's query offset left at 0)",
        lambda: ref.bias(np.zeros_like(q_pos), k_pos),
    )
    add(
        "the bias added twice (doubled: transformers' Falcon eager path adds ALiBi in the mask and again in the layer)",
        lambda: 2.0 * base,
    )
    add("the bias rounded to bfloat16 (built or stored in bfloat16, as transformers' Falcon does)", lambda: bf16(base))
    if h > 1:
        add("head order reversed (head h got the parameters of head H-1-h)", lambda: base[::-1])
    # -- family-specific (the offset family has none: the offset-sign hypothesis above is the reversed table) ----
    family_specific = _FAMILY_HYPOTHESES.get(kind)
    if family_specific is not None:
        family_specific(ref, q_pos, k_pos, add)
    return out


def _alibi_hypotheses(ref: ALiBi, q_pos: np.ndarray, k_pos: np.ndarray, add: AddFn) -> None:
    h = ref.num_heads
    slopes = _np(ref.parameters()["slopes"])
    dist = _abs_delta(q_pos, k_pos)

    def with_slopes(m: np.ndarray) -> Callable[[], np.ndarray]:
        return lambda: -(m[:, None, None] * dist[None])

    closed = 2.0 ** (-8.0 * np.arange(1, h + 1) / h)
    add(
        f"slopes of the closed form 2^(-8h/H) for all {h} heads instead of the official rule for a "
        "non-power-of-two head count (interleaved extra slopes; Press et al. get_slopes, BLOOM, MPT)",
        with_slopes(closed),
    )
    add(
        "slopes off by one head: 2^(-8h/H) with h = 0..H-1 (first slope 1.0) instead of h = 1..H",
        with_slopes(2.0 ** (-8.0 * np.arange(0, h) / h)),
    )
    if np.allclose(slopes, _np(alibi_slopes(h)), rtol=0, atol=0):
        add(
            "slopes sorted in decreasing order instead of the official interleaved order",
            with_slopes(np.sort(slopes)[::-1]),
        )
    add(
        f"slopes of the 8-head rule 2^-h for all {h} heads (FlashAttention-4's score_mod_alibi) instead of the rule "
        f"for {h} heads",
        with_slopes(2.0 ** -np.arange(1.0, h + 1)),
    )
    for n in sorted({h // 2, h // 4} - {0}):
        add(
            f"ALiBi on the first {n} of {h} heads only: the slopes for {n} heads there, slope 0 on the other {h - n} "
            "(x-transformers' alibi_num_heads, NeMo's num_attention_heads_alibi)",
            with_slopes(np.concatenate([_np(alibi_slopes(n)), np.zeros(h - n)])),
        )

    key_only = slopes[:, None] * k_pos[None, :].astype(np.float64)
    key_only_bf16 = bf16(bf16(slopes)[:, None] * bf16(k_pos)[None, :])
    # Only where bfloat16 changes it: an exact bfloat16 m*j (powers-of-two slopes, short positions) is the plain
    # key-only form, which the structural per-row-constant and causal-only diagnoses name without the Falcon claim.
    if not np.array_equal(key_only, key_only_bf16):
        add(
            "the key-only form m*j (BLOOM, MPT, Falcon; -m|i - j| up to a per-row constant under a causal mask only), "
            "computed in bfloat16 as transformers' Falcon does (bfloat16 slopes times positions)",
            lambda: np.broadcast_to(key_only_bf16[:, None, :], (h, *dist.shape)),
        )


def _kerple_hypotheses(ref: KerplePower | KerpleLog, q_pos: np.ndarray, k_pos: np.ndarray, add: AddFn) -> None:
    """The two KERPLE kernels' parameters swapped (r1 takes r2's role in the kernel, r2 the multiplier's)."""
    p = ref.parameters()
    r1, r2 = _np(p["r1"])[:, None, None], _np(p["r2"])[:, None, None]
    dist = _abs_delta(q_pos, k_pos)[None]
    if isinstance(ref, KerplePower):
        add(
            "KERPLE parameters swapped: r1 used as the exponent and r2 as the multiplier (the official code names "
            "them bias_a/bias_p with roles that differ between the power and log classes)",
            lambda: -(r2 * dist**r1),
        )
    else:
        add(
            "KERPLE parameters swapped: r1 used as the rate inside log1p and r2 as the multiplier (the official "
            "code names them bias_p/bias_a with roles that differ between the log and power classes)",
            lambda: -(r2 * np.log1p(r1 * dist)),
        )


def _t5_hypotheses(ref: T5Bias, q_pos: np.ndarray, k_pos: np.ndarray, add: AddFn) -> None:
    h = ref.num_heads
    table = _np(ref.parameters()["table"])
    opts = ref.options()
    nb = table.shape[1]
    if table.shape[0] == nb:
        add(
            "T5 table layout transposed: the (heads, buckets) table was read as (buckets, heads)",
            lambda: T5Bias(table.T, **opts).bias(q_pos, k_pos),
        )
    else:
        add(
            "T5 table layout transposed: the (heads, buckets) buffer was read as (buckets, heads)",
            lambda: T5Bias(np.reshape(table, (nb, h)).T, **opts).bias(q_pos, k_pos),
        )
    add(
        f"T5 mode swapped: bidirectional={not opts['bidirectional']} buckets instead of "
        f"bidirectional={opts['bidirectional']}",
        lambda: T5Bias(table, **{**opts, "bidirectional": not opts["bidirectional"]}).bias(q_pos, k_pos),
    )


def _fire_hypotheses(ref: FIRE, q_pos: np.ndarray, k_pos: np.ndarray, add: AddFn) -> None:
    add(
        "FIRE normaliser uses the row index 0..Sq-1 instead of the absolute query position (wrong under a KV "
        "cache or chunked prefill)",
        lambda: _fire(ref, q_pos, k_pos, norm_pos=np.arange(len(q_pos), dtype=np.float64)),
    )
    add(
        "FIRE without the abs: keys after the query get psi of a negative offset",
        lambda: _fire(ref, q_pos, k_pos, signed=True),
    )


def _sandwich_hypotheses(ref: Sandwich, q_pos: np.ndarray, k_pos: np.ndarray, add: AddFn) -> None:
    d = ref.options()["head_dim"]
    add(
        "Sandwich frequencies 10000^(-2(k-1)/d), k = 1..d/2 (sinusoidal-embedding indexing) instead of 10000^(-2k/d)",
        lambda: _sandwich(ref.num_heads, d, q_pos, k_pos, shift=1),
    )


#: Family-specific hypotheses by registry name (``type(ref).name``), each appending through ``add``.
_FAMILY_HYPOTHESES: dict[str, Callable[[Any, np.ndarray, np.ndarray, AddFn], None]] = {
    "alibi": _alibi_hypotheses,
    "kerple_power": _kerple_hypotheses,
    "kerple_log": _kerple_hypotheses,
    "t5": _t5_hypotheses,
    "fire": _fire_hypotheses,
    "sandwich": _sandwich_hypotheses,
}


def _span(pos: np.ndarray) -> str:
    return f"{int(pos[0])}..{int(pos[-1])}" if len(pos) > 1 else f"{int(pos[0])}"


def _fire(
    ref: FIRE, q_pos: np.ndarray, k_pos: np.ndarray, *, norm_pos: np.ndarray | None = None, signed: bool = False
) -> np.ndarray:
    p = {k: _np(v) for k, v in ref.parameters().items()}
    eps = ref.options()["eps"]
    delta = np.asarray(relative_offsets(q_pos, k_pos)).astype(np.float64)
    dist = delta if signed else np.abs(delta)
    qn = np.asarray(q_pos, dtype=np.float64) if norm_pos is None else norm_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.log1p(p["c"] * dist) / (np.log1p(p["c"] * np.maximum(qn, p["L"])) + eps)[:, None]
    hidden = np.maximum(p["w1"][:, 0][:, None, None] * x[None] + p["b1"][:, None, None], 0.0)
    return np.einsum("hw,wij->hij", p["w2"], hidden) + p["b2"][:, None, None]


def _sandwich(h: int, d: int, q_pos: np.ndarray, k_pos: np.ndarray, *, shift: int) -> np.ndarray:
    dist = _abs_delta(q_pos, k_pos)
    omega = 10000.0 ** (-2.0 * (np.arange(1, d // 2 + 1) - shift) / d)
    num = np.sum(np.cos(dist[None] * omega[:, None, None]), axis=0) - d / 2
    div = 8.0 * np.arange(1, h + 1) / h
    return num[None] / div[:, None, None]


def t5_value_buckets(
    ref: T5Bias, cand: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray, bad: np.ndarray, atol: float
) -> str | None:
    """Explain T5 mismatches as wrong bucket indices when the table makes the candidate's values identifiable."""
    table = _np(ref.parameters()["table"])
    opts = ref.options()
    delta = np.asarray(relative_offsets(q_pos, k_pos))
    ref_b = np.asarray(
        t5_bucket(
            delta, bidirectional=opts["bidirectional"], num_buckets=table.shape[1], max_distance=opts["max_distance"]
        )
    )
    pairs: dict[tuple[int, int, int], int] = {}
    for hh, i, j in zip(*np.nonzero(bad)):
        dist = np.abs(table[hh] - cand[hh, i, j])
        cands = np.flatnonzero(dist <= atol)
        if len(cands) != 1:
            return None
        pairs[(int(delta[i, j]), int(ref_b[i, j]), int(cands[0]))] = 1
    if not pairs:
        return None
    return bucket_pairs_text(sorted(pairs), opts["bidirectional"], table.shape[1], opts["max_distance"])


def bucket_pairs_text(
    pairs: list[tuple[int, int, int]], bidirectional: bool, num_buckets: int, max_distance: int
) -> str:
    """Describe (delta, reference bucket, candidate bucket) triples; name an off-by-one at a boundary."""
    thr = t5_bucket_thresholds(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    half = num_buckets // 2 if bidirectional else num_buckets
    starts = set(thr)
    off_by_one = all(abs(c - r) == 1 for _, r, c in pairs)
    at_boundary = all(
        (abs(d) if bidirectional else max(d, 0)) in starts or (abs(d) if bidirectional else max(d, 0)) + 1 in starts
        for d, _, _ in pairs
    )
    shown = ", ".join(f"delta {d}: bucket {c} instead of {r}" for d, r, c in pairs[:6])
    more = f" (+{len(pairs) - 6} more)" if len(pairs) > 6 else ""
    if off_by_one and at_boundary:
        firsts = sorted({(r % half if bidirectional else r) for _, r, _ in pairs})
        where = ", ".join(f"bucket {b} starts at |delta| = {thr[b]}" for b in firsts[:4] if b < len(thr))
        return f"T5 bucket off by one at a boundary: {shown}{more}; exact thresholds: {where}"
    return f"candidate's values are other buckets' table entries: {shown}{more}"


def row_shift_text(shift: np.ndarray, q_pos: np.ndarray, ref: BiasFamily | None, atol: float = 1e-9) -> str:
    """Describe a per-(head, row) shift; recognise the key-only ALiBi form (shift = m_h * q_pos + c_h).

    The shift counts as affine in the query position when a straight-line fit per head is within ``atol``.
    """
    finite = np.isfinite(shift)
    if not finite.any():
        return "no comparable entries"
    lo, hi = float(np.min(shift[finite])), float(np.max(shift[finite]))
    text = f"per-row shift between {lo:.6g} and {hi:.6g}"
    # Only describe the shape of the shift when the tolerance is fine enough to see it (not for bfloat16 values).
    if len(q_pos) >= 2 and finite.all() and atol <= 1e-3 * max(1.0, abs(lo), abs(hi)):
        qp = np.asarray(q_pos, dtype=np.float64)
        a = np.empty(shift.shape[0])
        affine = True
        for hh in range(shift.shape[0]):
            a[hh], c = np.polyfit(qp, shift[hh], 1)
            affine &= bool(np.max(np.abs(a[hh] * qp + c - shift[hh])) <= max(atol, 1e-12))
        if affine:
            alibi = getattr(type(ref), "name", None) == "alibi"  # ref may be None
            if alibi and np.allclose(a, _np(ref.parameters()["slopes"]), rtol=1e-3, atol=0):
                text += (
                    "; shift = m_h * q_pos + c_h with m_h the ALiBi slopes: the key-only form m_h * (j + const) of "
                    "the official code, BLOOM, MPT and FlashAttention's causal path, whose lse moves by the shift"
                )
            else:
                shown = ", ".join(f"{x:.6g}" for x in a[:4]) + (", ..." if len(a) > 4 else "")
                text += f"; affine in the query position: shift = a_h * q_pos + c_h with a = [{shown}]"
    return text


def scale_factor_text(cand: np.ndarray, ref: np.ndarray, keep: np.ndarray, atol: float) -> str | None:
    """When cand = c * ref for one constant c != 1 (within atol), say so: a bias meant for the other placement."""
    kk = np.broadcast_to(keep, cand.shape) & np.isfinite(ref) & np.isfinite(cand)
    r = ref[kk]
    c = cand[kk]
    denom = float(np.dot(r, r))
    if denom == 0.0:
        return None
    factor = float(np.dot(r, c)) / denom
    if not math.isfinite(factor) or abs(factor - 1.0) < 1e-9 or factor == 0.0:
        return None
    if np.max(np.abs(c - factor * r)) > atol * max(1.0, abs(factor)):
        return None
    sq = factor * factor
    hint = ""
    if abs(sq - round(sq)) < 1e-6 * sq and round(sq) > 1:
        hint = f" = sqrt({round(sq)})"
    elif sq < 1 and abs(1 / sq - round(1 / sq)) < 1e-6 / sq:
        hint = f" = 1/sqrt({round(1 / sq)})"
    return (
        f"candidate = {factor:.6g}{hint} x reference: a constant factor, e.g. a bias scaled for the other side of "
        "the 1/sqrt(d) scale (pre_scale vs post_scale, or gpt-neox's sqrt(d)-scaled T5 table)"
    )


def alibi_slopes_text(
    ref: ALiBi, cand: np.ndarray, keep: np.ndarray, dist: np.ndarray, bound: np.ndarray
) -> str | None:
    """When cand = -m'_h |i - j| within ``bound`` for slopes m' (least squares per head) other than the reference's,
    name the heads whose slope differs."""
    sel = np.broadcast_to(keep, cand.shape) & np.isfinite(cand)
    d = np.where(sel, np.broadcast_to(dist, cand.shape), 0.0)
    den = np.sum(d * d, axis=(1, 2))
    if not np.all(den > 0):
        return None
    fit = -np.sum(np.where(sel, cand, 0.0) * d, axis=(1, 2)) / den
    if np.any(np.where(sel, np.abs(cand + fit[:, None, None] * d), 0.0) > bound):
        return None
    slopes = _np(ref.parameters()["slopes"])
    wrong = [h for h in range(len(fit)) if abs(fit[h] - slopes[h]) > 1e-3 * slopes[h]]
    if not wrong:
        return None
    shown = ", ".join(f"head {h}: {fit[h]:.6g} instead of {slopes[h]:.6g}" for h in wrong[:6])
    more = f" (+{len(wrong) - 6} more)" if len(wrong) > 6 else ""
    return f"an ALiBi bias -m_h |i - j| with other slopes: {shown}{more}"


#: What a report says when :func:`fit` left hypotheses untried.
UNTRIED = "the other convention hypotheses were not tried: they explained none of two earlier failing cases"


def fit(
    memo: dict[str, Any],
    case: str,
    hyps: list[tuple[str, Callable[..., Any]]],
    fits: Callable[[Any], bool],
    *,
    one: bool,
    quick: Callable[[Callable[..., Any]], bool] | None = None,
) -> tuple[list[str], bool]:
    """The hypotheses (label, computation) whose result ``fits``, in order: the first, or with ``one`` query every
    one (conventions that one query cannot tell apart); and whether every hypothesis was tried.

    ``memo`` (a suite's) keeps the results of the current case (for its output and lse checks) and the labels that
    fitted earlier cases. Each computation is a float64 attention of the case, so once two cases found none, later
    cases of more than one query try only the earlier fits. ``quick(computation)`` (cheap: a few rows) rules a
    hypothesis out before it is computed in full.
    """
    if memo.get("case") != case:
        memo.update(case=case, alts={})
    hits, alts, fns = memo.setdefault("hits", []), memo["alts"], dict(hyps)
    order = list(fns) if one or memo.get("misses", 0) < 2 else [h for h in fns if h in hits]
    matched = []
    for label in order:
        if label not in alts:
            try:
                alts[label] = fns[label]() if quick is None or quick(fns[label]) else None
            except (ValueError, TypeError):
                alts[label] = None
        if alts[label] is not None and fits(alts[label]):
            matched.append(label)
            if not one:
                break
    hits += [h for h in matched if h not in hits]
    memo["misses"] = memo.get("misses", 0) + (not matched)
    return matched, len(order) == len(fns)


# ------------------------------------------------------------------------------------------------------------------
# Kernel features: window, softcap, lengths, segments, paged caches
# ------------------------------------------------------------------------------------------------------------------


def keep_mask(
    q_pos: np.ndarray, k_pos: np.ndarray, causal: bool, window: tuple[int | None, int | None] | None
) -> np.ndarray | None:
    """The keys each query may attend by ``causal`` and ``window`` at these positions ((Sq,) and (Sk,), or (B, Sq)
    and (B, Sk) for (B, Sq, Sk)); None when neither applies."""
    left, right = window if window is not None else (None, None)
    if not causal and left is None and right is None:
        return None
    delta = np.asarray(q_pos, dtype=np.int64)[..., :, None] - np.asarray(k_pos, dtype=np.int64)[..., None, :]
    keep = np.ones(delta.shape, dtype=bool)
    if causal:
        keep &= delta >= 0
    if left is not None:
        keep &= delta <= left
    if right is not None:
        keep &= delta >= -right
    return keep


def family_bias(fam: BiasFamily, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
    """The family's float64 bias at per-row positions (B|1, Sq) and (B|1, Sk): (B|1, H, Sq, Sk)."""
    nb = max(q_pos.shape[0], k_pos.shape[0])
    rows = [_np(fam.bias(q_pos[min(b, len(q_pos) - 1)], k_pos[min(b, len(k_pos) - 1)])) for b in range(nb)]
    return np.stack(rows)


def softcap_after_bias(
    q: np.ndarray, k: np.ndarray, bias: np.ndarray, *, scale: float, softcap: float, placement: str
) -> np.ndarray:
    """The array bias that turns the reference's c tanh(s / c) + b into c tanh((s + b) / c) (the cap applied after
    the bias; ``pre_scale``: c tanh(tau (q.k + b) / c), the array then scaled by tau as the reference scales it)."""
    group = q.shape[1] // k.shape[1]
    s = scale * np.einsum("bhid,bhjd->bhij", q, np.repeat(k, group, axis=1))
    tb = bias if placement == "post_scale" else scale * bias
    with np.errstate(invalid="ignore"):
        arr = softcap * np.tanh((s + tb) / softcap) - softcap * np.tanh(s / softcap)
    arr = np.where(np.isneginf(bias), -np.inf, arr)
    return arr if placement == "post_scale" else arr / scale


def feature_hypotheses(suite: Any, case: Any, e: dict[str, Any]) -> list[tuple[str, Callable[..., Any]]]:
    """The hypotheses about the kernel features of ``suite`` (an attention suite) on ``case`` (evaluation ``e``),
    the most specific first: the window off by one on either side or measured from the other alignment, the
    softcap after the bias or ignored, padding keys attended or lengths ignored, segment positions restarted or not,
    then the suite's own (a paged cache's block table and lengths). Each is the reference with other options, on
    the whole case (a few rows cannot express a per-row length)."""
    hyps: list[tuple[str, Callable[..., Any]]] = []
    inputs = e["inputs"]

    def whole(label: str, fn: Callable[[], Any]) -> None:
        hyps.append((label, lambda rows=slice(None): fn() if rows == slice(None) else None))

    def ref(**over: Any) -> Any:
        return suite.reference(case, inputs, **over)

    if suite.window is not None:
        w = suite.window
        for n, side in enumerate(("left", "right")):
            if w[n] is None:
                continue
            for d in (1, -1):
                if w[n] + d < 0:
                    continue
                alt = (w[0] + d, w[1]) if n == 0 else (w[0], w[1] + d)
                how = "one key more" if d > 0 else "one key fewer (a strict < where <= was meant)"
                whole(f"window off by one on the {side}: {alt} instead of {w}, {how}", lambda a=alt: ref(window=a))
        qp, kp = suite.row_positions(case, e)
        other = "top_left" if suite.align == "bottom_right" else "bottom_right"
        sq, sk = qp.shape[-1], kp.shape[-1]
        lq, lk = suite.row_lengths(case, sq, sk)
        moved = np.arange(sq)[None, :] + (lk - lq)[:, None] if other == "bottom_right" else np.arange(sq)[None, :]
        if not np.array_equal(np.broadcast_to(moved, (len(lq), sq)), np.broadcast_to(qp, (len(lq), sq))):
            keep = keep_mask(moved, kp, False, w)
            assert keep is not None
            whole(
                f"window aligned {other.replace('_', '-')}: the window measured from query i at position "
                f"{'i' if other == 'top_left' else 'i + Sk - Sq'} while the bias and the causal mask are "
                f"{suite.align.replace('_', '-')}",
                lambda: ref(window=None, mask=keep[:, None]),
            )
    if suite.softcap is not None:
        if suite.bias64 is not None:
            qp, kp = suite.row_positions(case, e)

            def after() -> Any:
                q, k = (a.astype(np.float64) for a in inputs[:2])
                b = family_bias(suite.bias64, qp, kp)
                sc = suite.scale_of(case.shape)
                arr = softcap_after_bias(q, k, b, scale=sc, softcap=suite.softcap, placement=suite.placement)
                return ref(bias=arr)

            whole("softcap applied after the bias: c tanh((s + b) / c) instead of c tanh(s / c) + b", after)
        whole(
            f"softcap ignored: no c tanh(s / c) cap (softcap={suite.softcap:g} not applied)", lambda: ref(softcap=None)
        )
    feats = suite.case_features(case)
    if "k_lens" in feats:
        qp, _ = suite.row_positions(case, e)
        whole(
            "padding keys attended: keys past k_lens are not masked (the query positions still follow the lengths)",
            lambda: ref(k_lens=None, q_pos=np.broadcast_to(qp, (case.shape.batch, qp.shape[-1]))),
        )
        whole(
            "k_lens ignored: every row attends all Sk keys, its queries aligned to the padded Sk",
            lambda: ref(k_lens=None),
        )
        if "q_lens" in feats:
            whole(
                "lengths ignored: the padded batch computed as if every row were full",
                lambda: ref(k_lens=None, q_lens=None),
            )
    if "q_segment_ids" in feats:
        meant = suite.options.segment_positions
        other = "restart" if meant == "global" else "global"
        whole(
            f"positions {'restarted per segment' if other == 'restart' else 'kept global'} (segment_positions="
            f"{other!r}) where {meant!r} was meant",
            lambda: ref(segment_positions=other),
        )
        whole(
            "segment ids ignored: packed sequences attend across their boundaries",
            lambda: ref(q_segment_ids=None, k_segment_ids=None, segment_positions="global"),
        )
    hyps += suite.extra_hypotheses(case, e)
    return hyps
