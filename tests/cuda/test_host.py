"""The bias device functions of ``relpos_ref/cuda/bias.cuh``, compiled for the host and checked on CPU.

``bias.cuh`` is include-free and its functions are ``__host__ __device__``; a small C++ driver defines the CUDA
qualifiers as shims, includes ``<math.h>`` and the header, and exports C entry points that run a family struct's
``setup`` + ``eval<N>`` exactly as the kernels do (same parameter buffers, packed by relpos_ref.cuda). The driver is
built into pytest's tmp_path with the system C++ compiler (and, when present, with nvcc as a second front end) and
loaded with ctypes. Checked against the NumPy float64 reference (the families' ``.bias``):

* T5 buckets exactly, for every |Delta| <= 10**6 and several (bidirectional, B, D);
* every float family within the documented bound of relpos_ref.cuda.bounds, in float32 and float64, on
  Hypothesis-drawn parameters and positions (offsets up to 10**6).

Only the parallel reduction of the kernels (warp shuffles, shared memory) is left to the GPU tests.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relpos_ref as rp
from relpos_ref.cuda import supported_family
from relpos_ref.cuda._launch import _WINDOW_UNBOUNDED, _pack_family
from relpos_ref.cuda.bounds import bias_error_bound, kernel_roundoff, softcap_error_bound

CUDA_DIR = Path(rp.__file__).parent / "cuda"

DRIVER = r"""
#ifndef __CUDACC__
#define __host__
#define __device__
#define __forceinline__ inline
#endif
#include <math.h>
#include "bias.cuh"

namespace {
// Run setup + eval<8> (and eval<1> for the remainder) over rows, as the kernels do per thread.
template <template <typename> class F, typename A>
void run(const A* fp, const int* ip, const long long* lp, int H, int nrows, const int* rb, const int* rh,
         const int* ri, const int* rq, int ncols, const int* cols, const int* delta, A* out) {
    for (int r = 0; r < nrows; ++r) {
        F<A> fam;
        fam.setup(fp, ip, lp, rb[r], rh[r], H, ri[r], rq[r]);
        const long long o = (long long)r * ncols;
        int c = 0;
        for (; c + 8 <= ncols; c += 8) fam.template eval<8>(cols + o + c, delta + o + c, out + o + c);
        for (; c < ncols; ++c) fam.template eval<1>(cols + o + c, delta + o + c, out + o + c);
    }
}

template <typename A>
int dispatch(int fam, const A* fp, const int* ip, const long long* lp, int H, int nrows, const int* rb,
             const int* rh, const int* ri, const int* rq, int ncols, const int* cols, const int* delta, A* out) {
    switch (fam) {
        case 0: run<rp::FamNone, A>(fp, ip, lp, H, nrows, rb, rh, ri, rq, ncols, cols, delta, out); return 0;
        case 1: run<rp::FamTensor, A>(fp, ip, lp, H, nrows, rb, rh, ri, rq, ncols, cols, delta, out); return 0;
        case 2: run<rp::FamAlibi, A>(fp, ip, lp, H, nrows, rb, rh, ri, rq, ncols, cols, delta, out); return 0;
        case 3: run<rp::FamKerplePower, A>(fp, ip, lp, H, nrows, rb, rh, ri, rq, ncols, cols, delta, out); return 0;
        case 4: run<rp::FamKerpleLog, A>(fp, ip, lp, H, nrows, rb, rh, ri, rq, ncols, cols, delta, out); return 0;
        case 5: run<rp::FamT5, A>(fp, ip, lp, H, nrows, rb, rh, ri, rq, ncols, cols, delta, out); return 0;
        case 6: run<rp::FamOffset, A>(fp, ip, lp, H, nrows, rb, rh, ri, rq, ncols, cols, delta, out); return 0;
        case 7: run<rp::FamSandwich, A>(fp, ip, lp, H, nrows, rb, rh, ri, rq, ncols, cols, delta, out); return 0;
        case 8: run<rp::FamFire, A>(fp, ip, lp, H, nrows, rb, rh, ri, rq, ncols, cols, delta, out); return 0;
    }
    return 1;
}
}  // namespace

#define ARGS(A) int fam, const A* fp, const int* ip, const long long* lp, int H, int nrows, const int* rb, \
    const int* rh, const int* ri, const int* rq, int ncols, const int* cols, const int* delta, A* out
#define PASS fam, fp, ip, lp, H, nrows, rb, rh, ri, rq, ncols, cols, delta, out
extern "C" int rp_bias_f32(ARGS(float)) { return dispatch<float>(PASS); }
extern "C" int rp_bias_f64(ARGS(double)) { return dispatch<double>(PASS); }

extern "C" void rp_t5_buckets(const int* delta, long long n, int bidirectional, const int* thr, int nthr, int* out) {
    for (long long k = 0; k < n; ++k) out[k] = rp::t5_bucket(delta[k], bidirectional, thr, nthr);
}

extern "C" void rp_in_window(const int* delta, long long n, int left, int right, unsigned char* out) {
    for (long long k = 0; k < n; ++k) out[k] = rp::in_window(delta[k], left, right) ? 1 : 0;
}

extern "C" void rp_softcap_f32(const float* s, long long n, float alpha, float cap, float inv_cap, const float* bt,
                               float* out) {
    for (long long k = 0; k < n; ++k) out[k] = rp::softcap_logit<float>(s[k], alpha, cap, inv_cap, bt[k]);
}

extern "C" void rp_softcap_f64(const double* s, long long n, double alpha, double cap, double inv_cap,
                               const double* bt, double* out) {
    for (long long k = 0; k < n; ++k) out[k] = rp::softcap_logit<double>(s[k], alpha, cap, inv_cap, bt[k]);
}

extern "C" void rp_sandwich_profile_at(const int* n, int count, int half_d, double* out) {
    for (int k = 0; k < count; ++k) out[k] = rp::sandwich_profile<double>(n[k], half_d);
}
"""

FAMILY_IDS = {
    "none": 0,
    "tensor": 1,
    "alibi": 2,
    "kerple_power": 3,
    "kerple_log": 4,
    "t5": 5,
    "offset": 6,
    "sandwich": 7,
    "fire": 8,
}


def _compilers() -> list[tuple[str, list[str]]]:
    out = []
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx:
        out.append(("cxx", [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-x", "c++"]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        out.append(("nvcc", [nvcc, "-O2", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-x", "cu"]))
    return out


COMPILERS = _compilers()


@pytest.fixture(
    scope="module",
    params=[pytest.param(c[0], marks=[pytest.mark.nvcc] if c[0] == "nvcc" else []) for c in COMPILERS] or ["none"],
)
def lib(request, tmp_path_factory):
    """The driver built with one host compiler into a temporary directory, loaded with ctypes."""
    if request.param == "none":
        pytest.skip("no host C++ compiler found (g++, c++, clang++ or $CXX) to build the bias.cuh host check")
    cmd = dict(COMPILERS)[request.param]
    tmp = tmp_path_factory.mktemp(f"cuda_host_{request.param}")
    src = tmp / "driver.cpp"
    src.write_text(DRIVER)
    so = tmp / "libbias_host.so"
    proc = subprocess.run(
        [*cmd, "-I", str(CUDA_DIR), str(src), "-o", str(so)], capture_output=True, text=True, timeout=300
    )
    if proc.returncode:
        pytest.fail(f"{request.param} failed to build the bias.cuh host driver:\n{proc.stdout}\n{proc.stderr}")
    lib = ctypes.CDLL(str(so))
    ip = ctypes.POINTER(ctypes.c_int)
    for fn, real in ((lib.rp_bias_f32, ctypes.c_float), (lib.rp_bias_f64, ctypes.c_double)):
        rp_ = ctypes.POINTER(real)
        lp = ctypes.POINTER(ctypes.c_longlong)
        fn.argtypes = [ctypes.c_int, rp_, ip, lp, ctypes.c_int, ctypes.c_int, ip, ip, ip, ip, ctypes.c_int, ip, ip, rp_]
        fn.restype = ctypes.c_int
    lib.rp_t5_buckets.argtypes = [ip, ctypes.c_longlong, ctypes.c_int, ip, ctypes.c_int, ip]
    lib.rp_sandwich_profile_at.argtypes = [ip, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_double)]
    lib.rp_in_window.argtypes = [ip, ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    for fn, real in ((lib.rp_softcap_f32, ctypes.c_float), (lib.rp_softcap_f64, ctypes.c_double)):
        fn.argtypes = [ctypes.POINTER(real), ctypes.c_longlong, real, real, real, ctypes.POINTER(real),
                       ctypes.POINTER(real)]  # fmt: skip
    return lib


def _ptr(a: np.ndarray, ctype):
    return a.ctypes.data_as(ctypes.POINTER(ctype))


def host_bias(lib, fam, q_pos: np.ndarray, k_pos: np.ndarray, precision: str) -> np.ndarray:
    """(H, Sq, Sk) bias from the host-compiled bias.cuh, with the kernels' parameter buffers."""
    name = supported_family(fam)
    acc = np.dtype(np.float32 if precision == "float32" else np.float64)
    real = ctypes.c_float if precision == "float32" else ctypes.c_double
    heads, sq, sk = fam.num_heads, q_pos.size, k_pos.size
    lp = np.zeros(4, dtype=np.int64)
    if name == "tensor":
        arr = np.asarray(fam.parameters()["array"], dtype=acc)
        fp, ip = np.ascontiguousarray(arr).reshape(-1), np.zeros(1, np.int32)
        lp[:] = [0, sq * sk, sk, 1]
    else:
        fp, ip = _pack_family(name, fam, acc)
        if name == "sandwich":
            # The dense profile table of the GPU path (float64, rounded once to acc), filled only at the offsets
            # used here; the other entries are NaN, so a wrong index would show up as a NaN bias.
            dist = np.abs(q_pos[:, None] - k_pos[None, :])
            needed = np.unique(dist).astype(np.int32)
            vals = np.empty(needed.size, dtype=np.float64)
            half_d = fam.options()["head_dim"] // 2
            lib.rp_sandwich_profile_at(_ptr(needed, ctypes.c_int), needed.size, half_d, _ptr(vals, ctypes.c_double))
            prof = np.full(int(dist.max()) + 1, np.nan, dtype=np.float64)
            prof[needed] = vals
            fp = np.concatenate([fp, prof.astype(acc)])
            ip = np.array([prof.size - 1], dtype=np.int32)
    fp, ip = np.ascontiguousarray(fp, dtype=acc), np.ascontiguousarray(ip, dtype=np.int32)
    rows_h = np.repeat(np.arange(heads, dtype=np.int32), sq)
    rows_i = np.tile(np.arange(sq, dtype=np.int32), heads)
    rows_q = np.ascontiguousarray(q_pos[rows_i].astype(np.int32))
    rows_b = np.zeros(heads * sq, dtype=np.int32)
    cols = np.ascontiguousarray(np.broadcast_to(np.arange(sk, dtype=np.int32), (heads * sq, sk)))
    delta = np.ascontiguousarray((rows_q[:, None].astype(np.int64) - k_pos[None, :]).astype(np.int32))
    out = np.full((heads * sq, sk), np.nan, dtype=acc)
    fn = lib.rp_bias_f32 if precision == "float32" else lib.rp_bias_f64
    i32 = ctypes.c_int
    rc = fn(
        FAMILY_IDS[name], _ptr(fp, real), _ptr(ip, i32), _ptr(lp, ctypes.c_longlong), heads, heads * sq,
        _ptr(rows_b, i32), _ptr(rows_h, i32), _ptr(rows_i, i32), _ptr(rows_q, i32), sk, _ptr(cols, i32),
        _ptr(delta, i32), _ptr(out, real),
    )  # fmt: skip
    assert rc == 0
    return out.reshape(heads, sq, sk).astype(np.float64)


def check_family(lib, fam, q_pos, k_pos, precision):
    """Max of |host - reference| / bound over all entries; asserts it is <= 1."""
    ref = np.asarray(fam.astype(np.float64).bias(q_pos, k_pos), dtype=np.float64)
    got = host_bias(lib, fam, q_pos, k_pos, precision)
    bound = bias_error_bound(fam, q_pos, k_pos, precision)
    assert got.shape == ref.shape
    assert np.all(np.isfinite(got))
    err = np.abs(got - ref)
    ratio = float((err / bound).max())
    worst = np.unravel_index(int(np.argmax(err / bound)), err.shape)
    assert ratio <= 1.0, (
        f"{type(fam).__name__} {precision}: error {err[worst]:.3e} exceeds bound {bound[worst]:.3e} at (h, i, j) = "
        f"{worst}, q = {q_pos[worst[1]]}, k = {k_pos[worst[2]]}, ref = {ref[worst]!r}, got = {got[worst]!r}"
    )
    return ratio, float(err.max())


# ---- T5 buckets: exact for every offset up to 10**6 ---------------------------------------------------------------

T5_CONFIGS = [
    (True, 32, 128),
    (False, 32, 128),
    (True, 64, 256),
    (False, 64, 256),
    (True, 16, 128),
    (False, 16, 20),
    (True, 32, 1000),
    (False, 128, 100000),
    (True, 256, 10**6),
    (True, 4, 3),
]


@pytest.mark.parametrize(("bidirectional", "num_buckets", "max_distance"), T5_CONFIGS)
def test_t5_bucket_exact_every_offset_up_to_1e6(lib, bidirectional, num_buckets, max_distance):
    delta = np.arange(-(10**6), 10**6 + 1, dtype=np.int32)
    thr = np.asarray(
        rp.t5_bucket_thresholds(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance),
        dtype=np.int32,
    )
    got = np.empty_like(delta)
    i32 = ctypes.c_int
    lib.rp_t5_buckets(_ptr(delta, i32), delta.size, int(bidirectional), _ptr(thr, i32), thr.size, _ptr(got, i32))
    want = rp.t5_bucket(
        delta.astype(np.int64), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"first mismatch at delta={delta[bad[0]]}: kernel {got[bad[0]]}, reference {want[bad[0]]}"


def test_t5_bucket_known_values(lib):
    """Independent of relpos_ref: the worked examples of HF's float32 code (bidirectional defaults, r = j - i)."""
    # (r = j - i) -> bucket, from the research notes' table for B = 32, D = 128 (HF T5 _relative_position_bucket).
    table = {-200: 15, -128: 15, -64: 14, -63: 13, -32: 12, -31: 11, -16: 10, -15: 9, -8: 8, -7: 7, -1: 1, 0: 0,
             1: 17, 8: 24, 16: 26, 32: 28, 63: 29, 64: 30, 127: 31, 128: 31}  # fmt: skip
    thr = np.asarray(rp.t5_bucket_thresholds(bidirectional=True), dtype=np.int32)
    delta = np.asarray([-r for r in table], dtype=np.int32)
    got = np.empty_like(delta)
    i32 = ctypes.c_int
    lib.rp_t5_buckets(_ptr(delta, i32), delta.size, 1, _ptr(thr, i32), thr.size, _ptr(got, i32))
    assert got.tolist() == list(table.values())


# ---- float families within the documented bounds ------------------------------------------------------------------

PRECISIONS = ["float32", "float64"]
MAX_OFFSET = 10**6


@st.composite
def positions(draw, max_q=6, max_k=24):
    """Absolute positions: small arrays spread over [-10**3, 10**6] so offsets reach 10**6 (with duplicates)."""
    sq = draw(st.integers(1, max_q))
    sk = draw(st.integers(1, max_k))
    span = draw(st.sampled_from([16, 1000, MAX_OFFSET]))
    lo = draw(st.integers(-1000, 0))
    q = draw(st.lists(st.integers(lo, lo + span), min_size=sq, max_size=sq))
    k = draw(st.lists(st.integers(0, span), min_size=sk, max_size=sk))
    return np.asarray(q, dtype=np.int64), np.asarray(k, dtype=np.int64)


def floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def arrays(n, lo, hi):
    return st.lists(floats(lo, hi), min_size=n, max_size=n).map(lambda v: np.asarray(v, dtype=np.float64))


@st.composite
def families(draw):
    kind = draw(st.sampled_from(["alibi", "kerple_power", "kerple_log", "t5", "offset", "sandwich", "fire", "tensor"]))
    heads = draw(st.integers(1, 5))
    if kind == "alibi":
        if draw(st.booleans()):
            return rp.ALiBi.from_num_heads(heads)
        return rp.ALiBi(draw(arrays(heads, 1e-4, 4.0)))
    if kind == "kerple_power":
        return rp.KerplePower(draw(arrays(heads, 0.01, 10.0)), draw(arrays(heads, 0.01, 2.0)))
    if kind == "kerple_log":
        return rp.KerpleLog(draw(arrays(heads, 0.01, 10.0)), draw(arrays(heads, 0.01, 10.0)))
    if kind == "t5":
        bidirectional = draw(st.booleans())
        nb = draw(st.sampled_from([4, 8, 32, 64]))
        md = draw(st.sampled_from([nb, 128, 1000, 10**5]))
        table = draw(arrays(heads * nb, -5.0, 5.0)).reshape(heads, nb)
        return rp.T5Bias(table, bidirectional=bidirectional, max_distance=md, layout="heads_buckets")
    if kind == "offset":
        k = draw(st.integers(0, 40))
        return rp.OffsetBias(draw(arrays(heads * (2 * k + 1), -5.0, 5.0)).reshape(heads, 2 * k + 1))
    if kind == "sandwich":
        return rp.Sandwich(heads, 2 * draw(st.integers(1, 128)))
    if kind == "fire":
        width = draw(st.integers(1, 40))
        return rp.FIRE(
            draw(arrays(width, -3.0, 3.0)).reshape(width, 1),
            draw(arrays(width, -2.0, 2.0)),
            draw(arrays(heads * width, -2.0, 2.0)).reshape(heads, width),
            draw(arrays(heads, -2.0, 2.0)),
            c=draw(floats(1e-3, 2.0)),
            L=draw(floats(1.0, 4096.0)),
            eps=draw(st.sampled_from([0.0, 1e-6, 0.5])),
        )
    return kind  # "tensor": built once positions are known


@pytest.mark.parametrize("precision", PRECISIONS)
@settings(max_examples=150, deadline=None)
@given(fam=families(), pos=positions(), seed=st.integers(0, 2**32 - 1))
def test_bias_within_documented_bound(lib, precision, fam, pos, seed):
    q_pos, k_pos = pos
    if fam == "tensor":
        rng = np.random.default_rng(seed)
        arr = rng.normal(size=(3, q_pos.size, k_pos.size)) * 10.0 ** rng.integers(-3, 4)
        fam = rp.TensorBias(arr)
    check_family(lib, fam, q_pos, k_pos, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_bias_at_large_offsets(lib, precision):
    """Deterministic cases at the ends of the offset range: 0, 1, around 2**24 and 10**6, both signs."""
    q_pos = np.asarray([0, 5, 10**6, 2**24 + 1], dtype=np.int64)
    k_pos = np.asarray([0, 1, 2, 10**6 - 1, 10**6, 2**24 - 3, 2**24 + 9], dtype=np.int64)
    rng = np.random.default_rng(1)
    fams = [
        rp.ALiBi.from_num_heads(12),
        rp.KerplePower([0.5, 2.0, 1e-2], [2.0, 0.5, 0.01]),
        rp.KerpleLog([0.5, 2.0, 1e-2], [10.0, 0.5, 0.01]),
        rp.T5Bias(rng.normal(size=(2, 32)), bidirectional=True, layout="heads_buckets"),
        rp.T5Bias(rng.normal(size=(2, 32)), bidirectional=False, layout="heads_buckets"),
        rp.OffsetBias(rng.normal(size=(2, 9))),
        rp.Sandwich(4, 128),
        rp.FIRE(rng.normal(size=(32, 1)), rng.normal(size=32), rng.normal(size=(2, 32)), rng.normal(size=2), eps=1e-6),
    ]
    for fam in fams:
        check_family(lib, fam, q_pos, k_pos, precision)


def test_bound_is_not_vacuous(lib):
    """A deliberately wrong kernel input (slopes off by 1e-5 relative) must break the float32 ALiBi bound."""
    q_pos = np.arange(1000, 1010, dtype=np.int64)
    k_pos = np.arange(0, 10, dtype=np.int64)
    good = rp.ALiBi([0.25, 0.5])
    bad = rp.ALiBi([0.25 * (1 + 1e-5), 0.5])
    got = host_bias(lib, bad, q_pos, k_pos, "float32")
    ref = np.asarray(good.bias(q_pos, k_pos))
    assert np.any(np.abs(got - ref) > bias_error_bound(good, q_pos, k_pos, "float32"))


def test_kernel_bound_refuses_a_subclass_of_a_family():
    class Steeper(rp.ALiBi):  # a subclass may change the arithmetic the documented bound was derived for
        pass

    q = np.arange(4)
    with pytest.raises(TypeError, match="family: no documented bound for Steeper"):
        bias_error_bound(Steeper(rp.alibi_slopes(2)), q, q, "float32")
    assert bias_error_bound(rp.ALiBi(rp.alibi_slopes(2)), q, q, "float32").shape == (2, 4, 4)


# ---- window test and softcap transform (bias.cuh: in_window, softcap_logit) ------------------------------------------

# Offsets around every window edge below, and the extremes the kernel can see (|Delta| <= 2**31 - 2).
WINDOW_DELTAS = np.array([*range(-12, 13), -(2**31 - 2), 2**31 - 2, -(2**30), 2**30], dtype=np.int32)
WINDOW_SIDES = [*range(9), _WINDOW_UNBOUNDED]


def _window_rule(delta: np.ndarray, left: int, right: int) -> np.ndarray:
    """The reference convention (relpos_ref.attention): -right <= Delta <= left, the sentinel meaning unbounded."""
    keep = np.ones(delta.shape, bool)
    if left != _WINDOW_UNBOUNDED:
        keep &= delta.astype(np.int64) <= left
    if right != _WINDOW_UNBOUNDED:
        keep &= delta.astype(np.int64) >= -right
    return keep


def host_window(lib, delta: np.ndarray, left: int, right: int) -> np.ndarray:
    out = np.zeros(delta.size, dtype=np.uint8)
    lib.rp_in_window(_ptr(delta, ctypes.c_int), delta.size, left, right, out.ctypes.data)
    return out.astype(bool)


def test_window_exhaustive_small_range(lib):
    """in_window on every offset in [-12, 12] (and the extremes) for every pair of sides in 0..8 or unbounded."""
    for left in WINDOW_SIDES:
        for right in WINDOW_SIDES:
            got = host_window(lib, WINDOW_DELTAS, left, right)
            np.testing.assert_array_equal(got, _window_rule(WINDOW_DELTAS, left, right), err_msg=f"{left}, {right}")


def test_window_check_rejects_off_by_one():
    """The comparison above can fail: the rule with either edge open differs from it on the offsets tested."""
    for left in range(9):
        for right in range(9):
            rule = _window_rule(WINDOW_DELTAS, left, right)
            assert not np.array_equal(rule, _window_rule(WINDOW_DELTAS, left - 1, right))
            assert not np.array_equal(rule, _window_rule(WINDOW_DELTAS, left, right - 1))


def _all_float16_values() -> np.ndarray:
    v = np.arange(2**16, dtype=np.uint16).view(np.float16)
    return v[np.isfinite(v)].astype(np.float64)


# (alpha, softcap): caps below, at and far above the scaled scores, a cap that is not a float32 number (0.01).
SOFTCAP_CONFIGS = [(0.125, 1.0), (1.0, 30.0), (0.5, 2.5), (3.0, 0.01), (0.0625, 50.0)]


def host_softcap(lib, s: np.ndarray, alpha: float, cap: float, bterm: np.ndarray, precision: str) -> np.ndarray:
    acc = np.dtype(np.float32 if precision == "float32" else np.float64)
    real = ctypes.c_float if precision == "float32" else ctypes.c_double
    fn = lib.rp_softcap_f32 if precision == "float32" else lib.rp_softcap_f64
    s_a, b_a = np.ascontiguousarray(s, dtype=acc), np.ascontiguousarray(bterm, dtype=acc)
    out = np.empty_like(s_a)
    # cap and 1 / cap rounded once from float64, as the launcher does.
    fn(_ptr(s_a, real), s_a.size, acc.type(alpha), acc.type(cap), acc.type(1.0 / cap), _ptr(b_a, real), _ptr(out, real))
    return out.astype(np.float64)


def _softcap_ratio(got, s, alpha, cap, bterm, precision) -> float:
    ref = cap * np.tanh(alpha * s / cap) + bterm
    bound = softcap_error_bound(s, alpha, cap, precision) + 3 * kernel_roundoff(precision) * np.abs(bterm)
    return float(np.max(np.abs(got - ref) / bound))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("alpha", "cap"), SOFTCAP_CONFIGS)
def test_softcap_within_bound_on_every_float16_score(lib, precision, alpha, cap):
    """softcap_logit on every finite float16 score (exact in float32 and float64), with and without a bias term,
    against c tanh(alpha s / c) + b in float64, within softcap_error_bound (+ the bias term's 3u|b|)."""
    s = _all_float16_values()
    bterm = np.random.default_rng(0).normal(size=s.size) * 3
    if precision == "float32":
        bterm = bterm.astype(np.float32).astype(np.float64)  # the kernel's bias * beta, already a float32 number
    for b in (np.zeros_like(s), bterm):
        got = host_softcap(lib, s, alpha, cap, b, precision)
        assert _softcap_ratio(got, s, alpha, cap, b, precision) <= 1


@pytest.mark.parametrize("precision", PRECISIONS)
def test_softcap_bound_rejects_wrong_transforms(lib, precision):
    """The bound can fail: 16 ulp more on tanh, the cap after the bias, or no cap at all exceed it."""
    s = _all_float16_values()
    alpha, cap = 0.5, 2.5
    bterm = np.random.default_rng(1).normal(size=s.size)
    if precision == "float32":
        bterm = bterm.astype(np.float32).astype(np.float64)
    ulp = 2 * kernel_roundoff(precision)
    t = np.tanh(alpha * s / cap)
    wrong = {
        "tanh 16 ulp off": host_softcap(lib, s, alpha, cap, bterm, precision) + 16 * ulp * cap * np.abs(t),
        "cap after the bias": cap * np.tanh((alpha * s + bterm) / cap),
        "no cap": alpha * s + bterm,
    }
    for name, got in wrong.items():
        assert _softcap_ratio(got, s, alpha, cap, bterm, precision) > 1, name


@pytest.mark.parametrize("precision", PRECISIONS)
def test_softcap_keeps_a_minus_inf_score_masked(lib, precision):
    """A -inf score is a masked key with or without a softcap: it stays -inf (c tanh(-inf) = -c would attend it);
    +inf and NaN are not masks and go through tanh (+c, NaN), finite scores are capped."""
    s = np.array([-np.inf, np.inf, np.nan, -1e30, 0.0, 3.0])
    got = host_softcap(lib, s, 0.5, 2.5, np.zeros_like(s), precision)
    assert got[0] == -np.inf
    assert got[1] == pytest.approx(2.5)
    assert np.isnan(got[2])
    assert got[3] == pytest.approx(-2.5)
    assert got[4] == 0.0
    assert got[5] == pytest.approx(2.5 * np.tanh(1.5 / 2.5), rel=1e-6)
