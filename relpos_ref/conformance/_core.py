"""Checks and suites: the machinery shared by the bias, bucket and attention harnesses.

Every check is a :class:`Check`: named, runnable alone (what :func:`parametrize_with_checks` hands to pytest) and
returning a :class:`~relpos_ref.conformance.report.CheckResult`; :func:`run_checks` collects a
:class:`~relpos_ref.conformance.report.Report`. Expected values always come from relpos_ref evaluated in float64 on
the inputs the candidate saw; property checks compare the candidate with itself.
"""

from __future__ import annotations

import fnmatch
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields
from typing import Any, ClassVar, Self

import numpy as np

from .._host import to_host
from ..families import BiasFamily
from .report import CheckResult, ConformanceError, Report

__all__ = ["Check", "run_checks"]


class CandidateError(Exception):
    """The candidate raised or returned something that cannot be compared."""


# ------------------------------------------------------------------------------------------------------------------
# Check objects and suites
# ------------------------------------------------------------------------------------------------------------------


class Check:
    """One named check of one candidate. Call it (in a test) to run it and raise on failure.

    Attributes
    ----------
    name : str
        Stable name, e.g. ``"bias.values.decode"``.
    description : str
    """

    def __init__(self, name: str, description: str, fn: Callable[[], CheckResult], suite: _Suite) -> None:
        self.name = name
        self.description = description
        self._fn = fn
        self._suite = suite

    def run(self) -> CheckResult:
        """Run the check; the candidate's exceptions become a result with status ``"error"``."""
        try:
            res = self._fn()
        except CandidateError as exc:
            res = CheckResult(self.name, False, summary=str(exc), status="error")
            res.reproduction = getattr(exc, "reproduction", None)
            res.diagnosis = list(getattr(exc, "diagnosis", []))
        res.name = self.name
        return res

    def __call__(self) -> CheckResult:
        """Run the check and raise :class:`ConformanceError` (an AssertionError) with its report when it fails."""
        __tracebackhide__ = True
        res = self.run()
        if not res.passed:
            header = "\n".join(f"{k} : {v}" for k, v in self._suite.header().items())
            raise ConformanceError(f"{header}\n\n{res.text()}")
        return res

    def __repr__(self) -> str:
        return f"Check({self.name!r})"


class _Options:
    """Base of the frozen dataclasses a suite is built with (``AttentionOptions``, ``BiasOptions``)."""

    @classmethod
    def of(cls, keywords: Mapping[str, Any]) -> Self:
        """The options named in ``keywords`` (a public function's ``locals()``); the others keep their defaults."""
        return cls(**{f.name: keywords[f.name] for f in fields(cls) if f.init and f.name in keywords})

    def _put(self, name: str, value: Any) -> None:
        """Set a field of the frozen object while it validates itself."""
        object.__setattr__(self, name, value)


class _Suite:
    #: What the candidate is called with, for the error on a candidate that is not callable.
    signature: ClassVar[str]

    def __init__(self, candidate: Any, target: str | None, label: str) -> None:
        """What every suite holds: the candidate (callable), its target, the check label, notes and a cache."""
        self.check_candidate(candidate)
        self.candidate, self.target, self.label = candidate, target, label
        self.notes: list[str] = []
        self._cache: dict[Any, Any] = {}

    @classmethod
    def check_candidate(cls, candidate: Any) -> None:
        """TypeError unless ``candidate`` is callable; run before the options are built, so this error comes first."""
        if not callable(candidate):
            msg = f"candidate: expected a callable {cls.signature}, got {type(candidate).__name__}"
            raise TypeError(msg)

    def header(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _call(self, *args: Any) -> Any:
        try:
            return self.candidate(*args)
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            msg = f"candidate raised {type(exc).__name__}: {exc} (at {tb.filename}:{tb.lineno})"
            raise CandidateError(msg) from exc


def _target_name(candidate: Any, target: str | None) -> str:
    if target:
        return target
    mod = getattr(candidate, "__module__", None)
    qn = getattr(candidate, "__qualname__", None) or type(candidate).__name__
    return f"{mod}.{qn}" if mod else qn


def run_checks(checks: Iterable[Check], *, expected_failures: dict[str, str] | None = None) -> Report:
    """Run checks (of one suite) and collect a :class:`Report`.

    Parameters
    ----------
    checks : iterable of Check
    expected_failures : dict, optional
        Check name or ``fnmatch`` pattern -> reason. Matching checks that fail are reported as ``xfail`` (the report
        still passes); matching checks that pass are ``xpass`` and fail the report, so a fixed divergence is noticed.
    """
    checks = list(checks)
    if not checks:
        msg = "checks: expected at least one Check, got none"
        raise ValueError(msg)
    marks = _match_expected(checks, expected_failures)
    results = []
    for c in checks:
        res = c.run()
        reason = marks.get(c.name)
        if reason is not None:
            res.expected_failure = reason
            res.status = "xfail" if not res.passed else "xpass"
            res.passed = res.status == "xfail"
        results.append(res)
    suite = checks[0]._suite
    header = dict(suite.header())
    if expected_failures:
        header["known divergences"] = ", ".join(f"{k} ({v})" for k, v in expected_failures.items())
    return Report(results, header, list(suite.notes))


def _match_expected(checks: Sequence[Check], expected: dict[str, str] | None) -> dict[str, str]:
    if not expected:
        return {}
    if not isinstance(expected, dict):
        msg = f"expected_failures: expected a dict of check name or pattern -> reason, got {type(expected).__name__}"
        raise TypeError(msg)
    out: dict[str, str] = {}
    names = [c.name for c in checks]
    for pattern, reason in expected.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            msg = f"expected_failures: pattern {pattern!r} matches no check; the checks are {names}"
            raise ValueError(msg)
        for n in hits:
            out[n] = str(reason)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Shared comparison helpers
# ------------------------------------------------------------------------------------------------------------------


def _as_float_array(x: Any, name: str) -> tuple[np.ndarray, str]:
    try:
        arr, dt = to_host(x, name=name)
    except TypeError as exc:
        raise CandidateError(str(exc)) from exc
    return arr, dt


def _max_rel(err: np.ndarray, ref: np.ndarray, sel: np.ndarray) -> float:
    sel = sel & np.isfinite(ref) & (ref != 0)
    if not sel.any():
        return 0.0
    return float(np.max(err[sel] / np.abs(ref[sel])))


def _first(mask: np.ndarray) -> tuple[int, ...] | None:
    idx = np.argwhere(mask)
    return tuple(int(i) for i in idx[0]) if len(idx) else None


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise the same values (NaN where the other has NaN): what two calls of a deterministic candidate give."""
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


def _f(x: float) -> float:
    return float(x)


def _to_numpy64(fam: BiasFamily) -> BiasFamily:
    import array_api_compat.numpy as np_xp

    return fam.astype(np_xp.float64, xp=np_xp)
