"""Tests of the T5 bucket suite (relpos_ref.conformance.buckets): the repeatable check and the call protocol.

The control is a bucket function written here as HF's ``T5Attention._relative_position_bucket`` computes it
(float32 logarithm, truncation); the mutants wrap it and misbehave in one way each.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from relpos_ref.conformance import bucket_checks, check_buckets

pytestmark = pytest.mark.conformance


def hf_buckets(delta, *, bidirectional=True, num_buckets=32, max_distance=128):
    """HF's T5 bucket of relative_position = key - query = -delta."""
    rel = -np.asarray(delta, dtype=np.int64)
    out = np.zeros(rel.shape, dtype=np.int64)
    nb = num_buckets
    if bidirectional:
        nb //= 2
        out += np.where(rel > 0, nb, 0)
        n = np.abs(rel)
    else:
        n = -np.minimum(rel, 0)
    exact = nb // 2
    nf = np.maximum(n, 1).astype(np.float32)
    scaled = np.log(nf / np.float32(exact)) / np.float32(np.log(max_distance / exact)) * np.float32(nb - exact)
    large = np.minimum(exact + scaled.astype(np.int64), nb - 1)
    return out + np.where(n < exact, n, large)


def test_control_passes_every_check():
    report = check_buckets(hf_buckets, bidirectional=True)
    assert report.passed, report.text()
    assert report.complete
    assert [c.name for c in report.checks] == [
        "buckets.values",
        "buckets.values.matrix",
        "buckets.dtype",
        "buckets.range",
        "buckets.monotone",
        "buckets.repeatable",
    ]
    assert check_buckets(lambda d: hf_buckets(d, bidirectional=False), bidirectional=False).passed


def clips_in_place(delta):
    out = hf_buckets(delta)
    np.clip(delta, -500, 500, out=delta)  # after computing: the buckets are right, the caller's offsets are not
    return out


def negates_in_place(delta):
    delta *= -1
    return hf_buckets(-delta)


def reshapes_in_place(delta):
    out = hf_buckets(delta)
    if delta.ndim == 1:
        delta.shape = (1, delta.size)
    return out


def test_in_place_modification_is_caught():
    report = check_buckets(clips_in_place, bidirectional=True)
    assert report["buckets.values"].passed  # the values alone would not show it
    res = report["buckets.repeatable"]
    assert res.status == "failed", report.text()
    assert not report.passed
    assert any("modified its delta argument in place" in d for d in res.diagnosis)
    # the suite's offsets reach -512 and +512 in the range part; clipping changes each one past +-500
    assert res.mismatch["reference"] < -500
    assert res.mismatch["candidate"] == -500


def test_in_place_negation_and_reshape_are_caught():
    report = check_buckets(negates_in_place, bidirectional=True)
    assert report["buckets.values"].passed
    assert report["buckets.repeatable"].status == "failed"
    assert "in place" in report["buckets.repeatable"].diagnosis[-1]
    report = check_buckets(reshapes_in_place, bidirectional=True)
    assert report["buckets.repeatable"].status == "failed"
    assert "its shape became (1, " in report["buckets.repeatable"].diagnosis[-1]


def test_non_deterministic_candidate_is_caught():
    calls = []

    def flaky(delta):
        calls.append(1)
        out = hf_buckets(delta)
        out[0] += len(calls) % 2  # every other call differs in one entry
        return out

    res = check_buckets(flaky, bidirectional=True)["buckets.repeatable"]
    assert res.status == "failed"
    assert res.diagnosis == ["two calls with the same offsets returned different buckets"]


def test_timeout_keyword():
    release = threading.Event()

    def hangs(delta):
        release.wait(30)
        return hf_buckets(delta)

    try:
        t0 = time.perf_counter()
        checks = bucket_checks(hangs, bidirectional=True, timeout=0.5)
        res = checks[0].run()
        assert res.status == "error"
        assert res.summary.startswith("candidate timed out: no result after 0.5 s")
        assert time.perf_counter() - t0 < 10
    finally:
        release.set()
    report = check_buckets(hf_buckets, bidirectional=True, timeout=5)
    assert report.passed
    with pytest.raises(ValueError, match="timeout"):
        check_buckets(hf_buckets, bidirectional=True, timeout=0)
    with pytest.raises(TypeError, match="timeout"):
        bucket_checks(hf_buckets, bidirectional=True, timeout="10")


def test_reproduction_leads_with_the_reported_mismatch():
    # Wrong past +-200 (hundreds of distinct bad offsets): the snippet shows at most 40 of them, and the one the
    # report names must be among them, first, so that running it shows the reported difference.
    def far_wrong(delta):
        out = hf_buckets(delta)
        return np.where(np.abs(np.asarray(delta)) > 200, 0, out)

    report = check_buckets(far_wrong, bidirectional=True)
    bad = next(c for c in report.checks if not c.passed and c.mismatch and "delta" in c.mismatch)
    first = bad.mismatch["delta"]
    snippet = bad.reproduction
    line = next(x for x in snippet.splitlines() if x.startswith("delta = np.array("))
    shown = eval(line.split("=", 1)[1].split("  #")[0].strip(), {"np": np})
    assert int(shown[0]) == first
    assert len(shown) <= 41
