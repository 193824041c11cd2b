"""Unit tests of the bias families: values against independent computations, and the shared family contract.

Independent computations: hand-typed values from the research notes (formulas.md), mpmath, and plain NumPy float64
or Python loops written here. The family contract: parameters()/options()/astype, immutability, head selection, the
float16 policy (computed in float32, rounded once) and namespace/dtype preservation on every backend.
"""

from __future__ import annotations

import math
import re

import array_api_compat.numpy as np_compat
import array_api_strict
import mpmath
import numpy as np
import pytest
from array_api_compat import array_namespace

import relpos_ref as rp
from relpos_ref.families import FAMILIES as REGISTRY
from relpos_ref.families import example_family


def to_np(x):
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)


def ns_name(a) -> str:
    return array_namespace(a).__name__


def np_positions(q_len, k_len, align="bottom_right"):
    start = k_len - q_len if align == "bottom_right" else 0
    return np.arange(start, start + q_len), np.arange(k_len)


# -- family factories: float64 NumPy parameters, converted to the backend and dtype under test -------------------

RNG = np.random.default_rng(20240601)
H = 4
FIRE_W = 6
PARAMS = {
    "ALiBi": {"slopes": np.array([0.5, 0.25, 0.125, 0.0625])},
    "KerplePower": {"r1": np.array([0.5, 1.0, 1.5, 0.25]), "r2": np.array([0.5, 1.0, 2.0, 1.25])},
    "KerpleLog": {"r1": np.array([1.0, 0.5, 2.0, 0.75]), "r2": np.array([0.5, 1.0, 0.25, 2.0])},
    "T5Bias": {"table": RNG.standard_normal((H, 32))},
    "OffsetBias": {"table": RNG.standard_normal((H, 9))},
    "FIRE": {
        "w1": RNG.standard_normal((FIRE_W, 1)),
        "b1": RNG.standard_normal(FIRE_W),
        "w2": RNG.standard_normal((H, FIRE_W)),
        "b2": RNG.standard_normal(H),
    },
    "TensorBias": {"array": RNG.standard_normal((H, 5, 7))},
}
OPTIONS = {
    "T5Bias": {"bidirectional": True, "max_distance": 20, "layout": "heads_buckets"},
    "FIRE": {"c": 0.25, "L": 3.0, "eps": 1e-6},
}
FAMILIES = [*PARAMS, "Sandwich"]


def make(name, xp, dtype=None):
    """Family ``name`` with its parameters in namespace ``xp`` and ``dtype`` (float64 by default)."""
    dtype = xp.float64 if dtype is None else dtype
    if name == "Sandwich":
        return rp.Sandwich(H, 16, dtype=dtype, xp=xp)
    params = {k: xp.asarray(v, dtype=dtype) for k, v in PARAMS[name].items()}
    opts = dict(OPTIONS.get(name, {}))
    if name == "FIRE":
        opts["c"] = xp.asarray(opts["c"], dtype=dtype)
        opts["L"] = xp.asarray(opts["L"], dtype=dtype)
    return getattr(rp, name)(**params, **opts)


def pos_for(name, xp):
    """Positions suited to the family: TensorBias needs its own lengths; the others get Sq < Sk, bottom-right."""
    q_len, k_len = (5, 7) if name == "TensorBias" else (6, 30)
    return rp.positions(q_len, k_len, xp=xp)


# -- ALiBi ----------------------------------------------------------------------------------------------------------

SLOPE_LOG2 = {
    1: [-8.0],
    6: [-2.0, -4.0, -6.0, -8.0, -1.0, -3.0],
    8: [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0],
    12: [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -0.5, -1.5, -2.5, -3.5],
    16: [-0.5 * k for k in range(1, 17)],
    20: [*(-0.5 * k for k in range(1, 17)), -0.25, -0.75, -1.25, -1.75],
}


@pytest.mark.parametrize("num_heads", sorted(SLOPE_LOG2))
def test_alibi_slopes_official_rule(xp, num_heads):
    slopes = rp.alibi_slopes(num_heads, xp=xp)
    assert slopes.dtype == xp.float64
    assert ns_name(slopes) == xp.__name__
    # Powers of two with these exponents are exact in float64, so equality is exact.
    assert to_np(slopes).tolist() == [2.0**e for e in SLOPE_LOG2[num_heads]]


def test_alibi_slopes_official_recursion():
    # The recursion of ofirpress/attention_with_linear_biases get_slopes, replayed with Python floats.
    def get_slopes(n):
        def power_of_2(n):
            start = 2 ** (-(2 ** -(math.log2(n) - 3)))
            return [start * start**i for i in range(n)]

        if math.log2(n).is_integer():
            return power_of_2(n)
        c = 2 ** math.floor(math.log2(n))
        return power_of_2(c) + get_slopes(2 * c)[0::2][: n - c]

    # The official route multiplies floats (start * start**i), so it may be a few ulps off the exact powers of
    # two that alibi_slopes returns; the exponents agree.
    for n in range(1, 80):
        np.testing.assert_allclose(rp.alibi_slopes(n), get_slopes(n), rtol=8 * 2.0**-52, atol=0)


def test_alibi_slopes_dtype(xp):
    s32 = rp.alibi_slopes(12, dtype=xp.float32, xp=xp)
    assert s32.dtype == xp.float32
    # 2**-0.5 and friends are rounded once to float32.
    assert to_np(s32).tolist() == [float(np.float32(2.0**e)) for e in SLOPE_LOG2[12]]


@pytest.mark.parametrize(
    ("q_len", "k_len", "align"), [(7, 7, "bottom_right"), (3, 9, "bottom_right"), (6, 2, "top_left")]
)
def test_alibi_bias_values(xp, q_len, k_len, align):
    fam = rp.ALiBi.from_num_heads(6, xp=xp)
    q_pos, k_pos = rp.positions(q_len, k_len, align=align, xp=xp)
    got = to_np(fam.bias(q_pos, k_pos))
    qn, kn = np_positions(q_len, k_len, align)
    slopes = np.array([2.0**e for e in SLOPE_LOG2[6]])
    expected = -slopes[:, None, None] * np.abs(qn[:, None] - kn[None, :])[None]
    np.testing.assert_array_equal(got, expected)  # products of powers of two and integers: exact
    assert fam.parameters().keys() == {"slopes"}
    assert fam.options() == {}


def test_alibi_zero_slope_is_a_head_without_bias(xp):
    # NeMo's num_attention_heads_alibi, x-transformers' alibi_num_heads: the heads past the ALiBi ones get slope 0.
    fam = rp.ALiBi(xp.asarray([0.5, 0.0]))
    q_pos, k_pos = rp.positions(4, 6, xp=xp)
    got = to_np(fam.bias(q_pos, k_pos))
    delta = np.arange(2, 6)[:, None] - np.arange(6)[None, :]
    np.testing.assert_array_equal(got[0], -0.5 * np.abs(delta))
    np.testing.assert_array_equal(got[1], np.zeros((4, 6)))
    assert fam.monotone
    assert fam.options() == {}


def test_alibi_negative_slopes_only_when_asked(xp):
    with pytest.raises(
        ValueError, match=r"^slopes: expected values >= 0 \(or allow_any_sign=True .*got \[ 0\.5 +-0\.25\]$"
    ):
        rp.ALiBi(xp.asarray([0.5, -0.25]))
    fam = rp.ALiBi(xp.asarray([0.5, -0.25]), allow_any_sign=True)
    q_pos, k_pos = rp.positions(3, 3, xp=xp)
    got = to_np(fam.bias(q_pos, k_pos))
    delta = np.abs(np.arange(3)[:, None] - np.arange(3)[None, :])
    np.testing.assert_array_equal(got[1], 0.25 * delta)  # a negative slope rewards distance
    # The monotone penalty holds only for slopes >= 0: this object says so, the class keeps its default's trait.
    assert not fam.monotone
    assert rp.ALiBi.monotone
    assert rp.ALiBi(xp.asarray([0.5, 0.25]), allow_any_sign=True).monotone
    # The keyword travels with the object (astype rebuilds it from its options).
    assert fam.options() == {"allow_any_sign": True}
    assert not fam.astype(xp.float32).monotone
    with pytest.raises(TypeError, match=r"^allow_any_sign: expected True or False, got 1$"):
        rp.ALiBi(xp.asarray([0.5]), allow_any_sign=1)
    with pytest.raises(ValueError, match=r"^slopes: expected finite values"):
        rp.ALiBi(xp.asarray([math.nan]), allow_any_sign=True)


def test_monotone_penalty_holds_for_zero_slopes_and_fails_for_negative_ones():
    from relpos_ref.properties import penalty_monotone

    # The property itself fails on a negative slope, so a reader of `monotone` that ignored the sign would fail.
    neg = rp.ALiBi(np.array([0.5, -0.25]), allow_any_sign=True)
    assert not penalty_monotone(neg.bias, 10, xp=np, sides=("past",)).passed
    assert penalty_monotone(rp.ALiBi(np.array([0.5, 0.0])).bias, 10, xp=np, sides=("past",)).passed


# -- KERPLE ---------------------------------------------------------------------------------------------------------


def test_kerple_log_worked_example(xp):
    # formulas.md section 4: r1 = 1, r2 = 0.5 at |Delta| = 0, 1, 2, 10, 100.
    fam = rp.KerpleLog(xp.asarray([1.0]), xp.asarray([0.5]))
    q_pos = xp.asarray([100], dtype=xp.int64)
    k_pos = xp.asarray([100, 99, 98, 90, 0, 101, 110], dtype=xp.int64)  # distances 0, 1, 2, 10, 100, 1, 10
    got = to_np(fam.bias(q_pos, k_pos))[0, 0]
    assert np.round(got[:5], 4).tolist() == [0.0, -0.4055, -0.6931, -1.7918, -3.9318]
    with mpmath.workdps(40):
        exact = [float(-mpmath.log(1 + mpmath.mpf(1) / 2 * n)) for n in (0, 1, 2, 10, 100, 1, 10)]
    np.testing.assert_allclose(got, exact, rtol=1e-15, atol=0)
    assert got[0] == 0.0


def _mp_kerple(kind, r1, r2, n):
    r1, r2, n = mpmath.mpf(float(r1)), mpmath.mpf(float(r2)), mpmath.mpf(int(n))
    if kind == "power":
        return -r1 * (n**r2 if n else mpmath.mpf(0))
    return -r1 * mpmath.log(1 + r2 * n)


@pytest.mark.parametrize(("kind", "cls"), [("power", rp.KerplePower), ("log", rp.KerpleLog)])
def test_kerple_against_mpmath(xp, kind, cls):
    r1 = [0.5, 1.0, 3.0, 0.01]
    r2 = [0.01, 0.5, 1.0, 2.0] if kind == "power" else [0.01, 0.5, 1.0, 7.0]
    fam = cls(xp.asarray(r1), xp.asarray(r2))
    q_pos, k_pos = rp.positions(4, 300, xp=xp)
    got = to_np(fam.bias(q_pos, k_pos))
    qn, kn = np_positions(4, 300)
    dist = np.abs(qn[:, None] - kn[None, :])
    with mpmath.workdps(40):
        for h in range(4):
            for i in range(4):
                for j in range(0, 300, 7):
                    exact = float(_mp_kerple(kind, r1[h], r2[h], dist[i, j]))
                    assert got[h, i, j] == pytest.approx(exact, rel=1e-15, abs=0), (h, i, j)
    assert (got[:, np.arange(4), 296 + np.arange(4)] == 0).all()  # zero at Delta = 0
    assert (np.diff(got[:, -1, ::-1], axis=-1) <= 0).all()  # non-increasing in distance


def test_kerple_power_r2_two_is_quadratic(xp):
    fam = rp.KerplePower(xp.asarray([0.5]), xp.asarray([2.0]))
    got = to_np(fam.bias(*rp.positions(1, 50, xp=xp)))[0, 0]
    want = -0.5 * np.arange(49, -1, -1.0) ** 2
    if ns_name(xp.asarray(0.0)).endswith("cupy"):
        # CUDA's pow is accurate to 2 ulp, not exact on integer squares (seen on an H200: 30**2 -> 900 + 1 ulp).
        np.testing.assert_allclose(got, want, rtol=4 * np.finfo(np.float64).eps, atol=0)
    else:
        np.testing.assert_array_equal(got, want)


# -- FIRE -------------------------------------------------------------------------------------------------------------

# formulas.md section 5, computed with the listing's eps = 1e-6, to 5 decimals.
FIRE_X_TABLE = {
    (0, 0): 0.0,
    (10, 9): 0.02410,
    (10, 0): 0.17525,
    (511, 0): 0.99951,
    (1000, 0): 1.0,
    (2000, 1000): 0.87023,
}


def _fire(xp, w=2, h=1, *, c=0.1, L=512.0, eps=0.0, seed=0, dtype=None):
    rng = np.random.default_rng(seed)
    dtype = xp.float64 if dtype is None else dtype
    arrays = [rng.standard_normal(s) for s in ((w, 1), (w,), (h, w), (h,))]
    return rp.FIRE(*(xp.asarray(a, dtype=dtype) for a in arrays), c=c, L=L, eps=eps), arrays


def _mp_fire_x(i, j, c, L, eps):
    with mpmath.workdps(40):
        c = mpmath.mpf(c)
        num = mpmath.log(1 + c * abs(i - j))
        den = mpmath.log(1 + c * max(mpmath.mpf(L), i)) + mpmath.mpf(eps)
        return num / den


def test_fire_interpolant_table(xp):
    for eps in (0.0, 1e-6):
        fam, _ = _fire(xp, eps=eps)
        for (i, j), value in FIRE_X_TABLE.items():
            x = float(to_np(fam.interpolant(xp.asarray([i], dtype=xp.int64), xp.asarray([j], dtype=xp.int64)))[0, 0])
            if eps:
                assert round(x, 5) == value, (i, j)
            else:
                # Without eps, (511, 0) is 0.9995152 and rounds up; the table's 5 decimals hold to 1e-5.
                assert abs(x - value) < 1e-5, (i, j)
            assert x == pytest.approx(float(_mp_fire_x(i, j, 0.1, 512.0, eps)), rel=1e-14, abs=0)


def test_fire_eps_changes_x_by_the_expected_amount():
    # x_eps = x_0 * norm / (norm + eps): with eps = 1e-6 and norm = log1p(51.2) ~ 3.955 the change is x * 2.5e-7.
    q_pos = np.array([10, 511, 1000, 2000])
    k_pos = np.array([0])
    x0 = rp.FIRE(np.ones((1, 1)), np.zeros(1), np.ones((1, 1)), np.zeros(1), eps=0.0).interpolant(q_pos, k_pos)
    x6 = rp.FIRE(np.ones((1, 1)), np.zeros(1), np.ones((1, 1)), np.zeros(1), eps=1e-6).interpolant(q_pos, k_pos)
    diff = (x0 - x6)[:, 0]
    expected = [float(_mp_fire_x(int(i), 0, 0.1, 512.0, 0.0) - _mp_fire_x(int(i), 0, 0.1, 512.0, 1e-6)) for i in q_pos]
    assert (diff > 0).all()
    assert (diff < 1e-6).all()
    np.testing.assert_allclose(diff, expected, rtol=1e-7)


def test_fire_mlp_against_loops(xp):
    w, h = 5, 3
    c, L, eps = 0.3, 4.0, 1e-6
    fam, (w1, b1, w2, b2) = _fire(xp, w, h, c=c, L=L, eps=eps, seed=7)
    q_len, k_len = 6, 9
    got = to_np(fam.bias(*rp.positions(q_len, k_len, xp=xp)))
    qn, kn = np_positions(q_len, k_len)
    expected = np.zeros((h, q_len, k_len))
    for a, i in enumerate(qn):
        for b, j in enumerate(kn):
            x = math.log1p(c * abs(int(i) - int(j))) / (math.log1p(c * max(L, float(i))) + eps)
            for head in range(h):
                total = b2[head]
                for unit in range(w):
                    total += w2[head, unit] * max(0.0, w1[unit, 0] * x + b1[unit])
                expected[head, a, b] = total
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-14)
    assert fam.parameters().keys() == {"w1", "b1", "w2", "b2", "c", "L"}
    assert fam.options() == {"eps": eps}
    assert tuple(fam.parameters()["c"].shape) == ()
    assert tuple(fam.parameters()["L"].shape) == ()


def test_fire_uses_absolute_query_position(xp):
    # Sq < Sk bottom-right with query positions beyond L: the normaliser must use the absolute position.
    fam, _ = _fire(xp, 4, 2, c=0.1, L=16.0, seed=3)
    q_pos, k_pos = rp.positions(2, 40, xp=xp)  # q_pos = 38, 39 > L
    tail = to_np(fam.bias(q_pos, k_pos))
    full = to_np(fam.bias(*rp.positions(40, 40, xp=xp)))
    np.testing.assert_array_equal(tail, full[:, 38:, :])
    # Row-local positions (0, 1) would give a different normaliser psi(L) instead of psi(38), psi(39).
    local = to_np(fam.bias(xp.asarray([0, 1], dtype=xp.int64), xp.asarray(np.arange(40) - 38, dtype=xp.int64)))
    assert not np.allclose(tail, local)
    x = to_np(fam.interpolant(q_pos, k_pos))
    assert x[0, 0] == pytest.approx(float(_mp_fire_x(38, 0, 0.1, 16.0, 0.0)), rel=1e-14)


# -- Sandwich -------------------------------------------------------------------------------------------------------


def nemo_sandwich(num_heads, head_dim, dist):
    """NeMo SandwichRelativePositionEmbedding, cos form, float64."""
    k = np.arange(1, head_dim // 2 + 1, dtype=np.float64)
    omega = 10000.0 ** (-2.0 * k / head_dim)
    s = np.cos(np.asarray(dist, dtype=np.float64)[..., None] * omega).sum(-1) - head_dim / 2
    div = 8.0 * np.arange(1, num_heads + 1) / num_heads
    return s[None] / div.reshape((-1,) + (1,) * np.ndim(dist))


@pytest.mark.parametrize(("num_heads", "head_dim"), [(1, 2), (4, 16), (8, 64), (3, 128)])
def test_sandwich_against_nemo_cos_form(xp, num_heads, head_dim):
    fam = rp.Sandwich(num_heads, head_dim, xp=xp)
    q_len, k_len = 5, 60
    got = to_np(fam.bias(*rp.positions(q_len, k_len, xp=xp)))
    qn, kn = np_positions(q_len, k_len)
    expected = nemo_sandwich(num_heads, head_dim, np.abs(qn[:, None] - kn[None, :]))
    # The cos form loses ~ (d/2) * eps absolute to cancellation; the library's sin^2 form does not.
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=head_dim * 1e-15)
    assert fam.parameters() == {}
    assert fam.options() == {"num_heads": num_heads, "head_dim": head_dim}


def test_sandwich_zero_at_zero_and_first_increase(xp):
    fam = rp.Sandwich(2, 128, xp=xp)
    got = to_np(fam.bias(xp.asarray([40], dtype=xp.int64), xp.arange(40, 19, -1, dtype=xp.int64)))
    head1 = got[0, 0]  # distances 0..20
    assert head1[0] == 0.0
    assert (np.diff(head1[:14]) < 0).all()  # decreasing up to |Delta| = 13
    assert head1[14] > head1[13]  # first increase between 13 and 14 (formulas.md section 6)
    np.testing.assert_allclose(head1, nemo_sandwich(2, 128, np.arange(21))[0], rtol=1e-12, atol=1e-13)
    # Near Delta = 0 the value is tiny; check it against mpmath to relative accuracy (the cos form cannot).
    with mpmath.workdps(50):
        exact1 = sum(mpmath.cos(mpmath.mpf(10000) ** (-mpmath.mpf(2 * k) / 128)) for k in range(1, 65)) - 64
        exact1 = exact1 / (mpmath.mpf(8) / 2)
    assert head1[1] == pytest.approx(float(exact1), rel=1e-13)


# -- OffsetBias ------------------------------------------------------------------------------------------------------


def test_offset_bias_clipping(xp):
    k_max = 3
    table = 100.0 * np.arange(2)[:, None] + np.arange(2 * k_max + 1)[None, :]  # entry = 100 h + column
    fam = rp.OffsetBias(xp.asarray(table))
    assert fam.max_offset == k_max
    q_pos, k_pos = rp.positions(10, 10, xp=xp)
    got = to_np(fam.bias(q_pos, k_pos))
    for i in range(10):
        for j in range(10):
            col = min(max(i - j, -k_max), k_max) + k_max
            assert got[:, i, j].tolist() == [col, 100.0 + col]
    assert fam.parameters().keys() == {"table"}
    assert fam.options() == {}


def test_offset_bias_zero_k():
    fam = rp.OffsetBias(np.array([[2.5], [-1.0]]))
    got = fam.bias(*rp.positions(3, 4))
    assert (got[0] == 2.5).all()
    assert (got[1] == -1.0).all()


# -- TensorBias -----------------------------------------------------------------------------------------------------


def test_tensor_bias(xp):
    arr = RNG.standard_normal((3, 4, 5))
    arr[1, 2, 3] = -np.inf  # -inf is a mask and is allowed
    fam = rp.TensorBias(xp.asarray(arr))
    assert fam.shape == (3, 4, 5)
    for align in ("bottom_right", "top_left"):
        got = fam.bias(*rp.positions(4, 5, align=align, xp=xp))
        np.testing.assert_array_equal(to_np(got), arr)
    np.testing.assert_array_equal(to_np(fam.bias(*rp.positions(4, 5, xp=xp), heads=[2, 1])), arr[[2, 1]])
    with pytest.raises(ValueError, match=r"q_pos, k_pos: expected lengths \(4, 5\).*got \(5, 5\)"):
        fam.bias(*rp.positions(5, 5, xp=xp))
    with pytest.raises(ValueError, match=r"array: expected finite values or -inf.*NaN or \+inf"):
        rp.TensorBias(xp.asarray(np.full((1, 2, 2), np.inf)))


# -- the shared contract --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_bias_namespace_dtype_shape(xp, name, dtype_name):
    dtype = getattr(xp, dtype_name)
    fam = make(name, xp, dtype)
    assert fam.dtype == dtype
    assert fam.num_heads == H
    q_pos, k_pos = pos_for(name, xp)
    out = fam.bias(q_pos, k_pos)
    assert out.dtype == dtype
    assert ns_name(out) == xp.__name__
    assert tuple(out.shape) == (H, q_pos.shape[0], k_pos.shape[0])
    for p in fam.parameters().values():
        assert p.dtype == dtype
        assert ns_name(p) == xp.__name__


@pytest.mark.parametrize("name", FAMILIES)
def test_float32_bias_close_to_float64(xp, name):
    # The same (float32-representable) parameters computed in float32 and in float64: float32 keeps ~6 digits.
    f32 = make(name, xp, xp.float64).astype(xp.float32)
    q_pos, k_pos = pos_for(name, xp)
    lo = to_np(f32.bias(q_pos, k_pos)).astype(np.float64)
    hi = to_np(f32.astype(xp.float64).bias(q_pos, k_pos))
    np.testing.assert_allclose(lo, hi, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_float16_bias_rounded_once(xp, name):
    if not hasattr(xp, "float16"):
        pytest.skip(f"{xp.__name__} has no float16 (not part of the array API standard)")
    # float16 parameters: the bias is the float32 computation on the same (float16-representable) values, rounded
    # to float16 once. The float32 family below holds exactly those values.
    f16 = make(name, xp, xp.float16) if name != "Sandwich" else rp.Sandwich(H, 16, dtype=xp.float16, xp=xp)
    if name == "Sandwich":
        f32 = rp.Sandwich(H, 16, dtype=xp.float32, xp=xp)
    else:
        f32 = f16.astype(xp.float32)
        for k, v in f16.parameters().items():
            assert to_np(f32.parameters()[k]).tolist() == to_np(v).astype(np.float32).tolist()
    q_pos, k_pos = pos_for(name, xp)
    got = f16.bias(q_pos, k_pos)
    assert got.dtype == xp.float16
    assert f16.dtype == xp.float16
    want = xp.astype(f32.bias(q_pos, k_pos), xp.float16)
    np.testing.assert_array_equal(to_np(got), to_np(want))


@pytest.mark.parametrize("name", FAMILIES)
def test_parameters_options_roundtrip(xp, name):
    fam = make(name, xp)
    params = fam.parameters()
    opts = fam.options()
    q_pos, k_pos = pos_for(name, xp)
    # Parameter names are exactly the constructor's argument names (Sandwich has only options).
    rebuilt = rp.Sandwich(**opts, xp=xp) if name == "Sandwich" else type(fam)(**params, **opts)
    np.testing.assert_array_equal(to_np(rebuilt.bias(q_pos, k_pos)), to_np(fam.bias(q_pos, k_pos)))
    for key, value in params.items():
        original = PARAMS.get(name, {}).get(key)
        if original is not None:
            np.testing.assert_array_equal(to_np(value), original)


@pytest.mark.parametrize("name", FAMILIES)
def test_astype_roundtrip(xp, name):
    fam = make(name, xp)
    q_pos, k_pos = pos_for(name, xp)
    ref = to_np(fam.bias(q_pos, k_pos))
    down = fam.astype(xp.float32)
    assert type(down) is type(fam)
    assert down.dtype == xp.float32
    assert down.options() == fam.options()
    back = down.astype(xp.float64)
    assert back.dtype == xp.float64
    if name not in ("T5Bias", "OffsetBias", "TensorBias", "FIRE"):
        # ALiBi, KERPLE and Sandwich parameters here are exact in float32: the round trip is lossless.
        np.testing.assert_array_equal(to_np(back.bias(q_pos, k_pos)), ref)
    for key, value in back.parameters().items():
        np.testing.assert_array_equal(to_np(value), to_np(fam.parameters()[key]).astype(np.float32))
    # The default dtype keeps the current one.
    assert fam.astype().dtype == xp.float64


@pytest.mark.parametrize("family_name", list(REGISTRY))
def test_numpy_family_follows_positions_and_inputs(family_name):
    # The parameters are converted once to the inputs' library and cached there; the result equals the family
    # converted by hand, and attention on array_api_strict inputs takes the same family.
    fam = example_family(family_name, 2, head_dim=8, shape=(3, 5) if family_name == "tensor" else None)
    q_pos, k_pos = rp.positions(3, 5, xp=array_api_strict)
    got = fam.bias(q_pos, k_pos)
    assert array_namespace(got) is array_namespace(q_pos)
    want = fam.astype(xp=array_api_strict).bias(q_pos, k_pos)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert list(fam.__dict__["_followers"]) == [("array_api_strict", str(array_api_strict.Device()), "float64")]
    q = array_api_strict.asarray(np.random.default_rng(0).standard_normal((1, 2, 3, 8)))
    k = array_api_strict.asarray(np.random.default_rng(1).standard_normal((1, 2, 5, 8)))
    out = rp.attention(q, k, k, bias=fam, causal=True)
    ref = rp.attention(np.asarray(q), np.asarray(k), np.asarray(k), bias=fam, causal=True)
    assert np.array_equal(np.asarray(out), ref)
    assert len(fam.__dict__["_followers"]) == 1


@pytest.mark.parametrize("name", FAMILIES)
def test_astype_across_namespaces(xp, name):
    fam = make(name, xp)
    q_pos, k_pos = pos_for(name, xp)
    ref = to_np(fam.bias(q_pos, k_pos))
    for other in (np_compat, array_api_strict):
        moved = fam.astype(xp=other)
        assert moved.xp.__name__ == other.__name__
        assert moved.dtype == other.float64
        out = moved.bias(*pos_for(name, other))
        assert ns_name(out) == other.__name__
        if ns_name(xp.asarray(0.0)).endswith("cupy"):
            # Moving parameters is exact, but CUDA's pow/sin differ from the host libm by an ulp or two.
            np.testing.assert_allclose(to_np(out), ref, rtol=8 * np.finfo(np.float64).eps, atol=1e-300)
        else:
            np.testing.assert_array_equal(to_np(out), ref)
        back = moved.astype(xp=xp)
        np.testing.assert_array_equal(to_np(back.bias(q_pos, k_pos)), ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_immutable(xp, name):
    fam = make(name, xp)
    for attr, value in (("num_heads", 99), ("dtype", xp.float32), ("xp", np_compat), ("new_attribute", 1)):
        with pytest.raises(AttributeError, match=r"immutable"):
            setattr(fam, attr, value)
    assert fam.num_heads == H


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "Sandwich"])
def test_inputs_and_parameters_are_copies(xp, name):
    params = {k: xp.asarray(v, copy=True) for k, v in PARAMS[name].items()}
    opts = dict(OPTIONS.get(name, {}))
    fam = getattr(rp, name)(**params, **opts)
    q_pos, k_pos = pos_for(name, xp)
    before = to_np(fam.bias(q_pos, k_pos))
    # Writing into the arrays the caller passed must not reach the family ...
    for arr in params.values():
        arr[...] = 0.5
    np.testing.assert_array_equal(to_np(fam.bias(q_pos, k_pos)), before)
    # ... nor writing into what parameters() returns.
    got = fam.parameters()
    for arr in got.values():
        arr[...] = 0.75
    np.testing.assert_array_equal(to_np(fam.bias(q_pos, k_pos)), before)
    for key, value in PARAMS[name].items():
        np.testing.assert_array_equal(to_np(fam.parameters()[key]), value)


@pytest.mark.parametrize("name", FAMILIES)
def test_heads_selection(xp, name):
    fam = make(name, xp)
    q_pos, k_pos = pos_for(name, xp)
    full = to_np(fam.bias(q_pos, k_pos))
    # Gathers and products of exact values are bit-identical; transcendental functions may differ by an ulp
    # because NumPy's pow/log take different SIMD paths for differently shaped operands (measured: pow(19, 0.5)
    # gives 4.358898943540673 or ...674 depending on the layout of the exponent array).
    rtol = 0 if name in ("ALiBi", "T5Bias", "OffsetBias", "TensorBias") else 4 * 2.0**-52
    for heads in ([2, 0], (3,), [1, 1, 3], range(1, 3)):
        got = fam.bias(q_pos, k_pos, heads=heads)
        assert tuple(got.shape) == (len(heads), *full.shape[1:])
        np.testing.assert_allclose(to_np(got), full[list(heads)], rtol=rtol, atol=0)
    one = fam.bias(q_pos, k_pos, heads=2)
    np.testing.assert_allclose(to_np(one), full[2:3], rtol=rtol, atol=0)


def test_repr_names_family_and_options():
    text = repr(rp.T5Bias(np.zeros((2, 8)), bidirectional=False, max_distance=10, layout="heads_buckets"))
    assert text.startswith("T5Bias(num_heads=2")
    assert "max_distance=10" in text


# -- Issue 15: parameters the constructors accept give the exact bias or a clear error ------------------------------
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def test_kerple_log_huge_rate_is_computed_stably():
    # r2 |Delta| = 2e308 overflows; the bias -log(1 + r2 |Delta|) = -709.89 does not (was -inf).
    fam = rp.KerpleLog([1.0], [1e308])
    b = fam.bias(*rp.positions(3, 3))[0]
    with mpmath.workdps(40):
        for dist in (1, 2):
            assert b[dist, 0] == pytest.approx(-float(mpmath.log1p(mpmath.mpf(1e308) * dist)), rel=1e-15)
    assert b[0, 0] == 0.0
    g = fam.bias_vjp(*rp.positions(3, 3), np.ones((1, 3, 3)))
    # d/dr2 = -sum r1 |D| / (1 + r2 |D|) ~ -(4 / 1e308) over the four entries with |D| > 0 (two at 1, ... ): finite.
    assert np.isfinite(g["r2"]).all()
    assert np.isfinite(g["r1"]).all()
    with mpmath.workdps(40):
        want = -sum(mpmath.mpf(d) / (1 + mpmath.mpf(1e308) * d) for d in (1, 1, 2, 1, 1, 2))
    assert g["r2"][0] == pytest.approx(float(want), rel=1e-14)


@given(e=st.floats(200.0, 308.0), dist=st.integers(1, 2**62), dtype=st.sampled_from(["float32", "float64"]))
def test_fuzz_kerple_log_against_mpmath(e, dist, dtype):
    """Any finite rate: where r2 |Delta| overflows the compute dtype, log r2 + log |Delta| is the correctly rounded
    log1p (1 / (r2 |Delta|) is below the smallest normal number)."""
    r2 = 10.0**e if dtype == "float64" else 10.0 ** (e / 8.2)  # up to ~3e37 in float32
    r2 = float(np.asarray(r2, dtype=dtype))
    b = rp.KerpleLog(np.array([1.0], dtype), np.array([r2], dtype)).bias(np.array([dist]), np.array([0]))
    with mpmath.workdps(40):
        want = -float(mpmath.log1p(mpmath.mpf(r2) * dist))
    assert np.isfinite(b).all()
    assert float(b[0, 0, 0]) == pytest.approx(want, rel=4e-7 if dtype == "float32" else 4e-16)


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"c": 1e308}, r"^c: expected a value in \(0, 1\.95e\+289\] .*got 1e\+308$"),
        ({"c": 1e-200, "L": 1e-200}, r"^c, L: expected c and c \* L in \[2\.23e-308, .*c \* L = 0\.0$"),
        ({"c": 1e-23, "L": 1e-23, "dtype": np.float32}, r"^c, L: expected c and c \* L in \[1\.18e-38, "),
        ({"c": 1e-320}, r"^c, L: expected c and c \* L in \[2\.23e-308"),
        # c * L normal but the interpolant 43.7 / 3e-308 beyond float64 far from the query (issue 15)
        ({"c": 1.0, "L": 3e-308}, r"^c, L: expected c, L and eps whose largest interpolant .* at most 4\.49e\+307 "),
        ({"c": 1.0, "L": 1.2e-38, "dtype": np.float32}, r"^c, L: expected .*at most 8\.51e\+37 .*it is 3\.6"),
    ],
)
def test_fire_psi_range_validated(kw, pattern):
    # These gave NaN or inf (c = 1e308: inf / inf; c * L underflowing: 0 / 0 at query 0), in attention too.
    dtype = kw.pop("dtype", np.float64)
    args = [np.ones((1, 1), dtype), np.zeros(1, dtype), np.ones((1, 1), dtype), np.zeros(1, dtype)]
    with pytest.raises(ValueError, match=pattern):
        rp.FIRE(*args, **kw)


def test_fire_interpolant_bound_eps_and_small_normaliser_accepted():
    # eps keeps the normaliser away from 0: the interpolant is at most 43.7 / 1e-6 whatever L.
    args = [np.ones((1, 1)), np.zeros(1), np.ones((1, 1)), np.zeros(1)]
    rp.FIRE(*args, c=1.0, L=3e-308, eps=1e-6)
    # x_max = log1p(2**63) / log1p(1e-36) = 4.4e37, below a quarter of the float32 range: finite everywhere.
    args = [np.ones((1, 1), np.float32), np.zeros(1, np.float32), np.ones((1, 1), np.float32), np.zeros(1, np.float32)]
    fam = rp.FIRE(*args, c=1.0, L=1e-36)
    far = fam.interpolant(np.array([0]), np.array([-(2**62)]))
    assert float(far[0, 0]) == pytest.approx(math.log1p(2.0**62) / float(np.float32(1e-36)), rel=1e-6)
    out = rp.attention(
        *(np.zeros((1, 1, 3, 2), np.float32),) * 2, np.ones((1, 1, 3, 2), np.float32), bias=fam, causal=True
    )
    np.testing.assert_array_equal(out, np.ones((1, 1, 3, 2), np.float32))


def test_bias_beyond_the_range_is_its_rounding_and_nan_an_error():
    # The exact -2e308 rounds to -inf in float64, -1e5 to -inf in float16; 1e308 * 2^2 likewise.
    assert rp.ALiBi([1e308]).bias(np.array([0]), np.array([2]))[0, 0, 0] == -math.inf
    assert rp.ALiBi([0.5], dtype=np.float16).bias(np.array([200000]), np.array([0]))[0, 0, 0] == -math.inf
    assert rp.KerplePower([1e308], [2.0]).bias(np.array([0]), np.array([2]))[0, 0, 0] == -math.inf
    # Two hidden units at 2e308 (+inf in float64) with output weights +1 and -1: the exact bias is 0, and the
    # power-of-two recomputation gives it (it was inf - inf, then an error).
    fam = rp.FIRE(np.full((2, 1), 1e308), np.full(2, 1e308), np.array([[1.0, -1.0]]), np.zeros(1), c=1.0, L=1.0)
    assert fam.bias(np.array([0]), np.array([1]))[0, 0, 0] == 0.0


def test_float16_alibi_in_range_needs_no_error():
    b = rp.ALiBi([0.5], dtype=np.float16).bias(np.array([131008]), np.array([0]))  # -65504, the largest float16
    assert float(b[0, 0, 0]) == -65504.0


def _exact_bias(kind, a, b, dist):
    with mpmath.workdps(30):
        a, b, n = mpmath.mpf(a), mpmath.mpf(b), mpmath.mpf(dist)
        if kind == "alibi":
            return -a * n
        if kind == "kerple_power":
            return -a * n**b if dist else mpmath.mpf(0)
        return -a * mpmath.log1p(b * n)


@given(
    kind=st.sampled_from(["alibi", "kerple_power", "kerple_log"]),
    e1=st.floats(-300, 300),
    e2=st.floats(-300, 300),
    dtype=st.sampled_from(["float16", "float32", "float64"]),
    q=st.integers(-(2**61), 2**61),
    k=st.integers(-(2**61), 2**61),
)
def test_fuzz_family_bias_is_the_rounded_exact_value(kind, e1, e2, dtype, q, k):
    """Any accepted parameters: each entry is finite and close to the exact value, or +-inf exactly where the exact
    value is beyond the dtype's largest number; never NaN."""
    info = np.finfo(dtype)
    dtype = np.dtype(dtype)
    a, b = 10.0**e1, (min(2.0, 10.0**e2) if kind == "kerple_power" else 10.0**e2)
    cls = {"alibi": rp.ALiBi, "kerple_power": rp.KerplePower, "kerple_log": rp.KerpleLog}[kind]
    try:
        fam = cls(np.array([a]), dtype=dtype) if kind == "alibi" else cls(np.array([a]), np.array([b]), dtype=dtype)
        values = [float(np.asarray(v, dtype=np.float64)[0]) for v in fam.parameters().values()]
        a, b = values if kind != "alibi" else (values[0], b)  # the parameters as rounded to dtype
    except ValueError:
        return  # a parameter rounding to 0 or inf in dtype: rejected with the value given
    qp, kp = np.array([q, 0]), np.array([k, 0])
    out = np.asarray(fam.bias(qp, kp), dtype=np.float64)[0]
    for i, j in np.ndindex(out.shape):
        exact = _exact_bias(kind, a, b, abs(int(qp[i]) - int(kp[j])))
        top = float(info.max) * (1 + float(info.eps) / 2)  # values up to here round to the largest finite one
        if abs(exact) >= top:
            assert out[i, j] == (math.inf if exact > 0 else -math.inf), (exact, out[i, j])
        else:
            assert math.isfinite(out[i, j])
            assert abs(out[i, j] - float(exact)) <= 8 * float(info.eps) * abs(float(exact)) + float(info.tiny)


def test_size_arguments_fail_fast():
    # Each built a Python list until MemoryError.
    for call, name in [
        (lambda: rp.alibi_slopes(2**63), "num_heads"),
        (lambda: rp.ALiBi.from_num_heads(10**12), "num_heads"),
        (lambda: rp.Sandwich(2**40, 2), "num_heads"),
        (lambda: rp.Sandwich(2, 2**40), "head_dim"),
    ]:
        with pytest.raises(ValueError, match=rf"^{name}: expected an integer <= \d+ \(.*Python list\), got \d+$"):
            call()


@pytest.mark.parametrize(
    ("call", "exc", "pattern"),
    [
        (
            lambda: rp.ALiBi([True]),
            TypeError,
            r"^slopes: expected a floating-point array or real numbers, got \[True\]$",
        ),
        (lambda: rp.ALiBi([0.5, True]), TypeError, r"^slopes: expected a floating-point array .*got \[0\.5, True\]$"),
        (lambda: rp.ALiBi([np.bool_(True)]), TypeError, r"^slopes: expected a floating-point array"),
        (lambda: rp.KerpleLog([[1.0]][0], [False]), TypeError, r"^r2: expected a floating-point array"),
        (lambda: rp.OffsetBias([[True, 0.0, 1.0]]), TypeError, r"^table: expected a floating-point array"),
        (lambda: rp.ALiBi([10**400]), ValueError, r"^slopes: expected real numbers within the float64 range"),
        (lambda: rp.KerpleLog([10**400], [1.0]), ValueError, r"^r1: expected real numbers within the float64 range"),
        (
            lambda: rp.FIRE(np.ones((1, 1)), np.zeros(1), np.ones((1, 1)), np.zeros(1), eps=10**400),
            ValueError,
            r"^eps: expected a finite number within the float64 range .*got about 1\.000e\+400$",
        ),
        (
            lambda: rp.ALiBi([1e-10], dtype=np.float16),
            ValueError,
            r"^slopes: expected values that float16 represents .*got \[1e-10\], which rounds to \[0\.\] in float16$",
        ),
        (
            lambda: rp.ALiBi(np.array([1e5]), dtype=np.float16),
            ValueError,
            r"^slopes: expected values that float16 represents .*got \[100000\.\], which rounds to \[inf\]",
        ),
        (
            lambda: rp.ALiBi(np.array([0.5], np.longdouble)),
            TypeError,
            r"^slopes: expected float16, bfloat16, float32 or float64 \(long double is not supported.*float128$",
        ),
        (lambda: rp.alibi_slopes(2, dtype=np.longdouble), TypeError, r"^dtype: expected float16, bfloat16, float32"),
        (lambda: rp.Sandwich(2, 8, dtype=np.longdouble), TypeError, r"^dtype: expected float16, bfloat16, float32"),
        (lambda: rp.alibi_slopes(2, device="gpu9"), ValueError, r"^device: expected a device of numpy .*'gpu9'"),
        (
            lambda: rp.ALiBi([1.0], xp=array_api_strict, device="gpu9"),
            ValueError,
            r"^device: expected a device of array_api_strict",
        ),
        (lambda: rp.Sandwich(2, 8, xp=array_api_strict, device="gpu9"), ValueError, r"^device: expected a device"),
        (lambda: rp.ALiBi([1.0]).astype(device="gpu9"), ValueError, r"^device: expected a device of numpy"),
        (
            lambda: rp.Sandwich(2, 8, dtype=np.float16).astype(xp=array_api_strict),
            TypeError,
            r"^dtype: expected a dtype of array_api_strict when it has no float16 \(the family's dtype\), got None$",
        ),
        (
            lambda: rp.ALiBi([0.5], dtype=np.float16).astype(xp=array_api_strict),
            TypeError,
            r"^dtype: expected a dtype of array_api_strict when it has no float16",
        ),
    ],
)
def test_constructor_inputs_named_with_the_value_given(call, exc, pattern):
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is exc
    assert re.search(pattern, str(info.value)), str(info.value)


def test_long_error_arrays_summarised():
    # A bad entry in a large array: its count and first index, not 50 lines of the array.
    slopes = np.ones(1000)
    slopes[7] = -1.0
    with pytest.raises(ValueError) as info:
        rp.ALiBi(slopes)
    assert str(info.value) == (
        "slopes: expected values >= 0 (or allow_any_sign=True for any finite slope), got 1 of 1000 entries of an array "
        "of shape (1000,), the first at index (7,): -1.0"
    )
