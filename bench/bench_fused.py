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

Every configuration sets ``RELPOS_REF_CUDA_CLUSTERS`` for its whole measurement: "0" (clusters off) for the
one-block rows, which therefore stay comparable with runs made before the cluster kernel existed, and "1" or a tuning
string "FROM:CxNTxVPT,..." for the cluster rows. Cluster rows (thread-block clusters, compute capability 9.0 and
later; skipped on older devices) come right after the target rows so that ``--budget`` does not cut them:

* the default policy ("1") on the one-block rows' shapes at Sk = 16384, 32768 and 65536 (float32), float16 at
  32768 and decode (32, 32, 1, Sk) at 32768 and 65536, without baselines (the one-block row of the same shape has
  them; ``--quick``: float32 at 16384 and 32768 only);
* a sweep of the piece size (keys per block), threads per block and blocks per cluster at Sk = 16384 and 32768, and
  2 blocks of 4096 keys at Sk = 8192 (which the default policy leaves to the one-block kernel). A tuning string is
  run only at the row lengths where one of its configurations applies, and a configuration the default policy
  already runs at that length is not repeated.

Cluster rows also record ``max_abs_diff_vs_one_block``, the largest difference of their output from the one-block
kernel's on the same scores: most sweep configurations never run in the GPU tests, and a row that disagrees is
flagged and left out of the targets' "best".

Each record names its kernel (``kernel``) and a short ``path`` label ("warp 32x8", "block 1024x16", "stream 1024x8",
"cluster 4x256x16": the template arguments between the storage type and the vector width).

Bandwidth targets (reported, not asserted): float32, Sk >= 4096: fused effective bandwidth >= 85 % of the copy's,
>= 2x faster than ``cupy_unfused`` and than ``torch``. For each causal ALiBi prefill shape the markdown gives the
one-block figure, the best cluster figure (its path and policy string) and the better of the two; speed-ups of
cluster rows are the one-block row's baseline times over the cluster kernel's time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import relpos_ref as rp
from relpos_ref.cuda import fused_biased_softmax
from relpos_ref.cuda._launch import _cupy_backend, _function, _prepare
from relpos_ref.cuda._source import cluster_policy, plan_launch

ELEMS = 1 << 27  # 128 Mi elements per configuration: 512 MiB of float32 scores
CLUSTERS_ENV = "RELPOS_REF_CUDA_CLUSTERS"
# Tuning strings of the cluster sweep (float32, Sk = 16384 and 32768): pieces of 8192 keys held as 256 x 32 (the
# default policy holds 4096 keys as 256 x 16 up to 32768), pieces of 2048 keys (8 blocks, fits 16384 only), pieces
# of 4096 keys in 128-thread blocks, and pieces of 8192 keys in 512-thread blocks.
CLUSTER_SWEEP = ("8192:2x256x32,4x256x32,8x256x32", "8192:8x256x8", "8192:4x128x32,8x128x32", "8192:2x512x16,4x512x16")
# Two 4096-key pieces at Sk = 8192, where the default policy keeps the one-block kernel (89% of copy on an H200).
CLUSTER_SWEEP_8192 = "4096:2x256x16"


@contextlib.contextmanager
def cluster_env(value: str | None):
    """Set ``RELPOS_REF_CUDA_CLUSTERS`` to ``value`` ("0" for None) and restore the previous state on exit.

    The library reads the variable on every call, so it has to stay set for the kernel-only launch preparation and
    for every timed ``fused_biased_softmax`` call alike.
    """
    old = os.environ.get(CLUSTERS_ENV)
    os.environ[CLUSTERS_ENV] = "0" if value is None else value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CLUSTERS_ENV, None)
        else:
            os.environ[CLUSTERS_ENV] = old


def path_label(name: str) -> str:
    """Short label of a kernel name expression: its kind and the launch-shape template arguments.

    ``rp::softmax_cluster<rp::FamAlibi, float, 4, 256, 16, 4>`` -> "cluster 4x256x16" (C x NT x VPT);
    ``rp::softmax_block<..., 1024, 16, 4>`` -> "block 1024x16" (NT x VPT, likewise "stream"); ``rp::softmax_warp<...,
    8, 4>`` -> "warp 32x8" (a warp of 32 lanes x VPT). The vector width is left out: it follows from the row length
    and alignment. An unrecognised name is returned unchanged.
    """
    head, sep, rest = name.partition("<")
    kind = head.strip().removeprefix("rp::softmax_")
    args = [a.strip() for a in rest.removesuffix(">").split(",")] if sep else []
    shape = args[2:-1]  # after the family and the storage type, before the vector width
    expected = {"warp": 1, "block": 2, "stream": 2, "cluster": 3}.get(kind)
    if expected is None or len(shape) != expected or not all(a.isdigit() for a in shape):
        return name
    return f"{kind} {'x'.join(['32', *shape] if kind == 'warp' else shape)}"


def cluster_shape(policy: str, sk: int, dtype: str = "float32") -> tuple[int, int, int] | None:
    """(C, NT, VPT) that ``policy`` (a RELPOS_REF_CUDA_CLUSTERS value) gives rows of ``sk`` keys, None if none."""
    plan = plan_launch(sk, dtype, clusters=cluster_policy(dtype, {CLUSTERS_ENV: policy}))
    return (plan.cluster, plan.threads_per_row, plan.vpt) if plan.kind == "cluster" else None


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
        return rp.T5Bias(rng.normal(size=(heads, 32)), bidirectional=False, layout="heads_buckets")
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
    *,
    family: str,
    shape: tuple[int, int, int, int],
    dtype: str,
    causal: bool,
    baselines: bool,
    reps: int,
    trials: int,
    clusters: str | None = None,
) -> dict:
    """Time one configuration; ``clusters`` is the RELPOS_REF_CUDA_CLUSTERS value for it (None: "0", off)."""
    with cluster_env(clusters):
        return _measure(family=family, shape=shape, dtype=dtype, causal=causal, baselines=baselines, reps=reps,
                        trials=trials)  # fmt: skip


def _measure(
    *, family: str, shape: tuple[int, int, int, int], dtype: str, causal: bool, baselines: bool, reps: int, trials: int
) -> dict:
    import array_api_compat.cupy as cpx
    import cupy as cp

    b, h, sq, sk = shape
    n = b * h * sq * sk
    itemsize = np.dtype(dtype).itemsize
    scale = 1.0 / math.sqrt(128)
    rec: dict = {"family": family, "shape": list(shape), "dtype": dtype, "causal": causal,
                 "clusters": os.environ.get(CLUSTERS_ENV, "0"), "elements": n}  # fmt: skip
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
    rec["path"] = path_label(launch.name)
    rec["cluster_blocks"] = launch.cluster
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
    if launch.cluster > 1:
        # Most sweep configurations never run in the GPU tests, and a fast but wrong one must not be adopted: compare
        # with the one-block kernel (the baselines' check is absent from these rows).
        out = fused_biased_softmax(scores, fam, causal=causal, scale=scale)
        with cluster_env("0"):
            ref = fused_biased_softmax(scores, fam, causal=causal, scale=scale)
        rec["max_abs_diff_vs_one_block"] = float(cp.abs(out.astype(cp.float32) - ref.astype(cp.float32)).max())
        del out, ref

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
    cluster_runs = set()  # (dtype, shape, (C, NT, VPT)): each cluster kernel once per shape

    def add(family, shape, dtype="float32", causal=True, baselines=True, clusters=None):
        if clusters is not None:
            cfg = cluster_shape(clusters, shape[3], dtype)
            if cfg is None or (dtype, shape, cfg) in cluster_runs:
                return  # it would rerun a one-block kernel or a cluster kernel already in the list
            cluster_runs.add((dtype, shape, cfg))
        out.append({"family": family, "shape": shape, "dtype": dtype, "causal": causal, "baselines": baselines,
                    "clusters": clusters})  # fmt: skip

    def rows_shape(sk, b=2, h=16, elems=ELEMS):
        return (b, h, max(1, elems // (b * h * sk)), sk)

    # The target: float32, Sk >= 4096, many rows.
    for sk in (4096, 8192, 16384, 32768) if not quick else (4096,):
        add("alibi", rows_shape(sk))
    # Cluster kernels, right after the target rows so that --budget does not cut them. No baselines: the one-block
    # rows of the same shapes have them, and they are slow. The default policy first, then the sweep.
    for sk in (16384, 32768, 65536) if not quick else (16384, 32768):
        add("alibi", rows_shape(sk), baselines=False, clusters="1")
    if not quick:
        add("alibi", rows_shape(32768), dtype="float16", baselines=False, clusters="1")
        for sk in (32768, 65536):
            add("alibi", (32, 32, 1, sk), baselines=False, clusters="1")
        add("alibi", rows_shape(8192), baselines=False, clusters=CLUSTER_SWEEP_8192)
        for policy in CLUSTER_SWEEP:
            for sk in (16384, 32768):
                add("alibi", rows_shape(sk), baselines=False, clusters=policy)
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


def _clusters_on(r: dict) -> bool:
    return r.get("clusters") not in (None, "", "0")


def _path(r: dict) -> str:
    # Records of runs before the path column existed still carry the kernel name.
    return r.get("path") or (path_label(r["kernel"]) if "kernel" in r else "-")


def _is_cluster(r: dict) -> bool:
    return "error" not in r and _path(r).startswith("cluster ")


def _case(r: dict) -> tuple:
    return r["family"], r["dtype"], tuple(r["shape"]), r.get("causal", True)


def _speedups(r: dict, baselines: dict) -> tuple[dict, bool]:
    """(speed-ups of ``r``, borrowed): its own, or for a row without baselines those of the one-block row of the same
    case, as that row's baseline time / this row's kernel time."""
    own = {
        k: r[k] for k in ("speedup_vs_cupy_unfused", "speedup_vs_cupy_unfused_with_bias", "speedup_vs_torch") if k in r
    }
    base = baselines.get(_case(r))
    if own or base is None or base is r or "fused_kernel_s" not in r:
        return own, False
    t = r["fused_kernel_s"]
    out = {
        "speedup_vs_cupy_unfused": base["cupy_unfused_s"] / t,
        "speedup_vs_cupy_unfused_with_bias": base["cupy_unfused_with_bias_s"] / t,
    }
    if "torch_s" in base:
        out["speedup_vs_torch"] = base["torch_s"] / t
    return out, True


def _cell(d: dict, key: str, fmt: str = "{:.2f}", mark: str = "") -> str:
    return fmt.format(d[key]) + mark if key in d else "-"


def _diff_cell(r: dict) -> str:
    if "max_abs_diff_vs_unfused" in r:
        return f"{r['max_abs_diff_vs_unfused']:.1e}"
    if "max_abs_diff_vs_one_block" in r:
        return f"{r['max_abs_diff_vs_one_block']:.1e}‡"
    return "-"


def _agrees(r: dict) -> bool:
    """Whether a cluster row's output matches the one-block kernel's within a few roundings of its dtype (the
    cluster kernel rounds twice more per probability); True when not compared."""
    d = r.get("max_abs_diff_vs_one_block")
    return d is None or d <= (2e-3 if r["dtype"] == "float16" else 1e-5)  # False for NaN


def _policy(r: dict) -> str:
    return f"{CLUSTERS_ENV}={r['clusters']}" if _clusters_on(r) else "clusters off"


def to_markdown(meta: dict, recs: list[dict]) -> str:
    # One-block rows (clusters off) with baselines, per case: the reference for rows measured without their own.
    baselines = {_case(r): r for r in recs if "cupy_unfused_s" in r and not _clusters_on(r)}
    lines = [
        "# Fused biased softmax benchmark",
        "",
        f"Device: {meta['device']['device']} (CC {meta['device']['compute_capability']}, "
        f"{meta['device']['sm_count']} SMs); CuPy {meta['device']['cupy']}, CUDA runtime "
        f"{meta['device']['cuda_runtime']}, NVRTC {meta['device']['nvrtc']}. {meta['date']}.",
        "",
        "Effective bandwidth = (scores read once + probabilities written once) / kernel time. `reads` = how many "
        "times the kernel reads the scores (2 for the two-pass kernel: rows > 32768 keys, or > 65536 with clusters). "
        "Speed-ups are baseline time / fused kernel time; the baselines get the bias materialised beforehand "
        "(H, Sq, Sk), causal mask folded in, unless stated.",
        "",
        "`path`: the kernel and its launch shape: warp 32 x values per thread, block or stream threads x values per "
        "thread, cluster blocks per row x threads per block x values per thread. `clusters`: the value of "
        f"`{CLUSTERS_ENV}` for the row (`1` = the default policy, `FROM:CxNTxVPT,...` = a tuning list, - = off). "
        "† = the row has no baselines of its own: the one-block row of the same shape's baseline time / this row's "
        "kernel time. ‡ = max abs difference from the one-block kernel's output (cluster rows).",
        "",
        "| family | dtype | path | clusters | B,H,Sq,Sk | kernel ms | call ms | eff. GB/s | copy GB/s | eff/copy | "
        "reads | x cupy unfused | x cupy +bias | x torch | regs | max diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        cl = r["clusters"] if _clusters_on(r) else "-"
        if "error" in r:
            lines.append(
                f"| {r['family']} | {r['dtype']} | - | {cl} | {','.join(map(str, r['shape']))} | error: {r['error']} |"
            )
            continue
        sp, borrowed = _speedups(r, baselines)
        mark = "†" if borrowed else ""
        lines.append(
            f"| {r['family']} | {r['dtype']} | {_path(r)} | {cl} | {','.join(map(str, r['shape']))} | "
            f"{r['fused_kernel_s'] * 1e3:.3f} | {r['fused_call_s'] * 1e3:.3f} | {r['fused_effective_GBps']:.0f} | "
            f"{r['copy_GBps']:.0f} | {r['fused_vs_copy']:.1%} | {r['score_reads']} | "
            f"{_cell(sp, 'speedup_vs_cupy_unfused', mark=mark)} | "
            f"{_cell(sp, 'speedup_vs_cupy_unfused_with_bias', mark=mark)} | "
            f"{_cell(sp, 'speedup_vs_torch', mark=mark)} | {r['registers']} | "
            f"{_diff_cell(r)} |"
        )
    lines += _targets(recs, baselines)
    lines += _cluster_summary(recs)
    return "\n".join(lines) + "\n"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _targets(recs: list[dict], baselines: dict) -> list[str]:
    """The bandwidth targets per float32 causal ALiBi prefill shape: the one-block row, the best cluster row whose
    output agrees with the one-block kernel's, the better of the two against 85 % of copy bandwidth."""
    lines = [
        "",
        "## Targets (float32, Sk >= 4096, alibi, causal)",
        "",
        "85 % of copy bandwidth, 2x over CuPy unfused and over torch. The first line of each shape is the one-block "
        "kernel (clusters off); cluster speed-ups are the one-block row's baseline time / cluster kernel time.",
        "",
    ]
    groups: dict = {}
    for r in recs:
        if not (r.get("dtype") == "float32" and r.get("family") == "alibi" and r.get("causal", True)):
            continue
        if r["shape"][3] < 4096 or r["shape"][2] <= 1:
            continue
        g = groups.setdefault(tuple(r["shape"]), {"one": None, "cluster": [], "why": [], "one_why": ""})
        if "error" in r:
            if _clusters_on(r):
                g["why"].append(r["error"])
            else:
                g["one_why"] = f" ({r['error']})"
        elif _is_cluster(r):
            g["cluster"].append(r)
        elif not _clusters_on(r):
            g["one"] = r
    for shape in sorted(groups, key=lambda s: s[3]):
        g, sk = groups[shape], shape[3]
        one = g["one"]
        if one is None:
            lines.append(f"- Sk={sk}: one-block row not measured{g['one_why']}")
        elif "speedup_vs_cupy_unfused" in one:
            lines.append(
                f"- Sk={sk}: bandwidth {one['fused_vs_copy']:.1%} of copy ({_met(one['fused_vs_copy'] >= 0.85)}), "
                f"{one['speedup_vs_cupy_unfused']:.2f}x vs cupy unfused ({_met(one['speedup_vs_cupy_unfused'] >= 2)}), "
                f"{one.get('speedup_vs_torch', float('nan')):.2f}x vs torch "
                f"({_met(one.get('speedup_vs_torch', 0) >= 2)}) [one-block: {_path(one)}]"
            )
        else:
            lines.append(
                f"- Sk={sk}: bandwidth {one['fused_vs_copy']:.1%} of copy ({_met(one['fused_vs_copy'] >= 0.85)}), "
                f"no baselines [one-block: {_path(one)}]"
            )
        good = [r for r in g["cluster"] if _agrees(r)]
        if good:
            best = max(good, key=lambda r: r["fused_vs_copy"])
            sp, _ = _speedups(best, baselines)
            text = (
                f"  - best cluster (of {len(good)}): bandwidth {best['fused_vs_copy']:.1%} of copy "
                f"({_met(best['fused_vs_copy'] >= 0.85)}) [{_path(best)}, {_policy(best)}]"
            )
            if "speedup_vs_cupy_unfused" in sp:
                text += (
                    f"; with the one-block row's baselines: {sp['speedup_vs_cupy_unfused']:.2f}x vs cupy unfused "
                    f"({_met(sp['speedup_vs_cupy_unfused'] >= 2)})"
                )
                if "speedup_vs_torch" in sp:
                    text += f", {sp['speedup_vs_torch']:.2f}x vs torch ({_met(sp['speedup_vs_torch'] >= 2)})"
            lines.append(text)
        elif not g["why"] and not g["cluster"]:
            lines.append("  - cluster: no row")
        # A cluster row whose output differs from the one-block kernel's is left out of "best": its speed is moot.
        for r in g["cluster"]:
            if not _agrees(r):
                lines.append(
                    f"  - cluster row DIFFERS from the one-block output by {r['max_abs_diff_vs_one_block']:.1e} "
                    f"(left out): {r['fused_vs_copy']:.1%} [{_path(r)}, {_policy(r)}]"
                )
        for why in sorted(set(g["why"])):
            lines.append(f"  - cluster rows not run: {g['why'].count(why)} ({why})")
        rows = [r for r in (one, *good) if r is not None]
        if rows:
            best = max(rows, key=lambda r: r["fused_vs_copy"])
            lines.append(
                f"  - best: {best['fused_vs_copy']:.1%} ({_path(best)}, {_policy(best)}): "
                f"{_met(best['fused_vs_copy'] >= 0.85)}"
            )
    return lines


def _cluster_summary(recs: list[dict]) -> list[str]:
    """Per shape with cluster rows: every cluster configuration's fraction of copy bandwidth, best first, next to
    the one-block row's, to choose the default policy from."""
    ones = {_case(r): r for r in recs if "error" not in r and not _clusters_on(r)}
    cases: dict = {}
    for r in recs:
        if _is_cluster(r):
            cases.setdefault(_case(r), []).append(r)
    skipped = sorted({r["error"] for r in recs if "error" in r and _clusters_on(r)})
    if not cases and not skipped:
        return []
    lines = ["", "## Cluster kernels (fraction of copy bandwidth, best first)", ""]
    for case, rows in cases.items():
        family, dtype, shape, causal = case
        one = ones.get(case)
        ref = f"one-block {one['fused_vs_copy']:.1%} ({_path(one)})" if one else "one-block not measured"
        items = ", ".join(
            f"{r['fused_vs_copy']:.1%} {_path(r).removeprefix('cluster ')} (`{r['clusters']}`"
            f"{'' if _agrees(r) else ', DIFFERS from one-block: ' + format(r['max_abs_diff_vs_one_block'], '.1e')})"
            for r in sorted(rows, key=lambda r: -r["fused_vs_copy"])
        )
        what = f"{family} {dtype} {','.join(map(str, shape))}{'' if causal else ' non-causal'}"
        lines.append(f"- {what}: {ref}; cluster CxNTxVPT: {items}")
    for why in skipped:
        n = sum(1 for r in recs if r.get("error") == why and _clusters_on(r))
        lines.append(f"- {n} cluster row(s) not run: {why}")
    return lines


def _context_error() -> str | None:
    """None if the device still synchronises cleanly, else the error: a kernel fault (an illegal address, say) is
    sticky, and the configurations after it would only repeat it."""
    import cupy as cp

    try:
        cp.cuda.Device().synchronize()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


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
    try:
        has_clusters = int(meta["device"]["compute_capability"]) >= 90
    except (TypeError, ValueError):
        has_clusters = False
    broken = None  # set when a failure leaves the CUDA context unusable: every later launch would fail too

    def flush():
        args.out.write_text(json.dumps({"meta": meta, "results": recs}, indent=1))
        args.md.write_text(to_markdown(meta, recs))

    for cfg in configs(args.quick):
        skip = None
        if broken:
            skip = f"skipped: CUDA context unusable after an earlier failure ({broken})"
        elif time.perf_counter() - t0 > args.budget:
            skip = "skipped: time budget exhausted"
        elif cfg["clusters"] not in (None, "0") and not has_clusters:
            skip = "skipped: thread-block clusters need compute capability 9.0 or later"
        if skip:
            recs.append({**cfg, "shape": list(cfg["shape"]), "error": skip})
            flush()
            continue
        t1 = time.perf_counter()
        try:
            rec = bench_config(**cfg, reps=args.reps, trials=args.trials)
        except Exception as exc:
            failed += 1
            rec = {**cfg, "shape": list(cfg["shape"]), "error": f"{type(exc).__name__}: {exc}"}
            broken = _context_error()
        rec["wall_s"] = time.perf_counter() - t1
        recs.append(rec)
        print(json.dumps(rec), flush=True)
        flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
