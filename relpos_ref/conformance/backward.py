"""Attention gradients against ``relpos_ref.attention_vjp`` in float64: ``check_attention_backward`` and
``attention_backward_checks``.

The candidate is ``candidate(q, k, v, d_out)``: the vector-Jacobian product of its attention for the output cotangent
``d_out``. The suite reuses the forward harness's cases, positions, masks and hypotheses
(:mod:`relpos_ref.conformance.attention`); every hypothesis is recomputed here as a float64 vjp, so a convention that
explains a wrong gradient is named the same way as in the forward reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .._host import abs_errors, numpy_dtype, to_host
from ..attention import attention as ref_attention
from ..families import BiasFamily, T5Bias
from ..gradients import attention_vjp
from ..positions import causal_mask
from . import _repro
from ._arrays import from_host
from ._core import CandidateError, Check, _as_float_array, _f, _first, _max_rel, run_checks
from .attention import (
    AttentionOptions,
    AttentionShape,
    _AttentionSuite,
    _Case,
    _floor,
    _has_empty_rows,
    attention_inputs,
)
from .report import CheckResult, Report
from .tolerance import _plain_backward, attention_tolerance, rule_text

__all__ = ["attention_backward_checks", "backward_inputs", "check_attention_backward"]

_CORE = ("dq", "dk", "dv")


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
        if self.rtol is None and self.atol is None:
            head["tolerance rule"] = rule_text("backward")
        return head

    # -- data ----------------------------------------------------------------------------------------------
    def reference(self, case: _Case, inputs: tuple[np.ndarray, ...], **over: Any) -> dict[str, Any]:
        """The float64 vjp on ``inputs`` (q, k, v) and the case's d_out, with options overridden by ``over``.

        k and v with one head per query head come from the forward's grouped-query hypothesis, which builds them
        with the mapping h % H_kv; their gradients are folded back onto the key/value heads the same way.
        """
        q, k, v = (a.astype(np.float64) for a in inputs[:3])
        opts = {"bias": self.bias64, **self.ref_options(), "fully_masked": self.fully_masked, **over}
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
        args = tuple(from_host(a, self.xp_kind, self.xp_mod, self.device) for a in inputs)
        return self._parse(self._call(*args))

    def _parse(self, result: Any) -> dict[str, np.ndarray]:
        """The candidate's gradients by name; None entries count as not returned."""
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
        return {str(n): _as_float_array(a, f"candidate {n}")[0] for n, a in raw.items() if a is not None}

    def _base_params(self, db: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray) -> dict[str, np.ndarray]:
        """Parameter gradients of the baseline's bias cotangent, reduced in the accumulation dtype and rounded."""
        import array_api_compat.numpy as np_xp

        acc = np_xp.float64 if self.dtype == "float64" else np_xp.float32
        fam = self.bias64.astype(acc, xp=np_xp)
        grads = fam.bias_vjp(q_pos, k_pos, np.asarray(db, dtype=acc))
        nd = numpy_dtype(self.dtype)
        with np.errstate(over="ignore"):  # a float16 overflow is the plain computation's error, and an infinite one
            return {n: np.asarray(g).astype(nd).astype(np.float64) for n, g in grads.items()}

    def evaluate(self, case: _Case) -> dict[str, Any]:
        """Candidate, float64 reference and plain same-dtype baseline gradients for one case (cached)."""
        if case.name in self._cache:
            return self._cache[case.name]
        q, k, v, d_out = backward_inputs(case.shape, dtype=self.dtype, seed=self.seed)
        self._d_out[case.name] = d_out.astype(np.float64)
        inputs = (q, k, v)
        ref = self.reference(case, inputs)
        q64, k64, v64 = (a.astype(np.float64) for a in inputs)
        ref_out, ref_lse = ref_attention(q64, k64, v64, bias=self.bias64, return_lse=True, **self.ref_options())
        q_pos, k_pos = self.positions(case.shape)
        bias_arr = None if self.bias64 is None else np.asarray(self.bias64.bias(q_pos, k_pos))[None]
        keep = self.keep(case.shape)
        bases = []
        for recompute in (False, True):
            base = _plain_backward(
                q64, k64, v64, self._d_out[case.name], bias_arr, keep, scale=self.scale_of(case.shape),
                placement=self.placement, dtype=self.dtype, recompute=recompute,
            )  # fmt: skip
            if self.bias64 is not None:
                base.update(self._base_params(base["dbias"], q_pos, k_pos))
            bases.append(base)
        entry: dict[str, Any] = {
            "inputs": inputs,
            "d_out": d_out,
            "ref": ref,
            "ref_out": np.asarray(ref_out),
            "bases": bases,
            "empty": ~np.isfinite(np.asarray(ref_lse)),
            "q_pos": q_pos,
            "k_pos": k_pos,
        }
        try:
            entry["cand"] = self.call((*inputs, d_out), case.shape)
        except CandidateError as exc:
            exc.reproduction = self.snippet(case, None, "dq")  # type: ignore[attr-defined]
            entry["error"] = exc
        self._cache[case.name] = entry
        return entry

    def snippet(self, case: _Case, index: tuple[int, ...] | None, name: str) -> str:
        return backward_snippet(
            self.candidate,
            self.target,
            self.bias64,
            case.shape,
            dtype=self.dtype,
            seed=self.seed,
            xp_name=self.xp_name,
            options={**self.ref_options(), "fully_masked": self.fully_masked},
            name=name,
            index=index,
        )

    # -- checks --------------------------------------------------------------------------------------------
    def _grad_tol(self, e: dict[str, Any], name: str, sel: np.ndarray) -> Any:
        """The attention rule with the larger error of the two plain backwards (autograd's, FlashAttention-2's)."""
        ref = e["ref"][name]
        base_err = max(float(np.max(abs_errors(b[name], ref)[sel], initial=0.0)) for b in e["bases"])
        mag = max(1.0, float(np.max(np.abs(ref[sel & np.isfinite(ref)]), initial=0.0)))
        return attention_tolerance(self.dtype, base_err, mag, rtol=self.rtol, atol=self.atol)

    def _selection(self, name: str, e: dict[str, Any]) -> np.ndarray:
        ref = e["ref"][name]
        sel = np.isfinite(ref)
        if name == "dq":
            sel &= ~e["empty"][..., None]  # queries that see no key belong to the fully_masked_rows check
        return sel

    def _candidate(self, name: str, e: dict[str, Any]) -> np.ndarray | None:
        if "error" in e:
            raise e["error"]
        return e["cand"].get(name)

    def values_check(self, case: _Case, name: str) -> CheckResult:  # type: ignore[override]
        check = f"{self.label}.{name if name in _CORE else 'd' + name}.{case.name}"
        e = self.evaluate(case)
        cand = self._candidate(name, e)
        if cand is None:
            if name in _CORE:
                raise CandidateError(f"candidate returned no {name}")
            note = f"d{name}: the candidate returned no gradient for the parameter {name!r}; not compared"
            if note not in self.notes:
                self.notes.append(note)
            return CheckResult(check, True, summary=f"gradient of {name!r} not returned by the candidate (optional)")
        ref = e["ref"][name]
        sel = self._selection(name, e)
        what = f"{name if name in _CORE else f'gradient of {name!r}'} of case {case.name} {tuple(case.shape)}"
        if cand.shape != ref.shape:
            res = CheckResult(check, False, summary=f"{what}: candidate shape {cand.shape}, expected {ref.shape}")
            res.diagnosis = self.shape_diagnosis(case, e, name, cand)
            res.reproduction = self.snippet(case, None, name)
            return res
        tol = self._grad_tol(e, name, sel)
        err = np.where(sel, abs_errors(cand, ref), 0.0)
        bound = tol.atol + tol.rtol * np.abs(np.where(np.isfinite(ref), ref, 0.0))
        bad = sel & (err > bound)
        n_empty = int(e["empty"].sum())
        extra = ""
        if n_empty and name == "dq":
            extra = f"; {n_empty} queries see no key, left to the fully_masked check"
        elif not sel.all():
            extra = f"; {int((~sel).sum())} entries NaN in the reference (fully_masked='nan') not compared"
        res = CheckResult(
            check,
            not bool(bad.any()),
            summary=what + extra,
            max_abs=float(np.max(err, initial=0.0)),
            max_rel=_max_rel(err, ref, sel),
            bound=float(np.max(np.where(sel, bound, 0.0), initial=0.0)),
            tolerance=tol.text,
        )
        if not res.passed:
            idx = _first(bad)
            res.mismatch = {
                "index": idx,
                **self._where(name, idx, e),
                "candidate": _f(cand[idx]),
                "reference": _f(ref[idx]),
            }
            res.diagnosis = self.diagnose_grad(case, e, name, cand, sel, bound)
            res.reproduction = self.snippet(case, idx, name)
        return res

    def _where(self, name: str, idx: tuple[int, ...], e: dict[str, Any]) -> dict[str, Any]:
        if name == "dq":
            return {"q_pos": int(e["q_pos"][idx[2]])}
        if name in ("dk", "dv"):
            return {"k_pos": int(e["k_pos"][idx[2]])}
        return {"parameter": name}

    def _close(self, cand: np.ndarray, alt: np.ndarray, sel: np.ndarray, bound: Any) -> bool:
        if cand.shape != alt.shape:
            return False
        ok = sel & np.isfinite(alt)
        if ok.sum() < 0.5 * sel.sum() or not ok.any():
            return False
        return bool(np.all((abs_errors(cand, alt) <= bound)[ok]))

    def extra_hypotheses(self, case: _Case, e: dict[str, Any]) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
        """Backward-only conventions: the softmax backward without its row term, a transposed dz."""
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
        return out

    def _transposed(self, case: _Case, e: dict[str, Any]) -> dict[str, Any]:
        sh = case.shape
        q, k, v = (a.astype(np.float64) for a in e["inputs"])
        bias_arr = None if self.bias64 is None else np.asarray(self.bias64.bias(e["q_pos"], e["k_pos"]))[None]
        parts = _plain_backward(
            q, k, v, self._d_out[case.name], bias_arr, self.keep(sh), scale=self.scale_of(sh),
            placement=self.placement, dtype="float64",
        )  # fmt: skip
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

    def _hypothesis(self, case: _Case, label: str, fn: Callable[[], Any]) -> dict[str, Any] | None:
        key = (case.name, label)
        if key not in self._hyp:
            try:
                self._hyp[key] = fn()
            except (ValueError, TypeError):
                self._hyp[key] = None
        return self._hyp[key]

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
        for label, fn in hyps:
            alt = self._hypothesis(case, label, fn)
            if alt is None or alt.get(name) is None:
                continue
            if self._close(cand, alt[name], sel, bound):
                return [label]
        return []

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
        found = self.future_case()
        assert found is not None  # the check is only generated when a case has future keys
        case, r = found
        sh = case.shape
        q_pos, k_pos = self.positions(sh)
        cut = int(q_pos[r]) + 1
        e = self.evaluate(case)
        if "error" in e:
            raise e["error"]
        d_out = e["d_out"].copy()
        d_out[:, :, r + 1 :] = 0
        got = self.call((*e["inputs"], d_out), sh)
        missing = [n for n in ("dk", "dv") if n not in got]
        if missing:
            raise CandidateError(f"candidate returned no {', '.join(missing)}")
        tails = {n: got[n][:, :, cut:] for n in ("dk", "dv")}
        worst = max(float(np.max(np.where(np.isnan(t), np.inf, np.abs(t)), initial=0.0)) for t in tails.values())
        refs = [e["ref"][n] for n in ("dk", "dv")]
        mag = max([1.0] + [float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0)) for a in refs])
        user = 0.0 if self.rtol is None and self.atol is None else (self.atol or 0.0)
        slack = user + _floor(self.dtype) * mag
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
        e = self.evaluate(case)
        dq = self._candidate("dq", e)
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
            idx = _first(full & ~((dq == 0) if zero else np.isnan(dq)))
            res.mismatch = {
                "index": idx,
                "q_pos": int(e["q_pos"][idx[2]]),
                "candidate": _f(dq[idx]),
                "reference": 0.0 if zero else "nan",
            }
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
                    for label, fn in self.hypotheses(case, e):
                        alt = self._hypothesis(case, label, fn)
                        if (
                            alt is not None
                            and np.isfinite(alt["dq"][full]).all()
                            and np.all(abs_errors(dq, alt["dq"])[full] <= tol.atol)
                        ):
                            res.diagnosis.append(f"these queries see keys in the candidate: {label}")
                            break
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

    def repeatable_check(self) -> CheckResult:
        case = next(iter(self.cases.values()))
        inputs = backward_inputs(case.shape, dtype=self.dtype, seed=self.seed)
        copies = tuple(a.copy() for a in inputs)
        args = tuple(from_host(a, self.xp_kind, self.xp_mod, self.device) for a in inputs)
        host_before = [to_host(a)[0] for a in args]
        g1 = self._parse(self._call(*args))
        g2 = self._parse(self._call(*args))
        same = set(g1) == set(g2) and all(
            g1[n].shape == g2[n].shape and bool(np.all((g1[n] == g2[n]) | (np.isnan(g1[n]) & np.isnan(g2[n]))))
            for n in g1
        )
        host_after = [to_host(a)[0] for a in args]
        untouched = all(np.array_equal(a, b) for a, b in zip(host_before, host_after, strict=True)) and all(
            np.array_equal(a, b) for a, b in zip(copies, inputs, strict=True)
        )
        res = CheckResult(
            f"{self.label}.repeatable",
            same and untouched,
            summary=f"two calls give bitwise identical gradients ({', '.join(g1)}) and leave q, k, v, d_out unchanged",
        )
        if not same:
            res.diagnosis.append(
                "two calls on the same inputs returned different gradients (non-deterministic reduction order, "
                "atomics, or uninitialised memory)"
            )
        if not untouched:
            res.diagnosis.append("the candidate modified q, k, v or d_out in place")
        return res


def backward_snippet(
    candidate: Any,
    target: str | None,
    bias: BiasFamily | None,
    shape: Any,
    *,
    dtype: str,
    seed: int,
    xp_name: str,
    options: dict[str, Any],
    name: str,
    index: tuple[int, ...] | None,
) -> str:
    """Python that recomputes one gradient of the candidate and of the reference."""
    args = "q, k, v, d_out"
    hand = f"candidate({args})" if xp_name == "numpy" else f"candidate(*hand_over(({args}), xp={xp_name!r}))"
    opts = ", ".join(f"{k}={v!r}" for k, v in options.items())
    pos = _CORE.index(name) if name in _CORE else 3
    pick = f"result[{pos}]" if name in _CORE else f"result[3][{name!r}]"
    want = f".{name}" if name in _CORE else f".dbias[{name!r}]"
    if name == "table" and isinstance(bias, T5Bias) and bias._layout == "buckets_heads":
        want += ".T  # the reference below is built (heads, buckets); the candidate's layout is (buckets, heads)"
    lines = [
        "import numpy as np",
        "import relpos_ref as rp",
        "from collections.abc import Mapping",
        "from relpos_ref.conformance import AttentionShape, as_numpy, backward_inputs, hand_over",
        _repro.candidate_source(candidate, target),
        f"bias = {_repro.family_source(bias)}",
        f"shape = {shape!r}",
        f"q, k, v, d_out = backward_inputs(shape, dtype={dtype!r}, seed={seed})",
        f"result = {hand}",
        f"got = as_numpy(result[{name!r}] if isinstance(result, Mapping) else {pick})",
        f"want = rp.attention_vjp(*(a.astype(np.float64) for a in (q, k, v, d_out)), bias=bias, {opts}){want}",
    ]
    if index is not None:
        sel = ", ".join(map(str, index[:3]))
        lines.append(f"print(got[{sel}].tolist())")
        lines.append(f"print(want[{sel}].tolist())")
    return "\n".join(lines)


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
    if s.causal and s.future_case() is not None:
        checks.append(
            Check(f"{label}.causal_future_keys", "zero dk, dv for keys no query sees", s.causal_future_check, s)
        )
    else:
        s.notes.append("causal_future_keys: " + ("causal=False" if not s.causal else "no case has keys after a query"))
    masked_cases = [c for c in s.cases.values() if _has_empty_rows(s, c)]
    if masked_cases:
        checks.append(
            Check(
                f"{label}.fully_masked_rows",
                "dq of queries with no visible key",
                lambda: s.fully_masked_check(masked_cases[0]),
                s,
            )
        )
    else:
        s.notes.append("fully_masked_rows: no case has a query that sees no key (needs causal, bottom_right, Sq > Sk)")
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
        share a key/value head. The candidate applies ``bias`` itself. A gradient left out of the mapping fails its
        checks with status "error" (declare them in ``expected_failures`` for a candidate that only computes
        parameter gradients); a parameter gradient left out is not compared, which the report's notes say.
    bias : BiasFamily, optional
        The bias the candidate is meant to apply (float64 for the reference). Each of its parameters gets one check
        per case, which compares the candidate's gradient when it returns one.
    causal, align, placement, scale
        Semantics of the reference, as in :func:`relpos_ref.attention`.
    shapes : sequence of AttentionShape, optional
        Replace the default cases (square, Sq < Sk, decode, grouped-query, Sq > Sk, large logits).
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
