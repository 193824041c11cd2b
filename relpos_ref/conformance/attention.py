"""Attention outputs against ``relpos_ref.attention`` in float64: ``check_attention`` and ``attention_checks``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .. import _checks
from .._host import abs_errors, numpy_dtype, to_host
from ..attention import attention as ref_attention
from ..conventions import (
    ALIGNMENTS,
    FLOAT_DTYPES,
    FULLY_MASKED,
    PLACEMENTS,
    Alignment,
    FloatDtype,
    FullyMasked,
    Placement,
)
from ..families import BiasFamily, TensorBias
from ..positions import causal_mask, positions
from . import _repro, diagnose
from ._arrays import from_host, resolve_namespace
from ._core import (
    CandidateError,
    Check,
    _as_float_array,
    _f,
    _first,
    _max_rel,
    _Suite,
    _target_name,
    _to_numpy64,
    run_checks,
)
from .report import CheckResult, Report
from .tolerance import ATTENTION_FLOORS, attention_tolerance, plain_attention, rule_text

__all__ = ["AttentionShape", "attention_checks", "attention_inputs", "check_attention", "hand_over"]


class AttentionShape(NamedTuple):
    """Sizes of one attention case. ``logit_scale`` multiplies q (large logits)."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    logit_scale: float = 1.0


def attention_inputs(
    shape: AttentionShape, *, dtype: str = "float32", seed: int = 0, identity_v: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seeded q, k, v (NumPy, in ``dtype``; bfloat16 via ml_dtypes) the harness hands to a candidate.

    Standard normal entries; q is multiplied by ``shape.logit_scale`` before rounding. ``identity_v`` makes every
    value head the identity matrix (needs ``head_dim == k_len``), so the output rows are the probabilities.
    """
    shape = AttentionShape(*shape)
    nd = numpy_dtype(dtype)
    rng = np.random.default_rng([seed, *[int(x) for x in shape[:6]], round(shape.logit_scale * 1000)])
    b, h, hkv, sq, sk, d = shape[:6]
    q = rng.standard_normal((b, h, sq, d)) * shape.logit_scale
    k = rng.standard_normal((b, hkv, sk, d))
    if identity_v:
        if d != sk:
            msg = f"shape: identity_v needs head_dim == k_len, got head_dim {d}, k_len {sk}"
            raise ValueError(msg)
        v = np.broadcast_to(np.eye(sk), (b, hkv, sk, sk)).copy()
    else:
        v = rng.standard_normal((b, hkv, sk, d))
    return q.astype(nd), k.astype(nd), v.astype(nd)


def hand_over(arrays: Sequence[np.ndarray], *, xp: Any = None, device: Any = None) -> tuple[Any, ...]:
    """NumPy arrays converted to the namespace ``xp`` (module or name: numpy, torch, cupy, array_api_strict)."""
    kind, module = resolve_namespace(xp)
    return tuple(from_host(a, kind, module, device) for a in arrays)


class _Case(NamedTuple):
    name: str
    shape: AttentionShape
    identity_v: bool = False


@dataclass(frozen=True)
class AttentionOptions:
    """What an attention suite (forward or backward) is built with, validated once, when the object is made.

    The fields are the keywords of :func:`check_attention` that describe the comparison (all but the candidate,
    ``expected_failures`` and the check ``label``); :func:`attention_checks`, :func:`attention_backward_checks` and
    the CLI make one and hand it to the suites. Invalid values raise ``TypeError`` or ``ValueError`` naming the
    keyword, checked in the order of the fields. Derived: ``bias64`` (the bias in float64 NumPy, for the
    reference), ``xp_kind``, ``xp_module`` and ``xp_name`` (the resolved namespace of the inputs). ``shapes`` is kept
    as a tuple; the suite checks it against the bias when it builds its cases.
    """

    bias: BiasFamily | None = None
    causal: bool = False
    align: Alignment = "bottom_right"
    placement: Placement = "post_scale"
    scale: float | None = None
    dtype: FloatDtype = "float32"
    with_lse: bool = False
    fully_masked: FullyMasked = "zero"
    xp: Any = None
    device: Any = None
    rtol: float | None = None
    atol: float | None = None
    seed: int = 0
    shapes: Sequence[AttentionShape | tuple[int, ...]] | None = None
    target: str | None = None
    bias64: BiasFamily | None = field(init=False, repr=False, compare=False)
    xp_kind: str = field(init=False, repr=False, compare=False)
    xp_module: Any = field(init=False, repr=False, compare=False)
    xp_name: str = field(init=False, repr=False, compare=False)

    @classmethod
    def of(cls, keywords: Mapping[str, Any]) -> AttentionOptions:
        """The options named in ``keywords`` (a public function's ``locals()``); the others keep their defaults."""
        return cls(**{f.name: keywords[f.name] for f in fields(cls) if f.init and f.name in keywords})

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        bias = self.bias
        if bias is not None and not isinstance(bias, BiasFamily):
            msg = f"bias: expected None or a relpos_ref bias family, got {type(bias).__name__}"
            raise TypeError(msg)
        put("bias64", _to_numpy64(bias) if bias is not None else None)
        _checks.boolean("causal", self.causal)
        _checks.option("align", self.align, ALIGNMENTS)
        _checks.option("placement", self.placement, PLACEMENTS)
        if self.scale is not None:
            put("scale", _checks.real_scalar("scale", self.scale, positive=True))
        _checks.option("dtype", self.dtype, FLOAT_DTYPES)
        numpy_dtype(self.dtype)
        _checks.boolean("with_lse", self.with_lse)
        _checks.option("fully_masked", self.fully_masked, FULLY_MASKED)
        kind, module = resolve_namespace(self.xp)
        put("xp_kind", kind)
        put("xp_module", module)
        put(
            "xp_name", {"numpy": "numpy", "torch": "torch", "cupy": "cupy"}.get(kind, getattr(module, "__name__", "xp"))
        )
        if self.rtol is not None or self.atol is not None:
            attention_tolerance("float64", 0.0, 1.0, rtol=self.rtol, atol=self.atol)
        put("seed", _checks.integer("seed", self.seed))
        if self.shapes is not None:
            put("shapes", tuple(self.shapes))


class _AttentionSuite(_Suite):
    #: What the candidate is called with, for the error on a candidate that is not callable.
    signature: ClassVar[str] = "candidate(q, k, v)"

    def __init__(self, candidate: Any, options: AttentionOptions, *, label: str) -> None:
        self.check_candidate(candidate)
        o = options
        self.candidate = candidate
        self.options = o
        self.target = o.target
        self.bias, self.bias64 = o.bias, o.bias64
        self.causal, self.align, self.placement, self.scale = o.causal, o.align, o.placement, o.scale
        self.dtype, self.with_lse, self.fully_masked = o.dtype, o.with_lse, o.fully_masked
        self.xp_kind, self.xp_mod, self.xp_name, self.device = o.xp_kind, o.xp_module, o.xp_name, o.device
        self.rtol, self.atol = o.rtol, o.atol
        self.seed = o.seed
        self.label = label
        self.notes: list[str] = []
        self._cache: dict[Any, Any] = {}
        self.cases = self._make_cases(o.shapes)

    @classmethod
    def check_candidate(cls, candidate: Any) -> None:
        """TypeError unless ``candidate`` is callable; run before the options are built, so this error comes first."""
        if not callable(candidate):
            msg = f"candidate: expected a callable {cls.signature}, got {type(candidate).__name__}"
            raise TypeError(msg)

    def _make_cases(self, shapes: Any) -> dict[str, _Case]:
        fixed = self.bias64.shape[1:] if isinstance(self.bias64, TensorBias) else None
        h = self.bias64.num_heads if self.bias64 is not None else 4
        cases: dict[str, _Case] = {}
        if shapes is not None:
            for n, sh in enumerate(shapes):
                sh = AttentionShape(*sh)
                if self.bias64 is not None and sh.heads != h:
                    msg = f"shapes: expected heads = {h} (the bias family's num_heads) in every shape, got {sh}"
                    raise ValueError(msg)
                if fixed is not None and (sh.q_len, sh.k_len) != fixed:
                    msg = f"shapes: expected (q_len, k_len) = {fixed} (the TensorBias's), got {sh}"
                    raise ValueError(msg)
                if sh.heads % sh.kv_heads:
                    msg = f"shapes: expected kv_heads dividing heads, got {sh}"
                    raise ValueError(msg)
                cases[f"shape{n}"] = _Case(f"shape{n}", sh)
            return cases
        p = next((f for f in (2, 3, 5, 7) if h % f == 0), h if h > 1 else 0)
        if fixed is not None:
            sq, sk = fixed
            cases["fixed"] = _Case("fixed", AttentionShape(2, h, h, sq, sk, 16))
            if p:
                cases["gqa"] = _Case("gqa", AttentionShape(1, h, h // p, sq, sk, 8))
            cases["large_logits"] = _Case("large_logits", AttentionShape(1, h, h, sq, sk, 16, 40.0))
            self.notes.append("q<k, decode and q>k cases: a TensorBias has fixed (Sq, Sk)")
            return cases
        cases["square"] = _Case("square", AttentionShape(2, h, h, 16, 16, 16))
        cases["q<k"] = _Case("q<k", AttentionShape(1, h, h, 7, 19, 16))
        cases["decode"] = _Case("decode", AttentionShape(1, h, h, 1, 23, 16))
        if p:
            cases["gqa"] = _Case("gqa", AttentionShape(1, h, h // p, 13, 13, 8))
        else:
            self.notes.append("gqa: one query head, no grouping possible")
        cases["q>k"] = _Case("q>k", AttentionShape(1, h, h, 12, 5, 16))
        cases["large_logits"] = _Case("large_logits", AttentionShape(1, h, h, 16, 16, 16, 40.0))
        return cases

    def header(self) -> dict[str, Any]:
        return {
            "candidate": _target_name(self.candidate, self.target),
            "reference": f"relpos_ref.attention in float64, bias={self.bias!r}",
            "kind": "attention output candidate(q, k, v)" + (" -> (out, lse)" if self.with_lse else ""),
            "setup": (
                f"causal={self.causal}, align={self.align}, placement={self.placement}, scale="
                f"{'1/sqrt(D)' if self.scale is None else self.scale}, fully_masked={self.fully_masked}, "
                f"inputs {self.dtype} as {self.xp_name} arrays, seed={self.seed}"
            ),
            "cases": "; ".join(f"{c.name} {tuple(c.shape)}" for c in self.cases.values()),
            "tolerance rule": rule_text("attention")
            if self.rtol is None and self.atol is None
            else f"user override: |cand - ref| <= atol + rtol |ref| with rtol={self.rtol}, atol={self.atol}",
        }

    # -- data ----------------------------------------------------------------------------------------------
    def inputs(self, case: _Case, *, perturb_after: int | None = None) -> tuple[np.ndarray, ...]:
        q, k, v = attention_inputs(case.shape, dtype=self.dtype, seed=self.seed, identity_v=case.identity_v)
        if perturb_after is not None:
            nd = q.dtype
            k = k.astype(np.float64)
            v = v.astype(np.float64)
            k[:, :, perturb_after:, :] += 4.0
            v[:, :, perturb_after:, :] -= 4.0
            k, v = k.astype(nd), v.astype(nd)
        return q, k, v

    def positions(self, shape: AttentionShape) -> tuple[np.ndarray, np.ndarray]:
        q, k = positions(shape.q_len, shape.k_len, align=self.align)
        return np.asarray(q), np.asarray(k)

    def keep(self, shape: AttentionShape, align: str | None = None) -> np.ndarray | None:
        if not self.causal:
            return None
        q, k = positions(shape.q_len, shape.k_len, align=align or self.align)
        return np.asarray(causal_mask(q, k))

    def scale_of(self, shape: AttentionShape) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(shape.head_dim)

    def ref_options(self) -> dict[str, Any]:
        return {"causal": self.causal, "align": self.align, "placement": self.placement, "scale": self.scale}

    def reference(self, case: _Case, inputs: tuple[np.ndarray, ...], **over: Any) -> tuple[np.ndarray, np.ndarray]:
        q, k, v = (a.astype(np.float64) for a in inputs)
        opts = {"bias": self.bias64, **self.ref_options(), **over}
        out, lse = ref_attention(q, k, v, return_lse=True, **opts)
        return np.asarray(out), np.asarray(lse)

    def call(self, inputs: tuple[np.ndarray, ...], shape: AttentionShape) -> tuple[np.ndarray, np.ndarray | None]:
        args = tuple(from_host(a, self.xp_kind, self.xp_mod, self.device) for a in inputs)
        result = self._call(*args)
        lse = None
        if self.with_lse:
            if not isinstance(result, tuple | list) or len(result) != 2:
                msg = f"candidate returned {type(result).__name__}; with_lse=True expects a pair (out, lse)"
                raise CandidateError(msg)
            result, lse_raw = result
            lse, _ = _as_float_array(lse_raw, "candidate lse")
        elif isinstance(result, tuple | list):
            msg = (
                f"candidate returned a {type(result).__name__} of {len(result)}; expected the output array "
                "(pass with_lse=True if it returns (out, lse))"
            )
            raise CandidateError(msg)
        out, _ = _as_float_array(result, "candidate output")
        b, h, _, sq, _, _ = shape[:6]
        dv = inputs[2].shape[-1]
        if out.shape != (b, h, sq, dv):
            msg = f"candidate output has shape {out.shape}, expected (B, H, Sq, Dv) = {(b, h, sq, dv)}"
            raise CandidateError(msg)
        if lse is not None and lse.shape != (b, h, sq):
            if lse.shape == (b, h, sq, 1):
                lse = lse[..., 0]
            else:
                msg = f"candidate lse has shape {lse.shape}, expected (B, H, Sq) = {(b, h, sq)}"
                raise CandidateError(msg)
        return out, lse

    def evaluate(self, case: _Case) -> dict[str, Any]:
        """Candidate, float64 reference and plain same-dtype baseline for one case (cached)."""
        if case.name in self._cache:
            return self._cache[case.name]
        inputs = self.inputs(case)
        ref_out, ref_lse = self.reference(case, inputs)
        q_pos, k_pos = self.positions(case.shape)
        bias_arr = None
        if self.bias64 is not None:
            bias_arr = np.asarray(self.bias64.bias(q_pos, k_pos))[None]
        base_out, base_lse = plain_attention(
            *(a.astype(np.float64) for a in inputs),
            bias_arr,
            self.keep(case.shape),
            scale=self.scale_of(case.shape),
            placement=self.placement,
            dtype=self.dtype,
        )
        entry: dict[str, Any] = {
            "inputs": inputs,
            "ref_out": ref_out,
            "ref_lse": ref_lse,
            "base_out": base_out,
            "base_lse": base_lse,
            "empty": ~np.isfinite(ref_lse),
            "q_pos": q_pos,
            "k_pos": k_pos,
        }
        try:
            entry["out"], entry["lse"] = self.call(inputs, case.shape)
        except CandidateError as exc:
            exc.reproduction = self.snippet(case, None, lse=False)  # type: ignore[attr-defined]
            entry["error"] = exc
        self._cache[case.name] = entry
        return entry

    def snippet(self, case: _Case, index: tuple[int, ...] | None, *, lse: bool) -> str:
        return _repro.attention_snippet(
            self.candidate,
            self.target,
            self.bias64,
            case.shape,
            dtype=self.dtype,
            seed=self.seed,
            xp_name=self.xp_name,
            options=self.ref_options(),
            index=index,
            with_lse=self.with_lse,
            lse=lse,
        )

    # -- checks --------------------------------------------------------------------------------------------
    def _tol(self, ref: np.ndarray, base: np.ndarray, rows: np.ndarray) -> tuple[Any, float]:
        sel = np.broadcast_to(rows, ref.shape) if rows.ndim < ref.ndim else rows
        base_err = float(np.max(abs_errors(base, ref)[sel], initial=0.0))
        mag = max(1.0, float(np.max(np.abs(ref[sel & np.isfinite(ref)]), initial=0.0)))
        return attention_tolerance(self.dtype, base_err, mag, rtol=self.rtol, atol=self.atol), base_err

    def values_check(self, case: _Case, *, lse: bool) -> CheckResult:
        name = f"{self.label}.{'lse' if lse else 'output'}.{case.name}"
        e = self.evaluate(case)
        if "error" in e:
            raise e["error"]
        rows = ~e["empty"]
        if lse:
            cand, ref, base, sel = e["lse"], e["ref_lse"], e["base_lse"], rows
        else:
            cand, ref, base, sel = (
                e["out"],
                e["ref_out"],
                e["base_out"],
                np.broadcast_to(rows[..., None], e["ref_out"].shape),
            )
        tol, _ = self._tol(ref, base, sel)
        err = np.where(sel, abs_errors(cand, ref), 0.0)
        bound = tol.atol + tol.rtol * np.abs(np.where(np.isfinite(ref), ref, 0.0))
        bad = sel & (err > bound)
        n_empty = int(e["empty"].sum())
        what = "log-sum-exp" if lse else "output"
        res = CheckResult(
            name,
            not bool(bad.any()),
            summary=f"{what} of case {case.name} {tuple(case.shape)}"
            + (f"; {n_empty} fully masked rows left to the fully_masked check" if n_empty else ""),
            max_abs=float(np.max(err, initial=0.0)),
            max_rel=_max_rel(err, ref, sel),
            bound=float(np.max(np.where(sel, bound, 0.0), initial=0.0)),
            tolerance=tol.text,
        )
        if not res.passed:
            idx = _first(bad)
            qi = idx[2]
            res.mismatch = {
                "index": idx,
                "q_pos": int(e["q_pos"][qi]),
                "candidate": _f(cand[idx]),
                "reference": _f(ref[idx]),
            }
            res.diagnosis = self.diagnose(case, e, cand, sel, bound, lse=lse)
            res.reproduction = self.snippet(case, idx, lse=lse)
        return res

    def hypotheses(self, case: _Case, e: dict[str, Any]) -> list[tuple[str, Callable[[], tuple[np.ndarray, ...]]]]:
        sh = case.shape
        inputs = e["inputs"]
        q_pos, k_pos = e["q_pos"], e["k_pos"]
        hyps: list[tuple[str, Callable[[], tuple[np.ndarray, ...]]]] = []
        other = "top_left" if self.align == "bottom_right" else "bottom_right"
        # Bias-level hypotheses first: attention is blind to a per-row constant, so a wrong bias can also look like a
        # shifted query position; the bias explanation is the more specific one.
        if self.bias64 is not None:
            for label, alt in diagnose.bias_hypotheses(self.bias64, q_pos, k_pos, positions=False):
                hyps.append((label, lambda alt=alt: self.reference(case, inputs, bias=alt[None])))
        if sh.q_len != sh.k_len:
            what = (
                "top-left (PyTorch SDPA is_causal=True, xformers LowerTriangularMask)"
                if other == "top_left"
                else "bottom-right (FlashAttention >= 2.1, KV-cache decoding)"
            )
            hyps.append(
                (
                    f"{what} alignment instead of {self.align} for Sq != Sk",
                    lambda: self.reference(case, inputs, align=other),
                )
            )
        if self.bias64 is not None and self.scale_of(sh) != 1.0:
            op = "pre_scale" if self.placement == "post_scale" else "post_scale"
            hyps.append(
                (
                    f"bias on the wrong side of the scale: {op} (softmax("
                    + ("(QK^T + b) * scale" if op == "pre_scale" else "QK^T * scale + b")
                    + f")) instead of {self.placement}",
                    lambda: self.reference(case, inputs, placement=op),
                )
            )
        if self.causal:
            qn = np.asarray(q_pos) + 1
            next_mask = np.asarray(causal_mask(qn, k_pos))
            hyps.append(
                (
                    "causal mask lets in the next key (k_pos <= q_pos + 1: off by one)",
                    lambda: self.reference(case, inputs, causal=False, mask=next_mask),
                )
            )
            hyps.append(("no causal mask applied", lambda: self.reference(case, inputs, causal=False)))
        else:
            hyps.append(
                ("a causal mask was applied although causal=False", lambda: self.reference(case, inputs, causal=True))
            )
        if self.bias64 is not None:
            hyps.append(("bias ignored", lambda: self.reference(case, inputs, bias=None)))
        if self.scale is None:
            hyps.append(("no 1/sqrt(d) scale (scale = 1, as T5)", lambda: self.reference(case, inputs, scale=1.0)))
        elif abs(self.scale - 1 / math.sqrt(sh.head_dim)) > 1e-12:
            hyps.append(
                (
                    f"default scale 1/sqrt(d) used instead of scale={self.scale}",
                    lambda: self.reference(case, inputs, scale=None),
                )
            )
        if sh.kv_heads < sh.heads:

            def interleaved() -> tuple[np.ndarray, ...]:
                q, k, v = inputs
                sel = [h % sh.kv_heads for h in range(sh.heads)]
                return self.reference(case, (q, k[:, sel], v[:, sel]))

            hyps.append(("grouped-query heads mapped as h % H_kv instead of h // (H / H_kv)", interleaved))
        return hyps

    def diagnose(
        self, case: _Case, e: dict[str, Any], cand: np.ndarray, sel: np.ndarray, bound: np.ndarray, *, lse: bool
    ) -> list[str]:
        out: list[str] = []
        if lse:
            ref = e["ref_lse"]
            if np.all((abs_errors(cand, ref / math.log(2)) <= bound + 1e-9 * np.abs(ref))[sel]):
                out.append("lse in base 2 (log2-sum-exp2, as Triton kernels keep it) instead of the natural log")
            out_ok = self.values_check(case, lse=False).passed
            with np.errstate(invalid="ignore"):
                d = np.where(sel, cand - ref, 0.0)
            if out_ok and sel.all() and np.isfinite(d).all():
                out.append(
                    "the outputs match but the lse does not: the candidate's bias equals the reference up to a "
                    "per-row constant, which leaves the probabilities unchanged and shifts the lse ("
                    + diagnose.row_shift_text(d[0], e["q_pos"], self.bias64, float(np.max(bound)))
                    + ")"
                )
        for label, fn in self.hypotheses(case, e):
            try:
                alt_out, alt_lse = fn()
            except (ValueError, TypeError):
                continue
            alt = alt_lse if lse else alt_out
            ok_rows = sel & np.isfinite(alt)
            if ok_rows.sum() < 0.5 * sel.sum():
                continue
            if np.all((abs_errors(cand, alt) <= bound)[ok_rows]):
                out.append(label)
                break  # hypotheses are ordered from the most common; one explanation is enough
        return out

    def rows_sum_check(self) -> CheckResult:
        base = next(iter(self.cases.values())).shape
        sq, sk = base.q_len, base.k_len
        if isinstance(self.bias64, TensorBias):
            shape = AttentionShape(1, base.heads, base.heads, sq, sk, sk)
        else:
            shape = AttentionShape(1, base.heads, base.heads, 16, 16, 16)
        case = _Case("identity_v", shape, identity_v=True)
        e = self.evaluate(case)
        if "error" in e:
            raise e["error"]
        p = e["out"]
        rows = ~e["empty"]
        tol, _ = self._tol(e["ref_out"], e["base_out"], np.broadcast_to(rows[..., None], p.shape))
        slack = tol.atol
        sums = np.sum(p, axis=-1)
        dev = np.where(rows, np.abs(sums - 1.0), 0.0)
        dev = np.where(np.isnan(dev), np.inf, dev)
        neg = float(np.max(np.where(rows[..., None], -p, 0.0), initial=0.0))
        masked_leak = 0.0
        keep = self.keep(shape)
        if keep is not None:
            masked_leak = float(np.max(np.where(rows[..., None] & ~keep, np.abs(p), 0.0), initial=0.0))
        worst = max(float(dev.max(initial=0.0)), neg, masked_leak)
        res = CheckResult(
            f"{self.label}.rows_sum_to_one",
            worst <= slack,
            summary="with V = identity the output rows are the probabilities: each row sums to 1, no entry is "
            "negative" + (", masked keys get 0" if keep is not None else ""),
            max_abs=worst,
            bound=slack,
            tolerance=tol.text,
        )
        if not res.passed:
            if dev.max() > slack:
                idx = _first(dev > slack)
                res.mismatch = {"index": idx, "what": "row sum", "candidate": _f(sums[idx]), "reference": 1.0}
            elif masked_leak > slack:
                res.diagnosis.append("probability mass on keys the causal mask removes")
            else:
                res.diagnosis.append("negative probabilities")
            res.reproduction = self.snippet(case, None, lse=False).replace(
                f"seed={self.seed})", f"seed={self.seed}, identity_v=True)"
            )
        return res

    def future_case(self) -> tuple[_Case, int] | None:
        """A case and a query row r with keys after position q_pos[r] to perturb."""
        for case in self.cases.values():
            q_pos, _ = self.positions(case.shape)
            r = case.shape.q_len // 2
            if 0 < int(q_pos[r]) + 1 < case.shape.k_len:
                return case, r
        return None

    def causal_future_check(self) -> CheckResult:
        found = self.future_case()
        assert found is not None  # the check is only generated when a case has future keys
        case, r = found
        sh = case.shape
        q_pos, k_pos = self.positions(sh)
        cut = int(q_pos[r]) + 1
        e = self.evaluate(case)
        if "error" in e:
            raise e["error"]
        pert = self.inputs(case, perturb_after=cut)
        out2, _ = self.call(pert, sh)
        rows = slice(0, r + 1)
        a, b = e["out"][:, :, rows], out2[:, :, rows]
        diff = float(np.max(abs_errors(a, b), initial=0.0))
        mag = max(1.0, float(np.max(np.abs(e["ref_out"][np.isfinite(e["ref_out"])]), initial=0.0)))
        slack = (0.0 if self.rtol is None and self.atol is None else (self.atol or 0.0)) + _floor(self.dtype) * mag
        res = CheckResult(
            f"{self.label}.causal_future_keys",
            diff <= slack,
            summary=f"rows 0..{r} (query positions <= {int(q_pos[r])}) unchanged when every key at position >= "
            f"{cut} is changed (k += 4, v -= 4)",
            max_abs=diff,
            bound=slack,
        )
        if not res.passed:
            idx = _first(abs_errors(a, b) > slack)
            res.mismatch = {"index": idx, "q_pos": int(q_pos[idx[2]]), "candidate": _f(b[idx]), "reference": _f(a[idx])}
            leak = np.asarray(causal_mask(q_pos + 1, k_pos))
            res.diagnosis.append(
                "the output depends on keys after the query: the causal mask lets future keys in"
                + (" (the next key: k_pos <= q_pos + 1)" if leak.any() else "")
            )
            res.reproduction = self.snippet(case, None, lse=False) + (
                f"\n# then add 4 to k[:, :, {cut}:] and subtract 4 from v[:, :, {cut}:]: rows 0..{r} must not change"
            )
        return res

    def alignment_check(self, case: _Case) -> CheckResult:
        sh = case.shape
        e = self.evaluate(case)
        if "error" in e:
            raise e["error"]
        m = max(1, sh.q_len // 2)
        q, k, v = e["inputs"]
        if self.align == "bottom_right":
            part, rows, what = q[:, :, -m:], slice(sh.q_len - m, sh.q_len), f"the last {m} queries alone"
        else:
            part, rows, what = q[:, :, :m], slice(0, m), f"the first {m} queries alone"
        sub = AttentionShape(sh.batch, sh.heads, sh.kv_heads, m, sh.k_len, sh.head_dim, sh.logit_scale)
        out_part, _ = self.call((part, k, v), sub)
        full = e["out"][:, :, rows]
        diff = abs_errors(out_part, full)
        ref_rows = e["ref_out"][:, :, rows]
        tol, _ = self._tol(ref_rows, e["base_out"][:, :, rows], np.ones(ref_rows.shape, dtype=bool))
        bound = 2 * tol.atol
        worst = float(np.max(diff, initial=0.0))
        res = CheckResult(
            f"{self.label}.alignment_consistency",
            worst <= bound,
            summary=f"case {case.name}: {what} against all keys give the same rows as the full call "
            f"({self.align}: a query keeps its position when the others are dropped, as in KV-cache decoding)",
            max_abs=worst,
            bound=bound,
            tolerance=f"twice the output bound of case {case.name}: {tol.text}",
        )
        if not res.passed:
            idx = _first(diff > bound)
            res.mismatch = {"index": idx, "candidate": _f(out_part[idx]), "reference": _f(full[idx])}
            other = "top-left" if self.align == "bottom_right" else "bottom-right"
            res.diagnosis.append(
                f"rows move when Sq changes: the candidate places queries {other} (from the start of the keys) "
                f"rather than {self.align.replace('_', '-')}"
            )
        return res

    def fully_masked_check(self, case: _Case) -> CheckResult:
        e = self.evaluate(case)
        if "error" in e:
            raise e["error"]
        empty = e["empty"]
        out = e["out"][empty]
        want = "zeros" if self.fully_masked == "zero" else "NaN"
        ok_out = np.all(out == 0) if self.fully_masked == "zero" else np.all(np.isnan(out))
        ok_lse = True
        lse_vals = None
        if self.with_lse and e["lse"] is not None:
            lse_vals = e["lse"][empty]
            ok_lse = (
                bool(np.all(lse_vals == -np.inf)) if self.fully_masked == "zero" else bool(np.all(np.isnan(lse_vals)))
            )
        n = int(empty.sum())
        res = CheckResult(
            f"{self.label}.fully_masked_rows",
            bool(ok_out and ok_lse),
            summary=f"case {case.name}: {n} query rows see no key; expected output {want}"
            + (f" and lse {'-inf' if self.fully_masked == 'zero' else 'NaN'}" if self.with_lse else ""),
        )
        if not res.passed:
            idx = _first(
                np.broadcast_to(empty[..., None], e["out"].shape)
                & ~((e["out"] == 0) if self.fully_masked == "zero" else np.isnan(e["out"]))
            )
            if idx is not None:
                res.mismatch = {
                    "index": idx,
                    "q_pos": int(e["q_pos"][idx[2]]),
                    "candidate": _f(e["out"][idx]),
                    "reference": 0.0 if self.fully_masked == "zero" else "nan",
                }
            if self.fully_masked == "zero" and np.isnan(out).any():
                res.diagnosis.append(
                    "NaN instead of zeros for fully masked rows (naive softmax of an all -inf row, as PyTorch SDPA "
                    "before 2.5); fully_masked='nan' describes this convention"
                )
            v = e["inputs"][2].astype(np.float64)
            group = e["out"].shape[1] // v.shape[1]
            mean_v = np.repeat(np.mean(v, axis=2), group, axis=1)  # (B, H, Dv)
            mean_rows = np.broadcast_to(mean_v[:, :, None, :], e["out"].shape)[empty]
            if out.size and np.allclose(out, mean_rows, rtol=1e-2, atol=1e-2):
                res.diagnosis.append(
                    "fully masked rows give the mean of V: a finite mask value (finfo.min, -1e4) makes the row "
                    "uniform over the masked keys instead of empty"
                )
            if not res.diagnosis and not np.isnan(out).any():
                rows = np.broadcast_to(empty[..., None], e["out"].shape)
                tol, _ = self._tol(e["ref_out"], e["base_out"], ~rows)
                for label, fn in self.hypotheses(case, e):
                    alt_out = fn()[0]
                    if np.isfinite(alt_out[rows]).all() and np.all(abs_errors(e["out"], alt_out)[rows] <= tol.atol):
                        res.diagnosis.append(f"these queries see keys in the candidate: {label}")
                        break
            if lse_vals is not None and not ok_lse:
                if np.all(lse_vals == np.inf):
                    res.diagnosis.append(
                        "lse = +inf for empty rows (FlashAttention's convention); relpos_ref uses "
                        "-inf, the log of an empty sum"
                    )
                else:
                    res.details.append(f"lse of empty rows: {np.unique(lse_vals)[:4].tolist()}")
            res.reproduction = self.snippet(case, idx, lse=False)
        return res

    def repeatable_check(self) -> CheckResult:
        case = next(iter(self.cases.values()))
        inputs = self.inputs(case)
        copies = tuple(a.copy() for a in inputs)
        args = tuple(from_host(a, self.xp_kind, self.xp_mod, self.device) for a in inputs)
        host_before = [to_host(a)[0] for a in args]
        r1 = self._call(*args)
        r2 = self._call(*args)
        o1 = _as_float_array(r1[0] if self.with_lse else r1, "candidate output")[0]
        o2 = _as_float_array(r2[0] if self.with_lse else r2, "candidate output")[0]
        same = o1.shape == o2.shape and bool(np.all((o1 == o2) | (np.isnan(o1) & np.isnan(o2))))
        host_after = [to_host(a)[0] for a in args]
        untouched = all(np.array_equal(a, b) for a, b in zip(host_before, host_after)) and all(
            np.array_equal(a, b) for a, b in zip(copies, inputs)
        )
        res = CheckResult(
            f"{self.label}.repeatable",
            same and untouched,
            summary="two calls give bitwise identical outputs and leave q, k, v unchanged",
        )
        if not same:
            res.diagnosis.append(
                "two calls on the same inputs returned different outputs (non-deterministic "
                "reduction order or uninitialised memory)"
            )
        if not untouched:
            res.diagnosis.append("the candidate modified q, k or v in place")
        return res


def _floor(dtype: str) -> float:
    return ATTENTION_FLOORS[dtype]


def attention_checks(
    candidate: Callable[..., Any],
    *,
    bias: BiasFamily | None = None,
    causal: bool = False,
    align: str = "bottom_right",
    placement: str = "post_scale",
    scale: float | None = None,
    shapes: Sequence[AttentionShape | tuple[int, ...]] | None = None,
    dtype: str = "float32",
    with_lse: bool = False,
    xp: Any = None,
    device: Any = None,
    fully_masked: str = "zero",
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    target: str | None = None,
    label: str = "attention",
) -> list[Check]:
    """The checks of :func:`check_attention`, unrun."""
    _AttentionSuite.check_candidate(candidate)
    options = AttentionOptions.of(locals())
    return _attention_checks(candidate, options, label=label)


def _attention_checks(candidate: Any, options: AttentionOptions, *, label: str = "attention") -> list[Check]:
    """The forward checks of ``candidate`` under ``options``, unrun."""
    s = _AttentionSuite(candidate, options, label=label)
    checks: list[Check] = []
    for case in s.cases.values():
        checks.append(
            Check(
                f"{label}.output.{case.name}", f"output of {case.shape}", lambda c=case: s.values_check(c, lse=False), s
            )
        )
        if s.with_lse:
            checks.append(
                Check(f"{label}.lse.{case.name}", f"lse of {case.shape}", lambda c=case: s.values_check(c, lse=True), s)
            )
    checks.append(Check(f"{label}.rows_sum_to_one", "probabilities via V = identity", s.rows_sum_check, s))
    if s.causal and s.future_case() is not None:
        checks.append(Check(f"{label}.causal_future_keys", "independence from future keys", s.causal_future_check, s))
    else:
        s.notes.append("causal_future_keys: " + ("causal=False" if not s.causal else "no case has keys after a query"))
    uneven = [c for c in s.cases.values() if c.shape.q_len < c.shape.k_len and c.shape.q_len > 1]
    if uneven and not isinstance(s.bias64, TensorBias):
        checks.append(
            Check(
                f"{label}.alignment_consistency",
                "rows keep their positions when Sq changes",
                lambda: s.alignment_check(uneven[0]),
                s,
            )
        )
    else:
        s.notes.append("alignment_consistency: needs a case with 1 < Sq < Sk and a positional (non-tensor) bias")
    masked_cases = [c for c in s.cases.values() if _has_empty_rows(s, c)]
    if masked_cases:
        checks.append(
            Check(
                f"{label}.fully_masked_rows",
                "rows with no visible key",
                lambda: s.fully_masked_check(masked_cases[0]),
                s,
            )
        )
    else:
        s.notes.append("fully_masked_rows: no case has a query that sees no key (needs causal, bottom_right, Sq > Sk)")
    checks.append(Check(f"{label}.repeatable", "deterministic, inputs unchanged", s.repeatable_check, s))
    return checks


def _has_empty_rows(s: _AttentionSuite, case: _Case) -> bool:
    keep = s.keep(case.shape)
    if keep is not None and not keep.any(axis=-1).all():
        return True
    if isinstance(s.bias64, TensorBias):
        arr = np.asarray(s.bias64.parameters()["array"])
        return bool(np.any(np.all(arr == -np.inf, axis=-1)))
    return False


def check_attention(
    candidate: Callable[..., Any],
    *,
    bias: BiasFamily | None = None,
    causal: bool = False,
    align: str = "bottom_right",
    placement: str = "post_scale",
    scale: float | None = None,
    shapes: Sequence[AttentionShape | tuple[int, ...]] | None = None,
    dtype: str = "float32",
    with_lse: bool = False,
    xp: Any = None,
    device: Any = None,
    fully_masked: str = "zero",
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    expected_failures: dict[str, str] | None = None,
    target: str | None = None,
) -> Report:
    r"""Check an attention implementation against :func:`relpos_ref.attention` in float64.

    Parameters
    ----------
    candidate : callable
        ``candidate(q, k, v)`` with q (B, H, Sq, D), k and v (B, H_kv, Sk, D) returns the output (B, H, Sq, D), or
        ``(out, lse)`` with lse (B, H, Sq) when ``with_lse``. It applies ``bias`` itself (a kernel, a
        ``score_mod``, an additive mask it builds...).
    bias : BiasFamily, optional
        The bias the candidate is meant to apply (float64 for the reference).
    causal, align, placement, scale
        Semantics of the reference, as in :func:`relpos_ref.attention`.
    shapes : sequence of AttentionShape, optional
        Replace the default cases (square, Sq < Sk, decode, grouped-query, Sq > Sk, large logits).
    dtype : {"float32", "float64", "float16", "bfloat16"}
        Dtype of the inputs handed to the candidate. The reference is computed in float64 on the same rounded
        values; the tolerance is FlashAttention's rule against a plain computation in this dtype.
    with_lse : bool
    xp : module or str, optional
        Namespace of the inputs: NumPy by default; "torch", "cupy", "array_api_strict" or the module.
    device : optional
        Device for ``xp`` (e.g. "cuda").
    fully_masked : {"zero", "nan"}
        Expected output of a query that sees no key (Sq > Sk, causal, bottom-right).
    rtol, atol : float, optional
        Replace the tolerance rule by ``|c - r| <= atol + rtol * |r|``.
    seed : int
        Seed of the inputs (``attention_inputs`` reproduces them).
    expected_failures : dict, optional
        Check name (or fnmatch pattern) -> reason for known divergences.
    target : str, optional
        "module:function" of the candidate, for reproduction snippets.

    Returns
    -------
    Report
    """
    _AttentionSuite.check_candidate(candidate)
    options = AttentionOptions.of(locals())
    return run_checks(_attention_checks(candidate, options), expected_failures=expected_failures)
