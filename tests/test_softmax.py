"""Unit tests of biased_softmax against SciPy (float64), hand-worked rows and mpmath."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import scipy.special
from array_api_compat import array_namespace
from hypothesis import given
from hypothesis import strategies as st

import relpos_ref as rp


def to_np(x):
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)


def ns_name(a) -> str:
    return array_namespace(a).__name__


def scipy_reference(scores, bias=None, mask=None, scale=1.0, placement="post_scale"):
    """(probs, lse) in float64 with SciPy; fully masked rows get zeros and -inf."""
    s = np.asarray(scores, dtype=np.float64)
    b = np.zeros_like(s) if bias is None else np.broadcast_to(np.asarray(bias, dtype=np.float64), s.shape)
    z = s * scale + b if placement == "post_scale" else (s + b) * scale
    keep = np.ones(s.shape, dtype=bool) if mask is None else np.broadcast_to(mask, s.shape)
    z = np.where(keep, z, -np.inf)
    empty = ~np.any(keep & (z > -np.inf), axis=-1)
    safe = np.where(empty[..., None], 0.0, z)
    probs = np.where(empty[..., None], 0.0, scipy.special.softmax(safe, axis=-1))
    lse = np.where(empty, -np.inf, scipy.special.logsumexp(safe, axis=-1))
    return probs, lse


RNG = np.random.default_rng(11)


@pytest.mark.parametrize("placement", ["post_scale", "pre_scale"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_against_scipy(xp, placement, with_mask):
    scores = RNG.standard_normal((2, 3, 5, 7)) * 4
    bias = RNG.standard_normal((3, 5, 7))
    mask = RNG.random((5, 7)) < 0.7 if with_mask else None
    if mask is not None:
        mask[:, 0] = True  # no fully masked row here
    probs, lse = rp.biased_softmax(
        xp.asarray(scores),
        xp.asarray(bias),
        mask=None if mask is None else xp.asarray(mask),
        scale=0.375,
        placement=placement,
        return_lse=True,
    )
    want_p, want_lse = scipy_reference(scores, bias, mask, 0.375, placement)
    assert probs.dtype == xp.float64
    assert lse.dtype == xp.float64
    assert ns_name(probs) == xp.__name__
    assert tuple(probs.shape) == scores.shape
    assert tuple(lse.shape) == scores.shape[:-1]
    np.testing.assert_allclose(to_np(probs), want_p, rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(to_np(lse), want_lse, rtol=1e-14, atol=1e-14)
    if mask is not None:
        assert (to_np(probs)[..., ~mask] == 0.0).all()


def test_no_bias_no_mask(xp):
    scores = RNG.standard_normal((4, 9))
    got = rp.biased_softmax(xp.asarray(scores))
    np.testing.assert_allclose(to_np(got), scipy.special.softmax(scores, axis=-1), rtol=1e-14)
    got = rp.biased_softmax(xp.asarray(scores), scale=2.5)
    np.testing.assert_allclose(to_np(got), scipy.special.softmax(2.5 * scores, axis=-1), rtol=1e-14)


def test_placement_worked_example(xp):
    # spec/softmax_attention.md: scores [1,2,3,4], bias [0,-1,-2,-3], mask [T,T,T,F], scale 1/2.
    scores = xp.asarray([1.0, 2.0, 3.0, 4.0])
    bias = xp.asarray([0.0, -1.0, -2.0, -3.0])
    mask = xp.asarray([True, True, True, False])
    p, lse = rp.biased_softmax(scores, bias, mask=mask, scale=0.5, return_lse=True)
    # logits 0.5, 0, -0.5: probs e^0.5, 1, e^-0.5 over their sum; lse = log of the sum.
    with mpmath.workdps(40):
        terms = [mpmath.e ** mpmath.mpf(0.5), mpmath.mpf(1), mpmath.e ** mpmath.mpf(-0.5)]
        total = sum(terms)
        exact_p = [float(t / total) for t in terms] + [0.0]
        exact_lse = float(mpmath.log(total))
    np.testing.assert_allclose(to_np(p), exact_p, rtol=2e-16 * 4, atol=0)
    assert float(lse) == pytest.approx(exact_lse, rel=4e-16)
    assert float(lse) == pytest.approx(1.1802696706417346, rel=4e-16)
    p2, lse2 = rp.biased_softmax(scores, bias, mask=mask, scale=0.5, placement="pre_scale", return_lse=True)
    # logits all 0.5: uniform over the three attended keys, lse = 0.5 + log 3.
    np.testing.assert_allclose(to_np(p2), [1 / 3, 1 / 3, 1 / 3, 0.0], rtol=4e-16, atol=0)
    assert float(lse2) == pytest.approx(0.5 + math.log(3), rel=4e-16)
    assert float(lse2) == pytest.approx(1.5986122886681097, rel=4e-16)


def test_placement_identity(xp):
    scores = RNG.standard_normal((3, 6))
    bias = RNG.standard_normal((3, 6))
    scale = 0.125
    pre = rp.biased_softmax(xp.asarray(scores), xp.asarray(bias), scale=scale, placement="pre_scale", return_lse=True)
    post = rp.biased_softmax(xp.asarray(scores), xp.asarray(bias * scale), scale=scale, return_lse=True)
    for a, b in zip(pre, post):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-14, atol=1e-15)
    # And the two placements really differ for the same bias.
    other = rp.biased_softmax(xp.asarray(scores), xp.asarray(bias), scale=scale)
    assert not np.allclose(to_np(other), to_np(pre[0]))


def test_lse_natural_log(xp):
    scores = [0.25, -1.5, 3.0, 2.0]
    _, lse = rp.biased_softmax(xp.asarray(scores), return_lse=True)
    with mpmath.workdps(40):
        exact = float(mpmath.log(sum(mpmath.e ** mpmath.mpf(s) for s in scores)))
    assert float(lse) == pytest.approx(exact, rel=4e-16)
    assert float(lse) != pytest.approx(exact / math.log(2), rel=1e-3)  # not base 2


def test_row_shift_invariance(xp):
    scores = RNG.standard_normal((4, 8))
    shift = np.array([7.0, -3.0, 0.0, 100.0])[:, None]
    p1, l1 = rp.biased_softmax(xp.asarray(scores), return_lse=True)
    p2, l2 = rp.biased_softmax(xp.asarray(scores), xp.asarray(np.broadcast_to(shift, (4, 8)).copy()), return_lse=True)
    np.testing.assert_allclose(to_np(p2), to_np(p1), rtol=1e-13)
    np.testing.assert_allclose(to_np(l2), to_np(l1) + shift[:, 0], rtol=1e-14)


def test_masked_probability_exactly_zero(xp):
    scores = xp.asarray([[1e30, 0.0, 1.0], [0.0, 1e4, -1e4]])
    bias = xp.asarray([[1e30, 0.0, float("nan")], [float("inf"), 0.0, 0.0]])
    mask = xp.asarray([[False, True, False], [False, True, True]])
    p, lse = rp.biased_softmax(scores, bias, mask=mask, return_lse=True)
    p = to_np(p)
    # Masked entries are excluded, whatever their score or bias (even inf or NaN).
    assert p.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    assert to_np(lse).tolist() == [0.0, 1e4]


def test_neg_inf_bias_acts_as_mask(xp):
    scores = xp.asarray([[0.0, 1.0, 2.0]])
    p = rp.biased_softmax(scores, xp.asarray([[-math.inf, 0.0, 0.0]]))
    want = scipy.special.softmax([1.0, 2.0])
    np.testing.assert_allclose(to_np(p)[0], [0.0, *want], rtol=1e-15)


def test_fully_masked_zero(xp):
    scores = xp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    mask = xp.asarray([[False, False], [True, False], [True, True]])
    bias = xp.asarray([[0.0, 0.0], [0.0, 0.0], [-math.inf, -math.inf]])  # row 2: attended logits all -inf
    p, lse = rp.biased_softmax(scores, bias, mask=mask, return_lse=True)
    assert to_np(p).tolist() == [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
    assert to_np(lse).tolist() == [-math.inf, 3.0, -math.inf]


def test_fully_masked_nan(xp):
    scores = xp.asarray([[1.0, 2.0], [3.0, 4.0]])
    mask = xp.asarray([[False, False], [True, True]])
    p, lse = rp.biased_softmax(scores, mask=mask, fully_masked="nan", return_lse=True)
    p, lse = to_np(p), to_np(lse)
    assert np.isnan(p[0]).all()
    assert np.isnan(lse[0])
    np.testing.assert_allclose(p[1], scipy.special.softmax([3.0, 4.0]), rtol=1e-15)
    assert lse[1] == pytest.approx(scipy.special.logsumexp([3.0, 4.0]), rel=1e-15)


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("magnitude", [1e4, -1e4, -1e30, 1e30])
def test_extreme_logits_no_overflow(xp, dtype_name, magnitude):
    # Warnings are errors in this suite: overflow, invalid or divide-by-zero would fail the test.
    dtype = getattr(xp, dtype_name)
    scores = np.array([[magnitude, magnitude - 1.0, 0.0], [0.0, magnitude, 1.0]])
    bias = np.array([[0.0, 0.0, magnitude], [-1e4, 0.0, -1e30]])
    p, lse = rp.biased_softmax(xp.asarray(scores, dtype=dtype), xp.asarray(bias, dtype=dtype), return_lse=True)
    p, lse = to_np(p), to_np(lse)
    assert np.isfinite(p).all()
    assert np.isfinite(lse).all()
    # Reference computed from the inputs as rounded to the dtype, in float64.
    s64 = scores.astype(dtype_name).astype(np.float64)
    b64 = bias.astype(dtype_name).astype(np.float64)
    want_p, want_lse = scipy_reference(s64, b64)
    tol = 1e-6 if dtype_name == "float32" else 1e-15
    np.testing.assert_allclose(p, want_p, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, want_lse, rtol=tol)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=tol)


def test_float16_computed_in_float32_rounded_once():
    scores = RNG.standard_normal((3, 5, 11)).astype(np.float16) * np.float16(6)
    bias = RNG.standard_normal((5, 11)).astype(np.float16)
    mask = RNG.random((5, 11)) < 0.8
    mask[:, 3] = True
    p16, lse16 = rp.biased_softmax(scores, bias, mask=mask, scale=0.5, return_lse=True)
    p32, lse32 = rp.biased_softmax(
        scores.astype(np.float32), bias.astype(np.float32), mask=mask, scale=0.5, return_lse=True
    )
    assert p16.dtype == np.float16
    assert lse16.dtype == np.float32
    np.testing.assert_array_equal(p16, p32.astype(np.float16))
    np.testing.assert_array_equal(lse16, lse32)
    # And close to the float64 truth of the float16 inputs: one float16 rounding (2**-11 relative) at most, plus
    # float32 noise.
    want_p, _ = scipy_reference(scores, bias, mask, 0.5)
    np.testing.assert_allclose(p16.astype(np.float64), want_p, rtol=2.0**-11 + 1e-6, atol=1e-7)


def test_float16_extreme_values_no_overflow():
    # 60000 is near float16's max; exp of it would overflow in float16 but the computation is in float32.
    scores = np.array([[60000.0, 59000.0, -60000.0]], dtype=np.float16)
    p, lse = rp.biased_softmax(scores, return_lse=True)
    assert p.dtype == np.float16
    assert np.isfinite(p.astype(np.float64)).all()
    assert float(p[0, 0]) == pytest.approx(1.0, abs=1e-3)
    assert float(lse[0]) == pytest.approx(60000.0, rel=1e-6)


@pytest.mark.parametrize(
    ("bias_shape", "mask_shape"),
    [((7,), (7,)), ((5, 1), (1, 7)), ((3, 5, 7), (5, 7)), ((2, 1, 1, 7), (2, 3, 5, 7)), ((1, 1, 5, 7), (3, 1, 1))],
)
def test_broadcasting(xp, bias_shape, mask_shape):
    scores = RNG.standard_normal((2, 3, 5, 7))
    bias = RNG.standard_normal(bias_shape)
    mask = RNG.random(mask_shape) < 0.75
    p, lse = rp.biased_softmax(xp.asarray(scores), xp.asarray(bias), mask=xp.asarray(mask), return_lse=True)
    want_p, want_lse = scipy_reference(scores, bias, mask)
    assert tuple(p.shape) == scores.shape
    np.testing.assert_allclose(to_np(p), want_p, rtol=1e-14, atol=1e-300)
    # lse = m + log(sum): its error is a few ulps of m and of the log, absolute where lse is near 0.
    np.testing.assert_allclose(to_np(lse), want_lse, rtol=1e-14, atol=1e-15)


def test_return_dtypes(xp):
    s32 = xp.asarray(RNG.standard_normal((2, 4)), dtype=xp.float32)
    b32 = xp.asarray(RNG.standard_normal((2, 4)), dtype=xp.float32)
    b64 = xp.asarray(RNG.standard_normal((2, 4)), dtype=xp.float64)
    p, lse = rp.biased_softmax(s32, b32, return_lse=True)
    assert p.dtype == xp.float32
    assert lse.dtype == xp.float32
    p, lse = rp.biased_softmax(s32, b64, return_lse=True)
    assert p.dtype == xp.float64
    assert lse.dtype == xp.float64
    p = rp.biased_softmax(s32)
    assert p.dtype == xp.float32
    assert ns_name(p) == xp.__name__
    # The default returns only the probabilities.
    assert not isinstance(p, tuple)


def test_float32_against_float64_reference(xp):
    scores = RNG.standard_normal((3, 50)).astype(np.float32) * 10
    p = rp.biased_softmax(xp.asarray(scores))
    want, _ = scipy_reference(scores.astype(np.float64))
    np.testing.assert_allclose(to_np(p), want, rtol=2e-6, atol=1e-9)


def test_inputs_not_modified(xp):
    scores = xp.asarray(RNG.standard_normal((2, 3)))
    bias = xp.asarray(RNG.standard_normal((2, 3)))
    mask = xp.asarray([[True, False, True], [False, False, False]])
    copies = [to_np(a).copy() for a in (scores, bias, mask)]
    rp.biased_softmax(scores, bias, mask=mask, scale=3.0, return_lse=True)
    for a, c in zip((scores, bias, mask), copies):
        np.testing.assert_array_equal(to_np(a), c)


# -- Issue 15: finite inputs whose logits or intermediates overflow -----------------------------------------------
# Expected values here need no softmax implementation: rows of logits that differ by multiples of a huge power of two
# put all the probability, equally, on the keys of the row maximum.


@pytest.mark.parametrize(
    ("scores", "bias", "scale", "placement", "dtype", "want"),
    [
        ([1e308, 0.0], [1e308, 0.0], 1.0, "post_scale", "float64", [1.0, 0.0]),  # z = 2e308 overflows
        ([-1e308, -1e308], [-1e308, -1e308], 1.0, "post_scale", "float64", [0.5, 0.5]),  # was an "empty" row
        ([3e38, 0.0], None, 2.0, "post_scale", "float32", [1.0, 0.0]),  # s * scale overflows float32
        ([1e308, 0.0], [1e308, 0.0], 0.5, "pre_scale", "float64", [1.0, 0.0]),  # s + b overflows, z = 1e308
        ([-1.5e308, 0.0], [1.7e308, -1.7e308], 2.0, "post_scale", "float64", [1.0, 0.0]),  # s * scale = -inf, z finite
        ([1e-30, 0.0], None, 1e39, "post_scale", "float32", [1.0, 0.0]),  # the scale itself is no float32
    ],
)
def test_overflowing_logits_exact(xp, scores, bias, scale, placement, dtype, want):
    dt = getattr(xp, dtype)
    b = None if bias is None else xp.asarray(bias, dtype=dt)
    p = rp.biased_softmax(xp.asarray(scores, dtype=dt), b, scale=scale, placement=placement)
    np.testing.assert_array_equal(to_np(p), np.asarray(want))


def test_overflowing_logits_lse_is_the_rounded_exact_value(xp):
    # lse = max z + log(count): -2e308 + log 2 rounds to -inf in float64 (a row that has entries: probabilities 1/2),
    # 2e308 + 0 to +inf, and 1e308 + log 2 (pre_scale, no overflow of the logit itself) is finite.
    p, lse = rp.biased_softmax(
        xp.asarray([[1e308, 0.0], [1e308, 1e308]]), xp.asarray([[1e308, 0.0], [0.0, 0.0]]), scale=1.0, return_lse=True
    )
    np.testing.assert_array_equal(to_np(p), [[1.0, 0.0], [0.5, 0.5]])
    np.testing.assert_array_equal(to_np(lse)[0], math.inf)
    assert to_np(lse)[1] == 1e308  # log 2 is below half an ulp of 1e308
    _, lse = rp.biased_softmax(xp.asarray([-1e308, -1e308]), xp.asarray([-1e308, -1e308]), return_lse=True)
    assert to_np(lse) == -math.inf


def _argmax_rows(u, keep):
    """Probabilities of logits u * 2^E for a huge E: uniform over each row's attended maximum, 0 elsewhere."""
    u = np.where(keep, u, -np.inf)
    top = u.max(axis=-1, keepdims=True)
    hit = (u == top) & keep
    count = hit.sum(axis=-1, keepdims=True)
    return np.where(count > 0, hit / np.maximum(count, 1), 0.0)


@given(
    data=st.data(),
    dtype=st.sampled_from(["float32", "float64"]),
    placement=st.sampled_from(["post_scale", "pre_scale"]),
    rows=st.integers(1, 4),
    cols=st.integers(1, 6),
    use_mask=st.booleans(),
)
def test_fuzz_overflowing_logits_against_argmax(data, dtype, placement, rows, cols, use_mask):
    """Scores and biases a * 2^E and c * 2^E (a, c small integers) near the top of the range, whose sums overflow:
    the result is the exact softmax of (a + c) * 2^E, which is uniform over the argmax of a + c."""
    ints = st.lists(st.integers(-3, 3), min_size=rows * cols, max_size=rows * cols)
    a = np.array(data.draw(ints, label="a"), dtype=np.float64).reshape(rows, cols)
    c = np.array(data.draw(ints, label="c"), dtype=np.float64).reshape(rows, cols)
    keep = np.ones((rows, cols), bool)
    if use_mask:
        keep = np.array(data.draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols)), bool)
        keep = keep.reshape(rows, cols)
    emax = 128 if dtype == "float32" else 1024
    e = emax - 2  # 3 * 2^e is beyond the range: a * 2^e alone may overflow after the scale
    t = data.draw(st.integers(1, 3), label="t")
    if placement == "post_scale":  # z = s * 2^t + b
        s, b, scale = a * 2.0 ** (e - t), c * 2.0**e, 2.0**t
    else:  # z = (s + b) * 2^-t, the intermediate s + b overflowing
        s, b, scale = a * 2.0**e, c * 2.0**e, 2.0**-t
    p = rp.biased_softmax(
        np.asarray(s, dtype=dtype),
        np.asarray(b, dtype=dtype),
        mask=keep if use_mask else None,
        scale=scale,
        placement=placement,
    )
    np.testing.assert_array_equal(p, _argmax_rows(a + c, keep).astype(dtype))  # 1 / count, rounded once


@given(data=st.data(), a=st.integers(0, 100), cols=st.integers(2, 8))
def test_fuzz_hidden_scale_against_scipy(data, a, cols):
    """float32 scores z * 2^-a with scale 2^(a + 100): scale and s * scale are far beyond float32 while the logits
    z * 2^100 are computed exactly in float64 by SciPy (here they are huge, so the check is the argmax and ties)."""
    z = np.array(data.draw(st.lists(st.integers(-4, 4), min_size=cols, max_size=cols)), dtype=np.float64)
    s = (z * 2.0**-a).astype(np.float32)
    p = rp.biased_softmax(s, scale=2.0 ** (a + 100))
    want, _ = scipy_reference(z * 2.0**100)
    np.testing.assert_array_equal(p, want.astype(np.float32))  # 1 / count, rounded once


def test_softmax_errors_name_the_argument():
    with pytest.raises(TypeError, match=r"^mask: expected an array .*got list$"):  # was blamed on bias
        rp.biased_softmax(np.ones(2), mask=[True, False])
    with pytest.raises(ValueError, match=r"^scale: expected a finite number within the float64 range"):
        rp.biased_softmax(np.ones(2), scale=10**400)
    with pytest.raises(TypeError, match=r"^scores: expected float16, bfloat16, float32 or float64 \(long double"):
        rp.biased_softmax(np.ones(2, np.longdouble))  # was computed in float32 and labelled float128
    scores = np.zeros((50, 50))
    scores[3, 4] = np.nan
    with pytest.raises(ValueError) as info:
        rp.biased_softmax(scores)
    assert str(info.value).endswith(
        "got NaN or +inf in 1 of 2500 entries of an array of shape (50, 50), the first at index (3, 4): nan"
    )
