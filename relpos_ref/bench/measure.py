"""How a bench run measures: call timing and CUDA events, GEMM/copy rooflines, in-process peak memory, the machine."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.metadata
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from .._host import dtype_name, max_errors
from .backends import UnavailableError, import_cupy, import_torch
from .config import MiB

__all__ = [
    "Runner",
    "cpu_roofline",
    "cupy_events",
    "cupy_peak",
    "gpu_roofline",
    "loadavg",
    "machine_info",
    "measure",
    "output_errors",
    "time_call",
    "torch_cuda_peak",
    "torch_events",
    "tracemalloc_peak",
]

Events = tuple[Any, Any, Callable[[Any, Any], float]]


# -- timing ------------------------------------------------------------------------------------------------------------


def cupy_events(cupy: Any) -> Events:
    """(start, end, seconds between them) of a pair of CuPy CUDA events."""
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    return start, end, lambda s, e: cupy.cuda.get_elapsed_time(s, e) / 1e3


def torch_events(torch: Any) -> Events:
    """(start, end, seconds between them) of a pair of torch CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    return start, end, lambda s, e: s.elapsed_time(e) / 1e3


@dataclasses.dataclass
class Runner:
    """One backend on one problem: the timed call, where it runs, how to read its output and its peak memory."""

    fn: Callable[[], Any]
    device: str  # "cpu" or "cuda"
    to_host: Callable[[Any], np.ndarray]
    peak_memory: Callable[[], tuple[int | None, str]]
    sync: Callable[[], None] = lambda: None
    events: Callable[[], Events] | None = None


def time_call(runner: Runner) -> tuple[float, Any]:
    """(seconds, output) of one call: CUDA events + synchronisation on a GPU, ``perf_counter`` on the CPU."""
    if runner.events is not None:
        runner.sync()
        start, end, elapsed = runner.events()
        start.record()
        out = runner.fn()
        end.record()
        end.synchronize()
        runner.sync()
        return elapsed(start, end), out
    t0 = time.perf_counter()
    out = runner.fn()
    return time.perf_counter() - t0, out


def measure(runner: Runner, *, warmup: int, reps: int, budget_s: float, min_reps: int = 3) -> dict[str, Any]:
    """Warm up, then time up to ``reps`` calls (fewer when one call is slow: at least ``min_reps``, or fewer still
    when even that would exceed four times ``budget_s``). The first call's time (compilation, caches) is reported."""
    first, out = time_call(runner)
    last = first
    for _ in range(max(0, warmup - 1)):
        last, _ = time_call(runner)
    per = max(last, 1e-9)
    n = reps if per * reps <= budget_s else max(min_reps, int(budget_s // per))
    if n * per > 4 * budget_s:  # even the minimum would take too long: keep what fits, at least one
        n = max(1, int(4 * budget_s // per))
    n = min(reps, n)
    times = [time_call(runner)[0] for _ in range(n)]
    return {
        "first_call_s": first,
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "reps": n,
        "warmup": max(1, warmup),
        "output": out,
    }


def output_errors(out: Any, ref: Any) -> tuple[float, float]:
    """(max |out - ref|, that over max |ref|): the project's error metric, relative to the scale of the output."""
    abs_err = max_errors(out, ref)[0]
    scale = float(np.max(np.abs(ref), initial=0.0)) or 1.0
    return abs_err, abs_err / scale


# -- rooflines ---------------------------------------------------------------------------------------------------------


def _median_time(fn: Callable[[], Any], reps: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _roofline(gemm_n: int, gemm_s: float, copy_bytes: int, copy_s: float, *, method: str, **info: Any) -> dict:
    """The roofline entry of results.json: the GEMM rate (2 n^3 FLOPs) and the copy bandwidth (read + write)."""
    return {
        **info,
        "gemm_n": gemm_n,
        "gemm_flops_per_s": 2.0 * gemm_n**3 / gemm_s,
        "gemm_s": gemm_s,
        "copy_bytes": int(copy_bytes),
        "copy_bytes_per_s": 2.0 * copy_bytes / copy_s,
        "method": method,
    }


def cpu_roofline(dtype: Any = np.float32, *, gemm_n: int = 2048, copy_mib: int = 128, reps: int = 5) -> dict:
    """NumPy GEMM rate (FLOP/s) on an n x n product and copy bandwidth (bytes/s, read + write)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((gemm_n, gemm_n), dtype=np.float32).astype(dtype, copy=False)
    b = rng.standard_normal((gemm_n, gemm_n), dtype=np.float32).astype(dtype, copy=False)
    t = _median_time(lambda: a @ b, reps)
    src = np.ones(copy_mib * MiB // np.dtype(dtype).itemsize, dtype=dtype)
    dst = np.empty_like(src)
    tc = _median_time(lambda: np.copyto(dst, src), reps)
    method = f"median of {reps} NumPy calls after one warm-up; copy counts read + write"
    return _roofline(gemm_n, t, src.nbytes, tc, method=method, device="cpu", gemm_dtype=dtype_name(dtype))


def gpu_roofline(dtype: Any = np.float32, *, gemm_n: int = 8192, copy_mib: int = 1024, reps: int = 10) -> dict | None:
    """GEMM rate and copy bandwidth on the current CUDA device (CuPy, else torch), or None without a GPU."""
    name = dtype_name(dtype)
    try:
        cupy = import_cupy()
    except UnavailableError:
        cupy = None
    if cupy is not None:
        a = cupy.random.standard_normal((gemm_n, gemm_n), dtype=cupy.float32).astype(name)
        b = cupy.random.standard_normal((gemm_n, gemm_n), dtype=cupy.float32).astype(name)
        sync = cupy.cuda.Device().synchronize
        lib = f"cupy {cupy.__version__}"
        src = cupy.ones(copy_mib * MiB // np.dtype(dtype).itemsize, dtype=name)
        dst = cupy.empty_like(src)

        def copy() -> None:
            dst[...] = src

    else:
        try:
            torch = import_torch()
        except UnavailableError:
            return None
        if not torch.cuda.is_available():
            return None
        tdt = getattr(torch, name)
        a = torch.randn(gemm_n, gemm_n, device="cuda", dtype=tdt)
        b = torch.randn(gemm_n, gemm_n, device="cuda", dtype=tdt)
        sync = torch.cuda.synchronize
        lib = f"torch {torch.__version__}"
        src = torch.ones(copy_mib * MiB // np.dtype(dtype).itemsize, device="cuda", dtype=tdt)
        dst = torch.empty_like(src)

        def copy() -> None:
            dst.copy_(src)

    t = _median_time(lambda: a @ b, reps, sync)
    tc = _median_time(copy, reps, sync)
    method = f"median of {reps} synchronised calls after one warm-up ({lib}; default math mode, no TF32 opt-in)"
    return _roofline(gemm_n, t, copy_mib * MiB, tc, method=method, device="cuda", library=lib, gemm_dtype=name)


# -- peak memory of one call in this process ---------------------------------------------------------------------------


def tracemalloc_peak(fn: Callable[[], Any]) -> tuple[int | None, str]:
    """(tracemalloc peak above the pre-call level, method) of one call of ``fn``; NumPy reports its buffers."""
    gc.collect()
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
        del out
    finally:
        if not was:
            tracemalloc.stop()
    return int(peak), "tracemalloc peak above the pre-call level (NumPy buffers), output included"


def _cupy_hook(cupy: Any) -> Any:
    """A CuPy memory hook tracking the peak of live pool allocations (bytes) while active."""

    class Hook(cupy.cuda.MemoryHook):  # type: ignore[misc, name-defined]
        name = "relpos_ref_peak"

        def __init__(self) -> None:
            self.live: dict[int, int] = {}
            self.cur = 0
            self.peak = 0

        def malloc_postprocess(self, **kw: Any) -> None:
            self.live[kw["mem_ptr"]] = kw["mem_size"]
            self.cur += kw["mem_size"]
            self.peak = max(self.peak, self.cur)

        def free_postprocess(self, **kw: Any) -> None:
            self.cur -= self.live.pop(kw["mem_ptr"], 0)

    return Hook()


def cupy_peak(cupy: Any, fn: Callable[[], Any]) -> tuple[int | None, str]:
    """(peak of live CuPy pool allocations during one call of ``fn``, method)."""
    cupy.cuda.Device().synchronize()
    hook = _cupy_hook(cupy)
    with hook:
        out = fn()
        cupy.cuda.Device().synchronize()
    del out
    return int(hook.peak), "CuPy memory hook: peak of live pool allocations during the call, output included"


def torch_cuda_peak(torch: Any, fn: Callable[[], Any]) -> tuple[int | None, str]:
    """(``torch.cuda.max_memory_allocated`` above the pre-call level for one call of ``fn``, method)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - base
    del out
    return int(used), "torch.cuda.max_memory_allocated above the pre-call level, output included"


# -- machine information -----------------------------------------------------------------------------------------------


def loadavg() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _mem_total() -> int | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def _blas_info() -> list[dict[str, Any]]:
    """BLAS/OpenMP libraries in use (threadpoolctl when installed, else numpy's build configuration); no paths."""
    keep = ("user_api", "internal_api", "prefix", "version", "num_threads", "threading_layer", "architecture")
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        pass
    else:
        return [{k: lib.get(k) for k in keep if k in lib} for lib in threadpool_info()]
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]
    except Exception:  # older NumPy: no dict mode
        return []
    out = []
    for api in ("blas", "lapack"):
        d = cfg.get(api, {})
        out.append({"user_api": api, "name": d.get("name"), "version": d.get("version"), "source": "numpy build"})
    return out


def machine_info() -> dict[str, Any]:
    """CPU, memory, Python and library versions, BLAS threading, GPU (no host names, no paths)."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_total_bytes": _mem_total(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "libraries": {"relpos_ref": importlib.metadata.version("relpos_ref"), "numpy": np.__version__},
        "gpu": None,
    }
    libs = info["libraries"]
    # Versions from package metadata: nothing is imported just to be named. Device details come from libraries that a
    # backend of this run already imported.
    for dist in ("array-api-compat", "scipy", "matplotlib", "threadpoolctl", "torch", "cupy-cuda12x", "cupy-cuda13x"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            libs[dist] = importlib.metadata.version(dist)
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        with contextlib.suppress(Exception):
            if torch.cuda.is_available():
                info["gpu"] = {"name": torch.cuda.get_device_name(0), "torch_cuda": torch.version.cuda}
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        with contextlib.suppress(Exception):
            props = cupy.cuda.runtime.getDeviceProperties(0)
            gpu = info["gpu"] or {}
            gpu.update(
                name=props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
                memory_bytes=int(props["totalGlobalMem"]),
                compute_capability=f"{props['major']}.{props['minor']}",
                cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                cuda_driver=cupy.cuda.runtime.driverGetVersion(),
            )
            info["gpu"] = gpu
    info["blas"] = _blas_info()
    return info
