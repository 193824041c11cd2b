"""Independent high-precision oracle for every bias family, the biased softmax and attention.

This package is a second, deliberately naive implementation of the library's mathematics. It
exists so that the array-API implementation can be checked against something that does not
share its code: every function here works on Python scalars and nested lists, loops over
elements one at a time, and evaluates transcendental functions with :mod:`mpmath` at a chosen
working precision (``dps``, default 50 decimal digits). It imports nothing from the rest of
:mod:`relpos_ref` and does not use NumPy, so a bug cannot hide in a helper shared by both.

Conventions (the same as the library's public contract):

* ``delta = i - j`` with ``i`` the absolute query position and ``j`` the absolute key position,
  so ``delta >= 0`` for keys at or before the query.
* Bias arrays are returned as nested lists indexed ``[head][query][key]``.
* Softmax masks are booleans with ``True`` meaning "may attend"; masked entries get probability
  exactly 0. A row with no attendable key gives zeros and ``lse = -inf`` (``fully_masked="zero"``)
  or NaN probabilities and NaN lse (``fully_masked="nan"``).
* ``lse`` is the natural-log log-sum-exp of the final logits (after scale and bias).

Inputs are converted to :class:`mpmath.mpf` exactly when they are ``int``, ``float``,
:class:`fractions.Fraction` (to the working precision) or ``mpf``; a ``float`` is a binary64
value and is taken at its exact value, so pass parameters *after* rounding them to the dtype
under test when the rounding of the inputs is not part of what is being measured.

T5 buckets are computed without any logarithm: the bucket test ``floor(log(n/E)/log(D/E)*(B'-E))
>= k`` is rewritten as the integer inequality ``n**(B'-E) * E**k >= E**(B'-E) * D**k`` (both
sides positive because ``D > E >= 1``), so every boundary, including the exact ones such as
``n = 16, 32, 64`` for the bidirectional defaults, is decided without rounding.

Gradients (:func:`bias_vjp`, :func:`attention_vjp`) are central differences of the functions above, evaluated at
``2 * dps + 10`` digits with a relative step of ``10**-dps``: no derivative formula is written down anywhere in this
package, so none can share a mistake with the library's backward. The error budget is in :func:`bias_vjp`.
"""

from ._mp import DEFAULT_DPS, _leaves, _num, context, to_decimal_string
from .attention import attention, biased_softmax
from .families import (
    FAMILY_PARAMS,
    alibi_bias,
    alibi_slope_log2,
    alibi_slopes,
    family_bias,
    fire_bias,
    fire_inputs,
    kerple_log_bias,
    kerple_power_bias,
    offset_bias,
    sandwich_bias,
    t5_bias,
    t5_bucket,
    t5_bucket_thresholds,
)
from .gradients import attention_vjp, bias_vjp, work_dps
from .positions import SEGMENT_POSITIONS, attention_layout, causal_mask, positions, relative_offsets

__all__ = [
    "DEFAULT_DPS",
    "FAMILY_PARAMS",
    "SEGMENT_POSITIONS",
    "alibi_bias",
    "alibi_slope_log2",
    "alibi_slopes",
    "attention",
    "attention_layout",
    "attention_vjp",
    "bias_vjp",
    "biased_softmax",
    "causal_mask",
    "context",
    "family_bias",
    "fire_bias",
    "fire_inputs",
    "kerple_log_bias",
    "kerple_power_bias",
    "offset_bias",
    "positions",
    "relative_offsets",
    "sandwich_bias",
    "t5_bias",
    "t5_bucket",
    "t5_bucket_thresholds",
    "to_decimal_string",
    "work_dps",
    # private helpers used by the tests and the vector generator
    "_leaves",
    "_num",
]
