"""Self-checks of the mpmath oracle against exact arithmetic and independent computations.

The oracle is the yardstick for everything else, so it is checked here without the library under test: T5 buckets
against 60-digit logarithms and exact integer boundary tests, ALiBi slopes against the official recursive rule in
binary64, the softmax against SciPy, attention against a float64 NumPy computation, and published worked examples.
"""

from __future__ import annotations

import ast
import math
from fractions import Fraction
from pathlib import Path

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relpos_ref import oracle

T5_CONFIGS = ((32, 128), (16, 128), (64, 256), (32, 256), (8, 20))


# ---------------------------------------------------------------------------------------------------------------------
# Independence
# ---------------------------------------------------------------------------------------------------------------------


def test_oracle_imports_nothing_from_the_library_or_numpy():
    pkg = Path(oracle.__file__).parent
    files = sorted(pkg.glob("*.py"))
    own = {f.stem for f in files}
    assert len(files) > 1, files
    for path in files:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # only the oracle's own submodules, never the rest of relpos_ref
                    where = f"{path.name}: from {'.' * node.level}{node.module}"
                    assert node.level == 1, where
                    assert node.module in own, where
                else:
                    imported.add((node.module or "").split(".")[0])
        assert imported <= {"__future__", "fractions", "math", "mpmath"}, (path.name, imported)


# ---------------------------------------------------------------------------------------------------------------------
# T5 buckets
# ---------------------------------------------------------------------------------------------------------------------


def _bucket_by_log(delta, bidirectional, nb, md, dps=60):
    """T5 bucket from the logarithmic formula evaluated with 60-digit logarithms (HF's formula, exact-ish)."""
    half = nb // 2 if bidirectional else nb
    exact = half // 2
    if bidirectional:
        base, n = (half if delta < 0 else 0), abs(delta)
    else:
        base, n = 0, max(delta, 0)
    if n < exact:
        return base + n, False
    with mpmath.workdps(dps):
        val = mpmath.log(mpmath.mpf(n) / exact) / mpmath.log(mpmath.mpf(md) / exact) * (half - exact)
        k = int(mpmath.floor(val))
        near = abs(val - mpmath.nint(val)) < mpmath.mpf(10) ** (-50)
    return base + min(half - 1, exact + k), near


@pytest.mark.parametrize(("nb", "md"), T5_CONFIGS)
@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bucket_matches_high_precision_log(nb, md, bidirectional):
    """Away from exact boundaries the 60-digit formula decides; on them (value an integer to 50 digits), the exact
    integer identity n**(B'-E) * E**k == E**(B'-E) * D**k must hold and the oracle must take the upper bucket."""
    half = nb // 2 if bidirectional else nb
    exact = half // 2
    p = half - exact
    offsets = [*list(range(-3 * md, 3 * md + 1)), 10**6, -(10**6), 10**9, -(10**9)]
    ties = 0
    for d in offsets:
        want, near = _bucket_by_log(d, bidirectional, nb, md)
        got = oracle.t5_bucket(d, bidirectional=bidirectional, num_buckets=nb, max_distance=md)
        if near:
            n = abs(d) if bidirectional else max(d, 0)
            k = got - (half if (bidirectional and d < 0) else 0) - exact
            if k < p - 1:
                assert n**p * exact**k == exact**p * md**k, (d, got)
            ties += 1
        else:
            assert got == want, (d, got, want)
    if (nb, md, bidirectional) == (32, 128, True):
        assert ties >= 6  # n = 16, 32, 64 on both sides


def test_t5_exact_boundaries_of_the_defaults():
    """Bidirectional defaults: n = 16, 32, 64 are exact boundaries (log ratio exactly 2, 4, 6) and take the upper
    bucket; one below stays in the lower bucket."""
    for n, b in ((16, 10), (32, 12), (64, 14)):
        assert oracle.t5_bucket(n, bidirectional=True) == b
        assert oracle.t5_bucket(n - 1, bidirectional=True) == b - 1
        assert oracle.t5_bucket(-n, bidirectional=True) == b + 16


def test_t5_worked_examples_of_the_research_notes():
    """HF `_relative_position_bucket(r)` values for the defaults (r = j - i, so delta = -r), as listed in the
    research notes (computed there with HF's float32 code and exact float64)."""
    bidir = {
        -200: 15,
        -128: 15,
        -127: 15,
        -100: 15,
        -64: 14,
        -63: 13,
        -45: 12,
        -32: 12,
        -31: 11,
        -20: 10,
        -16: 10,
        -15: 9,
        -12: 9,
        -8: 8,
        -7: 7,
        -1: 1,
        0: 0,
        1: 17,
        2: 18,
        7: 23,
        8: 24,
        12: 25,
        15: 25,
        16: 26,
        31: 27,
        32: 28,
        63: 29,
        64: 30,
        127: 31,
        128: 31,
        200: 31,
    }
    causal = {
        -200: 31,
        -128: 31,
        -127: 31,
        -100: 30,
        -64: 26,
        -63: 26,
        -45: 23,
        -32: 21,
        -31: 21,
        -20: 17,
        -16: 16,
        -15: 15,
        -12: 12,
        -8: 8,
        -7: 7,
        -1: 1,
        0: 0,
        1: 0,
        5: 0,
        200: 0,
    }
    assert {r: oracle.t5_bucket(-r, bidirectional=True) for r in bidir} == bidir
    assert {r: oracle.t5_bucket(-r, bidirectional=False) for r in causal} == causal
    assert oracle.t5_bucket_thresholds(bidirectional=True) == (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 23, 32, 46, 64, 91)
    assert oracle.t5_bucket_thresholds(bidirectional=False)[16:] == (
        16,
        19,
        21,
        24,
        27,
        31,
        35,
        40,
        46,
        52,
        59,
        67,
        77,
        87,
        99,
        113,
    )


def _hf_float32_bucket(r, bidirectional, nb, md):
    """HF transformers' formula transcribed in NumPy float32 (log in float32, truncation), r = j - i."""
    r = np.asarray(r, dtype=np.int64)
    ret = np.zeros_like(r)
    if bidirectional:
        nb //= 2
        ret += (r > 0).astype(np.int64) * nb
        r = np.abs(r)
    else:
        r = -np.minimum(r, 0)
    max_exact = nb // 2
    small = r < max_exact
    # evaluate the log branch on max(r, E) (HF computes log(0) = -inf and discards it via where)
    rl = np.maximum(r, max_exact)
    large = max_exact + (
        np.log(rl.astype(np.float32) / np.float32(max_exact))
        / np.float32(math.log(md / max_exact))
        * np.float32(nb - max_exact)
    ).astype(np.int64)
    large = np.minimum(large, nb - 1)
    return ret + np.where(small, r, large)


@pytest.mark.parametrize(("nb", "md"), T5_CONFIGS)
@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_agrees_with_hf_float32_formula_on_common_range(nb, md, bidirectional):
    """The research notes found HF-float32 and exact buckets identical for |r| <= 2000 in these configurations."""
    r = np.arange(-2000, 2001)
    hf = _hf_float32_bucket(r, bidirectional, nb, md)
    ours = [oracle.t5_bucket(-int(x), bidirectional=bidirectional, num_buckets=nb, max_distance=md) for x in r]
    assert hf.tolist() == ours


@pytest.mark.parametrize(("nb", "md"), T5_CONFIGS)
@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_thresholds_are_first_distances(nb, md, bidirectional):
    thr = oracle.t5_bucket_thresholds(bidirectional=bidirectional, num_buckets=nb, max_distance=md)
    assert list(thr) == sorted(thr)
    for b, t in enumerate(thr):
        if b + 1 < len(thr) and thr[b + 1] == t:
            continue  # empty bucket
        sign = 1
        assert oracle.t5_bucket(sign * t, bidirectional=bidirectional, num_buckets=nb, max_distance=md) == b
        if t > 0:
            assert oracle.t5_bucket(t - 1, bidirectional=bidirectional, num_buckets=nb, max_distance=md) < b


def test_t5_rejects_bad_configurations():
    with pytest.raises(ValueError, match="max_distance"):
        oracle.t5_bucket(3, bidirectional=True, num_buckets=32, max_distance=8)
    with pytest.raises(ValueError, match="num_buckets"):
        oracle.t5_bucket(3, bidirectional=True, num_buckets=31)
    with pytest.raises(TypeError, match="delta"):
        oracle.t5_bucket(1.5, bidirectional=True)


# ---------------------------------------------------------------------------------------------------------------------
# ALiBi, KERPLE, FIRE, Sandwich
# ---------------------------------------------------------------------------------------------------------------------


def _official_get_slopes(n):
    """The official recursive rule (ofirpress/attention_with_linear_biases, fairseq get_slopes), in binary64."""

    def power_of_2(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    c = 2 ** math.floor(math.log2(n))
    return power_of_2(c) + _official_get_slopes(2 * c)[0::2][: n - c]


@pytest.mark.parametrize("n", range(1, 257))
def test_alibi_slopes_match_official_rule(n):
    ours = [float(x) for x in oracle.alibi_slopes(n)]
    ref = _official_get_slopes(n)
    # the official products accumulate a few binary64 roundings (at most n factors)
    np.testing.assert_allclose(ours, ref, rtol=1e-13, atol=0)


def test_alibi_slope_exponents_of_the_research_notes():
    as_float = lambda n: [float(e) for e in oracle.alibi_slope_log2(n)]  # noqa: E731
    assert as_float(6) == [-2, -4, -6, -8, -1, -3]
    assert as_float(12) == [-1, -2, -3, -4, -5, -6, -7, -8, -0.5, -1.5, -2.5, -3.5]
    assert as_float(20) == [*(-0.5 * k for k in range(1, 17)), -0.25, -0.75, -1.25, -1.75]
    assert as_float(1) == [-8]
    assert all(isinstance(e, Fraction) for e in oracle.alibi_slope_log2(7))


def test_alibi_bias_is_exact_product():
    b = oracle.alibi_bias([0.5, 0.25], [0, 10**6], [0, 3, 10**6 + 1])
    assert [[float(x) for x in row] for row in b[0]] == [[0.0, -1.5, -500000.5], [-500000.0, -499998.5, -0.5]]
    assert b[1][1][0] == -250000


def test_kerple_examples():
    vals = oracle.kerple_log_bias([1.0], [0.5], [0, 1, 2, 10, 100], [0])[0]
    assert [round(float(v[0]), 4) for v in vals] == [0.0, -0.4055, -0.6931, -1.7918, -3.9318]
    p = oracle.kerple_power_bias([2.0, 1.0], [2.0, 0.5], [0, 3, 16], [0])
    assert [float(v[0]) for v in p[0]] == [0.0, -18.0, -512.0]
    assert [float(v[0]) for v in p[1]] == [0.0, -math.sqrt(3), -4.0]


def test_fire_interpolant_examples():
    """x(i, j) for c = 0.1, L = 512 (research notes, computed there in float64)."""
    pairs = {(0, 0): 0.0, (10, 9): 0.02410, (10, 0): 0.17525, (511, 0): 0.99951, (1000, 0): 1.0, (2000, 1000): 0.87023}
    for (i, j), want in pairs.items():
        x = oracle.fire_inputs([i], [j], c=0.1, L=512.0)[0][0]
        assert abs(float(x) - want) < 6e-6, (i, j, float(x))


def test_fire_mlp_by_hand():
    w1, b1, w2, b2 = [[2.0], [-1.0]], [0.5, 0.25], [[1.0, 3.0]], [-0.5]
    x = oracle.fire_inputs([600], [100], c=0.5, L=512.0)[0][0]
    want = 1.0 * max(2 * x + 0.5, 0) + 3.0 * max(-x + 0.25, 0) - 0.5
    got = oracle.fire_bias(w1, b1, w2, b2, [600], [100], c=0.5, L=512.0)[0][0][0]
    assert abs(got - want) < mpmath.mpf(10) ** -45


def test_sandwich_properties():
    d, h = 128, 4
    b = oracle.sandwich_bias(h, d, [0, 13, 14, 50], [0])
    assert all(b[k][0][0] == 0 for k in range(h))
    assert b[0][2][0] > b[0][1][0]  # not monotone: head 1 increases between 13 and 14 (research notes)
    ref = (sum(math.cos(50 * 10000 ** (-2 * k / d)) for k in range(1, d // 2 + 1)) - d / 2) / (8 * 1 / h)
    assert abs(float(b[0][3][0]) - ref) < 1e-12 * abs(ref)
    # head h is head 1 scaled by 1/h
    assert abs(b[3][3][0] * 4 - b[0][3][0]) < mpmath.mpf(10) ** -45


# ---------------------------------------------------------------------------------------------------------------------
# Softmax and attention
# ---------------------------------------------------------------------------------------------------------------------


def test_softmax_matches_scipy_on_easy_rows():
    special = pytest.importorskip("scipy.special")
    rng = np.random.default_rng(1)
    s = rng.normal(0, 3, (4, 9))
    b = -np.abs(rng.normal(0, 2, (4, 9)))
    for placement, scale in (("post_scale", 0.3), ("pre_scale", 0.7)):
        p, lse = oracle.biased_softmax(s.tolist(), b.tolist(), scale=scale, placement=placement)
        z = s * scale + b if placement == "post_scale" else (s + b) * scale
        np.testing.assert_allclose(np.array(p, dtype=float), special.softmax(z, axis=-1), rtol=1e-13)
        np.testing.assert_allclose(np.array(lse, dtype=float), special.logsumexp(z, axis=-1), rtol=1e-14)


def test_softmax_masks_and_fully_masked_rows():
    s = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, -1.0, 2.0]]
    m = [[True, True, False], [False, False, False], [False, True, False]]
    p, lse = oracle.biased_softmax(s, mask=m)
    assert p[0][2] == 0
    assert p[1] == [0, 0, 0]
    assert p[2] == [0, 1, 0]
    assert lse[1] == mpmath.mpf("-inf")
    assert lse[2] == -1
    ctx = oracle.context()
    assert abs(p[0][0] - 1 / (1 + ctx.e)) < ctx.mpf(10) ** -45
    pn, lsen = oracle.biased_softmax(s, mask=m, fully_masked="nan")
    assert all(mpmath.isnan(x) for x in pn[1])
    assert mpmath.isnan(lsen[1])
    assert pn[0] == p[0]


def test_softmax_extreme_logits_keep_full_precision():
    """Scores and biases near +-1e4 that cancel (z = 0) or add (z = 2e4 - 40): the small probability is
    exp(-gap) / (1 + exp(-gap)) with gap = 2e4 - 40, kept to 45 digits although it is about 1e-8669."""
    p, lse = oracle.biased_softmax([[1e4, 1e4 - 40]], [[-1e4, 1e4]])
    ctx = oracle.context()
    gap = ctx.mpf(2e4 - 40)  # z = [0, 2e4 - 40]
    want_small = ctx.exp(-gap - ctx.log1p(ctx.exp(-gap)))
    assert abs(p[0][0] - want_small) <= ctx.mpf(10) ** -45 * want_small
    assert abs(lse[0] - (2e4 - 40 + ctx.log1p(ctx.exp(-2e4 - 40)))) < ctx.mpf(10) ** -40


def test_pre_scale_equals_post_scale_with_scaled_bias():
    s = [[0.5, -1.0, 2.0]]
    b = [[-0.25, 0.0, -3.0]]
    tau = 0.125
    pa, la = oracle.biased_softmax(s, b, scale=tau, placement="pre_scale")
    pb, lb = oracle.biased_softmax(s, [[x * tau for x in b[0]]], scale=tau, placement="post_scale")
    assert all(abs(x - y) < mpmath.mpf(10) ** -45 for x, y in zip(pa[0], pb[0]))
    assert abs(la[0] - lb[0]) < mpmath.mpf(10) ** -45


def _np_attention(q, k, v, bias, keep, scale, placement):
    group = q.shape[1] // k.shape[1]
    kk, vv = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("bhid,bhjd->bhij", q, kk)
    z = s * scale + bias if placement == "post_scale" else (s + bias) * scale
    z = np.where(keep, z, -np.inf)
    top = np.max(z, axis=-1, keepdims=True)
    empty = ~np.isfinite(top)
    e = np.exp(z - np.where(empty, 0, top))
    t = e.sum(-1, keepdims=True)
    p = np.where(empty, 0, e / np.where(empty, 1, t))
    lse = np.where(empty, -np.inf, np.where(empty, 0, top) + np.log(np.where(empty, 1, t)))[..., 0]
    return p @ vv, lse


@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
@pytest.mark.parametrize("placement", ["post_scale", "pre_scale"])
def test_attention_matches_float64_numpy(align, placement):
    rng = np.random.default_rng(2)
    q = rng.normal(size=(2, 4, 5, 3))
    k = rng.normal(size=(2, 2, 3, 3))
    v = rng.normal(size=(2, 2, 3, 2))
    bias = rng.normal(size=(4, 5, 3))
    out, lse = oracle.attention(
        q.tolist(), k.tolist(), v.tolist(), bias=bias.tolist(), causal=True, align=align, scale=0.4, placement=placement
    )
    qp, kp = oracle.positions(5, 3, align=align)
    keep = np.array(oracle.causal_mask(qp, kp))[None, None]
    ref_o, ref_l = _np_attention(q, k, v, bias[None], keep, 0.4, placement)
    np.testing.assert_allclose(np.array(out, dtype=float), ref_o, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.array(lse, dtype=float), ref_l, rtol=1e-12)
    if align == "bottom_right":
        assert np.array(out, dtype=float)[:, :, :2].tolist() == np.zeros((2, 4, 2, 2)).tolist()


def test_positions_and_causal_mask_follow_flashattention_docstring():
    """FlashAttention's bottom-right examples: Sq=2, Sk=5 -> 11110 / 11111; Sq=5, Sk=2 -> 00/00/00/10/11."""
    qp, kp = oracle.positions(2, 5)
    assert [[int(x) for x in r] for r in oracle.causal_mask(qp, kp)] == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    qp, kp = oracle.positions(5, 2)
    assert [[int(x) for x in r] for r in oracle.causal_mask(qp, kp)] == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]
    assert oracle.positions(3, 5, align="top_left") == ([0, 1, 2], [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="align"):
        oracle.positions(3, 5, align="middle")


# ---------------------------------------------------------------------------------------------------------------------
# Precision and formatting
# ---------------------------------------------------------------------------------------------------------------------


def test_results_are_stable_in_the_working_precision():
    """dps 50 and dps 90 agree to far more digits than the 20 the vectors keep."""
    for dps in (50, 90):
        assert oracle.context(dps).dps == dps
    a = oracle.sandwich_bias(3, 64, [10**6], [0, 1, 12345], dps=50)
    b = oracle.sandwich_bias(3, 64, [10**6], [0, 1, 12345], dps=90)
    ctx = oracle.context(90)
    for x, y in zip(np.ravel(np.array(a, dtype=object)), np.ravel(np.array(b, dtype=object))):
        assert abs(ctx.mpf(x) - y) <= ctx.mpf(10) ** -40 * max(abs(y), 1)
    p50 = oracle.kerple_power_bias([3.0], [1.9921875], [10**6], [0], dps=50)[0][0][0]
    p90 = oracle.kerple_power_bias([3.0], [1.9921875], [10**6], [0], dps=90)[0][0][0]
    assert abs(ctx.mpf(p50) - p90) <= ctx.mpf(10) ** -45 * abs(p90)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_decimal_strings_round_trip_binary64(x):
    text = oracle.to_decimal_string(x)
    assert float(text) == x
    if x != 0:
        digits = text.lower().split("e")[0].lstrip("-").replace(".", "").lstrip("0")
        assert len(digits) >= 17


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="r1 and r2"):
        oracle.kerple_log_bias([1.0, 2.0], [1.0], [0], [0])
    with pytest.raises(ValueError, match="placement"):
        oracle.biased_softmax([[1.0]], placement="inside")
    with pytest.raises(ValueError, match="fully_masked"):
        oracle.biased_softmax([[1.0]], fully_masked="uniform")
    with pytest.raises(ValueError, match="head_dim"):
        oracle.sandwich_bias(2, 63, [0], [0])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        oracle.attention([[[[1.0]]] * 3], [[[[1.0]]] * 2], [[[[1.0]]] * 2])
    with pytest.raises(ValueError, match="dps"):
        oracle.context(5)


# ---------------------------------------------------------------------------------------------------------------------
# Attention features: windows, softcap, explicit positions, lengths, segments
# ---------------------------------------------------------------------------------------------------------------------

MPX = mpmath.MPContext()
MPX.dps = 60


def _grid(shape, a, c, mod=17, off=8, den=8):
    """Deterministic dyadic inputs: ((a . idx + c) mod M - off) / den, as nested lists."""
    return np.fromfunction(lambda *idx: ((sum(x * i for x, i in zip(a, idx)) + c) % mod - off) / den, shape).tolist()


def _near(got, want, tol="1e-45"):
    """Every leaf of ``got`` within tol * max(1, |want|) of ``want``; -inf and NaN must match exactly."""
    g, w = np.ravel(np.array(got, dtype=object)), np.ravel(np.array(want, dtype=object))
    assert g.shape == w.shape
    for a, b in zip(g, w):
        a, b = MPX.mpf(a), MPX.mpf(b)
        if MPX.isnan(b) or MPX.isinf(b):
            assert (MPX.isnan(a) and MPX.isnan(b)) or a == b, (a, b)
        else:
            assert abs(a - b) <= MPX.mpf(tol) * max(1, abs(b)), (a, b)


def _sub(x, axis, idx):
    """x (nested lists, 4-D) restricted to the indices ``idx`` along ``axis`` (2: the sequence axis)."""
    if axis == 0:
        return [x[t] for t in idx]
    return [_sub(t, axis - 1, idx) for t in x]


@pytest.mark.parametrize(("sq", "sk"), [(4, 4), (2, 5)])
def test_window_zero_zero_with_causal_attends_only_the_diagonal_key(sq, sk):
    """window (0, 0) keeps only q_pos - k_pos = 0: each query's output is v of its diagonal key, exactly, and its
    lse is that key's logit."""
    q = _grid((1, 2, sq, 3), [0, 3, 5, 7], 1)
    k = _grid((1, 1, sk, 3), [0, 0, 2, 3], 4)
    v = _grid((1, 1, sk, 2), [0, 0, 5, 3], 2)
    out, lse = oracle.attention(q, k, v, causal=True, window=(0, 0), scale=0.5)
    for h in range(2):
        for i in range(sq):
            j = i + sk - sq  # bottom-right: the last query sits on the last key
            assert [float(x) for x in out[0][h][i]] == v[0][0][j]
            s = MPX.fsum(MPX.mpf(a) * b for a, b in zip(q[0][h][i], k[0][0][j]))
            _near([lse[0][h][i]], [s / 2])


@pytest.mark.parametrize(
    ("window", "causal", "sq", "sk"),
    [((2, 1), False, 5, 5), ((None, 0), False, 4, 6), ((1, None), True, 5, 3), ((3, 2), True, 3, 6)],
)
def test_window_equals_the_hand_written_band_mask(window, causal, sq, sk):
    q = _grid((1, 2, sq, 2), [0, 3, 5, 7], 1)
    k = _grid((1, 2, sk, 2), [0, 2, 2, 3], 4)
    v = _grid((1, 2, sk, 2), [0, 1, 5, 3], 2)
    left, right = window
    band = []
    for i in range(sq):
        p = i + sk - sq
        band.append(
            [
                (left is None or p - j <= left) and (right is None or j - p <= right) and (not causal or j <= p)
                for j in range(sk)
            ]
        )
    got = oracle.attention(q, k, v, window=window, causal=causal)
    want = oracle.attention(q, k, v, mask=band)
    _near(got[0], want[0])
    _near(got[1], want[1])
    # the band is neither everything nor nothing, so the comparison has something to see
    assert any(not x for row in band for x in row)
    assert all(any(row) for row in band) or causal


@pytest.mark.parametrize("placement", ["post_scale", "pre_scale"])
def test_softcap_with_one_key_gives_v_and_the_capped_logit(placement):
    q, k, v = [[[[2.0, 1.5]]]], [[[[3.0, -0.5]]]], [[[[0.75, -1.25]]]]
    c, tau, b = 2.5, 0.5, -0.375
    out, lse = oracle.attention(q, k, v, bias=[[[[b]]]], scale=tau, placement=placement, softcap=c)
    assert [float(x) for x in out[0][0][0]] == [0.75, -1.25]
    s = MPX.mpf(tau) * (2.0 * 3.0 + 1.5 * -0.5)
    tb = b if placement == "post_scale" else tau * b
    _near([lse[0][0][0]], [c * MPX.tanh(s / c) + tb])


@pytest.mark.parametrize("placement", ["post_scale", "pre_scale"])
@pytest.mark.parametrize("c", [0.75, 8.0, 1000.0])
def test_softcap_with_two_keys_is_the_softmax_of_the_capped_logits(placement, c):
    """Logits far beyond c (c = 0.75), near it (8) and far below it (1000)."""
    q = [[[[3.0, -2.0]]]]
    k = [[[[1.5, 0.5], [-1.0, 2.25]]]]
    v = [[[[1.0, 2.0], [-3.0, 0.5]]]]
    bias = [[[[0.25, -0.625]]]]
    tau = 1.25
    out, lse = oracle.attention(q, k, v, bias=bias, scale=tau, placement=placement, softcap=c)
    z = []
    for j in range(2):
        s = tau * MPX.fsum(MPX.mpf(a) * b for a, b in zip(q[0][0][0], k[0][0][j]))
        b = bias[0][0][0][j] * (1 if placement == "post_scale" else tau)
        z.append(c * MPX.tanh(s / c) + b)
    p0 = 1 / (1 + MPX.exp(z[1] - z[0]))
    p1 = 1 - p0
    want = [p0 * v[0][0][0][t] + p1 * v[0][0][1][t] for t in range(2)]
    _near(out[0][0][0], want)
    _near([lse[0][0][0]], [z[0] + MPX.log(1 + MPX.exp(z[1] - z[0]))])
    # without the cap the answer differs (the cap does something at every c tested)
    plain = oracle.attention(q, k, v, bias=bias, scale=tau, placement=placement)[0][0][0][0]
    assert abs(MPX.mpf(plain[0]) - want[0]) > MPX.mpf("1e-12")


def test_explicit_positions_per_batch_row_and_a_kv_cache_offset():
    """Per-row q_pos/k_pos give the causal mask k_pos <= q_pos and the ALiBi bias at those positions; a decode step
    (one query at position 7 over 8 cached keys) equals the bottom-right default."""
    q = _grid((2, 2, 2, 2), [5, 3, 5, 7], 1)
    k = _grid((2, 1, 4, 2), [3, 0, 2, 3], 4)
    v = _grid((2, 1, 4, 2), [7, 0, 5, 3], 2)
    q_pos = [[1, 3], [10, 6]]
    k_pos = [[0, 1, 2, 3], [5, 6, 7, 8]]
    slopes = [0.5, -0.25]  # a negative slope: the oracle computes it, it does not police signs
    got = oracle.attention(q, k, v, q_pos=q_pos, k_pos=k_pos, causal=True, family="alibi", params={"slopes": slopes})
    for b in range(2):
        mask = [[kp <= qp for kp in k_pos[b]] for qp in q_pos[b]]
        bias = [[[-m * abs(qp - kp) for kp in k_pos[b]] for qp in q_pos[b]] for m in slopes]
        want = oracle.attention(_sub(q, 0, [b]), _sub(k, 0, [b]), _sub(v, 0, [b]), bias=bias, mask=mask)
        _near(got[0][b], want[0][0])
        _near(got[1][b], want[1][0])
    q1 = _grid((1, 1, 1, 2), [0, 0, 0, 1], 3)
    k8, v8 = _grid((1, 1, 8, 2), [0, 0, 3, 5], 1), _grid((1, 1, 8, 2), [0, 0, 7, 2], 5)
    fam = {"family": "alibi", "params": {"slopes": [0.125]}}
    step = oracle.attention(q1, k8, v8, q_pos=[7], causal=True, window=(3, None), **fam)
    default = oracle.attention(q1, k8, v8, causal=True, window=(3, None), **fam)
    top_left = oracle.attention(q1, k8, v8, causal=True, window=(3, None), align="top_left", **fam)
    assert step == default
    assert step != top_left


def test_alibi_slope_zero_is_no_bias_and_negative_slopes_are_computed():
    assert oracle.alibi_bias([0.0, -0.5], [3], [0, 5]) == [[[0, 0]], [[1.5, 1.0]]]
    q, k = _grid((1, 1, 3, 2), [0, 0, 3, 5], 1), _grid((1, 1, 3, 2), [0, 0, 2, 3], 4)
    v = _grid((1, 1, 3, 2), [1] * 4, 2)
    assert oracle.attention(q, k, v, family="alibi", params={"slopes": [0.0]}) == oracle.attention(q, k, v)


@pytest.mark.parametrize("fully_masked", ["zero", "nan"])
@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
def test_lengths_padding_rows_and_keys(fully_masked, align):
    """Row b uses its own lengths: its valid queries equal attention on the truncated inputs (positions from align
    on those lengths); padded queries are 0 with lse -inf in both modes; a real query with no key (k_lens = 0)
    follows fully_masked."""
    sq, sk = 4, 5
    q = _grid((3, 2, sq, 2), [5, 3, 5, 7], 1)
    k = _grid((3, 2, sk, 2), [3, 1, 2, 3], 4)
    v = _grid((3, 2, sk, 3), [7, 2, 5, 3], 2)
    q_lens, k_lens = [2, 4, 3], [3, 5, 0]
    fam = {"family": "alibi", "params": {"slopes": [0.5, 0.25]}}
    out, lse = oracle.attention(
        q, k, v, q_lens=q_lens, k_lens=k_lens, causal=True, align=align, fully_masked=fully_masked, **fam
    )
    for b in range(3):
        nq, nk = q_lens[b], k_lens[b]
        for i in range(nq, sq):
            for h in range(2):
                assert out[b][h][i] == [0, 0, 0]
                assert lse[b][h][i] == -math.inf
        if nk == 0:
            for h in range(2):
                for i in range(nq):
                    if fully_masked == "zero":
                        assert out[b][h][i] == [0, 0, 0]
                        assert lse[b][h][i] == -math.inf
                    else:
                        assert all(MPX.isnan(x) for x in out[b][h][i])
                        assert MPX.isnan(lse[b][h][i])
            continue
        qb = [[row[:nq] for row in q[b]]]
        kb, vb = [[row[:nk] for row in k[b]]], [[row[:nk] for row in v[b]]]
        ref = oracle.attention(qb, kb, vb, causal=True, align=align, fully_masked=fully_masked, **fam)
        for h in range(2):
            _near(out[b][h][:nq], ref[0][0][h])
            _near(lse[b][h][:nq], ref[1][0][h])
    qp, _, _, padded = oracle.attention_layout(3, sq, sk, q_lens=q_lens, k_lens=k_lens, align=align)
    shift = align == "bottom_right"
    assert qp == [[i + (k_lens[b] - q_lens[b]) * shift for i in range(sq)] for b in range(3)]
    assert padded == [[i >= n for i in range(sq)] for n in q_lens]


def test_segments_global_positions_see_only_their_segment():
    """A packed row: each query's output equals attention over its own segment alone (causal, ALiBi at the packed
    positions, which within a segment differ from the segment's own only by a common shift)."""
    seg = [[0, 0, 1, 1, 1, 2], [4, 4, 4, 4, 9, 9]]
    q = _grid((2, 1, 6, 2), [5, 3, 5, 7], 1)
    k = _grid((2, 1, 6, 2), [3, 1, 2, 3], 4)
    v = _grid((2, 1, 6, 2), [7, 2, 5, 3], 2)
    fam = {"family": "alibi", "params": {"slopes": [0.375]}}
    out, lse = oracle.attention(q, k, v, q_segment_ids=seg, k_segment_ids=seg, causal=True, **fam)
    for b in range(2):
        for sid in set(seg[b]):
            idx = [t for t, x in enumerate(seg[b]) if x == sid]
            qs, ks, vs = (_sub(_sub(x, 0, [b]), 2, idx) for x in (q, k, v))
            ref = oracle.attention(qs, ks, vs, causal=True, **fam)
            _near([out[b][0][i] for i in idx], ref[0][0][0])
            _near([lse[b][0][i] for i in idx], ref[1][0][0])
    full = oracle.attention(q, k, v, causal=True, **fam)
    assert full[1] != lse


def test_restart_positions_give_the_bias_of_the_segment_alone():
    """Queries of segment 1 at packed indices 1..2 over keys of segment 1 at indices 3..5: with restart the ALiBi
    bias is that of the segment alone (q positions 0, 1; keys 0, 1, 2, i.e. top_left); with global positions (the
    queries bottom-right at 4, 5) it is not."""
    q_seg, k_seg = [[0, 1, 1]], [[0, 0, 0, 1, 1, 1]]
    q = _grid((1, 2, 3, 2), [0, 3, 5, 7], 1)
    k = _grid((1, 1, 6, 2), [0, 1, 2, 3], 4)
    v = _grid((1, 1, 6, 2), [0, 2, 5, 3], 2)
    fam = {"family": "alibi", "params": {"slopes": [0.5, 0.75]}}
    seg = {"q_segment_ids": q_seg, "k_segment_ids": k_seg}
    out, lse = oracle.attention(q, k, v, segment_positions="restart", **seg, **fam)
    alone = oracle.attention(_sub(q, 2, [1, 2]), _sub(k, 2, [3, 4, 5]), _sub(v, 2, [3, 4, 5]), align="top_left", **fam)
    for h in range(2):
        _near(out[0][h][1:], alone[0][0][h])
        _near(lse[0][h][1:], alone[1][0][h])
    glob = oracle.attention(q, k, v, segment_positions="global", **seg, **fam)
    assert glob[1][0][0][1:] != lse[0][0][1:]
    qp, kp, _, _ = oracle.attention_layout(1, 6, 6, q_segment_ids=[[5, 5, 7, 7, 7, 2]],
                                           k_segment_ids=[[1] * 6], segment_positions="restart")  # fmt: skip
    assert qp == [[0, 1, 0, 1, 2, 0]]
    assert kp == [[0, 1, 2, 3, 4, 5]]


def test_feature_arguments_are_checked_with_named_errors():
    q, k, v = [[[[1.0]], [[0.5]]]], [[[[1.0]]]], [[[[2.0]]]]
    bad = [
        ({"window": (-1, 0)}, ValueError, "window left"),
        ({"window": (0,)}, ValueError, r"window must be \(left, right\)"),
        ({"window": (True, 0)}, TypeError, "window left"),
        ({"window": (0, 1.5)}, TypeError, "window right"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"softcap": -1.0}, ValueError, "softcap"),
        ({"softcap": math.inf}, ValueError, "softcap"),
        ({"softcap": True}, TypeError, "softcap"),
        ({"q_lens": [2]}, ValueError, r"q_lens\[0\] must be in \[0, 1\]"),
        ({"k_lens": [1, 1]}, ValueError, r"k_lens must have shape \(1,\)"),
        ({"q_pos": [0, 1]}, ValueError, "q_pos must have shape"),
        ({"k_pos": [[0], [1]]}, ValueError, "k_pos must have shape"),
        ({"q_pos": [0.5]}, TypeError, "q_pos"),
        ({"q_segment_ids": [[0]]}, ValueError, "give both or neither"),
        ({"segment_positions": "restart"}, ValueError, "needs q_segment_ids"),
        ({"segment_positions": "local"}, ValueError, "segment_positions must be"),
        (
            {"q_segment_ids": [[0]], "k_segment_ids": [[0]], "segment_positions": "restart", "q_pos": [3]},
            ValueError,
            "do not also give q_pos",
        ),
        ({"bias": [[[[0.0]]]], "family": "alibi", "params": {"slopes": [1.0]}}, ValueError, "not both"),
    ]
    for kw, err, match in bad:
        with pytest.raises(err, match=match):
            oracle.attention(q, k, v, **kw)
    with pytest.raises(ValueError, match="reappears"):
        oracle.attention_layout(1, 3, 3, q_segment_ids=[[0, 1, 0]], k_segment_ids=[[0, 0, 0]],
                                segment_positions="restart")  # fmt: skip
