"""Unit tests of positions, relative_offsets and causal_mask.

Expected values are written out by hand (FlashAttention and PyTorch docstring examples) or built with plain Python
loops, never taken from relpos_ref itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace
from hypothesis import given
from hypothesis import strategies as st

import relpos_ref as rp


def to_np(x):
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)


def rows(mask) -> list[str]:
    return ["".join("1" if v else "0" for v in row) for row in to_np(mask).tolist()]


def same_namespace(a, xp) -> bool:
    return array_namespace(a).__name__ == xp.__name__


# -- positions ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q_len", "k_len", "bottom_right"),
    [
        (1, 1, [0]),
        (2, 5, [3, 4]),
        (5, 5, [0, 1, 2, 3, 4]),
        (5, 2, [-3, -2, -1, 0, 1]),
        (1, 7, [6]),  # decoding one token against a KV cache of 7
        (3, 4, [1, 2, 3]),
    ],
)
def test_positions_bottom_right_and_top_left(xp, q_len, k_len, bottom_right):
    q_br, k_br = rp.positions(q_len, k_len, xp=xp)  # default alignment is bottom_right
    q_tl, k_tl = rp.positions(q_len, k_len, align="top_left", xp=xp)
    assert to_np(q_br).tolist() == bottom_right
    assert to_np(q_tl).tolist() == list(range(q_len))
    for k_pos in (k_br, k_tl):
        assert to_np(k_pos).tolist() == list(range(k_len))
    for arr in (q_br, k_br, q_tl, k_tl):
        assert arr.dtype == xp.int64
        assert arr.ndim == 1
        assert same_namespace(arr, xp)


def test_positions_default_namespace_is_numpy():
    q_pos, k_pos = rp.positions(2, 3)
    assert isinstance(q_pos, np.ndarray)
    assert isinstance(k_pos, np.ndarray)
    assert q_pos.dtype == np.int64
    assert k_pos.dtype == np.int64


@given(q_len=st.integers(1, 60), k_len=st.integers(1, 60), align=st.sampled_from(["bottom_right", "top_left"]))
def test_positions_formula(q_len, k_len, align):
    q_pos, k_pos = rp.positions(q_len, k_len, align=align)
    start = k_len - q_len if align == "bottom_right" else 0
    assert q_pos.tolist() == [start + i for i in range(q_len)]
    assert k_pos.tolist() == list(range(k_len))
    if align == "bottom_right":
        assert int(q_pos[-1]) == int(k_pos[-1])  # the last query sits at the last key


# -- relative offsets ---------------------------------------------------------------------------------------------


def test_relative_offsets_sign(xp):
    # Query at absolute position 3 against keys 0..4: past keys have positive offsets, future keys negative.
    q_pos = xp.asarray([3], dtype=xp.int64)
    k_pos = xp.asarray([0, 1, 2, 3, 4], dtype=xp.int64)
    delta = rp.relative_offsets(q_pos, k_pos)
    assert to_np(delta).tolist() == [[3, 2, 1, 0, -1]]
    assert delta.dtype == xp.int64
    assert same_namespace(delta, xp)


@pytest.mark.parametrize("dtype_name", ["int8", "int16", "int32", "int64", "uint8"])
def test_relative_offsets_arbitrary_positions_and_dtypes(xp, dtype_name):
    q_list = [7, 0, 3, 200] if dtype_name == "uint8" else [7, 0, 3, 100]
    k_list = [5, 0, 9]
    dtype = getattr(xp, dtype_name)
    delta = rp.relative_offsets(xp.asarray(q_list, dtype=dtype), xp.asarray(k_list, dtype=dtype))
    # An unsigned input must not wrap around: offsets are computed in int64.
    assert delta.dtype == xp.int64
    assert to_np(delta).tolist() == [[i - j for j in k_list] for i in q_list]


def test_relative_offsets_large_positions(xp):
    # Positions beyond 2**31 (long contexts, absolute positions of a long-running stream) stay exact.
    big = 2**40
    q_pos = xp.asarray([big, big + 5], dtype=xp.int64)
    k_pos = xp.asarray([0, big + 7], dtype=xp.int64)
    assert to_np(rp.relative_offsets(q_pos, k_pos)).tolist() == [[big, -7], [big + 5, -2]]


# -- causal mask --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q_len", "k_len", "align", "expected"),
    [
        # FlashAttention >= 2.1 docstring (flash_attn_interface.py, flash_attn_func): bottom-right alignment.
        (2, 5, "bottom_right", ["11110", "11111"]),
        (5, 2, "bottom_right", ["00", "00", "00", "10", "11"]),
        # PyTorch SDPA is_causal=True is top-left: tril(ones(Sq, Sk)).
        (2, 5, "top_left", ["10000", "11000"]),
        (5, 2, "top_left", ["10", "11", "11", "11", "11"]),
        # torch.nn.attention.bias.causal_lower_right(3, 4) and causal_upper_left(3, 4).
        (3, 4, "bottom_right", ["1100", "1110", "1111"]),
        (3, 4, "top_left", ["1000", "1100", "1110"]),
        (3, 3, "bottom_right", ["100", "110", "111"]),
        (3, 3, "top_left", ["100", "110", "111"]),
    ],
)
def test_causal_mask_flash_docstring_examples(xp, q_len, k_len, align, expected):
    q_pos, k_pos = rp.positions(q_len, k_len, align=align, xp=xp)
    mask = rp.causal_mask(q_pos, k_pos)
    assert mask.dtype == xp.bool
    assert tuple(mask.shape) == (q_len, k_len)
    assert same_namespace(mask, xp)
    assert rows(mask) == expected


@given(
    q_len=st.integers(1, 40),
    k_len=st.integers(1, 40),
    align=st.sampled_from(["bottom_right", "top_left"]),
)
def test_causal_mask_visible_counts(q_len, k_len, align):
    mask = rp.causal_mask(*rp.positions(q_len, k_len, align=align))
    shift = k_len - q_len if align == "bottom_right" else 0
    for i in range(q_len):
        # Query i (absolute position shift + i) sees keys 0..shift+i, clipped to [0, k_len].
        visible = max(0, min(k_len, shift + i + 1))
        assert mask[i].tolist() == [True] * visible + [False] * (k_len - visible)


def test_causal_mask_arbitrary_positions(xp):
    # Chunked prefill: queries 10..12 against keys 8..14 (a window of the cache).
    q_pos = xp.asarray([10, 11, 12], dtype=xp.int32)
    k_pos = xp.asarray([8, 9, 10, 11, 12, 13, 14], dtype=xp.int32)
    assert rows(rp.causal_mask(q_pos, k_pos)) == ["1110000", "1111000", "1111100"]


def test_positions_explicit_xp_mixed_with_other_backend_rejected(xp):
    import array_api_compat.numpy as np_compat
    import array_api_strict

    other = array_api_strict if xp.__name__ != "array_api_strict" else np_compat
    q_pos = xp.asarray([0, 1], dtype=xp.int64)
    k_pos = other.asarray([0, 1], dtype=other.int64)
    with pytest.raises(TypeError, match="q_pos, k_pos"):
        rp.relative_offsets(q_pos, k_pos)
    with pytest.raises(TypeError, match="q_pos, k_pos"):
        rp.causal_mask(q_pos, k_pos)
