"""pytest-benchmark suite: the kernels ``relpos-ref bench`` measures, for regression tracking.

Outside ``testpaths``, so the normal test run does not collect it. The project's pytest options disable benchmarking
(``--benchmark-disable``: each benchmark then runs once, as a smoke test); enable it explicitly::

    pytest bench --benchmark-enable --benchmark-only --benchmark-json=bench/results/<date>-cpu/pytest-benchmark.json
    pytest bench --benchmark-enable --benchmark-only --benchmark-autosave \
        --benchmark-compare --benchmark-compare-fail=min:15%

Every case uses the runners of :mod:`relpos_ref.bench`, so the suite and the command time the same code. GPU cases
synchronise inside the timed callable (pytest-benchmark reads the CPU clock).
"""

from __future__ import annotations

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref import bench as rb

pytest.importorskip("pytest_benchmark")

FAMILIES = rb.DEFAULT_FAMILIES
PREFILL = (512, 2048)
DECODE = 16384
H, D = 8, 64


def _case(backend: str, family: str, shape: rb.Shape) -> rb.Runner:
    reason = rb.backend_status(backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    q, k, v = rb.make_inputs(shape, np.float32, 0)
    fam = rb.make_family(family, shape.heads, shape.head_dim, dtype=np.float32)
    try:
        return rb.make_runner(backend, fam, q, k, v, shape)
    except rb.UnavailableError as exc:
        pytest.skip(f"{backend}: {exc}")


def _timed(benchmark, runner: rb.Runner, shape: rb.Shape, *, rounds: int = 3):
    def call():
        out = runner.fn()
        runner.sync()
        return out

    benchmark.extra_info.update(
        shape=shape.as_dict(), flops=rb.attention_flops(shape), min_bytes=rb.min_bytes(shape, 4), device=runner.device
    )
    out = benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
    assert tuple(out.shape) == (shape.batch, shape.heads, shape.q_len, shape.head_dim)
    return out


@pytest.mark.parametrize("seq", PREFILL)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["numpy", "sdpa-cpu", "cupy", "cupy-fused", "sdpa-cuda"])
def test_prefill(benchmark, backend, family, seq):
    benchmark.group = f"prefill S={seq}"
    shape = rb.Shape(1, H, H, seq, seq, D)
    _timed(benchmark, _case(backend, family, shape), shape)


@pytest.mark.parametrize("family", ["alibi", "t5", "fire"])
@pytest.mark.parametrize("backend", ["numpy", "sdpa-cpu", "cupy", "cupy-fused", "sdpa-cuda"])
def test_decode(benchmark, backend, family):
    benchmark.group = f"decode Sk={DECODE}"
    shape = rb.Shape(1, H, H, 1, DECODE, D)
    _timed(benchmark, _case(backend, family, shape), shape, rounds=10)


@pytest.mark.parametrize("family", FAMILIES)
def test_bias_generation(benchmark, family):
    """The bias alone, (H, 1024, 1024) float32, as the family object generates it."""
    benchmark.group = "bias (H, 1024, 1024)"
    fam = rb.make_family(family, H, D, dtype=np.float32)
    q_pos, k_pos = rp.positions(1024, 1024)
    out = benchmark.pedantic(fam.bias, args=(q_pos, k_pos), rounds=5, warmup_rounds=1)
    assert out.shape == (H, 1024, 1024)


def test_gemm_roofline(benchmark):
    """The NumPy float32 2048 x 2048 product whose rate is the CPU roofline of ``relpos-ref bench``."""
    benchmark.group = "roofline"
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    b = rng.standard_normal((2048, 2048), dtype=np.float32)
    benchmark.extra_info["flops"] = 2.0 * 2048**3
    out = benchmark.pedantic(np.matmul, args=(a, b), rounds=5, warmup_rounds=1)
    assert out.shape == (2048, 2048)
