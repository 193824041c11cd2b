"""Hypothesis tests: every property of ``tests/support/properties.py`` on the real relpos_ref, on every backend fixture.

Each property is a *body* ``body_x(xp, impl, data)`` that draws its inputs from ``data`` and runs the checks on the
implementation ``impl``. :func:`run` turns a body into a Hypothesis test. ``tests/test_mutants.py`` runs the same
bodies with the broken implementations of ``tests/support/mutants.py`` and requires an ``AssertionError``.

Inputs are small (at most 12 positions, 6 heads, head dim 6) so that every example runs in milliseconds; random
arrays come from a NumPy generator seeded by a drawn integer (Hypothesis explores seeds and shapes, NumPy fills the
arrays), then move to the backend under test with ``xp.asarray``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import array_api_compat.numpy as np_xp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relpos_ref as rp
from relpos_ref.testing import to_numpy
from tests.support import properties as props
from tests.support.properties import REAL, FamilySpec, Impl

Body = Callable[[Any, Impl, Any], None]


def run(body: Body, xp: Any, impl: Impl = REAL, *, config: settings | None = None) -> None:
    """Run ``body`` as a Hypothesis test (the loaded profile's settings unless ``config`` is given)."""

    @given(data=st.data())
    def hypothesis_test(data: Any) -> None:
        body(xp, impl, data)

    test = hypothesis_test if config is None else config(hypothesis_test)
    test()


# -- strategies -------------------------------------------------------------------------------------------------


def draw_rng(data: Any) -> np.random.Generator:
    return np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))


def draw_family(
    data: Any, kinds: tuple[str, ...], *, num_heads: int | None = None, sq: int = 4, sk: int = 4
) -> FamilySpec:
    """A family with valid random parameters; TensorBias gets shape (H, sq, sk), with some -inf entries."""
    kind = data.draw(st.sampled_from(kinds), label="family")
    h = num_heads if num_heads is not None else data.draw(st.integers(1, 4), label="num_heads")
    rng = draw_rng(data)
    if kind == "t5":
        bidirectional = data.draw(st.booleans(), label="bidirectional")
        nb = data.draw(st.sampled_from([4, 6, 8, 32] if bidirectional else [2, 3, 4, 8, 32]), label="num_buckets")
        exact = (nb // 2 if bidirectional else nb) // 2
        md = data.draw(st.integers(exact + 1, exact + 10), label="max_distance")
        return FamilySpec(
            kind,
            h,
            {"table": rng.normal(size=(h, nb))},
            {"bidirectional": bidirectional, "max_distance": md, "layout": "heads_buckets"},
        )
    if kind == "offset":
        kmax = data.draw(st.integers(0, 5), label="K")
        return FamilySpec(kind, h, {"table": rng.normal(size=(h, 2 * kmax + 1))}, {})
    if kind == "alibi":
        official = data.draw(st.booleans(), label="official_slopes")
        slopes = props.fairseq_get_slopes(h) if official else None
        arr = np.array([s for s, _ in slopes]) if official else rng.uniform(0.01, 1.0, size=h)
        return FamilySpec(kind, h, {"slopes": arr}, {})
    if kind == "kerple_power":
        r2 = np.where(rng.random(h) < 0.2, 2.0, rng.uniform(0.01, 2.0, size=h))
        return FamilySpec(kind, h, {"r1": rng.uniform(0.01, 2.0, size=h), "r2": r2}, {})
    if kind == "kerple_log":
        return FamilySpec(kind, h, {"r1": rng.uniform(0.01, 2.0, size=h), "r2": rng.uniform(0.01, 4.0, size=h)}, {})
    if kind == "fire":
        w = data.draw(st.integers(1, 4), label="width")
        arrays = {
            "w1": rng.normal(size=(w, 1)),
            "b1": rng.normal(size=w),
            "w2": rng.normal(size=(h, w)),
            "b2": rng.normal(size=h),
            "c": np.array(rng.uniform(0.05, 1.0)),
            "L": np.array(data.draw(st.sampled_from([1.0, 2.5, 4.0, 8.0, 16.0]), label="L")),
        }
        return FamilySpec(kind, h, arrays, {"eps": data.draw(st.sampled_from([0.0, 1e-6]), label="eps")})
    if kind == "sandwich":
        return FamilySpec(kind, h, {}, {"head_dim": data.draw(st.sampled_from([2, 4, 8, 16, 128]), label="head_dim")})
    assert kind == "tensor"
    arr = rng.normal(size=(h, sq, sk))
    p_inf = data.draw(st.sampled_from([0.0, 0.25]), label="p_minus_inf")
    arr[rng.random(arr.shape) < p_inf] = -np.inf
    return FamilySpec(kind, h, {"array": arr}, {})


def draw_scale(data: Any) -> float:
    return data.draw(st.one_of(st.sampled_from([0.125, 0.5, 2.0]), st.floats(0.05, 4.0)), label="scale")


def draw_attention_inputs(
    data: Any,
    impl: Impl,
    *,
    max_len: int = 9,
    max_kv: int = 2,
    max_group: int = 3,
    bias: str = "optional",
    dtype: Any = np.float64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, FamilySpec | None, np.random.Generator]:
    """q (B, H, Sq, D), k, v (B, H_kv, Sk, .) with H = H_kv * group, and a family for H heads (or None)."""
    nb = data.draw(st.integers(1, 2), label="batch")
    nkv = data.draw(st.integers(1, max_kv), label="kv_heads")
    group = data.draw(st.integers(1, max_group), label="group")
    sq = data.draw(st.integers(1, max_len), label="Sq")
    sk = data.draw(st.integers(1, max_len), label="Sk")
    d = data.draw(st.integers(1, 8), label="D")
    dv = data.draw(st.integers(1, 3), label="Dv")
    h = nkv * group
    spec = None
    if bias == "family" or (bias == "optional" and data.draw(st.integers(0, 7), label="use_bias") > 0):
        spec = draw_family(data, impl.kinds, num_heads=h, sq=sq, sk=sk)
    rng = draw_rng(data)
    q = rng.uniform(-2, 2, size=(nb, h, sq, d)).astype(dtype)
    k = rng.uniform(-2, 2, size=(nb, nkv, sk, d)).astype(dtype)
    v = rng.uniform(-2, 2, size=(nb, nkv, sk, dv)).astype(dtype)
    return q, k, v, spec, rng


def _positions(data: Any, lo: int, hi: int, label: str) -> np.ndarray:
    return np.asarray(data.draw(st.lists(st.integers(lo, hi), min_size=1, max_size=5), label=label), dtype=np.int64)


# -- bodies -----------------------------------------------------------------------------------------------------


def body_offset_only(xp: Any, impl: Impl, data: Any) -> None:
    """Property 1. FIRE: every query position and its shifted image stay <= L."""
    kinds = tuple(k for k in impl.kinds if k != "tensor")
    spec = draw_family(data, kinds)
    if spec.kind == "fire":
        lim = math.floor(float(spec.arrays["L"]))
        q_pos = _positions(data, 0, lim, "q_pos")
        shift = data.draw(st.integers(-int(q_pos.min()), lim - int(q_pos.max())), label="shift")
    else:
        q_pos = _positions(data, 0, 40, "q_pos")
        shift = data.draw(st.integers(-30, 30), label="shift")
    k_pos = _positions(data, 0, 40, "k_pos")
    props.check_offset_only(spec.build(xp, impl), xp, q_pos, k_pos, shift)


def body_fire_beyond_L(xp: Any, impl: Impl, data: Any) -> None:
    """Property 1b: an MLP strictly increasing in x (positive w1, w2, b1 >= 0) shows FIRE's dependence on i > L."""
    h = data.draw(st.integers(1, 3), label="num_heads")
    w = data.draw(st.integers(1, 3), label="width")
    rng = draw_rng(data)
    big_l = data.draw(st.sampled_from([1.0, 2.5, 4.0, 8.0, 16.0]), label="L")
    arrays = {
        "w1": rng.uniform(0.1, 2.0, size=(w, 1)),
        "b1": rng.uniform(0.0, 1.0, size=w),
        "w2": rng.uniform(0.1, 2.0, size=(h, w)),
        "b2": rng.normal(size=h),
        "c": np.array(data.draw(st.floats(0.05, 1.0), label="c")),
        "L": np.array(big_l),
    }
    spec = FamilySpec("fire", h, arrays, {"eps": 0.0})
    k_len = data.draw(st.integers(2, 6), label="k_len")
    shift = data.draw(st.integers(1, 20), label="shift")
    props.check_fire_breaks_offset_only_beyond_L(spec.build(xp, impl), xp, big_l, k_len, shift)


PENALTY_KINDS = ("alibi", "kerple_power", "kerple_log")


def body_penalty_monotone(xp: Any, impl: Impl, data: Any) -> None:
    """Property 2: ALiBi, KERPLE power and log are 0 at Delta = 0 and non-increasing in |Delta|."""
    kinds = tuple(k for k in impl.kinds if k in PENALTY_KINDS)
    spec = draw_family(data, kinds)
    props.check_penalty_monotone(spec.build(xp, impl), xp, data.draw(st.integers(1, 40), label="n"))


def body_sandwich_zero(xp: Any, impl: Impl, data: Any) -> None:
    """Property 2: Sandwich is exactly 0 at Delta = 0 for any head_dim."""
    h = data.draw(st.integers(1, 8), label="num_heads")
    d = 2 * data.draw(st.integers(1, 128), label="half_dim")
    spec = FamilySpec("sandwich", h, {}, {"head_dim": d})
    props.check_zero_at_zero(spec.build(xp, impl), xp, data.draw(st.integers(0, 30), label="n"))


def body_sandwich_not_monotone(xp: Any, impl: Impl, data: Any) -> None:
    """Property 2: with d = 128 every Sandwich head rises somewhere in |Delta| <= n (n >= 14)."""
    h = data.draw(st.integers(1, 8), label="num_heads")
    spec = FamilySpec("sandwich", h, {}, {"head_dim": 128})
    props.check_sandwich_not_monotone(spec.build(xp, impl), xp, data.draw(st.integers(14, 64), label="n"))


def body_t5_buckets(xp: Any, impl: Impl, data: Any) -> None:
    """Property 2: T5 buckets."""
    bidirectional = data.draw(st.booleans(), label="bidirectional")
    if bidirectional:
        nb = 2 * data.draw(st.integers(2, 24), label="half_buckets")
    else:
        nb = data.draw(st.integers(2, 48), label="num_buckets")
    exact = (nb // 2 if bidirectional else nb) // 2
    md = data.draw(st.integers(exact + 1, exact + 100), label="max_distance")
    n = data.draw(st.integers(md + 1, md + 30), label="n")
    props.check_t5_buckets(impl.t5_bucket, xp, bidirectional=bidirectional, num_buckets=nb, max_distance=md, n=n)


def body_causal(xp: Any, impl: Impl, data: Any) -> None:
    """Property 3."""
    q, k, v, spec, rng = draw_attention_inputs(data, impl)
    align = data.draw(st.sampled_from(["bottom_right", "top_left"]), label="align")
    block = data.draw(st.sampled_from([None, 1, 2, 3]), label="block_size")
    k_new = rng.uniform(-2, 2, size=k.shape)
    v_new = rng.uniform(-2, 2, size=v.shape)
    bias = None if spec is None else spec.build(xp, impl)
    props.check_causal_no_future_leak(impl, xp, q, k, v, k_new, v_new, bias=bias, align=align, block_size=block)


def _softmax_inputs(data: Any, *, magnitudes: list[float]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    shape = (data.draw(st.integers(1, 3), label="rows_a"), data.draw(st.integers(1, 4), label="rows_b"))
    sk = data.draw(st.integers(1, 8), label="Sk")
    rng = draw_rng(data)
    mag = data.draw(st.sampled_from(magnitudes), label="magnitude")
    scores = rng.uniform(-mag, mag, size=(*shape, sk))
    bias = rng.normal(size=(*shape, sk)) * data.draw(st.sampled_from([0.0, 1.0, 10.0]), label="bias_size")
    p_mask = data.draw(st.sampled_from([None, 0.3, 0.7]), label="p_masked")
    mask = None if p_mask is None else rng.random((*shape, sk)) >= p_mask
    return scores, bias, mask


def body_softmax_shift(xp: Any, impl: Impl, data: Any) -> None:
    """Property 4 (biased_softmax)."""
    scores, bias, mask = _softmax_inputs(data, magnitudes=[1.0, 10.0])
    rng = draw_rng(data)
    size = data.draw(st.sampled_from([1.0, 100.0, 1e4]), label="shift_size")
    shift = rng.uniform(-size, size, size=scores.shape[:-1])
    placement = data.draw(st.sampled_from(["post_scale", "pre_scale"]), label="placement")
    props.check_softmax_shift_invariance(
        impl, xp, scores, bias, mask, shift, scale=draw_scale(data), placement=placement
    )


def body_attention_shift(xp: Any, impl: Impl, data: Any) -> None:
    """Property 4 (attention, bias given as an array)."""
    q, k, v, spec, rng = draw_attention_inputs(data, impl, bias="family")
    align = data.draw(st.sampled_from(["bottom_right", "top_left"]), label="align")
    qp, kp = rp.positions(q.shape[2], k.shape[2], align=align)
    bias = to_numpy(spec.build(np_xp, impl).bias(qp, kp))[None]
    bias = np.broadcast_to(bias, (q.shape[0], *bias.shape[1:])).copy()
    size = data.draw(st.sampled_from([1.0, 100.0, 1e4]), label="shift_size")
    shift = rng.uniform(-size, size, size=bias.shape[:-1])
    props.check_attention_shift_invariance(
        impl,
        xp,
        q,
        k,
        v,
        bias,
        shift,
        causal=data.draw(st.booleans(), label="causal"),
        align=align,
        placement=data.draw(st.sampled_from(["post_scale", "pre_scale"]), label="placement"),
        scale=draw_scale(data),
    )


def body_probabilities(xp: Any, impl: Impl, data: Any) -> None:
    """Property 5: includes logits up to 1e5 (exp overflows without the max shift) and fully masked rows."""
    scores, bias, mask = _softmax_inputs(data, magnitudes=[1.0, 1e3, 1e5])
    if not data.draw(st.booleans(), label="with_bias"):
        bias = None
    dtype = data.draw(st.sampled_from([np.float64, np.float32]), label="dtype")
    props.check_probabilities(
        impl,
        xp,
        scores.astype(dtype),
        None if bias is None else bias.astype(dtype),
        mask,
        scale=draw_scale(data),
        placement=data.draw(st.sampled_from(["post_scale", "pre_scale"]), label="placement"),
    )


def body_kv_cache(xp: Any, impl: Impl, data: Any) -> None:
    """Property 6: the last query (a decoding step against a KV cache) and a drawn suffix (chunked prefill)."""
    q, k, v, spec, _ = draw_attention_inputs(data, impl)
    suffix = data.draw(st.integers(1, q.shape[2]), label="suffix")
    placement = data.draw(st.sampled_from(["post_scale", "pre_scale"]), label="placement")
    scale = draw_scale(data)
    for s in sorted({1, suffix}):
        props.check_kv_cache_suffix(impl, xp, q, k, v, spec, s, placement=placement, scale=scale)


def body_head_independence(xp: Any, impl: Impl, data: Any) -> None:
    """Property 7a."""
    q, k, v, spec, rng = draw_attention_inputs(data, impl)
    head = data.draw(st.integers(0, q.shape[1] - 1), label="head")
    q_new = rng.uniform(-2, 2, size=q.shape)
    kv_new = (rng.uniform(-2, 2, size=k.shape), rng.uniform(-2, 2, size=v.shape))
    bias = None if spec is None else spec.build(xp, impl)
    props.check_head_independence(
        impl,
        xp,
        q,
        k,
        v,
        q_new,
        kv_new,
        bias=bias,
        head=head,
        causal=data.draw(st.booleans(), label="causal"),
        align=data.draw(st.sampled_from(["bottom_right", "top_left"]), label="align"),
    )


def body_head_permutation(xp: Any, impl: Impl, data: Any) -> None:
    """Property 7b."""
    q, k, v, spec, _ = draw_attention_inputs(data, impl, max_kv=3)
    nkv, grp = k.shape[1], q.shape[1] // k.shape[1]
    kv_perm = data.draw(st.permutations(range(nkv)), label="kv_perm")
    in_group = data.draw(st.permutations(range(grp)), label="in_group_perm")
    props.check_head_permutation(
        impl,
        xp,
        q,
        k,
        v,
        spec,
        list(kv_perm),
        list(in_group),
        causal=data.draw(st.booleans(), label="causal"),
        align=data.draw(st.sampled_from(["bottom_right", "top_left"]), label="align"),
    )


def body_heads_subset(xp: Any, impl: Impl, data: Any) -> None:
    """bias(heads=[...]) == rows of the full bias, every family."""
    q_pos = _positions(data, -5, 40, "q_pos")
    k_pos = _positions(data, 0, 40, "k_pos")
    h = data.draw(st.integers(1, 6), label="num_heads")
    spec = draw_family(data, impl.kinds, sq=len(q_pos), sk=len(k_pos), num_heads=h)
    heads = data.draw(st.lists(st.integers(0, spec.num_heads - 1), min_size=1, max_size=6), label="heads")
    props.check_heads_subset(spec.build(xp, impl), xp, q_pos, k_pos, heads)


def body_placement(xp: Any, impl: Impl, data: Any) -> None:
    """Property 8."""
    q, k, v, spec, _ = draw_attention_inputs(data, impl, bias="family")
    props.check_placement(
        impl,
        xp,
        q,
        k,
        v,
        spec,
        scale=draw_scale(data),
        causal=data.draw(st.booleans(), label="causal"),
        align=data.draw(st.sampled_from(["bottom_right", "top_left"]), label="align"),
    )


# Property 9 bounds for a backend that does not share NumPy's arithmetic (CuPy: CUDA libm and cuBLAS). Bias:
# BACKEND_BIAS_ULPS * eps * (1 + max|b|) * terms, terms = the number of rounded terms summed per entry (d/2 for
# Sandwich, W + 1 for FIRE, 1 otherwise): CUDA's exp/log1p/sin/pow are within 2 ulp of the exact value, NumPy's
# within 1, and each sum term carries at most one such error. Attention: 2 x rounding_bound (each backend is within
# the bound's own-side error budget of the exact value; CUDA's exp and log are within 2 ulp where NumPy's are within
# 1, which the bound's factor-4 margin absorbs).
BACKEND_BIAS_ULPS = 16


def _bias_terms(spec: FamilySpec) -> int:
    if spec.kind == "sandwich":
        return spec.options["head_dim"] // 2
    if spec.kind == "fire":
        return spec.arrays["w1"].shape[0] + 1
    return 1


def body_backend_agreement(xp: Any, impl: Impl, data: Any) -> None:
    """Property 9: the fixture's backend against NumPy, float64 and float32.

    array_api_strict delegates every operation to NumPy, so the agreement is bitwise in both dtypes. Any other
    backend is held to the documented bounds above.
    """
    dtype = data.draw(st.sampled_from(["float64", "float32"]), label="dtype")
    q, k, v, spec, _ = draw_attention_inputs(data, impl, bias="family", dtype=np.dtype(dtype).type)
    align = data.draw(st.sampled_from(["bottom_right", "top_left"]), label="align")
    causal = data.draw(st.booleans(), label="causal")
    placement = data.draw(st.sampled_from(["post_scale", "pre_scale"]), label="placement")

    def make(ns: Any) -> tuple[Any, ...]:
        fam = spec.build(ns, impl, dtype=dtype)
        qp, kp = rp.positions(q.shape[2], k.shape[2], align=align, xp=ns)
        b = fam.bias(qp, kp)
        out, lse = impl.attention(
            ns.asarray(q), ns.asarray(k), ns.asarray(v), bias=fam, causal=causal, align=align,
            placement=placement, return_lse=True,
        )  # fmt: skip
        return b, out, lse

    exact = getattr(xp, "__name__", "") == "array_api_strict"
    tols: tuple[float, ...] = ()
    if not exact:
        b_np = to_numpy(make(np_xp)[0]).astype(np.float64)
        eps = props.eps_of(dtype)
        tb = BACKEND_BIAS_ULPS * eps * (1.0 + props._finite_abs_max(b_np)) * _bias_terms(spec)
        scale = 1.0 / math.sqrt(q.shape[-1])
        r = props._finite_abs_max(props._logits_np(q, k, b_np[None], scale, placement))
        ta = 2 * props.rounding_bound(eps, d=q.shape[-1], sk=k.shape[2], logit_max=r, v_max=props._finite_abs_max(v))
        tols = (tb, ta, ta)
    props.check_backend_agreement(make, xp, np_xp, exact=exact, tols=tols)


def body_block_size(xp: Any, impl: Impl, data: Any) -> None:
    """attention does not depend on the tile sizes: query blocks and key blocks of 1, 7, 64, drawn ones, and all."""
    q, k, v, spec, _ = draw_attention_inputs(data, impl, max_len=12)
    extra = data.draw(st.integers(1, q.shape[2]), label="block_size")
    extra_kv = data.draw(st.integers(1, k.shape[2]), label="kv_block_size")
    props.check_block_size_invariance(
        impl,
        xp,
        q,
        k,
        v,
        spec,
        causal=data.draw(st.booleans(), label="causal"),
        align=data.draw(st.sampled_from(["bottom_right", "top_left"]), label="align"),
        placement=data.draw(st.sampled_from(["post_scale", "pre_scale"]), label="placement"),
        scale=draw_scale(data),
        block_sizes=(
            1,
            7,
            64,
            extra,
            (None, 1),
            (None, 7),
            (None, 64),
            (None, extra_kv),
            (1, 1),
            (extra, extra_kv),
            (None, None),
        ),
    )


BODIES: dict[str, Body] = {
    "offset_only": body_offset_only,
    "fire_beyond_L": body_fire_beyond_L,
    "penalty_monotone": body_penalty_monotone,
    "sandwich_zero": body_sandwich_zero,
    "sandwich_not_monotone": body_sandwich_not_monotone,
    "t5_buckets": body_t5_buckets,
    "causal": body_causal,
    "softmax_shift": body_softmax_shift,
    "attention_shift": body_attention_shift,
    "probabilities": body_probabilities,
    "kv_cache": body_kv_cache,
    "head_independence": body_head_independence,
    "head_permutation": body_head_permutation,
    "heads_subset": body_heads_subset,
    "placement": body_placement,
    "backend_agreement": body_backend_agreement,
    "block_size": body_block_size,
}


# -- tests ------------------------------------------------------------------------------------------------------


def test_offset_only(xp):
    run(body_offset_only, xp)


def test_fire_breaks_offset_only_beyond_L(xp):
    run(body_fire_beyond_L, xp)


def test_penalty_monotone(xp):
    run(body_penalty_monotone, xp)


def test_sandwich_zero_at_zero(xp):
    run(body_sandwich_zero, xp)


def test_sandwich_not_monotone_d128(xp):
    run(body_sandwich_not_monotone, xp)


def test_t5_buckets(xp):
    run(body_t5_buckets, xp)


def test_causal_no_future_leak(xp):
    run(body_causal, xp)


def test_softmax_shift_invariance(xp):
    run(body_softmax_shift, xp)


def test_attention_shift_invariance(xp):
    run(body_attention_shift, xp)


def test_probabilities(xp):
    run(body_probabilities, xp)


def test_kv_cache_suffix(xp):
    run(body_kv_cache, xp)


def test_head_independence(xp):
    run(body_head_independence, xp)


def test_head_permutation(xp):
    run(body_head_permutation, xp)


def test_heads_subset(xp):
    run(body_heads_subset, xp)


def test_placement(xp):
    run(body_placement, xp)


def test_backend_agreement(xp):
    if getattr(xp, "__name__", "") == np_xp.__name__:
        pytest.skip("NumPy is the reference backend of property 9; it is compared with the other backends")
    run(body_backend_agreement, xp)


def test_block_size_invariance(xp):
    run(body_block_size, xp)


def run_alibi_slopes(xp: Any, impl: Impl = REAL) -> None:
    """Property 10 for H = 1..256, exhaustively (no sampling needed)."""
    for h in range(1, 257):
        props.check_alibi_slopes(impl.alibi_slopes, xp, h)


def test_alibi_slopes_official(xp):
    run_alibi_slopes(xp)
