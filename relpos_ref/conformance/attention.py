"""Attention outputs against ``relpos_ref.attention`` in float64: ``check_attention`` and ``attention_checks``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .. import effective_bias as eb
from .._host import abs_errors, round_to, to_host
from ..attention import attention as ref_attention
from ..cases import AttentionShape, attention_inputs, from_layout, kernel_cases, to_layout
from ..families import BiasFamily, T5Bias, TensorBias
from ..positions import causal_mask, positions
from . import _repro, diagnose
from ._arrays import from_host
from ._core import (
    CandidateError,
    Check,
    _as_float_array,
    _f,
    _first,
    _identical,
    _max_rel,
    _Suite,
    _target_name,
    run_checks,
)
from .options import AttentionOptions
from .report import CheckResult, Report
from .tolerance import (
    ATTENTION_FLOORS,
    _header_rule,
    _Plain,
    _plain_forward,
    _plain_outputs,
    attention_tolerance,
    worse_of,
)

__all__ = ["AttentionShape", "attention_checks", "attention_inputs", "check_attention"]


#: Builders of the varlen and packed-sequence checks, ``hook(candidate, options, label=...)``: features.py (which
#: subclasses the suite below, so this module cannot import it) registers its own when the package is imported.
FEATURE_CHECKS: list[Callable[..., list[Check]]] = []


class _Case(NamedTuple):
    name: str
    shape: AttentionShape


class _AttentionSuite(_Suite):
    signature = "candidate(q, k, v)"
    #: The ``rule_text`` kind of the header, and the array a candidate's error reproduces.
    rule: ClassVar[str] = "attention"
    first: ClassVar[str] = "output"

    def __init__(self, candidate: Any, options: AttentionOptions, *, label: str) -> None:
        super().__init__(candidate, options.target, label)
        o = self.options = options
        self.timeout = o.timeout if o.timeout is not None else getattr(self, "timeout", None)
        self.bias, self.bias64 = o.bias, o.bias64
        self.causal, self.align, self.placement, self.scale = o.causal, o.align, o.placement, o.scale
        self.dtype, self.with_lse, self.fully_masked = o.dtype, o.with_lse, o.fully_masked
        self.xp_kind, self.xp_mod, self.xp_name, self.device = o.xp_kind, o.xp_module, o.xp_name, o.device
        self.rtol, self.atol = o.rtol, o.atol
        self.seed, self.window, self.softcap = o.seed, o.window, o.softcap
        self.cases = self._make_cases(o.shapes)

    def _make_cases(self, shapes: Any) -> dict[str, _Case]:
        """The suite's cases: the caller's ``shapes``, or the kernel-shaped set of ``level`` inside the declaration
        (head dims, maximum lengths, GQA); what the declaration kept out goes to the notes."""
        o = self.options
        fixed = self.bias64.shape[1:] if isinstance(self.bias64, TensorBias) else None
        h = self.bias64.num_heads if self.bias64 is not None else 6
        cases: dict[str, _Case] = {}
        self.purposes: dict[str, str] = {}
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
                self.purposes[f"shape{n}"] = "given"
            return cases
        if fixed is not None:
            sq, sk = fixed
            dims = sorted(o.head_dims) if o.head_dims else [64]
            d = min(dims, key=lambda x: (abs(x - 64), x))
            g = next((f for f in (2, 3, 5, 7) if h % f == 0), 1) if o.gqa else 1
            sets = [("fixed", AttentionShape(2, h, h, sq, sk, d), "the TensorBias's (Sq, Sk), batch 2")]
            if g > 1:
                sets.append(("gqa", AttentionShape(1, h, h // g, sq, sk, d), "grouped-query heads"))
            sets.append(("large_logits", AttentionShape(1, h, h, sq, sk, d, 40.0), "logits of order 100"))
            for name, sh, purpose in sets:
                cases[name] = _Case(name, sh)
                self.purposes[name] = purpose
            self.notes.append("q<k, decode and q>k cases: a TensorBias has fixed (Sq, Sk)")
            return cases
        far = 2 * int(self.bias64.options()["max_distance"]) if isinstance(self.bias64, T5Bias) else 0
        drawn, notes = kernel_cases(
            level=o.level,
            heads=h,
            head_dims=o.head_dims,
            max_q_len=o.max_q_len,
            max_k_len=o.max_k_len,
            gqa=o.gqa,
            min_k_len=far,
        )
        self.notes += notes
        for c in drawn:
            cases[c.name] = _Case(c.name, c.shape)
            self.purposes[c.name] = c.purpose
        return cases

    def header(self) -> dict[str, Any]:
        return {
            "candidate": _target_name(self.candidate, self.target),
            "reference": f"relpos_ref.attention in float64, bias={self.bias!r}",
            "kind": "attention output candidate(q, k, v)" + (" -> (out, lse)" if self.with_lse else ""),
            "setup": (
                f"causal={self.causal}, align={self.align}, placement={self.placement}, scale="
                f"{'1/sqrt(D)' if self.scale is None else self.scale}, fully_masked={self.fully_masked}, "
                f"window={self.window}, softcap={self.softcap}, "
                f"inputs {self.dtype} as {self.xp_name} arrays, seed={self.seed}"
            ),
            "cases": f"level {self.options.level}, layout {self.options.layout}: "
            + "; ".join(f"{c.name} {tuple(c.shape)} ({self.purposes.get(c.name, '')})" for c in self.cases.values()),
            "tolerance rule": _header_rule(self.rule, self.rtol, self.atol),
        }

    # -- data ----------------------------------------------------------------------------------------------
    def inputs(self, case: _Case, *, perturb_after: int | None = None) -> tuple[np.ndarray, ...]:
        q, k, v = attention_inputs(case.shape, dtype=self.dtype, seed=self.seed)
        if perturb_after is not None:
            nd = q.dtype
            k = k.astype(np.float64)
            v = v.astype(np.float64)
            k[:, :, perturb_after:, :] += 4.0
            v[:, :, perturb_after:, :] -= 4.0
            k, v = k.astype(nd), v.astype(nd)
        return q, k, v

    def call_inputs(self, case: _Case) -> tuple[np.ndarray, ...]:
        """The arrays the candidate is called with for ``case``."""
        return self.inputs(case)

    def hand(self, inputs: Sequence[np.ndarray]) -> tuple[Any, ...]:
        """Host NumPy (B, H, S, D) ``inputs`` in the candidate's layout, as arrays of the suite's namespace, on its
        device."""
        lay = self.options.layout
        return tuple(from_host(to_layout(a, lay), self.xp_kind, self.xp_mod, self.device) for a in inputs)

    def unlayout(self, x: np.ndarray, name: str, want: tuple[int, ...]) -> np.ndarray:
        """A candidate's (B, H, S, D)-shaped result ``name`` read back from its layout, checked against ``want``."""
        lay = self.options.layout
        expect = want if lay == "bhsd" else (want[0], want[2], want[1], *want[3:])
        if x.shape != expect:
            axes = "(B, H, S, D)" if lay == "bhsd" else "(B, S, H, D)"
            msg = f"candidate {name} has shape {x.shape}, expected {axes} = {expect} (layout={lay!r})"
            raise CandidateError(msg)
        return from_layout(x, lay)

    def positions(self, shape: AttentionShape) -> tuple[np.ndarray, np.ndarray]:
        q, k = positions(shape.q_len, shape.k_len, align=self.align)
        return np.asarray(q), np.asarray(k)

    def keep(self, shape: AttentionShape, align: str | None = None) -> np.ndarray | None:
        """The keys each query may attend by the causal mask and the window (None: all), (Sq, Sk)."""
        q, k = positions(shape.q_len, shape.k_len, align=align or self.align)
        return diagnose.keep_mask(np.asarray(q), np.asarray(k), self.causal, self.window)

    # Hooks of the feature suites (features.py, paged.py): per-row positions and lengths, the case's own keywords of
    # the reference (lengths, segment ids) and their hypotheses.
    def row_positions(self, case: _Case, e: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(e["q_pos"])[None], np.asarray(e["k_pos"])[None]

    def row_lengths(self, case: _Case, sq: int, sk: int) -> tuple[np.ndarray, np.ndarray]:
        return np.array([sq]), np.array([sk])

    def case_features(self, case: _Case) -> dict[str, Any]:
        return {}

    def extra_hypotheses(self, case: _Case, e: dict[str, Any]) -> list[tuple[str, Callable[..., Any]]]:
        return []

    def scale_of(self, shape: AttentionShape) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(shape.head_dim)

    def ref_options(self) -> dict[str, Any]:
        opts = {"causal": self.causal, "align": self.align, "placement": self.placement, "scale": self.scale}
        return {**opts, **self.options.features()}

    def reference_options(self) -> dict[str, Any]:
        """The keywords but the bias of the suite's reference function (``relpos_ref.attention`` here)."""
        return self.ref_options()

    def reference(self, case: _Case, inputs: tuple[np.ndarray, ...], **over: Any) -> tuple[np.ndarray, np.ndarray]:
        q, k, v = (a.astype(np.float64) for a in inputs)
        opts = {"bias": self.bias64, **self.ref_options(), **over}
        out, lse = ref_attention(q, k, v, return_lse=True, **opts)
        return np.asarray(out), np.asarray(lse)

    def plain(
        self,
        case: _Case,
        inputs: Sequence[np.ndarray],
        q_pos: np.ndarray,
        k_pos: np.ndarray,
        dtype: str | None = None,
        *,
        sequential: bool = False,
    ) -> _Plain:
        """The plain materialised forward of ``inputs[:3]`` (q, k, v in float64) in ``dtype`` (default: the suite's),
        through BLAS or, with ``sequential``, with term-by-term accumulation."""
        q, k, v = (a.astype(np.float64) for a in inputs[:3])
        bias = None if self.bias64 is None else np.asarray(self.bias64.bias(q_pos, k_pos))[None]
        sh = case.shape
        return _plain_forward(
            q,
            k,
            v,
            bias,
            self.keep(sh),
            scale=self.scale_of(sh),
            placement=self.placement,
            dtype=dtype or self.dtype,
            sequential=sequential,
            softcap=self.softcap,
        )

    def sequential_baseline(self) -> bool:
        """Whether the baseline also takes the term-by-term plain computation: in float32 and float64, where the
        summation order is the plain error (in float16 and bfloat16 the rounding of every result to the dtype is)."""
        return self.dtype in ("float32", "float64")

    def call(
        self, inputs: tuple[np.ndarray, ...], shape: AttentionShape, **kw: Any
    ) -> tuple[np.ndarray, np.ndarray | None]:
        return self.read_result(self._call(*self.hand(inputs), **kw), shape, inputs[2].shape[-1])

    def read_result(self, result: Any, shape: AttentionShape, dv: int) -> tuple[np.ndarray, np.ndarray | None]:
        """A candidate's result as (out (B, H, Sq, Dv), lse (B, H, Sq) or None), checked against ``shape``."""
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
        out = self.unlayout(out, "output", (b, h, sq, dv))
        if lse is not None and lse.shape != (b, h, sq):
            if lse.shape == (b, h, sq, 1):
                lse = lse[..., 0]
            else:
                msg = f"candidate lse has shape {lse.shape}, expected (B, H, Sq) = {(b, h, sq)}"
                raise CandidateError(msg)
        return out, lse

    def evaluate(self, case: _Case) -> dict[str, Any]:
        """Candidate, float64 reference and plain same-dtype baseline for one case (cached); an error of the
        candidate is kept as ``"error"``, with the reproduction of its call."""
        if case.name not in self._cache:
            entry = self._expected(case)
            try:
                entry.update(self._got(case, entry))
            except CandidateError as exc:
                exc.reproduction = self.snippet(case, None, self.first)  # type: ignore[attr-defined]
                entry["error"] = exc
            self._cache[case.name] = entry
        return self._cache[case.name]

    def evaluated(self, case: _Case) -> dict[str, Any]:
        """:meth:`evaluate`, raising the candidate's error."""
        e = self.evaluate(case)
        if "error" in e:
            raise e["error"]
        return e

    def _expected(self, case: _Case) -> dict[str, Any]:
        inputs = self.inputs(case)
        ref_out, ref_lse = self.reference(case, inputs)
        q_pos, k_pos = self.positions(case.shape)
        base_out, base_lse = _plain_outputs(self.plain(case, inputs, q_pos, k_pos))
        if self.sequential_baseline():
            seq_out, seq_lse = _plain_outputs(self.plain(case, inputs, q_pos, k_pos, sequential=True))
            base_out, base_lse = worse_of(ref_out, base_out, seq_out), worse_of(ref_lse, base_lse, seq_lse)
        return {
            "inputs": inputs,
            "ref_out": ref_out,
            "ref_lse": ref_lse,
            "base_out": base_out,
            "base_lse": base_lse,
            "empty": ~np.isfinite(ref_lse),
            "q_pos": q_pos,
            "k_pos": k_pos,
        }

    def _got(self, case: _Case, e: dict[str, Any]) -> dict[str, Any]:
        out, lse = self.call(e["inputs"], case.shape)
        return {"out": out, "lse": lse}

    def snippet(self, case: _Case, index: tuple[int, ...] | None, what: str = "output") -> str:
        return _repro.attention_snippet(
            self.candidate,
            self.target,
            self.bias64,
            case.shape,
            dtype=self.dtype,
            seed=self.seed,
            xp_name=self.xp_name,
            options=self.reference_options(),
            index=index,
            with_lse=self.with_lse,
            what=what,
            layout=self.options.layout,
        )

    # -- checks --------------------------------------------------------------------------------------------
    def _tol(self, ref: np.ndarray, bases: Iterable[np.ndarray], rows: np.ndarray) -> Any:
        """The attention rule on the entries ``rows`` selects, with the largest error of the plain ``bases``."""
        sel = np.broadcast_to(rows, ref.shape) if rows.ndim < ref.ndim else rows
        base_err = max(float(np.max(abs_errors(base, ref)[sel], initial=0.0)) for base in bases)
        mag = max(1.0, float(np.max(np.abs(ref[sel & np.isfinite(ref)]), initial=0.0)))
        return attention_tolerance(self.dtype, base_err, mag, rtol=self.rtol, atol=self.atol)

    def _where(self, what: str, idx: tuple[int, ...], e: dict[str, Any]) -> dict[str, Any]:
        """The context of a mismatch at ``idx`` of the array ``what`` (the query position of an output row)."""
        return {"q_pos": int(e["q_pos"][idx[2]])}

    def _compared(
        self,
        name: str,
        summary: str,
        e: dict[str, Any],
        what: str,
        cand: np.ndarray,
        ref: np.ndarray,
        sel: Any,
        tol: Any,
    ) -> tuple[CheckResult, np.ndarray]:
        """The result of ``cand`` (the array ``what`` of evaluation ``e``) against ``ref`` on ``sel`` under ``tol``,
        with its first mismatch when it fails; and the elementwise bound."""
        err = np.where(sel, abs_errors(cand, ref), 0.0)
        bound = tol.atol + tol.rtol * np.abs(np.where(np.isfinite(ref), ref, 0.0))
        bad = sel & (err > bound)
        res = CheckResult(
            name,
            not bool(bad.any()),
            summary=summary,
            max_abs=float(np.max(err, initial=0.0)),
            max_rel=_max_rel(err, ref, sel),
            bound=float(np.max(np.where(sel, bound, 0.0), initial=0.0)),
            tolerance=tol.text,
        )
        if not res.passed:
            idx = _first(bad)
            res.mismatch = {
                "index": idx,
                **self._where(what, idx, e),
                "candidate": _f(cand[idx]),
                "reference": _f(ref[idx]),
            }
        return res, bound

    def values_checks(self, describe: Callable[[_Case], str] = lambda c: f"{c.shape}") -> list[Check]:
        """One output check per case (and one lse check with ``with_lse``), unrun; ``describe`` the case's text."""
        kinds = (("output", False), ("lse", True)) if self.with_lse else (("output", False),)
        return [
            Check(
                f"{self.label}.{what}.{c.name}",
                f"{what} of {describe(c)}",
                lambda c=c, e=e: self.values_check(c, lse=e),
                self,
            )
            for c in self.cases.values()
            for what, e in kinds
        ]

    def values_check(self, case: _Case, *, lse: bool) -> CheckResult:
        name = f"{self.label}.{'lse' if lse else 'output'}.{case.name}"
        e = self.evaluated(case)
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
        n_empty = int(e["empty"].sum())
        summary = f"{'log-sum-exp' if lse else 'output'} of case {case.name} {tuple(case.shape)}" + (
            f"; {n_empty} fully masked rows left to the fully_masked check" if n_empty else ""
        )
        what = "lse" if lse else "output"
        res, bound = self._compared(name, summary, e, what, cand, ref, sel, self._tol(ref, [base], sel))
        if not res.passed:
            res.diagnosis = self.diagnose(case, e, cand, sel, bound, lse=lse)
            res.reproduction = self.snippet(case, res.mismatch["index"], what)
        return res

    def hypotheses(self, case: _Case, e: dict[str, Any]) -> list[tuple[str, Callable[[], tuple[np.ndarray, ...]]]]:
        sh = case.shape
        inputs = e["inputs"]
        q_pos, k_pos = e["q_pos"], e["k_pos"]
        hyps: list[tuple[str, Callable[[], tuple[np.ndarray, ...]]]] = []

        def under(label: str, **over: Any) -> None:
            """The hypothesis ``label``: the reference with the options ``over``; with ``rows`` (queries that keep their
            positions alone) only theirs, or None where the options move them."""

            def run(rows: slice = slice(None)) -> tuple[np.ndarray, ...] | None:
                if rows != slice(None) and "align" in over:
                    return None
                cut = {n: a[..., rows, :] if isinstance(a, np.ndarray) else a for n, a in over.items()}
                return self.reference(case, (inputs[0][:, :, rows], *inputs[1:]), **cut)

            hyps.append((label, run))

        other = "top_left" if self.align == "bottom_right" else "bottom_right"
        # Bias-level hypotheses first: attention is blind to a per-row constant, so a wrong bias can also look like a
        # shifted query position; the bias explanation is the more specific one.
        if self.bias64 is not None:
            for label, alt in diagnose.bias_hypotheses(self.bias64, q_pos, k_pos, positions=False, keep=self.keep(sh)):
                under(label, bias=alt[None])
        for label, run in diagnose.feature_hypotheses(self, case, e):  # window, softcap, lengths, segments, pages
            hyps.append((label, run))
        if sh.q_len != sh.k_len:
            what = (
                "top-left (PyTorch SDPA is_causal=True, xformers LowerTriangularMask)"
                if other == "top_left"
                else "bottom-right (FlashAttention >= 2.1, KV-cache decoding)"
            )
            under(f"{what} alignment instead of {self.align} for Sq != Sk", align=other)
        if self.bias64 is not None and self.scale_of(sh) != 1.0:
            op = "pre_scale" if self.placement == "post_scale" else "post_scale"
            form = "(QK^T + b) * scale" if op == "pre_scale" else "QK^T * scale + b"
            under(
                f"bias on the wrong side of the scale: {op} (softmax({form})) instead of {self.placement}", placement=op
            )
        if self.causal:
            next_mask = np.asarray(causal_mask(np.asarray(q_pos) + 1, k_pos))
            under("causal mask lets in the next key (k_pos <= q_pos + 1: off by one)", causal=False, mask=next_mask)
            under("no causal mask applied", causal=False)
        else:
            under("a causal mask was applied although causal=False", causal=True)
        if self.bias64 is not None:
            under("bias ignored", bias=None)
        if self.scale is None:
            under("no 1/sqrt(d) scale (scale = 1, as T5)", scale=1.0)
        elif abs(self.scale - 1 / math.sqrt(sh.head_dim)) > 1e-12:
            under(f"default scale 1/sqrt(d) used instead of scale={self.scale}", scale=None)
        if sh.kv_heads < sh.heads:

            def interleaved(rows: slice = slice(None)) -> tuple[np.ndarray, ...]:
                q, k, v = inputs
                sel = [h % sh.kv_heads for h in range(sh.heads)]
                return self.reference(case, (q[:, :, rows], k[:, sel], v[:, sel]))

            tiled = "grouped-query heads tiled: h % H_kv (as x-transformers' Attend) instead of h // (H / H_kv)"
            hyps.append((tiled, interleaved))
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

        def fits(alts: tuple[np.ndarray, ...], rows: slice = slice(None)) -> bool:
            alt, grow = alts[1 if lse else 0], diagnose.logit_growth(alts[1], e["ref_lse"][:, :, rows])
            ok, err = sel[:, :, rows] & np.isfinite(alt), abs_errors(cand[:, :, rows], alt)
            return ok.sum() >= 0.5 * sel[:, :, rows].sum() and bool(np.all((err <= grow * bound[:, :, rows])[ok]))

        def low(lower: str) -> np.ndarray:  # the plain computation from the inputs rounded to the lower dtype
            rounded = [round_to(a, lower) for a in e["inputs"]]
            return _plain_outputs(self.plain(case, rounded, e["q_pos"], e["k_pos"], lower))[1 if lse else 0]

        # A hypothesis is first tried on the 8 queries that keep their positions alone, then on the whole case.
        rows = slice(-8, None) if self.align == "bottom_right" else slice(0, 8)
        quick = lambda fn: (part := fn(rows)) is None or fits(part, rows)  # noqa: E731
        memo, one = self._cache.setdefault("diagnosed", {}), case.shape.q_len == 1
        matched, tried = diagnose.fit(memo, case.name, self.hypotheses(case, e), fits, one=one, quick=quick)
        if matched:
            return [*out, diagnose.one_of(matched)]
        text = diagnose.precision_fit(self.dtype, e["ref_lse" if lse else "ref_out"], cand, sel, low)
        return [*out, text] if text else out if tried else [*out, diagnose.UNTRIED]

    def rows_sum_check(self) -> CheckResult:
        """rows_sum_to_one on the suite's cheapest case, in its own shape and head dim (one-hot V probes at q = 0):
        rows sum to 1 within the attention rule on the row sums plus 2u, no negative P, masked keys exactly 0."""
        case = min(self.cases.values(), key=lambda c: (eb.probe_count(c.shape), math.prod(c.shape[:6])))
        sh, (q, k, v), (q_pos, k_pos) = case.shape, self.inputs(case), self.positions(case.shape)
        probs = eb.read_probabilities(lambda q, k, v: self.call((q, k, v), sh)[0], sh, dtype=self.dtype, seed=self.seed)
        seq = {False, self.sequential_baseline()}
        base = [self.plain(case, (0 * q, k, v), q_pos, k_pos, sequential=o) for o in seq]
        rows = ~base[0].empty[..., 0]
        tol = self._tol(np.ones(rows.shape), [np.sum(f.p, axis=-1, dtype=np.float64) for f in base], rows)
        slack = tol.atol + 2 * eb.UNIT_ROUNDOFF[self.dtype]
        found = eb.row_sum_faults(probs, np.isneginf(base[0].z), rows, q_pos, k_pos, slack=slack)
        summary = (
            f"case {case.name} {tuple(sh)}: P read with {eb.probe_count(sh)} one-hot V probes at q = 0: each row "
            "sums to 1, no entry is negative, masked keys get exactly 0"
        )
        text = f"row sums: {tol.text}, plus 2u = {slack - tol.atol:.2g} (a kernel's roundings of P and of O)"
        name, ok = f"{self.label}.rows_sum_to_one", found.worst <= slack
        res = CheckResult(name, ok, summary, found.worst, None, slack, text)
        if not res.passed:
            res.mismatch, res.diagnosis = found.mismatch, found.diagnosis
            res.reproduction = eb.probe_snippet(self.snippet(case, None), 0, shape=sh, dtype=self.dtype, seed=self.seed)
        return res

    def effective_bias_check(self) -> CheckResult:
        """The bias read back through one-hot V probes at q = 0 (``relpos_ref.effective_bias``) on at most two cases
        and ``MAX_PROBE_CALLS`` calls, against the family elementwise up to a row constant; a PNG per case when the
        options have a ``plot_dir``."""
        plan, notes = eb.plan_readout({n: c.shape for n, c in self.cases.items()})
        plot_dir, results = getattr(self.options, "plot_dir", None), []
        opts = {"dtype": self.dtype, "seed": self.seed, "causal": self.causal, "rtol": self.rtol, "atol": self.atol}
        for name, blocks in plan:
            sh, (q_pos, k_pos) = self.cases[name].shape, self.positions(self.cases[name].shape)
            call = lambda q, k, v, sh=sh: self.call((q, k, v), sh)[0]  # noqa: E731
            factor = self.scale_of(sh) if self.placement == "pre_scale" else 1.0
            r = eb.read_effective_bias(call, sh, self.bias64, q_pos, k_pos, blocks=blocks, bias_scale=factor, **opts)
            results.append((name, r))
            if plot_dir is not None:
                notes.append(eb.save_plot(r, plot_dir, f"{self.label}.effective_bias.{name}"))
        s = eb.readout_summary(results, notes)
        res = CheckResult(f"{self.label}.effective_bias", s.passed, s.summary, s.max_error, None, s.bound, s.tolerance)
        res.mismatch, res.diagnosis, res.details = s.mismatch, s.diagnosis, s.details
        if s.worst_case is not None and s.mismatch is not None:
            case, idx = self.cases[s.worst_case], s.mismatch["index"]
            snippet, block = self.snippet(case, idx[:3]), idx[3] // case.shape.head_dim
            res.reproduction = eb.probe_snippet(snippet, block, shape=case.shape, dtype=self.dtype, seed=self.seed)
        return res

    def future_case(self) -> tuple[_Case, int] | None:
        """A case and a query row r with keys after position q_pos[r] to perturb."""
        for case in self.cases.values():
            q_pos, _ = self.positions(case.shape)
            r = case.shape.q_len // 2
            if 0 < int(q_pos[r]) + 1 < case.shape.k_len:
                return case, r
        return None

    def _future(self) -> tuple[_Case, int, np.ndarray, np.ndarray, int, dict[str, Any]]:
        """For causal_future_keys: the case and row of :meth:`future_case`, the positions, the first key position
        after the row's query, and the case's evaluation."""
        found = self.future_case()
        assert found is not None  # the check is only generated when a case has future keys
        case, r = found
        q_pos, k_pos = self.positions(case.shape)
        return case, r, q_pos, k_pos, int(q_pos[r]) + 1, self.evaluated(case)

    def _future_slack(self, refs: Iterable[np.ndarray]) -> float:
        """The bound of causal_future_keys: the dtype's floor times the magnitude of ``refs`` (plus a user atol)."""
        mag = max([1.0] + [float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0)) for a in refs])
        user = 0.0 if self.rtol is None and self.atol is None else (self.atol or 0.0)
        return user + ATTENTION_FLOORS[self.dtype] * mag

    def causal_future_check(self) -> CheckResult:
        case, r, q_pos, k_pos, cut, e = self._future()
        out2, _ = self.call(self.inputs(case, perturb_after=cut), case.shape)
        rows = slice(0, r + 1)
        a, b = e["out"][:, :, rows], out2[:, :, rows]
        diff = float(np.max(abs_errors(a, b), initial=0.0))
        slack = self._future_slack([e["ref_out"]])
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
            res.reproduction = self.snippet(case, None) + (
                f"\n# then add 4 to k[:, :, {cut}:] and subtract 4 from v[:, :, {cut}:]: rows 0..{r} must not change"
            )
        return res

    def alignment_check(self, case: _Case) -> CheckResult:
        sh = case.shape
        e = self.evaluated(case)
        m = max(1, sh.q_len // 2)
        q, k, v = e["inputs"]
        if self.align == "bottom_right":
            part, rows, what = q[:, :, -m:], slice(sh.q_len - m, sh.q_len), f"the last {m} queries alone"
        else:
            part, rows, what = q[:, :, :m], slice(0, m), f"the first {m} queries alone"
        sub = AttentionShape(sh.batch, sh.heads, sh.kv_heads, m, sh.k_len, sh.head_dim, sh.logit_scale)
        out_part, again = self.call((part, k, v), sub)[0], self.call((part, k, v), sub)[0]
        diff = abs_errors(out_part, e["out"][:, :, rows])
        # Both calls are within the case's rule of the reference, so they differ by at most twice it, plus what two
        # identical calls of the candidate differ by (atomics, non-deterministic splits).
        tol = self._tol(e["ref_out"], [e["base_out"]], np.broadcast_to(~e["empty"][..., None], e["ref_out"].shape))
        spread = float(np.max(abs_errors(out_part, again), initial=0.0))
        bound, worst = 2 * tol.atol + spread, float(np.max(diff, initial=0.0))
        res = CheckResult(
            f"{self.label}.alignment_consistency",
            worst <= bound,
            summary=f"case {case.name}: {what} against all keys give the same rows as the full call "
            f"({self.align}: a query keeps its position when the others are dropped, as in KV-cache decoding)",
            max_abs=worst,
            bound=bound,
            tolerance=f"twice the output bound of case {case.name} plus the spread of two calls ({spread:.3g}): "
            + tol.text,
        )
        if not res.passed:
            idx = _first(diff > bound)
            res.mismatch = {"index": idx, "candidate": _f(out_part[idx]), "reference": _f(e["out"][:, :, rows][idx])}
            other = "top_left" if self.align == "bottom_right" else "bottom_right"
            alt = self.reference(_Case("part", sub), (part, k, v), align=other)[0]
            fits = bool(np.all(abs_errors(out_part, alt) <= tol.atol + spread))
            res.diagnosis.append(diagnose.alignment_text(fits, self.align, m, worst))
        return res

    def _masked_mismatch(
        self, e: dict[str, Any], cand: np.ndarray, full: np.ndarray
    ) -> tuple[tuple[int, ...] | None, dict[str, Any] | None]:
        """The first entry of ``cand`` on rows that see no key (``full``) that breaks the fully_masked convention."""
        zero = self.fully_masked == "zero"
        idx = _first(full & ~((cand == 0) if zero else np.isnan(cand)))
        if idx is None:
            return None, None
        ref = 0.0 if zero else "nan"
        return idx, {"index": idx, "q_pos": int(e["q_pos"][idx[2]]), "candidate": _f(cand[idx]), "reference": ref}

    @staticmethod
    def _seen_keys(
        alts: Iterable[tuple[str, np.ndarray | None]], cand: np.ndarray, full: Any, atol: float
    ) -> list[str]:
        """The first hypothesis (label, its array) under which the rows that see no key (``full``) match."""
        for label, alt in alts:
            if alt is not None and np.isfinite(alt[full]).all() and np.all(abs_errors(cand, alt)[full] <= atol):
                return [f"these queries see keys in the candidate: {label}"]
        return []

    def fully_masked_check(self, case: _Case) -> CheckResult:
        e = self.evaluated(case)
        empty = e["empty"]
        zero = self.fully_masked == "zero"
        out = e["out"][empty]
        ok_out = np.all(out == 0) if zero else np.all(np.isnan(out))
        ok_lse = True
        lse_vals = None
        if self.with_lse and e["lse"] is not None:
            lse_vals = e["lse"][empty]
            ok_lse = bool(np.all(lse_vals == -np.inf)) if zero else bool(np.all(np.isnan(lse_vals)))
        n = int(empty.sum())
        res = CheckResult(
            f"{self.label}.fully_masked_rows",
            bool(ok_out and ok_lse),
            summary=f"case {case.name}: {n} query rows see no key; expected output {'zeros' if zero else 'NaN'}"
            + (f" and lse {'-inf' if zero else 'NaN'}" if self.with_lse else ""),
        )
        if not res.passed:
            full = np.broadcast_to(empty[..., None], e["out"].shape)
            idx, res.mismatch = self._masked_mismatch(e, e["out"], full)
            if zero and np.isnan(out).any():
                res.diagnosis.append(
                    "NaN instead of zeros for fully masked rows (naive softmax of an all -inf row, as PyTorch SDPA "
                    "before 2.5); fully_masked='nan' describes this convention"
                )
            v = e["inputs"][2].astype(np.float64)
            group = e["out"].shape[1] // v.shape[1]
            mean_v = np.repeat(np.mean(v, axis=2), group, axis=1)  # (B, H, Dv)
            mean_rows = np.broadcast_to(mean_v[:, :, None, :], e["out"].shape)[empty]
            if not ok_out and out.size and np.allclose(out, mean_rows, rtol=1e-2, atol=1e-2):
                res.diagnosis.append(
                    "fully masked rows give the mean of V: a finite mask value (finfo.min, -1e4) makes the row "
                    "uniform over the masked keys instead of empty"
                )
            if not ok_out and not res.diagnosis and not np.isnan(out).any():  # the output itself is wrong
                tol = self._tol(e["ref_out"], [e["base_out"]], ~full)
                alts = ((label, fn()[0]) for label, fn in self.hypotheses(case, e))
                res.diagnosis += self._seen_keys(alts, e["out"], full, tol.atol)
            if lse_vals is not None and not ok_lse:
                if np.all(lse_vals == np.inf):
                    res.diagnosis.append(
                        "lse = +inf for empty rows (FlashAttention's convention); relpos_ref uses "
                        "-inf, the log of an empty sum"
                    )
                else:
                    res.details.append(f"lse of empty rows: {np.unique(lse_vals)[:4].tolist()}")
            res.reproduction = self.snippet(case, idx)
        return res

    #: The repeatable check's summary (``{names}``: the arrays compared) and its two diagnoses.
    repeat_texts: ClassVar[tuple[str, str, str]] = (
        "two calls give bitwise identical outputs and leave q, k, v unchanged",
        "two calls on the same inputs returned different outputs (non-deterministic reduction order or uninitialised "
        "memory)",
        "the candidate modified q, k or v in place",
    )

    def _two_calls(self, args: tuple[Any, ...]) -> list[dict[str, np.ndarray]]:
        """The results of two calls by name, converted after both calls."""
        results = [self._call(*args), self._call(*args)]
        return [{"output": _as_float_array(r[0] if self.with_lse else r, "candidate output")[0]} for r in results]

    def repeat_reference(self, case: _Case, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The reference of the array ``name`` of two repeated calls on ``case``, the entries compared and their
        bound: those of the values check."""
        e = self.evaluated(case)
        ref, sel = e["ref_out"], np.broadcast_to(~e["empty"][..., None], e["ref_out"].shape)
        tol = self._tol(ref, [e["base_out"]], sel)
        return ref, sel, tol.atol + tol.rtol * np.abs(np.where(np.isfinite(ref), ref, 0.0))

    def repeatable_check(self) -> CheckResult:
        case = next(iter(self.cases.values()))
        inputs = self.call_inputs(case)
        copies = tuple(a.copy() for a in inputs)
        args = self.hand(inputs)
        host_before = [to_host(a)[0] for a in args]
        g1, g2 = self._two_calls(args)
        same = set(g1) == set(g2) and all(_identical(g1[n], g2[n]) for n in g1)
        host_after = [to_host(a)[0] for a in args]
        untouched = all(np.array_equal(a, b) for a, b in zip(host_before, host_after, strict=True)) and all(
            np.array_equal(a, b) for a, b in zip(copies, inputs, strict=True)
        )
        summary, differ, modified = self.repeat_texts
        ok = same
        details = []
        if not same and not self.options.deterministic and set(g1) == set(g2):
            # Not bitwise: still correct when both calls meet the values check's tolerance on this case.
            ok = True
            for n in g1:
                ref, sel, bound = self.repeat_reference(case, n)
                if g1[n].shape != ref.shape or g2[n].shape != ref.shape:
                    ok = False
                    continue
                worst = max(float(np.max(np.where(sel, abs_errors(g, ref) - bound, -np.inf))) for g in (g1[n], g2[n]))
                ok &= worst <= 0
                spread = float(np.max(np.where(sel, abs_errors(g1[n], g2[n]), 0.0), initial=0.0))
                details.append(f"{n}: two calls differ by up to {spread:.3g}")
            verdict = f"both calls are within the tolerance of case {case.name}" if ok else "a call is not"
            details.append(f"not bitwise deterministic; {verdict} (deterministic=True requires the same bits)")
        res = CheckResult(f"{self.label}.repeatable", ok and untouched, summary=summary.format(names=", ".join(g1)))
        res.details.extend(details)
        if not ok:
            res.diagnosis.append(differ)
        if not untouched:
            res.diagnosis.append(modified)
        return res

    # -- the checks that apply ------------------------------------------------------------------------------
    def future_checks(self, description: str) -> list[Check]:
        """causal_future_keys, or a note saying why it does not apply."""
        if self.causal and self.future_case() is not None:
            return [Check(f"{self.label}.causal_future_keys", description, self.causal_future_check, self)]
        self.notes.append(
            "causal_future_keys: " + ("causal=False" if not self.causal else "no case has keys after a query")
        )
        return []

    def masked_checks(self, description: str) -> list[Check]:
        """fully_masked_rows on the first case with a query that sees no key, or a note saying there is none."""
        masked = [c for c in self.cases.values() if self.has_empty_rows(c)]
        if masked:
            return [
                Check(f"{self.label}.fully_masked_rows", description, lambda: self.fully_masked_check(masked[0]), self)
            ]
        self.notes.append(
            "fully_masked_rows: no case has a query that sees no key (needs causal, bottom_right, Sq > Sk)"
        )
        return []

    def has_empty_rows(self, case: _Case) -> bool:
        keep = self.keep(case.shape)
        if keep is not None and not keep.any(axis=-1).all():
            return True
        if isinstance(self.bias64, TensorBias):
            arr = np.asarray(self.bias64.parameters()["array"])
            return bool(np.any(np.all(arr == -np.inf, axis=-1)))
        return False


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
    level: str = "default",
    layout: str = "bhsd",
    head_dims: Sequence[int] | None = None,
    max_q_len: int | None = None,
    max_k_len: int | None = None,
    gqa: bool = True,
    timeout: float | None = None,
    plot_dir: str | None = None,
    deterministic: bool = False,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    varlen: bool = False,
    segments: bool = False,
    segment_positions: str = "global",
    label: str = "attention",
) -> list[Check]:
    """The checks of :func:`check_attention`, unrun."""
    _AttentionSuite.check_candidate(candidate)
    options = AttentionOptions.of(locals())
    return _attention_checks(candidate, options, label=label)


def _attention_checks(candidate: Any, options: AttentionOptions, *, label: str = "attention") -> list[Check]:
    """The forward checks of ``candidate`` under ``options``, unrun."""
    s = _AttentionSuite(candidate, options, label=label)
    checks = s.values_checks()
    checks.append(Check(f"{label}.rows_sum_to_one", "probabilities via one-hot V probes", s.rows_sum_check, s))
    if s.bias64 is not None and s.window is None:
        checks.append(Check(f"{label}.effective_bias", "the bias read back at q = 0", s.effective_bias_check, s))
    elif s.bias64 is not None:
        s.notes.append("effective_bias: not checked with a window (the readout knows only the causal mask)")
    else:
        s.notes.append("effective_bias: no bias family to compare with")
    checks += s.future_checks("independence from future keys")
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
    checks += s.masked_checks("rows with no visible key")
    checks.append(Check(f"{label}.repeatable", "deterministic, inputs unchanged", s.repeatable_check, s))
    if (options.varlen or options.segments) and not FEATURE_CHECKS:  # never a silent pass: features.py registers
        raise RuntimeError("varlen, segments: relpos_ref.conformance.features is not loaded")
    return checks + [c for hook in FEATURE_CHECKS for c in hook(candidate, options, label=label)]


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
    level: str = "default",
    layout: str = "bhsd",
    head_dims: Sequence[int] | None = None,
    max_q_len: int | None = None,
    max_k_len: int | None = None,
    gqa: bool = True,
    timeout: float | None = None,
    plot_dir: str | None = None,
    deterministic: bool = False,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    varlen: bool = False,
    segments: bool = False,
    segment_positions: str = "global",
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
        Replace the kernel-shaped cases of ``level`` (the report's "cases" line lists them, each with its purpose).
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
    level : {"quick", "default", "thorough"}
        The kernel-shaped case set (:func:`relpos_ref.cases.kernel_cases`): sizes one past or short of multiples of
        the usual tile widths, several key tiles per row, Sq != Sk both ways, decode against thousands of keys, a
        chunked prefill, offsets past 2048, grouped-query heads, head dims 64 and 128. "quick" is a smoke test,
        "thorough" a nightly run.
    layout : {"bhsd", "bshd"}
        The candidate's layout of q, k, v and its results: (B, H, S, D) (PyTorch SDPA) or (B, S, H, D)
        (FlashAttention, xformers, vLLM). A log-sum-exp is (B, H, Sq) in both.
    head_dims, max_q_len, max_k_len, gqa
        What the candidate accepts: its head dims, its longest query and key lengths, and whether it takes fewer kv
        heads than query heads. Cases are drawn inside these; the report's notes say what that left uncovered.
    timeout : float, optional
        Seconds one candidate call may take before the check is an error (default: the harness's generous limit).
    plot_dir : str or path, optional
        Where the effective-bias check writes its heatmaps (effective minus reference bias per head, PNG).
    deterministic : bool
        Require two calls on the same inputs to return the same bits (``repeatable``). By default a second call
        need only meet the tolerance too, as atomic-add reductions (FlashAttention's backward, FlexAttention's
        captured-parameter gradients) make correct kernels differ call to call; the report says when they did.
    window : (left, right), optional
    softcap : float, optional
        Fixed for the candidate (FlashAttention's ``window_size=``, ``softcap=``): ``candidate(q, k, v)`` applies
        them itself; the reference and the plain baseline apply them as :func:`relpos_ref.attention` does.
    varlen : bool
        Add ragged batches: ``candidate(q, k, v, q_lens=..., k_lens=...)`` with padded (B, H, S, D) tensors and
        (B,) int32 lengths; padding query rows must come out 0 (:mod:`relpos_ref.conformance.features`).
    segments, segment_positions
        Add packed sequences: ``candidate(q, k, v, q_segment_ids=..., k_segment_ids=...)``, (B, S) int32, with
        positions ``"global"`` or ``"restart"`` per segment.

    Returns
    -------
    Report
    """
    _AttentionSuite.check_candidate(candidate)
    options = AttentionOptions.of(locals())
    return run_checks(_attention_checks(candidate, options), expected_failures=expected_failures)
