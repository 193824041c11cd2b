"""The conformance harness on real peers (PyTorch, HF transformers): the verdicts recorded in spec/peers.md.

Forward cases run ``check_bias``/``check_buckets``/``check_attention`` on the peers' functions; backward cases
(``bwd_*``) run ``check_attention_backward`` on PyTorch autograd through them.

The candidates and cases are in ``tools/peers/`` (developer tooling, not in the wheel; the repository root is on
pytest's path). Needs the ``peers`` extra (``pip install -e ".[test,peers]"``; PyTorch CPU is enough); skipped
without it. Each case asserts the verdict the harness gives a real library function, and the diagnosis phrase for a
convention difference, so a change in a peer (or in the harness) that alters a recorded verdict fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.peers

torch = pytest.importorskip("torch", reason="the peers tests need PyTorch (pip install -e '.[peers]')")
pytest.importorskip("transformers", reason="the peers tests need HF transformers (pip install -e '.[peers]')")

from tools.peers.cases import cases  # noqa: E402
from tools.peers.verdicts import run_case  # noqa: E402

CASES = cases()
SPEC = Path(__file__).resolve().parents[2] / "spec" / "peers.md"


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_peer_verdict(case):
    if case.needs is not None:
        pytest.importorskip(case.needs, reason=f"case {case.key} runs {case.needs}'s own code")
    report, _ = run_case(case)
    assert report.passed == case.expect_pass, report.text()
    if case.expect_text is not None:
        # A candidate that raises is described by its exception (the summary of an "error" check).
        text = " ".join(
            d
            for c in report.failures
            for d in (*c.diagnosis, *c.details, *([c.summary] if c.status == "error" else []))
        )
        assert case.expect_text in text, report.text()
    if not case.expect_pass:
        # A convention difference must come with an explanation from the harness, not just a failure.
        value_checks = [c for c in report.failures if c.status == "failed" and _is_value_check(c.name)]
        assert all(c.diagnosis for c in value_checks), report.text()


def _is_value_check(name):
    """bias.values.<case> and the backward harness's backward.<gradient>.<case>."""
    return ".values." in name or (name.startswith("backward.") and name.count(".") == 2)


def test_spec_table_matches_recorded_verdicts():
    """spec/peers.md lists every case in order with the verdict recorded in tools/peers/cases.py."""
    if not SPEC.exists():
        pytest.skip("spec/peers.md not present (source checkout only)")
    rows = [ln for ln in SPEC.read_text(encoding="utf-8").splitlines() if re.match(r"^\| \d+ \|", ln)]
    assert len(rows) == len(CASES)
    for row, case in zip(rows, CASES, strict=True):
        verdict = "PASS" if case.expect_pass else "FAIL"
        assert f"**{verdict}" in row, (case.key, row)
