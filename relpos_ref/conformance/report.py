"""Conformance results: one :class:`CheckResult` per check, collected in a :class:`Report`."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

__all__ = ["CheckResult", "ConformanceError", "Report"]


class ConformanceError(AssertionError):
    """Raised by a check run from pytest (``parametrize_with_checks``) when the candidate fails it."""


@dataclasses.dataclass
class CheckResult:
    """The outcome of one check.

    Attributes
    ----------
    name : str
        Stable identifier, e.g. ``"bias.values.main"``; usable in ``expected_failures``.
    passed : bool
        False for ``"not_checked"``: a check that compared nothing did not pass (nor fail).
    status : {"passed", "failed", "error", "xfail", "xpass", "not_checked"}
        ``"error"``: the candidate raised or returned something unusable. ``"xfail"``/``"xpass"``: the check was
        declared a known divergence. ``"not_checked"``: the candidate did not provide the quantity the check
        compares (a parameter gradient it does not return); shown as NOT CHECKED, never counted as passed.
    summary : str
        One line: what was compared and how it went.
    max_abs, max_rel : float or None
        Largest absolute and relative error over the compared entries (None for property checks without errors).
    bound : float or None
        Largest accepted absolute error (the tolerance resolved to a number).
    tolerance : str or None
        Statement of the tolerance rule used.
    mismatch : dict or None
        First failing entry: ``index`` (tuple), ``candidate``, ``reference`` and context (positions, offset).
    diagnosis : list of str
        Convention mismatches that explain the failure, when one does.
    details : list of str
        Further facts (row shift found, skipped parts, ...).
    reproduction : str or None
        Copy-pasteable Python that recomputes the first mismatch.
    """

    name: str
    passed: bool
    summary: str = ""
    max_abs: float | None = None
    max_rel: float | None = None
    bound: float | None = None
    tolerance: str | None = None
    mismatch: dict[str, Any] | None = None
    diagnosis: list[str] = dataclasses.field(default_factory=list)
    details: list[str] = dataclasses.field(default_factory=list)
    reproduction: str | None = None
    status: str = ""
    expected_failure: str | None = None

    def __post_init__(self) -> None:
        if not self.status:
            self.status = "passed" if self.passed else "failed"
        if self.status == "not_checked":
            self.passed = False

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def text(self) -> str:
        """Multi-line description: the table row's facts plus mismatch, diagnosis and reproduction."""
        lines = [f"{self.name}: {_status_text(self.status)}  {self.summary}"]
        if self.max_abs is not None:
            lines.append(
                f"  max abs err {_num(self.max_abs)}, max rel err {_num(self.max_rel)}, bound {_num(self.bound)}"
            )
        if self.tolerance:
            lines.append(f"  tolerance: {self.tolerance}")
        if self.mismatch:
            lines.append(f"  first mismatch: {_mismatch_text(self.mismatch)}")
        lines.extend(f"  diagnosis: {d}" for d in self.diagnosis)
        lines.extend(f"  note: {d}" for d in self.details)
        if self.expected_failure:
            lines.append(f"  declared known divergence: {self.expected_failure}")
        if self.reproduction:
            lines.append("  reproduce:")
            lines.extend("    " + ln for ln in self.reproduction.splitlines())
        return "\n".join(lines)


@dataclasses.dataclass
class Report:
    """All checks of one conformance run.

    Attributes
    ----------
    passed : bool
        True when no check that was run failed (known divergences declared with ``expected_failures`` do not
        count) and at least one check was run. Checks with status ``"not_checked"`` do not count either way: see
        ``complete``.
    complete : bool
        True when every check was run: none is ``"not_checked"``. A report that passed but is not complete shows
        only that what was compared agrees; ``relpos-ref conform`` exits 1 for it unless ``--allow-incomplete``.
    checks : list of CheckResult
    header : dict
        What was tested: candidate, reference, kind, dtype, options, tolerance rule.
    notes : list of str
        Checks that did not apply to this configuration, and why.
    """

    checks: list[CheckResult]
    header: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        checked = [c for c in self.checks if c.status != "not_checked"]
        # A report where nothing was compared has shown nothing: it does not pass vacuously.
        return bool(checked) and all(c.status in ("passed", "xfail") for c in checked)

    @property
    def complete(self) -> bool:
        return not self.not_checked

    @property
    def failures(self) -> list[CheckResult]:
        """The checks that failed, raised (error) or passed although declared a known divergence (xpass)."""
        return [c for c in self.checks if c.status not in ("passed", "xfail", "not_checked")]

    @property
    def not_checked(self) -> list[CheckResult]:
        """The checks whose quantity the candidate did not provide."""
        return [c for c in self.checks if c.status == "not_checked"]

    def counts(self) -> str:
        """One line of counts by status, e.g. ``"26 passed, 1 not checked of 27"``."""
        # status: (singular, plural)
        words = {
            "failed": ("failed", "failed"),
            "error": ("error", "errors"),
            "xfail": ("known divergence", "known divergences"),
            "xpass": ("fixed known divergence (xpass)", "fixed known divergences (xpass)"),
            "not_checked": ("not checked", "not checked"),
        }
        n = {k: sum(c.status == k for c in self.checks) for k in ("passed", *words)}
        parts = [f"{n['passed']} passed"] + [f"{n[k]} {w[n[k] != 1]}" for k, w in words.items() if n[k]]
        return f"{', '.join(parts)} of {len(self.checks)}"

    def verdict(self) -> str:
        """The verdict: PASSED, "PASSED, INCOMPLETE (n of m checks not checked)" or "FAILED (n of m checks)"."""
        if not self.passed:
            return f"FAILED ({len(self.failures)} of {len(self.checks)} checks)"
        if not self.complete:
            return f"PASSED, INCOMPLETE ({len(self.not_checked)} of {len(self.checks)} checks not checked)"
        return "PASSED"

    def __getitem__(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        msg = f"name: expected one of {[c.name for c in self.checks]}, got {name!r}"
        raise KeyError(msg)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "passed": self.passed,
                "complete": self.complete,
                "not_checked": [c.name for c in self.not_checked],
                "summary": self.counts(),
                "header": self.header,
                "notes": self.notes,
                "checks": [c.to_dict() for c in self.checks],
            }
        )

    def to_json(self, **kwargs: Any) -> str:
        """The report as JSON (non-finite floats as the strings "inf", "-inf", "nan")."""
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        """The one-row-per-check table."""
        head = ("check", "result", "max abs err", "max rel err", "bound", "first mismatch / note")
        rows = []
        for c in self.checks:
            note = _mismatch_text(c.mismatch) if c.mismatch else (c.diagnosis[0] if c.diagnosis else c.summary)
            rows.append(
                (
                    c.name,
                    _status_text(c.status) if c.status != "passed" else "ok",
                    _num(c.max_abs),
                    _num(c.max_rel),
                    _num(c.bound),
                    note,
                )
            )
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        widths[-1] = len(head[-1])
        fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines.extend(fmt.format(*r) for r in rows)
        return "\n".join(lines)

    def text(self) -> str:
        lines = [f"relpos_ref conformance: {self.verdict()}"]
        width = max((len(k) for k in self.header), default=0)
        lines.extend(f"{k:<{width}} : {v}" for k, v in self.header.items())
        lines.append("")
        lines.append(self.table())
        lines.extend(f"not applicable: {n}" for n in self.notes)
        if self.not_checked:
            lines.append(f"not checked (the candidate did not provide them): {_names(self.not_checked)}")
        interesting = [c for c in self.checks if c.status != "passed" or c.details]
        if interesting:
            lines.append("")
            for c in interesting:
                lines.append(c.text())
                lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def __str__(self) -> str:
        return self.text()

    def assert_passed(self, *, allow_incomplete: bool = False) -> None:
        """Raise :class:`ConformanceError` with the full text when a check failed, or, unless
        ``allow_incomplete``, when a check was not checked (as ``relpos-ref conform`` exits 1 for both)."""
        if not self.passed:
            raise ConformanceError(self.text())
        if not allow_incomplete and not self.complete:
            msg = (
                f"not checked: {_names(self.not_checked)} (the candidate did not provide them; "
                f"allow_incomplete=True accepts that)\n\n{self.text()}"
            )
            raise ConformanceError(msg)


def _nonfinite(x: float) -> str | None:
    """ "nan", "inf" or "-inf" for a non-finite number (as tables and JSON write it), None for a finite one."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return None


def _status_text(status: str) -> str:
    """A status as tables show it: "FAILED", "NOT CHECKED"."""
    return status.upper().replace("_", " ")


def _names(checks: list[CheckResult]) -> str:
    return ", ".join(c.name for c in checks)


def _num(x: float | None) -> str:
    return "-" if x is None else _nonfinite(x) or f"{x:.2e}"


def _mismatch_text(m: dict[str, Any]) -> str:
    ctx = ", ".join(f"{k} {v}" for k, v in m.items() if k not in ("index", "candidate", "reference"))
    idx = m.get("index")
    where = f"at {tuple(idx)}" if idx is not None else ""
    return f"{where} ({ctx}): candidate {m.get('candidate')!r}, reference {m.get('reference')!r}".strip()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return _nonfinite(obj) or obj
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    try:  # NumPy scalars
        return _jsonable(obj.item())
    except AttributeError:
        return str(obj)
