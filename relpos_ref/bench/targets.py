"""The CPU targets, measured: reference against SDPA-with-mask at S = 4096, and one long sequence's peak memory."""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np

from .backends import backend_status
from .config import (
    TARGET_SHAPE,
    BenchConfig,
    Shape,
    attention_flops,
    bench_dtype,
    make_family,
    make_inputs,
    target_checks,
)
from .measure import Runner, output_errors, time_call
from .probe import memory_probe
from .runners import make_runner

__all__ = ["run_targets"]


def _interleaved(runners: dict[str, Runner | None], reps: int, log: Callable[[str], None]) -> dict[str, list[float]]:
    """Times of ``reps`` rounds, each calling every runner once, so that background load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name, r in runners.items() if r is not None}
    for i in range(reps):
        for name in times:
            times[name].append(time_call(runners[name])[0])
        log(f"targets: repetition {i + 1}/{reps}: " + ", ".join(f"{n} {ts[-1]:.3f} s" for n, ts in times.items()))
    return times


def run_targets(cfg: BenchConfig, rooflines: dict, log: Callable[[str], None]) -> dict:
    """The CPU targets, measured in this run (reported, not asserted)."""
    dtype = bench_dtype("float32")
    shape = TARGET_SHAPE
    out: dict[str, Any] = {
        "shape": shape.as_dict(),
        "family": "alibi",
        "dtype": "float32",
        "gemm_flops_per_s_run_start": rooflines["cpu"]["gemm_flops_per_s"],
        "flops": attention_flops(shape),
    }
    sdpa_reason = backend_status("sdpa-cpu")
    fam = make_family("alibi", shape.heads, shape.head_dim, dtype=dtype)
    q, k, v = make_inputs(shape, dtype, cfg.seed)
    ref = make_runner("numpy", fam, q, k, v, shape, cfg.attn_kwargs)
    sdpa = None if sdpa_reason else make_runner("sdpa-cpu", fam, q, k, v, shape)
    n = cfg.roofline_gemm_n
    rng = np.random.default_rng(0)
    ga, gb = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    gemm = Runner(fn=lambda: ga @ gb, device="cpu", to_host=np.asarray, peak_memory=lambda: (None, ""))
    reps = max(3, min(cfg.reps, 5))
    log(f"targets: S={shape.q_len} H={shape.heads} D={shape.head_dim} causal ALiBi, {reps} interleaved repetitions")
    time_call(gemm)
    t_ref, o_ref = time_call(ref)
    t_sd, o_sd = time_call(sdpa) if sdpa else (None, None)
    times = _interleaved({"GEMM": gemm, "reference": ref, "SDPA": sdpa}, reps, log)
    med_ref = statistics.median(times["reference"])
    out["gemm_n"] = n
    out["gemm_times_s"] = times["GEMM"]
    out["gemm_flops_per_s"] = 2.0 * n**3 / statistics.median(times["GEMM"])
    out["reference"] = {"times_s": times["reference"], "median_s": med_ref, "first_call_s": t_ref}
    out["reference"]["flops_per_s"] = out["flops"] / med_ref
    out["roofline_fraction"] = out["reference"]["flops_per_s"] / out["gemm_flops_per_s"]
    if sdpa:
        med_sd = statistics.median(times["SDPA"])
        out["sdpa"] = {"times_s": times["SDPA"], "median_s": med_sd, "first_call_s": t_sd}
        out["time_ratio"] = med_ref / med_sd
        out["max_abs_diff_vs_sdpa"] = output_errors(ref.to_host(o_ref), sdpa.to_host(o_sd))[0]
    else:
        out["sdpa"] = {"status": "skipped", "reason": sdpa_reason}
    del o_ref, o_sd, ref, sdpa, q, k, v
    gc.collect()

    log("targets: peak extra memory at S=4096 (fresh subprocesses)")
    base = {"family": "alibi", "shape": shape.as_dict(), "dtype": "float32", "attn_kwargs": cfg.attn_kwargs}
    timeout = cfg.subprocess_timeout_s
    out["memory_reference"] = memory_probe({**base, "backend": "numpy", "tracemalloc": True}, timeout_s=timeout)
    if not sdpa_reason:
        out["memory_sdpa"] = memory_probe({**base, "backend": "sdpa-cpu"}, timeout_s=timeout)
        a = out["memory_reference"].get("peak_extra_bytes")
        b = out["memory_sdpa"].get("peak_extra_bytes")
        if a is not None and b:
            out["memory_ratio"] = a / b

    long = Shape(1, 1, 1, cfg.long_len, cfg.long_len, 64)
    log(f"targets: S={long.q_len} H=1 in a fresh subprocess (peak resident memory)")
    out["long"] = memory_probe({**base, "shape": long.as_dict(), "backend": "numpy"}, timeout_s=timeout)

    out["checks"] = target_checks(out)
    return out
