"""pytest hooks for ``pytest --pyargs relpos_ref.conformance`` (see ``test_implementation.py``).

This conftest is found during collection, after pytest printed its session header, so the description of what is
tested goes into the lines printed after "collected N items".
"""

from __future__ import annotations

import os


def _lines() -> list[str]:
    if not os.environ.get("RELPOS_REF_IMPL"):
        return ["relpos_ref conformance: RELPOS_REF_IMPL is not set; nothing to test"]
    from relpos_ref.conformance.test_implementation import suite_header

    return ["relpos_ref conformance:"] + [f"  {k}: {v}" for k, v in suite_header().items()]


def pytest_report_collectionfinish(config, start_path, items):
    return _lines()
