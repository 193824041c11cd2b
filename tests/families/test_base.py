"""The plumbing every family shares (families/base.py) at the edges: parameter gradients whose partial sums
overflow, and results whose size is checked before allocating (issue 15). Expected values are exact sums."""

from __future__ import annotations

import math

import numpy as np
import pytest

import relpos_ref as rp

POS = (np.array([0]), np.array([0, 1, 2]))  # offsets 0, -1, -2: |D| = 0, 1, 2


@pytest.mark.parametrize(
    ("make", "name", "dtype", "top"),
    [
        (lambda d: rp.ALiBi([1.0], dtype=d), "slopes", np.float64, 1e308),
        (lambda d: rp.ALiBi([1.0], dtype=d), "slopes", np.float32, 3e38),
        (lambda d: rp.KerplePower([1.0], [1.0], dtype=d), "r1", np.float64, 1e308),
        (lambda d: rp.ALiBi([1.0], dtype=d), "slopes", np.float16, 60000.0),
    ],
)
def test_bias_vjp_partial_sums_overflow_exact_gradient(make, name, dtype, top):
    # d/dm of -m |D| summed with cotangent (0, t, -t) at |D| = 0, 1, 2: -(t - 2t) = t exactly, although t * 2
    # overflows (it was inf, and an overflow warning).
    t = float(np.asarray(top, dtype))
    g = make(dtype).bias_vjp(*POS, np.array([[[0.0, t, -t]]], dtype))[name]
    assert g.dtype == dtype
    assert float(g[0]) == t


def test_bias_vjp_beyond_the_range_is_its_rounding():
    # -(-1e308 * 1 - 1e308 * 2) = 3e308: beyond float64, so +inf is its rounding; no warning, no NaN.
    g = rp.ALiBi([1.0]).bias_vjp(*POS, np.array([[[0.0, -1e308, -1e308]]]))["slopes"]
    assert float(g[0]) == math.inf


def test_bias_vjp_ordinary_cotangent_unchanged_bits():
    # The rescaled path runs only after an overflow: an ordinary call is the plain sum, bit for bit.
    d = np.array([[[0.5, 0.25, -0.125]]])
    assert float(rp.ALiBi([1.0]).bias_vjp(*POS, d)["slopes"][0]) == -(0.25 * 1 - 0.125 * 2)


def test_bias_size_checked_before_allocating():
    # Zero-stride positions of 2**15 entries: the offsets (2**30 int64, 8 GiB) pass, 16 float64 heads (128 GiB)
    # do not; selecting one head makes it fit the limit on the bias (only the offsets would then be allocated, so
    # the call is not made here).
    wide = np.broadcast_to(np.int64(0), (2**15,))
    with pytest.raises(ValueError, match=r"^q_pos, k_pos: expected sizes whose bias \(h, Sq, Sk\) fits the 8 GiB "):
        rp.ALiBi(np.ones(16)).bias(wide, wide)
    huge = np.broadcast_to(np.int64(0), (2**28,))
    with pytest.raises(ValueError, match=r"shape \(268435456, 268435456\) \(8-byte elements, 5\.369e\+08 GiB\)$"):
        rp.KerpleLog([1.0], [1.0]).bias(huge, huge)
