"""Shared fixtures: the ``xp`` backend fixture and Hypothesis profiles.

Backends (SciPy's model): numpy (through array-api-compat), array_api_strict (proof that only the standard is used)
and cupy when a GPU is present. ``RELPOS_REF_BACKENDS`` (comma-separated ids) selects a subset, e.g.
``RELPOS_REF_BACKENDS=cupy pytest``. A backend named there but unavailable fails loudly instead of silently testing
nothing.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("quick", max_examples=8, deadline=None)  # one-shot GPU runs
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def _cupy_reason() -> str | None:
    """None when CuPy can run kernels here, else why not."""
    try:
        import cupy
    except Exception as exc:  # any import failure means: no CuPy backend
        return f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        if not cupy.is_available():
            return "CuPy imports but no CUDA GPU/driver is available (cupy.is_available() is False)"
    except Exception as exc:  # MPS daemons and broken drivers raise instead of returning False
        return f"CuPy cannot query a CUDA device ({type(exc).__name__}: {exc})"
    return None


CUPY_SKIP_REASON = _cupy_reason()


def _load(name: str):
    if name == "numpy":
        import array_api_compat.numpy as xp

        return xp
    if name == "array_api_strict":
        import array_api_strict as xp

        xp.set_array_api_strict_flags(api_version="2025.12")
        return xp
    if name == "cupy":
        import array_api_compat.cupy as xp

        return xp
    msg = f"RELPOS_REF_BACKENDS: unknown backend {name!r} (expected numpy, array_api_strict, cupy)"
    raise ValueError(msg)


REQUESTED = os.environ.get("RELPOS_REF_BACKENDS")
BACKENDS = (
    [n.strip() for n in REQUESTED.split(",") if n.strip()] if REQUESTED else ["numpy", "array_api_strict", "cupy"]
)


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array namespace under test."""
    if request.param == "cupy" and CUPY_SKIP_REASON is not None:
        if REQUESTED:
            pytest.fail(f"RELPOS_REF_BACKENDS names cupy but it cannot run: {CUPY_SKIP_REASON}")
        pytest.skip(CUPY_SKIP_REASON)
    return _load(request.param)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason=f"GPU test: {CUPY_SKIP_REASON}")
    for item in items:
        if "gpu" in item.keywords and CUPY_SKIP_REASON is not None:
            item.add_marker(skip_gpu)
