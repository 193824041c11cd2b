"""Conformance of an implementation named by environment variables (the array-api-tests model).

.. code-block:: console

    RELPOS_REF_IMPL=mypkg.bias:alibi RELPOS_REF_ARGS="--family alibi --heads 12 --causal" \\
        pytest --pyargs relpos_ref.conformance

``RELPOS_REF_IMPL``
    ``package.module:function``, the candidate.
``RELPOS_REF_ARGS``
    Options of ``relpos-ref conform`` (``--kind``, ``--family``, ``--heads``, ``--params``, ``--causal``,
    ``--equivalence``, ``--dtype``, ``--xp``, ...); ``relpos-ref conform --help`` lists them.
``RELPOS_REF_XFAIL``
    Comma-separated check names or fnmatch patterns that are known divergences (strict xfail); ``name=reason``
    gives the reason.

One test per check, named after it. Without ``RELPOS_REF_IMPL`` the single test is skipped with the reason.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import pytest

from relpos_ref.conformance.cli import build_checks, expected_from_args, parse_env_args
from relpos_ref.conformance.plugin import parametrize_with_checks

__all__ = ["suite_header"]


@functools.cache
def _suite() -> tuple[list[Any], dict[str, str]]:
    impl = os.environ["RELPOS_REF_IMPL"]
    text = os.environ.get("RELPOS_REF_ARGS", "")
    try:
        args = parse_env_args(impl, text)
        checks = build_checks(args)
    except SystemExit:  # argparse reports the problem on stderr, then exits
        msg = f"RELPOS_REF_ARGS: expected options of 'relpos-ref conform' (see its --help), got {text!r}"
        raise pytest.UsageError(msg) from None  # the message says it all; no chained traceback
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as exc:
        msg = f"RELPOS_REF_IMPL / RELPOS_REF_ARGS: {exc}"
        raise pytest.UsageError(msg) from None  # the message says it all; no chained traceback
    items = [x for x in os.environ.get("RELPOS_REF_XFAIL", "").split(",") if x.strip()]
    return checks, expected_from_args(items)


def suite_header() -> dict[str, Any]:
    """What is tested, with which conventions and tolerances (printed in pytest's header)."""
    checks, expected = _suite()
    header = dict(checks[0]._suite.header())
    header["RELPOS_REF_ARGS"] = os.environ.get("RELPOS_REF_ARGS", "")
    if expected:
        header["known divergences"] = ", ".join(f"{k} ({v})" for k, v in expected.items())
    header["checks"] = str(len(checks))
    return header


def pytest_generate_tests(metafunc):
    if "conformance_check" not in metafunc.fixturenames:
        return
    if not os.environ.get("RELPOS_REF_IMPL"):
        metafunc.parametrize("conformance_check", [pytest.param(None, id="no-implementation")])
        return
    checks, expected = _suite()
    mark = parametrize_with_checks(checks, expected_failures=expected, argname="conformance_check")
    metafunc.parametrize(*mark.args, **mark.kwargs)


def test_conformance(conformance_check):
    __tracebackhide__ = True
    if conformance_check is None:
        pytest.skip(
            "RELPOS_REF_IMPL is not set: name the implementation, e.g. RELPOS_REF_IMPL=mypkg.bias:alibi "
            'RELPOS_REF_ARGS="--family alibi --heads 12" pytest --pyargs relpos_ref.conformance'
        )
    conformance_check()
