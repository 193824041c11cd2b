"""Conformance harness: test any bias, bucket, attention or attention-gradient implementation against relpos_ref.

Three ways in:

1. Python: :func:`check_bias`, :func:`check_buckets`, :func:`check_attention`, :func:`check_attention_backward`,
   :func:`check_paged_attention` return a :class:`Report` (``passed``, one :class:`CheckResult` per check with errors,
   first mismatch, diagnosis and a reproduction snippet, ``to_json()``, a text table via ``str(report)``).
2. pytest: :func:`parametrize_with_checks` over :func:`bias_checks` / :func:`attention_checks` /
   :func:`attention_backward_checks` / :func:`bucket_checks`, with known divergences marked.
3. ``relpos-ref conform MODULE:FUNCTION ...`` on the command line, or
   ``RELPOS_REF_IMPL=MODULE:FUNCTION RELPOS_REF_ARGS="..." pytest --pyargs relpos_ref.conformance``.

The tolerance rule is in :mod:`relpos_ref.conformance.tolerance` and in ``spec/tolerances.md``, section
"Conformance tolerance rule".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._host import to_host
from ._arrays import hand_over
from ._core import Check, run_checks
from .attention import AttentionShape, attention_checks, attention_inputs, check_attention
from .backward import attention_backward_checks, backward_inputs, check_attention_backward
from .bias import bias_checks, check_bias
from .buckets import bucket_checks, check_buckets
from .paged import check_paged_attention, paged_attention_checks, paged_inputs
from .plugin import load_target, parametrize_with_checks
from .report import CheckResult, ConformanceError, Report
from .tolerance import ATTENTION_FLOORS, ATTENTION_K, BIAS_TOLERANCES, rule_text

__all__ = [
    "ATTENTION_FLOORS",
    "ATTENTION_K",
    "BIAS_TOLERANCES",
    "AttentionShape",
    "Check",
    "CheckResult",
    "ConformanceError",
    "Report",
    "as_numpy",
    "attention_backward_checks",
    "attention_checks",
    "attention_inputs",
    "backward_inputs",
    "bias_checks",
    "bucket_checks",
    "check_attention",
    "check_attention_backward",
    "check_bias",
    "check_buckets",
    "check_paged_attention",
    "hand_over",
    "load_target",
    "paged_attention_checks",
    "paged_inputs",
    "parametrize_with_checks",
    "rule_text",
    "run_checks",
]


def as_numpy(x: Any) -> np.ndarray:
    """A host NumPy copy of an array from NumPy, PyTorch, CuPy, JAX or any DLPack producer (floats as float64)."""
    return to_host(x)[0]
