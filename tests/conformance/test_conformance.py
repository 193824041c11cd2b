"""Meta-tests of the conformance harness (relpos_ref.conformance).

The harness is run on deliberately wrong implementations ("mutants"), which it must reject with the right diagnosis,
and on independent correct re-implementations, which it must accept. Candidates are written here against the array
API on the backend under test (the ``xp`` fixture): they never call the relpos_ref family they are checked against,
and no expected value is taken from a candidate.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.conformance import (
    AttentionShape,
    ConformanceError,
    Report,
    attention_checks,
    attention_inputs,
    bias_checks,
    check_attention,
    check_bias,
    check_buckets,
    parametrize_with_checks,
    run_checks,
)
from relpos_ref.conformance.tolerance import plain_attention

# These tests pin what each check and diagnosis does, on the small "quick" case set; the kernel-scale defaults
# are pinned by tests/conformance/test_kernel_mutants.py and test_attention.py.
check_attention = functools.partial(check_attention, level="quick")
attention_checks = functools.partial(attention_checks, level="quick")

pytestmark = pytest.mark.conformance

# -- independent re-implementations (array API, from the parameters) ---------------------------------------------


def official_slopes(n: int) -> list[float]:
    """Press et al.'s get_slopes, written from its description (products of floats, recursive extras)."""

    def pow2(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return pow2(n)
    c = 2 ** math.floor(math.log2(n))
    return pow2(c) + official_slopes(2 * c)[0::2][: n - c]


def _delta(xp, q_pos, k_pos):
    q = xp.asarray(q_pos, dtype=xp.int64)
    k = xp.asarray(k_pos, dtype=xp.int64)
    return q[:, None] - k[None, :]


def alibi_candidate(xp, slopes, *, dtype="float64", form="relative", q_override=None):
    """ALiBi on backend xp. form: relative -m|i-j|, key_only +m*j, signed_flipped +m*(i-j)."""
    m = xp.asarray(slopes, dtype=getattr(xp, dtype))

    def candidate(q_pos, k_pos):
        q = q_pos if q_override is None else q_override(q_pos, k_pos)
        d = _delta(xp, q, k_pos)
        if form == "relative":
            dist = xp.astype(xp.abs(d), m.dtype)
            return -(m[:, None, None] * dist[None, ...])
        if form == "key_only":
            k = xp.astype(xp.asarray(k_pos, dtype=xp.int64), m.dtype)
            return xp.broadcast_to(m[:, None, None] * k[None, None, :], (m.shape[0], d.shape[0], d.shape[1]))
        if form == "key_only_plus":  # changes probabilities: an extra column-dependent term
            k = xp.astype(xp.asarray(k_pos, dtype=xp.int64), m.dtype)
            row = m[:, None, None] * k[None, None, :] + 0.01 * k[None, None, :]
            return xp.broadcast_to(row, (m.shape[0], d.shape[0], d.shape[1]))
        if form == "signed_flipped":  # the FlexAttention blog's score_mod: +m * (q_idx - kv_idx)
            return m[:, None, None] * xp.astype(d, m.dtype)[None, ...]
        raise AssertionError(form)

    return candidate


def hf_style_bucket(xp, delta, *, bidirectional, num_buckets=32, max_distance=128, boundary_bug=False):
    """T5 buckets the way HF computes them (float32 log, truncation), on backend xp; delta = query - key."""
    rel = -delta  # HF's memory - query
    nb = num_buckets
    out = xp.zeros(rel.shape, dtype=xp.int64)
    if bidirectional:
        nb //= 2
        out = out + xp.astype(rel > 0, xp.int64) * nb
        n = xp.abs(rel)
    else:
        n = -xp.minimum(rel, xp.zeros_like(rel))
    exact = nb // 2
    small = n < exact
    nf = xp.astype(xp.maximum(n, xp.ones_like(n)), xp.float32)
    large = xp.log(nf / exact) / math.log(max_distance / exact) * (nb - exact)
    if boundary_bug:  # one-ulp-low logarithm: offsets on an exact boundary (16, 32, 64) drop a bucket
        large = large - 1e-4
    large = exact + xp.astype(large, xp.int64)
    large = xp.minimum(large, xp.full_like(large, nb - 1))
    return out + xp.where(small, n, large)


def t5_candidate(xp, table_hb, *, bidirectional, max_distance=128, flip=False, boundary_bug=False, transpose=False):
    table = xp.asarray(table_hb)
    if transpose:  # reads the (H, B) buffer as (B, H)
        h, b = table_hb.shape
        table = xp.asarray(np.reshape(table_hb, (b, h)).T.copy())
    nb = table.shape[1]

    def candidate(q_pos, k_pos):
        d = _delta(xp, q_pos, k_pos)
        b = hf_style_bucket(
            xp,
            -d if flip else d,
            bidirectional=bidirectional,
            num_buckets=nb,
            max_distance=max_distance,
            boundary_bug=boundary_bug,
        )
        picked = xp.take(table, xp.reshape(b, (-1,)), axis=1)
        return xp.reshape(picked, (table.shape[0], d.shape[0], d.shape[1]))

    return candidate


def kerple_candidate(xp, r1, r2, *, kind, swap=False):
    a, p = (xp.asarray(r2), xp.asarray(r1)) if swap else (xp.asarray(r1), xp.asarray(r2))

    def candidate(q_pos, k_pos):
        dist = xp.astype(xp.abs(_delta(xp, q_pos, k_pos)), a.dtype)[None, ...]
        if kind == "power":
            return -(a[:, None, None] * dist ** p[:, None, None])
        return -(a[:, None, None] * xp.log(1.0 + p[:, None, None] * dist))

    return candidate


def fire_candidate(xp, w1, b1, w2, b2, c, L, *, row_index=False):
    w1x, b1x, w2x, b2x = (xp.asarray(a) for a in (w1, b1, w2, b2))

    def candidate(q_pos, k_pos):
        d = xp.astype(xp.abs(_delta(xp, q_pos, k_pos)), xp.float64)
        qn = xp.arange(len(q_pos), dtype=xp.float64) if row_index else xp.asarray(q_pos, dtype=xp.float64)
        x = xp.log(1.0 + c * d) / xp.log(1.0 + c * xp.maximum(qn, xp.full_like(qn, L)))[:, None]
        hidden = xp.maximum(w1x[:, 0][:, None, None] * x[None, ...] + b1x[:, None, None], 0.0)  # (W, Sq, Sk)
        flat = xp.reshape(hidden, (hidden.shape[0], -1))
        out = xp.reshape(w2x @ flat, (w2x.shape[0], x.shape[0], x.shape[1]))
        return out + b2x[:, None, None]

    return candidate


def sandwich_candidate(xp, h, d):
    def candidate(q_pos, k_pos):
        dist = xp.astype(xp.abs(_delta(xp, q_pos, k_pos)), xp.float64)
        total = xp.zeros(dist.shape, dtype=xp.float64)
        for kk in range(1, d // 2 + 1):
            total = total + xp.cos(dist * 10000.0 ** (-2.0 * kk / d))
        num = total - d / 2
        div = xp.asarray([8.0 * hh / h for hh in range(1, h + 1)], dtype=xp.float64)
        return num[None, ...] / div[:, None, None]

    return candidate


def offset_candidate(xp, table, *, reverse=False):
    t = xp.asarray(table[:, ::-1].copy() if reverse else table)
    k = (table.shape[1] - 1) // 2

    def candidate(q_pos, k_pos):
        d = _delta(xp, q_pos, k_pos)
        idx = xp.clip(d, min=-k, max=k) + k
        picked = xp.take(t, xp.reshape(idx, (-1,)), axis=1)
        return xp.reshape(picked, (t.shape[0], d.shape[0], d.shape[1]))

    return candidate


def attention_candidate(
    xp,
    *,
    slopes=None,
    causal=False,
    align="bottom_right",
    placement="post_scale",
    scale=None,
    fully_masked="zero",
    next_key=False,
    gqa="grouped",
    with_lse=False,
    lse_base2=False,
    blockwise=None,
):
    """Plain softmax attention with an ALiBi bias on backend xp, computed in float32 (float64 for float64 input).

    ``blockwise`` = a key block size: online softmax over key blocks (FlashAttention's order of operations).
    """

    def candidate(q, k, v):
        nb, nh, sq, d = q.shape
        nkv, sk = k.shape[1], k.shape[2]
        acc = xp.float64 if q.dtype == xp.float64 else xp.float32
        qa, ka, va = (xp.astype(a, acc) for a in (q, k, v))
        heads = [h // (nh // nkv) if gqa == "grouped" else h % nkv for h in range(nh)]
        idx = xp.asarray(heads, dtype=xp.int64)
        ka, va = xp.take(ka, idx, axis=1), xp.take(va, idx, axis=1)
        tau = 1.0 / math.sqrt(d) if scale is None else scale
        start = sk - sq if align == "bottom_right" else 0
        qp = xp.arange(start, start + sq, dtype=xp.int64)
        kp = xp.arange(0, sk, dtype=xp.int64)
        delta = qp[:, None] - kp[None, :]
        z = qa @ xp.matrix_transpose(ka)
        if slopes is not None:
            m = xp.asarray(slopes, dtype=acc)
            b = -(m[:, None, None] * xp.astype(xp.abs(delta), acc)[None, ...])
            z = z * tau + b if placement == "post_scale" else (z + b) * tau
        else:
            z = z * tau
        if causal:
            keep = delta >= (-1 if next_key else 0)
            z = xp.where(keep, z, -math.inf)
        if blockwise is None:
            mx = xp.max(z, axis=-1, keepdims=True)
            empty = mx == -math.inf
            e = xp.exp(z - xp.where(empty, 0.0, mx))
            tot = xp.sum(e, axis=-1, keepdims=True)
            out = (e @ va) / xp.where(empty, 1.0, tot)
            lse = xp.where(empty, -math.inf, xp.where(empty, 0.0, mx) + xp.log(xp.where(empty, 1.0, tot)))[..., 0]
            if fully_masked == "nan":
                out = xp.where(empty, math.nan, out)
        else:
            mx = xp.full((nb, nh, sq, 1), -math.inf, dtype=acc)
            tot = xp.zeros((nb, nh, sq, 1), dtype=acc)
            out = xp.zeros((nb, nh, sq, va.shape[-1]), dtype=acc)
            for s0 in range(0, sk, blockwise):
                s1 = min(sk, s0 + blockwise)
                zb = z[..., s0:s1]
                new = xp.maximum(mx, xp.max(zb, axis=-1, keepdims=True))
                safe = xp.where(new == -math.inf, 0.0, new)
                corr = xp.exp(mx - safe)
                e = xp.exp(zb - safe)
                tot = tot * corr + xp.sum(e, axis=-1, keepdims=True)
                out = out * corr + e @ va[..., s0:s1, :]
                mx = new
            empty = tot == 0
            out = out / xp.where(empty, 1.0, tot)
            lse = xp.where(empty, -math.inf, mx + xp.log(xp.where(empty, 1.0, tot)))[..., 0]
        out = xp.astype(out, q.dtype)
        if not with_lse:
            return out
        return out, (lse / math.log(2) if lse_base2 else lse)

    return candidate


# -- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rng_params():
    rng = np.random.default_rng(20240611)
    return {
        "t5_table": rng.standard_normal((6, 32)),
        "t5_square": rng.standard_normal((8, 8)),
        "offset": rng.standard_normal((5, 2 * 6 + 1)),
        "r1": rng.uniform(0.1, 1.5, 5),
        "r2": rng.uniform(0.2, 1.9, 5),
        "fire": (
            rng.standard_normal((16, 1)),
            rng.standard_normal(16),
            rng.standard_normal((4, 16)) / 4,
            rng.standard_normal(4),
        ),
    }


def diag_text(report: Report) -> str:
    return " | ".join(d for c in report.failures for d in c.diagnosis)


def assert_rejected(report: Report, expected: str) -> None:
    assert not report.passed, report.text()
    assert expected.lower() in diag_text(report).lower(), report.text()


# -- bias: correct re-implementations are accepted ---------------------------------------------------------------


@pytest.mark.parametrize("heads", [8, 12])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_bias_accepts_alibi(xp, heads, dtype):
    report = check_bias(
        alibi_candidate(xp, official_slopes(heads), dtype=dtype), rp.ALiBi.from_num_heads(heads), q_len=7, k_len=20
    )
    assert report.passed, report.text()
    assert report.header["candidate dtype"] == dtype


def test_bias_accepts_reference_in_backend_namespace(xp):
    """The reference family may live in any namespace; its (float32) parameters are widened to NumPy float64."""
    ref = rp.ALiBi.from_num_heads(12, xp=xp, dtype=xp.float32)
    report = check_bias(alibi_candidate(xp, official_slopes(12), dtype="float32"), ref, q_len=5, k_len=9)
    assert report.passed, report.text()


@pytest.mark.parametrize("bidirectional", [True, False])
def test_bias_accepts_t5(xp, rng_params, bidirectional):
    table = rng_params["t5_table"]
    ref = rp.T5Bias(table, bidirectional=bidirectional, layout="heads_buckets")
    report = check_bias(t5_candidate(xp, table, bidirectional=bidirectional), ref, q_len=9, k_len=40)
    assert report.passed, report.text()


def test_bias_accepts_t5_buckets_heads_layout(xp, rng_params):
    table = rng_params["t5_table"]
    ref = rp.T5Bias(table.T.copy(), bidirectional=True, layout="buckets_heads")
    assert check_bias(t5_candidate(xp, table, bidirectional=True), ref, q_len=4, k_len=4).passed


@pytest.mark.parametrize("kind", ["power", "log"])
def test_bias_accepts_kerple(xp, rng_params, kind):
    r1, r2 = rng_params["r1"], rng_params["r2"]
    ref = rp.KerplePower(r1, r2) if kind == "power" else rp.KerpleLog(r1, r2)
    report = check_bias(kerple_candidate(xp, r1, r2, kind=kind), ref, q_len=6, k_len=30)
    assert report.passed, report.text()


def test_bias_accepts_fire(xp, rng_params):
    w1, b1, w2, b2 = rng_params["fire"]
    ref = rp.FIRE(w1, b1, w2, b2, c=0.1, L=40.0)
    report = check_bias(fire_candidate(xp, w1, b1, w2, b2, 0.1, 40.0), ref, q_len=6, k_len=30)
    assert report.passed, report.text()
    assert any("offset_only" in n for n in report.notes)  # FIRE with L < positions: not offset-only


def test_bias_accepts_sandwich_and_offset(xp, rng_params):
    assert check_bias(sandwich_candidate(xp, 4, 32), rp.Sandwich(4, 32), q_len=5, k_len=17).passed
    table = rng_params["offset"]
    assert check_bias(offset_candidate(xp, table), rp.OffsetBias(table), q_len=5, k_len=17).passed


def test_bias_accepts_tensor(xp):
    arr = np.random.default_rng(3).standard_normal((3, 4, 6))
    arr[1, 2, 5] = -np.inf

    def candidate(q_pos, k_pos):
        return xp.asarray(arr)

    report = check_bias(candidate, rp.TensorBias(arr), q_len=4, k_len=6)
    assert report.passed, report.text()


def test_row_shift_accepts_key_only_alibi_causal(xp):
    """BLOOM/MPT's key-only ALiBi gives the same probabilities as -m|i-j| under a causal mask."""
    report = check_bias(
        alibi_candidate(xp, official_slopes(12), dtype="float32", form="key_only"),
        rp.ALiBi.from_num_heads(12),
        q_len=8,
        k_len=24,
        equivalence="row_shift",
        causal=True,
    )
    assert report.passed, report.text()
    notes = " ".join(d for c in report.checks for d in c.details)
    assert "key-only form" in notes  # the shift is recognised as m_h * q_pos + c_h


# -- bias: mutants are rejected ----------------------------------------------------------------------------------


def test_rejects_closed_form_slopes_for_12_heads(xp):
    closed = [2.0 ** (-8 * h / 12) for h in range(1, 13)]
    report = check_bias(alibi_candidate(xp, closed), rp.ALiBi.from_num_heads(12), q_len=8, k_len=24)
    assert_rejected(report, "closed form")


def test_rejects_flipped_offset_sign_t5(xp, rng_params):
    table = rng_params["t5_table"]
    report = check_bias(
        t5_candidate(xp, table, bidirectional=True, flip=True),
        rp.T5Bias(table, bidirectional=True, layout="heads_buckets"),
        q_len=8,
        k_len=24,
    )
    assert_rejected(report, "offset sign flipped")


def test_rejects_flipped_offset_sign_alibi_signed_form(xp):
    """The FlexAttention blog's +m*(q_idx - kv_idx): a bonus growing with distance, even under a causal mask."""
    report = check_bias(
        alibi_candidate(xp, official_slopes(8), form="signed_flipped"),
        rp.ALiBi.from_num_heads(8),
        q_len=8,
        k_len=24,
        causal=True,
    )
    assert_rejected(report, "bias negated")
    assert not report["bias.monotone"].passed


def test_rejects_flipped_offset_sign_offset_table(xp, rng_params):
    table = rng_params["offset"]
    report = check_bias(offset_candidate(xp, table, reverse=True), rp.OffsetBias(table), q_len=5, k_len=17)
    assert_rejected(report, "offset sign flipped")


def test_rejects_wrong_alignment(xp):
    """A candidate that ignores the absolute query positions and uses 0..Sq-1 (top-left)."""
    cand = alibi_candidate(xp, official_slopes(8), q_override=lambda q, k: np.arange(len(q), dtype=np.int64))
    report = check_bias(cand, rp.ALiBi.from_num_heads(8), q_len=5, k_len=20)
    assert_rejected(report, "top-left")
    assert report["bias.values.decode"].status == "failed"


def test_rejects_kerple_parameters_swapped(xp, rng_params):
    r1, r2 = rng_params["r1"], rng_params["r2"]
    for kind, fam in (("power", rp.KerplePower), ("log", rp.KerpleLog)):
        report = check_bias(kerple_candidate(xp, r1, r2, kind=kind, swap=True), fam(r1, r2), q_len=6, k_len=30)
        assert_rejected(report, "KERPLE parameters swapped")


def test_rejects_t5_bucket_off_by_one_at_boundary(xp, rng_params):
    table = rng_params["t5_table"]
    cand = t5_candidate(xp, table, bidirectional=True, boundary_bug=True)
    report = check_bias(cand, rp.T5Bias(table, bidirectional=True, layout="heads_buckets"), q_len=8, k_len=24)
    assert_rejected(report, "off by one at a boundary")
    assert report["bias.values.main"].mismatch["delta"] in (16, -16)


def test_rejects_t5_table_layout_transposed(xp, rng_params):
    table = rng_params["t5_square"]  # 8 heads x 8 buckets: a transposed read gives no shape error
    ref = rp.T5Bias(table, bidirectional=True, max_distance=16, layout="heads_buckets")
    report = check_bias(
        t5_candidate(xp, table, bidirectional=True, max_distance=16, transpose=True), ref, q_len=6, k_len=20
    )
    assert_rejected(report, "layout transposed")


def test_rejects_hf_weight_with_wrong_layout(xp, rng_params):
    """HF's (buckets, heads) weight given to T5Bias without layout='buckets_heads': a shape error, explained."""
    table = rng_params["t5_table"]  # (H=6, B=32); HF would store (32, 6)
    # wrong: 32 "heads" x 6 "buckets"
    ref = rp.T5Bias(table.T.copy(), bidirectional=True, max_distance=128, layout="heads_buckets")
    report = check_bias(t5_candidate(xp, table, bidirectional=True), ref, q_len=4, k_len=9)
    assert not report.passed
    assert report["bias.values.main"].status == "error"
    assert "layout='buckets_heads'" in " ".join(report["bias.values.main"].diagnosis)


def test_rejects_fire_normaliser_on_row_index(xp, rng_params):
    w1, b1, w2, b2 = rng_params["fire"]
    cand = fire_candidate(xp, w1, b1, w2, b2, 0.1, 8.0, row_index=True)
    report = check_bias(cand, rp.FIRE(w1, b1, w2, b2, c=0.1, L=8.0), q_len=6, k_len=30)
    assert_rejected(report, "row index")


def test_exact_rejects_key_only_and_says_row_shift(xp):
    report = check_bias(
        alibi_candidate(xp, official_slopes(8), form="key_only"), rp.ALiBi.from_num_heads(8), q_len=6, k_len=20
    )
    assert_rejected(report, "causal-only form")


def test_row_shift_still_rejects_changed_probabilities(xp):
    cand = alibi_candidate(xp, official_slopes(8), form="key_only_plus")
    report = check_bias(cand, rp.ALiBi.from_num_heads(8), q_len=6, k_len=20, equivalence="row_shift", causal=True)
    assert not report.passed
    assert report["bias.values.main"].status == "failed"


def test_row_shift_rejects_key_only_without_causal_mask(xp):
    report = check_bias(
        alibi_candidate(xp, official_slopes(8), form="key_only"),
        rp.ALiBi.from_num_heads(8),
        q_len=6,
        k_len=20,
        equivalence="row_shift",
    )
    assert not report.passed
    assert "future keys" in " ".join(report["bias.monotone"].diagnosis)


# -- buckets --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
def test_buckets_accept_hf_style_float_log(xp, bidirectional):
    def cand(delta):
        return hf_style_bucket(xp, xp.asarray(delta), bidirectional=bidirectional)

    report = check_buckets(cand, bidirectional=bidirectional)
    assert report.passed, report.text()


def test_buckets_reject_off_by_one_and_sign(xp):
    def off(delta):
        return hf_style_bucket(xp, xp.asarray(delta), bidirectional=True, boundary_bug=True)

    def flipped(delta):
        return hf_style_bucket(xp, -xp.asarray(delta), bidirectional=True)

    assert_rejected(check_buckets(off, bidirectional=True), "off by one at a boundary")
    assert_rejected(check_buckets(flipped, bidirectional=True), "offset sign flipped")


def test_buckets_reject_float_output():
    def as_float(delta):
        return rp.t5_bucket(delta, bidirectional=True).astype(np.float64)

    report = check_buckets(as_float, bidirectional=True)
    assert report["buckets.values"].passed
    assert not report["buckets.dtype"].passed


# -- attention: accepted -------------------------------------------------------------------------------------


def _dtypes(xp):
    return (
        ["float64", "float32"]
        if not hasattr(xp, "float16") or "strict" in xp.__name__
        else ["float64", "float32", "float16"]
    )


def test_attention_accepts_plain_and_blockwise(xp):
    slopes = official_slopes(4)
    for dtype in _dtypes(xp):
        for blockwise in (None, 5):
            cand = attention_candidate(xp, slopes=slopes, causal=True, with_lse=True, blockwise=blockwise)
            report = check_attention(
                cand, bias=rp.ALiBi.from_num_heads(4), causal=True, dtype=dtype, with_lse=True, xp=xp
            )
            assert report.passed, report.text()


def test_attention_accepts_top_left_and_non_causal(xp):
    slopes = official_slopes(4)
    report = check_attention(
        attention_candidate(xp, slopes=slopes, causal=True, align="top_left"),
        bias=rp.ALiBi.from_num_heads(4),
        causal=True,
        align="top_left",
        xp=xp,
    )
    assert report.passed, report.text()
    report = check_attention(attention_candidate(xp, slopes=slopes), bias=rp.ALiBi.from_num_heads(4), xp=xp)
    assert report.passed, report.text()


def test_attention_accepts_nan_convention_when_declared(xp):
    cand = attention_candidate(xp, causal=True, fully_masked="nan")
    assert check_attention(cand, causal=True, fully_masked="nan", xp=xp).passed


def test_attention_bfloat16_numpy_inputs():
    cand = attention_candidate(np, slopes=official_slopes(4), causal=True)

    def bf16(q, k, v):  # ml_dtypes bfloat16 in, computed in float32, rounded back
        return cand(*(a.astype(np.float32) for a in (q, k, v))).astype(q.dtype)

    report = check_attention(bf16, bias=rp.ALiBi.from_num_heads(4), causal=True, dtype="bfloat16")
    assert report.passed, report.text()


# -- attention: mutants --------------------------------------------------------------------------------------


ALIBI4 = official_slopes(4)


@pytest.mark.parametrize(
    ("mutant", "expected"),
    [
        ({"placement": "pre_scale"}, "wrong side of the scale"),
        ({"align": "top_left"}, "top-left"),
        ({"next_key": True}, "next key"),
        ({"fully_masked": "nan"}, "NaN instead of zeros"),
        ({"causal": False}, "no causal mask"),
        ({"gqa": "interleaved"}, "h % H_kv"),
        ({"scale": 1.0}, "no 1/sqrt(d) scale"),
        ({"slopes": None}, "bias ignored"),
        ({"slopes": [2.0 ** (-8 * h / 4) for h in range(4)]}, "off by one head"),
    ],
    ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else None,
)
def test_attention_rejects(xp, mutant, expected):
    kwargs = {"slopes": ALIBI4, "causal": True, **mutant}
    report = check_attention(attention_candidate(xp, **kwargs), bias=rp.ALiBi.from_num_heads(4), causal=True, xp=xp)
    assert_rejected(report, expected)


def test_attention_rejects_lse_base2(xp):
    cand = attention_candidate(xp, slopes=ALIBI4, causal=True, with_lse=True, lse_base2=True)
    report = check_attention(cand, bias=rp.ALiBi.from_num_heads(4), causal=True, with_lse=True, xp=xp)
    assert_rejected(report, "base 2")
    assert all(c.passed for c in report.checks if ".output." in c.name)


def test_attention_key_only_lse_diagnosis():
    """Key-only ALiBi: outputs agree, lse moves by m_h * q_pos (FlashAttention's causal path)."""
    slopes = np.asarray(ALIBI4)

    def cand(q, k, v):
        _, nh, sq, d = q.shape
        sk = k.shape[2]
        k, v = (np.repeat(a, nh // a.shape[1], axis=1) for a in (k, v))
        z = q @ np.swapaxes(k, -1, -2) / math.sqrt(d) + slopes[:, None, None] * np.arange(sk)[None, None, :]
        qp = np.arange(sk - sq, sk)
        keep = np.arange(sk)[None, :] <= qp[:, None]
        z = np.where(keep, z, -np.inf)
        mx = z.max(-1, keepdims=True)
        empty = mx == -np.inf
        e = np.exp(z - np.where(empty, 0, mx))
        tot = e.sum(-1, keepdims=True)
        out = e @ v / np.where(empty, 1, tot)
        lse = np.where(empty, -np.inf, np.where(empty, 0, mx) + np.log(np.where(empty, 1, tot)))[..., 0]
        return out, lse

    report = check_attention(cand, bias=rp.ALiBi.from_num_heads(4), causal=True, dtype="float64", with_lse=True)
    assert all(c.passed for c in report.checks if ".output." in c.name), report.text()
    assert_rejected(report, "key-only form")


def test_attention_reports_candidate_exceptions():
    def broken(q, k, v):
        raise NotImplementedError("no GQA here")

    report = check_attention(broken)
    assert not report.passed
    assert all(c.status == "error" for c in report.checks)
    assert "NotImplementedError: no GQA here" in report.checks[0].summary


# -- tolerance rule -----------------------------------------------------------------------------------------


def test_plain_attention_matches_reference_in_float64():
    shape = AttentionShape(1, 2, 2, 5, 7, 8)
    q, k, v = attention_inputs(shape, dtype="float64", seed=1)
    out, lse = plain_attention(q, k, v, None, None, scale=0.25, placement="post_scale", dtype="float64")
    want, want_lse = rp.attention(q, k, v, scale=0.25, return_lse=True)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-14)
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=1e-14)


def test_plain_attention_float16_error_is_larger_than_float32():
    shape = AttentionShape(1, 2, 2, 8, 8, 16)
    q, k, v = attention_inputs(shape, dtype="float16", seed=2)
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    want = np.asarray(rp.attention(q64, k64, v64))
    e16 = np.abs(
        plain_attention(q64, k64, v64, None, None, scale=0.25, placement="post_scale", dtype="float16")[0] - want
    ).max()
    e32 = np.abs(
        plain_attention(q64, k64, v64, None, None, scale=0.25, placement="post_scale", dtype="float32")[0] - want
    ).max()
    assert 1e-5 < e16 < 1e-2
    assert e32 < e16 / 100


def test_user_tolerance_override_is_reported():
    slopes = np.asarray(official_slopes(4))

    def slightly_off(q_pos, k_pos):
        return -slopes[:, None, None] * np.abs(q_pos[:, None] - k_pos[None, :]) * (1 + 1e-9)

    strict = check_bias(slightly_off, rp.ALiBi.from_num_heads(4), q_len=4, k_len=8)
    loose = check_bias(slightly_off, rp.ALiBi.from_num_heads(4), q_len=4, k_len=8, rtol=1e-6)
    assert not strict.passed
    assert loose.passed
    assert "user override" in loose.header["tolerance rule"]
    assert "user override" in loose["bias.values.main"].tolerance


# -- report, JSON, reproduction -------------------------------------------------------------------------------


def test_report_json_table_and_reproduction_runs(tmp_path, monkeypatch):
    mod = tmp_path / "confmut_closed.py"
    mod.write_text(
        textwrap.dedent("""
        import numpy as np
        M = 2.0 ** (-8 * np.arange(1, 13) / 12)
        def candidate(q_pos, k_pos):
            return -M[:, None, None] * np.abs(q_pos[:, None] - k_pos[None, :])
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from confmut_closed import candidate

    report = check_bias(candidate, rp.ALiBi.from_num_heads(12), q_len=4, k_len=9)
    data = json.loads(report.to_json())
    assert data["passed"] is False
    main = next(c for c in data["checks"] if c["name"] == "bias.values.main")
    assert main["status"] == "failed"
    assert main["mismatch"]["delta"] == 5
    assert main["mismatch"]["head"] == 0
    assert "closed form" in main["diagnosis"][0]
    table = report.table()
    assert "bias.values.main" in table
    assert "FAILED" in table
    assert "tolerance rule" in report.text()
    # The reproduction snippet runs as written and prints the two mismatching values.
    snippet = report["bias.values.main"].reproduction
    proc = subprocess.run(
        [sys.executable, "-c", snippet],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])},
    )
    got, want = (float(x) for x in proc.stdout.split())
    assert got == main["mismatch"]["candidate"]
    assert want == main["mismatch"]["reference"]


def test_report_json_encodes_non_finite():
    def nan_candidate(q_pos, k_pos):
        return np.full((4, len(q_pos), len(k_pos)), np.nan)

    data = json.loads(check_bias(nan_candidate, rp.ALiBi.from_num_heads(4), q_len=3, k_len=5).to_json())
    main = next(c for c in data["checks"] if c["name"] == "bias.values.main")
    assert main["max_abs"] == "inf"
    assert main["mismatch"]["candidate"] == "nan"


def test_argument_errors_name_the_argument():
    good = alibi_candidate(np, official_slopes(4))
    with pytest.raises(TypeError, match="reference"):
        check_bias(good, "alibi", q_len=3, k_len=4)
    with pytest.raises(ValueError, match="equivalence"):
        check_bias(good, rp.ALiBi.from_num_heads(4), q_len=3, k_len=4, equivalence="rows")
    with pytest.raises(ValueError, match="q_len"):
        check_bias(good, rp.ALiBi.from_num_heads(4), q_len=0, k_len=4)
    with pytest.raises(ValueError, match="dtype"):
        check_attention(good, dtype="float8")
    with pytest.raises(ValueError, match="shapes"):
        check_attention(good, bias=rp.ALiBi.from_num_heads(4), shapes=[(1, 2, 2, 3, 3, 4)])
    with pytest.raises(ValueError, match="expected_failures"):
        check_bias(good, rp.ALiBi.from_num_heads(4), q_len=3, k_len=4, expected_failures={"bias.nope": "x"})


def test_expected_failures_in_report():
    closed = alibi_candidate(np, [2.0 ** (-8 * h / 12) for h in range(1, 13)])
    report = check_bias(
        closed,
        rp.ALiBi.from_num_heads(12),
        q_len=4,
        k_len=9,
        expected_failures={"bias.values.*": "closed-form slopes, known"},
    )
    assert report.passed
    assert {c.status for c in report.checks if c.name.startswith("bias.values.")} == {"xfail"}
    fixed = check_bias(
        alibi_candidate(np, official_slopes(12)),
        rp.ALiBi.from_num_heads(12),
        q_len=4,
        k_len=9,
        expected_failures={"bias.values.main": "was wrong"},
    )
    assert not fixed.passed
    assert fixed["bias.values.main"].status == "xpass"


# -- pytest entry points --------------------------------------------------------------------------------------


@parametrize_with_checks(
    bias_checks(alibi_candidate(np, official_slopes(12)), rp.ALiBi.from_num_heads(12), q_len=5, k_len=11, causal=True)
)
def test_parametrize_with_checks_accepts(check):
    check()


@parametrize_with_checks(
    [
        bias_checks(
            alibi_candidate(np, [2.0 ** (-8 * h / 12) for h in range(1, 13)]),
            rp.ALiBi.from_num_heads(12),
            q_len=5,
            k_len=11,
            label="closed_slopes",
        ),
        attention_checks(
            attention_candidate(np, slopes=ALIBI4, causal=True, align="top_left"),
            bias=rp.ALiBi.from_num_heads(4),
            causal=True,
            label="top_left_attention",
        ),
    ],
    expected_failures={
        "closed_slopes.values.*": "closed-form slopes",
        "top_left_attention.output.q<k": "top-left",
        "top_left_attention.output.gqa": "top-left",
        "top_left_attention.rows_sum_to_one": "top-left: its mask keeps other keys",
        "top_left_attention.effective_bias": "top-left",
        "top_left_attention.output.decode": "top-left",
        "top_left_attention.output.q>k": "top-left",
        "top_left_attention.alignment_consistency": "top-left",
        "top_left_attention.fully_masked_rows": "top-left",
    },
)
def test_parametrize_with_checks_marks_known_divergences(check):
    """The listed checks are strict xfails: if the harness stopped rejecting these mutants, they would XPASS."""
    check()


def test_parametrize_with_checks_validates():
    checks = bias_checks(alibi_candidate(np, official_slopes(4)), rp.ALiBi.from_num_heads(4), q_len=3, k_len=4)
    mark = parametrize_with_checks(checks, expected_failures={"bias.monotone": "x"})
    params = mark.args[1]
    assert [p.id for p in params] == [c.name for c in checks]
    assert [bool(p.marks) for p in params] == [c.name == "bias.monotone" for c in checks]
    with pytest.raises(ValueError, match="unique"):
        parametrize_with_checks([checks, checks])
    with pytest.raises(ValueError, match="matches no check"):
        parametrize_with_checks(checks, expected_failures={"bias.values.nope": "x"})
    with pytest.raises(ConformanceError):
        bias_checks(alibi_candidate(np, official_slopes(8)), rp.ALiBi.from_num_heads(4), q_len=3, k_len=4)[1]()


def test_run_checks_needs_checks():
    with pytest.raises(ValueError, match="checks"):
        run_checks([])


CANDIDATE_MODULE = """
import numpy as np
import relpos_ref as rp
S = np.asarray(rp.alibi_slopes(12))
def good(q_pos, k_pos):
    return -S[:, None, None] * np.abs(q_pos[:, None] - k_pos[None, :])
def closed(q_pos, k_pos):
    m = 2.0 ** (-8 * np.arange(1, 13) / 12)
    return -m[:, None, None] * np.abs(q_pos[:, None] - k_pos[None, :])
"""


@pytest.fixture
def candidate_module(tmp_path, monkeypatch):
    (tmp_path / "confcli_mod.py").write_text(CANDIDATE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_cli_exit_status_and_json(candidate_module, capsys):
    from relpos_ref.cli import main

    assert main(["conform", "confcli_mod:good", "--family", "alibi", "--heads", "12"]) == 0
    assert "PASSED" in capsys.readouterr().out
    out_json = candidate_module / "report.json"
    assert main(["conform", "confcli_mod:closed", "--family", "alibi", "--heads", "12", "--json", str(out_json)]) == 1
    text = capsys.readouterr().out
    assert "closed form" in text
    assert "FAILED" in text
    assert json.loads(out_json.read_text())["passed"] is False
    assert (
        main(
            [
                "conform",
                "confcli_mod:closed",
                "--family",
                "alibi",
                "--heads",
                "12",
                "--xfail",
                "bias.values.*=closed-form slopes",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["conform", "confcli_mod:missing", "--family", "alibi", "--heads", "12"]) == 2
    assert "no attribute" in capsys.readouterr().err
    assert main(["conform", "confcli_mod:good", "--family", "t5"]) == 2
    assert "--params" in capsys.readouterr().err


def test_cli_params_file(candidate_module, capsys, rng_params):
    from relpos_ref.cli import main

    table = rng_params["t5_table"]
    np.savez(candidate_module / "t5.npz", table=table.T)
    (candidate_module / "confcli_t5.py").write_text(
        textwrap.dedent("""
        import numpy as np
        import relpos_ref as rp
        TABLE = np.load(__file__.replace("confcli_t5.py", "t5.npz"))["table"]  # (buckets, heads), HF layout
        def bias(q_pos, k_pos):
            b = rp.t5_bucket(q_pos[:, None] - k_pos[None, :], bidirectional=False)
            return np.moveaxis(TABLE[b], -1, 0)
    """)
    )
    args = [
        "conform",
        "confcli_t5:bias",
        "--family",
        "t5",
        "--params",
        str(candidate_module / "t5.npz"),
        "--no-bidirectional",
    ]
    assert main([*args, "--layout", "buckets_heads"]) == 0
    capsys.readouterr()
    assert main(args) == 1  # default layout heads_buckets: 32 "heads"
    assert "layout='buckets_heads'" in capsys.readouterr().out  # the diagnosis of the shape error


def _run_pyargs(env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELPOS_REF_")}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(cwd), *sys.path])
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--pyargs",
            "relpos_ref.conformance",
            "-p",
            "no:cacheprovider",
            "-q",
            "-p",
            "no:randomly",
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        check=False,
    )


def test_pyargs_entry_point(candidate_module):
    skipped = _run_pyargs({}, candidate_module)
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "1 skipped" in skipped.stdout
    ok = _run_pyargs(
        {"RELPOS_REF_IMPL": "confcli_mod:good", "RELPOS_REF_ARGS": "--family alibi --heads 12"}, candidate_module
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "8 passed" in ok.stdout
    assert "tolerance rule" in ok.stdout
    bad = _run_pyargs(
        {
            "RELPOS_REF_IMPL": "confcli_mod:closed",
            "RELPOS_REF_ARGS": "--family alibi --heads 12",
            "RELPOS_REF_XFAIL": "bias.values.main=closed slopes",
        },
        candidate_module,
    )
    assert bad.returncode == 1
    assert "1 xfailed" in bad.stdout
    assert "3 failed" in bad.stdout
    assert "closed form" in bad.stdout


def test_bias_scaled_by_sqrt_d_is_diagnosed():
    slopes = np.asarray(official_slopes(4))

    def scaled(q_pos, k_pos):  # a bias meant for pre_scale placement with d = 64, or gpt-neox's sqrt(d) T5 table
        return -8.0 * slopes[:, None, None] * np.abs(q_pos[:, None] - k_pos[None, :])

    report = check_bias(scaled, rp.ALiBi.from_num_heads(4), q_len=4, k_len=9)
    assert_rejected(report, "= sqrt(64) x reference")


def test_attention_lse_plus_inf_for_empty_rows_is_diagnosed():
    inner = attention_candidate(np, slopes=ALIBI4, causal=True, with_lse=True)

    def flash_style(q, k, v):
        out, lse = inner(q, k, v)
        return out, np.where(np.isneginf(lse), np.inf, lse)

    report = check_attention(flash_style, bias=rp.ALiBi.from_num_heads(4), causal=True, with_lse=True)
    assert [c.name for c in report.failures] == ["attention.fully_masked_rows"]
    assert_rejected(report, "FlashAttention's convention")


def test_attention_reproduction_runs(candidate_module):
    (candidate_module / "confattn_mod.py").write_text(
        textwrap.dedent("""
        import numpy as np
        import relpos_ref as rp
        def pre_scale(q, k, v):
            return rp.attention(q, k, v, bias=rp.ALiBi.from_num_heads(4, dtype=q.dtype), causal=True,
                                placement="pre_scale")
        """)
    )
    from confattn_mod import pre_scale

    report = check_attention(pre_scale, bias=rp.ALiBi.from_num_heads(4), causal=True, dtype="float64")
    res = report["attention.output.square"]
    assert "wrong side of the scale" in res.diagnosis[0]
    proc = subprocess.run(
        [sys.executable, "-c", res.reproduction],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(candidate_module), *sys.path])},
    )
    got, want = (json.loads(line) for line in proc.stdout.splitlines())
    j = res.mismatch["index"][-1]
    assert got[j] == res.mismatch["candidate"]
    assert want[j] == res.mismatch["reference"]


def test_row_shift_with_masked_tensor_entries():
    """-inf entries of a TensorBias must match exactly; the finite ones may be shifted per row."""
    arr = np.random.default_rng(5).standard_normal((2, 3, 5))
    arr[0, 1, 4] = -np.inf
    shifted = arr + np.arange(3.0)[None, :, None] * 7.0

    def good(q_pos, k_pos):
        return shifted

    def unmasked(q_pos, k_pos):
        return np.where(np.isinf(shifted), 0.0, shifted)

    ref = rp.TensorBias(arr)
    assert check_bias(good, ref, q_len=3, k_len=5, equivalence="row_shift").passed
    assert not check_bias(good, ref, q_len=3, k_len=5).passed
    assert not check_bias(unmasked, ref, q_len=3, k_len=5, equivalence="row_shift").passed
