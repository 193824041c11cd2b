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


# -- Issue 15: offsets that do not fit int64, and sizes that cannot be allocated -------------------------------------


@pytest.mark.parametrize(
    ("q_pos", "k_pos", "dtype"),
    [
        ([2**62], [-(2**62)], np.int64),  # 2**63 wrapped to -2**63
        ([-(2**63)], [1], np.int64),
        ([0], [-(2**63)], np.int64),  # the offset 2**63 itself
        ([2**63 + 5], [0], np.uint64),  # the cast to int64 wraps: a wrong sign
        ([2**64 - 1], [0], np.uint64),
    ],
)
def test_offsets_outside_int64_rejected(q_pos, k_pos, dtype):
    q, k = np.array(q_pos, dtype=dtype), np.array(k_pos, dtype=dtype)
    for fn in (rp.relative_offsets, rp.causal_mask, rp.ALiBi([1.0]).bias):
        with pytest.raises(ValueError, match=r"^q_pos, k_pos: expected positions whose offsets .* got offsets from"):
            fn(q, k)


def test_uint64_positions_above_2_63_with_small_offsets_are_exact():
    q = np.array([2**63 + 5, 2**63], dtype=np.uint64)
    k = np.array([2**63, 2**63 + 7], dtype=np.uint64)
    np.testing.assert_array_equal(rp.relative_offsets(q, k), [[5, -2], [0, -7]])
    np.testing.assert_array_equal(rp.causal_mask(q, k), [[True, False], [True, False]])
    np.testing.assert_array_equal(rp.ALiBi([1.0]).bias(q, k)[0], [[-5.0, -2.0], [0.0, -7.0]])


@given(
    q=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=3),
    k=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=3),
    near=st.integers(0, 3),
)
def test_fuzz_offsets_exact_or_rejected(q, k, near):
    """Offsets are exactly the Python integers q_i - k_j when all lie within +-(2**63 - 1), else a ValueError."""
    if near:  # positions near the two ends, where int64 arithmetic wraps
        q = [min(2**63 - 1, x // 2**near + 2**62) for x in q]
        k = [max(-(2**63), x // 2**near - 2**62) for x in k]
    exact = [[a - b for b in k] for a in q]
    fits = all(abs(d) <= 2**63 - 1 for row in exact for d in row)
    qa, ka = np.array(q, dtype=np.int64), np.array(k, dtype=np.int64)
    if fits:
        assert rp.relative_offsets(qa, ka).tolist() == exact
        assert rp.causal_mask(qa, ka).tolist() == [[d >= 0 for d in row] for row in exact]
    else:
        with pytest.raises(ValueError, match=r"^q_pos, k_pos: expected positions whose offsets"):
            rp.relative_offsets(qa, ka)


@pytest.mark.parametrize(
    ("q_len", "k_len", "name"),
    [(1, 2**63, "k_len"), (2**63 - 1, 1, "q_len"), (1, 2**64, "k_len"), (1, 10**10, "k_len"), (10**10, 1, "q_len")],
)
def test_positions_huge_lengths_fail_fast(q_len, k_len, name):
    # Before: empty arrays (2**63), OverflowError (2**64) or an attempt to allocate 74.5 GiB (10**10).
    with pytest.raises(ValueError, match=rf"^{name}: expected an integer <= 1073741824 \(.*8 GiB.*\), got "):
        rp.positions(q_len, k_len)


def test_positions_bad_device_names_device():
    with pytest.raises(ValueError, match=r"^device: expected a device of numpy \(or None\), got 'gpu9'"):
        rp.positions(2, 2, device="gpu9")


@pytest.mark.parametrize("func", [rp.relative_offsets, rp.causal_mask])
@pytest.mark.parametrize(("sq", "sk"), [(2**28, 2**28), (2**15 + 1, 2**15)])
def test_offsets_size_checked_before_allocating(func, sq, sk):
    # Zero-stride positions cost 8 bytes each; their (Sq, Sk) int64 offsets would be 512 PiB (a MemoryError, after
    # a 2 GiB copy of each operand) or just over 8 GiB. The limit is 2**30 entries.
    q, k = np.broadcast_to(np.int64(0), (sq,)), np.broadcast_to(np.int64(0), (sk,))
    pattern = (
        rf"^q_pos, k_pos: expected sizes whose int64 offsets \(Sq, Sk\) fits the 8 GiB size limit, got shape \({sq}, "
    )
    with pytest.raises(ValueError, match=pattern):
        func(q, k)


def test_offsets_below_the_size_limit_accepted():
    # Zero-stride positions below the limit are ordinary input: exact offsets (1 * 2**20 entries, 8 MiB).
    q, k = np.zeros(1, np.int64), np.broadcast_to(np.int64(-3), (2**20,))
    out = rp.relative_offsets(q, k)
    assert out.shape == (1, 2**20)
    assert int(out.min()) == int(out.max()) == 3
