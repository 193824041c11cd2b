"""Bias tensors against a relpos_ref family: ``check_bias`` and ``bias_checks``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import array_api_compat.numpy as np_xp
import numpy as np

from .. import _checks
from .._host import abs_errors, numpy_dtype, round_to
from ..conventions import EQUIVALENCES, FLOAT_DTYPES
from ..families import ALiBi, BiasFamily, T5Bias, TensorBias
from ..positions import causal_mask, positions
from ..properties import offset_only, offset_only_horizon, penalty_monotone
from . import _repro, diagnose
from ._core import (
    CandidateError,
    Check,
    _as_float_array,
    _f,
    _first,
    _identical,
    _max_rel,
    _Options,
    _Suite,
    _target_name,
    _to_numpy64,
    run_checks,
)
from .report import CheckResult, Report
from .tolerance import BIAS_TOLERANCES, _header_rule, bias_bound, bias_tolerance

__all__ = ["bias_checks", "check_bias"]


@dataclass(frozen=True)
class BiasOptions(_Options):
    """What a bias suite is built with, validated once, when the object is made.

    The fields are the keywords of :func:`check_bias` that describe the comparison (all but the candidate,
    ``expected_failures`` and the check ``label``); :func:`bias_checks`, :func:`check_bias` and the CLI make one and
    hand it to the suite. Invalid values raise ``TypeError`` or ``ValueError`` naming the keyword, checked in the
    order of the fields; then a TensorBias reference must have the (Sq, Sk) of ``q_len``, ``k_len``. Derived:
    ``ref64`` (the reference in float64 NumPy).
    """

    reference: BiasFamily
    q_len: int
    k_len: int
    align: str = "bottom_right"
    equivalence: str = "exact"
    causal: bool = False
    dtype: str | None = None
    rtol: float | None = None
    atol: float | None = None
    target: str | None = None
    timeout: float | None = None
    ref64: BiasFamily = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        put, reference = self._put, self.reference
        if not isinstance(reference, BiasFamily):
            msg = (
                "reference: expected a relpos_ref bias family (ALiBi, T5Bias, KerplePower, ...), "
                f"got {type(reference).__name__}"
            )
            raise TypeError(msg)
        put("q_len", _checks.integer("q_len", self.q_len, minimum=1))
        put("k_len", _checks.integer("k_len", self.k_len, minimum=1))
        put("align", _checks.option("align", self.align, ("bottom_right", "top_left")))
        put("equivalence", _checks.option("equivalence", self.equivalence, EQUIVALENCES))
        put("causal", _checks.boolean("causal", self.causal))
        if self.dtype is not None:
            _checks.option("dtype", self.dtype, FLOAT_DTYPES)
        if self.rtol is not None or self.atol is not None:
            bias_tolerance("float64", rtol=self.rtol, atol=self.atol)  # validates
        if self.timeout is not None:
            put("timeout", _checks.real_scalar("timeout", self.timeout, positive=True))
        put("ref64", _to_numpy64(reference))
        if isinstance(reference, TensorBias):
            _, sq, sk = reference.shape
            if (sq, sk) != (self.q_len, self.k_len):
                msg = f"q_len, k_len: expected the TensorBias's (Sq, Sk) = {(sq, sk)}, got {(self.q_len, self.k_len)}"
                raise ValueError(msg)


class _BiasSuite(_Suite):
    signature = "candidate(q_pos, k_pos)"

    def __init__(self, candidate: Any, options: BiasOptions, *, label: str) -> None:
        super().__init__(candidate, options.target, label, timeout=options.timeout)
        o = self.options = options
        self.reference, self.ref64, self.q_len, self.k_len = o.reference, o.ref64, o.q_len, o.k_len
        self.align, self.equivalence, self.causal = o.align, o.equivalence, o.causal
        self.dtype, self.rtol, self.atol = o.dtype, o.rtol, o.atol
        self.seen_dtype: str | None = None

    # -- plumbing ------------------------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        return {
            "candidate": _target_name(self.candidate, self.target),
            "reference": repr(self.reference),
            "kind": "bias tensor (H, Sq, Sk) from absolute positions",
            "setup": (
                f"q_len={self.q_len}, k_len={self.k_len}, align={self.align}, equivalence={self.equivalence}, "
                f"causal={self.causal}"
            ),
            "candidate dtype": self.dtype or self.seen_dtype or "(from the candidate's output)",
            "tolerance rule": _header_rule("bias", self.rtol, self.atol),
        }

    def main_positions(self) -> tuple[np.ndarray, np.ndarray]:
        q, k = positions(self.q_len, self.k_len, align=self.align)
        return np.asarray(q), np.asarray(k)

    def evaluate(self, q_pos: np.ndarray, k_pos: np.ndarray) -> tuple[np.ndarray, str]:
        key = (q_pos.tobytes(), k_pos.tobytes())
        if key not in self._cache:
            out = self._call(q_pos.copy(), k_pos.copy())
            self._cache[key] = _as_float_array(out, "candidate output")
        arr, dt = self._cache[key]
        self.seen_dtype = self.dtype or dt
        expected = (self.ref64.num_heads, len(q_pos), len(k_pos))
        if arr.shape != expected:
            err = CandidateError(f"candidate returned shape {arr.shape}, expected (H, Sq, Sk) = {expected}")
            err.diagnosis = self._shape_diagnosis(arr.shape, expected)  # type: ignore[attr-defined]
            err.reproduction = self.snippet(q_pos, k_pos, None)  # type: ignore[attr-defined]
            raise err
        return arr, dt

    def bias_values(self, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        """The candidate's bias as a ``bias(q_pos, k_pos)`` callable for :mod:`relpos_ref.properties`."""
        return self.evaluate(q_pos, k_pos)[0]

    def _shape_diagnosis(self, got: tuple[int, ...], want: tuple[int, int, int]) -> list[str]:
        h, sq, sk = want
        out = []
        if got == (1, *want):
            out.append("a leading batch axis of size 1 (HF compute_bias returns (1, H, Sq, Sk)): drop it")
        if got == (h, sk, sq) and sq != sk:
            out.append("the query and key axes are swapped")
        if got == (sq, sk, h):
            out.append("the head axis is last; move it first")
        if len(got) == 3 and got[1:] == (sq, sk) and got[0] != h:
            out.append(f"the candidate has {got[0]} heads, the reference {h}")
            ref = self.ref64
            if isinstance(ref, T5Bias) and ref.num_buckets == got[0]:
                out.append(
                    f"the reference T5Bias has {h} heads x {ref.num_buckets} buckets: a (buckets, heads) table "
                    "(HF nn.Embedding weight) was given with layout='heads_buckets'; pass layout='buckets_heads'"
                )
        return out

    def tol_dtype(self, dt: str) -> str:
        return self.dtype or dt

    def keep(self, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        if self.causal:
            return np.asarray(causal_mask(q_pos, k_pos))
        return np.ones((len(q_pos), len(k_pos)), dtype=bool)

    def snippet(self, q_pos: np.ndarray, k_pos: np.ndarray, index: tuple[int, ...] | None) -> str:
        return _repro.bias_snippet(self.candidate, self.target, self.ref64, q_pos, k_pos, index)

    def magnitude(self, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        """The reference's entry magnitudes (``bias_magnitude``) at these positions, in float64."""
        return np.asarray(self.ref64.bias_magnitude(q_pos, k_pos), dtype=np.float64)

    def compare(
        self,
        cand: np.ndarray,
        ref: np.ndarray,
        keep: np.ndarray,
        tdt: str,
        mag: np.ndarray,
        *,
        equivalence: str | None = None,
    ) -> dict[str, Any]:
        """Compare under the suite's equivalence with the tolerance of dtype ``tdt``, elementwise: each entry within
        ``t max(1, m)`` of the reference, m its magnitude ``mag`` (in row_shift also ``|cand|``, whose own rounding
        the candidate's values carry); returns errors, bounds, the first failure and the shift."""
        equivalence = equivalence or self.equivalence
        keep3 = np.broadcast_to(keep, cand.shape)
        shift, tol = None, bias_tolerance(tdt, rtol=self.rtol, atol=self.atol)
        mag = np.abs(ref) if tol.rule == "user" else mag  # the user's rule is relative to |ref|
        if equivalence == "row_shift":
            # The shift of a row is the midrange of cand - ref over its finite compared entries (the constant that
            # minimises the largest residual); infinite entries (a -inf mask in a TensorBias) must match exactly.
            sel = keep3 & np.isfinite(cand) & np.isfinite(ref)
            with np.errstate(invalid="ignore", over="ignore"):
                d = np.where(sel, cand - ref, 0.0)
            ok_rows = sel.any(axis=-1)
            lo = np.min(np.where(sel, d, np.inf), axis=-1)
            hi = np.max(np.where(sel, d, -np.inf), axis=-1)
            shift = np.where(ok_rows, (np.where(ok_rows, lo, 0.0) + np.where(ok_rows, hi, 0.0)) / 2, 0.0)
            err = abs_errors(np.where(sel, cand - shift[..., None], cand), ref)
            shift = np.where(ok_rows, shift, np.nan)
            mag = np.maximum(mag, np.where(np.isfinite(cand), np.abs(cand), 0.0))
        else:
            err = abs_errors(cand, ref)
            if tdt in ("float16", "bfloat16", "float32"):  # a value within t of the dtype's range may round to inf
                with np.errstate(over="ignore", invalid="ignore"):
                    err = np.where(np.isinf(cand) & (cand == round_to(ref * (1 + BIAS_TOLERANCES[tdt]), tdt)), 0, err)
        err = np.where(keep3, err, 0.0)
        bounds = bias_bound(tol, mag)
        bad = keep3 & (err > bounds)
        worst = np.unravel_index(np.argmax(np.where(keep3, err / np.maximum(bounds, 1e-300), -1.0)), err.shape)
        return {
            "passed": not bool(bad.any()),
            "err": err,
            "bad": bad,
            "bounds": bounds,
            "max_abs": float(np.max(err, initial=0.0)),
            "max_rel": _max_rel(err, ref, keep3),
            "bound": float(bounds[worst]) if err.size else tol.atol,
            "tol": tol,
            "shift": shift,
            "index": _first(bad),
        }

    # -- checks --------------------------------------------------------------------------------------------
    def values_check(self, name: str, q_pos: np.ndarray, k_pos: np.ndarray, what: str) -> CheckResult:
        cand, dt = self.evaluate(q_pos, k_pos)
        ref = np.asarray(self.ref64.bias(q_pos, k_pos), dtype=np.float64)
        mag = self.magnitude(q_pos, k_pos)
        keep = self.keep(q_pos, k_pos)
        cmp = self.compare(cand, ref, keep, self.tol_dtype(dt), mag)
        n = int(np.broadcast_to(keep, cand.shape).sum())
        res = CheckResult(
            name,
            cmp["passed"],
            summary=f"{what}: {n} entries{' kept by the causal mask' if self.causal else ''}, "
            f"equivalence={self.equivalence}, candidate dtype {dt}",
            **_figures(cmp),
        )
        if self.equivalence == "row_shift" and cmp["shift"] is not None:
            res.details.append("row shift found: " + self._shift_text(cmp, q_pos))
        if not res.passed:
            idx = cmp["index"]
            res.mismatch = self._mismatch(idx, cand, ref, q_pos, k_pos, cmp["shift"])
            res.diagnosis = self.diagnose(cand, ref, mag, keep, dt, q_pos, k_pos, cmp)
            res.reproduction = self.snippet(q_pos, k_pos, idx)
        return res

    def _shift_text(self, cmp: dict[str, Any], q_pos: np.ndarray) -> str:
        """The row shift a comparison found, in words."""
        return diagnose.row_shift_text(cmp["shift"], q_pos, self.ref64, float(np.max(cmp["bounds"])))

    def _mismatch(
        self,
        idx: tuple[int, ...] | None,
        cand: np.ndarray,
        ref: np.ndarray,
        q_pos: np.ndarray,
        k_pos: np.ndarray,
        shift: np.ndarray | None,
    ) -> dict[str, Any] | None:
        if idx is None:
            return None
        h, i, j = idx
        m = {
            "index": idx,
            "head": h,
            "q_pos": int(q_pos[i]),
            "k_pos": int(k_pos[j]),
            "delta": int(q_pos[i] - k_pos[j]),
            "candidate": _f(cand[idx]),
            "reference": _f(ref[idx]),
        }
        if shift is not None:
            m["row shift"] = _f(shift[h, i])
        return m

    def diagnose(
        self,
        cand: np.ndarray,
        ref: np.ndarray,
        mag: np.ndarray,
        keep: np.ndarray,
        dt: str,
        q_pos: np.ndarray,
        k_pos: np.ndarray,
        cmp: dict[str, Any],
    ) -> list[str]:
        """The convention difference that explains the failure: one that accounts for every compared entry (the
        most specific) before a per-row constant, a causal-only form, a lower precision and the coarser
        descriptions."""
        out: list[str] = []
        kept = cand[np.broadcast_to(keep, cand.shape) & np.isfinite(ref)]
        if np.isnan(kept).any():
            out.append("the candidate returned NaN for compared entries")
        if np.isinf(kept).any():
            out.append(f"the candidate returned infinities where the bias is finite (an overflow of {dt} inside it?)")
        tdt = self.tol_dtype(dt)
        hits = []
        for label, alt_ref in diagnose.bias_hypotheses(self.ref64, q_pos, k_pos, keep=keep if self.causal else None):
            if self.compare(cand, alt_ref, keep, tdt, mag)["passed"]:
                hits.append(label)
                if len(q_pos) > 1:
                    break  # one query cannot tell some conventions apart: then every one that fits is listed
        if hits:
            return [*out, diagnose.one_of(hits)]
        if self.equivalence == "exact":
            alt = self.compare(cand, ref, keep, tdt, mag, equivalence="row_shift")
            if alt["passed"]:
                return [
                    *out,
                    "per-row constant: candidate = reference + one constant per (head, query row), which "
                    "leaves the probabilities unchanged; check it with equivalence='row_shift' ["
                    + self._shift_text(alt, q_pos)
                    + "]",
                ]
        if not self.causal:
            causal_keep = np.asarray(causal_mask(q_pos, k_pos))
            for equiv in dict.fromkeys((self.equivalence, "row_shift")):
                alt = self.compare(cand, ref, causal_keep, tdt, mag, equivalence=equiv)
                if alt["passed"]:
                    how = "" if equiv == "exact" else " up to a per-row constant"
                    detail = "" if equiv == "exact" else f" [{self._shift_text(alt, q_pos)}]"
                    return [
                        *out,
                        f"causal-only form: equals the reference{how} on keys at or before the query and "
                        "differs on future keys (key-only ALiBi, KERPLE/gpt-neox zeroing the future half); check "
                        "it with causal=True" + ("" if equiv == "exact" else ", equivalence='row_shift'") + detail,
                    ]
        # After the structural explanations (a per-row constant, a causal-only form): within the lower dtype's rule
        # with errors of at least a tenth of its u, the candidate computes in that dtype.
        for lower in diagnose.LOWER.get(tdt, ()):
            low = self.compare(cand, ref, keep, lower, mag)
            u = float(np.finfo(numpy_dtype(lower)).eps) / 2 / max(low["tol"].rtol, 1e-300)  # u as a fraction of t
            if low["passed"] and np.max(low["err"] / np.maximum(low["bounds"], 1e-300)) >= 0.1 * u:
                return [*out, diagnose.precision_text(lower, tdt)]
        bound, atol = cmp["bounds"], float(np.max(cmp["bounds"], initial=0.0))
        text = None
        if isinstance(self.ref64, T5Bias):
            text = diagnose.t5_value_buckets(self.ref64, cand, q_pos, k_pos, cmp["bad"], atol)
        text = text or diagnose.scale_factor_text(cand, ref, keep, atol)
        if not text and isinstance(self.ref64, ALiBi) and self.equivalence == "exact":
            dist = np.abs(q_pos[:, None] - k_pos[None, :]).astype(np.float64)
            text = diagnose.alibi_slopes_text(self.ref64, cand, keep, dist, bound)
        return [*out, text] if text else out

    def shape_check(self) -> CheckResult:
        q, k = self.main_positions()
        cand, dt = self.evaluate(q, k)
        ok_dtype = dt in FLOAT_DTYPES or dt.startswith("int")
        res = CheckResult(
            f"{self.label}.shape",
            ok_dtype,
            summary=f"output shape {cand.shape} = (H, Sq, Sk), dtype {dt}",
        )
        if not ok_dtype:
            res.diagnosis.append(f"unexpected output dtype {dt}; expected a float (or integer) dtype")
        return res

    def offset_only_check(self, shift: int) -> CheckResult:
        q, k = self.main_positions()
        c1, dt = self.evaluate(q, k)
        keep = self.keep(q, k)
        cmp: dict[str, Any] = {}

        mag = self.magnitude(q, k)  # a function of i - j: the same at the shifted positions

        def violations(shifted: np.ndarray, base: np.ndarray) -> np.ndarray:
            cmp.update(self.compare(shifted, base, keep, self.tol_dtype(dt), mag))
            return cmp["bad"]

        prop = offset_only(self.bias_values, q, k, shift, violations=violations)
        c2, _ = self.evaluate(q + shift, k + shift)
        res = CheckResult(
            f"{self.label}.offset_only",
            prop.passed,
            summary=f"candidate(q_pos + {shift}, k_pos + {shift}) vs candidate(q_pos, k_pos) "
            f"(equivalence={self.equivalence})",
            **_figures(cmp),
        )
        if not res.passed:
            idx = prop.index
            assert idx is not None
            h, i, j = idx
            res.mismatch = {
                "index": idx,
                "head": h,
                "q_pos": int(q[i]),
                "k_pos": int(k[j]),
                "shift": shift,
                "candidate": _f(c2[idx]),
                "reference": _f(c1[idx]),
            }
            res.diagnosis.append(
                "the candidate depends on absolute positions, not only on the offset i - j, although the family "
                f"{type(self.ref64).__name__} is a function of i - j"
            )
            res.reproduction = (
                self.snippet(q, k, None) + f"\nshifted = as_numpy(candidate(q_pos + {shift}, k_pos + {shift}))\n"
                f"print(got[{h}, {i}, {j}], shifted[{h}, {i}, {j}])"
            )
        return res

    def monotone_check(self, p: int) -> CheckResult:
        q = np.array([p], dtype=np.int64)
        k = np.arange(0, 2 * p + 1, dtype=np.int64)
        cand, dt = self.evaluate(q, k)
        row = cand[:, 0, :]
        tol = bias_tolerance(self.tol_dtype(dt), rtol=self.rtol, atol=self.atol)
        mag = np.maximum(self.magnitude(q, k)[:, 0, :], np.where(np.isfinite(row), np.abs(row), 0.0))
        slack = float(np.max(bias_bound(tol, mag)))  # normwise over the row: neighbours' roundings differ
        sides = ("past",) if self.causal else ("past", "future")  # keys at or before the query, and after it
        prop = penalty_monotone(self.bias_values, p, xp=np_xp, sides=sides, slack=slack)
        worst, ok = prop.worst, prop.passed
        res = CheckResult(
            f"{self.label}.monotone",
            ok,
            summary=f"bias non-increasing in |i - j| for |i - j| = 0..{p} "
            f"({'past keys only (causal)' if self.causal else 'both sides'}), as {type(self.ref64).__name__} promises",
            max_abs=worst,
            bound=slack,
            tolerance=f"an increase of at most {slack:.3g} between neighbours ({tol.text})",
        )
        if not ok and prop.index is not None:
            # The entry that rose is key j, |i - j| = d + 1; its nearer neighbour (|i - j| = d) is one key closer.
            h, _, j = prop.index
            side = "past keys" if j < p else "future keys"
            d = abs(j - p) - 1
            res.mismatch = {
                "index": (h, 0, d),
                "head": h,
                "side": side,
                "|delta|": f"{d} -> {d + 1}",
                "candidate": _f(row[h, j]),
                "reference": f"<= {_f(row[h, j + 1 if side == 'past keys' else j - 1])}",
            }
            if side == "future keys":
                res.diagnosis.append(
                    "the bias grows towards future keys: a key-only or signed form (e.g. BLOOM's m*j) is only "
                    "valid under a causal mask; use causal=True if the candidate is only used causally"
                )
            elif np.all(abs_errors(self.evaluate(q * 0, k)[0][:, 0, :], row) <= slack):
                res.diagnosis.append(
                    f"the bias ignores the query position: the row of a query at {p} equals that of a query at 0 "
                    "(a bias of the key alone, or a KV cache's query offset left at 0), so the penalty falls "
                    "towards the first key"
                )
            else:
                res.diagnosis.append("the penalty decreases with distance: a sign or slope error")
            res.reproduction = self.snippet(q, k, None) + f"\nprint(got[{h}, 0, :])"
        return res

    def repeatable_check(self) -> CheckResult:
        q, k = self.main_positions()
        q_in, k_in = q.copy(), k.copy()
        first, _ = _as_float_array(self._call(q_in, k_in), "candidate output")
        second, _ = _as_float_array(self._call(q_in, k_in), "candidate output")
        same = _identical(first, second)
        untouched = np.array_equal(q_in, q) and np.array_equal(k_in, k)
        res = CheckResult(
            f"{self.label}.repeatable",
            same and untouched,
            summary="two calls give bitwise identical results and leave q_pos, k_pos unchanged",
        )
        if not same:
            res.diagnosis.append("two calls with the same positions returned different values")
        if not untouched:
            res.diagnosis.append("the candidate modified its q_pos or k_pos argument in place")
        return res


def bias_checks(
    candidate: Callable[[np.ndarray, np.ndarray], Any],
    reference: BiasFamily,
    *,
    q_len: int,
    k_len: int,
    align: str = "bottom_right",
    equivalence: str = "exact",
    causal: bool = False,
    dtype: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    target: str | None = None,
    timeout: float | None = None,
    label: str = "bias",
) -> list[Check]:
    """The checks of :func:`check_bias`, unrun (see :func:`check_bias` for the parameters)."""
    _BiasSuite.check_candidate(candidate)
    return _bias_checks(candidate, BiasOptions.of(locals()), label=label)


def _bias_checks(candidate: Any, options: BiasOptions, *, label: str = "bias") -> list[Check]:
    """The checks of ``candidate`` under ``options``, unrun."""
    s = _BiasSuite(candidate, options, label=label)
    ref = s.ref64
    checks = [Check(f"{label}.shape", "output shape (H, Sq, Sk) and dtype", s.shape_check, s)]

    def values(name: str, qf: Callable[[], tuple[np.ndarray, np.ndarray]], what: str) -> None:
        checks.append(
            Check(f"{label}.values.{name}", what, lambda: s.values_check(f"{label}.values.{name}", *qf(), what), s)
        )

    values("main", s.main_positions, f"Sq={s.q_len}, Sk={s.k_len}, {s.align} positions")
    if isinstance(ref, TensorBias):
        s.notes.append("decode, chunk and offset probes: a TensorBias has fixed (Sq, Sk)")
    else:
        # Kernel scale: a decode row of at least 4099 keys and a 17-query chunk past 2048 reach the offsets where
        # bfloat16 (256) and float16 (2048) integers round; the offset probe passes every branch of the family.
        kl, c0, radius = max(s.k_len, 4099), max(s.k_len + 5, 2050), _probe_radius(ref)
        probes = {
            "decode": ([kl - 1], kl, f"KV-cache decode: one query at position {kl - 1} against keys 0..{kl - 1}"),
            "chunk": (range(c0, c0 + 17), c0 + 17, f"chunked prefill: queries at {c0}..{c0 + 16}, keys 0..{c0 + 16}"),
            "offsets": ([radius], 2 * radius + 1, f"one query at {radius}, keys 0..{2 * radius}: |i - j| <= {radius}"),
        }
        for name, (qs, n, what) in probes.items():
            values(name, lambda qs=qs, n=n: (np.asarray(qs, dtype=np.int64), np.arange(n, dtype=np.int64)), what)
    shift = 37
    horizon = offset_only_horizon(ref)  # the family's offset_only trait (FIRE: only up to query position L)
    if horizon == -math.inf:
        s.notes.append(f"offset_only: a {type(ref).__name__} is not a function of i - j")
    elif horizon < max(s.k_len, s.q_len) + shift:
        s.notes.append("offset_only: FIRE depends on the absolute query position once it exceeds L")
    else:
        checks.append(
            Check(f"{label}.offset_only", "bias depends only on i - j", lambda: s.offset_only_check(shift), s)
        )
    if ref.monotone:
        checks.append(Check(f"{label}.monotone", "penalty non-increasing in |i - j|", lambda: s.monotone_check(64), s))
    else:
        s.notes.append(f"monotone: {type(ref).__name__} does not promise a monotone penalty")
    checks.append(Check(f"{label}.repeatable", "deterministic, inputs unchanged", s.repeatable_check, s))
    return checks


def _figures(cmp: dict[str, Any]) -> dict[str, Any]:
    """A comparison's errors, bound and tolerance, as the fields of its CheckResult."""
    return {"max_abs": cmp["max_abs"], "max_rel": cmp["max_rel"], "bound": cmp["bound"], "tolerance": cmp["tol"].text}


_PROBE_RADIUS: dict[str, Callable[[Any], int]] = {
    "t5": lambda ref: 2 * ref.options()["max_distance"],
    "offset": lambda ref: ref.max_offset + 5,
    "fire": lambda ref: int(min(4096, math.ceil(1.25 * float(np.asarray(ref.parameters()["L"]))))),
}


def _probe_radius(ref: BiasFamily) -> int:
    """Largest |i - j| of the offset probe: past 2048 (float16 integers) and every bucket, clip or normaliser branch
    of the family."""
    radius = _PROBE_RADIUS.get(type(ref).name)
    return max(2100, 0 if radius is None else radius(ref))


def check_bias(
    candidate: Callable[[np.ndarray, np.ndarray], Any],
    reference: BiasFamily,
    *,
    q_len: int,
    k_len: int,
    align: str = "bottom_right",
    equivalence: str = "exact",
    causal: bool = False,
    dtype: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    expected_failures: dict[str, str] | None = None,
    target: str | None = None,
    timeout: float | None = None,
) -> Report:
    r"""Check a bias implementation against a relpos_ref family.

    Parameters
    ----------
    candidate : callable
        ``candidate(q_pos, k_pos)`` receives NumPy int64 arrays of absolute query and key positions and returns the
        (H, Sq, Sk) bias as an array of any library with DLPack or ``__array__`` (NumPy, PyTorch, CuPy, JAX).
    reference : BiasFamily
        The family (with the candidate's parameters) it should equal; evaluated in float64.
    q_len, k_len : int
        Sizes of the main comparison; query positions follow ``align``. The suite adds a KV-cache decode row (at
        least 4099 keys), a chunked-prefill block past position 2048 and an offset probe past |i - j| = 2048 and
        every bucket, clip or normaliser branch of the family, at absolute positions.
    align : {"bottom_right", "top_left"}
    equivalence : {"exact", "row_shift"}
        ``"row_shift"`` accepts a bias equal to the reference up to one constant per (head, query row), which leaves
        the softmax probabilities unchanged (the key-only ALiBi of BLOOM, MPT and FlashAttention's causal path); the
        report gives the shift. Anything else that changes probabilities is still rejected.
    causal : bool
        Compare only the entries a causal mask keeps (keys at or before the query).
    dtype : str, optional
        Dtype whose tolerance applies; the candidate output's dtype by default.
    rtol, atol : float, optional
        Replace the tolerance rule (each entry within ``t max(1, m)``, m its magnitude, t per dtype) by
        ``|c - r| <= atol + rtol * |r|``.
    expected_failures : dict, optional
        Check name (or fnmatch pattern) -> reason for known divergences (reported as xfail).
    target : str, optional
        "module:function" of the candidate, used in reproduction snippets.
    timeout : float, optional
        Seconds one candidate call may take before its check is an error (default: the harness's generous limit).

    Returns
    -------
    Report
    """
    _BiasSuite.check_candidate(candidate)
    return run_checks(_bias_checks(candidate, BiasOptions.of(locals())), expected_failures=expected_failures)
