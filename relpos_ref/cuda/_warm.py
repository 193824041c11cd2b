"""Compile the fused kernels ahead of use, in parallel, into CuPy's on-disk kernel cache.

NVRTC compiles one instantiation in roughly half a second and a test session needs a few hundred; compiling them
in worker processes first means later processes (tests, benchmarks) load cubins from ``$CUPY_CACHE_DIR``. The cache
key is CuPy's (source, options, name expression, architecture, toolkit), the same as the loader's. Needs a GPU.

On a device of compute capability 9.0 or later the cluster kernels of the default policy are compiled too, although
they only run with ``RELPOS_REF_CUDA_CLUSTERS`` set: the GPU tests and the benchmark turn it on. Tuning strings
(``FROM:CxNTxVPT,...``) name other instantiations, which compile on first use.

Usage: ``python -m relpos_ref.cuda._warm [--jobs N] [--dtypes float32,float16,float64] [--families ...]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed


def _compile_chunk(names: list[str]) -> tuple[int, list[str]]:
    from relpos_ref.cuda._launch import _function

    failed = []
    for n in names:
        try:
            _function(n)
        except Exception as exc:  # report and continue: the tests will show the same error with context
            failed.append(f"{n}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return len(names), failed


def _device_has_clusters() -> bool:
    """Whether the current device supports thread-block clusters (CC >= 9.0); False if it cannot be queried.

    The query may create a CUDA context in this process; harmless, since the workers are spawned, not forked.
    """
    try:
        import cupy

        return int(cupy.cuda.Device().compute_capability) >= 90
    except Exception:  # no CuPy or no device: the workers will report the real error, if any
        return False


def main(argv: list[str] | None = None) -> int:
    from relpos_ref.cuda import all_kernel_names

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--dtypes", default="float32,float16,float64")
    ap.add_argument("--families", default=None, help="comma-separated (default: all)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds; stop submitting work after this")
    args = ap.parse_args(argv)
    fams = args.families.split(",") if args.families else None
    clusters = _device_has_clusters()
    names = all_kernel_names(fams, args.dtypes.split(","), clusters=clusters)
    n_cluster = sum("softmax_cluster<" in n for n in names)
    if clusters:
        print(f"{len(names)} kernels, {n_cluster} of them cluster kernels (device CC >= 9.0)", flush=True)
    else:
        print(f"{len(names)} kernels, no cluster kernels (device CC < 9.0, or not queryable)", flush=True)
    # Small tasks so that the deadline stops the pool quickly; interleaved so each task mixes kernel sizes.
    tasks = [names[k :: len(names) // 8 + 1] for k in range(len(names) // 8 + 1)]
    t0 = time.perf_counter()
    done, failed = 0, []
    import multiprocessing as mp  # spawn: CUDA contexts must not be forked

    ex = ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn"))
    try:
        futures = [ex.submit(_compile_chunk, t) for t in tasks if t]
        for fut in as_completed(futures):
            n, f = fut.result()
            done += n
            failed += f
            if args.deadline is not None and time.perf_counter() - t0 > args.deadline:
                print(f"deadline of {args.deadline} s reached", flush=True)
                break
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    dt = time.perf_counter() - t0
    print(f"compiled {done - len(failed)}/{len(names)} kernels in {dt:.1f} s with {args.jobs} processes")
    for f in failed:
        print("FAILED", f, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
