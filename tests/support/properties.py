"""Property checks of relpos_ref, written as plain functions of the implementation under test.

Every check takes the code it exercises as an argument (a bias family object, or an :class:`Impl` bundle of
``attention``, ``biased_softmax``, ``t5_bucket``, ``alibi_slopes`` and the family classes) and raises
``AssertionError`` when the property does not hold. ``tests/test_properties.py`` drives them with Hypothesis on the
real implementation; ``tests/test_mutants.py`` drives the very same tests with the broken implementations of
``tests/support/mutants.py`` and requires them to fail. ``spec/properties.md`` lists the properties, tests and mutants.

The properties that verify and the conformance harness check too are written once, in ``relpos_ref.properties``
(exported by :mod:`relpos_ref.testing`); their checks here are thin calls that add what only the tests need: host
inputs, the rounding bounds and the :class:`Impl` plumbing of the mutants.

Inputs arrive as host NumPy arrays; the checks move them to the namespace under test with ``xp.asarray``. The shared
checks compare there, in the inputs' dtype (row sums of probabilities in float64); the others bring results back with
:func:`relpos_ref.testing.to_numpy` and compare in float64 NumPy on the host.

Tolerances. Where a property is an identity of the arithmetic actually performed (same operations on the same
operands), it is checked bitwise. Where the two sides round differently (a constant added to every logit, a
different grouping of a sum), the bound is :func:`rounding_bound`, derived in its docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import mpmath
import numpy as np

import relpos_ref as rp
from relpos_ref import testing as shared
from relpos_ref.testing import to_numpy

__all__ = [
    "ALL_KINDS",
    "REAL",
    "FamilySpec",
    "Impl",
    "check_alibi_slopes",
    "check_attention_shift_invariance",
    "check_backend_agreement",
    "check_block_size_invariance",
    "check_causal_no_future_leak",
    "check_fire_breaks_offset_only_beyond_L",
    "check_head_independence",
    "check_head_permutation",
    "check_heads_subset",
    "check_kv_cache_suffix",
    "check_offset_only",
    "check_penalty_monotone",
    "check_placement",
    "check_probabilities",
    "check_sandwich_not_monotone",
    "check_softmax_shift_invariance",
    "check_t5_buckets",
    "check_zero_at_zero",
    "fairseq_get_slopes",
    "rounding_bound",
]

ALL_KINDS = ("t5", "offset", "alibi", "kerple_power", "kerple_log", "fire", "sandwich", "tensor")

REAL_CLASSES: dict[str, type] = {
    "t5": rp.T5Bias,
    "offset": rp.OffsetBias,
    "alibi": rp.ALiBi,
    "kerple_power": rp.KerplePower,
    "kerple_log": rp.KerpleLog,
    "fire": rp.FIRE,
    "sandwich": rp.Sandwich,
    "tensor": rp.TensorBias,
}

# Constructor arguments whose axis 0 is the head axis, per family (Sandwich derives its per-head divisors from
# num_heads and has no head parameter at all).
HEAD_ARRAYS: dict[str, tuple[str, ...]] = {
    "t5": ("table",),
    "offset": ("table",),
    "alibi": ("slopes",),
    "kerple_power": ("r1", "r2"),
    "kerple_log": ("r1", "r2"),
    "fire": ("w2", "b2"),
    "sandwich": (),
    "tensor": ("array",),
}


@dataclass(frozen=True)
class Impl:
    """The implementation under test: the real relpos_ref by default, a mutant when fields are replaced.

    ``kinds`` are the families the Hypothesis strategies draw from. A mutant of one family narrows it to that family,
    so the same test searches a smaller space that contains the failing region.
    """

    name: str = "relpos_ref"
    attention: Callable[..., Any] = rp.attention
    attention_vjp: Callable[..., Any] = rp.attention_vjp
    biased_softmax: Callable[..., Any] = rp.biased_softmax
    t5_bucket: Callable[..., Any] = rp.t5_bucket
    alibi_slopes: Callable[..., Any] = rp.alibi_slopes
    classes: Mapping[str, type] = field(default_factory=lambda: dict(REAL_CLASSES))
    kinds: tuple[str, ...] = ALL_KINDS

    def with_class(self, kind: str, cls: type, *, name: str) -> Impl:
        return replace(self, name=name, classes={**self.classes, kind: cls}, kinds=(kind,))


REAL = Impl()


@dataclass(frozen=True)
class FamilySpec:
    """Host description of one bias family: which family, its constructor arrays (float64 NumPy) and options.

    :meth:`build` instantiates it on any namespace and dtype with the classes of an :class:`Impl`.
    """

    kind: str
    num_heads: int
    arrays: Mapping[str, np.ndarray]
    options: Mapping[str, Any]

    def build(self, xp: Any, impl: Impl = REAL, dtype: str = "float64") -> Any:
        cls = impl.classes[self.kind]
        dt = getattr(xp, dtype)
        if self.kind == "sandwich":
            return cls(self.num_heads, self.options["head_dim"], dtype=dt, xp=xp)
        arrs = {k: xp.asarray(np.asarray(v, dtype=np.float64), dtype=dt) for k, v in self.arrays.items()}
        return cls(**arrs, **self.options)

    def permuted(self, perm: list[int]) -> FamilySpec:
        """The same family with head h of the result equal to head perm[h] of this one (not for Sandwich)."""
        if self.kind == "sandwich":
            msg = "Sandwich has no head parameters to permute; use a TensorBias of its values"
            raise ValueError(msg)
        idx = np.asarray(perm)
        arrays = {k: (v[idx] if k in HEAD_ARRAYS[self.kind] else v) for k, v in self.arrays.items()}
        return replace(self, arrays=arrays)

    def rows(self, start: int, stop: int) -> FamilySpec:
        """For TensorBias, the bias of query rows start:stop (other families are functions of positions)."""
        if self.kind != "tensor":
            return self
        return replace(self, arrays={"array": self.arrays["array"][:, start:stop, :]})


# -- tolerances -------------------------------------------------------------------------------------------------


def eps_of(dtype: Any) -> float:
    return float(np.finfo(np.dtype(str(np.dtype(dtype)))).eps)


def rounding_bound(eps: float, *, d: int, sk: int, logit_max: float, v_max: float = 1.0) -> float:
    r"""Absolute bound on the difference of two evaluations of the same softmax/attention that round differently.

    .. math:: 16\,\varepsilon\,(D + S_k)\,(1 + R)\,(1 + V)

    with :math:`R` the largest finite |logit| (including any added constant) and :math:`V` the largest |value|.
    Derivation (u = eps/2 the unit roundoff): a logit is a D-term dot product plus at most three more roundings, so
    the two sides' logits differ by at most :math:`(D + 3) u R` each; the exponent arguments :math:`z - m` then
    differ by at most :math:`2 (D + 4) u R`, which is the relative error of each :math:`e^{z-m}` up to a further
    u; the normalising sum adds :math:`S_k u` relative; the output sum :math:`\sum_j p_j v_j` adds :math:`S_k u V`.
    Summing, the difference is below :math:`(2D + S_k + 12)\,u\,(1 + R)(1 + V)`, which the formula exceeds by more
    than a factor 4 (it also covers lse, whose error is below the same expression without the factor 1 + V).
    """
    return 16.0 * eps * (d + sk) * (1.0 + logit_max) * (1.0 + v_max)


def _assert_close(actual: Any, desired: Any, atol: float, what: str) -> None:
    np.testing.assert_allclose(
        to_numpy(actual).astype(np.float64), to_numpy(desired).astype(np.float64), rtol=0, atol=atol, err_msg=what
    )


def _finite_abs_max(*arrays: np.ndarray) -> float:
    out = 0.0
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        fin = a[np.isfinite(a)]
        if fin.size:
            out = max(out, float(np.max(np.abs(fin))))
    return out


def _logits_np(q, k, bias, scale, placement):
    """Host float64 logits (B, H, Sq, Sk) with GQA, only to size tolerances."""
    group = q.shape[1] // k.shape[1]
    kk = np.repeat(np.asarray(k, dtype=np.float64), group, axis=1)
    s = np.einsum("bhid,bhjd->bhij", np.asarray(q, dtype=np.float64), kk)
    b = 0.0 if bias is None else np.asarray(bias, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return s * scale + b if placement == "post_scale" else (s + b) * scale


# -- property 1: offset-only dependence -------------------------------------------------------------------------


def _int(xp: Any, pos: Any) -> Any:
    return xp.asarray(np.asarray(pos, dtype=np.int64))


def _require(family: Any, result: shared.PropertyResult) -> None:
    """Raise AssertionError naming the family when the shared check failed."""
    assert result.passed, f"{family!r}: {result.name}: {result.detail}"


def check_offset_only(family: Any, xp: Any, q_pos: np.ndarray, k_pos: np.ndarray, shift: int) -> None:
    """b(i, j) == b(i + s, j + s), bitwise: every family computes from Delta alone, by the same operations."""
    _require(family, shared.offset_only(family.bias, _int(xp, q_pos), _int(xp, k_pos), shift))


def check_fire_breaks_offset_only_beyond_L(family: Any, xp: Any, L: float, k_len: int, shift: int) -> None:
    """FIRE is not translation invariant once i > L: some pair (i, j) with i + s > L has b(i, j) != b(i+s, j+s).

    The caller supplies an MLP that is strictly monotone in its input, so any change of the normaliser shows.
    """
    i0 = math.ceil(L)
    qp = xp.asarray(np.arange(i0, i0 + 2, dtype=np.int64))
    kp = xp.asarray(np.arange(0, k_len, dtype=np.int64))
    b0 = to_numpy(family.bias(qp, kp))
    b1 = to_numpy(family.bias(qp + shift, kp + shift))
    assert np.any(b0 != b1), (
        f"{family!r}: no pair with query position beyond L = {L} changed under a shift of {shift}; "
        "the normaliser psi(max(L, i)) must depend on the absolute position"
    )


# -- property 2: distance penalties ---------------------------------------------------------------------------


def _by_distance(family: Any, xp: Any, n: int) -> np.ndarray:
    """Bias of one query at position n against keys 0..2n: column j has Delta = n - j (from n down to -n)."""
    qp = xp.asarray(np.asarray([n], dtype=np.int64))
    kp = xp.asarray(np.arange(0, 2 * n + 1, dtype=np.int64))
    return to_numpy(family.bias(qp, kp))[:, 0, :].astype(np.float64)


def check_zero_at_zero(family: Any, xp: Any, n: int) -> None:
    """Exactly 0 at Delta = 0: one query at position n against keys 0..2n."""
    _require(family, shared.zero_at_zero(family.bias, _int(xp, [n]), _int(xp, np.arange(2 * n + 1))))


def check_penalty_monotone(family: Any, xp: Any, n: int) -> None:
    """Non-increasing in |Delta| on each side (past keys and future keys), and exactly 0 at Delta = 0."""
    check_zero_at_zero(family, xp, n)
    _require(family, shared.penalty_monotone(family.bias, n, xp=xp))


def check_sandwich_not_monotone(family: Any, xp: Any, n: int) -> None:
    """Sandwich (d = 128) increases somewhere with |Delta| in every head (unlike ALiBi/KERPLE)."""
    b = _by_distance(family, xp, n)
    past = b[:, n::-1]
    rises = np.any(np.diff(past, axis=1) > 0, axis=1)
    assert np.all(rises), f"{family!r}: heads {np.flatnonzero(~rises).tolist()} are monotone over |Delta| <= {n}"


def check_t5_buckets(
    bucket_fn: Callable[..., Any], xp: Any, *, bidirectional: bool, num_buckets: int, max_distance: int, n: int
) -> None:
    """T5 buckets: in range, each side in its own half, non-decreasing in |Delta|, constant for |Delta| >= D."""
    cfg = {"bidirectional": bidirectional, "num_buckets": num_buckets, "max_distance": max_distance}
    shared.t5_buckets(bucket_fn, n, xp=xp, **cfg).require()


# -- property 3: causal masking ---------------------------------------------------------------------------------


def check_causal_no_future_leak(
    impl: Impl,
    xp: Any,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    k_new: np.ndarray,
    v_new: np.ndarray,
    *,
    bias: Any,
    align: str,
    block_size: int | None,
) -> None:
    """Replacing keys/values after query i (k_pos > q_pos[i]) leaves rows 0..i of output and lse bitwise unchanged.

    Bitwise because a masked key contributes exactly exp(-inf) = 0 to every sum and 0 * v to the output, whatever
    its key and value (both finite).
    """
    q_x, k_x, v_x, kn_x, vn_x = (xp.asarray(a) for a in (q, k, v, k_new, v_new))
    opts = {"bias": bias, "align": align, "block_size": block_size}
    shared.causal_no_future_leak(impl.attention, q_x, k_x, v_x, kn_x, vn_x, **opts).require()


# -- property 4: shift invariance ------------------------------------------------------------------------------


def check_softmax_shift_invariance(
    impl: Impl,
    xp: Any,
    scores: np.ndarray,
    bias: np.ndarray,
    mask: np.ndarray | None,
    shift: np.ndarray,
    *,
    scale: float,
    placement: str,
) -> None:
    """bias + c (constant per row): same probabilities, lse + c (post_scale) or lse + c*scale (pre_scale).

    Tolerance :func:`rounding_bound` with D = 1 (no dot product), R = max|logit| + max|c| (times scale).
    """
    moved = shift * (scale if placement == "pre_scale" else 1.0)
    logits = scores * scale + bias if placement == "post_scale" else (scores + bias) * scale
    r = _finite_abs_max(logits) + _finite_abs_max(moved)
    tol = rounding_bound(eps_of(scores.dtype), d=1, sk=scores.shape[-1], logit_max=r, v_max=0.0)
    m = None if mask is None else xp.asarray(mask)
    opts = {"mask": m, "scale": scale, "placement": placement, "atol": tol}
    sm = impl.biased_softmax
    shared.softmax_shift_invariance(sm, xp.asarray(scores), xp.asarray(bias), xp.asarray(shift), **opts).require()


def check_attention_shift_invariance(
    impl: Impl,
    xp: Any,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    bias: np.ndarray,
    shift: np.ndarray,
    *,
    causal: bool,
    align: str,
    placement: str,
    scale: float,
) -> None:
    """attention with bias + c[b, h, i]: same output, lse moved by c (post_scale) or c*scale (pre_scale)."""
    kw = {"causal": causal, "align": align, "placement": placement, "scale": scale, "return_lse": True}
    o0, l0 = impl.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=xp.asarray(bias), **kw)
    shifted = bias + shift[..., None]
    o1, l1 = impl.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=xp.asarray(shifted), **kw)
    moved = shift * (scale if placement == "pre_scale" else 1.0)
    r = _finite_abs_max(_logits_np(q, k, bias, scale, placement)) + _finite_abs_max(moved)
    tol = rounding_bound(eps_of(q.dtype), d=q.shape[-1], sk=k.shape[2], logit_max=r, v_max=_finite_abs_max(v))
    _assert_close(o1, o0, tol, "attention output changed under a per-row shift of the bias")
    _assert_close(l1, to_numpy(l0).astype(np.float64) + moved, tol, "lse did not move by the per-row shift")


# -- property 5: probabilities ----------------------------------------------------------------------------------


def check_probabilities(
    impl: Impl,
    xp: Any,
    scores: np.ndarray,
    bias: np.ndarray | None,
    mask: np.ndarray | None,
    *,
    scale: float,
    placement: str,
) -> None:
    """probs >= 0, exactly 0 where masked, rows sum to 1 within 2 (Sk + 1) eps, rows with nothing to attend all 0.

    The sum bound: p_j = e_j / fl(sum e), and fl(sum e) carries at most (Sk - 1) u relative error, each division
    u, the test's own sum (Sk - 1) u: below 2 Sk u < 2 (Sk + 1) eps.
    """
    tol = 2 * (scores.shape[-1] + 1) * eps_of(scores.dtype)
    b = None if bias is None else xp.asarray(bias)
    m = None if mask is None else xp.asarray(mask)
    opts = {"mask": m, "scale": scale, "placement": placement, "atol": tol}
    shared.probabilities(impl.biased_softmax, xp.asarray(scores), b, **opts).require()


# -- property 6: KV cache / suffix consistency ------------------------------------------------------------------


def check_kv_cache_suffix(
    impl: Impl,
    xp: Any,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    spec: FamilySpec | None,
    suffix: int,
    *,
    placement: str,
    scale: float,
) -> None:
    """The last ``suffix`` queries alone (bottom_right, causal) equal the last rows of the full causal attention.

    suffix = 1 is a decoding step against a KV cache; larger suffixes are chunked prefill. Bound: rounding_bound.
    """
    sq = q.shape[2]
    full_bias = None if spec is None else spec.build(xp, impl)
    part_bias = None if spec is None else spec.rows(sq - suffix, sq).build(xp, impl)
    bias_np = None
    if full_bias is not None:
        qp, kp = rp.positions(sq, k.shape[2], xp=xp)
        bias_np = to_numpy(full_bias.bias(qp, kp))[None]
    r = _finite_abs_max(_logits_np(q, k, bias_np, scale, placement))
    tol = rounding_bound(eps_of(q.dtype), d=q.shape[-1], sk=k.shape[2], logit_max=r, v_max=_finite_abs_max(v))
    q_x, k_x, v_x = (xp.asarray(a) for a in (q, k, v))
    opts = {"bias": full_bias, "suffix_bias": part_bias, "atol": tol, "placement": placement, "scale": scale}
    shared.kv_cache_suffix(impl.attention, q_x, k_x, v_x, suffix, **opts).require()


# -- property 7: heads ------------------------------------------------------------------------------------------


def check_head_independence(
    impl: Impl,
    xp: Any,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_new: np.ndarray,
    kv_new: tuple[np.ndarray, np.ndarray],
    *,
    bias: Any,
    head: int,
    causal: bool,
    align: str,
) -> None:
    """Changing the queries of every other head, and the keys/values of every kv head that query ``head`` does not
    use (kv head head // (H / H_kv)), leaves that head's output and lse bitwise unchanged."""
    nh, nkv = q.shape[1], k.shape[1]
    g = head // (nh // nkv)
    q2 = q_new.copy()
    q2[:, head] = q[:, head]
    k2, v2 = kv_new[0].copy(), kv_new[1].copy()
    k2[:, g], v2[:, g] = k[:, g], v[:, g]
    kw = {"bias": bias, "causal": causal, "align": align, "return_lse": True}
    o0, l0 = impl.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), **kw)
    o1, l1 = impl.attention(xp.asarray(q2), xp.asarray(k2), xp.asarray(v2), **kw)
    what = f"head {head} changed when only other heads' inputs changed"
    np.testing.assert_array_equal(to_numpy(o1)[:, head], to_numpy(o0)[:, head], err_msg=what)
    np.testing.assert_array_equal(to_numpy(l1)[:, head], to_numpy(l0)[:, head], err_msg=what)


def check_head_permutation(
    impl: Impl,
    xp: Any,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    spec: FamilySpec | None,
    kv_perm: list[int],
    in_group_perm: list[int],
    *,
    causal: bool,
    align: str,
) -> None:
    """Permuting query heads, kv heads and the bias parameters together permutes the output, bitwise.

    Query head h = g G + r (G = H / H_kv) goes to kv_perm[g] G + in_group_perm[r], so grouped heads stay grouped.
    A Sandwich bias has no head parameters: both sides then use a TensorBias of its values.
    """
    nh, nkv, sq, sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    grp = nh // nkv
    perm = [kv_perm[h // grp] * grp + in_group_perm[h % grp] for h in range(nh)]
    kw = {"causal": causal, "align": align, "return_lse": True}
    if spec is not None and spec.kind == "sandwich":
        qp, kp = rp.positions(sq, sk, align=align, xp=xp)
        spec = FamilySpec("tensor", nh, {"array": to_numpy(spec.build(xp, impl).bias(qp, kp))}, {})
    bias = None if spec is None else spec.build(xp, impl)
    pbias = None if spec is None else spec.permuted(perm).build(xp, impl)
    o0, l0 = impl.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=bias, **kw)
    ip, ikv = np.asarray(perm), np.asarray(kv_perm)
    o1, l1 = impl.attention(xp.asarray(q[:, ip]), xp.asarray(k[:, ikv]), xp.asarray(v[:, ikv]), bias=pbias, **kw)
    what = f"output heads are not permuted by {perm} (kv {kv_perm})"
    np.testing.assert_array_equal(to_numpy(o1), to_numpy(o0)[:, ip], err_msg=what)
    np.testing.assert_array_equal(to_numpy(l1), to_numpy(l0)[:, ip], err_msg=what)


def check_heads_subset(family: Any, xp: Any, q_pos: np.ndarray, k_pos: np.ndarray, heads: list[int]) -> None:
    """bias(heads=[...]) is the selected rows of the full bias, in the order given (repeats allowed).

    Bitwise for every family but FIRE, whose last layer is a matrix product over the W hidden units: with fewer
    heads the product has fewer rows and BLAS may pick another kernel (a matrix-vector product for one head) that
    groups or fuses the W + 1 terms differently. FIRE is held to 2 (W + 1) eps S per entry, S = sum of the
    magnitudes of the terms (|w2| relu(w1 x + b1) summed over the hidden units, plus |b2|): each of the two
    evaluations is within (W + 1) u S of the exact sum.
    """
    qp, kp = _int(xp, q_pos), _int(xp, k_pos)
    tol: Any = 0.0
    if isinstance(family, rp.FIRE):
        host = {k: to_numpy(v) for k, v in family.parameters().items()}
        prm = {k: v.astype(np.float64) for k, v in host.items()}
        x = to_numpy(family.interpolant(qp, kp)).astype(np.float64)
        hidden = np.maximum(prm["w1"][:, 0, None, None] * x[None] + prm["b1"][:, None, None], 0.0)
        terms = np.tensordot(np.abs(prm["w2"]), hidden, axes=1) + np.abs(prm["b2"])[:, None, None]
        tol = xp.asarray(2 * (family.width + 1) * eps_of(host["w2"].dtype) * terms[np.asarray(heads)])
    _require(family, shared.heads_subset(family.bias, qp, kp, heads, atol=tol))


# -- property 8: placement --------------------------------------------------------------------------------------


def check_placement(
    impl: Impl,
    xp: Any,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    spec: FamilySpec,
    *,
    scale: float,
    causal: bool,
    align: str,
) -> None:
    """attention(pre_scale, bias=family) == attention(post_scale, bias=family.bias * scale) within rounding_bound.

    The sides round differently: fl(fl(s + b) t) against fl(fl(s t) + fl(b t)).
    """
    sq, sk = q.shape[2], k.shape[2]
    fam = spec.build(xp, impl)
    qp, kp = rp.positions(sq, sk, align=align, xp=xp)
    b = fam.bias(qp, kp)
    kw = {"causal": causal, "align": align, "scale": scale, "return_lse": True}
    o_pre, l_pre = impl.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=fam, placement="pre_scale", **kw)
    o_post, l_post = impl.attention(
        xp.asarray(q), xp.asarray(k), xp.asarray(v), bias=(b * scale)[None, ...], placement="post_scale", **kw
    )
    bias_np = to_numpy(b)[None]
    s = np.abs(_logits_np(q, k, None, 1.0, "post_scale"))
    r = (_finite_abs_max(s) + _finite_abs_max(bias_np)) * scale
    tol = rounding_bound(eps_of(q.dtype), d=q.shape[-1], sk=sk, logit_max=r, v_max=_finite_abs_max(v))
    _assert_close(o_pre, o_post, tol, "pre_scale(b) != post_scale(b * scale)")
    _assert_close(l_pre, l_post, tol, "lse of pre_scale(b) != lse of post_scale(b * scale)")


# -- property 9: backend agreement ------------------------------------------------------------------------------


def check_backend_agreement(
    make: Callable[[Any], tuple[Any, ...]], xp: Any, ref_xp: Any, *, exact: bool, tols: tuple[float, ...] = ()
) -> None:
    """make(xp) and make(ref_xp) (each a tuple of arrays) agree bitwise (exact) or within the given bounds."""
    got = make(xp)
    ref = make(ref_xp)
    assert len(got) == len(ref)
    for n, (a, r) in enumerate(zip(got, ref)):
        a_np, r_np = to_numpy(a), to_numpy(r)
        assert a_np.dtype == r_np.dtype, f"result {n}: dtype {a_np.dtype} vs reference {r_np.dtype}"
        if exact:
            np.testing.assert_array_equal(a_np, r_np, err_msg=f"result {n} differs between backends")
        else:
            _assert_close(a_np, r_np, tols[n], f"result {n} differs between backends beyond the bound")


# -- property 10: ALiBi slopes ----------------------------------------------------------------------------------


def fairseq_get_slopes(n: int) -> list[tuple[float, int]]:
    """The official recursion (ofirpress/attention_with_linear_biases, fairseq/models/transformer.py, get_slopes),
    re-implemented here in the same float64 product form, each slope paired with its exponent i in start * ratio**i.
    The exact value of slope (start * ratio**i) is 2^(-8 (i + 1) / c), c the power of two of its sequence.
    """

    def power_of_2(m: int) -> list[tuple[float, int]]:
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
        ratio = start
        return [(start * ratio**i, i) for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    c = 2 ** math.floor(math.log2(n))
    return power_of_2(c) + fairseq_get_slopes(2 * c)[0::2][: n - c]


def _official_exponents(n: int) -> list[Fraction]:
    """Exact base-2 exponents of the official slopes, from the same recursion in rational arithmetic."""
    if n & (n - 1) == 0:
        return [Fraction(-8 * (i + 1), n) for i in range(n)]
    c = 1 << (n.bit_length() - 1)
    return _official_exponents(c) + _official_exponents(2 * c)[0::2][: n - c]


def check_alibi_slopes(slopes_fn: Callable[..., Any], xp: Any, num_heads: int) -> None:
    r"""Slopes equal the official recursion; for H a power of two they form a geometric sequence.

    Three checks.

    1. Against the official float64 product form (:func:`fairseq_get_slopes`). Tolerance: the official code
       computes :math:`\mathrm{fl}(s)\cdot\mathrm{fl}(s)^i`, :math:`s = 2^{-8/c}`, so the rounding of s (u
       relative, u = 2^-53) is raised to the power i and the official value carries up to (i + 3) u relative error
       (one u each for s, pow and the product). relpos_ref rounds the exact :math:`2^{e}` once. A flat 4-ulp
       tolerance does not hold: the measured difference reaches 90 ulp at H = 256 (i = 255). Each slope is compared
       with rtol (i + 3) u, i its exponent in the official product.
    2. Against the exact values: each slope is within 1/2 ulp of :math:`2^{e}`, e the exact rational exponent of
       the recursion, evaluated with mpmath at 200 bits (correct rounding).
    3. H a power of two: consecutive ratios equal :math:`2^{-8/H}` within 4 u relative (each slope rounded once,
       the ratio once more); for H <= 8 every slope is a power of two and the ratios are checked bitwise.
    """
    got = to_numpy(slopes_fn(num_heads, xp=xp)).astype(np.float64)
    ref = fairseq_get_slopes(num_heads)
    assert got.shape == (num_heads,), f"H={num_heads}: shape {got.shape}"
    want = np.array([s for s, _ in ref])
    rtol = np.array([(i + 3) * 2.0**-53 for _, i in ref])
    bad = np.abs(got - want) > rtol * np.abs(want)
    assert not bad.any(), (
        f"H={num_heads}: slopes {np.flatnonzero(bad).tolist()} differ from the official rule: "
        f"{got[bad].tolist()} vs {want[bad].tolist()}"
    )
    with mpmath.workprec(200):
        exact = [mpmath.mpf(2) ** (mpmath.mpf(e.numerator) / e.denominator) for e in _official_exponents(num_heads)]
        err_ulp = [abs(mpmath.mpf(float(g)) - x) / float(np.spacing(g)) for g, x in zip(got, exact)]
    worst = max(float(e) for e in err_ulp)
    assert worst <= 0.5, f"H={num_heads}: a slope is {worst} ulp from the exact 2^e (expected correctly rounded)"
    if num_heads & (num_heads - 1) == 0 and num_heads > 1:
        ratios = got[1:] / got[:-1]
        r = 2.0 ** (-8.0 / num_heads)
        if num_heads <= 8:
            assert np.all(ratios == r), f"H={num_heads}: not geometric, ratios {np.unique(ratios)}"
        else:
            assert np.all(np.abs(ratios - r) <= 4 * 2.0**-53 * r), f"H={num_heads}: ratios {np.unique(ratios)}"


# -- block size -------------------------------------------------------------------------------------------------


def check_block_size_invariance(
    impl: Impl,
    xp: Any,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    spec: FamilySpec | None,
    *,
    causal: bool,
    align: str,
    placement: str,
    scale: float,
    block_sizes: tuple[int | tuple[int | None, int | None] | None, ...],
) -> None:
    """attention gives the same output and lse for every block_size (None = default = all rows here).

    An entry may be a pair (block_size, kv_block_size): query and key tile sizes; the last entry is the reference.

    Not bitwise: under causal masking each block drops the keys none of its queries can see, which changes the
    grouping of the sums; bound rounding_bound.
    """
    bias = None if spec is None else spec.build(xp, impl)
    kw = {"bias": bias, "causal": causal, "align": align, "placement": placement, "scale": scale, "return_lse": True}
    results = []
    for bs in block_sizes:
        bq, bk = bs if isinstance(bs, tuple) else (bs, None)
        tiles = {"block_size": bq} if bk is None else {"block_size": bq, "kv_block_size": bk}
        results.append(impl.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), **tiles, **kw))
    bias_np = None
    if bias is not None:
        qp, kp = rp.positions(q.shape[2], k.shape[2], align=align, xp=xp)
        bias_np = to_numpy(bias.bias(qp, kp))[None]
    r = _finite_abs_max(_logits_np(q, k, bias_np, scale, placement))
    tol = rounding_bound(eps_of(q.dtype), d=q.shape[-1], sk=k.shape[2], logit_max=r, v_max=_finite_abs_max(v))
    o_ref, l_ref = results[-1]
    for bs, (o, lse) in zip(block_sizes, results):
        _assert_close(o, o_ref, tol, f"block_size={bs} output differs from block_size={block_sizes[-1]}")
        _assert_close(lse, l_ref, tol, f"block_size={bs} lse differs from block_size={block_sizes[-1]}")
