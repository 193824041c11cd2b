"""Tests of ``relpos-ref verify``'s presentation, backend availability and exit status (relpos_ref.verify).

What verify computes is covered by the suites of each family and of attention; here the matrix and the oracle table
are replaced by small fakes wherever the test is about what is printed or returned, so each test takes well under a
second (a real run takes about 25 s).
"""

from __future__ import annotations

import importlib.util
import io
import sys
import types

import numpy as np
import pytest

import relpos_ref.bounds
from relpos_ref import _checks, verify
from relpos_ref.cli import main

NUMPY = ("numpy", _checks.default_namespace(), None)
#: verify adds bfloat16 to the oracle table when ml_dtypes (NumPy's bfloat16) is installed.
BFLOAT16 = ("bfloat16",) if importlib.util.find_spec("ml_dtypes") else ()


def _backends(*entries):
    return lambda: list(entries)


def _row(case="bias alibi", dtype="float32", max_abs=1e-7, scale=2.0, props=(), error=None) -> verify.Row:
    tol = verify.TOLERANCES[dtype]
    return verify.Row(case, "numpy", dtype, max_abs, 0.5, tol, list(props), error=error, scale=scale)


@pytest.fixture
def fake_runs(monkeypatch):
    """run_verify and the oracle table replaced by fakes; returns the list of calls they received."""
    calls: list[tuple] = []

    def run_verify(*, backends, dtypes, seed, progress):
        calls.append(("run_verify", backends, dtypes))
        progress("numpy float32 bias alibi")
        return [_row()], []

    def oracle_table(namespaces, dtypes, thorough=False):
        calls.append(("oracle", len(namespaces), tuple(dtypes)))
        return []

    monkeypatch.setattr(verify, "run_verify", run_verify)
    monkeypatch.setattr(relpos_ref.bounds, "oracle_table", oracle_table)
    return calls


# -- a requested backend that cannot run is a failure ------------------------------------------------------------


def test_requested_backend_without_a_gpu_fails_with_the_reason(monkeypatch, capsys, fake_runs):
    monkeypatch.setattr(
        verify,
        "available_backends",
        _backends(NUMPY, ("cupy", None, "installed, but no CUDA GPU is available")),
    )
    assert main(["verify", "--backend", "cupy"]) == 1
    out, err = capsys.readouterr()
    assert err == (
        "relpos-ref verify: FAILED: --backend cupy cannot run here: installed, but no CUDA GPU is available\n"
    )
    assert "OK" not in out
    assert fake_runs == []  # nothing ran: no "0 of 0 rows passed"


def test_requested_backend_not_installed_fails(monkeypatch, capsys, fake_runs):
    reason = "not installed (pip install array-api-strict)"
    monkeypatch.setattr(verify, "available_backends", _backends(NUMPY, ("array_api_strict", None, reason)))
    assert main(["verify", "--backend", "numpy", "--backend", "array_api_strict"]) == 1
    assert (
        capsys.readouterr().err == f"relpos-ref verify: FAILED: --backend array_api_strict cannot run here: {reason}\n"
    )
    assert fake_runs == []


def test_requested_backend_without_the_requested_dtypes_fails(monkeypatch, capsys, fake_runs):
    no_half = types.SimpleNamespace(float64=np.float64, float32=np.float32)
    monkeypatch.setattr(verify, "available_backends", _backends(NUMPY, ("array_api_strict", no_half, None)))
    assert main(["verify", "--backend", "array_api_strict", "--dtype", "float16"]) == 1
    assert capsys.readouterr().err == (
        "relpos-ref verify: FAILED: --backend array_api_strict cannot run here: it has none of the dtypes asked for "
        "(float16)\n"
    )


def test_numpy_alone_without_backend_option_is_ok(monkeypatch, capsys, fake_runs):
    """Unavailable backends that nobody asked for are notes, not failures."""
    monkeypatch.setattr(
        verify,
        "available_backends",
        _backends(NUMPY, ("array_api_strict", None, "not installed"), ("cupy", None, "not installed")),
    )
    assert main(["verify", "--dtype", "float32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("\nOK")
    oracle_calls = [("oracle", 1, (d,)) for d in ("float32", *BFLOAT16)]
    assert fake_runs == [("run_verify", None, ("float32",)), *oracle_calls]


def test_nothing_checked_is_a_failure(monkeypatch, capsys, fake_runs):
    monkeypatch.setattr(verify, "run_verify", lambda **kwargs: ([], []))
    assert main(["verify", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "0 of 0 agreement rows passed" in out
    assert "FAILED: nothing was checked" in out
    assert "\nOK" not in out


def test_cupy_reasons(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    reasons = {name: reason for name, _, reason in verify.available_backends()}
    assert reasons["cupy"].startswith("not installed (pip install 'relpos_ref[cuda12]'")
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(is_available=lambda: False))
    reasons = {name: reason for name, _, reason in verify.available_backends()}
    assert reasons["cupy"] == "installed, but no CUDA GPU is available"

    def broken() -> bool:
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(is_available=broken))
    reasons = {name: reason for name, _, reason in verify.available_backends()}
    assert reasons["cupy"] == "installed, but not usable (RuntimeError: CUDA driver version is insufficient)"


# -- the tables --------------------------------------------------------------------------------------------------


def _assert_fits(text: str) -> None:
    lines = text.splitlines()
    assert [line for line in lines if len(line) >= 120] == []
    assert [line for line in lines if line != line.rstrip()] == []


def test_agreement_table_compares_the_max_abs_error_with_the_scaled_bound():
    ok = _row(max_abs=2e-6, scale=3.0)  # bound 5e-6 x 3 = 1.5e-5: passes although 2e-6 > tol
    bad = _row(case="attention fire", max_abs=2e-5, scale=3.0)
    text = verify.format_table([ok, bad])
    head, _, line_ok, line_bad = text.splitlines()
    assert head.split() == ["case", "backend", "dtype", "result", "max", "abs", "err", "bound", "err/bound"]
    assert "rel" not in head  # entrywise relative errors (3.0 where x64 is near 0) are not what is compared
    assert line_ok.split()[-4:] == ["ok", "2.00e-06", "1.5e-05", "0.133"]
    assert line_bad.split()[-4:] == ["FAIL", "2.00e-05", "1.5e-05", "1.333"]
    _assert_fits(text)


def test_agreement_table_wraps_properties_and_errors_under_120_columns():
    props = [(f"property number {i}", i != 3) for i in range(12)]
    rows = [
        _row(case="properties alibi", dtype="float64", max_abs=0.0, props=props),
        _row(case="attention fire", error="ValueError: " + "a long message " * 12),
    ]
    text = verify.format_table(rows)
    _assert_fits(text)
    lines = text.splitlines()
    assert lines[2].split()[:5] == ["properties", "alibi", "numpy", "float64", "FAIL"]
    assert "property number 3 FAIL" in " ".join(text.split())
    error_start = next(i for i, line in enumerate(lines) if line.startswith("attention fire"))
    assert "ERROR ValueError: a long message" in lines[error_start]
    assert lines[error_start + 1].startswith(" " * 60)  # continued under the message, not at column 0


def test_oracle_table_shows_the_error_where_the_bound_is_tightest():
    """The bound is per entry; a max abs error of 8 next to a bound of 0.06 read as a failure of an ok row."""
    row = {
        "family": "alibi",
        "backend": "array_api_compat.numpy",
        "dtype": "float16",
        "cases": 4750,
        "max_abs_err": 8.0,
        "max_rel_err": 4.8e-4,
        "bound": 0.0639,
        "ratio": 0.974,
        "passed": True,
    }
    text = verify._format_oracle([row])
    head, _, line = text.splitlines()
    assert head.split() == [
        "family",
        "backend",
        "dtype",
        "entries",
        "ok",
        "err",
        "there",
        "bound",
        "there",
        "err/bound",
    ]
    assert line.split() == ["alibi", "numpy", "float16", "4750", "yes", "0.0622", "0.0639", "0.974"]
    _assert_fits(text)


def test_oracle_rows_are_those_of_one_call(monkeypatch, capsys):
    """Measured one backend and dtype at a time (for the progress line), the rows are those of one call."""
    original = relpos_ref.bounds.oracle_table

    def slopes_only(namespaces, dtypes, thorough=False):
        return original(namespaces, dtypes, thorough, families=["alibi_slopes"])

    monkeypatch.setattr(relpos_ref.bounds, "oracle_table", slopes_only)
    progress = verify.Progress(io.StringIO())
    assert verify._print_oracle(None, ("float32", "float16"), thorough=False, progress=progress) == 0
    printed = capsys.readouterr().out
    names = [xp for name, xp, _ in verify.available_backends() if xp is not None]
    wanted = ["float32", "float16", *BFLOAT16]
    assert verify._format_oracle(slopes_only(names, wanted)) in printed
    stages = progress.stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in stages][:2] == ["oracle numpy float32", "oracle numpy float16"]
    _assert_fits(printed)


# -- progress ------------------------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_rewrites_one_line():
    stream = _Terminal()
    p = verify.Progress(stream)
    p("agreement numpy float32", "bias alibi")
    p("agreement numpy float32", "bias t5")
    p.close()
    text = stream.getvalue()
    assert "\n" not in text
    assert text.count("\r") == 4  # two updates, then the line erased and the cursor back at its start
    assert "agreement numpy float32 bias t5" in text
    assert text.endswith("\r")
    assert max(len(part) for part in text.split("\r")) < 120


def test_progress_elsewhere_prints_a_line_per_stage():
    stream = io.StringIO()
    p = verify.Progress(stream)
    for case in ("bias alibi", "bias t5"):
        p("agreement numpy float32", case)
    p("oracle numpy float32")
    p.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["agreement numpy float32", "oracle numpy float32"]
    assert "\r" not in stream.getvalue()


def test_progress_disabled_writes_nothing():
    stream = _Terminal()
    p = verify.Progress(stream, enabled=False)
    p("agreement numpy float32", "bias alibi")
    p.close()
    assert stream.getvalue() == ""


def test_verify_reports_progress_on_stderr(monkeypatch, capsys, fake_runs):
    monkeypatch.setattr(verify, "available_backends", _backends(NUMPY))
    assert main(["verify", "--dtype", "float64"]) == 0
    out, err = capsys.readouterr()
    stages = [line.split(": ", 1)[1] for line in err.splitlines()]
    assert stages == ["agreement numpy float32", *(f"oracle numpy {d}" for d in ("float64", *BFLOAT16))]
    _assert_fits(out)
