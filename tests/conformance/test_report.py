"""Tests of conformance reports (relpos_ref.conformance.report): statuses, verdicts, counts and their JSON.

The reports are built by hand from CheckResults; the expected texts are written out here, never taken from a
report.
"""

from __future__ import annotations

import json

import pytest

from relpos_ref.conformance import ConformanceError, Report
from relpos_ref.conformance.report import CheckResult

pytestmark = pytest.mark.conformance


def _report(*statuses: str) -> Report:
    checks = [
        CheckResult(f"s.c{i}", st in ("passed", "xfail"), summary=f"check {i}", status=st)
        for i, st in enumerate(statuses)
    ]
    return Report(checks, {"candidate": "hand-made"})


def test_not_checked_result_never_counts_as_passed():
    res = CheckResult("s.grad", True, summary="gradient of 'slopes' not returned", status="not_checked")
    assert res.passed is False  # even when constructed with passed=True
    assert res.text().startswith("s.grad: NOT CHECKED  gradient of 'slopes' not returned")
    assert res.to_dict()["status"] == "not_checked"
    assert res.to_dict()["passed"] is False


def test_complete_passing_report():
    report = _report("passed", "passed")
    assert report.passed
    assert report.complete
    assert report.verdict() == "PASSED"
    assert report.counts() == "2 passed of 2"
    assert report.not_checked == []
    assert report.failures == []
    report.assert_passed()


def test_passed_but_incomplete_report():
    report = _report(*["passed"] * 26, "not_checked")
    assert report.passed  # every check that was run passed
    assert not report.complete
    assert report.counts() == "26 passed, 1 not checked of 27"
    assert report.verdict() == "PASSED, INCOMPLETE (1 of 27 checks not checked)"
    assert [c.name for c in report.not_checked] == ["s.c26"]
    assert report.failures == []
    text = report.text()
    assert text.startswith("relpos_ref conformance: PASSED, INCOMPLETE (1 of 27 checks not checked)\n")
    row = next(line for line in report.table().splitlines() if line.startswith("s.c26 "))
    assert row.split()[1:3] == ["NOT", "CHECKED"]
    assert "not checked (the candidate did not provide them): s.c26" in text
    assert "s.c26: NOT CHECKED  check 26" in text  # the detail section lists it like a failure
    with pytest.raises(ConformanceError, match=r"not checked: s\.c26"):
        report.assert_passed()
    report.assert_passed(allow_incomplete=True)


def test_failures_exclude_not_checked_and_fail_the_report():
    report = _report("passed", "failed", "not_checked", "error")
    assert not report.passed
    assert not report.complete
    assert [c.name for c in report.failures] == ["s.c1", "s.c3"]
    assert report.counts() == "1 passed, 1 failed, 1 error, 1 not checked of 4"
    assert report.verdict() == "FAILED (2 of 4 checks)"
    with pytest.raises(ConformanceError):
        report.assert_passed(allow_incomplete=True)


def test_nothing_checked_is_not_a_pass():
    report = _report("not_checked", "not_checked")
    assert not report.passed
    assert not report.complete
    assert report.counts() == "0 passed, 2 not checked of 2"


def test_known_divergences_are_counted():
    report = _report("passed", "xfail", "xpass")
    assert not report.passed  # the xpass: a declared divergence that no longer fails
    assert report.counts() == "1 passed, 1 known divergence, 1 fixed known divergence (xpass) of 3"
    assert _report("passed", "xfail").passed
    assert _report("error", "error", "failed").counts() == "0 passed, 1 failed, 2 errors of 3"


def test_json_has_completeness_and_counts():
    report = _report("passed", "not_checked")
    data = json.loads(report.to_json())
    assert data["passed"] is True
    assert data["complete"] is False
    assert data["not_checked"] == ["s.c1"]
    assert data["summary"] == "1 passed, 1 not checked of 2"
    assert [c["status"] for c in data["checks"]] == ["passed", "not_checked"]
    assert json.loads(_report("passed").to_json())["complete"] is True
