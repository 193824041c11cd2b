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
