// Fused biased softmax: probs[b, h, i, :] = softmax(z) with
//   z_j = s_j * alpha + bias_h(i, j) * beta   for attended keys, -inf (probability exactly 0) otherwise,
// post_scale: alpha = scale, beta = 1; pre_scale: alpha = beta = scale. With a softcap c (RP_SOFTCAP),
//   z_j = c * tanh(s_j * alpha / c) + bias_h(i, j) * beta
// and with a window (RP_WINDOW) key j is attended only when -right <= q_pos - k_pos <= left (see bias.cuh).
// The bias is computed in the kernel from the family's parameters (bias.cuh); nothing of shape (H, Sq, Sk) is
// read except for the TensorBias fallback.
//
// One read of the scores and one write of the probabilities per element for rows that fit the register paths
// (Sk <= 32768 for float/half, <= 16384 for double; with thread-block clusters, sm_90+, up to 65536); longer rows use
// a two-pass kernel that reads the scores twice.
//
// Kernels (the Python loader in relpos_ref/cuda/__init__.py picks one and instantiates it by name):
//   softmax_warp<F, T, VPT, VEC>      one warp per row, 4 rows per 128-thread block, Sk <= 32 * VPT (<= 1024)
//   softmax_block<F, T, NT, VPT, VEC> one NT-thread block per row, Sk <= NT * VPT, the row stays in registers
//   softmax_stream<F, T, NT, VPT, VEC> one block per row, any Sk: pass 1 online max/sum, pass 2 recompute and write
//   softmax_cluster<F, T, C, NT, VPT, VEC> (sm_90+) a cluster of C blocks per row, Sk <= C * NT * VPT, each block
//                                     holding NT * VPT consecutive keys in registers; one exchange through
//                                     distributed shared memory
//   sandwich_profile_kernel           fills the Sandwich profile table (double)
// F is a family struct template of bias.cuh, T the storage type of scores/probs (float, double, rp::half_t), VPT
// the values each thread holds, VEC the elements per vector load/store (16 bytes at most; 1 when rows are not
// aligned). Thread t owns elements (c * threads_per_row + t) * VEC + v, c < VPT / VEC, v < VEC: every load and
// store instruction of a warp covers a contiguous, aligned span.
//
// Conventions: a row whose attended logits are all -inf (every key masked, or -inf scores, with or without a
// softcap, which keeps a -inf score -inf) is "empty": probs are
// written as 0 (or NaN with RP_EMPTY_NAN) and lse as -inf (or NaN). NaN logits propagate (the max below keeps
// NaN), as in the NumPy reference. lse is the natural log-sum-exp of the final logits, in the accumulation type.
//
// Include-free (see bias.cuh): float16 is handled as 16-bit storage converted with PTX cvt instructions.

#include "bias.cuh"

namespace rp {

struct half_t {
    unsigned short bits;
};

// Storage type -> accumulation type and conversions.
template <typename T>
struct Traits;
template <>
struct Traits<float> {
    typedef float acc;
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Traits<double> {
    typedef double acc;
    static __device__ __forceinline__ double load(double v) { return v; }
    static __device__ __forceinline__ double store(double v) { return v; }
};
template <>
struct Traits<half_t> {
    typedef float acc;
#ifndef RP_HOST_EMULATION
    static __device__ __forceinline__ float load(half_t v) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
        return f;
    }
    static __device__ __forceinline__ half_t store(float f) {
        half_t h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
        return h;
    }
#else  // CPU emulation of the kernels in tests/test_cuda_emulated.py: the shim provides the conversions
    static float load(half_t v) { return rp_emu_h2f(v.bits); }
    static half_t store(float f) {
        half_t h;
        h.bits = rp_emu_f2h(f);
        return h;
    }
#endif
};

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
    T v[VEC];
};

__device__ __forceinline__ float neg_inf(float) { return __int_as_float(0xff800000); }
__device__ __forceinline__ double neg_inf(double) { return __longlong_as_double(0xfff0000000000000ULL); }
__device__ __forceinline__ float quiet_nan(float) { return __int_as_float(0x7fffffff); }
__device__ __forceinline__ double quiet_nan(double) { return __longlong_as_double(0x7fffffffffffffffULL); }
__device__ __forceinline__ float m_exp(float x) { return expf(x); }
__device__ __forceinline__ double m_exp(double x) { return exp(x); }
__device__ __forceinline__ float m_log(float x) { return logf(x); }
__device__ __forceinline__ double m_log(double x) { return log(x); }

// Maximum that propagates NaN (fmaxf would drop it and could turn a NaN row into an "empty" one).
template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {
    return (a > b || a != a) ? a : b;
}

// Butterfly reductions over a full warp. Every caller has all 32 lanes converged here (whole warps exit together),
// so the full mask is exact. Each lane ends with the same bits: at every step lanes l and l^o add the same two
// numbers (addition is commutative), so decisions taken on the result (empty row) are warp-uniform.
template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block-wide all-reduce for NT threads (NT a multiple of 32, <= 1024). smem has 33 slots and is used by one kind of
// reduction only (max and sum have separate buffers), so consecutive calls never race: slot 32 is written after the
// first barrier of a call and read before the first barrier of the next one.
template <int NT, typename A>
__device__ __forceinline__ A block_max(A v, A* smem) {
    v = warp_max(v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
        A t = lane < NT / 32 ? smem[lane] : neg_inf(A());
        t = warp_max(t);
        if (lane == 0) smem[32] = t;
    }
    __syncthreads();
    return smem[32];
}
template <int NT, typename A>
__device__ __forceinline__ A block_sum(A v, A* smem) {
    v = warp_sum(v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
        A t = lane < NT / 32 ? smem[lane] : (A)0;
        t = warp_sum(t);
        if (lane == 0) smem[32] = t;
    }
    __syncthreads();
    return smem[32];
}

enum {
    RP_POS_ARRAYS = 1,  // positions from qpos[]/kpos[] instead of q0 + i / k0 + j
    RP_CAUSAL = 2,      // attend only keys with kpos <= qpos
    RP_HAS_MASK = 4,    // boolean mask (uint8), strided
    RP_WANT_LSE = 8,    // write lse[row]
    RP_EMPTY_NAN = 16,  // empty rows: NaN probs and NaN lse instead of 0 and -inf
    RP_WINDOW = 32,     // attend only keys with -wr <= qpos - kpos <= wl
    RP_SOFTCAP = 64     // logits cap * tanh(s * alpha / cap) + bias * beta
};

// Everything a row needs besides the family.
template <typename A>
struct RowCtx {
    const unsigned char* mask_row;
    const int* kpos;
    long long msj;
    int Sk, k0, qpos, flags;
    int wl, wr;      // window sides (RP_WINDOW)
    A cap, inv_cap;  // softcap and its reciprocal (RP_SOFTCAP)
};

#define RP_KERNEL_PARAMS                                                                                             \
    const T *__restrict__ x, T *__restrict__ y, typename Traits<T>::acc *__restrict__ lse,                          \
        const typename Traits<T>::acc *__restrict__ fp, const int *__restrict__ ip,                                  \
        const long long *__restrict__ lp, const int *__restrict__ qpos, const int *__restrict__ kpos,                \
        const unsigned char *__restrict__ mask, long long msb, long long msh, long long msi, long long msj,          \
        int nrows, int H, int Sq, int Sk, int q0, int k0, int flags, typename Traits<T>::acc alpha,                  \
        typename Traits<T>::acc beta, int wl, int wr, typename Traits<T>::acc cap, typename Traits<T>::acc inv_cap

// Decompose the row index and prepare the family and the row context.
template <template <typename> class F, typename A>
__device__ __forceinline__ void setup_row(long long row, F<A>& fam, RowCtx<A>& rc, const A* fp, const int* ip,
                                          const long long* lp, const int* qpos, const int* kpos,
                                          const unsigned char* mask, long long msb, long long msh, long long msi,
                                          long long msj, int H, int Sq, int Sk, int q0, int k0, int flags, int wl,
                                          int wr, A cap, A inv_cap) {
    const int i = (int)(row % Sq);
    const long long bh = row / Sq;
    const int h = (int)(bh % H);
    const int b = (int)(bh / H);
    const int qp = (flags & RP_POS_ARRAYS) ? qpos[i] : q0 + i;
    fam.setup(fp, ip, lp, b, h, H, i, qp);
    rc.mask_row = (flags & RP_HAS_MASK) ? mask + (long long)b * msb + (long long)h * msh + (long long)i * msi : mask;
    rc.kpos = kpos;
    rc.msj = msj;
    rc.Sk = Sk;
    rc.k0 = k0;
    rc.qpos = qp;
    rc.flags = flags;
    rc.wl = wl;
    rc.wr = wr;
    rc.cap = cap;
    rc.inv_cap = inv_cap;
}

// Load VPT scores of one row for thread t (of NTR threads per row) starting at column `base`, and turn them into
// logits: s * alpha + bias * beta for attended keys, -inf otherwise (including the padding past Sk).
// Loads are issued first, all of them, so a thread has VPT / VEC independent memory requests in flight; the bias is
// evaluated afterwards in chunks of CH keys (FIRE keeps CH inputs and CH accumulators live, not VPT).
template <template <typename> class F, typename T, int NTR, int VPT, int VEC>
__device__ __forceinline__ void row_logits(typename Traits<T>::acc (&v)[VPT], const T* __restrict__ xrow, int base,
                                           int t, const F<typename Traits<T>::acc>& fam,
                                           const RowCtx<typename Traits<T>::acc>& rc,
                                           typename Traits<T>::acc alpha, typename Traits<T>::acc beta) {
    typedef typename Traits<T>::acc A;
    const int Sk = rc.Sk;
#pragma unroll
    for (int c = 0; c < VPT / VEC; ++c) {
        const int j0 = base + (c * NTR + t) * VEC;
        if (j0 < Sk) {  // VEC > 1 only when Sk % VEC == 0: a vector is entirely in or out of the row
            const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(xrow + j0);
#pragma unroll
            for (int u = 0; u < VEC; ++u) v[c * VEC + u] = Traits<T>::load(p.v[u]);
        } else {
#pragma unroll
            for (int u = 0; u < VEC; ++u) v[c * VEC + u] = (A)0;
        }
    }
    constexpr int CH = VPT < 8 ? VPT : 8;  // VPT and VEC are powers of two with VEC <= 8: CH is a multiple of VEC
    const A ninf = neg_inf(A());
#pragma unroll
    for (int c0 = 0; c0 < VPT; c0 += CH) {
        int jj[CH], dd[CH];
        bool ok[CH];
#pragma unroll
        for (int e = 0; e < CH; ++e) {
            const int r = c0 + e;
            const int j = base + ((r / VEC) * NTR + t) * VEC + (r % VEC);
            const bool in_row = j < Sk;
            const int jc = in_row ? j : Sk - 1;  // padding lanes evaluate a real key, then get masked
            const int kp = (rc.flags & RP_POS_ARRAYS) ? rc.kpos[jc] : rc.k0 + jc;
            bool attend = in_row;
            if (rc.flags & RP_CAUSAL) attend = attend && kp <= rc.qpos;
            if (rc.flags & RP_WINDOW) attend = attend && in_window(rc.qpos - kp, rc.wl, rc.wr);
            if (rc.flags & RP_HAS_MASK) attend = attend && rc.mask_row[(long long)jc * rc.msj] != 0;
            jj[e] = jc;
            dd[e] = rc.qpos - kp;
            ok[e] = attend;
        }
        // Families whose bias costs real arithmetic (FIRE's MLP, KERPLE's pow and log1p: F::skip_masked) skip it for
        // a chunk with no attended key (past the causal diagonal, outside the window, masked, padding): the masked
        // half of a square causal softmax then costs no bias at all. Masked keys are contiguous along a causal row
        // (and on each side of a window), so whole warps take the same branch except at the diagonal (the edges).
        // The cheap families keep straight-line code (the branch costs them registers: 16 bytes more spills in the
        // 1024 x 32 ALiBi kernel under ptxas for sm_90).
        bool any = !F<A>::skip_masked;
#pragma unroll
        for (int e = 0; e < CH; ++e) any = any || ok[e];
        if (any) {
            A bias[CH];
            fam.template eval<CH>(jj, dd, bias);
            // flags is a kernel argument: the branch is uniform over the grid, and without RP_SOFTCAP the loop
            // below is the one the kernel had before softcaps (no tanh on the default path).
            if (rc.flags & RP_SOFTCAP) {
#pragma unroll
                for (int e = 0; e < CH; ++e)
                    v[c0 + e] = ok[e] ? softcap_logit(v[c0 + e], alpha, rc.cap, rc.inv_cap, bias[e] * beta) : ninf;
            } else {
#pragma unroll
                for (int e = 0; e < CH; ++e) v[c0 + e] = ok[e] ? m_fma(v[c0 + e], alpha, bias[e] * beta) : ninf;
            }
        } else {
#pragma unroll
            for (int e = 0; e < CH; ++e) v[c0 + e] = ninf;
        }
    }
}

// Write probabilities (p * inv, or the empty-row fill) for the elements row_logits loaded.
template <typename T, int NTR, int VPT, int VEC>
__device__ __forceinline__ void row_store(T* __restrict__ yrow, const typename Traits<T>::acc (&p)[VPT], int base,
                                          int t, int Sk, typename Traits<T>::acc inv, bool empty,
                                          typename Traits<T>::acc fill) {
#pragma unroll
    for (int c = 0; c < VPT / VEC; ++c) {
        const int j0 = base + (c * NTR + t) * VEC;
        if (j0 < Sk) {
            Pack<T, VEC> q;
#pragma unroll
            for (int u = 0; u < VEC; ++u) q.v[u] = Traits<T>::store(empty ? fill : p[c * VEC + u] * inv);
            *reinterpret_cast<Pack<T, VEC>*>(yrow + j0) = q;
        }
    }
}

// exp(v - m) in place (0 for -inf logits) and the thread's partial sum. Not called for empty rows (m = -inf).
template <typename A, int VPT>
__device__ __forceinline__ A exp_and_sum(A (&v)[VPT], A m) {
    A s = (A)0;
#pragma unroll
    for (int e = 0; e < VPT; ++e) {
        v[e] = m_exp(v[e] - m);
        s += v[e];
    }
    return s;
}

template <typename A, int VPT>
__device__ __forceinline__ A local_max(const A (&v)[VPT]) {
    A m = neg_inf(A());
#pragma unroll
    for (int e = 0; e < VPT; ++e) m = nan_max(m, v[e]);
    return m;
}

template <typename A>
__device__ __forceinline__ void write_lse(A* lse, long long row, int flags, bool empty, A m, A s) {
    if (flags & RP_WANT_LSE) {
        const bool nan_fill = (flags & RP_EMPTY_NAN) != 0;
        lse[row] = empty ? (nan_fill ? quiet_nan(A()) : neg_inf(A())) : m + m_log(s);
    }
}

// ---- one warp per row ---------------------------------------------------------------------------------------------
template <template <typename> class F, typename T, int VPT, int VEC>
__global__ void __launch_bounds__(128) softmax_warp(RP_KERNEL_PARAMS) {
    typedef typename Traits<T>::acc A;
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * 4 + (threadIdx.x >> 5);
    if (row >= nrows) return;  // whole warps leave together: the shuffles below always see 32 lanes
    F<A> fam;
    RowCtx<A> rc;
    setup_row<F, A>(row, fam, rc, fp, ip, lp, qpos, kpos, mask, msb, msh, msi, msj, H, Sq, Sk, q0, k0, flags,
                    wl, wr, cap, inv_cap);
    const T* xrow = x + row * Sk;
    T* yrow = y + row * Sk;
    A v[VPT];
    row_logits<F, T, 32, VPT, VEC>(v, xrow, 0, lane, fam, rc, alpha, beta);
    const A m = warp_max(local_max(v));
    const bool empty = m == neg_inf(A());  // warp-uniform
    A s = (A)0;
    if (!empty) s = exp_and_sum(v, m);
    s = warp_sum(s);  // all lanes, outside the branch (it is uniform anyway)
    const A fill = (flags & RP_EMPTY_NAN) ? quiet_nan(A()) : (A)0;
    row_store<T, 32, VPT, VEC>(yrow, v, 0, lane, Sk, (A)1 / s, empty, fill);
    if (lane == 0) write_lse(lse, row, flags, empty, m, s);
}

// ---- one block per row, row in registers --------------------------------------------------------------------------
template <template <typename> class F, typename T, int NT, int VPT, int VEC>
__global__ void __launch_bounds__(NT) softmax_block(RP_KERNEL_PARAMS) {
    typedef typename Traits<T>::acc A;
    __shared__ A red_max[33];
    __shared__ A red_sum[33];
    const int t = threadIdx.x;
    const long long row = blockIdx.x;  // grid = nrows exactly: no early exit, every thread reaches every barrier
    F<A> fam;
    RowCtx<A> rc;
    setup_row<F, A>(row, fam, rc, fp, ip, lp, qpos, kpos, mask, msb, msh, msi, msj, H, Sq, Sk, q0, k0, flags,
                    wl, wr, cap, inv_cap);
    const T* xrow = x + row * Sk;
    T* yrow = y + row * Sk;
    A v[VPT];
    row_logits<F, T, NT, VPT, VEC>(v, xrow, 0, t, fam, rc, alpha, beta);
    const A m = block_max<NT>(local_max(v), red_max);
    const bool empty = m == neg_inf(A());  // block-uniform (read from one shared slot)
    A s = (A)0;
    if (!empty) s = exp_and_sum(v, m);
    s = block_sum<NT>(s, red_sum);
    const A fill = (flags & RP_EMPTY_NAN) ? quiet_nan(A()) : (A)0;
    row_store<T, NT, VPT, VEC>(yrow, v, 0, t, Sk, (A)1 / s, empty, fill);
    if (t == 0) write_lse(lse, row, flags, empty, m, s);
}

// ---- one block per row, any length: two passes over the scores ----------------------------------------------------
template <template <typename> class F, typename T, int NT, int VPT, int VEC>
__global__ void __launch_bounds__(NT) softmax_stream(RP_KERNEL_PARAMS) {
    typedef typename Traits<T>::acc A;
    __shared__ A red_max[33];
    __shared__ A red_sum[33];
    const int t = threadIdx.x;
    const long long row = blockIdx.x;
    F<A> fam;
    RowCtx<A> rc;
    setup_row<F, A>(row, fam, rc, fp, ip, lp, qpos, kpos, mask, msb, msh, msi, msj, H, Sq, Sk, q0, k0, flags,
                    wl, wr, cap, inv_cap);
    const T* xrow = x + row * Sk;
    T* yrow = y + row * Sk;
    const A ninf = neg_inf(A());
    constexpr int TILE = NT * VPT;
    // Pass 1: running (max, sum of exp(z - max)) per thread, rescaled when the max grows.
    A mt = ninf, st = (A)0;
    for (int base = 0; base < Sk; base += TILE) {
        A v[VPT];
        row_logits<F, T, NT, VPT, VEC>(v, xrow, base, t, fam, rc, alpha, beta);
        const A nm = nan_max(mt, local_max(v));
        if (nm != ninf) {  // otherwise everything so far is -inf: nothing to add, and -inf - -inf must not happen
            st = st * m_exp(mt - nm) + exp_and_sum(v, nm);  // mt = -inf gives exp(-inf) = 0 times st = 0
            mt = nm;
        }
    }
    const A m = block_max<NT>(mt, red_max);
    const bool empty = m == ninf;
    // A thread that saw only -inf contributes 0; the others rescale to the row max (exp(0) = 1 for the max owner).
    A s = (mt == ninf) ? (A)0 : st * m_exp(mt - m);
    s = block_sum<NT>(s, red_sum);
    const A fill = (flags & RP_EMPTY_NAN) ? quiet_nan(A()) : (A)0;
    const A inv = (A)1 / s;
    // Pass 2: recompute the logits (second read of the scores) and write.
    for (int base = 0; base < Sk; base += TILE) {
        A v[VPT];
        row_logits<F, T, NT, VPT, VEC>(v, xrow, base, t, fam, rc, alpha, beta);
        if (!empty) {
#pragma unroll
            for (int e = 0; e < VPT; ++e) v[e] = m_exp(v[e] - m);
        }
        row_store<T, NT, VPT, VEC>(yrow, v, base, t, Sk, inv, empty, fill);
    }
    if (t == 0) write_lse(lse, row, flags, empty, m, s);
}

// ---- a cluster of C blocks per row (sm_90+), the row in the registers of the cluster ------------------------------
// Why: a long row held by one block (1024 threads x 16 values for 16384 keys) fills an SM's register file, so one
// block per SM loads, then reduces and stores with no loads in flight, and the memory system idles (61% of copy
// bandwidth on an H200 at 16384 keys, 69% at 32768). Split over a cluster, each block holds a 4096- or 8192-key
// piece, several blocks share an SM and one block's loads overlap another's reductions, as they do for the
// 4096-key rows that reach 90%.
//
// Block r of the cluster owns keys [r * NT * VPT, (r + 1) * NT * VPT). It computes its own maximum m_r and
// s_r = sum exp(z - m_r) (s_r = 0 when m_r = -inf), publishes (m_r, s_r) in its shared memory, and after one
// cluster barrier every warp reads the C pairs through distributed shared memory (lane r reads block r) and
// combines them: m = max m_r, s = sum_r s_r exp(m_r - m). Each block then writes exp(z - m_r) * (exp(m_r - m) / s).
// Every warp of every block combines the same C pairs with the same butterfly, so m and s, hence the empty-row
// decision, are bitwise uniform across the cluster. Compared with the one-block kernel this adds two roundings per
// probability (the factor exp(m_r - m) and one product) and one exp per block pair; the error model of
// tests/fused_cases.py has room for both. A NaN logit makes m NaN and the whole row NaN, in every block, as in the
// one-block kernels (a block without attended keys multiplies its zeros by the NaN factor).
//
// Shared memory of a block must outlive every remote read of it: each block arrives on a second cluster barrier
// after its reads (release) and waits on it only after its stores, just before exiting.
template <typename A>
struct ClusterShared {
    A red_max[33];
    A red_sum[33];
    A part[2];  // this block's (m_r, s_r), read by the other blocks of the cluster
};

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#ifndef RP_HOST_EMULATION
// The cluster is 1-D and C consecutive blocks of the 1-D grid form one cluster (CUDA programming guide, "Thread
// Block Clusters"), so the row is blockIdx.x / C; the rank comes from the hardware register all the same.
__device__ __forceinline__ unsigned cluster_rank() { return __clusterRelativeBlockRank(); }
__device__ __forceinline__ void cluster_arrive() { __cluster_barrier_arrive(); }  // barrier.cluster.arrive (release)
__device__ __forceinline__ void cluster_wait() { __cluster_barrier_wait(); }      // barrier.cluster.wait (acquire)
template <typename S>
__device__ __forceinline__ const S* cluster_peer(const S* local, unsigned rank) {
    return static_cast<const S*>(__cluster_map_shared_rank(const_cast<S*>(local), rank));
}
#define RP_CLUSTER_SHARED(type, name) __shared__ type name
#endif  // the CPU emulation (tests/test_cuda_emulated.py) defines these four and the macro

template <template <typename> class F, typename T, int C, int NT, int VPT, int VEC>
__global__ void __cluster_dims__(C, 1, 1) __launch_bounds__(NT) softmax_cluster(RP_KERNEL_PARAMS) {
    typedef typename Traits<T>::acc A;
    RP_CLUSTER_SHARED(ClusterShared<A>, sh);
    const int t = threadIdx.x;
    const unsigned rank = cluster_rank();
    const long long row = blockIdx.x / C;  // grid = nrows * C exactly: no early exit, every barrier is reached
    F<A> fam;
    RowCtx<A> rc;
    setup_row<F, A>(row, fam, rc, fp, ip, lp, qpos, kpos, mask, msb, msh, msi, msj, H, Sq, Sk, q0, k0, flags,
                    wl, wr, cap, inv_cap);
    const T* xrow = x + row * Sk;
    T* yrow = y + row * Sk;
    const int base = (int)rank * (NT * VPT);
    const A ninf = neg_inf(A());
    A v[VPT];
    row_logits<F, T, NT, VPT, VEC>(v, xrow, base, t, fam, rc, alpha, beta);  // keys past Sk come back as -inf
    const A mb = block_max<NT>(local_max(v), sh.red_max);
    A sb = (A)0;
    if (mb != ninf) {
        sb = exp_and_sum(v, mb);
    } else {  // nothing attended in this piece: its probabilities are 0 (or NaN if another piece has a NaN)
#pragma unroll
        for (int e = 0; e < VPT; ++e) v[e] = (A)0;
    }
    sb = block_sum<NT>(sb, sh.red_sum);
    if (t == 0) {
        sh.part[0] = mb;
        sh.part[1] = sb;
    }
    cluster_arrive();  // release: part[] is written before any block passes the wait below
    cluster_wait();
    const int lane = t & 31;
    A pm = ninf, ps = (A)0;
    if (lane < C) {
        const A* peer = cluster_peer(sh.part, (unsigned)lane);
        pm = peer[0];
        ps = peer[1];
    }
    const A m = warp_max(pm);
    const A s = warp_sum(pm == ninf ? (A)0 : ps * m_exp(pm - m));  // m = -inf only if every pm is -inf
    cluster_arrive();  // release: this block's remote reads are done (their values are consumed above)
    const bool empty = m == ninf;
    const A fill = (flags & RP_EMPTY_NAN) ? quiet_nan(A()) : (A)0;
    const A inv = mb == ninf ? (m == m ? (A)0 : m) : m_exp(mb - m) / s;
    row_store<T, NT, VPT, VEC>(yrow, v, base, t, Sk, inv, empty, fill);
    if (rank == 0 && t == 0) write_lse(lse, row, flags, empty, m, s);
    cluster_wait();  // no block exits (releasing its shared memory) while another may still read it
}
#endif  // sm_90+

// ---- Sandwich profile: out[n] = sandwich_profile(n, half_d), n = 0..count-1, in double --------------------------
__global__ void sandwich_profile_kernel(double* __restrict__ out, int count, int half_d) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n < count) out[n] = sandwich_profile<double>(n, half_d);
}

}  // namespace rp
