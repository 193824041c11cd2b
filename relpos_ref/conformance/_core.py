"""Checks and suites: the machinery shared by the bias, bucket and attention harnesses.

Every check is a :class:`Check`: named, runnable alone (what :func:`parametrize_with_checks` hands to pytest) and
returning a :class:`~relpos_ref.conformance.report.CheckResult`; :func:`run_checks` collects a
:class:`~relpos_ref.conformance.report.Report`. Expected values always come from relpos_ref evaluated in float64 on
the inputs the candidate saw; property checks compare the candidate with itself.
"""

from __future__ import annotations

import contextvars
import fnmatch
import sys
import threading
import traceback
import unittest
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields
from typing import Any, ClassVar, Self

import numpy as np

from .._checks import real_scalar
from .._host import to_host
from ..families import BiasFamily
from .report import CheckResult, ConformanceError, Report

__all__ = ["Check", "run_checks"]

#: Seconds one candidate call may take when a suite is given no ``timeout``: far above any sane call of the default
#: cases (a float64 NumPy attention of the largest one takes well under a second), short enough that a hung
#: candidate still ends its check in a CI job.
DEFAULT_TIMEOUT = 600.0


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
        """Run the check; the candidate's exceptions become a result with status ``"error"``.

        KeyboardInterrupt propagates (the user stopped the run). A SystemExit or other BaseException raised outside
        :meth:`_Suite._call`, which converts the candidate's own, can only come from an object the candidate
        returned (an ``__array__`` that calls ``sys.exit``): it is an error of this check too, never the end of the
        process.
        """
        try:
            res = self._fn()
        except CandidateError as exc:
            res = CheckResult(self.name, False, summary=str(exc), status="error")
            res.reproduction = getattr(exc, "reproduction", None)
            res.diagnosis = list(getattr(exc, "diagnosis", []))
        except BaseException as exc:
            if isinstance(exc, Exception | KeyboardInterrupt):
                raise  # an Exception here is the harness's own bug: let its traceback show
            summary = f"{_raised(exc)} while the harness read the candidate's result"
            res = CheckResult(self.name, False, summary=summary, status="error")
        res.name = self.name
        return res

    def __call__(self) -> CheckResult:
        """Run the check and raise :class:`ConformanceError` (an AssertionError) with its report when it fails.

        A check whose quantity the candidate did not provide (status ``"not_checked"``) raises
        :class:`unittest.SkipTest`, which pytest reports as a skip: neither passed nor failed.
        """
        __tracebackhide__ = True
        res = self.run()
        if res.status == "not_checked":
            raise unittest.SkipTest(f"{res.name}: NOT CHECKED  {res.summary}")
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

    def __init__(self, candidate: Any, target: str | None, label: str, *, timeout: float | None = None) -> None:
        """What every suite holds: the candidate (callable), its target, the check label, the per-call timeout in
        seconds (None: :data:`DEFAULT_TIMEOUT`), notes and a cache."""
        self.check_candidate(candidate)
        self.candidate, self.target, self.label = candidate, target, label
        self.timeout = DEFAULT_TIMEOUT if timeout is None else real_scalar("timeout", timeout, positive=True)
        self.notes: list[str] = []
        self._cache: dict[Any, Any] = {}
        self._stuck: threading.Thread | None = None

    @classmethod
    def check_candidate(cls, candidate: Any) -> None:
        """TypeError unless ``candidate`` is callable; run before the options are built, so this error comes first."""
        if not callable(candidate):
            msg = f"candidate: expected a callable {cls.signature}, got {type(candidate).__name__}"
            raise TypeError(msg)

    def header(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        """``candidate(*args, **kwargs)``, its return value unchanged, or :class:`CandidateError` for anything else.

        The call runs in a worker thread that is waited for at most ``self.timeout`` seconds, so a candidate that
        hangs ends its check instead of the run. A Python thread cannot be killed: a call that timed out may still
        be running (and using the CPU or the GPU) until the process ends; the thread is a daemon, so it does not
        keep the process alive, and while it runs the suite does not call the candidate again (those checks are
        errors at once rather than one more timeout each). The worker sees the caller's context variables (NumPy's
        ``errstate``, ``decimal``) and PyTorch's grad mode and current CUDA device; other thread-local settings (a
        CUDA stream or autocast context, a JAX default-device context) must be set inside the candidate, and
        ``signal.signal``, which works only in the main thread, cannot be called from it.

        An Exception, SystemExit (``sys.exit`` inside the candidate) or any other BaseException the candidate
        raises becomes a CandidateError naming it and where it was raised, so the check is an error and the process
        goes on; KeyboardInterrupt is re-raised (the user asked to stop). ``os._exit`` ends the process and cannot
        be caught.
        """
        stuck = self._stuck
        if stuck is not None and stuck.is_alive():
            msg = (
                f"candidate not called: an earlier call timed out after {self.timeout:g} s and is still running "
                "(a thread cannot be stopped); raise timeout= if the candidate is merely slow"
            )
            raise CandidateError(msg)
        self._stuck = None
        outcome: list[tuple[bool, Any]] = []
        enter = _thread_state()

        def work() -> None:
            try:
                with enter():
                    outcome.append((True, context.run(self.candidate, *args, **kwargs)))
            except BaseException as exc:  # handed to the caller's thread, which decides what each one means
                outcome.append((False, exc))

        context = contextvars.copy_context()
        worker = threading.Thread(target=work, name=f"relpos_ref candidate ({self.label})", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            self._stuck = worker
            msg = (
                f"candidate timed out: no result after {self.timeout:g} s (timeout=); the call may still be running "
                "in the background, since a Python thread cannot be killed"
            )
            raise CandidateError(msg)
        ok, value = outcome[0]
        if ok:
            return value
        if isinstance(value, KeyboardInterrupt):
            raise value
        raise CandidateError(_raised(value)) from value


def _raised(exc: BaseException) -> str:
    """The error text ``candidate raised X: message (at file:line)``; for SystemExit its code and why the process
    goes on."""
    if isinstance(exc, SystemExit):
        what = f"SystemExit({exc.code!r}): it called sys.exit instead of returning a result"
    else:
        what = f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"candidate raised {what}{where}"


class _Nothing:
    """A do-nothing context manager (no thread state to carry over)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _thread_state() -> Callable[[], Any]:
    """A factory of the context manager that gives the worker thread the caller's PyTorch grad mode and current CUDA
    device, both per thread in PyTorch; without PyTorch imported by the caller, nothing (it is never imported)."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "set_grad_enabled"):
        return _Nothing
    grad = torch.is_grad_enabled()
    device = None
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_initialized():
        device = cuda.current_device()

    def enter() -> Any:
        if device is not None:
            cuda.set_device(device)
        return torch.set_grad_enabled(grad)

    return enter


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
        A matching check that is ``not_checked`` stays so: nothing was compared, so neither is known.
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
            if res.status != "not_checked":
                res.status = "xfail" if not res.passed else "xpass"
                res.passed = res.status == "xfail"
        results.append(res)
    suite = checks[0]._suite
    header, notes = dict(suite.header()), list(suite.notes)
    others = {id(c._suite): c._suite for c in checks if c._suite is not suite}
    for other in others.values():  # the feature suites of a forward run (varlen, segments): their cases and notes
        header.update(getattr(other, "header_extra", dict)())
        notes += [n for n in other.notes if n not in notes]
    if expected_failures:
        header["known divergences"] = ", ".join(f"{k} ({v})" for k, v in expected_failures.items())
    return Report(results, header, notes)


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
    """(host float64 or int64 copy, dtype name) of the candidate's ``x``, or CandidateError naming what it is.

    Anything :func:`~relpos_ref._host.to_host` cannot read is the candidate's problem, not the harness's: None, a
    string, a mapping, a list (even of numbers: an array is expected), an array of strings or objects, a tensor
    whose copy fails (meta or sparse).
    """
    try:
        arr, dt = to_host(x, name=name)
    except TypeError as exc:
        raise CandidateError(str(exc)) from exc
    except Exception as exc:
        dtype = getattr(x, "dtype", None)
        what = type(x).__name__ + (f" of dtype {dtype}" if dtype is not None else "")
        msg = f"{name}: expected an array of real numbers, got a {what} ({type(exc).__name__}: {exc})"
        raise CandidateError(msg) from exc
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
