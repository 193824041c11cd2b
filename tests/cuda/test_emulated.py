"""The fused kernels themselves, run on the CPU under an emulation of the CUDA execution model.

``biased_softmax.cu`` is compiled for the host with shims: every CUDA thread of a block is an OS thread,
``__syncthreads`` is a barrier of the block's threads, ``__shfl_xor_sync`` exchanges values through a per-warp
buffer between two barriers of the warp's 32 threads, ``__shared__`` is ``static`` (blocks run one after another).
Cluster kernels run the C blocks of a cluster at the same time (C x NT OS threads), each block with its own
barriers and its own copy of the shared struct; the cluster barrier is split-phase (arrive, then wait for the
phase to complete) and a distributed-shared-memory pointer is the same member in another block's copy.
A barrier that is not reached by all the threads it expects within a few seconds (a divergent ``__syncthreads`` or a
shuffle with a lane missing) is reported as a fault, and so is a shuffle mask other than 0xffffffff. The arguments
are prepared by the same code as the CuPy launch (``relpos_ref.cuda._prepare``) with NumPy arrays, and the outputs
are checked against the float64 reference with the error model of ``fused_cases.py``.

What this does not check: device code generation, the CUDA libm (glibc's is used here), memory coalescing, and
timing; for clusters, the hardware's memory ordering across the cluster barrier (the emulated barrier orders
everything) and reads of a block's shared memory after that block exited (the emulated copies outlive it; a
missing final wait is caught as an unpaired arrive). The GPU tests (test_fused_gpu.py) run the same cases on a
device.
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

import relpos_ref as rp
from relpos_ref.cuda._launch import _Backend, _prepare
from relpos_ref.cuda._source import CLUSTER_POLICIES, ClusterPolicy
from tests.cuda.feature_cases import (
    ATTENTION_CHECKED,
    FEATURE_CASES,
    FEATURE_CLUSTER_CASES,
    FeatureCase,
    build_feature,
    prepare_feature,
    reference_matches_attention,
)
from tests.support.fused_cases import Case, build, check, family_sweep, special_cases

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
#define __cluster_dims__(...)

struct emu_dim { unsigned x, y, z; };
thread_local emu_dim threadIdx, blockIdx;
emu_dim blockDim, gridDim;
static int g_cluster = 1;  // blocks per cluster of the current launch

// 1: a barrier timed out (divergence), 2: partial shuffle mask, 4: cluster arrive and wait unpaired,
// 5: distributed shared memory rank outside the cluster, 6: grid not a multiple of the cluster size
static std::atomic<int> g_fault{0};
static int g_timeout_ms = 10000;

// A barrier of n threads, split-phase: arrive() counts this thread into the current phase and returns it,
// wait_phase(g) blocks until phase g has completed (all n arrived). wait() is both: __syncthreads, a warp's
// shuffle step, and the cluster barrier's arrive + wait.
struct EmuBarrier {
    std::mutex m;
    std::condition_variable cv;
    int n = 0, count = 0;
    long gen = 0;
    void init(int n_) { n = n_; count = 0; gen = 0; }
    long arrive() {
        std::lock_guard<std::mutex> lk(m);
        const long g = gen;
        if (++count == n) { count = 0; ++gen; cv.notify_all(); }
        return g;
    }
    void wait_phase(long g) {
        if (g_fault) return;
        std::unique_lock<std::mutex> lk(m);
        const auto released = [&] { return gen != g || g_fault.load() != 0; };
        if (!cv.wait_for(lk, std::chrono::milliseconds(g_timeout_ms), released)) {
            g_fault = 1;
            cv.notify_all();
        }
    }
    void wait() {
        if (g_fault) return;
        wait_phase(arrive());
    }
};
// Per block of a cluster (index: rank in the cluster; 0 for kernels without clusters).
constexpr int EMU_MAX_CLUSTER = 8;
struct EmuBlock {
    EmuBarrier block;
    EmuBarrier warp[32];
    unsigned long long xchg[32][32];
};
static EmuBlock g_blocks[EMU_MAX_CLUSTER];
thread_local EmuBlock* t_blk = nullptr;
thread_local int t_rank = 0;

inline void __syncthreads() { t_blk->block.wait(); }

template <typename V>
V __shfl_xor_sync(unsigned mask, V v, int o) {
    if (mask != 0xffffffffu) g_fault = 2;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    unsigned long long bits = 0;
    memcpy(&bits, &v, sizeof(V));
    t_blk->xchg[w][lane] = bits;
    t_blk->warp[w].wait();
    const unsigned long long other = t_blk->xchg[w][lane ^ o];
    t_blk->warp[w].wait();
    V r;
    memcpy(&r, &other, sizeof(V));
    return r;
}

static EmuBarrier g_cbar;  // the cluster's threads
thread_local long t_phase = -1;  // phase of this thread's pending arrive, -1 if none
thread_local long t_shared_size = 0;  // sizeof the cluster kernel's shared struct (set by RP_CLUSTER_SHARED)

inline unsigned cluster_rank() { return (unsigned)t_rank; }
inline void cluster_arrive() {
    if (t_phase != -1) g_fault = 4;  // two arrives without a wait in between
    t_phase = g_cbar.arrive();
}
inline void cluster_wait() {
    if (t_phase == -1) { g_fault = 4; return; }  // a wait without an arrive
    g_cbar.wait_phase(t_phase);
    t_phase = -1;
}
template <typename S>
const S* cluster_peer(const S* local, unsigned rank) {
    if (rank >= (unsigned)g_cluster) { g_fault = 5; return local; }
    return reinterpret_cast<const S*>(reinterpret_cast<const char*>(local) + ((long)rank - t_rank) * t_shared_size);
}
// One copy of the shared struct per block of the cluster, in a static array (clusters run one after another).
#define RP_CLUSTER_SHARED(type, name)                                        \
    static type name##_emu[EMU_MAX_CLUSTER];                                \
    type& name = name##_emu[t_rank];                                         \
    t_shared_size = (long)sizeof(type)
inline float __int_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(unsigned long long i) { double d; memcpy(&d, &i, 8); return d; }
inline float rp_emu_h2f(unsigned short h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
inline unsigned short rp_emu_f2h(float x) { _Float16 f = (_Float16)x; unsigned short h; memcpy(&h, &f, 2); return h; }

#include "biased_softmax.cu"

template <typename T>
using KFn = void (*)(const T*, T*, typename rp::Traits<T>::acc*, const typename rp::Traits<T>::acc*, const int*,
                     const long long*, const int*, const int*, const unsigned char*, long long, long long, long long,
                     long long, int, int, int, int, int, int, int, typename rp::Traits<T>::acc,
                     typename rp::Traits<T>::acc, int, int, typename rp::Traits<T>::acc,
                     typename rp::Traits<T>::acc);

// Clusters (of `cluster` consecutive blocks) run one after another; the blocks of one cluster run concurrently.
// A thread that leaves the kernel with an arrive not yet waited for is a fault (4), as is a grid that is not a
// multiple of the cluster size (6).
template <typename F>
static int run_grid(int grid, int block, F body, int cluster = 1) {
    blockDim = {(unsigned)block, 1, 1};
    gridDim = {(unsigned)grid, 1, 1};
    g_fault = 0;
    g_cluster = cluster;
    if (cluster < 1 || cluster > EMU_MAX_CLUSTER || grid % cluster) return 6;
    for (int b0 = 0; b0 < grid; b0 += cluster) {
        for (int r = 0; r < cluster; ++r) {
            g_blocks[r].block.init(block);
            for (int w = 0; w < 32; ++w) g_blocks[r].warp[w].init(32);
        }
        g_cbar.init(cluster * block);
        std::vector<std::thread> th;
        th.reserve(cluster * block);
        for (int r = 0; r < cluster; ++r)
            for (int t = 0; t < block; ++t)
                th.emplace_back([=] {
                    threadIdx = {(unsigned)t, 0, 0};
                    blockIdx = {(unsigned)(b0 + r), 0, 0};
                    t_blk = &g_blocks[r];
                    t_rank = r;
                    t_phase = -1;
                    body();
                    if (t_phase != -1) g_fault = 4;
                });
        for (auto& x : th) x.join();
        if (g_fault) return g_fault;
    }
    return 0;
}

template <typename T>
static int launch(KFn<T> k, int grid, int block, int cluster, void** a) {
    typedef typename rp::Traits<T>::acc A;
    return run_grid(grid, block, [=] {
        k(*(const T**)a[0], *(T**)a[1], *(A**)a[2], *(const A**)a[3], *(const int**)a[4], *(const long long**)a[5],
          *(const int**)a[6], *(const int**)a[7], *(const unsigned char**)a[8], *(long long*)a[9],
          *(long long*)a[10], *(long long*)a[11], *(long long*)a[12], *(int*)a[13], *(int*)a[14], *(int*)a[15],
          *(int*)a[16], *(int*)a[17], *(int*)a[18], *(int*)a[19], *(A*)a[20], *(A*)a[21], *(int*)a[22],
          *(int*)a[23], *(A*)a[24], *(A*)a[25]);
    }, cluster);
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

# Cluster kernels (thread-block clusters, sm_90+ on a GPU). A small policy makes rows of a few hundred keys span 2,
# 4 and 8 blocks: pieces that lie past the end of the row, pieces with nothing attended (causal, top-left rows),
# vector and scalar accesses, every family and dtype, the special cases. The default policy runs at the lengths it
# serves (4 x 256 x 16, 8 x 256 x 16, 8 x 256 x 32; float64 8 x 256 x 16).
SMALL_CLUSTERS = ClusterPolicy(0, ((2, 32, 4), (4, 64, 4), (8, 32, 8)))
# Random sorted positions, causal: the three rows attend 182, 332 and 932 keys, i.e. 1, 2 and 4 of the 4 pieces.
MUTANT_CASE = Case("alibi", (1, 2, 3, 999), "float32", causal=True, positions="random", specials="spike", seed=31)
# The same rows with FIRE, a family whose bias is skipped on chunks with nothing attended (F::skip_masked).
SKIP_CASE = MUTANT_CASE.with_(family="fire", specials=None)
CLUSTER_CASES = [
    (c, SMALL_CLUSTERS)
    for c in family_sweep([(1, 2, 3, 200), (1, 2, 2, 999), (1, 1, 2, 2000)], ["float32", "float16", "float64"])
    + [c.with_(shape=(1, 2, 3, 300)) if c.shape == (2, 3, 5, 300) else c for c in special_cases(sk_small=300)]
]
CLUSTER_CASES += [(MUTANT_CASE, SMALL_CLUSTERS), (SKIP_CASE, SMALL_CLUSTERS)]
CLUSTER_CASES += [
    (c, CLUSTER_POLICIES["double" if c.dtype == "float64" else "float"])
    for c in (
        Case("alibi", (1, 1, 2, 16384), "float32", causal=True, align="top_left", seed=21),
        Case("fire", (1, 1, 1, 16387), "float32", causal=True, seed=22),  # scalar accesses
        Case("t5_causal", (1, 1, 1, 32768), "float16", causal=True, seed=23),
        Case("alibi", (1, 1, 1, 65536), "float32", specials="spike", seed=24),
        Case("none", (1, 1, 2, 20000), "float64", causal=True, align="top_left", seed=25),
    )
]


def _cluster_id(case: Case, policy: ClusterPolicy) -> str:
    return f"{'small' if policy is SMALL_CLUSTERS else 'default'}-{case.id}"


# Deliberately broken kernels (text edits of biased_softmax.cu), each exposed by MUTANT_CASE unless MUTANT_CASES
# names another case (test_emulated_mutants.py).
KERNEL_MUTANTS = {
    "no_rescale": ("m_exp(mb - m) / s;", "(A)1 / s;"),
    "same_piece": ("const int base = (int)rank * (NT * VPT);", "const int base = 0;"),
    "own_pair_only": ("cluster_peer(sh.part, (unsigned)lane)", "cluster_peer(sh.part, rank)"),
    "no_zero_fill": ("for (int e = 0; e < VPT; ++e) v[e] = (A)0;", ";"),
    "lse_of_piece": (
        "write_lse(lse, row, flags, empty, m, s);\n    cluster_wait();",
        "write_lse(lse, row, flags, empty, mb, sb);\n    cluster_wait();",
    ),
    "no_exit_wait": ("cluster_wait();  // no block exits", "// no block exits"),
    # row_logits: skip the bias of any chunk with a masked key, not only of chunks with nothing attended
    "skip_partly_masked": (
        "bool any = !F<A>::skip_masked;\n#pragma unroll\n        for (int e = 0; e < CH; ++e) any = any || ok[e];",
        "bool any = true;\n#pragma unroll\n        for (int e = 0; e < CH; ++e) any = any && ok[e];",
    ),
}
MUTANT_CASES = {"skip_partly_masked": SKIP_CASE}


def numpy_backend(profile, clusters: ClusterPolicy | None = None) -> _Backend:
    """The launch preparation on NumPy arrays; ``clusters`` is the policy it plans long rows with."""
    return _Backend(np, npx, lambda a: isinstance(a, np.ndarray), lambda a: a.ctypes.data, lambda: "emulated",
                    profile, lambda dtype: clusters)  # fmt: skip


class Emulator:
    def __init__(self, lib: ctypes.CDLL, names: list[str]) -> None:
        self.lib = lib
        self.index = {n: k for k, n in enumerate(names)}
        self.backend = numpy_backend(self.profile)

    def backend_with(self, clusters: ClusterPolicy | None) -> _Backend:
        return numpy_backend(self.profile, clusters)

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
        rc = self.lib.emu_launch(self.index[launch.name], launch.grid, launch.block, launch.cluster, argv)
        faults = {
            1: "a barrier or shuffle was not reached by every thread (divergence)",
            2: "partial shuffle mask",
            4: "cluster barrier arrive and wait do not pair up",
            5: "distributed shared memory rank outside the cluster",
            6: "grid not a multiple of the cluster size",
        }
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
def built_cluster_cases():
    return {_cluster_id(c, p): build(c) for c, p in CLUSTER_CASES}


def _probe(clusters: ClusterPolicy | None = None) -> _Backend:
    return numpy_backend(lambda half_d, count: np.zeros(count), clusters)


def compile_emulation(names: list[str], directory: Path, cuda_dir: Path = CUDA_DIR) -> Emulator:
    """Build the kernels ``names`` (name expressions) of the source in ``cuda_dir`` into one host library."""
    line = "        case {}: return launch(&{}, grid, block, cluster, args);"
    cases = "\n".join(line.format(k, n) for k, n in enumerate(names))
    src = SHIM + (
        '\nextern "C" int emu_launch(int idx, int grid, int block, int cluster, void** args) {\n'
        f"    switch (idx) {{\n{cases}\n    }}\n    return -1;\n}}\n"
    )
    (directory / "emulated.cpp").write_text(src)
    so = directory / "libemulated.so"
    proc = subprocess.run(
        [*CXX, "-I", str(cuda_dir), str(directory / "emulated.cpp"), "-o", str(so)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode:
        pytest.fail(f"building the kernel emulation failed:\n{proc.stderr[-6000:]}")
    lib = ctypes.CDLL(str(so))
    lib.emu_launch.argtypes = [ctypes.c_int] * 4 + [ctypes.POINTER(ctypes.c_void_p)]
    lib.emu_launch.restype = ctypes.c_int
    lib.emu_sandwich_profile.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.emu_sandwich_profile.restype = ctypes.c_int
    return Emulator(lib, names)


@pytest.fixture(scope="module")
def built_feature_cases():
    return {fc.id: build_feature(fc) for fc in FEATURE_CASES + FEATURE_CLUSTER_CASES}


@pytest.fixture(scope="module")
def emulator(built_cases, built_cluster_cases, built_feature_cases, tmp_path_factory):
    """Compile the kernels the cases need (names from the real launch preparation) into one host library."""
    names = {prepare(b, _probe()).name for b in built_cases.values()}
    names |= {prepare(built_cluster_cases[_cluster_id(c, p)], _probe(p)).name for c, p in CLUSTER_CASES}
    names |= {prepare_feature(fc, built_feature_cases[fc.id], _probe()).name for fc in FEATURE_CASES}
    names |= {
        prepare_feature(fc, built_feature_cases[fc.id], _probe(SMALL_CLUSTERS)).name for fc in FEATURE_CLUSTER_CASES
    }
    return compile_emulation(sorted(names), tmp_path_factory.mktemp("cuda_emulated"))


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


@pytest.mark.parametrize(("case", "policy"), CLUSTER_CASES, ids=[_cluster_id(c, p) for c, p in CLUSTER_CASES])
def test_emulated_cluster_kernel_matches_reference(case, policy, built_cluster_cases, emulator):
    built = built_cluster_cases[_cluster_id(case, policy)]
    launch = prepare(built, emulator.backend_with(policy))
    assert launch.name.startswith("rp::softmax_cluster<"), launch.name
    assert launch.cluster > 1
    assert launch.grid % launch.cluster == 0
    emulator.run(built, launch)
    check(built, launch.probs, launch.lse.reshape(launch.lse_shape) if case.return_lse else None)


# ---- window and softcap (feature_cases.py) --------------------------------------------------------------------------


@pytest.mark.parametrize("fc", FEATURE_CASES, ids=[fc.id for fc in FEATURE_CASES])
def test_emulated_window_softcap_match_reference(fc, built_feature_cases, emulator):
    """The kernel with a window and/or a softcap against the float64 reference with the same features, within the
    error model (the softcap's term from relpos_ref.cuda.bounds.softcap_error_bound)."""
    built = built_feature_cases[fc.id]
    launch = prepare_feature(fc, built, emulator.backend)
    emulator.run(built, launch)
    check(built, launch.probs, launch.lse.reshape(launch.lse_shape) if fc.case.return_lse else None)


@pytest.mark.parametrize("fc", FEATURE_CLUSTER_CASES, ids=[fc.id for fc in FEATURE_CLUSTER_CASES])
def test_emulated_cluster_window_softcap_match_reference(fc, built_feature_cases, emulator):
    built = built_feature_cases[fc.id]
    launch = prepare_feature(fc, built, emulator.backend_with(SMALL_CLUSTERS))
    assert launch.name.startswith("rp::softmax_cluster<"), launch.name
    emulator.run(built, launch)
    check(built, launch.probs, launch.lse.reshape(launch.lse_shape))


@pytest.mark.parametrize("fc", ATTENTION_CHECKED, ids=[fc.id for fc in ATTENTION_CHECKED])
def test_feature_reference_is_rp_attention(fc, built_feature_cases):
    """The reference of the feature cases (capped scores and window mask through rp.biased_softmax) is rp.attention
    with the same window and softcap, to float64 rounding."""
    assert reference_matches_attention(fc, built_feature_cases[fc.id]) < 1e-12


def test_feature_reference_check_rejects_a_wrong_reference():
    """The cross-check can fail: the reference built with the window one key narrower on the left differs from
    rp.attention."""
    fc = ATTENTION_CHECKED[0]
    assert fc.window is not None
    assert fc.window[0] is not None
    narrower = FeatureCase(fc.case, window=(fc.window[0] - 1, fc.window[1]), softcap=fc.softcap)
    assert reference_matches_attention(fc, build_feature(narrower)) > 1e-3


def test_features_off_leave_the_launch_unchanged():
    """window=None / (None, None) and softcap=None launch the same kernel with the same flags as before the
    features existed (flags and the other arguments are equal; the feature arguments are the inert defaults)."""
    built = build(Case("alibi", (1, 2, 3, 50), "float32", causal=True))
    base = prepare(built, _probe())
    for window in (None, (None, None)):
        fc = FeatureCase(built.case, window=window)
        launch = prepare_feature(fc, built, _probe())
        assert launch.name == base.name
        flags = launch.args[19]
        assert int(flags) == int(base.args[19])
        assert not int(flags) & (32 | 64)
        assert [int(a) for a in launch.args[22:24]] == [2**31 - 1, 2**31 - 1]
        assert [float(a) for a in launch.args[24:26]] == [0.0, 0.0]
    on = prepare_feature(FeatureCase(built.case, window=(3, None), softcap=2.0), built, _probe())
    assert int(on.args[19]) == int(base.args[19]) | 32 | 64
    assert [int(a) for a in on.args[22:24]] == [3, 2**31 - 1]
    assert float(on.args[24]) == 2.0
    assert float(on.args[25]) == 0.5
