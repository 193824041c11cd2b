r"""Read a black-box attention kernel's effective bias (one-hot value probes at q = 0); compare it with a family.

With :math:`q = 0` every logit is 0, so a kernel's output is :math:`O_{bhi\cdot} = \sum_j P_{bhij} V_{bj\cdot}` with
:math:`P_{bhi\cdot} = \mathrm{softmax}(b_h(i, \cdot))` over the keys the mask keeps. With the one-hot values of
probe :math:`p`, :math:`V_{bjc} = [j = pD + c]`, the output column :math:`c` *is* the probability of key
:math:`pD + c`; :math:`\lceil S_k / D \rceil` calls read every key, whatever the kernel does inside. The log of those
probabilities is the kernel's bias up to one constant per row, so it can be compared elementwise with the family's
(``spec/tolerances.md``, section "Effective-bias readout", states the tolerance and why).

Functions: :func:`probe_values`, :func:`probe_keys`, :func:`read_probabilities` (the readout), :func:`effective_bias`
(log P centred per row), :func:`reference_bias` and :func:`compare_bias` (the comparison, an
:class:`EffectiveBiasResult` with the worst entries by head and offset and per-head findings), :func:`plan_readout`
(which cases and key blocks a bounded number of calls reads) and :func:`plot_effective_bias` (a PNG heatmap).

Modules: ``readout`` (the probes, the readout, the plan of calls), ``compare`` (the comparison and its findings),
``report`` (what a conformance check prints of it, reproductions, the picture).
"""

from .compare import (
    READABLE_RATIO,
    READOUT_ULPS,
    SMALLEST_NORMAL,
    UNIT_ROUNDOFF,
    EffectiveBiasResult,
    HeadSummary,
    WorstGroup,
    compare_bias,
    reference_bias,
)
from .readout import (
    MAX_PROBE_CALLS,
    effective_bias,
    plan_readout,
    probe_count,
    probe_keys,
    probe_values,
    read_effective_bias,
    read_probabilities,
)
from .report import (
    ReadoutSummary,
    RowSumFaults,
    plot_effective_bias,
    probe_snippet,
    readout_summary,
    row_sum_faults,
    save_plot,
)

__all__ = [
    "MAX_PROBE_CALLS",
    "READABLE_RATIO",
    "READOUT_ULPS",
    "SMALLEST_NORMAL",
    "UNIT_ROUNDOFF",
    "EffectiveBiasResult",
    "HeadSummary",
    "ReadoutSummary",
    "RowSumFaults",
    "WorstGroup",
    "compare_bias",
    "effective_bias",
    "plan_readout",
    "plot_effective_bias",
    "probe_count",
    "probe_keys",
    "probe_snippet",
    "probe_values",
    "read_effective_bias",
    "read_probabilities",
    "readout_summary",
    "reference_bias",
    "row_sum_faults",
    "save_plot",
]
