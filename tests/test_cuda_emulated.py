"""The fused kernels themselves, run on the CPU under an emulation of the CUDA execution model.

``biased_softmax.cu`` is compiled for the host with shims: every CUDA thread of a block is an OS thread,
``__syncthreads`` is a barrier of the block's threads, ``__shfl_xor_sync`` exchanges values through a per-warp
buffer between two barriers of the warp's 32 threads, ``__shared__`` is ``static`` (blocks run one after another).
A barrier that is not reached by all the threads it expects within a few seconds (a divergent ``__syncthreads`` or a
shuffle with a lane missing) is reported as a fault, and so is a shuffle mask other than 0xffffffff. The arguments
are prepared by the same code as the CuPy launch (``relpos_ref.cuda._prepare``) with NumPy arrays, and the outputs
are checked against the float64 reference with the error model of ``fused_cases.py``.

What this does not check: device code generation, the CUDA libm (glibc's is used here), memory coalescing, and
timing. The GPU tests (test_fused_gpu.py) run the same cases on a device.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import array_api_compat.numpy as npx
import numpy as np
import pytest
from fused_cases import Case, build, check, family_sweep, special_cases

import relpos_ref as rp
from relpos_ref.cuda import _Backend, _prepare

CUDA_DIR = Path(rp.__file__).parent / "cuda"

SHIM = r"""
#include <math.h>
#include <string.h>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#define RP_HOST_EMULATION 1
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct emu_dim { unsigned x, y, z; };
thread_local emu_dim threadIdx, blockIdx;
emu_dim blockDim, gridDim;

static std::atomic<int> g_fault{0};  // 1: a barrier timed out (divergence), 2: partial shuffle mask
static int g_timeout_ms = 10000;

struct EmuBarrier {
    std::mutex m;
    std::condition_variable cv;
    int n = 0, count = 0;
    long gen = 0;
    void init(int n_) { n = n_; count = 0; gen = 0; }
    void wait() {
        if (g_fault) return;
        std::unique_lock<std::mutex> lk(m);
        const long g = gen;
        if (++count == n) { count = 0; ++gen; cv.notify_all(); return; }
        const auto released = [&] { return gen != g || g_fault.load() != 0; };
        if (!cv.wait_for(lk, std::chrono::milliseconds(g_timeout_ms), released)) {
            g_fault = 1;
            cv.notify_all();
        }
    }
};
static EmuBarrier g_block;
static EmuBarrier g_warp[32];
static unsigned long long g_xchg[32][32];

inline void __syncthreads() { g_block.wait(); }

template <typename V>
V __shfl_xor_sync(unsigned mask, V v, int o) {
    if (mask != 0xffffffffu) g_fault = 2;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    unsigned long long bits = 0;
    memcpy(&bits, &v, sizeof(V));
    g_xchg[w][lane] = bits;
    g_warp[w].wait();
    const unsigned long long other = g_xchg[w][lane ^ o];
    g_warp[w].wait();
    V r;
    memcpy(&r, &other, sizeof(V));
    return r;
}
inline float __int_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(unsigned long long i) { double d; memcpy(&d, &i, 8); return d; }
inline float rp_emu_h2f(unsigned short h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
inline unsigned short rp_emu_f2h(float x) { _Float16 f = (_Float16)x; unsigned short h; memcpy(&h, &f, 2); return h; }

#include "biased_softmax.cu"

template <typename T>
using KFn = void (*)(const T*, T*, typename rp::Traits<T>::acc*, const typename rp::Traits<T>::acc*, const int*,
                     const long long*, const int*, const int*, const unsigned char*, long long, long long, long long,
                     long long, int, int, int, int, int, int, int, typename rp::Traits<T>::acc,
                     typename rp::Traits<T>::acc);

template <typename F>
static int run_grid(int grid, int block, F body) {
    blockDim = {(unsigned)block, 1, 1};
    gridDim = {(unsigned)grid, 1, 1};
    g_fault = 0;
    for (int b = 0; b < grid; ++b) {
        g_block.init(block);
        for (int w = 0; w < 32; ++w) g_warp[w].init(32);
        std::vector<std::thread> th;
        th.reserve(block);
        for (int t = 0; t < block; ++t)
            th.emplace_back([=] {
                threadIdx = {(unsigned)t, 0, 0};
                blockIdx = {(unsigned)b, 0, 0};
                body();
            });
        for (auto& x : th) x.join();
        if (g_fault) return g_fault;
    }
    return 0;
}

template <typename T>
static int launch(KFn<T> k, int grid, int block, void** a) {
    typedef typename rp::Traits<T>::acc A;
    return run_grid(grid, block, [=] {
        k(*(const T**)a[0], *(T**)a[1], *(A**)a[2], *(const A**)a[3], *(const int**)a[4], *(const long long**)a[5],
          *(const int**)a[6], *(const int**)a[7], *(const unsigned char**)a[8], *(long long*)a[9],
          *(long long*)a[10], *(long long*)a[11], *(long long*)a[12], *(int*)a[13], *(int*)a[14], *(int*)a[15],
          *(int*)a[16], *(int*)a[17], *(int*)a[18], *(int*)a[19], *(A*)a[20], *(A*)a[21]);
    });
}

// Self-test of the emulator: half of a warp skips a shuffle (a bug the real kernels must not have).
extern "C" int emu_selftest_divergent_shuffle(int timeout_ms) {
    g_timeout_ms = timeout_ms;
    const int rc = run_grid(1, 32, [] {
        float v = (float)threadIdx.x;
        if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    });
    g_timeout_ms = 10000;
    return rc;
}

extern "C" int emu_selftest_partial_mask() {
    return run_grid(1, 32, [] { (void)__shfl_xor_sync(0x0000ffffu, 1.0f, 1); });
}

extern "C" int emu_sandwich_profile(double* out, int count, int half_d) {
    const int block = 64, grid = (count + block - 1) / block;
    return run_grid(grid, block, [=] { rp::sandwich_profile_kernel(out, count, half_d); });
}
"""


def _compiler() -> list[str] | None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        return None
    return [cxx, "-O1", "-std=c++20", "-pthread", "-shared", "-fPIC", "-x", "c++", "-w"]


CXX = _compiler()
pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++ or clang++ or $CXX) for the emulation")

# Small enough for one OS thread per CUDA thread; they still cover every kernel kind and vector width:
# warp kernels (Sk <= 1024), block kernels (256 x 8 and 1024 x 32), the stream kernel (two passes, > 32768 keys).
SWEEP = family_sweep([(2, 3, 5, 37), (1, 2, 3, 128)], ["float32", "float16"])
SPECIALS = special_cases()
LONG = [
    Case(fam, (1, 2, 2, sk), dtype, causal=True, seed=sk)
    for fam in ("alibi", "t5_causal", "fire")
    for dtype in ("float32", "float16")
    for sk in (1000, 1500)
]
LONG += [
    Case("alibi", (1, 1, 1, 32768), "float32", causal=False, seed=3),
    Case("sandwich", (1, 1, 2, 32768 - 2), "float16", causal=True, seed=4),  # 1024 x 32, vector width 2
    Case("alibi", (1, 1, 2, 33000), "float32", causal=True, seed=5),  # stream kernel
    Case("alibi", (1, 2, 4, 33000), "float32", specials="spike", seed=9),  # stream kernel
    Case("alibi", (1, 2, 4, 32768), "float16", specials="spike", seed=10),  # 1024 x 32 block
    Case("kerple_power", (1, 1, 1, 33001), "float16", causal=False, mask="keys", seed=6),  # stream, scalar
    Case("offset", (1, 2, 2, 17000), "float64", causal=True, seed=7),  # float64 512 x 32 block
    Case("none", (1, 1, 2, 20000), "float64", causal=True, specials="neginf", seed=8),  # float64 stream
]
_DOUBLE_FAMILIES = ["alibi", "kerple_power", "kerple_log", "t5_bidirectional", "offset", "sandwich", "fire"]
_DOUBLE_FAMILIES.append("tensor_family")
DOUBLES = [Case(fam, (1, 2, 3, 45), "float64", causal=True, seed=40 + k) for k, fam in enumerate(_DOUBLE_FAMILIES)]
CASES = SWEEP + SPECIALS + LONG + DOUBLES


class Emulator:
    def __init__(self, lib: ctypes.CDLL, names: list[str]) -> None:
        self.lib = lib
        self.index = {n: k for k, n in enumerate(names)}
        self.backend = _Backend(
            np,
            npx,
            lambda a: isinstance(a, np.ndarray),
            lambda a: a.ctypes.data,
            lambda: "emulated",
            self.profile,
        )

    def profile(self, half_d: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.float64)
        rc = self.lib.emu_sandwich_profile(out.ctypes.data_as(ctypes.c_void_p), count, half_d)
        assert rc == 0, f"emulated sandwich_profile_kernel fault {rc}"
        return out

    def run(self, built, launch):
        keep = []
        for a in launch.args:
            if isinstance(a, np.ndarray):
                keep.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, np.int32):
                keep.append(ctypes.c_int(int(a)))
            elif isinstance(a, np.int64):
                keep.append(ctypes.c_longlong(int(a)))
            elif isinstance(a, np.float32):
                keep.append(ctypes.c_float(float(a)))
            elif isinstance(a, np.float64):
                keep.append(ctypes.c_double(float(a)))
            else:  # pragma: no cover
                raise TypeError(type(a))
        argv = (ctypes.c_void_p * len(keep))(*[ctypes.cast(ctypes.pointer(o), ctypes.c_void_p) for o in keep])
        rc = self.lib.emu_launch(self.index[launch.name], launch.grid, launch.block, argv)
        faults = {1: "a barrier or shuffle was not reached by every thread (divergence)", 2: "partial shuffle mask"}
        assert rc == 0, f"{launch.name}: {faults.get(rc, rc)}"


def prepare(built, backend):
    case = built.case
    scores = built.scores
    if case.noncontiguous:
        scores = np.ascontiguousarray(np.swapaxes(scores, -1, -2)).swapaxes(-1, -2)
        assert not scores.flags.c_contiguous
    return _prepare(
        backend,
        scores,
        built.bias,
        q_pos=built.q_pos,
        k_pos=built.k_pos,
        align=case.align,
        causal=case.causal,
        mask=built.mask,
        scale=case.scale,
        placement=case.placement,
        fully_masked=case.fully_masked,
        return_lse=case.return_lse,
    )


@pytest.fixture(scope="module")
def built_cases():
    return {c.id: build(c) for c in CASES}


@pytest.fixture(scope="module")
def emulator(built_cases, tmp_path_factory):
    """Compile the kernels the cases need (names from the real launch preparation) into one host library."""
    probe = _Backend(np, npx, lambda a: isinstance(a, np.ndarray), lambda a: a.ctypes.data, lambda: "probe",
                     lambda half_d, count: np.zeros(count))  # fmt: skip
    names = sorted({prepare(b, probe).name for b in built_cases.values()})
    tmp = tmp_path_factory.mktemp("cuda_emulated")
    cases = "\n".join(f"        case {k}: return launch(&{n}, grid, block, args);" for k, n in enumerate(names))
    src = SHIM + (
        '\nextern "C" int emu_launch(int idx, int grid, int block, void** args) {\n'
        f"    switch (idx) {{\n{cases}\n    }}\n    return -1;\n}}\n"
    )
    (tmp / "emulated.cpp").write_text(src)
    so = tmp / "libemulated.so"
    proc = subprocess.run(
        [*CXX, "-I", str(CUDA_DIR), str(tmp / "emulated.cpp"), "-o", str(so)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode:
        pytest.fail(f"building the kernel emulation failed:\n{proc.stderr[-6000:]}")
    lib = ctypes.CDLL(str(so))
    lib.emu_launch.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
    lib.emu_launch.restype = ctypes.c_int
    lib.emu_sandwich_profile.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.emu_sandwich_profile.restype = ctypes.c_int
    return Emulator(lib, names)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_emulated_kernel_matches_reference(case, built_cases, emulator):
    built = built_cases[case.id]
    launch = prepare(built, emulator.backend)
    emulator.run(built, launch)
    probs, lse = launch.probs, (launch.lse.reshape(launch.lse_shape) if case.return_lse else None)
    check(built, probs, lse)


def test_emulator_detects_divergent_shuffles(emulator):
    """The emulator can fail: a shuffle that half a warp skips, and a partial mask, are reported as faults."""
    emulator.lib.emu_selftest_divergent_shuffle.argtypes = [ctypes.c_int]
    assert emulator.lib.emu_selftest_divergent_shuffle(300) == 1
    assert emulator.lib.emu_selftest_partial_mask() == 2


def test_emulated_check_catches_a_wrong_launch(emulator):
    """The comparison can fail: a block kernel launched with half its threads leaves half of every row unwritten."""
    built = build(Case("alibi", (1, 1, 2, 1500), "float32"))
    launch = prepare(built, emulator.backend)
    assert "softmax_block" in launch.name
    launch.block = launch.block // 2
    launch.probs[...] = -1.0
    emulator.run(built, launch)
    with pytest.raises(AssertionError):
        check(built, launch.probs, launch.lse.reshape(launch.lse_shape))
