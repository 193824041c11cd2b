"""Unit tests of attention against a naive dense float64 NumPy reference written here.

The reference materialises the whole bias with ``family.bias`` (the family values themselves are tested in
test_families.py), repeats the key/value heads explicitly for grouped-query attention, builds the causal mask from
positions computed here, and applies a plain masked softmax.
"""

from __future__ import annotations

import math

import mpmath
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


def np_positions(q_len, k_len, align):
    start = k_len - q_len if align == "bottom_right" else 0
    return np.arange(start, start + q_len), np.arange(k_len)


def reference(
    q,
    k,
    v,
    *,
    bias=None,
    causal=False,
    align="bottom_right",
    scale=None,
    placement="post_scale",
    mask=None,
    fully_masked="zero",
):
    """Dense attention in float64. ``bias``: None or an array broadcastable to (B, H, Sq, Sk)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    nb, nh, sq, d = q.shape
    nkv, sk = k.shape[1], k.shape[2]
    rep = nh // nkv
    k = np.repeat(k, rep, axis=1)  # kv head g serves query heads g*rep .. g*rep + rep - 1
    v = np.repeat(v, rep, axis=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = np.einsum("bhid,bhjd->bhij", q, k)
    b = 0.0 if bias is None else np.asarray(bias, dtype=np.float64)
    z = s * scale + b if placement == "post_scale" else (s + b) * scale
    keep = np.ones((nb, nh, sq, sk), dtype=bool)
    if causal:
        q_pos, k_pos = np_positions(sq, sk, align)
        keep &= k_pos[None, :] <= q_pos[:, None]
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool)
    z = np.where(keep, z, -np.inf)
    empty = ~np.any(z > -np.inf, axis=-1)
    m = np.where(empty, 0.0, np.max(np.where(empty[..., None], 0.0, z), axis=-1))
    e = np.exp(z - m[..., None])
    total = np.where(empty, 1.0, e.sum(-1))
    p = e / total[..., None]
    out = p @ v
    lse = m + np.log(total)
    fill = 0.0 if fully_masked == "zero" else np.nan
    out = np.where(empty[..., None], fill, out)
    lse = np.where(empty, -np.inf if fully_masked == "zero" else np.nan, lse)
    return out, lse


RNG = np.random.default_rng(5)


def qkv(nb, nh, nkv, sq, sk, d, dv=None, *, seed=0):
    rng = np.random.default_rng(seed)
    dv = d if dv is None else dv
    return (
        rng.standard_normal((nb, nh, sq, d)),
        rng.standard_normal((nb, nkv, sk, d)),
        rng.standard_normal((nb, nkv, sk, dv)),
    )


def family(name, xp, nh, sq, sk):
    rng = np.random.default_rng(17)
    if name == "ALiBi":
        return rp.ALiBi.from_num_heads(nh, xp=xp)
    if name == "T5Bias":
        return rp.T5Bias(
            xp.asarray(rng.standard_normal((nh, 16))), bidirectional=True, max_distance=12, layout="heads_buckets"
        )
    if name == "OffsetBias":
        return rp.OffsetBias(xp.asarray(rng.standard_normal((nh, 7))))
    if name == "KerplePower":
        return rp.KerplePower(xp.asarray(rng.uniform(0.1, 1, nh)), xp.asarray(rng.uniform(0.1, 2, nh)))
    if name == "KerpleLog":
        return rp.KerpleLog(xp.asarray(rng.uniform(0.1, 2, nh)), xp.asarray(rng.uniform(0.1, 1, nh)))
    if name == "FIRE":
        w = 5
        arrays = [rng.standard_normal(s) for s in ((w, 1), (w,), (nh, w), (nh,))]
        return rp.FIRE(*(xp.asarray(a) for a in arrays), c=0.2, L=4.0)
    if name == "Sandwich":
        return rp.Sandwich(nh, 8, xp=xp)
    if name == "TensorBias":
        arr = rng.standard_normal((nh, sq, sk))
        arr[:, :, 0] = -np.inf  # -inf entries of an array bias act as a mask
        return rp.TensorBias(xp.asarray(arr))
    raise AssertionError(name)


FAMILIES = ["ALiBi", "T5Bias", "OffsetBias", "KerplePower", "KerpleLog", "FIRE", "Sandwich", "TensorBias"]
SHAPES = [
    (5, 5, "bottom_right", None),
    (3, 7, "bottom_right", 2),
    (7, 3, "bottom_right", 3),
    (3, 7, "top_left", None),
    (7, 3, "top_left", 2),
]


def materialise(fam, xp, sq, sk, align):
    q_pos, k_pos = rp.positions(sq, sk, align=align, xp=xp)
    return to_np(fam.bias(q_pos, k_pos))[None]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("sq", "sk", "align", "block_size"), SHAPES)
def test_every_family_against_reference(xp, name, causal, sq, sk, align, block_size):
    nb, nh, nkv, d = 2, 4, 2, 8
    q, k, v = qkv(nb, nh, nkv, sq, sk, d, 3, seed=sq * 10 + sk)
    fam = family(name, xp, nh, sq, sk)
    out, lse = rp.attention(
        xp.asarray(q),
        xp.asarray(k),
        xp.asarray(v),
        bias=fam,
        causal=causal,
        align=align,
        block_size=block_size,
        return_lse=True,
    )
    want_out, want_lse = reference(q, k, v, bias=materialise(fam, xp, sq, sk, align), causal=causal, align=align)
    assert array_namespace(out).__name__ == xp.__name__
    assert out.dtype == xp.float64
    assert lse.dtype == xp.float64
    assert tuple(out.shape) == (nb, nh, sq, 3)
    assert tuple(lse.shape) == (nb, nh, sq)
    np.testing.assert_allclose(to_np(out), want_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(to_np(lse), want_lse, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("placement", ["post_scale", "pre_scale"])
def test_placement(xp, placement):
    q, k, v = qkv(1, 2, 2, 4, 6, 16, seed=3)
    fam = rp.KerpleLog(xp.asarray([1.0, 2.0]), xp.asarray([0.5, 0.25]))
    out = rp.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=fam, causal=True, placement=placement)
    want, _ = reference(q, k, v, bias=materialise(fam, xp, 4, 6, "bottom_right"), causal=True, placement=placement)
    np.testing.assert_allclose(to_np(out), want, rtol=1e-12, atol=1e-13)


def test_align_default_bottom_right(xp):
    q, k, v = qkv(1, 2, 2, 3, 8, 4, seed=9)
    fam = rp.ALiBi.from_num_heads(2, xp=xp)
    default = rp.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=fam, causal=True)
    # Explicit bottom-right: queries at absolute positions 5, 6, 7 of the 8 keys; mask and ALiBi bias written here.
    q_pos = np.array([5, 6, 7])
    k_pos = np.arange(8)
    delta = q_pos[:, None] - k_pos[None, :]
    bias = -np.array([2.0**-4, 2.0**-8])[:, None, None] * np.abs(delta)[None]
    mask = delta >= 0
    want, _ = reference(q, k, v, bias=bias[None], mask=mask)
    np.testing.assert_allclose(to_np(default), want, rtol=1e-12, atol=1e-13)
    top_left = rp.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=fam, causal=True, align="top_left")
    assert not np.allclose(to_np(top_left), want)


@pytest.mark.parametrize("fully_masked", ["zero", "nan"])
def test_fully_masked_rows_bottom_right_sq_gt_sk(xp, fully_masked):
    q, k, v = qkv(2, 2, 1, 5, 2, 4, seed=1)
    fam = rp.ALiBi.from_num_heads(2, xp=xp)
    for block_size in (None, 1, 2, 4):
        out, lse = rp.attention(
            xp.asarray(q),
            xp.asarray(k),
            xp.asarray(v),
            bias=fam,
            causal=True,
            fully_masked=fully_masked,
            return_lse=True,
            block_size=block_size,
        )
        out, lse = to_np(out), to_np(lse)
        # Query positions -3, -2, -1 see no key.
        if fully_masked == "zero":
            assert (out[:, :, :3] == 0.0).all()
            assert (lse[:, :, :3] == -np.inf).all()
        else:
            assert np.isnan(out[:, :, :3]).all()
            assert np.isnan(lse[:, :, :3]).all()
        want_out, want_lse = reference(q, k, v, bias=materialise(fam, xp, 5, 2, "bottom_right"), causal=True)
        np.testing.assert_allclose(out[:, :, 3:], want_out[:, :, 3:], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(lse[:, :, 3:], want_lse[:, :, 3:], rtol=1e-12, atol=1e-13)
        # Row 3 (position 0) sees exactly key 0: the output is v of key 0.
        np.testing.assert_allclose(out[:, :, 3], np.repeat(v[:, :, 0], 2, axis=1), rtol=1e-15)


@pytest.mark.parametrize("nkv", [2, 1, 4])
def test_gqa_head_mapping(xp, nkv):
    nh = 4
    q, k, v = qkv(2, nh, nkv, 5, 6, 4, seed=nkv)
    out = rp.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), causal=True)
    # Query head h uses kv head h // (H / Hkv): kv heads repeated consecutively (HF repeat_kv, SDPA enable_gqa).
    rep = nh // nkv
    k_rep = np.stack([k[:, h // rep] for h in range(nh)], axis=1)
    v_rep = np.stack([v[:, h // rep] for h in range(nh)], axis=1)
    want, _ = reference(q, k_rep, v_rep, causal=True)
    np.testing.assert_allclose(to_np(out), want, rtol=1e-12, atol=1e-13)
    if 1 < nkv < nh:
        tiled, _ = reference(q, np.tile(k, (1, rep, 1, 1)), np.tile(v, (1, rep, 1, 1)), causal=True)
        assert not np.allclose(to_np(out), tiled)


def test_scale_default_is_inverse_sqrt_head_dim(xp):
    q, k, v = qkv(1, 2, 2, 4, 4, 9, 5, seed=4)
    out = rp.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v))
    want, _ = reference(q, k, v, scale=1.0 / 3.0)
    np.testing.assert_allclose(to_np(out), want, rtol=1e-12, atol=1e-13)
    explicit = rp.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), scale=1.0 / 3.0)
    np.testing.assert_allclose(to_np(explicit), to_np(out), rtol=1e-14, atol=1e-15)
    unscaled, _ = reference(q, k, v, scale=1.0)
    assert not np.allclose(to_np(out), unscaled)


def test_t5_reproduction_needs_scale_one(xp):
    q, k, v = qkv(1, 3, 3, 6, 6, 8, seed=6)
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((32, 3))  # HF nn.Embedding(num_buckets, n_heads) weight
    fam = rp.T5Bias(xp.asarray(weight), bidirectional=True, layout="buckets_heads")
    out = rp.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=fam, scale=1.0)
    # T5: softmax(q . k + table[bucket]) v with no 1/sqrt(d). Buckets for |delta| < 8 are exact: delta itself
    # (past) or 16 + |delta| (future), bidirectional defaults.
    delta = np.arange(6)[:, None] - np.arange(6)[None, :]
    buckets = np.where(delta >= 0, delta, 16 - delta)
    bias = np.transpose(weight[buckets], (2, 0, 1))[None]
    want, _ = reference(q, k, v, bias=bias, scale=1.0)
    np.testing.assert_allclose(to_np(out), want, rtol=1e-12, atol=1e-13)
    default = rp.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=fam)
    assert not np.allclose(to_np(default), want)


@pytest.mark.parametrize("bias_shape", [(4, 5, 6), (1, 4, 5, 6), (2, 1, 1, 6), (6,), (2, 4, 5, 6), (5, 1)])
def test_array_bias_broadcasting(xp, bias_shape):
    q, k, v = qkv(2, 4, 2, 5, 6, 4, seed=8)
    bias = RNG.standard_normal(bias_shape)
    for block_size in (None, 2):
        out, lse = rp.attention(
            xp.asarray(q),
            xp.asarray(k),
            xp.asarray(v),
            bias=xp.asarray(bias),
            causal=True,
            block_size=block_size,
            return_lse=True,
        )
        want_out, want_lse = reference(q, k, v, bias=bias, causal=True)
        np.testing.assert_allclose(to_np(out), want_out, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(to_np(lse), want_lse, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("mask_shape", [(2, 4, 5, 6), (5, 6), (1, 1, 1, 6), (2, 1, 5, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_user_mask(xp, mask_shape, causal):
    q, k, v = qkv(2, 4, 4, 5, 6, 4, seed=12)
    mask = RNG.random(mask_shape) < 0.6
    fam = rp.ALiBi.from_num_heads(4, xp=xp)
    bias = materialise(fam, xp, 5, 6, "bottom_right")
    for block_size in (None, 2):
        out, lse = rp.attention(
            xp.asarray(q),
            xp.asarray(k),
            xp.asarray(v),
            bias=fam,
            mask=xp.asarray(mask),
            causal=causal,
            block_size=block_size,
            return_lse=True,
        )
        want_out, want_lse = reference(q, k, v, bias=bias, mask=mask, causal=causal)
        np.testing.assert_allclose(to_np(out), want_out, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(to_np(lse), want_lse, rtol=1e-12, atol=1e-13)


def test_float32(xp):
    q, k, v = qkv(1, 4, 2, 6, 9, 8, seed=21)
    fam = rp.KerpleLog(
        xp.asarray([1.0, 0.5, 2.0, 0.25], dtype=xp.float32), xp.asarray([0.5, 1.0, 0.5, 2.0], dtype=xp.float32)
    )
    args = [xp.asarray(a, dtype=xp.float32) for a in (q, k, v)]
    out, lse = rp.attention(*args, bias=fam, causal=True, return_lse=True)
    assert out.dtype == xp.float32
    assert lse.dtype == xp.float32
    q32, k32, v32 = (a.astype(np.float32).astype(np.float64) for a in (q, k, v))
    want_out, want_lse = reference(q32, k32, v32, bias=materialise(fam, xp, 6, 9, "bottom_right"), causal=True)
    np.testing.assert_allclose(to_np(out), want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_np(lse), want_lse, rtol=1e-5, atol=1e-5)


def test_float16_computed_in_float32():
    q, k, v = (a.astype(np.float16) for a in qkv(2, 4, 2, 7, 9, 8, seed=22))
    for bias in (rp.ALiBi.from_num_heads(4, dtype=np.float32), RNG.standard_normal((4, 7, 9)).astype(np.float16)):
        out16, lse16 = rp.attention(q, k, v, bias=bias, causal=True, return_lse=True, block_size=3)
        b32 = bias if isinstance(bias, rp.ALiBi) else bias.astype(np.float32)
        out32, lse32 = rp.attention(
            q.astype(np.float32),
            k.astype(np.float32),
            v.astype(np.float32),
            bias=b32,
            causal=True,
            return_lse=True,
            block_size=3,
        )
        assert out16.dtype == np.float16
        assert lse16.dtype == np.float32
        np.testing.assert_array_equal(out16, out32.astype(np.float16))
        np.testing.assert_array_equal(lse16, lse32)


def test_alibi_key_only_same_probs_lse_shifted(xp):
    # spec/conventions.md section 8: scores 0, m = 1/2, Sq = Sk = 4, causal.
    n = 4
    q = np.zeros((1, 1, n, 2))
    k = np.zeros((1, 1, n, 2))
    v = np.random.default_rng(0).standard_normal((1, 1, n, 3))
    relative = rp.ALiBi(xp.asarray([0.5]))
    key_only = 0.5 * np.arange(n, dtype=np.float64)[None, None, None, :]  # +m * k_pos[j]
    out_rel, lse_rel = rp.attention(
        xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=relative, causal=True, return_lse=True
    )
    out_key, lse_key = rp.attention(
        xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=xp.asarray(key_only), causal=True, return_lse=True
    )
    np.testing.assert_allclose(to_np(out_rel), to_np(out_key), rtol=1e-14, atol=1e-15)
    with mpmath.workdps(40):
        exact = [float(mpmath.log(sum(mpmath.e ** (-mpmath.mpf(i - j) / 2) for j in range(i + 1)))) for i in range(n)]
    np.testing.assert_allclose(to_np(lse_rel)[0, 0], exact, rtol=1e-15, atol=1e-16)
    np.testing.assert_allclose(
        to_np(lse_rel)[0, 0], [0.0, 0.47407698418010668, 0.68026967064173458, 0.78733867169832951], rtol=1e-15
    )
    np.testing.assert_allclose(to_np(lse_key)[0, 0] - to_np(lse_rel)[0, 0], 0.5 * np.arange(n), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("causal", [False, True])
def test_block_size_matches_unblocked(xp, causal):
    q, k, v = qkv(1, 2, 1, 11, 13, 4, seed=31)
    fam = rp.FIRE(
        xp.asarray(RNG.standard_normal((3, 1))),
        xp.asarray(RNG.standard_normal(3)),
        xp.asarray(RNG.standard_normal((2, 3))),
        xp.asarray(RNG.standard_normal(2)),
        L=5.0,
    )
    whole = rp.attention(
        xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=fam, causal=causal, block_size=11, return_lse=True
    )
    for block_size in (1, 2, 3, 5, 10, 100, None):
        got = rp.attention(
            xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=fam, causal=causal, block_size=block_size, return_lse=True
        )
        for a, b in zip(got, whole):
            np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-13, atol=1e-14)


def _recording(base, log):
    class Recording(base):
        """A family that logs the positions it is asked for (the list lives outside: families are immutable)."""

        def bias(self, q_pos, k_pos, *, heads=None):
            log.append((to_np(q_pos).tolist(), to_np(k_pos).tolist()))
            return super().bias(q_pos, k_pos, heads=heads)

    return Recording


@pytest.mark.parametrize("causal", [False, True])
def test_block_size_bias_generated_per_block(xp, causal):
    sq, sk, block = 7, 9, 2
    log: list = []
    fam = _recording(rp.KerplePower, log)(xp.asarray([0.5, 1.0]), xp.asarray([1.0, 1.5]))
    q, k, v = qkv(1, 2, 2, sq, sk, 4, seed=41)
    out = rp.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=fam, causal=causal, block_size=block)
    assert len(log) == math.ceil(sq / block)
    # No call covers all Sq rows: the bias is requested one block of absolute query positions at a time.
    for q_rows, _ in log:
        assert len(q_rows) <= block
        assert len(q_rows) < sq
    assert [r for q_rows, _ in log for r in q_rows] == list(range(sk - sq, sk))
    if causal:
        # Keys no query of the block can see are not requested either.
        for q_rows, k_cols in log:
            assert k_cols == list(range(max(q_rows) + 1))
    log.clear()
    want, _ = reference(q, k, v, bias=materialise(fam, xp, sq, sk, "bottom_right"), causal=causal)
    np.testing.assert_allclose(to_np(out), want, rtol=1e-12, atol=1e-13)


def test_tensor_bias_equals_family_bias(xp):
    q, k, v = qkv(2, 4, 2, 5, 8, 4, seed=51)
    fam = rp.Sandwich(4, 16, xp=xp)
    q_pos, k_pos = rp.positions(5, 8, xp=xp)
    tensor = rp.TensorBias(fam.bias(q_pos, k_pos))
    for causal in (False, True):
        a = rp.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=fam, causal=causal, block_size=2)
        b = rp.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=tensor, causal=causal, block_size=2)
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-14, atol=1e-15)


def test_value_dim_differs_from_head_dim(xp):
    q, k, v = qkv(1, 2, 2, 3, 4, 6, 11, seed=61)
    out = rp.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v))
    assert tuple(out.shape) == (1, 2, 3, 11)
    want, _ = reference(q, k, v)
    np.testing.assert_allclose(to_np(out), want, rtol=1e-12, atol=1e-13)


def test_inputs_not_modified(xp):
    q, k, v = (xp.asarray(a) for a in qkv(1, 2, 1, 3, 5, 4, seed=71))
    bias = xp.asarray(RNG.standard_normal((2, 3, 5)))
    mask = xp.asarray(RNG.random((3, 5)) < 0.5)
    copies = [to_np(a).copy() for a in (q, k, v, bias, mask)]
    rp.attention(q, k, v, bias=bias, mask=mask, causal=True, return_lse=True, block_size=1)
    for a, c in zip((q, k, v, bias, mask), copies):
        np.testing.assert_array_equal(to_np(a), c)


# -- Issue 15: finite inputs whose logits or intermediates overflow -----------------------------------------------


def test_scale_after_product_float32_exact():
    # q * scale = 1e39 is no float32, the logits [10, 0] are: out = e^10 / (1 + e^10), lse = 10 + log(1 + e^-10).
    q = np.full((1, 1, 1, 1), 1e38, np.float32)
    k = np.array([1e-38, 0.0], np.float32).reshape(1, 1, 2, 1)
    v = np.array([1.0, 0.0], np.float32).reshape(1, 1, 2, 1)
    out, lse = rp.attention(q, k, v, scale=10.0, return_lse=True)
    z = float(np.float32(1e38)) * float(np.float32(1e-38)) * 10.0
    np.testing.assert_allclose(float(out[0, 0, 0, 0]), 1.0 / (1.0 + math.exp(-z)), rtol=2e-7)
    np.testing.assert_allclose(float(lse[0, 0, 0]), z + math.log1p(math.exp(-z)), rtol=2e-7)
    g = rp.attention_vjp(q, k, v, np.ones((1, 1, 1, 1), np.float32), scale=10.0)
    p0 = 1.0 / (1.0 + math.exp(-z))
    np.testing.assert_allclose(np.asarray(g.dv).ravel(), [p0, 1 - p0], rtol=2e-6)
    assert all(np.isfinite(np.asarray(t)).all() for t in g[:3])


def test_logits_beyond_float64_exact_forward_and_backward(xp):
    # q = k = 1e200: both logits are 1e400 (equal), so p = [1/2, 1/2]: out = 1.5, lse = +inf (its exact value is
    # beyond float64); dz = p (dp - delta) = [-1/4, 1/4], dq = dz . k = 0, dk = dz q = [-2.5e199, 2.5e199].
    q = xp.asarray(np.full((1, 1, 1, 1), 1e200))
    k = xp.asarray(np.full((1, 1, 2, 1), 1e200))
    v = xp.asarray(np.array([1.0, 2.0]).reshape(1, 1, 2, 1))
    out, lse = rp.attention(q, k, v, scale=1.0, return_lse=True)
    assert float(to_np(out)[0, 0, 0, 0]) == 1.5
    assert float(to_np(lse)[0, 0, 0]) == math.inf
    g = rp.attention_vjp(q, k, v, xp.asarray(np.ones((1, 1, 1, 1))), scale=1.0)
    np.testing.assert_array_equal(to_np(g.dv).ravel(), [0.5, 0.5])
    np.testing.assert_array_equal(to_np(g.dq).ravel(), [0.0])
    np.testing.assert_allclose(to_np(g.dk).ravel(), [-2.5e199, 2.5e199], rtol=1e-15)


def test_backward_keeps_log_sum_apart_from_a_large_maximum():
    # Logits 1e18 (q = k = 1e9): lse = 1e18 + log 2 rounds to 1e18, and exp(z - lse) would give p = [1, 1].
    q, k = np.full((1, 1, 1, 1), 1e9), np.full((1, 1, 2, 1), 1e9)
    v = np.array([1.0, 2.0]).reshape(1, 1, 2, 1)
    g = rp.attention_vjp(q, k, v, np.ones((1, 1, 1, 1)), scale=1.0)
    np.testing.assert_array_equal(g.dv.ravel(), [0.5, 0.5])
    np.testing.assert_allclose(g.dk.ravel(), [-2.5e8, 2.5e8], rtol=1e-15)


def test_values_near_the_top_of_the_range():
    # The running sum of p v reaches Sk max|v| = 2e308 before the division: out is 1e308, not inf.
    v = np.full((1, 1, 2, 1), 1e308)
    out = rp.attention(np.zeros((1, 1, 1, 1)), np.zeros((1, 1, 2, 1)), v)
    assert float(out[0, 0, 0, 0]) == 1e308


def test_array_bias_overflowing_the_logit_sum():
    # q . k = 1e308 plus a bias of 1e308 on key 0: z = [2e308, 0], all the weight on key 0.
    q = np.full((1, 1, 1, 1), 1e154)
    k = np.array([1e154, 0.0]).reshape(1, 1, 2, 1)
    v = np.array([1.0, 0.0]).reshape(1, 1, 2, 1)
    out = rp.attention(q, k, v, scale=1.0, bias=np.array([1e308, 0.0]).reshape(1, 1, 1, 2))
    assert float(out[0, 0, 0, 0]) == 1.0
    # Every logit of the row -2e308: equal, so the mean of v, not an empty row.
    out = rp.attention(
        q,
        -k[:, :, :1].repeat(2, axis=2),
        np.array([1.0, 3.0]).reshape(1, 1, 2, 1),
        scale=1.0,
        bias=np.full((1, 1, 1, 2), -1e308),
    )
    assert float(out[0, 0, 0, 0]) == 2.0


def test_family_bias_overflow_is_an_error_not_an_empty_row():
    # -1e308 |i - j| is -inf from |i - j| = 2 on: queries at -3 and -2 (bottom-right, Sq = 4 > Sk = 1) have that on
    # every key, and came out as empty rows (zeros) although the exact softmax of one key is 1.
    q, k = np.zeros((1, 1, 4, 2)), np.zeros((1, 1, 1, 2))
    with pytest.raises(ValueError, match=r"^bias: expected a family whose bias is finite on some key of every query"):
        rp.attention(q, k, k + 1, bias=rp.ALiBi([1e308]))
    np.testing.assert_array_equal(rp.attention(q, k, k + 1, bias=rp.ALiBi([1e307])), np.ones((1, 1, 4, 2)))
    # Causal: those queries see no key at all, which is a fully masked row, not an overflow.
    out = rp.attention(q, k, k + 1, bias=rp.ALiBi([1e308]), causal=True)
    np.testing.assert_array_equal(out[0, 0, :, 0], [0.0, 0.0, 0.0, 1.0])
    # Every query next to its own key: the far keys' -inf are exact roundings whose weight is 0 anyway.
    out = rp.attention(
        np.zeros((1, 1, 4, 2)),
        np.zeros((1, 1, 4, 2)),
        np.arange(4.0).reshape(1, 1, 4, 1).repeat(2, 3),
        bias=rp.ALiBi([1e308]),
    )
    np.testing.assert_array_equal(out[0, 0, :, 0], [0.0, 1.0, 2.0, 3.0])


def _alibi_dense(slopes, sq, sk, align):
    qp, kp = np_positions(sq, sk, align)
    return -np.asarray(slopes)[:, None, None] * np.abs(qp[:, None] - kp[None, :])[None]


@given(
    data=st.data(),
    dtype=st.sampled_from(["float32", "float64"]),
    causal=st.booleans(),
    with_bias=st.booleans(),
    nkv=st.sampled_from([1, 2]),
    sq=st.integers(1, 5),
    sk=st.integers(1, 6),
)
def test_fuzz_hidden_powers_of_two(data, dtype, causal, with_bias, nkv, sq, sk):
    """q = q0 2^A near the top of the range, scale 2^T (q * scale overflows), k = k0 2^B with A + B + T = L small,
    v = v0 2^C near the top (the running sum overflows): with integer q0, k0, v0 every scaled value is exact, the
    logits are exactly 2^L q0 . k0, and the output is the float64 reference's on (q0, k0, v0) times 2^C."""
    emax = 128 if dtype == "float32" else 1024
    nh, d = 2, 3
    shape = {"q": (1, nh, sq, d), "k": (1, nkv, sk, d), "v": (1, nkv, sk, d)}
    q0, k0, v0 = (
        np.array(
            data.draw(st.lists(st.integers(-3, 3), min_size=int(np.prod(s)), max_size=int(np.prod(s))), label=n),
            dtype=np.float64,
        ).reshape(s)
        for n, s in shape.items()
    )
    a = data.draw(st.integers(emax - 6, emax - 3), label="A")
    t = data.draw(st.integers(0, 6), label="T")
    lg = data.draw(st.integers(-2, 1), label="L")
    c = data.draw(st.integers(emax - 4, emax - 3), label="C")
    slopes = np.array([0.5, 0.25])
    bias = rp.ALiBi(slopes.astype(dtype)) if with_bias else None
    q, k, v = (x.astype(dtype) for x in (q0 * 2.0**a, k0 * 2.0 ** (lg - a - t), v0 * 2.0**c))
    out, lse = rp.attention(q, k, v, bias=bias, causal=causal, scale=2.0**t, return_lse=True)
    dense = _alibi_dense(slopes, sq, sk, "bottom_right")[None] if with_bias else None
    want, want_lse = reference(q0, k0, v0, bias=dense, causal=causal, scale=2.0**lg)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(np.asarray(out, np.float64), want * 2.0**c, rtol=tol, atol=tol * 2.0**c * 3)
    np.testing.assert_allclose(np.asarray(lse, np.float64), want_lse, rtol=tol, atol=tol)


@given(data=st.data(), a=st.integers(300, 700), sk=st.integers(1, 5), causal=st.booleans())
def test_fuzz_backward_of_huge_logits(data, a, sk, causal):
    """q = q0 2^a, k = k0 2^a with integer q0, k0: logits 4^a q0 . k0 are integer multiples of a huge power of two
    (beyond float64 when 2a > 1024), so p is uniform over each row's argmax. Then dv = p^T dO, dz = p (dp - p . dp),
    dq = dz k and dk = dz^T q, computed here from that p alone."""
    sq, d = 3, 2
    ints = st.integers(-2, 2)
    q0 = np.array(data.draw(st.lists(ints, min_size=sq * d, max_size=sq * d)), float).reshape(1, 1, sq, d)
    k0 = np.array(data.draw(st.lists(ints, min_size=sk * d, max_size=sk * d)), float).reshape(1, 1, sk, d)
    v = np.array(data.draw(st.lists(ints, min_size=sk, max_size=sk)), float).reshape(1, 1, sk, 1)
    d_out = np.array(data.draw(st.lists(ints, min_size=sq, max_size=sq)), float).reshape(1, 1, sq, 1)
    q, k = q0 * 2.0**a, k0 * 2.0**a
    g = rp.attention_vjp(q, k, v, d_out, causal=causal, scale=1.0)
    u = (q0[0, 0] @ k0[0, 0].T).astype(float)
    keep = np.ones((sq, sk), bool)
    if causal:
        qp, kp = np_positions(sq, sk, "bottom_right")
        keep = kp[None, :] <= qp[:, None]
    u = np.where(keep, u, -np.inf)
    top = u.max(axis=1, keepdims=True)
    hit = (u == top) & keep
    p = np.where(hit.any(axis=1, keepdims=True), hit / np.maximum(hit.sum(axis=1, keepdims=True), 1), 0.0)
    dp = d_out[0, 0] @ v[0, 0].T
    dz = p * (dp - (p * dp).sum(axis=1, keepdims=True))
    np.testing.assert_array_equal(g.dv[0, 0], p.T @ d_out[0, 0])
    np.testing.assert_allclose(g.dq[0, 0], dz @ k[0, 0], rtol=1e-14, atol=0)
    np.testing.assert_allclose(g.dk[0, 0], dz.T @ q[0, 0], rtol=1e-14, atol=0)


def test_gradient_overflow_is_an_error_not_inf():
    # Sixteen queries of 1e308 on two tied keys: dk = sum_i dz_i q_i = +-0.25 * 16 * 1e308 is beyond float64.
    q = np.full((1, 1, 16, 1), 1e308)
    k = np.zeros((1, 1, 2, 1))
    v = np.array([1.0, 2.0]).reshape(1, 1, 2, 1)
    with pytest.raises(ValueError, match=r"^q, k, v, d_out: expected inputs whose gradients dq, dk, dv fit float64"):
        rp.attention_vjp(q, k, v, np.ones((1, 1, 16, 1)), scale=1.0)
    g = rp.attention_vjp(q[:, :, :4], k, v, np.ones((1, 1, 4, 1)), scale=1.0)  # 4 * 0.25e308 fits
    np.testing.assert_allclose(g.dk.ravel(), [-1e308, 1e308], rtol=1e-15)


@pytest.mark.parametrize(
    ("call", "exc", "pattern"),
    [
        (
            lambda: rp.attention(*(np.ones((1, 1, 2, 2)),) * 3, mask=[[True, True], [True, True]]),
            TypeError,
            r"^mask: expected an array .*got list$",
        ),  # was blamed on bias
        (
            lambda: rp.attention(*(np.ones((1, 1, 2, 2)),) * 3, scale=10**400),
            ValueError,
            r"^scale: expected a finite number within the float64 range .*got about 1\.000e\+400$",
        ),
        (
            lambda: rp.attention_vjp(*(np.ones((1, 1, 2, 2)),) * 3, xs_ones((1, 1, 2, 2))),
            TypeError,
            r"^d_out: expected an array of numpy \(the library of the other arguments\), got an array of array_api_st",
        ),
        (
            lambda: rp.attention_vjp(*(np.ones((1, 1, 2, 2)),) * 4, d_lse=xs_ones((1, 1, 2))),
            TypeError,
            r"^d_lse: expected an array of numpy .*array_api_strict$",
        ),
        (
            lambda: rp.ALiBi([1.0]).bias_vjp(*rp.positions(2, 2), xs_ones((1, 2, 2))),
            TypeError,
            r"^d_bias: expected an array of numpy .*array_api_strict$",
        ),
        (
            lambda: rp.attention(*(np.ones((1, 1, 2, 2), np.longdouble),) * 3),
            TypeError,
            r"^q: expected float16, bfloat16, float32 or float64 \(long double is not supported",
        ),
    ],
)
def test_attention_errors_name_the_argument(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def xs_ones(shape):
    import array_api_strict as xs

    return xs.ones(shape, dtype=xs.float64)


def test_nan_error_is_a_count_and_the_first_index():
    # A (1, 4, 64, 64) array was printed whole (about 50 lines).
    a = np.zeros((1, 4, 64, 64))
    a[0, 1, 2, 3] = np.nan
    a[0, 3, 0, 0] = np.inf
    with pytest.raises(ValueError) as info:
        rp.attention(a, np.ones((1, 4, 64, 64)), np.ones((1, 4, 64, 64)))
    assert str(info.value) == (
        "q: expected finite values, got NaN or infinity in 2 of 16384 entries of an array of shape (1, 4, 64, 64), "
        "the first at index (0, 1, 2, 3): nan"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Kernel features (window, softcap, explicit positions, lengths, segments) against a dense reference written from
# their definitions. The check_* functions take the attention implementation, so test_mutants.py can run the same
# checks on deliberately broken ones.


def feature_layout(
    nb,
    sq,
    sk,
    *,
    align="bottom_right",
    causal=False,
    window=None,
    q_pos=None,
    k_pos=None,
    q_lens=None,
    k_lens=None,
    q_segment_ids=None,
    k_segment_ids=None,
    segment_positions="global",
):
    """Per batch row, from the definitions: positions (B, Sq) and (B, Sk), attendable (B, Sq, Sk), padding (B, Sq)."""
    ql = np.full(nb, sq) if q_lens is None else np.asarray(q_lens)
    kl = np.full(nb, sk) if k_lens is None else np.asarray(k_lens)

    def restart(ids, n):
        ids = np.broadcast_to(np.asarray(ids), (nb, n))
        out = np.zeros((nb, n), dtype=np.int64)
        for b in range(nb):
            for t in range(n):
                first = t
                while first > 0 and ids[b, first - 1] == ids[b, t]:
                    first -= 1
                out[b, t] = t - first
        return out

    if segment_positions == "restart":
        qp, kp = restart(q_segment_ids, sq), restart(k_segment_ids, sk)
    else:
        if q_pos is not None:
            qp = np.broadcast_to(np.asarray(q_pos, dtype=np.int64), (nb, sq))
        else:
            qp = np.array(
                [[i + (kl[b] - ql[b] if align == "bottom_right" else 0) for i in range(sq)] for b in range(nb)]
            )
        kp = np.broadcast_to(np.arange(sk), (nb, sk)) if k_pos is None else np.broadcast_to(np.asarray(k_pos), (nb, sk))
    left, right = (None, None) if window is None else window
    keep = np.zeros((nb, sq, sk), dtype=bool)
    for b in range(nb):
        for i in range(sq):
            for j in range(sk):
                d = int(qp[b, i]) - int(kp[b, j])
                ok = i < ql[b] and j < kl[b]
                ok = ok and not (causal and d < 0)
                ok = ok and (left is None or d <= left) and (right is None or d >= -right)
                if q_segment_ids is not None:
                    qs_ = np.broadcast_to(np.asarray(q_segment_ids), (nb, sq))
                    ks_ = np.broadcast_to(np.asarray(k_segment_ids), (nb, sk))
                    ok = ok and qs_[b, i] == ks_[b, j]
                keep[b, i, j] = ok
    padded = np.arange(sq)[None, :] >= ql[:, None]
    return np.asarray(qp), np.asarray(kp), keep, padded


def dense(
    q,
    k,
    v,
    *,
    bias=None,
    causal=False,
    align="bottom_right",
    scale=None,
    placement="post_scale",
    mask=None,
    fully_masked="zero",
    window=None,
    softcap=None,
    q_pos=None,
    k_pos=None,
    q_lens=None,
    k_lens=None,
    q_segment_ids=None,
    k_segment_ids=None,
    segment_positions="global",
):
    """Dense float64 attention with the features; ``bias`` a NumPy family (evaluated at each row's positions)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    nb, nh, sq, d = q.shape
    sk = k.shape[2]
    qp, kp, keep, padded = feature_layout(
        nb,
        sq,
        sk,
        align=align,
        causal=causal,
        window=window,
        q_pos=q_pos,
        k_pos=k_pos,
        q_lens=q_lens,
        k_lens=k_lens,
        q_segment_ids=q_segment_ids,
        k_segment_ids=k_segment_ids,
        segment_positions=segment_positions,
    )
    rep = nh // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    tau = 1.0 / math.sqrt(d) if scale is None else scale
    s = np.einsum("bhid,bhjd->bhij", q, k) * tau
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    b = 0.0
    if bias is not None:
        b = np.stack([np.asarray(bias.bias(qp[r], kp[r]), dtype=np.float64) for r in range(nb)])
    z = s + (b if placement == "post_scale" else tau * b)
    allowed = keep[:, None] if mask is None else keep[:, None] & np.asarray(mask, dtype=bool)
    z = np.where(allowed, z, -np.inf)
    empty = ~allowed.any(-1)
    m = np.where(empty, 0.0, np.max(np.where(allowed, z, -np.inf), axis=-1, initial=-np.inf))
    e = np.where(allowed, np.exp(z - m[..., None]), 0.0)
    total = np.where(empty, 1.0, e.sum(-1))
    out = (e / total[..., None]) @ v
    lse = m + np.log(total)
    fill = 0.0 if fully_masked == "zero" else np.nan
    out = np.where(empty[..., None], fill, out)
    lse = np.where(empty, -np.inf if fully_masked == "zero" else np.nan, lse)
    pad = padded[:, None, :]
    return np.where(pad[..., None], 0.0, out), np.where(pad, -np.inf, lse)


def _xs(xp, kw):
    """The feature keywords with their NumPy arrays moved to ``xp``."""
    return {n: (xp.asarray(a) if isinstance(a, np.ndarray) else a) for n, a in kw.items()}


def _run(attention, xp, q, k, v, bias=None, **kw):
    out, lse = attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=bias, return_lse=True, **_xs(xp, kw))
    return to_np(out), to_np(lse)


def _fire(xp, nh, seed=3):
    # FIRE depends on the absolute query position (its normaliser), so it tells positions apart that ALiBi would not.
    rng = np.random.default_rng(seed)
    w1, b1, w2, b2 = rng.standard_normal((4, 1)), rng.uniform(0.1, 1, 4), rng.standard_normal((nh, 4)), np.zeros(nh)
    return rp.FIRE(*(xp.asarray(a) for a in (w1, b1, w2, b2)), c=0.5, L=3.0)


def _segments(rng, nb, n, count=3):
    ids = np.sort(rng.integers(0, count, size=(nb, n)), axis=1)
    return ids + 10 * np.arange(nb)[:, None]  # distinct values per row do not matter, only equality within a row


FEATURE_SHAPES = [(2, 4, 2, 5, 9), (3, 2, 1, 9, 5), (2, 2, 2, 7, 7), (1, 4, 1, 1, 12)]


def feature_cases(nb, sq, sk, seed=0):
    """(name, keywords) of feature combinations for a (B, Sq, Sk) problem; arrays are NumPy."""
    rng = np.random.default_rng(seed)
    q_lens = rng.integers(0, sq + 1, nb)
    q_lens[0] = sq
    k_lens = rng.integers(1, sk + 1, nb)
    k_lens[-1] = sk
    q_off = rng.integers(-3, 20, nb)
    same = sq == sk
    q_seg = _segments(rng, nb, sq)
    k_seg = q_seg if same else _segments(rng, nb, sk)
    return [
        ("window", {"window": (2, 1)}),
        ("window_causal", {"window": (3, None), "causal": True}),
        ("window_right_only", {"window": (None, 0)}),
        ("window_top_left", {"window": (1, 2), "align": "top_left", "causal": True}),
        ("softcap_post", {"softcap": 0.4}),
        ("softcap_pre", {"softcap": 0.7, "placement": "pre_scale", "causal": True}),
        ("positions_shared", {"q_pos": np.arange(sq) + 40, "k_pos": np.arange(sk) + 37, "causal": True}),
        (
            "positions_rows",
            {
                "q_pos": np.arange(sq)[None, :] + q_off[:, None],
                "k_pos": np.arange(sk),
                "causal": True,
                "window": (4, 0),
            },
        ),
        ("q_pos_only", {"q_pos": np.arange(sq) * 2 + 1, "causal": True}),
        ("lengths", {"q_lens": q_lens, "k_lens": k_lens, "causal": True}),
        ("lengths_nan", {"q_lens": q_lens, "k_lens": k_lens, "causal": True, "fully_masked": "nan"}),
        ("lengths_top_left", {"q_lens": q_lens, "k_lens": k_lens, "align": "top_left", "causal": True}),
        ("k_lens_only", {"k_lens": k_lens}),
        ("segments_global", {"q_segment_ids": q_seg, "k_segment_ids": k_seg, "causal": True}),
        ("segments_restart", {"q_segment_ids": q_seg, "k_segment_ids": k_seg, "segment_positions": "restart"}),
        (
            "everything",
            {
                "q_segment_ids": q_seg,
                "k_segment_ids": k_seg,
                "q_lens": q_lens,
                "k_lens": k_lens,
                "window": (3, 1),
                "softcap": 0.9,
                "causal": True,
                "mask": rng.random((nb, 1, sq, sk)) < 0.8,
            },
        ),
    ]


@pytest.mark.parametrize("shape", FEATURE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("blocks", [(None, None), (2, 3)], ids=["default_blocks", "small_blocks"])
@pytest.mark.parametrize("bias", ["ALiBi", "FIRE"])
def test_features_against_dense(xp, shape, blocks, bias):
    nb, nh, nkv, sq, sk = shape
    q, k, v = qkv(nb, nh, nkv, sq, sk, 4, 3, seed=sum(shape))
    # q scaled up so the softcap bends the scores (|s| up to about 6 against caps of 0.4 to 0.9)
    q = 3.0 * q
    fam = rp.ALiBi.from_num_heads(nh, xp=xp) if bias == "ALiBi" else _fire(xp, nh)
    fam_np = rp.ALiBi.from_num_heads(nh) if bias == "ALiBi" else _fire(np, nh)
    for name, kw in feature_cases(nb, sq, sk, seed=sum(shape)):
        got = _run(rp.attention, xp, q, k, v, fam, block_size=blocks[0], kv_block_size=blocks[1], **kw)
        want = dense(q, k, v, bias=fam_np, **kw)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-13, err_msg=name)


def check_window_against_dense(attention, xp):
    q, k, v = qkv(2, 2, 1, 6, 9, 4, seed=61)
    fam = rp.ALiBi(xp.asarray([0.5, 0.125]))
    for window in [(0, 0), (1, 0), (0, 2), (2, 3), (None, 1), (4, None)]:
        for causal in (False, True):
            got = _run(attention, xp, q, k, v, fam, window=window, causal=causal, block_size=2, kv_block_size=2)
            want = dense(q, k, v, bias=rp.ALiBi(np.array([0.5, 0.125])), window=window, causal=causal)
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-13, err_msg=str((window, causal)))


def test_window_against_dense(xp):
    check_window_against_dense(rp.attention, xp)


def check_window_unbounded(attention, xp):
    # A window as wide as every offset (or unbounded on both sides) is no window.
    for sq, sk in [(5, 9), (9, 5), (6, 6)]:
        q, k, v = qkv(2, 2, 2, sq, sk, 4, seed=sq + sk)
        fam = rp.ALiBi.from_num_heads(2, xp=xp)
        for causal in (False, True):
            plain = _run(attention, xp, q, k, v, fam, causal=causal, block_size=2, kv_block_size=3)
            wide = max(sq, sk)
            for window in [(wide, wide), (None, None), (None, wide), (wide, None)]:
                got = _run(attention, xp, q, k, v, fam, causal=causal, window=window, block_size=2, kv_block_size=3)
                for g, w in zip(got, plain):
                    np.testing.assert_allclose(g, w, rtol=1e-14, atol=1e-15, err_msg=str(window))


def test_window_unbounded_is_no_window(xp):
    check_window_unbounded(rp.attention, xp)


def check_window_zero_causal_diagonal(attention, xp):
    # window (0, 0) keeps the key at the query's own position only: the output is that key's value, the lse its logit.
    sq, sk = 4, 7
    q, k, v = qkv(1, 2, 1, sq, sk, 3, seed=71)
    got_out, got_lse = _run(attention, xp, q, k, v, window=(0, 0), causal=True, block_size=3, kv_block_size=2)
    for i in range(sq):
        j = i + sk - sq  # bottom_right
        np.testing.assert_allclose(got_out[0, :, i, :], np.repeat(v[0, :, j, :], 2, axis=0), rtol=1e-15, atol=0)
        np.testing.assert_allclose(got_lse[0, :, i], q[0, :, i, :] @ k[0, 0, j, :] / math.sqrt(3), rtol=1e-14)


def test_window_zero_causal_attends_only_the_diagonal(xp):
    check_window_zero_causal_diagonal(rp.attention, xp)


def check_softcap_against_dense(attention, xp):
    q, k, v = qkv(2, 2, 1, 5, 8, 4, seed=81)
    q = 4.0 * q
    fam_xp, fam_np = rp.ALiBi(xp.asarray([1.0, 0.25])), rp.ALiBi(np.array([1.0, 0.25]))
    for placement in ("post_scale", "pre_scale"):
        for cap in (0.3, 2.0):
            kw = {"softcap": cap, "placement": placement, "causal": True, "scale": 0.7}
            got = _run(attention, xp, q, k, v, fam_xp, block_size=2, kv_block_size=3, **kw)
            want = dense(q, k, v, bias=fam_np, **kw)
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-13, err_msg=str(kw))


def test_softcap_against_dense(xp):
    check_softcap_against_dense(rp.attention, xp)


def check_softcap_large_is_none(attention, xp):
    # c tanh(s / c) = s (1 - (s/c)^2 / 3 + ...): with |s| < 100 and c = 1e12 the correction is 1e-20 relative.
    q, k, v = qkv(2, 2, 1, 5, 8, 4, seed=91)
    fam = rp.ALiBi(xp.asarray([1.0, 0.25]))
    for placement in ("post_scale", "pre_scale"):
        plain = _run(attention, xp, 5 * q, k, v, fam, causal=True, placement=placement)
        got = _run(attention, xp, 5 * q, k, v, fam, causal=True, placement=placement, softcap=1e12)
        for g, w in zip(got, plain):
            np.testing.assert_allclose(g, w, rtol=1e-14, atol=1e-14)


def test_softcap_large_is_no_softcap(xp):
    check_softcap_large_is_none(rp.attention, xp)


def check_positions_equal_align(attention, xp):
    # q_pos, k_pos = the positions of align give the result of align, for Sq < Sk, Sq > Sk and Sq = Sk.
    for sq, sk in [(4, 9), (9, 4), (6, 6)]:
        q, k, v = qkv(2, 2, 1, sq, sk, 4, seed=sq * sk)
        fam = _fire(xp, 2)
        for align, start in (("top_left", 0), ("bottom_right", sk - sq)):
            want = _run(attention, xp, q, k, v, fam, causal=True, align=align)
            got = _run(
                attention, xp, q, k, v, fam, causal=True, q_pos=np.arange(start, start + sq), k_pos=np.arange(sk)
            )
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-14, atol=1e-15, err_msg=f"{align} {sq}x{sk}")


def test_explicit_positions_equal_align(xp):
    check_positions_equal_align(rp.attention, xp)


def test_per_row_positions_equal_running_each_row(xp):
    # A KV cache whose rows hold different offsets: each batch row equals a call with that row's positions alone.
    q, k, v = qkv(3, 2, 1, 3, 8, 4, seed=101)
    offsets = np.array([5, 0, 17])
    q_pos = np.arange(3)[None, :] + offsets[:, None]
    fam = _fire(xp, 2)
    got = _run(rp.attention, xp, q, k, v, fam, causal=True, window=(3, None), q_pos=q_pos, block_size=2)
    for b in range(3):
        one = _run(
            rp.attention,
            xp,
            q[b : b + 1],
            k[b : b + 1],
            v[b : b + 1],
            fam,
            causal=True,
            window=(3, None),
            q_pos=q_pos[b],
        )
        for g, w in zip(got, one):
            np.testing.assert_allclose(g[b : b + 1], w, rtol=1e-14, atol=1e-15)


def check_lengths_rowwise(attention, xp, fully_masked="zero"):
    # Each batch row at its own lengths equals that row alone, cut to those lengths; its padding queries give 0 and
    # lse -inf whatever fully_masked says.
    nb, sq, sk = 4, 6, 8
    q, k, v = qkv(nb, 2, 1, sq, sk, 4, seed=111)
    q_lens, k_lens = np.array([6, 3, 1, 4]), np.array([8, 5, 2, 1])
    fam = _fire(xp, 2)
    for align in ("bottom_right", "top_left"):
        got = _run(
            attention,
            xp,
            q,
            k,
            v,
            fam,
            causal=True,
            align=align,
            q_lens=q_lens,
            k_lens=k_lens,
            fully_masked=fully_masked,
            block_size=2,
            kv_block_size=3,
        )
        for b in range(nb):
            ql, kl = int(q_lens[b]), int(k_lens[b])
            one = _run(
                attention,
                xp,
                q[b : b + 1, :, :ql],
                k[b : b + 1, :, :kl],
                v[b : b + 1, :, :kl],
                fam,
                causal=True,
                align=align,
                fully_masked=fully_masked,
            )
            for g, w in zip(got, one):
                np.testing.assert_allclose(g[b : b + 1, :, :ql], w, rtol=1e-13, atol=1e-14, err_msg=f"{align} {b}")
            np.testing.assert_array_equal(got[0][b, :, ql:], 0.0)
            np.testing.assert_array_equal(got[1][b, :, ql:], -np.inf)


@pytest.mark.parametrize("fully_masked", ["zero", "nan"])
def test_lengths_equal_running_each_row_alone(xp, fully_masked):
    check_lengths_rowwise(rp.attention, xp, fully_masked)


def check_segments_separately(attention, xp, segment_positions):
    # A pack of sequences equals each sequence run alone: at its positions in the pack ("global") or from 0
    # ("restart"). FIRE depends on the absolute position, so the two conventions give different numbers.
    ids = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 7]])
    nb, n = ids.shape
    q, k, v = qkv(nb, 2, 1, n, n, 4, seed=121)
    fam = _fire(xp, 2)
    for causal, window in ((True, None), (False, (2, 1))):
        got = _run(
            attention,
            xp,
            q,
            k,
            v,
            fam,
            causal=causal,
            window=window,
            q_segment_ids=ids,
            k_segment_ids=ids,
            segment_positions=segment_positions,
            block_size=2,
            kv_block_size=4,
        )
        for b in range(nb):
            for sid in np.unique(ids[b]):
                idx = np.flatnonzero(ids[b] == sid)
                lo, hi = int(idx[0]), int(idx[-1]) + 1
                pos = {} if segment_positions == "restart" else {"q_pos": np.arange(lo, hi), "k_pos": np.arange(lo, hi)}
                one = _run(
                    attention,
                    xp,
                    q[b : b + 1, :, lo:hi],
                    k[b : b + 1, :, lo:hi],
                    v[b : b + 1, :, lo:hi],
                    fam,
                    causal=causal,
                    window=window,
                    **pos,
                )
                for g, w in zip(got, one):
                    np.testing.assert_allclose(g[b : b + 1, :, lo:hi], w, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("segment_positions", ["global", "restart"])
def test_segments_equal_running_each_segment_alone(xp, segment_positions):
    check_segments_separately(rp.attention, xp, segment_positions)


def test_segment_positions_change_a_position_dependent_bias(xp):
    # The control of the test above: with FIRE the two conventions differ, so each comparison there can fail.
    ids = np.array([[0, 0, 0, 1, 1, 1, 1]])
    q, k, v = qkv(1, 2, 1, 7, 7, 4, seed=131)
    kw = {"q_segment_ids": ids, "k_segment_ids": ids, "causal": True}
    glob = _run(rp.attention, xp, q, k, v, _fire(xp, 2), **kw)
    rest = _run(rp.attention, xp, q, k, v, _fire(xp, 2), segment_positions="restart", **kw)
    np.testing.assert_array_equal(glob[0][..., :3, :], rest[0][..., :3, :])  # first segment: same positions
    assert np.abs(glob[0][..., 3:, :] - rest[0][..., 3:, :]).max() > 1e-3


def check_streamed_equals_one_block(attention, xp):
    nb, sq, sk = 2, 9, 11
    q, k, v = qkv(nb, 4, 2, sq, sk, 4, seed=141)
    fam = _fire(xp, 4)
    for name, kw in feature_cases(nb, sq, sk, seed=7):
        whole = _run(attention, xp, q, k, v, fam, block_size=sq, kv_block_size=sk, **kw)
        for blocks in ((1, 1), (2, 3), (4, 2)):
            got = _run(attention, xp, q, k, v, fam, block_size=blocks[0], kv_block_size=blocks[1], **kw)
            for g, w in zip(got, whole):
                np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-14, err_msg=f"{name} {blocks}")


def test_streamed_features_equal_one_block(xp):
    check_streamed_equals_one_block(rp.attention, xp)


@pytest.mark.parametrize(
    ("kw", "sizes"),
    [
        ({"window": (2, 0)}, (32, 32)),
        ({"window": (3, 1), "causal": True}, (24, 40)),
        ({"window": (0, 5)}, (40, 24)),
        ({"k_lens": np.array([9, 20]), "q_lens": np.array([4, 13]), "align": "top_left"}, (24, 24)),
        ({"q_pos": np.arange(16) + 100, "k_pos": np.arange(24) * 5, "causal": True, "window": (30, None)}, (16, 24)),
    ],
)
def test_features_skip_the_tiles_they_empty(xp, kw, sizes):
    # The family is asked for the bias of exactly the tiles holding a pair that the definition lets attend (the
    # positions are shared by the batch rows here, so one call per tile).
    sq, sk = sizes
    bq, bk = 4, 4
    log: list = []
    fam = _recording(rp.ALiBi, log)(xp.asarray([0.5, 0.25]))
    q, k, v = qkv(2, 2, 1, sq, sk, 4, seed=151)
    out = _run(rp.attention, xp, q, k, v, fam, block_size=bq, kv_block_size=bk, **kw)
    _, _, keep, _ = feature_layout(2, sq, sk, **kw)
    want = {(qs, ks) for qs in range(0, sq, bq) for ks in range(0, sk, bk) if keep[:, qs : qs + bq, ks : ks + bk].any()}
    q_all = feature_layout(2, sq, sk, **kw)[0][0]
    k_all = feature_layout(2, sq, sk, **kw)[1][0]
    seen = {(int(np.flatnonzero(q_all == r[0])[0]), int(np.flatnonzero(k_all == c[0])[0])) for r, c in log}
    assert seen == want
    assert len(log) == len(want) < (sq // bq) * (sk // bk)
    np.testing.assert_allclose(out[0], dense(q, k, v, bias=rp.ALiBi(np.array([0.5, 0.25])), **kw)[0], atol=1e-13)


def test_features_forward_is_streamed():
    import tracemalloc

    # S = 2048, B = 2: one (B, H, Sq, Sk) float64 array is 64 MiB; the tiles are 256 x 256.
    rng = np.random.default_rng(161)
    q, k, v = (rng.standard_normal((2, 1, 2048, 8)) for _ in range(3))
    tracemalloc.start()
    try:
        rp.attention(
            q,
            k,
            v,
            bias=rp.ALiBi([0.5]),
            causal=True,
            window=(700, None),
            q_lens=np.array([2048, 1500]),
            k_lens=np.array([2048, 1600]),
            softcap=5.0,
            block_size=256,
            kv_block_size=256,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full = 2 * 2048 * 2048 * 8
    assert peak < full / 8, f"peak {peak / 2**20:.1f} MiB against {full / 2**20:.0f} MiB for one full logits array"


def _ones(*shape):
    return np.ones(shape)


_Q = (_ones(2, 2, 3, 4), _ones(2, 1, 5, 4), _ones(2, 1, 5, 4))


@pytest.mark.parametrize(
    ("kw", "exc", "pattern"),
    [
        ({"window": 3}, TypeError, r"^window: expected a pair \(left, right\), each an int >= 0 or None, got 3$"),
        ({"window": (1, 2, 3)}, TypeError, r"^window: expected a pair"),
        ({"window": (-1, 0)}, ValueError, r"^window\[0\]: expected an integer >= 0, got -1$"),
        ({"window": (0, 1.5)}, TypeError, r"^window\[1\]: expected an integer, got 1\.5"),
        ({"window": (True, 0)}, TypeError, r"^window\[0\]: expected an integer, got True"),
        ({"softcap": 0.0}, ValueError, r"^softcap: expected a number > 0, got 0\.0$"),
        ({"softcap": math.inf}, ValueError, r"^softcap: expected a finite number, got inf$"),
        ({"softcap": "1"}, TypeError, r"^softcap: expected a real number, got '1'"),
        ({"q_pos": np.arange(3.0)}, TypeError, r"^q_pos: expected an integer dtype, got float64$"),
        ({"q_pos": np.arange(4)}, ValueError, r"^q_pos: expected shape \(3,\) or \(2, 3\) \(one row .*got \(4,\)$"),
        ({"k_pos": np.zeros((3, 5), int)}, ValueError, r"^k_pos: expected shape \(5,\) or \(2, 5\) .*got \(3, 5\)$"),
        ({"q_pos": [0, 1, 2]}, TypeError, r"^q_pos: expected an array .*got list$"),
        (
            {"q_pos": np.array([2**62, 0, 0]), "k_pos": np.array([-(2**62), 0, 0, 0, 0])},
            ValueError,
            r"^q_pos, k_pos: expected positions whose offsets",
        ),
        ({"q_lens": np.array([1, 4])}, ValueError, r"^q_lens: expected lengths in \[0, 3\], got values from 1 to 4$"),
        ({"k_lens": np.array([-1, 4])}, ValueError, r"^k_lens: expected lengths in \[0, 5\], got values from -1 to 4$"),
        ({"k_lens": np.array([1, 2, 3])}, ValueError, r"^k_lens: expected shape \(2,\) \(one length per batch row\)"),
        ({"q_lens": np.array([1.0, 2.0])}, TypeError, r"^q_lens: expected an integer dtype, got float64$"),
        (
            {"q_segment_ids": np.zeros((2, 3), int)},
            ValueError,
            r"^q_segment_ids, k_segment_ids: expected both or neither, got only q_segment_ids$",
        ),
        (
            {"q_segment_ids": np.zeros((2, 3), int), "k_segment_ids": np.zeros((2, 4), int)},
            ValueError,
            r"^k_segment_ids: expected shape \(5,\) or \(2, 5\)",
        ),
        ({"segment_positions": "restart"}, ValueError, r"^segment_positions: expected 'global' without"),
        ({"segment_positions": "local"}, ValueError, r"^segment_positions: expected one of 'global', 'restart'"),
        (
            {
                "q_segment_ids": np.zeros((2, 3), int),
                "k_segment_ids": np.array([0, 1, 0, 0, 0]),
                "segment_positions": "restart",
            },
            ValueError,
            r"^k_segment_ids: expected each segment to be one contiguous run .*got id 0 reappearing",
        ),
        (
            {
                "q_segment_ids": np.zeros((2, 3), int),
                "k_segment_ids": np.zeros((2, 5), int),
                "segment_positions": "restart",
                "q_pos": np.arange(3),
            },
            ValueError,
            r"^q_pos, k_pos: expected None with segment_positions='restart'",
        ),
        ({"window": (1, 1), "backend": "fused"}, ValueError, r"^backend: expected 'reference' with window"),
    ],
)
def test_feature_errors_name_the_argument(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        rp.attention(*_Q, **kw)
    if "backend" not in kw:
        with pytest.raises(exc, match=pattern):
            rp.attention_vjp(*_Q, np.ones((2, 2, 3, 4)), **kw)


def test_feature_arrays_from_another_library_are_named():
    with pytest.raises(TypeError, match=r"^q, k, v, bias, mask, q_lens: expected arrays from one array library"):
        rp.attention(*_Q, q_lens=xs_ones((2,)))
