"""Run the peer cases through the conformance harness and write their verdicts (spec/peers.md).

.. code-block:: console

    pip install -e ".[peers]"                  # from a source checkout: PyTorch (CPU is enough), HF transformers
    python -m tools.peers.verdicts             # print the verdict table (run from the repository root)
    python -m tools.peers.verdicts --write spec/peers.md

Every candidate calls the peer library's own function (HF ``T5Attention._relative_position_bucket`` and
``compute_bias``, HF BLOOM ``build_alibi_tensor``, ``torch.nn.functional.scaled_dot_product_attention``, PyTorch
FlexAttention in eager mode on CPU with a ``score_mod``); only the glue that turns the harness's positions or q, k, v
into the peer's arguments is written in ``tools/peers/adapters.py``. Backward candidates are ``torch.autograd.grad``
through those peers (and through a plain materialised attention), with the bias parameters as leaf tensors that require
grad. Each case in ``tools/peers/cases.py`` records the verdict it is expected to get (``expect_pass`` and a phrase of
the diagnosis), which ``tests/tools/test_peers.py`` asserts, so the table in ``spec/peers.md`` cannot drift from what
the harness says.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

from relpos_ref.conformance import Report

from .cases import PeerCase, cases

__all__ = ["PeerCase", "cases", "main", "markdown", "run_case"]


def run_case(case: PeerCase) -> tuple[Report, float]:
    if case.needs is not None and importlib.util.find_spec(case.needs) is None:
        # The table records every case: a missing peer is an error, never a row left out.
        msg = f"case {case.key} runs {case.needs}'s own code: install it (pip install --no-deps {case.needs})"
        raise ImportError(msg)
    t0 = time.perf_counter()
    report = case.run()
    return report, time.perf_counter() - t0


def _verdict_text(report: Report) -> tuple[str, str]:
    if report.passed:
        worst = max((c.max_abs for c in report.checks if c.max_abs is not None), default=None)
        return "PASS", "-" if worst is None else f"{worst:.1e}"
    failed = report.failures
    head = f"FAIL ({len(failed)}/{len(report.checks)})"
    if len(failed) == len(report.checks) and all(c.status == "error" for c in failed):
        return head, "all checks: the candidate raised"
    return head, ", ".join(sorted({c.name.split(".", 1)[1] for c in failed}))


def _diagnosis(report: Report) -> str:
    """The distinct diagnoses of the failed checks (numbers ignored when comparing), at most two."""
    seen: dict[str, str] = {}
    for c in report.failures:
        # An error's summary ends with the file and line that raised: a path of this machine, left out of the table.
        for d in c.diagnosis or ([re.sub(r" \(at [^()]*\)$", "", c.summary)] if c.status == "error" else []):
            key = d.split(" [")[0].split(":")[0]
            seen.setdefault(key, d if len(d) <= 300 else d[:297] + "...")
    return "; ".join(list(seen.values())[:2])


def markdown(results: list[tuple[PeerCase, Report, float]], elapsed: float) -> str:
    import torch
    import transformers

    lines = [
        "# Peers' verdicts",
        "",
        "The conformance harness (`relpos_ref.conformance`) run on real implementations. Every candidate calls the",
        "peer's own function; only the glue from the harness's positions or q, k, v to the peer's arguments is ours",
        "(`tools/peers/`, not part of the wheel). A FAIL is a convention difference unless the verdict says otherwise;",
        "the diagnosis is the harness's own. `tests/tools/test_peers.py` (marker `peers`) asserts every verdict below.",
        "",
        "Regenerate from the repository root with `python -m tools.peers.verdicts --write spec/peers.md` (needs the",
        "`peers` extra).",
        "",
        f"Generated with PyTorch {torch.__version__}, transformers {transformers.__version__}, NumPy "
        f"{np.__version__}, Python {platform.python_version()} on {platform.machine()} CPU; {len(results)} cases in "
        f"{elapsed:.1f} s.",
        "",
        "| # | peer | harness call | verdict | max abs err / failed checks | meaning | harness diagnosis |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, (case, report, _) in enumerate(results, 1):
        verdict, extra = _verdict_text(report)
        diag = _diagnosis(report) or "-"
        cells = [str(n), case.peer, case.call, f"**{verdict}**", extra, case.meaning, diag]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    lines += [
        "",
        "Reading the table:",
        "",
        "- *max abs err* is the largest error over all checks of a passing case (bias entries, attention outputs,",
        "  lse, gradients), against the float64 reference; the tolerance rule is in",
        "  [tolerances.md](tolerances.md#conformance-tolerance-rule).",
        "- Attention cases use the harness's default, kernel-shaped cases (`relpos_ref.cases.kernel_cases`): sizes one",
        "  past or short of multiples of the usual tile widths, Sq < Sk and Sq > Sk with several query and key tiles,",
        "  decode against 4099 keys, a chunked prefill against 2067, grouped-query heads, head dims 64 and 128, and",
        "  large logits; the report header of each case lists them.",
        "- Bias cases compare a main block (Sq = 8, Sk = 24, bottom-right), a KV-cache decode row, a chunked-prefill",
        "  block and an offset probe, plus offset-only dependence, monotonicity (ALiBi) and repeatability.",
        "- Backward cases (`bwd_*`, `check_attention_backward`) hand q, k, v and an output cotangent d_out to",
        "  `torch.autograd.grad` through the peer and compare dq, dk, dv and each parameter gradient returned with",
        "  `relpos_ref.attention_vjp` in float64 on the same shapes, plus zero dk, dv for keys no query with a",
        "  cotangent sees, the dq rows of queries that see no key, and repeatability. A PASS with declared",
        "  `expected_failures` passes every other check; the declared ones fail as stated.",
        "",
    ]
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.peers.verdicts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--write", metavar="PATH", help="write the markdown verdict table to PATH")
    p.add_argument("--only", action="append", metavar="KEY", help="run only these case keys (repeatable)")
    p.add_argument("--verbose", action="store_true", help="print every report in full")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    results = []
    mismatched = []
    for case in cases():
        if args.only and case.key not in args.only:
            continue
        report, secs = run_case(case)
        results.append((case, report, secs))
        verdict, extra = _verdict_text(report)
        expected = "as recorded" if report.passed == case.expect_pass else "UNEXPECTED"
        if report.passed != case.expect_pass:
            mismatched.append(case.key)
        print(f"{case.key:<34} {verdict:<14} {secs:6.2f} s  {expected}  {extra}")
        if args.verbose or report.passed != case.expect_pass:
            print(report.text())
    elapsed = time.perf_counter() - t0
    text = markdown(results, elapsed)
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
        print(f"wrote {args.write}")
    print(
        f"{len(results)} cases in {elapsed:.1f} s; {len(mismatched)} differ from the recorded expectation"
        + (f": {mismatched}" if mismatched else "")
    )
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
