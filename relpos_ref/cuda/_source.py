"""The CUDA source shipped with relpos_ref, kernel naming and launch planning. Needs neither CuPy nor a GPU.

The ``.cu``/``.cuh`` files live next to this module (package data) and are read with :mod:`importlib.resources`.
``biased_softmax.cu`` includes ``bias.cuh``; NVRTC as driven by CuPy's ``RawModule`` takes a single source string, so
:func:`kernel_source` splices the header in, with ``#line`` directives that keep compiler messages pointing at the
right file and line.
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass

__all__ = [
    "CLUSTER_POLICIES",
    "FAMILY_STRUCTS",
    "STORAGE_TYPES",
    "ClusterPolicy",
    "LaunchPlan",
    "all_kernel_names",
    "cluster_policy",
    "kernel_source",
    "plan_launch",
]

_INCLUDE = '#include "bias.cuh"'

# C++ family struct templates of bias.cuh, keyed by the names the Python side uses.
FAMILY_STRUCTS = {
    "none": "rp::FamNone",
    "tensor": "rp::FamTensor",
    "alibi": "rp::FamAlibi",
    "kerple_power": "rp::FamKerplePower",
    "kerple_log": "rp::FamKerpleLog",
    "t5": "rp::FamT5",
    "offset": "rp::FamOffset",
    "sandwich": "rp::FamSandwich",
    "fire": "rp::FamFire",
}

# numpy dtype name of the scores -> C++ storage type.
STORAGE_TYPES = {"float16": "rp::half_t", "float32": "float", "float64": "double"}
_ITEMSIZE = {"float16": 2, "float32": 4, "float64": 8}

# One block per row with the row in registers: (threads, values per thread), smallest first. A 1024-thread block
# may use 64 registers per thread; 32 doubles alone take 64, so float64 stops at 512 threads (128 registers).
_BLOCK_CONFIGS = {
    # (256, 32) rather than (512, 16) for rows of 4097..8192 keys: 80 registers, three blocks per SM instead of two;
    # on an H200 it raised Sk = 8192 from 82.6% to 89.0% of copy bandwidth. (512, 32) for 16384 keys was slower
    # than (1024, 16) (56% vs 61%): bench/results/2026-11-27-gpu/block-configs/.
    "float": ((256, 8), (256, 16), (256, 32), (1024, 16), (1024, 32)),
    "double": ((256, 8), (256, 16), (512, 16), (512, 32)),
}


def _configs_from_env(name: str, default: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """Tuning knob for benchmarks: e.g. RELPOS_REF_CUDA_FLOAT_BLOCKS="256x8,256x16,512x32" replaces the float list."""
    import os

    text = os.environ.get(name)
    if not text:
        return default
    return tuple(tuple(int(n) for n in item.split("x")) for item in text.split(","))  # type: ignore[misc]


_BLOCK_CONFIGS = {
    "float": _configs_from_env("RELPOS_REF_CUDA_FLOAT_BLOCKS", _BLOCK_CONFIGS["float"]),
    "double": _BLOCK_CONFIGS["double"],
}
# Rows longer than the last block configuration: two passes, tiles of threads * values per thread.
_STREAM_CONFIG = {"float": (1024, 8), "double": (512, 8)}
WARP_MAX_SK = 1024


@dataclass(frozen=True)
class ClusterPolicy:
    """When rows go to the cluster kernel (sm_90+): rows longer than ``from_sk`` keys that fit one of ``configs``,
    (blocks per cluster, threads per block, values per thread) in order of capacity; the first that fits is used."""

    from_sk: int
    configs: tuple[tuple[int, int, int], ...]


# Clusters of 4 and 8 blocks of 256 x 16 or 256 x 32: each block holds 4096 or 8192 keys, the piece sizes whose
# one-block kernels reach 90% of copy bandwidth on an H200 (bench/results/2026-11-27-gpu). Rows up to 8192 keys
# (float) keep the one-block kernels, which already reach that. Not yet measured on a GPU: off unless
# RELPOS_REF_CUDA_CLUSTERS is set (see cluster_policy).
CLUSTER_POLICIES = {
    "float": ClusterPolicy(8192, ((4, 256, 16), (8, 256, 16), (8, 256, 32))),
    "double": ClusterPolicy(16384, ((8, 256, 16), (8, 256, 32))),
}
CLUSTER_MAX = 8  # the portable cluster size limit (larger needs a non-portable-size attribute at launch)


def cluster_policy(dtype: str, environ: dict | None = None) -> ClusterPolicy | None:
    """The cluster policy for ``dtype`` from ``RELPOS_REF_CUDA_CLUSTERS``: unset, "" or "0": None (no clusters);
    "1": the defaults above; "FROM:CxNTxVPT,..." (e.g. "4096:2x256x16,4x256x16"): a tuning list for benchmarks."""
    import os

    text = (os.environ if environ is None else environ).get("RELPOS_REF_CUDA_CLUSTERS", "").strip()
    acc = "double" if dtype == "float64" else "float"
    if text in ("", "0"):
        return None
    if text == "1":
        return CLUSTER_POLICIES[acc]
    try:
        head, _, tail = text.partition(":")
        configs = tuple(tuple(int(n) for n in item.split("x")) for item in tail.split(","))
        policy = ClusterPolicy(int(head), configs)  # type: ignore[arg-type]
        _check_cluster_policy(policy)
    except (ValueError, TypeError) as exc:
        msg = (
            "RELPOS_REF_CUDA_CLUSTERS: expected 0, 1 or FROM:CxNTxVPT[,CxNTxVPT...] (C <= 8, NT a multiple of 32 "
            f"up to 1024, VPT a power of two up to 32), got {text!r} ({exc})"
        )
        raise ValueError(msg) from None
    return policy


def _check_cluster_policy(policy: ClusterPolicy) -> None:
    for cfg in policy.configs:
        if len(cfg) != 3:
            raise ValueError(f"{cfg}: three numbers")
        c, nt, vpt = cfg
        shape_ok = 32 <= nt <= 1024 and nt % 32 == 0 and 1 <= vpt <= 32 and vpt & (vpt - 1) == 0
        if not (2 <= c <= CLUSTER_MAX and shape_ok):
            raise ValueError(f"{cfg} out of range")


def _read(name: str) -> str:
    return importlib.resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


@functools.cache
def kernel_source() -> str:
    """The complete kernel source (``biased_softmax.cu`` with ``bias.cuh`` spliced in), free of ``#include``."""
    main = _read("biased_softmax.cu")
    header = _read("bias.cuh")
    lines = main.split("\n")
    idx = [k for k, line in enumerate(lines) if line.strip() == _INCLUDE]
    if len(idx) != 1:  # pragma: no cover - guards an edit of the .cu file
        msg = f"biased_softmax.cu must contain exactly one line {_INCLUDE!r}"
        raise RuntimeError(msg)
    k = idx[0]
    spliced = ['#line 1 "bias.cuh"', header, f'#line {k + 2} "biased_softmax.cu"']
    return "\n".join(['#line 1 "biased_softmax.cu"', *lines[:k], *spliced, *lines[k + 1 :]])


@dataclass(frozen=True)
class LaunchPlan:
    """Which kernel runs a row length, and how it is launched."""

    kind: str  # "warp", "block", "stream" or "cluster"
    threads_per_row: int  # per block for "cluster"
    vpt: int  # values per thread (per tile for "stream")
    vec: int  # elements per vector load/store
    cluster: int = 1  # blocks per row ("cluster" only)

    @property
    def block(self) -> int:
        return 128 if self.kind == "warp" else self.threads_per_row

    def grid(self, nrows: int) -> int:
        return (nrows + 3) // 4 if self.kind == "warp" else nrows * self.cluster

    def kernel_name(self, family: str, dtype: str) -> str:
        fam, typ = FAMILY_STRUCTS[family], STORAGE_TYPES[dtype]
        if self.kind == "warp":
            return f"rp::softmax_warp<{fam}, {typ}, {self.vpt}, {self.vec}>"
        if self.kind == "cluster":
            return f"rp::softmax_cluster<{fam}, {typ}, {self.cluster}, {self.threads_per_row}, {self.vpt}, {self.vec}>"
        return f"rp::softmax_{self.kind}<{fam}, {typ}, {self.threads_per_row}, {self.vpt}, {self.vec}>"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan_launch(sk: int, dtype: str, *, vector_ok: bool = True, clusters: ClusterPolicy | None = None) -> LaunchPlan:
    """Kernel and launch shape for rows of ``sk`` keys of ``dtype`` ("float16", "float32", "float64").

    ``vector_ok`` says the scores and probabilities base pointers are 16-byte aligned; vector accesses also need
    ``sk`` to be a multiple of the vector width so that every row starts aligned. ``clusters`` (sm_90+ only) sends
    rows longer than its ``from_sk`` to the cluster kernel when one of its configurations holds them.
    """
    acc = "double" if dtype == "float64" else "float"
    cluster = 1
    fit = []
    if clusters is not None and sk > clusters.from_sk:
        fit = [cfg for cfg in clusters.configs if sk <= cfg[0] * cfg[1] * cfg[2]]
    if fit:
        kind, (cluster, nt, vpt) = "cluster", fit[0]
    elif sk <= WARP_MAX_SK:
        kind, nt, vpt = "warp", 32, _next_pow2(-(-sk // 32))
    else:
        for nt, vpt in _BLOCK_CONFIGS[acc]:
            if sk <= nt * vpt:
                kind = "block"
                break
        else:
            kind, (nt, vpt) = "stream", _STREAM_CONFIG[acc]
    vec = 1
    if vector_ok:
        vec = min(16 // _ITEMSIZE[dtype], vpt)
        while vec > 1 and sk % vec:
            vec //= 2
    return LaunchPlan(kind, nt, vpt, vec, cluster)


def all_kernel_names(families=None, dtypes=None, *, clusters: bool = False) -> list[str]:
    """Every kernel name :func:`plan_launch` can produce, plus the Sandwich profile kernel; with ``clusters``, also
    the cluster kernels of the default :data:`CLUSTER_POLICIES` (they compile for sm_90 and later only)."""
    families = list(FAMILY_STRUCTS) if families is None else list(families)
    dtypes = list(STORAGE_TYPES) if dtypes is None else list(dtypes)
    plans = set()
    for dtype in dtypes:
        acc = "double" if dtype == "float64" else "float"
        lengths = [32 * v for v in (1, 2, 4, 8, 16, 32)] + [nt * v for nt, v in _BLOCK_CONFIGS[acc]]
        lengths.append(lengths[-1] + 16)  # the stream kernel
        policies = [None, CLUSTER_POLICIES[acc]] if clusters else [None]
        if clusters:
            lengths += [c * nt * v for c, nt, v in CLUSTER_POLICIES[acc].configs]
        for sk in lengths:
            for odd in (0, 1, 2, 4):  # the vector widths a row length allows
                for vector_ok in (True, False):
                    for policy in policies:
                        n = sk - odd if sk > odd else sk
                        plans.add((dtype, plan_launch(n, dtype, vector_ok=vector_ok, clusters=policy)))
    names = sorted({p.kernel_name(f, d) for d, p in plans for f in families})
    return [*names, "rp::sandwich_profile_kernel"]
