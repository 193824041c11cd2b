"""Every tolerance table of the project in one place: verify's, and the conformance harness's per-dtype numbers.

The rules that use them are stated in ``spec/tolerances.md``; the documented error bounds are in ``bounds``.
"""

from __future__ import annotations

__all__ = ["ATTENTION_FLOORS", "ATTENTION_K", "BIAS_TOLERANCES", "VERIFY_TOLERANCES"]

#: ``relpos-ref verify``: normwise tolerance, max |x - x64| <= tol * max(1, max |x64|). float16 and float32 results
#: are computed in float32 (rounded once to float16); the float32 figure leaves room for libm differences in
#: pow/log1p/sin between backends and for sums over up to a few hundred keys. float64 compares the backends' float64
#: arithmetic with NumPy's.
VERIFY_TOLERANCES = {"float64": 1e-14, "float32": 5e-6, "float16": 2e-3}

#: Elementwise tolerance of bias tensors per dtype: |c_ij - r_ij| <= t * max(1, m_ij), m_ij the entry's magnitude
#: (``BiasFamily.bias_magnitude``). float32 and float16 match ``relpos-ref verify``; bfloat16 is PyTorch's default rtol
#: for it (test_transformers.py); float64 leaves room for pow/log1p/cos differing by an ulp between libraries and for
#: sums over a few dozen terms (FIRE, Sandwich).
BIAS_TOLERANCES = {"float64": 1e-13, "float32": 5e-6, "float16": 2e-3, "bfloat16": 1.6e-2}

#: FlashAttention's multiplier of the plain same-dtype error.
ATTENTION_K = 2.0

#: Absolute floors of the attention rule, multiplied by max(1, max|reference|). 1e-5 for float16/bfloat16 is the
#: slack FlashAttention's tests add; the float32 and float64 floors are about 8 and 450 machine epsilons.
ATTENTION_FLOORS = {"float64": 1e-13, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-5}
