"""T5 bucket functions against ``relpos_ref.t5_bucket`` (integer outputs: exact): ``check_buckets``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._host import abs_errors
from ..families import t5_bucket, t5_bucket_thresholds
from ..positions import positions
from . import _repro, diagnose
from ._core import (
    CandidateError,
    Check,
    _as_float_array,
    _f,
    _first,
    _identical,
    _Suite,
    _target_name,
    run_checks,
)
from .report import CheckResult, Report
from .tolerance import rule_text

__all__ = ["bucket_checks", "check_buckets"]


class _BucketSuite(_Suite):
    signature = "candidate(delta)"

    def __init__(
        self,
        candidate: Any,
        *,
        bidirectional: bool,
        num_buckets: int,
        max_distance: int,
        target: str | None,
        label: str,
        timeout: float | None = None,
    ) -> None:
        super().__init__(candidate, target, label, timeout=timeout)
        self.opts = {"bidirectional": bidirectional, "num_buckets": num_buckets, "max_distance": max_distance}
        self.thr = t5_bucket_thresholds(**self.opts)  # validates the configuration
        radius = max(4 * max_distance, 2 * self.thr[-1] + 8)
        lo = -radius if bidirectional else -radius // 4
        extra = [10**4, 10**5, 10**6, 2**31 - 1]
        self.delta = np.concatenate(
            [np.arange(lo, radius + 1), np.array(extra + ([-e for e in extra] if bidirectional else []))]
        ).astype(np.int64)
        self.seen_dtype: str | None = None

    def header(self) -> dict[str, Any]:
        return {
            "candidate": _target_name(self.candidate, self.target),
            "reference": f"relpos_ref.t5_bucket({', '.join(f'{k}={v!r}' for k, v in self.opts.items())})",
            "kind": "T5 bucket indices of offsets delta = query - key",
            "candidate dtype": self.seen_dtype or "(from the candidate's output)",
            "tolerance rule": rule_text("buckets"),
        }

    def evaluate(self, delta: np.ndarray) -> np.ndarray:
        key = delta.tobytes() + str(delta.shape).encode()
        if key not in self._cache:
            arg = delta.copy()
            arr, dt = _as_float_array(self._call(arg), "candidate output")
            self.seen_dtype = dt
            if arr.shape != delta.shape:
                msg = f"candidate returned shape {arr.shape} for offsets of shape {delta.shape}"
                raise CandidateError(msg)
            self._cache[key] = arr
        return self._cache[key]

    def reference(self, delta: np.ndarray) -> np.ndarray:
        return np.asarray(t5_bucket(delta, **self.opts))

    def values_check(self, name: str, delta: np.ndarray, what: str) -> CheckResult:
        cand = self.evaluate(delta)
        ref = self.reference(delta)
        bad = ~(cand == ref)
        res = CheckResult(
            name,
            not bool(bad.any()),
            summary=f"{what}: {delta.size} offsets, exact equality",
            max_abs=float(np.max(abs_errors(cand.astype(np.float64), ref.astype(np.float64)), initial=0.0)),
            bound=0.0,
            tolerance="integers: exact equality",
        )
        if bad.any():
            idx = _first(bad)
            res.mismatch = {
                "index": idx,
                "delta": int(delta[idx]),
                "candidate": _f(cand[idx]),
                "reference": int(ref[idx]),
            }
            res.diagnosis = self.diagnose(delta, cand, ref, bad)
            flat_bad = np.unique(delta[bad])[:40]
            res.reproduction = _repro.bucket_snippet(
                self.candidate, self.target, flat_bad, self.opts, first=int(delta[idx])
            )
        return res

    def diagnose(self, delta: np.ndarray, cand: np.ndarray, ref: np.ndarray, bad: np.ndarray) -> list[str]:
        out = []
        if np.array_equal(cand, np.asarray(t5_bucket(-delta, **self.opts))):
            out.append(
                "offset sign flipped: the candidate takes memory - query (T5/HF relative_position = key - query); "
                "pass -delta to it"
            )
        other = dict(self.opts, bidirectional=not self.opts["bidirectional"])
        try:
            if np.array_equal(cand, np.asarray(t5_bucket(delta, **other))):
                out.append(f"mode swapped: the candidate computes bidirectional={other['bidirectional']} buckets")
        except ValueError:
            pass
        if not out and np.all(np.isfinite(cand[bad])):
            pairs = sorted({(int(d), int(r), int(c)) for d, r, c in zip(delta[bad], ref[bad], cand[bad])})
            out.append(
                diagnose.bucket_pairs_text(
                    pairs, self.opts["bidirectional"], self.opts["num_buckets"], self.opts["max_distance"]
                )
            )
        return out

    def dtype_check(self) -> CheckResult:
        self.evaluate(self.delta)
        dt = self.seen_dtype or "?"
        ok = dt.startswith(("int", "uint"))
        res = CheckResult(f"{self.label}.dtype", ok, summary=f"integer output dtype (got {dt})")
        if not ok:
            res.diagnosis.append("bucket indices should be integers (an index into the table)")
        return res

    def range_check(self) -> CheckResult:
        cand = self.evaluate(self.delta)
        nb = self.opts["num_buckets"]
        bad = ~((cand >= 0) & (cand < nb))
        res = CheckResult(f"{self.label}.range", not bool(bad.any()), summary=f"every bucket in [0, {nb})")
        if bad.any():
            idx = _first(bad)
            res.mismatch = {
                "index": idx,
                "delta": int(self.delta[idx]),
                "candidate": _f(cand[idx]),
                "reference": f"in [0, {nb})",
            }
        return res

    def repeatable_check(self) -> CheckResult:
        """Two calls, each on its own copy of the offsets, give bitwise identical buckets and leave the copies
        unchanged: a candidate that clips or negates its argument in place would corrupt the caller's offsets."""
        first_in, second_in = self.delta.copy(), self.delta.copy()
        first, _ = _as_float_array(self._call(first_in), "candidate output")
        second, _ = _as_float_array(self._call(second_in), "candidate output")
        same = _identical(first, second)
        # array_equal, not ==: a candidate may also have reshaped its argument in place (delta.shape = ...).
        touched = [a for a in (first_in, second_in) if not np.array_equal(a, self.delta)]
        res = CheckResult(
            f"{self.label}.repeatable",
            same and not touched,
            summary=f"two calls on {self.delta.size} offsets give bitwise identical buckets and leave delta unchanged",
        )
        if not same:
            res.diagnosis.append("two calls with the same offsets returned different buckets")
        if touched:
            after = touched[0]
            text = "the candidate modified its delta argument in place"
            if after.shape == self.delta.shape:
                changed = after != self.delta
                idx = _first(changed)
                res.mismatch = {"index": idx, "argument": "delta after the call", "candidate": int(after[idx])}
                res.mismatch["reference"] = int(self.delta[idx])
                text += f" ({int(changed.sum())} of {changed.size} offsets changed)"
            else:
                text += f" (its shape became {after.shape}, from {self.delta.shape})"
            res.diagnosis.append(text)
        return res

    def monotone_check(self) -> CheckResult:
        radius = int(self.delta[self.delta >= 0][:-4].max())
        d = np.arange(0, radius + 1, dtype=np.int64)
        sides = [("past (delta >= 0)", d)]
        if self.opts["bidirectional"]:
            sides.append(("future (delta < 0)", -d[1:]))
        worst = None
        for side, dd in sides:
            b = self.evaluate(dd)
            dec = np.diff(b) < 0
            if dec.any() and worst is None:
                i = int(np.argmax(dec))
                worst = (side, int(dd[i]), int(dd[i + 1]), _f(b[i]), _f(b[i + 1]))
        res = CheckResult(
            f"{self.label}.monotone",
            worst is None,
            summary=f"bucket non-decreasing in |delta| on each side, |delta| <= {radius}",
        )
        if worst is not None:
            side, d0, d1, b0, b1 = worst
            res.mismatch = {"side": side, "delta": f"{d0} -> {d1}", "candidate": b1, "reference": f">= {b0}"}
        return res


def bucket_checks(
    candidate: Callable[[np.ndarray], Any],
    *,
    bidirectional: bool,
    num_buckets: int = 32,
    max_distance: int = 128,
    target: str | None = None,
    label: str = "buckets",
    timeout: float | None = None,
) -> list[Check]:
    """The checks of :func:`check_buckets`, unrun."""
    s = _BucketSuite(
        candidate,
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
        target=target,
        label=label,
        timeout=timeout,
    )
    q, k = positions(9, 300)
    matrix = np.asarray(q)[:, None] - np.asarray(k)[None, :]
    return [
        Check(
            f"{label}.values",
            "exact buckets of every offset in range and a few huge ones",
            lambda: s.values_check(f"{label}.values", s.delta, "offsets in a range covering every bucket"),
            s,
        ),
        Check(
            f"{label}.values.matrix",
            "2-D offsets keep their shape",
            lambda: s.values_check(f"{label}.values.matrix", matrix, "a (9, 300) offset matrix"),
            s,
        ),
        Check(f"{label}.dtype", "integer dtype", s.dtype_check, s),
        Check(f"{label}.range", "buckets in [0, num_buckets)", s.range_check, s),
        Check(f"{label}.monotone", "non-decreasing in |delta|", s.monotone_check, s),
        Check(f"{label}.repeatable", "deterministic, delta unchanged", s.repeatable_check, s),
    ]


def check_buckets(
    candidate: Callable[[np.ndarray], Any],
    *,
    bidirectional: bool,
    num_buckets: int = 32,
    max_distance: int = 128,
    expected_failures: dict[str, str] | None = None,
    target: str | None = None,
    timeout: float | None = None,
) -> Report:
    """Check a T5 bucket function exactly against :func:`relpos_ref.t5_bucket`.

    ``candidate(delta)`` receives a NumPy int64 array of offsets ``delta = query - key`` (any shape) and returns the
    bucket indices (same shape). HF's ``T5Attention._relative_position_bucket`` takes ``key - query``: wrap it as
    ``lambda d: T5Attention._relative_position_bucket(torch.from_numpy(-d), ...)``.

    Parameters
    ----------
    candidate : callable
        ``candidate(delta) -> buckets``.
    bidirectional : bool
        T5 mode: encoder (both signs of delta) or decoder (past only).
    num_buckets, max_distance : int
        The T5 configuration (defaults 32 and 128, as in T5 and HF).
    expected_failures : dict, optional
        Check name (or fnmatch pattern) -> reason for known divergences.
    target : str, optional
        "module:function" of the candidate, for reproduction snippets.
    timeout : float, optional
        Seconds one candidate call may take before its check is an error (default
        :data:`~relpos_ref.conformance._core.DEFAULT_TIMEOUT`, 600 s).

    Returns
    -------
    Report
        Checks ``buckets.values`` (a range of offsets covering every bucket and a few huge ones),
        ``buckets.values.matrix`` (2-D offsets keep their shape), ``buckets.dtype`` (integers), ``buckets.range``,
        ``buckets.monotone`` and ``buckets.repeatable`` (deterministic, the offsets left unchanged).
    """
    checks = bucket_checks(
        candidate,
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
        target=target,
        timeout=timeout,
    )
    return run_checks(checks, expected_failures=expected_failures)
