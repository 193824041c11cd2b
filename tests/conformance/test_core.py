"""Tests of the suite machinery (relpos_ref.conformance._core): how a candidate call can go wrong.

A candidate may raise, exit, hang, return something that is not an array or be skipped because it provides nothing
to compare. Each test runs a candidate that does one of these (a "mutant" of the protocol) and asserts the exact
status, next to a control that behaves and passes.
"""

from __future__ import annotations

import contextvars
import math
import sys
import threading
import time
import unittest

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.conformance import AttentionShape, ConformanceError, check_attention, check_bias, check_buckets
from relpos_ref.conformance._core import DEFAULT_TIMEOUT, CandidateError, Check, _Suite, run_checks
from relpos_ref.conformance.report import CheckResult

pytestmark = pytest.mark.conformance


class _Plain(_Suite):
    """The smallest suite: a candidate of anything, a one-line header."""

    signature = "candidate(*args)"

    def header(self) -> dict[str, str]:
        return {"candidate": "test"}


def _line_of(fn) -> int:
    """The line of ``fn``'s body (its first statement), where the candidates below raise."""
    return fn.__code__.co_firstlineno + 1


# -- results and ordinary exceptions pass through ------------------------------------------------------------


def test_call_returns_the_result_and_passes_the_arguments_unchanged():
    seen = []
    result = object()

    def candidate(*args):
        seen.append(args)
        return result

    arrays = (np.arange(3), np.ones((2, 2)))
    assert _Plain(candidate, None, "t")._call(*arrays) is result
    assert len(seen) == 1
    assert all(a is b for a, b in zip(seen[0], arrays, strict=True))


def test_call_names_the_exception_and_where_it_was_raised():
    def candidate():
        raise ValueError("bad head dim")

    with pytest.raises(CandidateError) as info:
        _Plain(candidate, None, "t")._call()
    text = str(info.value)
    assert text.startswith("candidate raised ValueError: bad head dim")
    assert f"test_core.py:{_line_of(candidate)})" in text
    assert isinstance(info.value.__cause__, ValueError)


# -- SystemExit and other BaseExceptions ---------------------------------------------------------------------


def _exit0():
    sys.exit(0)


def _exit_text():
    sys.exit("bye")


def _raise_system_exit():
    raise SystemExit


class _Custom(BaseException):
    pass


def _raise_custom():
    raise _Custom("not an Exception")


def _raise_generator_exit():
    raise GeneratorExit


@pytest.mark.parametrize(
    ("candidate", "phrase"),
    [
        (_exit0, "candidate raised SystemExit(0): it called sys.exit"),
        (_exit_text, "candidate raised SystemExit('bye')"),
        (_raise_system_exit, "candidate raised SystemExit(None)"),
        (_raise_custom, "candidate raised _Custom: not an Exception"),
        (_raise_generator_exit, "candidate raised GeneratorExit"),
    ],
    ids=["exit0", "exit-text", "raise-SystemExit", "custom-BaseException", "GeneratorExit"],
)
def test_base_exceptions_are_candidate_errors(candidate, phrase):
    with pytest.raises(CandidateError) as info:
        _Plain(candidate, None, "t")._call()
    assert str(info.value).startswith(phrase)
    assert f"test_core.py:{_line_of(candidate)})" in str(info.value)


def test_keyboard_interrupt_is_reraised():
    def candidate():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _Plain(candidate, None, "t")._call()


def test_sys_exit_makes_every_check_of_each_suite_an_error():
    """Through the public functions: a candidate that exits is an error, never a pass, and the process goes on."""

    def exits(*args):
        sys.exit(0)

    buckets = check_buckets(exits, bidirectional=True)
    bias = check_bias(exits, rp.ALiBi.from_num_heads(4), q_len=3, k_len=5)
    attention = check_attention(exits, shapes=[AttentionShape(1, 2, 2, 3, 5, 8)])
    for report in (buckets, bias, attention):
        assert not report.passed
        assert {c.status for c in report.checks} == {"error"}, report.text()
        assert all("SystemExit(0)" in c.summary for c in report.checks), report.text()
    # control: the same suites on candidates that return their result
    assert check_buckets(lambda d: rp.t5_bucket(d, bidirectional=True), bidirectional=True).passed


def test_system_exit_from_a_returned_object_is_an_error():
    """An object whose __array__ exits is read outside the candidate call, by the check itself."""

    class Exits:
        def __array__(self, dtype=None, copy=None):
            sys.exit(0)

    report = check_buckets(lambda d: Exits(), bidirectional=True)
    assert {c.status for c in report.checks} == {"error"}
    assert "SystemExit(0)" in report["buckets.values"].summary
    assert "while the harness read the candidate's result" in report["buckets.values"].summary


# -- timeout ---------------------------------------------------------------------------------------------------


def test_timeout_default_and_validation():
    assert _Plain(print, None, "t").timeout == DEFAULT_TIMEOUT == 600.0
    assert _Plain(print, None, "t", timeout=2).timeout == 2.0
    for bad, err in [(0, ValueError), (-1.0, ValueError), (math.inf, ValueError), (math.nan, ValueError)]:
        with pytest.raises(err, match="timeout"):
            _Plain(print, None, "t", timeout=bad)
    for bad in ("1", True, [1.0]):
        with pytest.raises(TypeError, match="timeout"):
            _Plain(print, None, "t", timeout=bad)


def test_timeout_ends_the_call_and_the_suite_waits_for_no_second_hang():
    release = threading.Event()
    calls = []

    def hangs():
        calls.append(1)
        release.wait(30)
        return "late"

    suite = _Plain(hangs, None, "t", timeout=0.5)
    try:
        t0 = time.perf_counter()
        with pytest.raises(CandidateError, match=r"timed out: no result after 0\.5 s .*may still be running"):
            suite._call()
        took = time.perf_counter() - t0
        assert 0.5 <= took < 10
        t0 = time.perf_counter()
        with pytest.raises(CandidateError, match=r"not called: an earlier call timed out after 0\.5 s"):
            suite._call()
        assert time.perf_counter() - t0 < 0.4  # no second wait of a full timeout
        assert len(calls) == 1
    finally:
        release.set()
    suite._stuck.join(10)
    assert suite._call() == "late"  # once the slow call ended, the candidate is called again
    assert len(calls) == 2


def test_timeout_through_the_public_functions():
    release = threading.Event()

    def hangs(*args):
        release.wait(30)

    try:
        t0 = time.perf_counter()
        report = check_buckets(hangs, bidirectional=True, timeout=0.5)
        took = time.perf_counter() - t0
        assert {c.status for c in report.checks} == {"error"}
        assert "timed out: no result after 0.5 s" in report.checks[0].summary
        assert all("not called" in c.summary for c in report.checks[1:])
        assert took < 10  # one timeout, not one per check
        report = check_attention(hangs, shapes=[AttentionShape(1, 2, 2, 3, 5, 8)], timeout=0.5)
        assert "timed out: no result after 0.5 s" in report.checks[0].summary
        assert {c.status for c in report.checks} == {"error"}
    finally:
        release.set()


def test_context_variables_reach_the_candidate():
    """The call runs in another thread with the caller's context (what np.errstate and decimal live in)."""
    var = contextvars.ContextVar("var", default="unset")

    def candidate():
        return var.get()

    suite = _Plain(candidate, None, "t")
    assert suite._call() == "unset"
    token = var.set("caller's value")
    try:
        assert suite._call() == "caller's value"
    finally:
        var.reset(token)


def test_torch_grad_mode_reaches_the_candidate():
    """PyTorch's grad mode is per thread: the worker takes the caller's, so no_grad around a check holds."""
    torch = pytest.importorskip("torch")
    suite = _Plain(torch.is_grad_enabled, None, "t")
    with torch.no_grad():
        assert suite._call() is False
    with torch.enable_grad():
        assert suite._call() is True


def test_call_overhead_is_small():
    """A thread per call: far below any attention kernel's time (the figure is printed for the record)."""
    suite = _Plain(lambda x: x, None, "t")
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        suite._call(1)
    per_call = (time.perf_counter() - t0) / n
    print(f"candidate call overhead: {per_call * 1e6:.0f} us")
    assert per_call < 0.02  # generous: 2 shared cores can be slow, yet 20 ms per call would show


# -- what the candidate returns ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returned", "phrase"),
    [
        (None, "got NoneType"),
        ("0 1 2", "got str"),
        ({"buckets": [0, 1]}, "got dict"),
        (["a", "b"], "got list"),
        (np.array(["a", "b"]), "got a ndarray of dtype <U1"),
    ],
    ids=["None", "str", "dict", "list-of-str", "str-array"],
)
def test_non_array_results_are_errors_naming_what_was_returned(returned, phrase):
    report = check_buckets(lambda d: returned, bidirectional=True)
    assert {c.status for c in report.checks} == {"error"}, report.text()
    assert phrase in report["buckets.values"].summary, report.text()
    assert report["buckets.values"].summary.startswith("candidate output: expected an array")


def test_attention_returning_none_is_an_error():
    report = check_attention(lambda q, k, v: None, shapes=[AttentionShape(1, 2, 2, 3, 5, 8)])
    assert not report.passed
    assert {c.status for c in report.checks} == {"error"}, report.text()
    assert "NoneType" in report.checks[0].summary, report.text()


# -- not checked -----------------------------------------------------------------------------------------------


def _checks(statuses: dict[str, str]) -> list[Check]:
    suite = _Plain(print, None, "t")

    def make(name, status):
        return lambda: CheckResult(name, status == "passed", summary=f"{name} summary", status=status)

    return [Check(n, "d", make(n, st), suite) for n, st in statuses.items()]


def test_not_checked_is_a_skip_in_pytest_and_never_a_pass():
    passed, missing, failed = _checks({"a": "passed", "b": "not_checked", "c": "failed"})
    assert passed().status == "passed"
    with pytest.raises(unittest.SkipTest, match="b: NOT CHECKED  b summary"):
        missing()
    with pytest.raises(ConformanceError):
        failed()


def test_expected_failure_on_a_not_checked_check_keeps_it_not_checked():
    report = run_checks(_checks({"a": "passed", "b": "not_checked"}), expected_failures={"b": "no gradient"})
    assert report["b"].status == "not_checked"
    assert report["b"].expected_failure == "no gradient"
    assert not report["b"].passed
    assert report.passed
    assert not report.complete
    # control: a failing check so declared is xfail, a passing one xpass
    report = run_checks(_checks({"a": "passed", "c": "failed"}), expected_failures={"c": "known", "a": "known"})
    assert (report["c"].status, report["a"].status) == ("xfail", "xpass")
