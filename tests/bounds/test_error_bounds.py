"""The documented error bounds (relpos_ref/bounds.py, spec/tolerances.md) hold against the mpmath oracle.

Hypothesis draws parameters, positions and inputs; every draw is rounded to the dtype under test first, so the oracle
sees exactly the numbers the library sees and the measured error is the library's alone. Also: integer outputs are
exact, float64 biases are within a few ulp, and the precision hazards users meet are demonstrated with numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import relpos_ref as rp
from relpos_ref import bounds, oracle

DTYPES = list(bounds.DTYPES)
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _need(xp, dtype):
    if bounds.xp_dtype(xp, dtype) is None:
        pytest.skip(f"{dtype} is not available in {xp.__name__} (bfloat16 is tested through ml_dtypes on NumPy)")


def _assert_within(m: bounds.Measurement, what: str):
    if m.err.size == 0:
        return
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(m.err == 0, 0.0, m.err / m.bound)
    i = int(np.argmax(r))
    assert r.ravel()[i] <= 1.0, (
        f"{what}: error {m.err.ravel()[i]:.4g} exceeds the documented bound {m.bound.ravel()[i]:.4g} "
        f"(value {m.value.ravel()[i]!r}, ratio {r.ravel()[i]:.3g})"
    )


positions = st.lists(st.one_of(st.integers(0, 300), st.integers(0, 10**6)), min_size=1, max_size=5)


def _pos(draw_list):
    return sorted(set(draw_list))


def _positive(values, dtype):
    r = bounds.round_to(np.asarray(values, dtype=np.float64), dtype)
    assume(np.all(r > 0) and np.all(np.isfinite(r)))
    return r


# ---------------------------------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def family_case(draw, name, dtype):
    q = _pos(draw(positions))
    k = _pos(draw(positions))
    h = draw(st.integers(1, 4))
    if name == "alibi":
        slopes = _positive(draw(st.lists(st.floats(1e-4, 1.0), min_size=h, max_size=h)), dtype)
        return {"slopes": slopes}, {}, q, k
    if name == "kerple_power":
        r1 = _positive(draw(st.lists(st.floats(1e-6, 4.0), min_size=h, max_size=h)), dtype)
        r2 = _positive(draw(st.lists(st.one_of(st.floats(0.01, 2.0), st.just(2.0)), min_size=h, max_size=h)), dtype)
        assume(np.all(r2 <= 2.0))
        return {"r1": r1, "r2": r2}, {}, q, k
    if name == "kerple_log":
        r1 = _positive(draw(st.lists(st.floats(1e-6, 8.0), min_size=h, max_size=h)), dtype)
        r2 = _positive(draw(st.lists(st.floats(1e-4, 64.0), min_size=h, max_size=h)), dtype)
        return {"r1": r1, "r2": r2}, {}, q, k
    if name == "fire":
        w = draw(st.integers(1, 8))
        fl = st.floats(-2.0, 2.0)
        params = {
            "w1": bounds.round_to(np.array(draw(st.lists(fl, min_size=w, max_size=w))).reshape(w, 1), dtype),
            "b1": bounds.round_to(np.array(draw(st.lists(fl, min_size=w, max_size=w))), dtype),
            "w2": bounds.round_to(np.array(draw(st.lists(fl, min_size=w * h, max_size=w * h))).reshape(h, w), dtype),
            "b2": bounds.round_to(np.array(draw(st.lists(fl, min_size=h, max_size=h))), dtype),
            "c": _positive(draw(st.floats(1e-3, 20.0)), dtype),
            "L": _positive(draw(st.floats(1.0, 1000.0)), dtype),
        }
        return params, {"eps": draw(st.sampled_from([0.0, 1e-6]))}, q, k
    if name == "sandwich":
        return {}, {"num_heads": draw(st.integers(1, 8)), "head_dim": draw(st.sampled_from([2, 8, 32, 64, 128]))}, q, k
    if name == "t5":
        nb, md = draw(st.sampled_from([(32, 128), (16, 128), (64, 256), (32, 256), (8, 20)]))
        table = bounds.round_to(np.array(draw(st.lists(st.floats(-10, 10), min_size=h * nb, max_size=h * nb))), dtype)
        return {"table": table.reshape(h, nb)}, {"bidirectional": draw(st.booleans()), "max_distance": md}, q, k
    if name == "offset":
        kk = draw(st.integers(0, 5))
        n = h * (2 * kk + 1)
        table = bounds.round_to(np.array(draw(st.lists(st.floats(-10, 10), min_size=n, max_size=n))), dtype)
        return {"table": table.reshape(h, 2 * kk + 1)}, {}, q, k
    raise AssertionError(name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["alibi", "kerple_power", "kerple_log", "fire", "sandwich", "t5", "offset"])
def test_family_error_within_bound(xp, name, dtype):
    _need(xp, dtype)

    @FIXTURE_OK
    @given(case=family_case(name, dtype))
    def check(case):
        params, options, q, k = case
        m = bounds.measure_family(name, params, options, q, k, xp, dtype)
        _assert_within(m, f"{name} {dtype} q={q} k={k} params={ {a: b.tolist() for a, b in params.items()} }")

    check()


@pytest.mark.parametrize("dtype", DTYPES)
def test_alibi_slopes_within_bound(xp, dtype):
    _need(xp, dtype)
    for h in (*range(1, 33), 48, 64, 71, 100, 128, 255, 256):
        got = rp.alibi_slopes(h, dtype=bounds.xp_dtype(xp, dtype), xp=xp)
        m = bounds._measure(
            got, oracle.alibi_slopes(h, dps=30), lambda v, h=h: bounds.alibi_slopes_bound(h, dtype), dtype
        )
        _assert_within(m, f"alibi_slopes({h}) {dtype}")


def test_float64_biases_within_a_few_ulp(xp):
    """ALiBi and KERPLE in float64: at most 2 ulp from the exact value (at distances up to 1e6)."""
    rng = np.random.default_rng(5)
    pos = [0, 1, 2, 17, 1000, 65537, 999_999, 1_000_000]
    cases = [
        ("alibi", {"slopes": np.array([2.0 ** float(e) for e in oracle.alibi_slope_log2(12)])}),
        ("kerple_power", {"r1": rng.uniform(0.01, 3, 5), "r2": np.array([2.0, 1.0, 0.5, 0.01, 1.7])}),
        ("kerple_log", {"r1": rng.uniform(0.01, 3, 5), "r2": np.array([1e-4, 0.5, 1.0, 8.0, 64.0])}),
    ]
    for name, params in cases:
        m = bounds.measure_family(name, params, {}, pos, pos, xp, "float64", dps=40)
        ulps = m.err / bounds.ulp(m.value, "float64")
        assert float(ulps.max()) <= 2.0, (name, float(ulps.max()))


# ---------------------------------------------------------------------------------------------------------------------
# Softmax and attention
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def softmax_case(draw):
    rows, n = draw(st.integers(1, 3)), draw(st.integers(1, 200))
    seed = draw(st.integers(0, 2**32 - 1))
    spread = draw(st.sampled_from([0.1, 3.0, 30.0, 1000.0]))
    rng = np.random.default_rng(seed)
    scores = rng.normal(0, spread, (rows, n))
    bias = -np.abs(rng.normal(0, draw(st.sampled_from([0.5, 5.0, 1e3])), (rows, n))) if draw(st.booleans()) else None
    drop = draw(st.sampled_from([0.0, 0.3, 1.0]))
    mask = (rng.random((rows, n)) >= drop) if drop else None
    return {
        "scores": scores,
        "bias": bias,
        "mask": mask,
        "scale": draw(st.sampled_from([1.0, 0.125, 1 / math.sqrt(48), 0.3])),
        "placement": draw(st.sampled_from(["post_scale", "pre_scale"])),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_error_within_bound(xp, dtype):
    _need(xp, dtype)

    @FIXTURE_OK
    @given(case=softmax_case())
    def check(case):
        case = dict(case)
        case["scores"] = bounds.round_to(case["scores"], dtype)
        if case["bias"] is not None:
            case["bias"] = bounds.round_to(case["bias"], dtype)
        mp_, ml_ = bounds.measure_softmax(case, xp, dtype)
        _assert_within(mp_, f"softmax probs {dtype}")
        _assert_within(ml_, f"softmax lse {dtype}")

    check()


@st.composite
def attention_case(draw):
    nkv = draw(st.sampled_from([1, 2]))
    nh = nkv * draw(st.sampled_from([1, 2]))
    nb, sq, sk, d = draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 40)), draw(st.integers(1, 16))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.sampled_from([0.3, 1.0, 4.0]))
    return {
        "q": rng.normal(0, spread, (nb, nh, sq, d)),
        "k": rng.normal(0, spread, (nb, nkv, sk, d)),
        "v": rng.normal(0, 1, (nb, nkv, sk, draw(st.integers(1, 4)))),
        "bias": -np.abs(rng.normal(0, 3, (nh, sq, sk))) if draw(st.booleans()) else None,
        "causal": draw(st.booleans()),
        "align": draw(st.sampled_from(["bottom_right", "top_left"])),
        "placement": draw(st.sampled_from(["post_scale", "pre_scale"])),
        "scale": draw(st.sampled_from([1.0, 0.125, 1 / math.sqrt(d)])),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_error_within_bound(xp, dtype):
    _need(xp, dtype)

    @FIXTURE_OK
    @given(case=attention_case())
    def check(case):
        case = {k: (bounds.round_to(v, dtype) if isinstance(v, np.ndarray) else v) for k, v in case.items()}
        mo, ml_ = bounds.measure_attention(case, xp, dtype)
        _assert_within(mo, f"attention out {dtype}")
        _assert_within(ml_, f"attention lse {dtype}")

    check()


# ---------------------------------------------------------------------------------------------------------------------
# Integer outputs are exact everywhere
# ---------------------------------------------------------------------------------------------------------------------


@given(q_len=st.integers(1, 40), k_len=st.integers(1, 40), align=st.sampled_from(["bottom_right", "top_left"]))
@FIXTURE_OK
def test_positions_and_masks_exact(xp, q_len, k_len, align):
    qp, kp = rp.positions(q_len, k_len, align=align, xp=xp)
    oq, ok = oracle.positions(q_len, k_len, align=align)
    assert bounds.to_host(qp).tolist() == oq
    assert bounds.to_host(kp).tolist() == ok
    assert bounds.to_host(rp.causal_mask(qp, kp)).tolist() == oracle.causal_mask(oq, ok)
    assert bounds.to_host(rp.relative_offsets(qp, kp)).tolist() == oracle.relative_offsets(oq, ok)


@given(
    st.lists(st.integers(-(10**9), 10**9), min_size=1, max_size=50),
    st.sampled_from([(32, 128), (16, 128), (64, 256), (32, 256), (8, 20), (2, 3), (4, 5)]),
    st.booleans(),
)
@FIXTURE_OK
def test_t5_bucket_exact(xp, deltas, config, bidirectional):
    nb, md = config
    assume(not bidirectional or nb >= 4)
    got = rp.t5_bucket(xp.asarray(deltas, dtype=xp.int64), bidirectional=bidirectional, num_buckets=nb, max_distance=md)
    want = [oracle.t5_bucket(d, bidirectional=bidirectional, num_buckets=nb, max_distance=md) for d in deltas]
    assert bounds.to_host(got).tolist() == want


# ---------------------------------------------------------------------------------------------------------------------
# Tightness: the documented bounds are not loose by more than 10x where the error is one or two roundings
# ---------------------------------------------------------------------------------------------------------------------

TIGHT = ("alibi", "alibi_slopes", "kerple_power", "kerple_log", "softmax")


def test_oracle_table_default_passes_and_tight_rows_are_tight():
    import array_api_compat.numpy as npc

    rows = bounds.oracle_table(
        [npc],
        ["float64", "float32", "float16", "bfloat16"],
        families=["t5_bucket", *bounds.FAMILIES, "alibi_slopes", "softmax"],
    )
    assert rows
    failed = [r for r in rows if not r["passed"]]
    assert not failed, failed
    for r in rows:
        if r["family"] in TIGHT:
            assert r["ratio"] >= 0.1, f"bound for {r['family']} {r['dtype']} is loose: ratio {r['ratio']:.3g}"
        if r["family"] in ("t5", "offset", "t5_bucket"):
            assert r["max_abs_err"] == 0


@pytest.mark.slow
def test_oracle_table_thorough_passes():
    import array_api_compat.numpy as npc
    import array_api_strict

    rows = bounds.oracle_table([npc, array_api_strict], list(bounds.DTYPES), thorough=True)
    failed = [r for r in rows if not r["passed"]]
    assert not failed, failed


# ---------------------------------------------------------------------------------------------------------------------
# Precision hazards users meet (documented in spec/tolerances.md)
# ---------------------------------------------------------------------------------------------------------------------


def test_hazard_alibi_float16_overflow(xp):
    """-0.5 * |delta| leaves float16's range at |delta| = 131040 (65520 rounds to infinity); 131039 still rounds
    to the largest finite value 65504."""
    _need(xp, "float16")
    fam = rp.ALiBi(xp.asarray([0.5], dtype=xp.float16))
    with np.errstate(over="ignore"):  # NumPy reports the overflow of the final float32 -> float16 rounding
        b = bounds.to_host(
            fam.bias(xp.asarray([131039, 131040, 10**6], dtype=xp.int64), xp.asarray([0], dtype=xp.int64))
        )
    assert b[0, 0, 0] == -65504.0
    assert b[0, 1, 0] == -np.inf
    assert b[0, 2, 0] == -np.inf
    # the same biases in float32 are exact
    b32 = bounds.to_host(
        rp.ALiBi(xp.asarray([0.5], dtype=xp.float32)).bias(
            xp.asarray([131040, 10**6], dtype=xp.int64), xp.asarray([0], dtype=xp.int64)
        )
    )
    assert b32.ravel().tolist() == [-65520.0, -500000.0]


def test_hazard_key_only_alibi_in_bfloat16():
    """The key-only form +m*j (official code, BLOOM, FlashAttention's causal kernel) puts the largest magnitudes,
    about m*i, on the nearest keys; in bfloat16 their spacing at m*i = 4095.5 is 16, so neighbouring keys (which
    differ by m = 0.5) collapse and the attention weights of the nearest keys are wrong by O(1). The relative form
    -m|i-j| keeps the nearest keys exact and meets the softmax bound."""
    import array_api_compat.numpy as npc

    bf16 = bounds.np_dtype("bfloat16")
    m, i = 0.5, 8191
    j = np.arange(i + 1)
    scores = npc.asarray(np.zeros((1, i + 1)).astype(bf16))
    rel = (-m * (i - j)).reshape(1, -1)
    key_only = (m * j).reshape(1, -1)
    p_rel = bounds.to_host(rp.biased_softmax(scores, npc.asarray(rel.astype(bf16))))
    p_key = bounds.to_host(rp.biased_softmax(scores, npc.asarray(key_only.astype(bf16))))
    exact = oracle.biased_softmax([[0.0] * (i + 1)], [rel[0].tolist()], dps=30)[0][0]
    want = np.array([float(x) for x in exact])
    err_rel = np.abs(p_rel[0] - want).max()
    err_key = np.abs(p_key[0] - want).max()
    assert err_rel <= bounds.unit_roundoff("bfloat16") * want.max()  # relative form: final rounding of p only
    assert err_key >= 0.1  # key-only form: the nearest keys' weights are wrong by more than 0.1
    # the logit error of the key-only form is half a bfloat16 ulp of m*i (spacing 16 at 4095.5)
    logit_err = np.abs(key_only.astype(bf16).astype(np.float64) - key_only).max()
    assert logit_err == 8.0 == bounds.ulp(m * i, "bfloat16")[()] / 2


def test_hazard_slopes_stored_in_bfloat16(xp):
    """Falcon stores ALiBi slopes in bfloat16. The stored slope differs from the official one by up to
    u = 2**-8 relative (0.2 % measured), and the bias follows the stored slope: at distance 8192 the 12-head biases
    move by up to 0.62 logits, on top of the bfloat16 rounding of the bias itself."""
    _need(xp, "bfloat16")
    worst = 0.0
    for h in range(1, 257):
        stored = bounds.to_host(rp.alibi_slopes(h, dtype=bounds.xp_dtype(xp, "bfloat16"), xp=xp))
        exact = np.array([2.0 ** float(e) for e in oracle.alibi_slope_log2(h)])
        dev = np.abs(stored - exact) / exact
        assert dev.max() <= bounds.unit_roundoff("bfloat16")  # 2**-8, half an ulp relative
        worst = max(worst, float(dev.max()))
    assert worst > 1e-3  # the rounding is real: some slopes move by more than 0.1 %
    fam = rp.ALiBi.from_num_heads(12, dtype=bounds.xp_dtype(xp, "bfloat16"), xp=xp)
    b = bounds.to_host(fam.bias(xp.asarray([8192], dtype=xp.int64), xp.asarray([0], dtype=xp.int64)))[:, 0, 0]
    exact_b = -8192 * np.array([2.0 ** float(e) for e in oracle.alibi_slope_log2(12)])
    shift = np.abs(b - exact_b)
    u = bounds.unit_roundoff("bfloat16")
    assert np.all(shift <= np.abs(exact_b) * u + bounds.ulp(exact_b, "bfloat16") / 2)  # stored slope, then rounding
    assert shift.max() >= 0.5  # half a logit at 8192 tokens (0.62 measured for 12 heads)


# ---------------------------------------------------------------------------------------------------------------------
# Kernel features in the oracle table: each feature row measures the feature (a reference that drops it fails)
# ---------------------------------------------------------------------------------------------------------------------

FEATURE_NAMES = ("window", "q_pos", "q_lens", "q_segment_ids")


def _feature_cases(dtype):
    cases = list(bounds.measure._attention_cases(dtype, False, np.random.default_rng(3)))
    return [c for c in cases if any(n in c for n in FEATURE_NAMES)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_feature_cases_within_bound(xp, dtype):
    _need(xp, dtype)
    cases = _feature_cases(dtype)
    assert {n for c in cases for n in FEATURE_NAMES if n in c} == set(FEATURE_NAMES)
    for case in cases:
        mo, ml_ = bounds.measure_attention(case, xp, dtype)
        _assert_within(mo, f"attention out {dtype} {sorted(case)}")
        _assert_within(ml_, f"attention lse {dtype} {sorted(case)}")


@pytest.mark.parametrize("drop", ["window", "q_pos", "q_lens", "k_lens", "q_segment_ids"])
def test_feature_case_fails_when_the_reference_drops_it(monkeypatch, drop):
    import array_api_compat.numpy as npc

    real = bounds.measure.attention

    def dropping(*args, **kw):
        kw.pop(drop, None)
        if drop == "q_segment_ids":
            kw.pop("k_segment_ids", None)
            kw.pop("segment_positions", None)
        return real(*args, **kw)

    monkeypatch.setattr(bounds.measure, "attention", dropping)
    case = next(c for c in _feature_cases("float64") if drop in c)
    mo, ml_ = bounds.measure_attention(case, npc, "float64")
    assert mo.summary()["ratio"] > 1 or ml_.summary()["ratio"] > 1
