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
    status : {"passed", "failed", "error", "xfail", "xpass"}
        ``"error"``: the candidate raised or returned something unusable. ``"xfail"``/``"xpass"``: the check was
        declared a known divergence.
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

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def text(self) -> str:
        """Multi-line description: the table row's facts plus mismatch, diagnosis and reproduction."""
        lines = [f"{self.name}: {self.status.upper()}  {self.summary}"]
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
        True when no check failed (known divergences declared with ``expected_failures`` do not count).
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
        return all(c.status in ("passed", "xfail") for c in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status not in ("passed", "xfail")]

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
                    c.status.upper() if c.status != "passed" else "ok",
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
        n_fail = len(self.failures)
        verdict = "PASSED" if self.passed else f"FAILED ({n_fail} of {len(self.checks)} checks)"
        lines = [f"relpos_ref conformance: {verdict}"]
        width = max((len(k) for k in self.header), default=0)
        lines.extend(f"{k:<{width}} : {v}" for k, v in self.header.items())
        lines.append("")
        lines.append(self.table())
        lines.extend(f"not applicable: {n}" for n in self.notes)
        interesting = [c for c in self.checks if c.status != "passed" or c.details]
        if interesting:
            lines.append("")
            for c in interesting:
                lines.append(c.text())
                lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def __str__(self) -> str:
        return self.text()

    def assert_passed(self) -> None:
        """Raise :class:`ConformanceError` with the full text when a check failed."""
        if not self.passed:
            raise ConformanceError(self.text())


def _nonfinite(x: float) -> str | None:
    """ "nan", "inf" or "-inf" for a non-finite number (as tables and JSON write it), None for a finite one."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return None


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
