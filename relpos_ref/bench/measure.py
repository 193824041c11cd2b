"""How a bench run measures: call timing and CUDA events, GEMM/copy rooflines, in-process peak memory, the machine."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.metadata
import itertools
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .._host import dtype_name, max_errors
from .backends import UnavailableError, import_cupy, import_torch
from .config import MiB

__all__ = [
    "Rotation",
    "Runner",
    "blas_threads_text",
    "cpu_cache_bytes",
    "cpu_roofline",
    "cupy_events",
    "cupy_peak",
    "gpu_cache_bytes",
    "gpu_roofline",
    "kv_copies",
    "loadavg",
    "machine_info",
    "measure",
    "measure_read",
    "numpy_reads",
    "output_errors",
    "rotating",
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
    # Plain reads of the K and V arrays that fn reads, by method name: the same bytes in the same place, so that a
    # decode row's bandwidth is a fraction of what a bare read of its own inputs achieves (see measure_read).
    reads: dict[str, Callable[[], Any]] = dataclasses.field(default_factory=dict)
    read_bytes: int = 0


class Rotation:
    """One cycle over the copies of a decode shape's K/V, shared by every call that reads them.

    Decoding and the plain reads of its reference draw the next copy from the same counter, so each call reads the
    copy that was touched longest ago: with the copies together several times larger than the caches, every call
    reads K and V from memory, as a decode step of a many-layer model does.
    """

    def __init__(self, copies: int) -> None:
        self.copies = copies
        self._next = itertools.cycle(range(copies))

    def next(self) -> int:
        return next(self._next)


def rotating(runners: Sequence[Runner], rotation: Rotation) -> Runner:
    """One runner whose calls, timed or reference reads, go round ``runners`` (one per K/V copy) in ``rotation``."""
    first = runners[0]
    if len(runners) == 1:
        return first
    if len(runners) != rotation.copies:
        msg = f"rotating: expected {rotation.copies} runners, one per copy, got {len(runners)}"
        raise ValueError(msg)

    def fn() -> Any:
        return runners[rotation.next()].fn()

    def cycled(name: str) -> Callable[[], Any]:
        return lambda: runners[rotation.next()].reads[name]()

    return dataclasses.replace(first, fn=fn, reads={name: cycled(name) for name in first.reads})


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


def measure_read(runner: Runner, *, reps: int) -> dict[str, Any] | None:
    """The fastest of the runner's plain reads of its K and V: median seconds of ``reps`` calls after one warm-up,
    timed like the runner's own calls (CUDA events on a GPU); None when the runner has no reads."""
    best: dict[str, Any] | None = None
    for name, read in runner.reads.items():
        r = dataclasses.replace(runner, fn=read)
        time_call(r)
        median = statistics.median(time_call(r)[0] for _ in range(max(1, reps)))
        if best is None or median < best["read_s"]:
            best = {"read_s": median, "read_method": name, "read_bytes": runner.read_bytes}
    return best


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _self_dot(x: np.ndarray) -> Any:
    return np.dot(x, x)


def numpy_reads(arrays: Sequence[np.ndarray], threads: int | None = None) -> dict[str, Callable[[], Any]]:
    """Plain reads of ``arrays`` (each byte once): BLAS ``dot(x, x)`` per array, and the same over ``threads`` threads
    (default: the usable cores) when more than one; measure_read keeps the faster, since which one wins depends on
    the BLAS build and on the other load."""
    flat = [np.ascontiguousarray(a).reshape(-1) for a in arrays]
    reads: dict[str, Callable[[], Any]] = {"np.dot(x, x) per array": lambda: [_self_dot(x) for x in flat]}
    n = threads or _usable_cores()
    if n > 1:
        pool = _POOLS.setdefault(n, ThreadPoolExecutor(n, thread_name_prefix="relpos-read"))
        chunks = [c for x in flat for c in np.array_split(x, n)]
        reads[f"np.dot(x, x) over {n} threads"] = lambda: list(pool.map(_self_dot, chunks))
    return reads


# -- caches and the K/V rotation of decode rows ------------------------------------------------------------------------

#: Decode K/V copies together span at least this many times the caches, so a cyclic read finds none of them there.
CACHE_FACTOR = 4
#: Limits of one rotation (copies are made once per decode shape and shared by its backends).
MAX_COPIES = 64
MAX_ROTATION_BYTES = 1 << 30
#: Footprint of a rotation where the cache size is unknown.
UNKNOWN_CACHE_ROTATION_BYTES = 256 * MiB


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _size_text(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def cpu_cache_bytes(root: str = "/sys/devices/system/cpu") -> tuple[int | None, str]:
    """(bytes of all data and unified CPU caches together, each shared cache counted once, how it was found)."""
    seen: dict[tuple[str, str], int] = {}
    with contextlib.suppress(OSError, ValueError):
        for cpu in os.listdir(root):
            cache_dir = os.path.join(root, cpu, "cache")
            if not (cpu.startswith("cpu") and cpu[3:].isdigit() and os.path.isdir(cache_dir)):
                continue
            for idx in os.listdir(cache_dir):
                d = os.path.join(cache_dir, idx)
                if not idx.startswith("index"):
                    continue

                def field(name: str, d: str = d) -> str:
                    with open(os.path.join(d, name), encoding="ascii") as f:
                        return f.read().strip()

                if field("type") == "Instruction":
                    continue
                seen[(field("level"), field("shared_cpu_list"))] = _size_text(field("size"))
    if seen:
        return sum(seen.values()), f"{root}/cpu*/cache: {len(seen)} data/unified caches, shared ones counted once"
    total = 0
    for name in ("SC_LEVEL1_DCACHE_SIZE", "SC_LEVEL2_CACHE_SIZE", "SC_LEVEL3_CACHE_SIZE", "SC_LEVEL4_CACHE_SIZE"):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            total += max(0, os.sysconf(name))
    if total:
        return total, "os.sysconf cache sizes of one core (shared caches may be counted per core)"
    return None, "no /sys/devices/system/cpu cache information and no os.sysconf cache sizes"


def gpu_cache_bytes(backend: str) -> tuple[int | None, str]:
    """(L2 cache bytes of CUDA device 0 as the backend's library reports it, how it was found)."""
    with contextlib.suppress(Exception):
        if backend.startswith("cupy"):
            cupy = sys.modules.get("cupy")
            if cupy is not None:
                return int(cupy.cuda.runtime.getDeviceProperties(0)["l2CacheSize"]), "CuPy device properties (L2)"
        torch = sys.modules.get("torch")
        if torch is not None:
            size = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", None)
            if size:
                return int(size), "torch device properties (L2)"
    return None, f"{backend}: the library reports no L2 cache size"


def kv_copies(set_bytes: int, cache_bytes: int | None) -> tuple[int, str]:
    """(copies of a decode shape's K/V to rotate over, where the timed calls read K/V from)."""
    target = UNKNOWN_CACHE_ROTATION_BYTES if cache_bytes is None else CACHE_FACTOR * cache_bytes
    n = max(1, min(math.ceil(target / max(1, set_bytes)), MAX_COPIES, MAX_ROTATION_BYTES // max(1, set_bytes)))
    if cache_bytes is None:
        return n, "unknown (cache size unknown)"
    return n, _where(n * set_bytes, cache_bytes)


def _where(span: int, cache_bytes: int) -> str:
    """Where repeated cyclic reads of ``span`` bytes come from, given the caches' size."""
    if span >= CACHE_FACTOR * cache_bytes:
        return "memory"
    return "cache" if span <= cache_bytes else "partly cache"


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
    cache, cache_method = cpu_cache_bytes()
    # The same copy repeated is served from cache when source and destination fit in it: a cache figure, not memory.
    copy_from = "unknown (cache size unknown)" if cache is None else _where(2 * src.nbytes, cache)
    info = {"cache_bytes": cache, "cache_method": cache_method, "copy_from": copy_from}
    return _roofline(gemm_n, t, src.nbytes, tc, method=method, device="cpu", gemm_dtype=dtype_name(dtype), **info)


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


_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _blas_info() -> list[dict[str, Any]]:
    """BLAS/OpenMP libraries in use (threadpoolctl when installed, else numpy's build configuration); no paths.

    Every entry has ``num_threads`` (an int) or ``threads_unknown`` (the reason no count could be read)."""
    keep = ("user_api", "internal_api", "prefix", "version", "num_threads", "threading_layer", "architecture")
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        pass
    else:
        out = []
        for lib in threadpool_info():
            d = {k: lib.get(k) for k in keep if k in lib}
            if not isinstance(d.get("num_threads"), int):
                d.pop("num_threads", None)
                d["threads_unknown"] = "threadpoolctl reported no thread count for this library"
            out.append(d)
        return out
    # NumPy's configuration names the library it was built against, not the pool size it runs with; a thread count
    # read from the environment would be a guess (the library caps it), so only the variables are recorded.
    why = "threadpoolctl is not installed (pip install 'relpos_ref[bench]'); NumPy's build configuration has no count"
    env = ", ".join(f"{v}={os.environ[v]}" for v in _THREAD_VARS if v in os.environ)
    if env:
        why += f"; set: {env}"
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]
    except Exception:  # older NumPy: no dict mode
        return [{"user_api": "blas", "name": "unknown", "source": "none", "threads_unknown": why}]
    out = []
    for api in ("blas", "lapack"):
        d = cfg.get(api, {})
        entry = {"user_api": api, "name": d.get("name"), "version": d.get("version"), "source": "numpy build"}
        entry["threads_unknown"] = why
        out.append(entry)
    return out


def blas_threads_text(lib: dict[str, Any]) -> str:
    """A BLAS entry's thread count for the report: the number, or "unknown" with the reason."""
    n = lib.get("num_threads")
    if isinstance(n, int):
        return f"{n} threads"
    return f"threads unknown: {lib.get('threads_unknown') or 'no thread count recorded'}"


def machine_info() -> dict[str, Any]:
    """CPU, memory, Python and library versions, BLAS threading, GPU (no host names, no paths)."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
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
