"""Shared by the fused-kernel tests (GPU: test_fused_gpu.py; CPU emulation: test_cuda_emulated.py).

A :class:`Case` describes one call of ``fused_biased_softmax``; :func:`build` makes its inputs (NumPy, float64
reference values included), :func:`check` compares a result with the float64 NumPy reference
(``relpos_ref.biased_softmax`` on float64 scores and the family's float64 bias) under an error model derived from
the bias bounds of relpos_ref.cuda.bounds:

* logit error per attended key: :math:`\\delta z_j \\le \\beta\\,\\epsilon_b(j) + 3u(\\alpha |s_j| + \\beta |b_j|)`
  (bias error bound, the roundings of ``fma(s, alpha, b * beta)``); :math:`D` = its row maximum;
* probabilities: :math:`|p - p^{ref}| \\le 2\\,\\mathrm{expm1}(2D + c\\,u)\\,p^{ref}` with
  :math:`c = \\lceil S_k/32 \\rceil + 24` (partial sums of up to :math:`S_k/32` terms per thread, the tree, ``expf``
  and the reciprocal); float16 output adds :math:`2^{-11} p^{ref} + 2^{-25}` (one rounding, subnormal spacing);
* lse: :math:`|\\mathrm{lse} - \\mathrm{lse}^{ref}| \\le 2\\,(D + (c + 4)u + 2u|\\mathrm{lse}^{ref}|)`;
* rows with nothing to attend: probabilities exactly 0 and lse -inf (``fully_masked="nan"``: NaN and NaN).

The factor 2 leaves room for second-order terms; a wrong bias, index, mask or reduction gives errors orders of
magnitude larger. The cluster kernel (a row split over up to 8 blocks) rescales each block's partial sum and
probabilities by :math:`e^{m_r - m}`: one more ``expf``, a product, a sum of at most 8 terms and one more rounding
per probability, well inside the 24 spare units of :math:`c`. A NaN or infinite probability (or lse) where the
reference is finite counts as an infinite error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import array_api_compat.numpy as npx
import numpy as np

import relpos_ref as rp
from relpos_ref.cuda.bounds import bias_error_bound

FAMILIES = [
    "none",
    "tensor_array",  # a plain float array, broadcast over the batch
    "tensor_family",  # rp.TensorBias
    "alibi",
    "kerple_power",
    "kerple_log",
    "t5_bidirectional",
    "t5_causal",
    "offset",
    "sandwich",
    "fire",
    "materialise",  # a BiasFamily subclass the kernel does not know: materialised on the device
]


class _MyALiBi(rp.ALiBi):
    """A family type the kernel has no in-kernel form for (exercises the materialising fallback)."""


@dataclass(frozen=True)
class Case:
    family: str
    shape: tuple[int, ...]  # (B, H, Sq, Sk) or (H, Sq, Sk)
    dtype: str = "float32"
    causal: bool = False
    align: str = "bottom_right"
    positions: str = "align"  # "align", "shifted" (affine arrays starting at 1000) or "random" (sorted, gaps)
    placement: str = "post_scale"
    scale: float = 0.125
    mask: str | None = None  # None, "random", "rows" (some rows fully masked), "keys" (mask of shape (Sk,))
    fully_masked: str = "zero"
    return_lse: bool = True
    specials: str | None = None  # None, "neginf" (-inf scores, a whole row), "nan" (a NaN score), "spike"
    noncontiguous: bool = False
    score_std: float = 4.0
    seed: int = 0

    @property
    def id(self) -> str:
        parts = [self.family, "x".join(map(str, self.shape)), self.dtype]
        if self.causal:
            parts.append(f"causal-{self.align}")
        elif self.align != "bottom_right":
            parts.append(self.align)
        for name in ("positions", "placement", "mask", "fully_masked", "specials"):
            value = getattr(self, name)
            if value not in (None, "align", "post_scale", "zero"):
                parts.append(f"{name}={value}")
        if self.scale != 0.125:
            parts.append(f"scale={self.scale:g}")
        if self.noncontiguous:
            parts.append("noncontig")
        if not self.return_lse:
            parts.append("nolse")
        return "-".join(parts)

    def with_(self, **kw: Any) -> Case:
        return replace(self, **kw)


@dataclass
class Built:
    case: Case
    scores: np.ndarray  # in case.dtype
    bias: Any  # BiasFamily, NumPy array or None (NumPy namespace)
    q_pos: np.ndarray | None  # passed to the kernel (None -> align)
    k_pos: np.ndarray | None
    mask: np.ndarray | None
    ref_probs: np.ndarray  # float64
    ref_lse: np.ndarray  # float64
    logit_err: np.ndarray  # D per row, shape scores.shape[:-1]


def _positions(case: Case, sq: int, sk: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if case.positions == "random":
        k = np.sort(rng.choice(np.arange(0, 4 * sk + 8), size=sk, replace=False)).astype(np.int64)
        q = np.sort(rng.choice(np.arange(-4, 4 * sk + 8), size=sq, replace=False)).astype(np.int64)
        return q, k
    q, k = rp.positions(sq, sk, align=case.align)
    q, k = np.asarray(q), np.asarray(k)
    if case.positions == "shifted":
        q, k = q + 1000, k + 1000
    return q, k


def make_family(name: str, heads: int, sq: int, sk: int, rng: np.random.Generator) -> Any:
    if name == "none":
        return None
    if name == "tensor_array":
        return rng.normal(size=(heads, sq, sk)) * 2.0
    if name == "tensor_family":
        arr = rng.normal(size=(heads, sq, sk)) * 2.0
        arr[:, :, ::7] = -np.inf  # TensorBias allows -inf: it masks
        return rp.TensorBias(arr)
    if name == "alibi":
        return rp.ALiBi.from_num_heads(heads)
    if name == "materialise":
        return _MyALiBi(rp.alibi_slopes(heads))
    if name == "kerple_power":
        return rp.KerplePower(rng.uniform(0.05, 1.0, heads), rng.uniform(0.1, 2.0, heads))
    if name == "kerple_log":
        return rp.KerpleLog(rng.uniform(0.1, 2.0, heads), rng.uniform(0.05, 1.0, heads))
    if name == "t5_bidirectional":
        return rp.T5Bias(rng.normal(size=(heads, 32)), bidirectional=True, layout="heads_buckets")
    if name == "t5_causal":
        return rp.T5Bias(rng.normal(size=(heads, 32)), bidirectional=False, max_distance=256, layout="heads_buckets")
    if name == "offset":
        return rp.OffsetBias(rng.normal(size=(heads, 2 * 20 + 1)))
    if name == "sandwich":
        return rp.Sandwich(heads, 64)
    if name == "fire":
        width = 32
        return rp.FIRE(
            rng.normal(size=(width, 1)),
            rng.normal(size=width) * 0.5,
            rng.normal(size=(heads, width)) * 0.5,
            rng.normal(size=heads),
            c=0.1,
            L=64.0,
            eps=1e-6,
        )
    msg = f"unknown family {name}"
    raise ValueError(msg)


def build(case: Case) -> Built:
    rng = np.random.default_rng(case.seed)
    shape4 = case.shape if len(case.shape) == 4 else (1, *case.shape)
    nb, nh, sq, sk = shape4
    s64 = rng.normal(size=case.shape) * case.score_std
    scores = s64.astype(case.dtype)
    if case.specials == "neginf":
        flat = scores.reshape(-1, sk)
        flat[0, :] = -np.inf  # a whole row: nothing finite to attend
        flat[1::3, 0] = -np.inf
    elif case.specials == "spike":
        # One logit of 1000 per row, at a random key: any reduction that misses the true row maximum overflows.
        flat = scores.reshape(-1, sk)
        cols = rng.integers(0, sk, size=flat.shape[0])
        flat[np.arange(flat.shape[0]), cols] = 1000.0 / case.scale
    elif case.specials == "nan":
        scores.reshape(-1, sk)[1, sk // 2] = np.nan
    q, k = _positions(case, sq, sk, rng)
    bias = make_family(case.family, nh, sq, sk, rng)
    mask = None
    if case.mask == "random":
        mask = rng.random(shape4) < 0.7
        if len(case.shape) == 3:
            mask = mask[0]
    elif case.mask == "rows":
        mask = np.ones(shape4, dtype=bool)
        mask[:, :, ::2, :] = rng.random((nb, nh, (sq + 1) // 2, sk)) < 0.5
        mask[0, 0, 0, :] = False  # a fully masked row
        mask = mask[:, :, :, :] if len(case.shape) == 4 else mask[0]
    elif case.mask == "keys":
        mask = rng.random(sk) < 0.6
        mask[0] = True

    # float64 reference: scores as given (float16 values upcast exactly), bias from float64 parameters.
    ref_scores = scores.astype(np.float64)
    if bias is None:
        b64, eps_b = None, np.zeros((nh, sq, sk))
    elif isinstance(bias, np.ndarray):
        b64, eps_b = bias, (2.0**-24 if case.dtype != "float64" else 0.0) * np.abs(bias)
    else:
        fam64 = bias.astype(np.float64, xp=npx) if not isinstance(bias, _MyALiBi) else bias
        b64 = np.asarray(fam64.bias(npx.asarray(q), npx.asarray(k)))
        prec = "float64" if case.dtype == "float64" else "float32"
        eps_b = bias_error_bound(bias if not isinstance(bias, _MyALiBi) else rp.ALiBi(bias.parameters()["slopes"]),
                                 q, k, prec)  # fmt: skip
    full_mask = np.broadcast_to(np.asarray(rp.causal_mask(q, k)), shape4) if case.causal else np.ones(shape4, bool)
    if mask is not None:
        full_mask = full_mask & np.broadcast_to(mask, shape4)
    ref_scores4 = ref_scores.reshape(shape4)
    bias4 = None if b64 is None else np.broadcast_to(b64, shape4)
    # The reference rejects NaN scores on attended keys; the kernel lets them propagate to their row (NumPy
    # semantics). Reference rows with an attended NaN are therefore all NaN, the others computed without it.
    nan_attended = (np.isnan(ref_scores4) & full_mask).any(axis=-1)
    probs, lse = rp.biased_softmax(
        npx.asarray(np.where(np.isnan(ref_scores4), 0.0, ref_scores4)),
        None if bias4 is None else npx.asarray(np.ascontiguousarray(bias4)),
        mask=npx.asarray(np.ascontiguousarray(full_mask)),
        scale=case.scale,
        placement=case.placement,
        fully_masked=case.fully_masked,
        return_lse=True,
    )
    probs, lse = np.array(probs), np.array(lse)
    probs[nan_attended] = np.nan
    lse[nan_attended] = np.nan
    alpha = case.scale
    beta = 1.0 if case.placement == "post_scale" else case.scale
    u = 2.0**-52 if case.dtype == "float64" else 2.0**-24
    babs = np.zeros(shape4) if bias4 is None else np.abs(np.where(np.isfinite(bias4), bias4, 0.0))
    sabs = np.abs(np.where(np.isfinite(ref_scores4), ref_scores4, 0.0))
    dz = beta * np.broadcast_to(eps_b, shape4) + 3 * u * (alpha * sabs + beta * babs)
    dz = np.where(full_mask, dz, 0.0)
    logit_err = dz.max(axis=-1)
    positional = case.positions != "align"
    return Built(
        case,
        scores,
        bias,
        q if positional else None,
        k if positional else None,
        mask,
        np.asarray(probs).reshape(case.shape),
        np.asarray(lse).reshape(case.shape[:-1]),
        logit_err.reshape(case.shape[:-1]),
    )


def check(built: Built, probs: np.ndarray, lse: np.ndarray | None) -> dict[str, float]:
    """Assert the kernel output is within the error model; return the worst ratios error / allowed."""
    case = built.case
    sk = case.shape[-1]
    u = 2.0**-52 if case.dtype == "float64" else 2.0**-24
    c = math.ceil(sk / 32) + 24
    probs = np.asarray(probs)
    assert probs.shape == tuple(case.shape)
    assert probs.dtype == np.dtype(case.dtype)
    p = probs.astype(np.float64)
    pr = built.ref_probs
    lr = built.ref_lse
    empty = ~np.isfinite(lr) if case.fully_masked == "zero" else np.isnan(lr)
    if case.specials == "nan":
        nan_rows = np.isnan(pr).any(axis=-1)
        assert np.all(np.isnan(p[nan_rows])), "a NaN score must make its row NaN (as the reference does)"
        empty = empty & ~nan_rows
    else:
        nan_rows = np.zeros(lr.shape, bool)
    # empty rows: exact fill
    if case.fully_masked == "zero":
        assert np.all(p[empty] == 0.0), "fully masked rows must be exactly zero"
    else:
        assert np.all(np.isnan(p[empty])), "fully masked rows must be NaN with fully_masked='nan'"
    live = ~empty & ~nan_rows
    d = built.logit_err[..., None]
    rel = np.expm1(2 * d + c * u)
    allowed = 2 * rel * pr + (1e-300 if case.dtype == "float64" else 1e-30)
    if case.dtype == "float16":
        allowed = allowed + 2.0**-11 * pr + 2.0**-25
    with np.errstate(invalid="ignore"):  # NaN rows are checked above and masked out by `live`
        err = np.abs(p - pr)
    # A NaN (or inf) where the reference is finite is an error of infinite size, not a NaN ratio that compares False.
    err = np.where(np.isfinite(p), err, np.inf)
    ratios = np.where(live[..., None], err / allowed, 0.0)
    ratio_p = float(np.max(ratios)) if live.any() else 0.0
    if ratio_p > 1:
        idx = np.unravel_index(int(np.argmax(ratios)), err.shape)
        raise AssertionError(
            f"{case.id}: probability error {err[idx]:.3e} > allowed {allowed[idx]:.3e} at {idx}: "
            f"got {p[idx]!r}, reference {pr[idx]!r} (ratio {ratio_p:.3g})"
        )
    ratio_l = 0.0
    if case.return_lse:
        assert lse is not None
        lse = np.asarray(lse)
        assert lse.shape == tuple(case.shape[:-1])
        assert lse.dtype == (np.float64 if case.dtype == "float64" else np.float32)
        lk = lse.astype(np.float64)
        if case.fully_masked == "zero":
            assert np.all(lk[empty] == -np.inf), "lse of a fully masked row must be -inf"
        else:
            assert np.all(np.isnan(lk[empty])), "lse of a fully masked row must be NaN with fully_masked='nan'"
        if nan_rows.any():
            assert np.all(np.isnan(lk[nan_rows]))
        allowed_l = 2 * (built.logit_err + (c + 4) * u + 2 * u * np.abs(np.where(live, lr, 0.0))) + 1e-300
        with np.errstate(invalid="ignore"):  # -inf - -inf on empty rows, masked out by `live`
            err_l = np.abs(np.where(live, lk - lr, 0.0))
        err_l = np.where(live & ~np.isfinite(lk), np.inf, err_l)  # NaN/inf lse of a live row: infinitely wrong
        ratio_l = float(np.max(err_l / allowed_l))
        assert ratio_l <= 1, f"{case.id}: lse error {err_l.max():.3e} beyond the model (ratio {ratio_l:.3g})"
    return {"probs": ratio_p, "lse": ratio_l}


# ---- the case lists -----------------------------------------------------------------------------------------------


def family_sweep(shapes: list[tuple[int, ...]], dtypes: list[str]) -> list[Case]:
    """Every family x dtype x shape, alternating causal/placement/alignment so each combination appears."""
    out = []
    k = 0
    for fam in FAMILIES:
        for dtype in dtypes:
            for shape in shapes:
                out.append(
                    Case(
                        fam,
                        shape,
                        dtype,
                        causal=k % 2 == 0,
                        align=("bottom_right", "top_left")[(k // 2) % 2],
                        placement=("post_scale", "pre_scale")[(k // 3) % 2],
                        seed=k,
                    )
                )
                k += 1
    return out


def special_cases(sk_small: int = 37) -> list[Case]:
    """Alignment, masking, empty rows, lse, NaN, positions, layouts."""
    base = Case("alibi", (2, 3, 5, sk_small), causal=True)
    return [
        # Sq > Sk bottom-right: the first queries have negative positions and see nothing.
        base.with_(shape=(1, 2, 9, 4)),
        base.with_(shape=(1, 2, 9, 4), align="top_left"),
        base.with_(family="fire", shape=(1, 2, 9, 4)),
        base.with_(family="fire", shape=(2, 2, 3, 50)),  # FIRE normaliser uses the absolute query position
        base.with_(family="fire", shape=(2, 2, 3, 50), align="top_left"),
        base.with_(shape=(2, 2, 3, 50), align="top_left"),
        base.with_(shape=(1, 2, 9, 4), fully_masked="nan"),
        base.with_(mask="rows"),
        base.with_(mask="rows", fully_masked="nan"),
        base.with_(mask="random", causal=False),
        base.with_(mask="keys", causal=False),
        base.with_(specials="neginf"),
        base.with_(specials="nan"),
        base.with_(specials="spike", causal=False, shape=(2, 4, 3, 1000)),  # warp, 32 values per lane
        base.with_(specials="spike", causal=False, shape=(2, 4, 3, 1500)),  # block 256 x 8
        base.with_(specials="spike", causal=False, shape=(2, 4, 3, 1500), dtype="float64"),
        base.with_(positions="shifted"),
        base.with_(positions="random"),
        base.with_(family="sandwich", positions="random"),
        base.with_(family="t5_bidirectional", positions="random", causal=False),
        base.with_(noncontiguous=True),
        base.with_(shape=(3, 5, sk_small)),  # (H, Sq, Sk)
        base.with_(shape=(3, 5, sk_small), family="tensor_array"),
        base.with_(return_lse=False),
        base.with_(scale=1.0, placement="pre_scale", family="kerple_log"),
        base.with_(dtype="float16", specials="neginf", mask="rows"),
        base.with_(dtype="float64", specials="neginf", mask="rows"),
        base.with_(shape=(1, 1, 1, 1)),
        base.with_(shape=(2, 2, 1, 1), causal=False),
    ]
