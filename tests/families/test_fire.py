"""FIRE at the edges of the range: hidden units beyond it recomputed exactly, interpolants beyond it rejected (issue
15). The expected values are mpmath evaluations of the FIRE formula, never relpos_ref's output."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

import relpos_ref as rp


def _mp_fire(w1, b1, w2, b2, c, L, i, j):
    with mpmath.workdps(60):
        mp = mpmath.mpf
        x = mpmath.log1p(mp(c) * abs(i - j)) / mpmath.log1p(mp(c) * max(mp(L), mp(i)))
        return b2 + sum(mp(w) * max(mp(a) * x + mp(b), mp(0)) for a, b, w in zip(w1, b1, w2, strict=True))


@pytest.mark.parametrize(
    ("dtype", "w1", "w2", "k", "rel"),
    [
        (np.float64, 1e307, 1e-10, -(2**40), 1e-13),  # hidden 4e308 (inf), bias 4e298: was +inf
        (np.float64, 1e300, 1e-300, -(2**62), 1e-13),
        (np.float32, 3e38, 1e-3, -100, 1e-6),  # hidden 2e39 (inf in float32), bias 2e36: was +inf and a warning
    ],
)
def test_fire_hidden_unit_beyond_range_gives_the_exact_bias(dtype, w1, w2, k, rel):
    fam = rp.FIRE(
        np.array([[w1]], dtype), np.zeros(1, dtype), np.array([[w2]], dtype), np.zeros(1, dtype), c=1.0, L=1.0
    )
    w1r, w2r = float(dtype(w1)), float(dtype(w2))  # the weights as stored
    want = float(_mp_fire([w1r], [0.0], [w2r], 0.0, 1.0, 1.0, 0, k))
    assert math.isfinite(want)
    b = fam.bias(np.array([0]), np.array([k, 0]))
    assert float(b[0, 0, 0]) == pytest.approx(want, rel=rel)
    assert float(b[0, 0, 1]) == 0.0  # x = 0 at the query itself: relu(0) = 0, unaffected by the recomputation
    assert float(fam.bias_magnitude(np.array([0]), np.array([k]))[0, 0, 0]) == pytest.approx(abs(want), rel=rel)


def test_fire_bias_beyond_the_range_is_its_rounding():
    # hidden 4e308, output weight -1: the exact bias -4e308 is beyond float64, so -inf is its rounding (no NaN).
    fam = rp.FIRE(np.array([[1e307]]), np.zeros(1), np.array([[-1.0]]), np.zeros(1), c=1.0, L=1.0)
    assert fam.bias(np.array([0]), np.array([-(2**40)]))[0, 0, 0] == -math.inf


def test_fire_recomputation_only_touches_overflowing_entries():
    # A second head with ordinary weights keeps the bits of the plain computation, and so does every entry of a
    # family whose bound stays inside the range.
    w1, b1 = np.array([[1e307], [0.5]]), np.array([0.0, 0.25])
    w2 = np.array([[1e-10, 0.0], [0.0, 3.0]])
    fam = rp.FIRE(w1, b1, w2, np.array([0.0, 1.0]), c=1.0, L=1.0)
    small = rp.FIRE(w1[1:], b1[1:], w2[1:, 1:], np.array([1.0]), c=1.0, L=1.0)
    q, k = np.array([0, 5]), -np.array([2**40, 3, 0])
    np.testing.assert_array_equal(fam.bias(q, k)[1], small.bias(q, k)[0])
    want = [
        [float(_mp_fire([1e307, 0.5], [0.0, 0.25], [1e-10, 0.0], 0.0, 1.0, 1.0, i, j)) for j in k.tolist()]
        for i in q.tolist()
    ]
    np.testing.assert_allclose(fam.bias(q, k)[0], want, rtol=1e-13)


@pytest.mark.parametrize(
    ("kw", "top"),
    [({"c": 1.0, "L": 3e-308}, "4.49e+307"), ({"c": 0.5, "L": 5e-308}, "4.49e+307"), ({"c": 1.0, "L": 1e-37}, None)],
)
def test_fire_interpolant_beyond_range_rejected(kw, top):
    # x = psi(|i - j|) / psi(max(L, i)) reaches 43.7 / 3e-308 = 1.5e309 far from the query at 0: inf, then inf or
    # NaN in the bias for any weights. Rejected at construction, naming c and L.
    dtype = np.float64 if top else np.float32
    args = [np.ones((1, 1), dtype), np.zeros(1, dtype), np.ones((1, 1), dtype), np.zeros(1, dtype)]
    with pytest.raises(ValueError, match=r"^c, L: expected c, L and eps whose largest interpolant ") as info:
        rp.FIRE(*args, **kw)
    assert f"at most {top or '8.51e+37'} " in str(info.value)
