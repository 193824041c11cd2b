"""Peak resident memory of one call, measured in a fresh Python process (``python -m relpos_ref.bench --probe``)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import Shape, bench_dtype, make_family, make_inputs
from .measure import tracemalloc_peak
from .runners import make_runner

__all__ = ["main_probe", "memory_probe", "probe"]


def _probe_env() -> dict[str, str]:
    env = dict(os.environ)
    # A fixed mmap threshold makes glibc return every freed block >= 64 KiB to the OS, so the resident set follows
    # the live allocations instead of a heap that only grows.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "131072"
    pkg_parent = str(Path(__file__).resolve().parents[2])  # the folder holding relpos_ref/
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, *filter(None, [env.get("PYTHONPATH")])])
    return env


def memory_probe(spec: dict, *, timeout_s: float = 1800.0) -> dict:
    """Run one call of ``spec`` in a fresh Python process and return its resident-memory figures (see ``probe``)."""
    cmd = [sys.executable, "-m", "relpos_ref.bench", "--probe", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_probe_env(), check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"no result within {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "error", "reason": f"exit {proc.returncode}: {' | '.join(tail)[:400]}"}
    return json.loads(lines[-1])


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _ru_maxrss() -> int:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def probe(spec: dict) -> dict:
    """Inside the subprocess: warm up on a small shape, then measure one call at the requested shape."""
    shape = Shape(**spec["shape"])
    dtype = bench_dtype(spec.get("dtype", "float32"))
    backend = spec["backend"]
    attn_kwargs = spec.get("attn_kwargs", {})
    # Warm-up on a small problem of the same kind loads libraries, kernels and thread pools before measuring.
    small = dataclasses.replace(shape, q_len=min(shape.q_len, 128), k_len=min(shape.k_len, 128))
    fam_small = make_family(spec["family"], small.heads, small.head_dim, dtype=dtype, seed=0)
    make_runner(backend, fam_small, *make_inputs(small, dtype, 0), small, attn_kwargs).fn()
    fam = make_family(spec["family"], shape.heads, shape.head_dim, dtype=dtype, seed=0)
    q, k, v = make_inputs(shape, dtype, 0)
    runner = make_runner(backend, fam, q, k, v, shape, attn_kwargs)
    gc.collect()
    ru_before = _ru_maxrss()
    hwm_before = _status_kib("VmHWM")  # peak since exec (ru_maxrss may carry the parent's peak across exec)
    reset = _reset_hwm()
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = runner.fn()
    seconds = time.perf_counter() - t0
    hwm = _status_kib("VmHWM")
    ru_after = _ru_maxrss()
    res: dict[str, Any] = {
        "status": "ok",
        "backend": backend,
        "family": spec["family"],
        "shape": shape.as_dict(),
        "seconds": seconds,
        "rss_before_bytes": rss0,
        "process_peak_rss_bytes": max(hwm_before, hwm) if hwm is not None and hwm_before is not None else ru_after,
        "process_peak_method": "VmHWM since exec (before the reset and after the call)"
        if hwm is not None and hwm_before is not None
        else "ru_maxrss (may include the parent's peak before exec)",
        "output_bytes": int(np.prod(out.shape)) * dtype.itemsize,
        "input_bytes": int(q.nbytes + k.nbytes + v.nbytes),
    }
    if reset and hwm is not None and rss0 is not None:
        res["peak_extra_bytes"] = hwm - rss0
        res["method"] = (
            "fresh process, small warm-up call, VmHWM reset via /proc/self/clear_refs, then peak VmHWM - VmRSS before "
            "the call (glibc mmap threshold 64 KiB)"
        )
    elif rss0 is not None and ru_after > ru_before:
        res["peak_extra_bytes"] = ru_after - rss0
        res["method"] = "fresh process, ru_maxrss after the call - VmRSS before (peak could not be reset)"
    else:
        res["peak_extra_bytes"] = None
        res["method"] = "not measurable here (no /proc/self/clear_refs and the call did not raise ru_maxrss)"
    if spec.get("tracemalloc") and backend == "numpy":
        res["tracemalloc_peak_bytes"] = tracemalloc_peak(runner.fn)[0]
    return res


def main_probe(argv: list[str]) -> int:
    """``--probe SPEC``: print the JSON result of :func:`probe` for the JSON ``SPEC``."""
    spec = json.loads(argv[argv.index("--probe") + 1])
    print(json.dumps(probe(spec)))
    return 0
