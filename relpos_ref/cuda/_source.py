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
    "FAMILY_STRUCTS",
    "STORAGE_TYPES",
    "LaunchPlan",
    "all_kernel_names",
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

    kind: str  # "warp", "block" or "stream"
    threads_per_row: int
    vpt: int  # values per thread (per tile for "stream")
    vec: int  # elements per vector load/store

    @property
    def block(self) -> int:
        return 128 if self.kind == "warp" else self.threads_per_row

    def grid(self, nrows: int) -> int:
        return (nrows + 3) // 4 if self.kind == "warp" else nrows

    def kernel_name(self, family: str, dtype: str) -> str:
        fam, typ = FAMILY_STRUCTS[family], STORAGE_TYPES[dtype]
        if self.kind == "warp":
            return f"rp::softmax_warp<{fam}, {typ}, {self.vpt}, {self.vec}>"
        return f"rp::softmax_{self.kind}<{fam}, {typ}, {self.threads_per_row}, {self.vpt}, {self.vec}>"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan_launch(sk: int, dtype: str, *, vector_ok: bool = True) -> LaunchPlan:
    """Kernel and launch shape for rows of ``sk`` keys of ``dtype`` ("float16", "float32", "float64").

    ``vector_ok`` says the scores and probabilities base pointers are 16-byte aligned; vector accesses also need
    ``sk`` to be a multiple of the vector width so that every row starts aligned.
    """
    acc = "double" if dtype == "float64" else "float"
    if sk <= WARP_MAX_SK:
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
    return LaunchPlan(kind, nt, vpt, vec)


def all_kernel_names(families=None, dtypes=None) -> list[str]:
    """Every kernel name :func:`plan_launch` can produce, plus the Sandwich profile kernel."""
    families = list(FAMILY_STRUCTS) if families is None else list(families)
    dtypes = list(STORAGE_TYPES) if dtypes is None else list(dtypes)
    plans = set()
    for dtype in dtypes:
        acc = "double" if dtype == "float64" else "float"
        lengths = [32 * v for v in (1, 2, 4, 8, 16, 32)] + [nt * v for nt, v in _BLOCK_CONFIGS[acc]]
        lengths.append(lengths[-1] + 16)  # the stream kernel
        for sk in lengths:
            for odd in (0, 1, 2, 4):  # the vector widths a row length allows
                for vector_ok in (True, False):
                    plans.add((dtype, plan_launch(sk - odd if sk > odd else sk, dtype, vector_ok=vector_ok)))
    names = sorted({p.kernel_name(f, d) for d, p in plans for f in families})
    return [*names, "rp::sandwich_profile_kernel"]
