"""Window and softcap cases of the fused kernel (emulation: test_emulated.py; GPU: test_fused_gpu.py).

A :class:`FeatureCase` is a :class:`tests.support.fused_cases.Case` plus ``window`` and ``softcap``. Its reference
is computed in float64 independently of the kernel: the capped score :math:`c \\tanh(\\tau s / c)` with NumPy's
``tanh``, the window as a boolean mask on :math:`\\Delta = q_{pos} - k_{pos}`, then ``rp.biased_softmax`` with scale 1
on the capped scores and the bias times :math:`\\beta` (``beta = 1`` post_scale, :math:`\\tau` pre_scale).
:func:`reference_matches_attention` checks that construction against ``rp.attention`` (the package's reference of
window and softcap) on small cases. The error model is that of ``fused_cases.py`` with the capped term's bound
(``relpos_ref.cuda.bounds.softcap_error_bound``) in place of :math:`3u\\alpha|s|` when a softcap is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat.numpy as npx
import numpy as np

import relpos_ref as rp
from relpos_ref.cuda._launch import _prepare
from relpos_ref.cuda.bounds import bias_error_bound, softcap_error_bound
from tests.support.fused_cases import Built, Case, build


@dataclass(frozen=True)
class FeatureCase:
    case: Case
    window: tuple[int | None, int | None] | None = None
    softcap: float | None = None

    @property
    def id(self) -> str:
        parts = [self.case.id]
        if self.window is not None:
            parts.append("window=" + ",".join("inf" if w is None else str(w) for w in self.window))
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap:g}")
        return "-".join(parts)


def _positions(built: Built) -> tuple[np.ndarray, np.ndarray]:
    case = built.case
    sq, sk = case.shape[-2], case.shape[-1]
    if built.q_pos is not None:
        return np.asarray(built.q_pos, np.int64), np.asarray(built.k_pos, np.int64)
    q, k = rp.positions(sq, sk, align=case.align)
    return np.asarray(q, np.int64), np.asarray(k, np.int64)


def window_keep(q: np.ndarray, k: np.ndarray, window: Any) -> np.ndarray:
    """(Sq, Sk) keys inside the window, from Delta = q - k (the convention of relpos_ref.attention)."""
    delta = q[:, None] - k[None, :]
    keep = np.ones(delta.shape, bool)
    if window is not None:
        left, right = window
        if left is not None:
            keep &= delta <= left
        if right is not None:
            keep &= delta >= -right
    return keep


def _float64_bias(built: Built, q: np.ndarray, k: np.ndarray, shape4: tuple[int, ...]) -> tuple[Any, Any]:
    """(bias in float64 broadcast to shape4 or None, its kernel error bound broadcast to shape4)."""
    bias, case = built.bias, built.case
    prec = "float64" if case.dtype == "float64" else "float32"
    if bias is None:
        return None, np.zeros(shape4)
    if isinstance(bias, np.ndarray):
        b64 = np.broadcast_to(bias, shape4)
        return b64, (2.0**-24 if case.dtype != "float64" else 0.0) * np.abs(b64)
    b64 = np.asarray(bias.astype(np.float64, xp=npx).bias(npx.asarray(q), npx.asarray(k)))
    return np.broadcast_to(b64, shape4), np.broadcast_to(bias_error_bound(bias, q, k, prec), shape4)


def build_feature(fc: FeatureCase) -> Built:
    """The inputs of ``fc.case`` (fused_cases.build) with the float64 reference and the logit error bound of the
    window and softcap."""
    built = build(fc.case)
    case = built.case
    assert case.specials is None, "feature cases use finite scores"
    assert case.family != "materialise", "feature cases use in-kernel families"
    shape4 = case.shape if len(case.shape) == 4 else (1, *case.shape)
    q, k = _positions(built)
    s64 = built.scores.astype(np.float64).reshape(shape4)
    b64, eps_b = _float64_bias(built, q, k, shape4)
    keep = np.broadcast_to(window_keep(q, k, fc.window), shape4)
    if case.causal:
        keep = keep & np.broadcast_to(q[:, None] >= k[None, :], shape4)
    if built.mask is not None:
        keep = keep & np.broadcast_to(built.mask, shape4)
    tau = case.scale
    beta = 1.0 if case.placement == "post_scale" else tau
    capped = tau * s64 if fc.softcap is None else fc.softcap * np.tanh(tau * s64 / fc.softcap)
    capped = np.where(s64 == -np.inf, -np.inf, capped)  # a -inf score is a masked key, softcap or not
    probs, lse = rp.biased_softmax(
        npx.asarray(capped),
        None if b64 is None else npx.asarray(np.ascontiguousarray(beta * b64)),
        mask=npx.asarray(np.ascontiguousarray(keep)),
        scale=1.0,
        fully_masked=case.fully_masked,
        return_lse=True,
    )
    prec = "float64" if case.dtype == "float64" else "float32"
    u = 2.0**-52 if case.dtype == "float64" else 2.0**-24
    babs = np.zeros(shape4) if b64 is None else np.abs(np.where(np.isfinite(b64), b64, 0.0))
    # Without a softcap the fma's share of the score; with one, the capped term's bound.
    score_err = 3 * u * tau * np.abs(s64) if fc.softcap is None else softcap_error_bound(s64, tau, fc.softcap, prec)
    dz = np.where(keep, beta * eps_b + 3 * u * beta * babs + score_err, 0.0)
    built.ref_probs = np.asarray(probs).reshape(case.shape)
    built.ref_lse = np.asarray(lse).reshape(case.shape[:-1])
    built.logit_err = dz.max(axis=-1).reshape(case.shape[:-1])
    return built


def reference_matches_attention(fc: FeatureCase, built: Built) -> float:
    """Largest |difference| between :func:`build_feature`'s reference and ``rp.attention`` (float64) run with the same
    window and softcap on q = the scores, k = v = the identity (so that q . k_j = s_j and the output is the
    probabilities). Only for small Sk (the identity is Sk x Sk)."""
    case = built.case
    shape4 = case.shape if len(case.shape) == 4 else (1, *case.shape)
    nb, _, _, sk = shape4
    eye = np.ascontiguousarray(np.broadcast_to(np.eye(sk), (nb, 1, sk, sk)))
    bias = built.bias
    if bias is not None and not isinstance(bias, np.ndarray):
        bias = bias.astype(np.float64, xp=npx)
    out, lse = rp.attention(
        npx.asarray(built.scores.astype(np.float64).reshape(shape4)),
        npx.asarray(eye),
        npx.asarray(eye),
        bias=bias,
        causal=case.causal,
        align=case.align,
        scale=case.scale,
        placement=case.placement,
        mask=None if built.mask is None else npx.asarray(np.broadcast_to(built.mask, shape4)),
        fully_masked=case.fully_masked,
        return_lse=True,
        window=fc.window,
        softcap=fc.softcap,
        q_pos=None if built.q_pos is None else npx.asarray(built.q_pos),
        k_pos=None if built.k_pos is None else npx.asarray(built.k_pos),
    )
    ref_p, ref_l = built.ref_probs.reshape(shape4), built.ref_lse.reshape(shape4[:3])
    out, lse = np.asarray(out), np.asarray(lse)
    same_nan = np.array_equal(np.isnan(out), np.isnan(ref_p)) and np.array_equal(np.isnan(lse), np.isnan(ref_l))
    assert same_nan, f"{fc.id}: NaN rows differ between the two references"
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_l)), f"{fc.id}: empty rows differ"
    live = np.isfinite(ref_l)
    dp = np.nanmax(np.abs(out - ref_p)) if live.any() else 0.0
    dl = np.max(np.abs(np.where(live, lse - np.where(live, ref_l, 0.0), 0.0)))
    return float(max(dp, dl))


def prepare_feature(fc: FeatureCase, built: Built, backend: Any) -> Any:
    """The kernel launch of ``fc`` (the same preparation as the CuPy call, on ``backend``'s arrays)."""
    case = built.case
    return _prepare(
        backend, built.scores, built.bias, q_pos=built.q_pos, k_pos=built.k_pos, align=case.align,
        causal=case.causal, mask=built.mask, scale=case.scale, placement=case.placement,
        fully_masked=case.fully_masked, return_lse=case.return_lse, window=fc.window, softcap=fc.softcap,
    )  # fmt: skip


_B = Case("alibi", (2, 3, 5, 37), "float32", scale=0.5)
#: Window and softcap cases: every kernel kind (warp, block, stream, cluster), dtype, placement, causal and not,
#: one-sided and two-sided windows, windows that empty rows, a skip_masked family (FIRE: chunks outside the window
#: skip the bias), explicit positions.
FEATURE_CASES = [
    FeatureCase(_B, window=(3, 2)),
    FeatureCase(_B.with_(causal=True), window=(4, None)),
    FeatureCase(_B.with_(placement="pre_scale", family="kerple_log"), window=(None, 5)),
    FeatureCase(_B, softcap=2.0),
    FeatureCase(_B.with_(placement="pre_scale", family="t5_bidirectional", dtype="float16"), softcap=1.5),
    FeatureCase(_B.with_(family="tensor_family", mask="random"), window=(6, 6), softcap=3.0),
    FeatureCase(_B.with_(shape=(1, 2, 9, 4), align="top_left", fully_masked="nan"), window=(0, 0), softcap=1.0),
    FeatureCase(_B.with_(family="offset", dtype="float64", causal=True), window=(7, 0), softcap=0.75),
    FeatureCase(
        _B.with_(family="fire", shape=(1, 2, 3, 1500), positions="random", causal=True), window=(300, None), softcap=5.0
    ),
    FeatureCase(
        _B.with_(family="sandwich", shape=(1, 1, 2, 33000), dtype="float16", causal=True), window=(5000, 0), softcap=4.0
    ),  # the stream kernel
    FeatureCase(_B.with_(shape=(1, 2, 3, 1000), positions="shifted"), window=(20, 40), softcap=2.0),
]
#: The same features on the cluster kernel (a small policy in test_emulated.py).
FEATURE_CLUSTER_CASES = [
    FeatureCase(_B.with_(shape=(1, 2, 3, 999), positions="random", causal=True), window=(400, None), softcap=2.0),
    FeatureCase(_B.with_(family="fire", shape=(1, 2, 2, 300), dtype="float64"), window=(50, 60), softcap=1.0),
]
#: Small enough for the rp.attention cross-check of the reference construction.
ATTENTION_CHECKED = [fc for fc in FEATURE_CASES + FEATURE_CLUSTER_CASES if fc.case.shape[-1] <= 1500]
#: The case that exposes the window and softcap mutants (test_emulated_mutants.py): every row has keys at both
#: window edges, scaled scores several times the cap, and a bias of order 1 (T5 table entries).
FEATURE_MUTANT_CASE = FeatureCase(
    Case("t5_bidirectional", (1, 2, 6, 40), "float32", scale=1.0, seed=5), window=(3, 2), softcap=2.0
)
