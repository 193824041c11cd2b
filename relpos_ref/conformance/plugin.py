"""pytest integration: parametrise a test over the conformance checks (scikit-learn's ``parametrize_with_checks``).

.. code-block:: python

    import relpos_ref as rp
    from relpos_ref.conformance import bias_checks, parametrize_with_checks
    from mypkg import alibi_bias

    @parametrize_with_checks(
        bias_checks(alibi_bias, rp.ALiBi.from_num_heads(12), q_len=8, k_len=24, causal=True),
        expected_failures={"bias.monotone": "we only support causal use"},
    )
    def test_alibi_conforms(check):
        check()

Each check becomes one test item named after it. A failing check raises
:class:`~relpos_ref.conformance.ConformanceError` (an ``AssertionError``) whose message is the check's report with the
first mismatch, the diagnosis and a reproduction snippet. Known divergences become strict ``xfail`` items, so a fixed
divergence is reported (XPASS fails the run).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from ._core import Check, _match_expected
from .report import ConformanceError

__all__ = ["load_target", "parametrize_with_checks"]


def _flatten(checks: Any) -> list[Check]:
    if isinstance(checks, Check):
        return [checks]
    out: list[Check] = []
    if not isinstance(checks, Iterable):
        msg = f"checks: expected Check objects or lists of them, got {type(checks).__name__}"
        raise TypeError(msg)
    for c in checks:
        out.extend(_flatten(c))
    return out


def parametrize_with_checks(
    checks: Check | Iterable[Any],
    *,
    expected_failures: dict[str, str] | None = None,
    argname: str = "check",
) -> Any:
    """A ``pytest.mark.parametrize`` over conformance checks.

    Parameters
    ----------
    checks : Check or (nested) iterable of Check
        From :func:`bias_checks`, :func:`attention_checks`, :func:`bucket_checks`; combine several suites by giving
        each a distinct ``label``.
    expected_failures : dict, optional
        Check name or ``fnmatch`` pattern -> reason. Those items are marked ``xfail(strict=True,
        raises=ConformanceError)``. A pattern that matches no check is an error (it would hide a typo).
    argname : str, default "check"
        Name of the test function's argument that receives the :class:`Check`.
    """
    import pytest

    items = _flatten(checks)
    if not items:
        msg = "checks: expected at least one Check, got none"
        raise ValueError(msg)
    names = [c.name for c in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        msg = f"checks: expected unique check names (give each suite its own label=), got duplicates {dupes}"
        raise ValueError(msg)
    marks = _match_expected(items, expected_failures)
    params = []
    for c in items:
        m = []
        if c.name in marks:
            m.append(pytest.mark.xfail(reason=marks[c.name], raises=ConformanceError, strict=True))
        params.append(pytest.param(c, id=c.name, marks=m))
    return pytest.mark.parametrize(argname, params)


def load_target(target: str) -> Any:
    """The object named by ``"package.module:attribute.path"``."""
    if not isinstance(target, str) or ":" not in target:
        msg = f"target: expected 'package.module:function', got {target!r}"
        raise ValueError(msg)
    mod_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        msg = f"target: cannot import module {mod_name!r} ({type(exc).__name__}: {exc})"
        raise ImportError(msg) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            msg = f"target: module {mod_name!r} has no attribute {attr!r}"
            raise AttributeError(msg) from exc
    return obj
