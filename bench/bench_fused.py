"""Fused biased softmax benchmark (GPU): bandwidth against a device-to-device copy, speed-up over unfused paths.

Run from the repository root on a machine with a CUDA GPU and CuPy (PyTorch optional):

    PYTHONPATH=. python bench/bench_fused.py --out results.json --md results.md

Timing: CUDA events on the current stream around ``reps`` back-to-back launches, median of ``trials`` such batches,
after warm-up (compilation excluded). Reported per configuration:

* ``copy``: ``cudaMemcpyAsync`` device-to-device of the scores (N elements); bandwidth = 2 N itemsize / time;
* ``fused_kernel``: the fused kernel alone, launched with prepared arguments; ``fused_call``: the whole
  ``fused_biased_softmax`` call (argument preparation included);
* effective bandwidth of the fused kernel = (scores read once + probabilities written once) / time = 2 N itemsize /
  time, whatever the kernel really moves: the two-pass kernel for rows > 32768 keys reads the scores twice (its real
  traffic is 3 N itemsize; both figures are reported) and every kernel also reads small parameter tables;
* ``cupy_unfused``: CuPy with the bias materialised beforehand (H, Sq, Sk, with the causal mask folded in as -inf,
  not timed): ``z = s * scale + bias; z -= max; e = exp(z); e /= sum``;
* ``cupy_unfused_with_bias``: the same plus computing the bias (``family.bias`` on CuPy) and the mask in the timed
  region;
* ``torch``: ``torch.softmax(x * scale + bias, -1)`` with the same materialised bias (zero-copy DLPack input).

Targets (issue 6, reported, not asserted): float32, Sk >= 4096: fused effective bandwidth >= 85 % of the copy's,
>= 2x faster than ``cupy_unfused`` and than ``torch``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import relpos_ref as rp
from relpos_ref.cuda import _cupy_backend, _function, _prepare, fused_biased_softmax

ELEMS = 1 << 27  # 128 Mi elements per configuration: 512 MiB of float32 scores


def time_gpu(fn, *, reps: int, trials: int, warmup: int = 2) -> float:
    """Median seconds per call of fn over `trials` batches of `reps` calls, timed with CUDA events."""
    import cupy as cp

    for _ in range(warmup):
        fn()
    cp.cuda.get_current_stream().synchronize()
    out = []
    for _ in range(trials):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        out.append(cp.cuda.get_elapsed_time(start, stop) / 1e3 / reps)
    return statistics.median(out)


def time_torch(fn, *, reps: int, trials: int, warmup: int = 2) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(trials):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        out.append(start.elapsed_time(stop) / 1e3 / reps)
    return statistics.median(out)


def make_family(name: str, heads: int):
    rng = np.random.default_rng(0)
    if name == "none":
        return None
    if name == "alibi":
        return rp.ALiBi.from_num_heads(heads)
    if name == "t5":
        return rp.T5Bias(rng.normal(size=(heads, 32)), bidirectional=False)
    if name == "kerple_power":
        return rp.KerplePower(rng.uniform(0.1, 1, heads), rng.uniform(0.5, 2, heads))
    if name == "kerple_log":
        return rp.KerpleLog(rng.uniform(0.1, 1, heads), rng.uniform(0.1, 1, heads))
    if name == "offset":
        return rp.OffsetBias(rng.normal(size=(heads, 257)))
    if name == "sandwich":
        return rp.Sandwich(heads, 128)
    if name == "fire":
        return rp.FIRE(
            rng.normal(size=(32, 1)), rng.normal(size=32), rng.normal(size=(heads, 32)), rng.normal(size=heads)
        )
    raise ValueError(name)


def bench_config(
    *, family: str, shape: tuple[int, int, int, int], dtype: str, causal: bool, baselines: bool, reps: int, trials: int
) -> dict:
    import array_api_compat.cupy as cpx
    import cupy as cp

    b, h, sq, sk = shape
    n = b * h * sq * sk
    itemsize = np.dtype(dtype).itemsize
    scale = 1.0 / math.sqrt(128)
    rec: dict = {"family": family, "shape": list(shape), "dtype": dtype, "causal": causal, "elements": n}
    scores = cp.random.default_rng(0).standard_normal(shape, dtype=cp.float32).astype(dtype)
    fam = make_family(family, h)

    # device-to-device copy of the same bytes
    dst = cp.empty_like(scores)
    nbytes = scores.nbytes

    def copy():
        dst.data.copy_from_device_async(scores.data, nbytes)

    t_copy = time_gpu(copy, reps=reps, trials=trials)
    rec["copy_s"] = t_copy
    rec["copy_GBps"] = 2 * nbytes / t_copy / 1e9
    dst = None

    with scores.device:
        launch = _prepare(
            _cupy_backend(), scores, fam, q_pos=None, k_pos=None, align="bottom_right", causal=causal, mask=None,
            scale=scale, placement="post_scale", fully_masked="zero", return_lse=False,
        )  # fmt: skip
    kern = _function(launch.name)
    grid, block, args = (launch.grid,), (launch.block,), launch.args
    rec["kernel"] = launch.name
    rec["registers"] = int(kern.num_regs)
    rec["local_bytes"] = int(kern.local_size_bytes)
    t_kernel = time_gpu(lambda: kern(grid, block, args), reps=reps, trials=trials)
    t_call = time_gpu(lambda: fused_biased_softmax(scores, fam, causal=causal, scale=scale), reps=reps, trials=trials)
    passes = 2 if "softmax_stream" in launch.name else 1
    rec.update(
        fused_kernel_s=t_kernel,
        fused_call_s=t_call,
        fused_effective_GBps=2 * n * itemsize / t_kernel / 1e9,
        fused_actual_GBps=(1 + passes) * n * itemsize / t_kernel / 1e9,
        score_reads=passes,
    )
    rec["fused_vs_copy"] = rec["fused_effective_GBps"] / rec["copy_GBps"]

    if baselines:
        q_pos, k_pos = rp.positions(sq, sk, xp=cpx)
        famc = None if fam is None else fam.astype(cpx.float32, xp=cpx)

        def materialise():
            bias = cp.zeros((h, sq, sk), dtype=cp.float32) if famc is None else famc.bias(q_pos, k_pos)
            bias = bias.astype(cp.float32, copy=False)
            if causal:
                bias = cp.where(rp.causal_mask(q_pos, k_pos)[None], bias, cp.float32(-cp.inf))
            return bias

        bias = materialise()
        x32 = scores if dtype == "float32" else None

        def unfused(bias=bias):
            z = (x32 if x32 is not None else scores.astype(cp.float32)) * cp.float32(scale) + bias
            z -= z.max(axis=-1, keepdims=True)
            cp.exp(z, out=z)
            z /= z.sum(axis=-1, keepdims=True)
            return z.astype(dtype, copy=False)

        # Sanity check that the timed kernels compute the same thing (the tests are the real check).
        fused_out = fused_biased_softmax(scores, fam, causal=causal, scale=scale)
        diff = cp.abs(fused_out.astype(cp.float32) - unfused().astype(cp.float32))
        rec["max_abs_diff_vs_unfused"] = float(diff.max())
        del fused_out, diff
        rec["cupy_unfused_s"] = time_gpu(unfused, reps=max(1, reps // 4), trials=trials)
        rec["cupy_unfused_with_bias_s"] = time_gpu(
            lambda: unfused(materialise()), reps=max(1, reps // 4), trials=trials
        )
        rec["speedup_vs_cupy_unfused"] = rec["cupy_unfused_s"] / t_kernel
        rec["speedup_vs_cupy_unfused_with_bias"] = rec["cupy_unfused_with_bias_s"] / t_kernel
        try:
            import torch

            xt = torch.from_dlpack(scores)
            bt = torch.from_dlpack(bias).to(xt.dtype)
            rec["torch_s"] = time_torch(lambda: torch.softmax(xt * scale + bt, dim=-1), reps=max(1, reps // 4),
                                        trials=trials)  # fmt: skip
            rec["speedup_vs_torch"] = rec["torch_s"] / t_kernel
            rec["torch_version"] = torch.__version__
            del xt, bt
        except Exception as exc:  # torch missing or without CUDA: report, do not fail the benchmark
            rec["torch_error"] = f"{type(exc).__name__}: {exc}"
        del bias
    cp.get_default_memory_pool().free_all_blocks()
    return rec


def device_info() -> dict:
    import cupy as cp

    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    try:
        nvrtc = ".".join(map(str, cp.cuda.nvrtc.getVersion()))
    except Exception as exc:  # informational only
        nvrtc = f"unknown ({type(exc).__name__})"
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return {
        "device": name,
        "compute_capability": dev.compute_capability,
        "sm_count": props["multiProcessorCount"],
        "memory_GiB": props["totalGlobalMem"] / 2**30,
        "cupy": cp.__version__,
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cp.cuda.runtime.driverGetVersion(),
        "nvrtc": nvrtc,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def configs(quick: bool) -> list[dict]:
    out = []

    def add(family, shape, dtype="float32", causal=True, baselines=True):
        out.append({"family": family, "shape": shape, "dtype": dtype, "causal": causal, "baselines": baselines})

    def rows_shape(sk, b=2, h=16, elems=ELEMS):
        return (b, h, max(1, elems // (b * h * sk)), sk)

    # The target: float32, Sk >= 4096, many rows.
    for sk in (4096, 8192, 16384, 32768) if not quick else (4096,):
        add("alibi", rows_shape(sk))
    # Short rows (warp kernels).
    for sk in (128, 256, 512, 1024) if not quick else (1024,):
        add("alibi", rows_shape(sk, b=8))
    # Decode: one query per (batch, head).
    for sk in (4096, 32768, 131072) if not quick else (32768,):
        add("alibi", (32, 32, 1, sk))
    # float16 scores.
    for sk in (1024, 4096, 32768) if not quick else (4096,):
        add("alibi", rows_shape(sk), dtype="float16")
    # Every family at one size (no baselines beyond the first), and the two-pass kernel.
    for fam in ("none", "t5", "kerple_power", "kerple_log", "offset", "sandwich", "fire"):
        add(fam, rows_shape(4096), baselines=fam in ("t5", "fire"))
    add("alibi", rows_shape(65536), baselines=False)
    return out


def to_markdown(meta: dict, recs: list[dict]) -> str:
    lines = [
        "# Fused biased softmax benchmark",
        "",
        f"Device: {meta['device']['device']} (CC {meta['device']['compute_capability']}, "
        f"{meta['device']['sm_count']} SMs); CuPy {meta['device']['cupy']}, CUDA runtime "
        f"{meta['device']['cuda_runtime']}, NVRTC {meta['device']['nvrtc']}. {meta['date']}.",
        "",
        "Effective bandwidth = (scores read once + probabilities written once) / kernel time. `reads` = how many "
        "times the kernel reads the scores (2 for the two-pass kernel, rows > 32768 keys). Speed-ups are "
        "baseline time / fused kernel time; the baselines get the bias materialised beforehand (H, Sq, Sk), causal "
        "mask folded in, unless stated.",
        "",
        "| family | dtype | B,H,Sq,Sk | kernel ms | call ms | eff. GB/s | copy GB/s | eff/copy | reads | "
        "x cupy unfused | x cupy +bias | x torch | regs | max diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['dtype']} | {r['shape']} | error: {r['error']} |")
            continue

        def f(key, r=r, fmt="{:.2f}"):
            return fmt.format(r[key]) if key in r else "-"

        lines.append(
            f"| {r['family']} | {r['dtype']} | {','.join(map(str, r['shape']))} | {r['fused_kernel_s'] * 1e3:.3f} | "
            f"{r['fused_call_s'] * 1e3:.3f} | {r['fused_effective_GBps']:.0f} | {r['copy_GBps']:.0f} | "
            f"{r['fused_vs_copy']:.1%} | {r['score_reads']} | {f('speedup_vs_cupy_unfused')} | "
            f"{f('speedup_vs_cupy_unfused_with_bias')} | {f('speedup_vs_torch')} | {r['registers']} | "
            f"{f('max_abs_diff_vs_unfused', fmt='{:.1e}')} |"
        )
    lines += ["", "## Targets (float32, Sk >= 4096, alibi, causal)", ""]
    for r in recs:
        if r.get("dtype") == "float32" and r.get("family") == "alibi" and r["shape"][3] >= 4096 and r["shape"][2] > 1:
            if "error" in r or "speedup_vs_cupy_unfused" not in r:
                continue
            ok_bw = r["fused_vs_copy"] >= 0.85
            ok_cu = r["speedup_vs_cupy_unfused"] >= 2
            ok_t = r.get("speedup_vs_torch", 0) >= 2
            lines.append(
                f"- Sk={r['shape'][3]}: bandwidth {r['fused_vs_copy']:.1%} of copy ({'met' if ok_bw else 'NOT met'}), "
                f"{r['speedup_vs_cupy_unfused']:.2f}x vs cupy unfused ({'met' if ok_cu else 'NOT met'}), "
                f"{r.get('speedup_vs_torch', float('nan')):.2f}x vs torch ({'met' if ok_t else 'NOT met'})"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results")
    ap.add_argument("--md", type=Path, required=True, help="markdown summary")
    ap.add_argument("--quick", action="store_true", help="one size per group")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; later configurations are skipped beyond it")
    args = ap.parse_args(argv)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "elements": ELEMS}
    recs = []
    try:
        meta["device"] = device_info()
    except Exception as exc:  # no usable GPU: still leave result files saying why
        meta["device"] = {"device": f"unavailable ({type(exc).__name__}: {exc})", "compute_capability": "-",
                          "sm_count": "-", "cupy": "-", "cuda_runtime": "-", "nvrtc": "-"}  # fmt: skip
        args.out.write_text(json.dumps({"meta": meta, "results": recs}, indent=1))
        args.md.write_text(to_markdown(meta, recs))
        print(meta["device"]["device"], file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    failed = 0

    def flush():
        args.out.write_text(json.dumps({"meta": meta, "results": recs}, indent=1))
        args.md.write_text(to_markdown(meta, recs))

    for cfg in configs(args.quick):
        if time.perf_counter() - t0 > args.budget:
            recs.append({**cfg, "shape": list(cfg["shape"]), "error": "skipped: time budget exhausted"})
            flush()
            continue
        t1 = time.perf_counter()
        try:
            rec = bench_config(**cfg, reps=args.reps, trials=args.trials)
        except Exception as exc:
            failed += 1
            rec = {**cfg, "shape": list(cfg["shape"]), "error": f"{type(exc).__name__}: {exc}"}
        rec["wall_s"] = time.perf_counter() - t1
        recs.append(rec)
        print(json.dumps(rec), flush=True)
        flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
