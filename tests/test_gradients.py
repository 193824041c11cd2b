"""attention_vjp and bias_vjp: layouts, shapes, broadcast biases, d_lse, dtypes, memory and the code paths."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.families.base import offset_sums, scatter_columns
from relpos_ref.testing import to_numpy


def _inputs(nb=2, nh=4, nkv=2, sq=6, sk=9, d=5, dv=3, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((nb, nh, sq, d)),
        rng.standard_normal((nb, nkv, sk, d)),
        rng.standard_normal((nb, nkv, sk, dv)),
        rng.standard_normal((nb, nh, sq, dv)),
    )


def test_t5_table_gradient_in_constructor_layout(xp):
    q, k, v, d_out = (xp.asarray(a) for a in _inputs())
    table = np.random.default_rng(1).standard_normal((4, 8))
    hb = rp.T5Bias(xp.asarray(table), bidirectional=True, max_distance=20, layout="heads_buckets")
    bh = rp.T5Bias(xp.asarray(table.T.copy()), bidirectional=True, max_distance=20, layout="buckets_heads")
    g_hb = to_numpy(rp.attention_vjp(q, k, v, d_out, bias=hb, causal=True).dbias["table"])
    g_bh = to_numpy(rp.attention_vjp(q, k, v, d_out, bias=bh, causal=True).dbias["table"])
    assert g_hb.shape == (4, 8)
    assert g_bh.shape == (8, 4)
    np.testing.assert_array_equal(g_bh, g_hb.T)
    # astype keeps the layout the table was given in
    assert to_numpy(bh.astype(xp.float32).bias_vjp(*rp.positions(6, 9, xp=xp), xp.ones((4, 6, 9)))["table"]).shape == (
        8,
        4,
    )


@pytest.mark.parametrize("shape", [(6, 9), (4, 6, 9), (1, 4, 1, 9), (2, 1, 6, 1), (9,), (2, 4, 6, 9)])
def test_array_bias_gradient_has_the_bias_shape(shape):
    q, k, v, d_out = _inputs()
    rng = np.random.default_rng(2)
    bias = rng.standard_normal(shape)
    g = rp.attention_vjp(q, k, v, d_out, bias=bias, causal=True, block_size=4, kv_block_size=4)
    assert g.dbias.shape == shape
    full = rp.attention_vjp(q, k, v, d_out, bias=np.broadcast_to(bias, (2, 4, 6, 9)).copy(), causal=True).dbias
    axes = tuple(range(4 - len(shape)))
    want = full.sum(axis=axes)
    want = want.sum(axis=tuple(ax for ax, n in enumerate(shape) if n == 1 and want.shape[ax] != 1), keepdims=True)
    np.testing.assert_allclose(g.dbias, want, rtol=0, atol=1e-13)
    # the grads of q, k, v do not depend on how the bias was broadcast
    np.testing.assert_allclose(g.dq, rp.attention_vjp(q, k, v, d_out, bias=np.broadcast_to(bias, (2, 4, 6, 9)).copy(),
                                                      causal=True).dq, rtol=0, atol=1e-13)  # fmt: skip


def test_tensor_bias_gradient_and_no_bias():
    q, k, v, d_out = _inputs()
    arr = np.random.default_rng(3).standard_normal((4, 6, 9))
    arr[0, 2, 5] = -np.inf
    g = rp.attention_vjp(q, k, v, d_out, bias=rp.TensorBias(arr))
    assert set(g.dbias) == {"array"}
    assert g.dbias["array"].shape == (4, 6, 9)
    assert g.dbias["array"][0, 2, 5] == 0.0
    np.testing.assert_allclose(g.dbias["array"], rp.attention_vjp(q, k, v, d_out, bias=arr[None]).dbias[0], atol=1e-14)
    assert rp.attention_vjp(q, k, v, d_out).dbias is None
    assert rp.attention_vjp(q, k, v, d_out, bias=rp.Sandwich(4, 8)).dbias == {}


def test_d_lse_ignored_on_empty_rows_and_used_elsewhere():
    q, k, v, d_out = _inputs(sq=12, sk=5)  # bottom-right: the first 7 queries see no key
    fam = rp.KerpleLog(np.full(4, 0.5), np.full(4, 2.0))
    d_lse = np.random.default_rng(4).standard_normal((2, 4, 12))
    base = rp.attention_vjp(q, k, v, d_out, bias=fam, causal=True, d_lse=d_lse)
    changed = d_lse.copy()
    changed[:, :, :7] = 1e6
    again = rp.attention_vjp(q, k, v, d_out, bias=fam, causal=True, d_lse=changed)
    for a, b in zip(base[:3], again[:3]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(base.dbias["r1"], again.dbias["r1"])
    no_lse = rp.attention_vjp(q, k, v, d_out, bias=fam, causal=True)
    assert np.abs(no_lse.dk - base.dk).max() > 1e-3


def test_inputs_not_modified():
    q, k, v, d_out = _inputs()
    d_lse = np.ones((2, 4, 6))
    copies = [a.copy() for a in (q, k, v, d_out, d_lse)]
    fam = rp.FIRE(np.ones((3, 1)), np.full(3, 0.1), np.ones((4, 3)), np.zeros(4), L=4.0)
    before = {n: a.copy() for n, a in fam.parameters().items()}
    rp.attention_vjp(q, k, v, d_out, bias=fam, causal=True, d_lse=d_lse)
    for a, b in zip((q, k, v, d_out, d_lse), copies):
        np.testing.assert_array_equal(a, b)
    for n, a in fam.parameters().items():
        np.testing.assert_array_equal(a, before[n])


def test_float16_inputs_computed_in_float32():
    q, k, v, d_out = (a.astype(np.float16) for a in _inputs())
    fam = rp.ALiBi.from_num_heads(4, dtype=np.float32)
    g16 = rp.attention_vjp(q, k, v, d_out, bias=fam, causal=True)
    g32 = rp.attention_vjp(*(a.astype(np.float32) for a in (q, k, v, d_out)), bias=fam, causal=True)
    for a, b in zip(g16[:3], g32[:3]):
        assert a.dtype == np.float16
        np.testing.assert_array_equal(a, b.astype(np.float16))
    assert g16.dbias["slopes"].dtype == np.float32
    np.testing.assert_array_equal(g16.dbias["slopes"], g32.dbias["slopes"])


def test_offset_sums_skew_equals_entrywise():
    rng = np.random.default_rng(5)
    g = rng.standard_normal((3, 7, 11))
    q_pos, k_pos = np.arange(20, 27), np.arange(15, 26)
    sums, deltas, consecutive = offset_sums(np, g, q_pos, k_pos)
    assert consecutive
    delta = q_pos[:, None] - k_pos[None, :]
    want = np.stack([g[:, delta == dd].sum(axis=1) for dd in deltas], axis=1)
    np.testing.assert_allclose(sums, want, atol=1e-14)
    assert deltas.tolist() == list(range(delta.min(), delta.max() + 1))
    _, _, consecutive = offset_sums(np, g, q_pos[::-1].copy(), k_pos)
    assert not consecutive


@pytest.mark.parametrize("big", [False, True])
def test_scatter_columns_paths(big):
    rng = np.random.default_rng(6)
    n, ncols = (5000, 1000) if big else (50, 7)  # n * ncols above 2**22 takes the per-column path
    idx = rng.integers(0, ncols, size=n)
    g = rng.standard_normal((2, n))
    want = np.zeros((2, ncols))
    np.add.at(want, (slice(None), idx), g)
    np.testing.assert_allclose(scatter_columns(np, g, idx, ncols), want, atol=1e-12)


@pytest.mark.parametrize("kmax", [0, 1, 3, 40])
@pytest.mark.parametrize(("q0", "k0"), [(0, 0), (50, 0), (0, 50), (10, 12)])
def test_offset_table_gradient_paths_agree(kmax, q0, k0):
    rng = np.random.default_rng(7)
    fam = rp.OffsetBias(rng.standard_normal((2, 2 * kmax + 1)))
    g = rng.standard_normal((2, 6, 8))
    q_pos, k_pos = np.arange(q0, q0 + 6), np.arange(k0, k0 + 8)
    fast = fam.bias_vjp(q_pos, k_pos, g)["table"]
    delta = q_pos[:, None] - k_pos[None, :]
    idx = np.clip(delta, -kmax, kmax) + kmax
    want = np.stack([g[:, idx == c].sum(axis=1) for c in range(2 * kmax + 1)], axis=1)
    np.testing.assert_allclose(fast, want, atol=1e-13)
    # shuffled key positions take the entry-by-entry path
    perm = rng.permutation(8)
    slow = fam.bias_vjp(q_pos, k_pos[perm], g[:, :, perm])["table"]
    np.testing.assert_allclose(slow, want, atol=1e-13)


def test_fire_threshold_tie_is_half():
    # One query at i = L = 4 (a tie) and keys 0..4: dL equals the average of the gradients with L just above and
    # just below 4 (the one-sided slopes).
    rng = np.random.default_rng(8)
    params = {"w1": rng.standard_normal((3, 1)), "b1": rng.uniform(0.2, 1, 3), "w2": rng.standard_normal((2, 3)),
              "b2": rng.standard_normal(2)}  # fmt: skip
    g = rng.standard_normal((2, 1, 5))
    q_pos, k_pos = np.array([4]), np.arange(5)

    def d_l(big_l):
        return float(rp.FIRE(**params, c=0.3, L=big_l).bias_vjp(q_pos, k_pos, g)["L"])

    above, below = d_l(4.0 + 1e-9), d_l(4.0 - 1e-9)
    assert below == 0.0
    assert above != 0.0
    assert math.isclose(d_l(4.0), 0.5 * (above + below), rel_tol=1e-6)


def test_backward_is_streamed():
    # S = 4096, H = 1: one (B, H, Sq, Sk) float64 array is 128 MiB; 256 x 512 tiles are 1 MiB each.
    rng = np.random.default_rng(9)
    q, k, v, d_out = (rng.standard_normal((1, 1, 4096, 16)) for _ in range(4))
    fam = rp.T5Bias(rng.standard_normal((1, 32)), bidirectional=False, layout="heads_buckets")
    tracemalloc.start()
    try:
        rp.attention_vjp(q, k, v, d_out, bias=fam, causal=True, block_size=256, kv_block_size=512)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full = 4096 * 4096 * 8
    assert peak < full / 8, f"peak {peak / 2**20:.1f} MiB against {full / 2**20:.0f} MiB for one full logits array"


@pytest.mark.parametrize("family", ["tensor", "alibi", None])
def test_nan_mode_matches_the_oracle(family):
    # Sq = 4 > Sk = 2, causal, bottom-right: queries 0 and 1 see nothing. The NaN pattern and the finite values agree
    # with central differences of the oracle (which writes NaN where autograd through a naive softmax puts it).
    from relpos_ref import oracle

    q, k, v, d_out = _inputs(nb=1, nh=2, nkv=1, sq=4, sk=2, d=2, dv=2, seed=10)
    rng = np.random.default_rng(11)
    params, bias = None, None
    if family == "tensor":
        params = {"array": rng.standard_normal((2, 4, 2))}
        bias = rp.TensorBias(params["array"])
    elif family == "alibi":
        params = {"slopes": np.array([0.5, 0.25])}
        bias = rp.ALiBi(params["slopes"])
    got = rp.attention_vjp(q, k, v, d_out, bias=bias, causal=True, fully_masked="nan")
    want = oracle.attention_vjp(q, k, v, d_out, family=family, params=params, causal=True, fully_masked="nan", dps=30)
    pairs = [(got.dq, want["dq"]), (got.dk, want["dk"]), (got.dv, want["dv"])]
    if family is not None:
        pairs += [(got.dbias[n], want["params"][n]) for n in params]
    for a, w in pairs:
        w = np.array([float(x) for x in np.asarray(w, dtype=object).reshape(-1)]).reshape(np.shape(a))
        np.testing.assert_array_equal(np.isnan(a), np.isnan(w))
        np.testing.assert_allclose(a[~np.isnan(a)], w[~np.isnan(w)], rtol=1e-12, atol=1e-14)


# Kernel features: the VJP against central differences of the dense float64 reference of tests/test_attention.py
# (written from the definitions), for q, k, v and the ALiBi slopes, with an lse cotangent too.

FEATURE_VJP_CASES = {
    "window": {"window": (1, 2)},
    "window_causal": {"window": (2, None), "causal": True},
    "softcap_post": {"softcap": 0.6, "causal": True},
    "softcap_pre": {"softcap": 0.8, "placement": "pre_scale"},
    "lengths": {"q_lens": np.array([4, 2]), "k_lens": np.array([3, 5]), "causal": True},
    "lengths_top_left": {"q_lens": np.array([1, 3]), "k_lens": np.array([5, 2]), "align": "top_left"},
    "segments": {"q_segment_ids": np.array([[0, 0, 1, 1], [3, 3, 3, 4]]),
                 "k_segment_ids": np.array([[0, 0, 0, 1, 1], [3, 3, 4, 4, 4]]), "causal": True},
    "segments_restart": {"q_segment_ids": np.array([0, 0, 1, 1]), "k_segment_ids": np.array([0, 0, 0, 1, 1]),
                         "segment_positions": "restart"},
    "positions_rows": {"q_pos": np.array([[7, 8, 9, 10], [2, 3, 4, 5]]), "k_pos": np.arange(5) * 2, "causal": True,
                       "window": (6, None)},
    "everything": {"window": (3, 0), "softcap": 0.5, "q_lens": np.array([3, 4]), "k_lens": np.array([5, 4]),
                   "q_segment_ids": np.array([0, 0, 1, 1]), "k_segment_ids": np.array([0, 0, 1, 1, 1])},
}  # fmt: skip


def _central(f, x, h=1e-6):
    """Central differences of the scalar f at x, entry by entry."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        g[idx] = (f(up) - f(down)) / (2 * h)
    return g


def check_feature_vjp_central_differences(attention_vjp, kw, *, block_size=2, kv_block_size=2):
    from tests.test_attention import dense

    q, k, v, d_out = _inputs(nb=2, nh=2, nkv=1, sq=4, sk=5, d=3, dv=2, seed=21)
    q = 2.0 * q  # scores of order 1-3, where a softcap of 0.5-0.8 bends them
    slopes = np.array([0.5, -0.3])
    d_lse = np.random.default_rng(22).standard_normal((2, 2, 4))

    def loss(q_, k_, v_, m_):
        out, lse = dense(q_, k_, v_, bias=rp.ALiBi(m_, allow_any_sign=True), **kw)
        # Padding and empty rows have lse -inf and ignore d_lse.
        return float(np.sum(d_out * out) + np.sum(np.where(np.isfinite(lse), d_lse * lse, 0.0)))

    got = attention_vjp(q, k, v, d_out, bias=rp.ALiBi(slopes, allow_any_sign=True), d_lse=d_lse,
                        block_size=block_size, kv_block_size=kv_block_size, **kw)  # fmt: skip
    want = (
        _central(lambda x: loss(x, k, v, slopes), q),
        _central(lambda x: loss(q, x, v, slopes), k),
        _central(lambda x: loss(q, k, x, slopes), v),
        _central(lambda x: loss(q, k, v, x), slopes),
    )
    for name, g, w in zip(("dq", "dk", "dv", "dslopes"), (*got[:3], got.dbias["slopes"]), want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7, err_msg=name)
    return got


@pytest.mark.parametrize("case", list(FEATURE_VJP_CASES))
def test_feature_vjp_against_central_differences(case):
    kw = FEATURE_VJP_CASES[case]
    got = check_feature_vjp_central_differences(rp.attention_vjp, kw)
    # One tile for everything gives the gradients of the 2 x 2 tiles.
    whole = check_feature_vjp_central_differences(rp.attention_vjp, kw, block_size=4, kv_block_size=5)
    for a, b in zip((*got[:3], got.dbias["slopes"]), (*whole[:3], whole.dbias["slopes"])):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


def test_padding_rows_have_zero_gradients_in_both_modes():
    q, k, v, d_out = _inputs(nb=2, nh=2, nkv=1, sq=5, sk=6, d=3, dv=2, seed=23)
    q_lens, k_lens = np.array([5, 2]), np.array([6, 3])  # bottom_right: row 1's queries at positions 1, 2
    fam = rp.ALiBi(np.array([0.5, 0.25]))
    zero = rp.attention_vjp(q, k, v, d_out, bias=fam, causal=True, q_lens=q_lens, k_lens=k_lens)
    nan = rp.attention_vjp(q, k, v, d_out, bias=fam, causal=True, q_lens=q_lens, k_lens=k_lens, fully_masked="nan")
    np.testing.assert_array_equal(zero.dq[1, :, 2:], 0.0)
    # Keys past k_lens are never attended: no gradient reaches them.
    np.testing.assert_array_equal(zero.dk[1, :, 3:], 0.0)
    np.testing.assert_array_equal(zero.dv[1, :, 3:], 0.0)
    assert np.abs(zero.dk[1, :, :3]).min() > 0
    # No row of these inputs is empty without being padding, so "nan" has nothing to spread.
    for a, b in zip((*zero[:3], zero.dbias["slopes"]), (*nan[:3], nan.dbias["slopes"])):
        np.testing.assert_array_equal(a, b)
    # Changing the padding rows' inputs and cotangents changes nothing.
    q2, d2 = q.copy(), d_out.copy()
    q2[1, :, 2:] = 7.0
    d2[1, :, 2:] = -3.0
    again = rp.attention_vjp(q2, k, v, d2, bias=fam, causal=True, q_lens=q_lens, k_lens=k_lens)
    for a, b in zip((*zero[1:3], zero.dbias["slopes"]), (*again[1:3], again.dbias["slopes"])):
        np.testing.assert_array_equal(a, b)


def test_nan_mode_spreads_only_from_empty_rows_not_padding():
    # Row 1: q_lens 3 (rows 3, 4 padding), k_lens 0: rows 0-2 are real queries with nothing to attend.
    q, k, v, d_out = _inputs(nb=2, nh=2, nkv=1, sq=5, sk=6, d=3, dv=2, seed=24)
    g = rp.attention_vjp(q, k, v, d_out, q_lens=np.array([5, 3]), k_lens=np.array([6, 0]), fully_masked="nan")
    assert np.isnan(g.dq[1, :, :3]).all()
    np.testing.assert_array_equal(g.dq[1, :, 3:], 0.0)
    assert np.isfinite(g.dq[0]).all()
