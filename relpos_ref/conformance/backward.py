"""Attention gradients against ``relpos_ref.attention_vjp`` in float64: ``check_attention_backward`` and
``attention_backward_checks``.

The candidate is ``candidate(q, k, v, d_out)``: the vector-Jacobian product of its attention for the output cotangent
``d_out``. The suite reuses the forward harness's cases, positions, masks and hypotheses
(:mod:`relpos_ref.conformance.attention`); every hypothesis is recomputed here as a float64 vjp, so a convention that
explains a wrong gradient is named the same way as in the forward reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .._host import abs_errors, numpy_dtype, round_to
from ..bounds.model import unit_roundoff
from ..families import BiasFamily, T5Bias, TensorBias
from ..gradients import attention_vjp
from ..positions import causal_mask
from . import diagnose
from ._core import CandidateError, Check, _as_float_array, _f, _first, run_checks
from ._repro import GRADS as _CORE
from .attention import AttentionShape, _AttentionSuite, _Case, attention_inputs
from .options import AttentionOptions
from .report import CheckResult, Report
from .tolerance import _plain_backward

__all__ = ["attention_backward_checks", "backward_inputs", "check_attention_backward"]


def backward_inputs(
    shape: AttentionShape, *, dtype: str = "float32", seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The seeded q, k, v and output cotangent d_out (NumPy, in ``dtype``) the backward harness hands over.

    q, k, v are those of :func:`attention_inputs`; d_out (B, H, Sq, Dv) is standard normal from a stream of its own.
    """
    shape = AttentionShape(*shape)
    q, k, v = attention_inputs(shape, dtype=dtype, seed=seed)
    rng = np.random.default_rng([seed, *[int(x) for x in shape[:6]], round(shape.logit_scale * 1000), 1])
    d_out = rng.standard_normal((*q.shape[:3], v.shape[-1]))
    return q, k, v, d_out.astype(numpy_dtype(dtype))


class _BackwardSuite(_AttentionSuite):
    signature = "candidate(q, k, v, d_out)"
    rule = "backward"
    first = "dq"
    repeat_texts = (
        "two calls give bitwise identical gradients ({names}) and leave q, k, v, d_out unchanged",
        "two calls on the same inputs returned different gradients (non-deterministic reduction order, atomics, or "
        "uninitialised memory)",
        "the candidate modified q, k, v or d_out in place",
    )

    def __init__(self, candidate: Any, options: AttentionOptions, *, label: str) -> None:
        # The candidate returns gradients, never an lse: the forward's with_lse does not apply.
        super().__init__(candidate, replace(options, with_lse=False) if options.with_lse else options, label=label)
        self.param_names = tuple(self.bias64.parameters()) if self.bias64 is not None else ()
        self._d_out: dict[str, np.ndarray] = {}
        self._hyp: dict[tuple[str, str], Any] = {}

    def header(self) -> dict[str, Any]:
        head = super().header()
        head["reference"] = f"relpos_ref.attention_vjp in float64, bias={self.bias!r}"
        head["kind"] = "attention backward candidate(q, k, v, d_out) -> (dq, dk, dv) or a mapping with dq, dk, dv" + (
            f" and optionally {', '.join(self.param_names)}" if self.param_names else ""
        )
        head["setup"] = head["setup"].replace("inputs ", "inputs and d_out ")
        return head

    # -- data ----------------------------------------------------------------------------------------------
    def call_inputs(self, case: _Case) -> tuple[np.ndarray, ...]:
        return backward_inputs(case.shape, dtype=self.dtype, seed=self.seed)

    def reference_options(self) -> dict[str, Any]:
        """The keywords but the bias of ``relpos_ref.attention_vjp``: the forward's and ``fully_masked``."""
        return {**self.ref_options(), "fully_masked": self.fully_masked}

    def reference(self, case: _Case, inputs: tuple[np.ndarray, ...], **over: Any) -> dict[str, Any]:
        """The float64 vjp on ``inputs`` (q, k, v) and the case's d_out, with options overridden by ``over``.

        k and v with one head per query head come from the forward's grouped-query hypothesis, which builds them
        with the mapping h % H_kv; their gradients are folded back onto the key/value heads the same way.
        """
        q, k, v = (a.astype(np.float64) for a in inputs[:3])
        opts = {"bias": self.bias64, **self.reference_options(), **over}
        g = attention_vjp(q, k, v, self._d_out[case.name], **opts)
        dk, dv = np.asarray(g.dk), np.asarray(g.dv)
        nkv = case.shape.kv_heads
        if dk.shape[1] != nkv:
            dk, dv = (np.stack([x[:, h::nkv].sum(axis=1) for h in range(nkv)], axis=1) for x in (dk, dv))
        out = {"dq": np.asarray(g.dq), "dk": dk, "dv": dv}
        if isinstance(g.dbias, dict):
            out.update({n: np.asarray(a) for n, a in g.dbias.items()})
        return out

    def call(self, inputs: tuple[np.ndarray, ...], shape: AttentionShape) -> dict[str, np.ndarray]:
        return self._parse(self._call(*self.hand(inputs)))

    def _two_calls(self, args: tuple[Any, ...]) -> list[dict[str, np.ndarray]]:
        return [self._parse(self._call(*args)) for _ in range(2)]

    def _parse(self, result: Any) -> dict[str, np.ndarray]:
        """The candidate's gradients by name; None entries count as not returned (their checks are not checked).

        A result with no gradient at all (every entry None, an empty mapping) is a CandidateError: the candidate
        produced nothing, which must not read as a report whose checks merely were not run.
        """
        if isinstance(result, Mapping):
            raw = dict(result)
        elif isinstance(result, tuple | list) and len(result) == 3:
            raw = dict(zip(_CORE, result, strict=True))
        elif (
            isinstance(result, tuple | list)
            and len(result) == 4
            and (result[3] is None or isinstance(result[3], Mapping))
        ):
            raw = dict(zip(_CORE, result[:3], strict=True))
            raw.update(dict(result[3] or {}))
        else:
            what = f"a {type(result).__name__}" + (f" of {len(result)}" if isinstance(result, tuple | list) else "")
            msg = (
                f"candidate returned {what}; expected (dq, dk, dv), (dq, dk, dv, {{parameter: gradient}}) or a "
                "mapping with 'dq', 'dk', 'dv' and optionally the bias parameters' gradients"
            )
            raise CandidateError(msg)
        unknown = sorted(str(n) for n in raw if n not in _CORE and n not in self.param_names)
        if unknown:
            msg = (
                f"candidate returned gradients named {unknown}; expected 'dq', 'dk', 'dv' and the parameter names of "
                f"the bias family ({list(self.param_names) or 'none: the reference has no learned parameters'})"
            )
            raise CandidateError(msg)
        got = {str(n): a for n, a in raw.items() if a is not None}
        if not got:
            names = ", ".join((*_CORE, *self.param_names))
            msg = f"candidate returned no gradient: each of {names} is None or missing"
            raise CandidateError(msg)
        return {n: _as_float_array(a, f"candidate {n}")[0] for n, a in got.items()}

    def _base_params(
        self, db: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray, *, sequential: bool = False
    ) -> dict[str, np.ndarray]:
        """Parameter gradients of the baseline's bias cotangent, reduced in the accumulation dtype and rounded.

        With ``sequential`` the reduction over the keys is a running sum, key by key, of each key's contribution
        (as a kernel that adds each key's or key tile's contribution to its parameter gradients does,
        FlexAttention's score_mod backward); otherwise the family's own (pairwise) reduction."""
        import array_api_compat.numpy as np_xp

        acc = np_xp.float64 if self.dtype == "float64" else np_xp.float32
        fam = self.bias64.astype(acc, xp=np_xp)
        db = np.asarray(db, dtype=acc)
        if sequential and not isinstance(self.bias64, TensorBias):  # a tensor's gradient is its cotangent
            grads: dict[str, Any] = {}
            for j in range(len(k_pos)):
                part = fam.bias_vjp(q_pos, k_pos[j : j + 1], np.ascontiguousarray(db[..., j : j + 1]))
                for n, g in part.items():
                    grads[n] = np.asarray(g) if n not in grads else (grads[n] + np.asarray(g)).astype(acc)
        else:
            grads = fam.bias_vjp(q_pos, k_pos, db)
        nd = numpy_dtype(self.dtype)
        with np.errstate(over="ignore"):  # a float16 overflow is the plain computation's error, and an infinite one
            return {n: np.asarray(g).astype(nd).astype(np.float64) for n, g in grads.items()}

    def _expected(self, case: _Case) -> dict[str, Any]:
        """The float64 reference gradients and outputs, and the plain same-dtype baseline gradients."""
        q, k, v, d_out = self.call_inputs(case)
        self._d_out[case.name] = d_out.astype(np.float64)
        inputs = (q, k, v)
        ref = self.reference(case, inputs)
        ref_out, ref_lse = super().reference(case, inputs)
        q_pos, k_pos = self.positions(case.shape)
        bases = []
        for sequential in (False, True) if self.sequential_baseline() else (False,):
            forward = self.plain(case, inputs, q_pos, k_pos, sequential=sequential)
            for recompute in (False, True):
                base = _plain_backward(forward, self._d_out[case.name], recompute=recompute)
                if self.bias64 is not None:
                    base.update(self._base_params(base["dbias"], q_pos, k_pos, sequential=sequential))
                bases.append(base)
        return {
            "inputs": inputs,
            "d_out": d_out,
            "ref": ref,
            "ref_out": ref_out,
            "bases": bases,
            "empty": ~np.isfinite(ref_lse),
            "q_pos": q_pos,
            "k_pos": k_pos,
        }

    def _got(self, case: _Case, e: dict[str, Any]) -> dict[str, Any]:
        return {"cand": self.call((*e["inputs"], e["d_out"]), case.shape)}

    # -- checks --------------------------------------------------------------------------------------------
    def _grad_tol(self, e: dict[str, Any], name: str, sel: np.ndarray) -> Any:
        """The attention rule with the larger error of the plain backwards (autograd's, FlashAttention-2's); for a
        parameter gradient, at least the error bound of its reduction, entry by entry (:meth:`_reduction_bound`)."""
        tol = self._tol(e["ref"][name], [b[name] for b in e["bases"]], sel)
        if name in _CORE or tol.rule == "user" or isinstance(self.bias64, TensorBias):  # a tensor's: no reduction
            return tol
        red = self._reduction_bound(e, name)
        if not np.any(red > tol.atol):
            return tol
        acc = "float64" if self.dtype == "float64" else "float32"
        text = (
            f"{tol.text}, or per entry the pairwise-summation bound ceil(log2 N) u sum|terms| "
            f"(N = {self._terms(e)} terms, u of the {acc} accumulation) when larger, up to {float(np.max(red)):.3g}"
        )
        return replace(tol, atol=np.maximum(tol.atol, red), text=text)

    def repeat_reference(self, case: _Case, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        e = self.evaluated(case)
        ref, sel = e["ref"][name], self._selection(name, e)
        tol = self._grad_tol(e, name, sel)
        return ref, sel, tol.atol + tol.rtol * np.abs(np.where(np.isfinite(ref), ref, 0.0))

    def _terms(self, e: dict[str, Any]) -> int:
        """Terms in the sum of each parameter gradient entry: the bias entries of one head, B Sq Sk."""
        db = e["bases"][0]["dbias"]
        return int(db.shape[0] * db.shape[-2] * db.shape[-1])

    def _reduction_bound(self, e: dict[str, Any], name: str) -> np.ndarray:
        r"""Per entry of the gradient of ``name``: :math:`\lceil\log_2 N\rceil\,u \sum_{ij} |J_{ij} \bar z_{ij}|`.

        A parameter gradient is a sum over the N bias entries that the parameter moves, whose terms
        :math:`J_{ij} \bar z_{ij}` (J the bias' derivative, :math:`\bar z` the logit cotangent) largely cancel (each
        row of :math:`\bar z` sums to 0). A kernel accumulates them in its own order (by key tile, by atomic adds),
        so its error scales with :math:`\sum|terms|`, not with the result, nor with the plain backward's error, whose
        order is one of many: FlexAttention's float32 slope gradient errs by 0.1 to 5 u :math:`\sum|terms|` over the
        default cases, up to 1.7x the rule's bound without this term. The bound is that of pairwise summation
        (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 2002, eq. (4.6)), the accuracy of a
        well-ordered reduction, which tile-wise accumulation approaches; the sum of absolute terms is the
        family's vjp of :math:`|\bar z|` (exact where each derivative has one sign, as for ALiBi, KERPLE, T5 and
        offset tables; a lower bound, so a tighter rule, for FIRE), with :math:`\bar z` from the plain backward.
        """
        cache = e.setdefault("reduction_bounds", {})
        if name not in cache:
            dz = np.abs(np.nan_to_num(np.asarray(e["bases"][0]["dbias"], dtype=np.float64), nan=0.0))
            sums = self.bias64.bias_vjp(e["q_pos"], e["k_pos"], dz)
            u = unit_roundoff("float64" if self.dtype == "float64" else "float32")  # the accumulation's
            scale = math.ceil(math.log2(self._terms(e))) * u
            cache.update({n: scale * np.abs(np.asarray(g, dtype=np.float64)) for n, g in sums.items()})
        return cache[name]

    def _selection(self, name: str, e: dict[str, Any]) -> np.ndarray:
        ref = e["ref"][name]
        sel = np.isfinite(ref)
        if name == "dq":
            sel &= ~e["empty"][..., None]  # queries that see no key belong to the fully_masked_rows check
        return sel

    def values_check(self, case: _Case, name: str) -> CheckResult:  # type: ignore[override]
        check = f"{self.label}.{name if name in _CORE else 'd' + name}.{case.name}"
        e = self.evaluated(case)
        cand = e["cand"].get(name)
        if cand is None:
            # Nothing to compare is not agreement: "not_checked", which the report never counts as passed.
            what = name if name in _CORE else f"gradient of {name!r}"
            if name not in _CORE:
                note = f"d{name}: the candidate returned no gradient for the parameter {name!r}; not checked"
                if note not in self.notes:
                    self.notes.append(note)
            summary = f"{what} of case {case.name} not returned by the candidate, so not compared"
            return CheckResult(check, False, summary=summary, status="not_checked")
        ref = e["ref"][name]
        sel = self._selection(name, e)
        what = f"{name if name in _CORE else f'gradient of {name!r}'} of case {case.name} {tuple(case.shape)}"
        if cand.shape != ref.shape:
            res = CheckResult(check, False, summary=f"{what}: candidate shape {cand.shape}, expected {ref.shape}")
            res.diagnosis = self.shape_diagnosis(case, e, name, cand)
            res.reproduction = self.snippet(case, None, name)
            return res
        n_empty = int(e["empty"].sum())
        extra = ""
        if n_empty and name == "dq":
            extra = f"; {n_empty} queries see no key, left to the fully_masked check"
        elif not sel.all():
            extra = f"; {int((~sel).sum())} entries NaN in the reference (fully_masked='nan') not compared"
        res, bound = self._compared(check, what + extra, e, name, cand, ref, sel, self._grad_tol(e, name, sel))
        if not res.passed:
            res.diagnosis = self.diagnose_grad(case, e, name, cand, sel, bound)
            res.reproduction = self.snippet(case, res.mismatch["index"], name)
        return res

    def _where(self, what: str, idx: tuple[int, ...], e: dict[str, Any]) -> dict[str, Any]:
        if what == "dq":
            return {"q_pos": int(e["q_pos"][idx[2]])}
        if what in ("dk", "dv"):
            return {"k_pos": int(e["k_pos"][idx[2]])}
        return {"parameter": what}

    def _close(self, cand: np.ndarray, alt: np.ndarray, sel: np.ndarray, bound: Any) -> bool:
        if cand.shape != alt.shape:
            return False
        ok = sel & np.isfinite(alt)
        if ok.sum() < 0.5 * sel.sum() or not ok.any():
            return False
        return bool(np.all((abs_errors(cand, alt) <= bound)[ok]))

    def extra_hypotheses(self, case: _Case, e: dict[str, Any]) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
        """Backward-only conventions: the softmax backward without its row term, a transposed dz, a finite mask."""
        sh = case.shape
        inputs = e["inputs"]
        out: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        delta = np.sum(self._d_out[case.name] * e["ref_out"], axis=-1)
        out.append(
            (
                "softmax backward without its row term: dz = P * dP instead of P * (dP - delta), delta_i = "
                "sum_c dO_ic O_ic (the d_lse/delta term dropped)",
                lambda: self.reference(case, inputs, d_lse=delta),
            )
        )
        if sh.q_len == sh.k_len:
            out.append(("dz transposed: dq = scale * dz^T K and dk = scale * dz Q", lambda: self._transposed(case, e)))

        def finite(additive: bool = True) -> dict[str, Any]:
            """A query that sees no key attends uniformly to every key (the masked logits all equal the mask value);
            added to the logits, its cotangent reaches dq, dk and the bias, through masked_fill only dv."""
            f = self.plain(case, inputs, e["q_pos"], e["k_pos"], "float64")
            g = _plain_backward(f._replace(p=np.where(f.empty, 1.0 / sh.k_len, f.p)), self._d_out[case.name])
            if not additive:
                return {**e["ref"], "dv": g["dv"]}
            params = self.bias64.bias_vjp(e["q_pos"], e["k_pos"], g["dbias"]) if self.bias64 is not None else {}
            return {**g, **{n: np.asarray(a) for n, a in params.items()}}

        if self.fully_masked == "zero" and e["empty"].any():
            what = "a finite mask value (finfo.min, -1e4): queries that see no key attend uniformly to every key"
            fill = f"{what}; with masked_fill/where only dv shows it (added to the logits: dq, dk too)"
            out.append((fill, lambda: finite(False)))
            out.append((f"{what}, and the mask is added to the logits (gradient to dq, dk, dv and the bias)", finite))
        return out

    def _transposed(self, case: _Case, e: dict[str, Any]) -> dict[str, Any]:
        sh = case.shape
        q, k, _ = (a.astype(np.float64) for a in e["inputs"])
        parts = _plain_backward(
            self.plain(case, e["inputs"], e["q_pos"], e["k_pos"], "float64"), self._d_out[case.name]
        )
        group = sh.heads // sh.kv_heads
        dzt = np.swapaxes(parts["dz"], -1, -2)
        tau = self.scale_of(sh)
        kk = np.repeat(k, group, axis=1)
        dk_h = tau * (parts["dz"] @ q)
        out = {
            "dq": tau * (dzt @ kk),
            "dk": np.sum(np.reshape(dk_h, (sh.batch, sh.kv_heads, group, *dk_h.shape[2:])), axis=2),
            "dv": parts["dv"],
        }
        if self.bias64 is not None:
            db = np.sum(dzt, axis=0) * (tau if self.placement == "pre_scale" else 1.0)
            out.update({n: np.asarray(g) for n, g in self.bias64.bias_vjp(e["q_pos"], e["k_pos"], db).items()})
        return out

    def _hypothesis(self, case: _Case, label: str, fn: Callable[[], Any], name: str) -> np.ndarray | None:
        """The gradient ``name`` under one hypothesis (None where it does not apply); the vjp is cached."""
        key = (case.name, label)
        if key not in self._hyp:
            try:
                self._hyp[key] = fn()
            except (ValueError, TypeError):
                self._hyp[key] = None
        return None if self._hyp[key] is None else self._hyp[key].get(name)

    def diagnose_grad(
        self, case: _Case, e: dict[str, Any], name: str, cand: np.ndarray, sel: np.ndarray, bound: Any
    ) -> list[str]:
        ref = e["ref"][name]
        if self.fully_masked == "zero" and e["empty"].any() and np.isnan(cand[sel]).any():
            what = name if name in _CORE else f"the gradient of {name!r}"
            dq = e["cand"].get("dq")
            if name == "dv" and dq is not None and not np.isnan(dq).any():
                return [
                    "NaN in dv only: queries that see no key have NaN probabilities (a naive softmax of an all -inf "
                    "row), which reach dv = P^T dO, while a mask applied with masked_fill/where zeroes their cotangent "
                    "before dq, dk and the bias; neither fully_masked convention (an additive -inf mask gives 'nan')"
                ]
            return [
                f"NaN in {what} where the reference is finite: queries that see no key spread NaN through the "
                "softmax backward (autograd of a naive softmax over an all -inf row); fully_masked='nan' describes "
                "this convention"
            ]
        tau = self.scale_of(case.shape)
        factors: list[tuple[float, str]] = []
        if name in ("dq", "dk") and tau != 1.0:
            other = "K" if name == "dq" else "Q"
            factors.append((1 / tau, f"{name} lacks the softmax scale: dz {other} instead of scale * dz {other}"))
            factors.append((tau, f"{name} has the softmax scale twice (scale^2 * dz {other})"))
        if name not in _CORE:
            if tau != 1.0 and self.placement == "pre_scale":
                factors.append(
                    (
                        1 / tau,
                        "bias gradient missing the scale under pre_scale: z = scale * (q.k + b) gives db = scale * "
                        "dz, the candidate used dz (the post_scale rule)",
                    )
                )
            elif tau != 1.0:
                factors.append(
                    (
                        tau,
                        "bias gradient multiplied by the scale under post_scale: z = scale * q.k + b gives db = dz, "
                        "the candidate used scale * dz (the pre_scale rule)",
                    )
                )
            factors.append(
                (
                    -1.0,
                    f"gradient of {name!r} has the opposite sign (e.g. d/dm of +m|i - j| where the bias is "
                    "-m|i - j|, or a loss taken with the wrong sign)",
                )
            )
        for f, label in factors:
            if self._close(cand, f * ref, sel, bound * max(1.0, abs(f))):
                return [label]
        square_t5 = name == "table" and isinstance(self.bias64, T5Bias) and ref.shape[0] == ref.shape[1]
        if square_t5 and self._close(cand, ref.T, sel, bound):
            return [self._layout_text()]
        hyps = list(self.hypotheses(case, e)) + self.extra_hypotheses(case, e)

        def fits(alt: dict[str, Any]) -> bool:
            return alt.get(name) is not None and self._close(cand, alt[name], sel, bound)

        def low(lower: str) -> np.ndarray:  # the plain backward from the inputs rounded to the lower dtype
            f = self.plain(case, [round_to(a, lower) for a in e["inputs"]], e["q_pos"], e["k_pos"], lower)
            g = _plain_backward(f, round_to(self._d_out[case.name], lower))
            return g[name] if name in _CORE else self._base_params(g["dbias"], e["q_pos"], e["k_pos"])[name]

        memo = self._cache.setdefault("diagnosed", {})
        matched, tried = diagnose.fit(memo, case.name, hyps, fits, one=case.shape.q_len == 1)
        text = diagnose.one_of(matched) if matched else diagnose.precision_fit(self.dtype, ref, cand, sel, low)
        return [text] if text else [] if tried else [diagnose.UNTRIED]

    def _layout_text(self) -> str:
        layout = self.bias64._layout
        other = "buckets_heads" if layout == "heads_buckets" else "heads_buckets"
        return (
            f"T5 table gradient in the {other} layout; the family was built with layout={layout!r} and its table "
            "gradient comes back in that layout (HF nn.Embedding weight: buckets_heads; t5x: heads_buckets)"
        )

    def shape_diagnosis(self, case: _Case, e: dict[str, Any], name: str, cand: np.ndarray) -> list[str]:
        sh = case.shape
        ref = e["ref"][name]
        sel = self._selection(name, e)
        tol = self._grad_tol(e, name, sel)
        if name in ("dk", "dv") and sh.kv_heads < sh.heads and cand.shape == (ref.shape[0], sh.heads, *ref.shape[2:]):
            group = sh.heads // sh.kv_heads
            block = np.sum(np.reshape(cand, (ref.shape[0], sh.kv_heads, group, *ref.shape[2:])), axis=2)
            strided = np.stack([cand[:, h :: sh.kv_heads].sum(axis=1) for h in range(sh.kv_heads)], axis=1)
            head = (
                f"{name} returned per query head (B, H, Sk, D) = {cand.shape} instead of summed onto the "
                f"{sh.kv_heads} key/value heads"
            )
            if self._close(block, ref, sel, tol.atol):
                return [head + ": summed over the query heads h // (H / H_kv) of each kv head it matches; add that sum"]
            if self._close(strided, ref, sel, tol.atol):
                return [head + "; summed with the mapping h % H_kv it matches (grouped-query heads interleaved)"]
            return [head]
        if name == "table" and isinstance(self.bias64, T5Bias) and cand.shape == ref.shape[::-1]:
            text = self._layout_text()
            if self._close(cand.T, ref, sel, tol.atol):
                text += "; transposed, it matches"
            return [text]
        return [f"{name}: shape {cand.shape}, expected {ref.shape}"]

    def causal_future_check(self) -> CheckResult:
        case, r, q_pos, k_pos, cut, e = self._future()
        d_out = e["d_out"].copy()
        d_out[:, :, r + 1 :] = 0
        got = self.call((*e["inputs"], d_out), case.shape)
        missing = [n for n in ("dk", "dv") if n not in got]
        if missing:
            raise CandidateError(f"candidate returned no {', '.join(missing)}")
        tails = {n: got[n][:, :, cut:] for n in ("dk", "dv")}
        worst = max(float(np.max(np.where(np.isnan(t), np.inf, np.abs(t)), initial=0.0)) for t in tails.values())
        slack = self._future_slack([e["ref"][n] for n in ("dk", "dv")])
        res = CheckResult(
            f"{self.label}.causal_future_keys",
            worst <= slack,
            summary=f"case {case.name}: with d_out zero on rows after {r} (query positions > {int(q_pos[r])}), keys "
            f"at positions >= {cut} are seen by no query that has a cotangent: their dk and dv must be zero",
            max_abs=worst,
            bound=slack,
        )
        if not res.passed:
            name = next(n for n in ("dk", "dv") if np.any(~(np.abs(tails[n]) <= slack)))
            t = tails[name]
            idx = _first(~(np.abs(t) <= slack))
            res.mismatch = {"index": (*idx[:2], idx[2] + cut, idx[3]), "array": name, "k_pos": int(k_pos[idx[2] + cut])}
            res.mismatch.update({"candidate": _f(t[idx]), "reference": 0.0})
            leaked = np.flatnonzero(np.any(~(np.abs(t) <= slack), axis=(0, 1, 3)))
            if len(leaked) == 1 and leaked[0] == 0 and np.asarray(causal_mask(q_pos + 1, k_pos)).any():
                res.diagnosis.append("the causal mask lets in the next key (k_pos <= q_pos + 1: off by one)")
            else:
                res.diagnosis.append(
                    "keys after every query with a cotangent get gradient: the causal mask lets future keys in "
                    "(no mask in the backward, or the mask applied to the forward only)"
                )
            res.reproduction = self.snippet(case, None, name) + (
                f"\n# with d_out[:, :, {r + 1}:] = 0, {name}[:, :, {cut}:] must be zero"
            )
        return res

    def fully_masked_check(self, case: _Case) -> CheckResult:
        e = self.evaluated(case)
        dq = e["cand"].get("dq")
        if dq is None:
            raise CandidateError("candidate returned no dq")
        empty = e["empty"]
        if dq.shape != e["ref"]["dq"].shape:
            raise CandidateError(f"candidate dq has shape {dq.shape}, expected {e['ref']['dq'].shape}")
        rows = dq[empty]
        zero = self.fully_masked == "zero"
        ok = bool(np.all(rows == 0)) if zero else bool(np.all(np.isnan(rows)))
        n = int(empty.sum())
        res = CheckResult(
            f"{self.label}.fully_masked_rows",
            ok,
            summary=f"case {case.name}: {n} queries see no key; expected their dq rows "
            + ("zero" if zero else "NaN (fully_masked='nan')"),
        )
        if not ok:
            full = np.broadcast_to(empty[..., None], dq.shape)
            idx, res.mismatch = self._masked_mismatch(e, dq, full)
            if not zero and np.all(rows == 0):
                res.diagnosis.append(
                    "dq rows of queries that see no key are 0, not NaN: the 'zero' convention, or a mask applied with "
                    "masked_fill/where, whose backward zeroes the masked entries' cotangent and stops the NaN of the "
                    "softmax row before dq"
                )
            if zero and np.isnan(rows).any():
                res.diagnosis.append(
                    "NaN instead of zeros in dq of queries that see no key (autograd through a naive softmax of an "
                    "all -inf row, as PyTorch before 2.5); fully_masked='nan' describes this convention"
                )
            elif zero:
                tol = self._grad_tol(e, "dq", ~full)
                if np.allclose(rows, self._uniform_dq(case, e)[empty], rtol=1e-2, atol=1e-2):
                    res.diagnosis.append(
                        "dq of an empty row is that of a uniform row over the masked keys: a finite mask value "
                        "(finfo.min, -1e4) instead of -inf"
                    )
                else:
                    alts = ((label, self._hypothesis(case, label, fn, "dq")) for label, fn in self.hypotheses(case, e))
                    res.diagnosis += self._seen_keys(alts, dq, full, tol.atol)
            res.reproduction = self.snippet(case, idx, "dq")
        return res

    def _uniform_dq(self, case: _Case, e: dict[str, Any]) -> np.ndarray:
        """dq if every query attended to all keys with equal weight (a finite mask value on an empty row)."""
        k, v = (a.astype(np.float64) for a in e["inputs"][1:])
        group = case.shape.heads // case.shape.kv_heads
        kk, vv = (np.repeat(a, group, axis=1) for a in (k, v))
        do = self._d_out[case.name]
        out = np.broadcast_to(np.mean(vv, axis=2, keepdims=True), do.shape)
        dp = do @ np.swapaxes(vv, -1, -2)
        dz = (dp - np.sum(do * out, axis=-1, keepdims=True)) / k.shape[2]
        return self.scale_of(case.shape) * (dz @ kk)


def attention_backward_checks(
    candidate: Callable[..., Any],
    *,
    bias: BiasFamily | None = None,
    causal: bool = False,
    align: str = "bottom_right",
    placement: str = "post_scale",
    scale: float | None = None,
    shapes: Sequence[AttentionShape | tuple[int, ...]] | None = None,
    dtype: str = "float32",
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
    label: str = "backward",
) -> list[Check]:
    """The checks of :func:`check_attention_backward`, unrun."""
    _BackwardSuite.check_candidate(candidate)
    options = AttentionOptions.of(locals())
    return _backward_checks(candidate, options, label=label)


def _backward_checks(candidate: Any, options: AttentionOptions, *, label: str = "backward") -> list[Check]:
    """The gradient checks of ``candidate`` under ``options``, unrun."""
    s = _BackwardSuite(candidate, options, label=label)
    checks: list[Check] = []
    for case in s.cases.values():
        for name in (*_CORE, *s.param_names):
            check = f"{label}.{name if name in _CORE else 'd' + name}.{case.name}"
            desc = f"{name} of {case.shape}" if name in _CORE else f"gradient of {name!r} for {case.shape}"
            checks.append(Check(check, desc, lambda c=case, n=name: s.values_check(c, n), s))
    checks += s.future_checks("zero dk, dv for keys no query sees")
    checks += s.masked_checks("dq of queries with no visible key")
    checks.append(Check(f"{label}.repeatable", "deterministic, inputs unchanged", s.repeatable_check, s))
    return checks


def check_attention_backward(
    candidate: Callable[..., Any],
    *,
    bias: BiasFamily | None = None,
    causal: bool = False,
    align: str = "bottom_right",
    placement: str = "post_scale",
    scale: float | None = None,
    shapes: Sequence[AttentionShape | tuple[int, ...]] | None = None,
    dtype: str = "float32",
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
) -> Report:
    r"""Check an attention backward against :func:`relpos_ref.attention_vjp` in float64.

    Parameters
    ----------
    candidate : callable
        ``candidate(q, k, v, d_out)`` with q (B, H, Sq, D), k and v (B, H_kv, Sk, D) and the output cotangent d_out
        (B, H, Sq, Dv) returns ``(dq, dk, dv)``, ``(dq, dk, dv, {name: gradient})`` (an
        :class:`~relpos_ref.AttentionGrads` is accepted) or a mapping with "dq", "dk", "dv" and optionally the bias
        family's parameter gradients under its constructor argument names ("slopes", "table", "r1", "r2", "w1",
        ...; a T5 table in the layout the family was built with). dk and dv are summed over the query heads that
        share a key/value head. The candidate applies ``bias`` itself. A gradient (dq, dk, dv or a parameter's)
        left out is NOT CHECKED, never counted as passed: ``Report.complete`` is False and ``relpos-ref conform``
        exits 1 unless ``--allow-incomplete``.
    bias : BiasFamily, optional
        The bias the candidate is meant to apply (float64 for the reference). Each of its parameters gets one check
        per case, which compares the candidate's gradient when it returns one.
    causal, align, placement, scale
        Semantics of the reference, as in :func:`relpos_ref.attention`.
    shapes : sequence of AttentionShape, optional
        Replace the kernel-shaped cases of ``level`` (the report's "cases" line lists them, each with its purpose).
    dtype : {"float32", "float64", "float16", "bfloat16"}
        Dtype of q, k, v and d_out handed to the candidate. The reference is computed in float64 on the same
        rounded values; the tolerance is FlashAttention's rule against :func:`plain_attention_vjp` in this dtype,
        per array.
    xp : module or str, optional
        Namespace of the inputs: NumPy by default; "torch", "cupy", "array_api_strict" or the module.
    device : optional
        Device for ``xp`` (e.g. "cuda").
    fully_masked : {"zero", "nan"}
        Convention for a query that sees no key: zero dq row and no contribution elsewhere, or NaN spread as
        autograd of a naive softmax spreads it (the entries NaN in the reference are then left out of the value
        checks).
    rtol, atol : float, optional
        Replace the tolerance rule by ``|c - r| <= atol + rtol * |r|``.
    seed : int
        Seed of the inputs (:func:`backward_inputs` reproduces them).
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

    Returns
    -------
    Report
        Checks ``backward.{dq,dk,dv}.<case>``, ``backward.d<parameter>.<case>``, ``backward.causal_future_keys``
        (keys seen by no query with a cotangent get zero dk and dv), ``backward.fully_masked_rows`` (dq of queries
        that see no key) and ``backward.repeatable``.
    """
    _BackwardSuite.check_candidate(candidate)
    options = AttentionOptions.of(locals())
    return run_checks(_backward_checks(candidate, options), expected_failures=expected_failures)
