// Relative positional bias b_h(i, j) of every relpos_ref family, one __host__ __device__ function per family.
//
// Conventions (those of relpos_ref, see spec/conventions.md): Delta = q_pos[i] - k_pos[j] (>= 0 for past keys),
// n = |Delta|, heads 0-based here (h = 0..H-1; formulas written with 1-based heads say so).
//
// This header is include-free on purpose. NVRTC compiles it without any CUDA or C++ header (math functions and
// warp intrinsics are NVRTC built-ins), so the same source builds with the NVRTC of CUDA 12 and of CUDA 13, and the
// CPU check can compile it for the host: the host driver (tests/test_cuda_host.py) includes <math.h> and defines
// __host__, __device__ and __forceinline__ as shims before including this file.
//
// The accumulation type A is float (float16 and float32 scores) or double (float64 scores). Every function is
// generic in A so the host check runs exactly the code the kernels run, in both precisions. Offsets are 32-bit:
// the Python loader rejects positions whose offsets do not fit (|Delta| < 2**30).
//
// Each family is a struct with
//   setup(fp, ip, lp, b, h, H, i, qpos)  per-row preparation (head parameters, FIRE's normaliser, tensor row)
//   eval<N>(j, delta, out)               bias of N keys of that row: column indices j[] and offsets delta[]
//   skip_masked                          true if the kernels should skip eval for keys that are all masked
// fp / ip / lp are the family's float / int / int64 parameter buffers, laid out by relpos_ref/cuda/__init__.py
// (see the comment above each struct). eval works on N keys at once so FIRE can load each MLP weight once per N.

#ifndef RELPOS_REF_BIAS_CUH
#define RELPOS_REF_BIAS_CUH

#define RP_HD __host__ __device__ __forceinline__

namespace rp {

// ---- overloads of the math functions used below (C names, which both NVRTC and <math.h> provide) ----------------
RP_HD float m_log1p(float x) { return log1pf(x); }
RP_HD double m_log1p(double x) { return log1p(x); }
RP_HD float m_pow(float x, float y) { return powf(x, y); }
RP_HD double m_pow(double x, double y) { return pow(x, y); }
RP_HD float m_sin(float x) { return sinf(x); }
RP_HD double m_sin(double x) { return sin(x); }
RP_HD float m_fma(float a, float b, float c) { return fmaf(a, b, c); }
RP_HD double m_fma(double a, double b, double c) { return fma(a, b, c); }
RP_HD float m_tanh(float x) { return tanhf(x); }
RP_HD double m_tanh(double x) { return tanh(x); }

RP_HD int iabs(int x) { return x < 0 ? -x : x; }
RP_HD int iclamp(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

// ---- scalar bias functions, one per family ------------------------------------------------------------------------

// ALiBi (Press et al., arXiv 2108.12409), relative form: b = -m_h |Delta|. n < 2**24 converts to float exactly.
template <typename A>
RP_HD A alibi_bias(A slope, int delta) {
    return -(slope * (A)iabs(delta));
}

// KERPLE power (Chi et al., arXiv 2205.09921): b = -r1 |Delta|^r2, 0 < r2 <= 2 (pow(0, r2) = 0).
template <typename A>
RP_HD A kerple_power_bias(A r1, A r2, int delta) {
    return -(r1 * m_pow((A)iabs(delta), r2));
}

// KERPLE log: b = -r1 log(1 + r2 |Delta|), through log1p.
template <typename A>
RP_HD A kerple_log_bias(A r1, A r2, int delta) {
    return -(r1 * m_log1p(r2 * (A)iabs(delta)));
}

// T5 bucket of Delta (Raffel et al., arXiv 1910.10683) without any floating point: thr[0..nthr) are the exact
// integer starts of the half-buckets (relpos_ref.t5_bucket_thresholds: non-decreasing, thr[0] = 0, nthr = B' = B/2
// bidirectional or B causal). The half-bucket of n is (number of thresholds <= n) - 1, found by binary search, so
// the result equals the exact-real-arithmetic bucket for every n the thresholds were computed for.
// Bidirectional: n = |Delta| and keys after the query (Delta < 0) use the upper half [B', 2B').
// Causal: n = max(Delta, 0), so every future key shares bucket 0 with Delta = 0.
// Most keys of a long row lie at least max_distance (128 in T5) away, past the last threshold `last` = thr[nthr - 1]
// (kept in a register by the kernel's family struct): they take the last half-bucket after one comparison, and only
// nearer keys pay for the dependent loads of the search.
RP_HD int t5_bucket(int delta, int bidirectional, const int* thr, int nthr, int last) {
    const int n = bidirectional ? iabs(delta) : (delta > 0 ? delta : 0);
    int lo = 0, hi = nthr;  // first index with thr[index] > n
    if (last <= n) lo = hi;  // every threshold is <= n
    else hi = nthr - 1;      // thr[nthr - 1] > n: the answer is below it
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (thr[mid] <= n) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    const int half_bucket = lo - 1;  // thr[0] = 0 <= n, so lo >= 1
    return (bidirectional && delta < 0) ? nthr + half_bucket : half_bucket;
}

RP_HD int t5_bucket(int delta, int bidirectional, const int* thr, int nthr) {
    return t5_bucket(delta, bidirectional, thr, nthr, thr[nthr - 1]);
}

// Per-offset table (scalar form of Shaw et al., arXiv 1803.02155): b = table[h, clip(Delta, -K, K) + K].
template <typename A>
RP_HD A offset_bias(const A* table_row, int K, int delta) {
    return table_row[iclamp(delta, -K, K) + K];
}

// Sandwich (Chi et al., arXiv 2212.10356; NeMo SandwichRelativePositionEmbedding) is
//   b_h = (sum_{k=1..d/2} cos(n w_k) - d/2) / (8 (h+1) / H),  w_k = 10000^(-2k/d),
// a per-head factor times a profile of n alone. The profile is evaluated as -2 sum_k sin^2(n w_k / 2), the same
// quantity without the cancellation of sum cos - d/2 near n = 0 (as relpos_ref.Sandwich does). The kernels get it
// from a table filled by rp::sandwich_profile_kernel in double, one entry per distinct n (O(Sq + Sk) work), and
// multiply by the head factor; the d/2 sines per key are therefore not paid per (row, key).
template <typename A>
RP_HD A sandwich_profile(int n, int half_d) {
    const A d = (A)(2 * half_d);
    const A half_n = (A)n * (A)0.5;
    A total = (A)0;
    for (int k = 1; k <= half_d; ++k) {
        const A w = m_pow((A)10000, ((A)(-2) * (A)k) / d);
        const A s = m_sin(half_n * w);
        total = m_fma(s, s, total);
    }
    return (A)(-2) * total;
}

template <typename A>
RP_HD A sandwich_bias(A profile_n, A head_factor) {
    return profile_n * head_factor;
}

// FIRE (Li et al., arXiv 2310.04418): x = psi(n) / (psi(max(L, i)) + eps), psi(t) = log(1 + c t), i the absolute
// query position; b = w2[h] . relu(w1 x + b1) + b2[h] (nn.Linear(1, W) -> ReLU -> nn.Linear(W, H)).
template <typename A>
RP_HD A fire_denominator(A c, A L, A eps, int qpos) {
    const A q = (A)qpos;
    return m_log1p(c * (q > L ? q : L)) + eps;
}

template <typename A>
RP_HD A fire_input(A c, A denominator, int delta) {
    return m_log1p(c * (A)iabs(delta)) / denominator;
}

// The MLP on N inputs at once: each weight is loaded once per N keys. Accumulation order (k = 0..W-1, then + b2)
// is the same for every N, so N = 1 in the host check is the kernel's arithmetic.
template <typename A, int N>
RP_HD void fire_mlp(const A* x, A* out, const A* w1, const A* b1, const A* w2_row, A b2_h, int W) {
    A acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = (A)0;
    for (int k = 0; k < W; ++k) {
        const A a = w1[k], c = b1[k], w = w2_row[k];
#pragma unroll
        for (int e = 0; e < N; ++e) {
            const A pre = m_fma(a, x[e], c);
            acc[e] = m_fma(w, pre > (A)0 ? pre : (A)0, acc[e]);
        }
    }
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = acc[e] + b2_h;
}

// ---- kernel features (window, softcap), shared by the kernels and the host check -------------------------------

// Sliding window on Delta = q_pos - k_pos (relpos_ref.attention's convention): key attended when
// -right <= Delta <= left. The launcher passes 2**31 - 1 for an unbounded side: |Delta| < 2**31 - 1 because
// positions are below 2**30 in magnitude, so that side never rejects, and -right does not overflow.
RP_HD bool in_window(int delta, int left, int right) { return delta <= left && delta >= -right; }

// Logit with a softcap: cap * tanh(s * alpha / cap) + bterm, bterm = bias * beta. The cap acts on the scaled score
// alone, before the bias (FlashAttention's and vLLM's order, relpos_ref.attention's too). inv_cap = 1 / cap is
// rounded once on the host, so the kernel multiplies instead of dividing (IEEE division is a subroutine call);
// that costs one rounding of the argument, counted in relpos_ref.cuda.bounds.softcap_error_bound. The last step is
// one fma, so cap * t is not rounded separately.
template <typename A>
RP_HD A softcap_logit(A s, A alpha, A cap, A inv_cap, A bterm) {
    // A -inf score is a mask, as without a softcap (the reference masks after capping): c * tanh(-inf) = -c would
    // attend the key. s - s is NaN only for an infinity (no fast-math here), so finite scores take the plain path.
    if (s < (A)0 && s - s != s - s) return s;
    const A t = m_tanh((s * alpha) * inv_cap);
    return m_fma(cap, t, bterm);
}

// ---- family structs used by the kernels ---------------------------------------------------------------------------

// No bias (plain scaled, masked softmax).
template <typename A>
struct FamNone {
    static constexpr bool skip_masked = false;
    RP_HD void setup(const A*, const int*, const long long*, int, int, int, int, int) {}
    template <int N>
    RP_HD void eval(const int*, const int*, A* out) const {
#pragma unroll
        for (int e = 0; e < N; ++e) out[e] = (A)0;
    }
};

// Materialised bias (fallback), any strides: fp = base pointer, lp = element strides (b, h, i, j); broadcast axes
// have stride 0.
template <typename A>
struct FamTensor {
    static constexpr bool skip_masked = false;
    const A* row;
    long long sj;
    RP_HD void setup(const A* fp, const int*, const long long* lp, int b, int h, int, int i, int) {
        row = fp + (long long)b * lp[0] + (long long)h * lp[1] + (long long)i * lp[2];
        sj = lp[3];
    }
    template <int N>
    RP_HD void eval(const int* j, const int*, A* out) const {
#pragma unroll
        for (int e = 0; e < N; ++e) out[e] = row[(long long)j[e] * sj];
    }
};

// fp = slopes (H).
template <typename A>
struct FamAlibi {
    static constexpr bool skip_masked = false;
    A slope;
    RP_HD void setup(const A* fp, const int*, const long long*, int, int h, int, int, int) { slope = fp[h]; }
    template <int N>
    RP_HD void eval(const int*, const int* d, A* out) const {
#pragma unroll
        for (int e = 0; e < N; ++e) out[e] = alibi_bias(slope, d[e]);
    }
};

// fp = [r1 (H), r2 (H)].
template <typename A>
struct FamKerplePower {
    static constexpr bool skip_masked = true;
    A r1, r2;
    RP_HD void setup(const A* fp, const int*, const long long*, int, int h, int H, int, int) {
        r1 = fp[h];
        r2 = fp[H + h];
    }
    template <int N>
    RP_HD void eval(const int*, const int* d, A* out) const {
#pragma unroll
        for (int e = 0; e < N; ++e) out[e] = kerple_power_bias(r1, r2, d[e]);
    }
};

// fp = [r1 (H), r2 (H)].
template <typename A>
struct FamKerpleLog {
    static constexpr bool skip_masked = true;
    A r1, r2;
    RP_HD void setup(const A* fp, const int*, const long long*, int, int h, int H, int, int) {
        r1 = fp[h];
        r2 = fp[H + h];
    }
    template <int N>
    RP_HD void eval(const int*, const int* d, A* out) const {
#pragma unroll
        for (int e = 0; e < N; ++e) out[e] = kerple_log_bias(r1, r2, d[e]);
    }
};

// fp = table (H, B) row-major; ip = [bidirectional, B, nthr, thr[0..nthr)].
template <typename A>
struct FamT5 {
    static constexpr bool skip_masked = false;
    const A* row;
    const int* thr;
    int bidirectional, nthr, last;
    RP_HD void setup(const A* fp, const int* ip, const long long*, int, int h, int, int, int) {
        bidirectional = ip[0];
        row = fp + (long long)h * ip[1];
        nthr = ip[2];
        thr = ip + 3;
        last = thr[nthr - 1];
    }
    template <int N>
    RP_HD void eval(const int*, const int* d, A* out) const {
#pragma unroll
        for (int e = 0; e < N; ++e) out[e] = row[t5_bucket(d[e], bidirectional, thr, nthr, last)];
    }
};

// fp = table (H, 2K+1) row-major; ip = [K].
template <typename A>
struct FamOffset {
    static constexpr bool skip_masked = false;
    const A* row;
    int K;
    RP_HD void setup(const A* fp, const int* ip, const long long*, int, int h, int, int, int) {
        K = ip[0];
        row = fp + (long long)h * (2 * K + 1);
    }
    template <int N>
    RP_HD void eval(const int*, const int* d, A* out) const {
#pragma unroll
        for (int e = 0; e < N; ++e) out[e] = offset_bias(row, K, d[e]);
    }
};

// fp = [head factor H/(8(h+1)) (H), profile[0..nmax]]; ip = [nmax]. The caller guarantees |Delta| <= nmax for
// every offset evaluated (padding lanes use a clamped column), the min() below is a second guard against an
// out-of-bounds read.
template <typename A>
struct FamSandwich {
    static constexpr bool skip_masked = false;
    const A* profile;
    A factor;
    int nmax;
    RP_HD void setup(const A* fp, const int* ip, const long long*, int, int h, int H, int, int) {
        factor = fp[h];
        profile = fp + H;
        nmax = ip[0];
    }
    template <int N>
    RP_HD void eval(const int*, const int* d, A* out) const {
#pragma unroll
        for (int e = 0; e < N; ++e) {
            const int n = iabs(d[e]);
            out[e] = sandwich_bias(profile[n < nmax ? n : nmax], factor);
        }
    }
};

// fp = [c, L, eps, w1 (W), b1 (W), w2 (H, W), b2 (H)]; ip = [W].
template <typename A>
struct FamFire {
    static constexpr bool skip_masked = true;
    const A* w1;
    const A* b1;
    const A* w2_row;
    A b2_h, c, den;
    int W;
    RP_HD void setup(const A* fp, const int* ip, const long long*, int, int h, int H, int, int qpos) {
        W = ip[0];
        c = fp[0];
        den = fire_denominator(fp[0], fp[1], fp[2], qpos);
        w1 = fp + 3;
        b1 = w1 + W;
        w2_row = b1 + W + (long long)h * W;
        b2_h = fp[3 + 2 * W + (long long)H * W + h];
    }
    template <int N>
    RP_HD void eval(const int*, const int* d, A* out) const {
        A x[N];
#pragma unroll
        for (int e = 0; e < N; ++e) x[e] = fire_input(c, den, d[e]);
        fire_mlp<A, N>(x, out, w1, b1, w2_row, b2_h, W);
    }
};

}  // namespace rp

#endif  // RELPOS_REF_BIAS_CUH
