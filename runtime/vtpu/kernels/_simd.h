/* CPU feature detection and the vector primitives the kernels are built from.
 *
 * The build passes no -march (the wheel must run on any x86-64), so every AVX2 / AVX-512 routine
 * carries a function-level target attribute and is chosen at run time through `vtpu_level`. The
 * primitives here have AVX2 bodies, and the u8 x s8 GEMM an AVX-512 VNNI one; the packed Linear
 * kernels (_packed.h) have AVX-512 bodies. BF16 and AMX are detected and reported, not used.
 * Each primitive has a portable scalar twin so a forced "generic" level exercises the same
 * kernels on any machine, which is how the tests cover every path.
 */
#ifndef VTPU_SIMD_H
#define VTPU_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <cpuid.h>
#include <immintrin.h>

/* Levels are ordered: a kernel without an AVX-512 body runs its AVX2 body at VTPU_LEVEL_AVX512,
 * which means AVX-512 F + BW + VL on top of AVX2 + FMA (VNNI is detected separately). */
enum { VTPU_LEVEL_GENERIC = 0, VTPU_LEVEL_AVX2 = 1, VTPU_LEVEL_AVX512 = 2 };

/* Written once from Python (detection, or a forced level in tests); read by kernels. */
static int vtpu_level = VTPU_LEVEL_GENERIC;

/* ---- detection: CPUID plus XGETBV, so a feature counts only if the OS saves its registers. --- */

typedef struct {
    int avx2, fma, f16c, avx512f, avx512dq, avx512bw, avx512vl, avx512_vnni, avx512_bf16,
        avx512_fp16, avx_vnni, amx_tile, amx_bf16, amx_int8;
} vtpu_cpu_features;

static uint64_t vtpu_xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static vtpu_cpu_features vtpu_detect(void) {
    vtpu_cpu_features f;
    unsigned a, b, c, d, max_leaf;
    memset(&f, 0, sizeof f);
    max_leaf = __get_cpuid_max(0, 0);
    if (max_leaf < 1 || !__get_cpuid(1, &a, &b, &c, &d)) return f;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return f;
    uint64_t xcr0 = vtpu_xgetbv0();
    int os_avx = (xcr0 & 0x6) == 0x6;                  /* XMM and YMM state */
    int os_avx512 = os_avx && (xcr0 & 0xE0) == 0xE0;   /* opmask, ZMM_Hi256, Hi16_ZMM */
    int os_amx = (xcr0 & 0x60000) == 0x60000;         /* XTILECFG and XTILEDATA */
    if (!os_avx || max_leaf < 7) return f;
    f.fma = fma;
    f.f16c = f16c;
    __cpuid_count(7, 0, a, b, c, d);
    f.avx2 = (b >> 5) & 1;
    if (os_avx512) {
        f.avx512f = (b >> 16) & 1;
        f.avx512dq = (b >> 17) & 1;
        f.avx512bw = (b >> 30) & 1;
        f.avx512vl = (b >> 31) & 1;
        f.avx512_vnni = (c >> 11) & 1;
        f.avx512_fp16 = (d >> 23) & 1;
    }
    if (os_amx) {
        f.amx_bf16 = (d >> 22) & 1;
        f.amx_tile = (d >> 24) & 1;
        f.amx_int8 = (d >> 25) & 1;
    }
    unsigned sub1_a = 0;
    if (a >= 1) { /* leaf 7 reports its highest subleaf in EAX */
        unsigned b1, c1, d1;
        __cpuid_count(7, 1, sub1_a, b1, c1, d1);
        (void)b1; (void)c1; (void)d1;
    }
    f.avx_vnni = (sub1_a >> 4) & 1;
    if (os_avx512) f.avx512_bf16 = (sub1_a >> 5) & 1;
    return f;
}

/* ---- scalar twins ---------------------------------------------------------------------------- */

static float vtpu_dot_generic(const float *a, const float *b, long n) {
    double s = 0.0;  /* double keeps the scalar path a tight reference for the vector one */
    for (long i = 0; i < n; i++) s += (double)a[i] * b[i];
    return (float)s;
}

static float vtpu_sum_generic(const float *a, long n) {
    double s = 0.0;
    for (long i = 0; i < n; i++) s += a[i];
    return (float)s;
}

static float vtpu_sumsq_centered_generic(const float *a, float mean, long n) {
    double s = 0.0;
    for (long i = 0; i < n; i++) { double t = a[i] - mean; s += t * t; }
    return (float)s;
}

static float vtpu_max_generic(const float *a, long n) {
    float m = -INFINITY;
    for (long i = 0; i < n; i++) m = a[i] > m ? a[i] : m;
    return m;
}

/* y = exp(x - shift), returns sum(y) */
static float vtpu_exp_shift_sum_generic(const float *x, float *y, float shift, long n) {
    double s = 0.0;
    for (long i = 0; i < n; i++) { y[i] = expf(x[i] - shift); s += y[i]; }
    return (float)s;
}

static void vtpu_scale_generic(float *y, float alpha, long n) {
    for (long i = 0; i < n; i++) y[i] *= alpha;
}

/* activation codes shared with the .pyx */
enum { VTPU_ACT_NONE = 0, VTPU_ACT_RELU = 1, VTPU_ACT_GELU = 2, VTPU_ACT_GELU_TANH = 3,
       VTPU_ACT_SILU = 4 };

static inline float vtpu_act_scalar(float v, int act) {
    switch (act) {
    case VTPU_ACT_RELU: return v > 0.0f ? v : 0.0f;
    case VTPU_ACT_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case VTPU_ACT_GELU_TANH: {
        float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
        return 0.5f * v * (1.0f + tanhf(u));
    }
    case VTPU_ACT_SILU: return v / (1.0f + expf(-v));
    default: return v;
    }
}

/* y[i] = act(y[i] + bias[i]); bias may be NULL */
static void vtpu_bias_act_generic(float *y, const float *bias, long n, int act) {
    for (long i = 0; i < n; i++) y[i] = vtpu_act_scalar(y[i] + (bias ? bias[i] : 0.0f), act);
}

/* ---- AVX2 + FMA ------------------------------------------------------------------------------ */

#define VTPU_AVX2 __attribute__((target("avx2,fma")))

VTPU_AVX2 static inline float vtpu_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

VTPU_AVX2 static inline float vtpu_hmax256(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp with round-to-nearest range reduction and a degree-5 polynomial (Cephes coefficients):
 * relative error ~2 ulp on [-87, 88]; underflows to 0 below -87.3, saturates at +88.7. */
VTPU_AVX2 static inline __m256 vtpu_exp256(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365478515625f);
    __m256 below = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(below, y);
}

/* erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), odd symmetry restored by the sign bit. */
VTPU_AVX2 static inline __m256 vtpu_erf256(__m256 x) {
    const __m256 sign_mask = _mm256_set1_ps(-0.0f);
    __m256 sign = _mm256_and_ps(x, sign_mask);
    __m256 ax = _mm256_andnot_ps(sign_mask, x);
    __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f),
                             _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), ax, _mm256_set1_ps(1.0f)));
    __m256 p = _mm256_set1_ps(1.061405429f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
    p = _mm256_mul_ps(p, t);
    __m256 e = vtpu_exp256(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(ax, ax)));
    __m256 y = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f));
    return _mm256_or_ps(y, sign);
}

VTPU_AVX2 static inline __m256 vtpu_act256(__m256 v, int act) {
    const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
    switch (act) {
    case VTPU_ACT_RELU: return _mm256_max_ps(v, _mm256_setzero_ps());
    case VTPU_ACT_GELU:
        return _mm256_mul_ps(_mm256_mul_ps(half, v),
                             _mm256_add_ps(one, vtpu_erf256(_mm256_mul_ps(
                                                    v, _mm256_set1_ps(0.70710678118654752f)))));
    case VTPU_ACT_GELU_TANH: {
        /* 0.5 v (1 + tanh u) = v * sigmoid(2u) = v / (1 + exp(-2u)) */
        __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
        __m256 u2 = _mm256_mul_ps(_mm256_set1_ps(-1.5957691216057308f),
                                  _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), v3, v));
        return _mm256_div_ps(v, _mm256_add_ps(one, vtpu_exp256(u2)));
    }
    case VTPU_ACT_SILU:
        return _mm256_div_ps(v, _mm256_add_ps(one, vtpu_exp256(_mm256_sub_ps(_mm256_setzero_ps(), v))));
    default: return v;
    }
}

VTPU_AVX2 static void vtpu_bias_act_avx2(float *y, const float *bias, long n, int act) {
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(y + i);
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + i));
        _mm256_storeu_ps(y + i, vtpu_act256(v, act));
    }
    for (; i < n; i++) y[i] = vtpu_act_scalar(y[i] + (bias ? bias[i] : 0.0f), act);
}

VTPU_AVX2 static float vtpu_dot_avx2(const float *a, const float *b, long n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = vtpu_hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

VTPU_AVX2 static float vtpu_sum_avx2(const float *a, long n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_add_ps(s0, _mm256_loadu_ps(a + i));
        s1 = _mm256_add_ps(s1, _mm256_loadu_ps(a + i + 8));
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(a + i));
    float s = vtpu_hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i];
    return s;
}

VTPU_AVX2 static float vtpu_sumsq_centered_avx2(const float *a, float mean, long n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), m = _mm256_set1_ps(mean);
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(a + i), m);
        __m256 t1 = _mm256_sub_ps(_mm256_loadu_ps(a + i + 8), m);
        s0 = _mm256_fmadd_ps(t0, t0, s0);
        s1 = _mm256_fmadd_ps(t1, t1, s1);
    }
    for (; i + 8 <= n; i += 8) {
        __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(a + i), m);
        s0 = _mm256_fmadd_ps(t0, t0, s0);
    }
    float s = vtpu_hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++) { float t = a[i] - mean; s += t * t; }
    return s;
}

VTPU_AVX2 static float vtpu_max_avx2(const float *a, long n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    long i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(a + i));
    float s = vtpu_hmax256(m);
    for (; i < n; i++) s = a[i] > s ? a[i] : s;
    return s;
}

VTPU_AVX2 static float vtpu_exp_shift_sum_avx2(const float *x, float *y, float shift, long n) {
    __m256 s = _mm256_setzero_ps(), sh = _mm256_set1_ps(shift);
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = vtpu_exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
        _mm256_storeu_ps(y + i, e);
        s = _mm256_add_ps(s, e);
    }
    float t = vtpu_hsum256(s);
    for (; i < n; i++) { y[i] = expf(x[i] - shift); t += y[i]; }
    return t;
}

VTPU_AVX2 static void vtpu_scale_avx2(float *y, float alpha, long n) {
    __m256 a = _mm256_set1_ps(alpha);
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(a, _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] *= alpha;
}

/* ---- int8 GEMM: C[m,n] = sum_k A[m,k] * BT[n,k], exact in int32 -------------------------------
 * Signed bytes are widened to int16 and multiplied pairwise with vpmaddwd; unlike vpmaddubsw this
 * never saturates, so the result equals the integer reference for every input. K is limited by
 * the Python layer so int32 accumulators cannot overflow. */

static void vtpu_gemm_s8_rows_generic(const int8_t *A, const int8_t *BT, int32_t *C, long i0,
                                      long i1, long N, long K) {
    for (long i = i0; i < i1; i++)
        for (long j = 0; j < N; j++) {
            int32_t s = 0;
            const int8_t *a = A + i * K, *b = BT + j * K;
            for (long k = 0; k < K; k++) s += (int32_t)a[k] * (int32_t)b[k];
            C[i * N + j] = s;
        }
}

/* Packed operands of the AVX2 path, so its inner loop is an outer product with no shuffles:
 * A: Mp (M rounded up to 4) rows of Kp = ceil(K/2) int32, each the int16 pair (a[2p], a[2p+1]);
 * B: panels of 8 columns; panel q, pair p is 8 columns x (b[2p], b[2p+1]) = 16 int16 = one ymm.
 * Padding (odd K, ragged M and N) is zero, so it adds nothing to any sum. */
static inline int32_t vtpu_s16_pair(int8_t lo, int8_t hi) {
    return (int32_t)((uint32_t)(uint16_t)(int16_t)lo | ((uint32_t)(uint16_t)(int16_t)hi << 16));
}

/* rows [i0, i1) of packed A; rows at or past M are zero */
static void vtpu_pack_a_s8(const int8_t *A, long M, long K, long Kp, long i0, long i1,
                           int32_t *Ap) {
    for (long i = i0; i < i1; i++) {
        int32_t *dst = Ap + i * Kp;
        if (i >= M) { memset(dst, 0, Kp * sizeof(int32_t)); continue; }
        const int8_t *src = A + i * K;
        for (long p = 0; p < K / 2; p++) dst[p] = vtpu_s16_pair(src[2 * p], src[2 * p + 1]);
        if (K & 1) dst[Kp - 1] = vtpu_s16_pair(src[K - 1], 0);
    }
}

/* panels [q0, q1) of packed B; columns at or past N are zero */
static void vtpu_pack_bt_s8(const int8_t *BT, long N, long K, long Kp, long q0, long q1,
                            int16_t *Bp) {
    for (long q = q0; q < q1; q++) {
        int16_t *dst = Bp + q * Kp * 16;
        memset(dst, 0, Kp * 16 * sizeof(int16_t));
        for (long c = 0; c < 8 && q * 8 + c < N; c++) {
            const int8_t *src = BT + (q * 8 + c) * K;
            for (long k = 0; k < K; k++) dst[(k >> 1) * 16 + c * 2 + (k & 1)] = src[k];
        }
    }
}

/* 4 rows x (8 * NP) columns of C; NP = 3 uses 12 accumulators + 3 B + 1 A of the 16 ymm. */
#define VTPU_S8_TILE(NP)                                                                         \
    VTPU_AVX2 static void vtpu_s8_tile_4x##NP(const int32_t *Ap, const int16_t *Bp, long Kp,     \
                                             int32_t *tile) {                                    \
        __m256i acc[4][NP];                                                                      \
        for (int r = 0; r < 4; r++)                                                              \
            for (int c = 0; c < NP; c++) acc[r][c] = _mm256_setzero_si256();                     \
        for (long p = 0; p < Kp; p++) {                                                          \
            __m256i b[NP];                                                                       \
            for (int c = 0; c < NP; c++)                                                         \
                b[c] = _mm256_loadu_si256((const __m256i *)(Bp + (c * Kp + p) * 16));            \
            for (int r = 0; r < 4; r++) {                                                        \
                __m256i a = _mm256_set1_epi32(Ap[r * Kp + p]);                                   \
                for (int c = 0; c < NP; c++)                                                     \
                    acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(a, b[c]));         \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < 4; r++)                                                              \
            for (int c = 0; c < NP; c++)                                                         \
                _mm256_storeu_si256((__m256i *)(tile + r * 8 * NP + c * 8), acc[r][c]);          \
    }
VTPU_S8_TILE(3)
VTPU_S8_TILE(1)

static inline void vtpu_s8_store(const int32_t *tile, long width, int32_t *C, long i, long j0,
                                 long M, long N) {
    for (long r = 0; r < 4 && i + r < M; r++)
        for (long c = 0; c < width && j0 + c < N; c++) C[(i + r) * N + j0 + c] = tile[r * width + c];
}

/* Row quads [i0, i1) of C (i0, i1 multiples of 4). Columns go in blocks of packed B small enough
 * (~256 KB) to stay in L2 while every row quad of the chunk passes over them. */
VTPU_AVX2 static void vtpu_gemm_s8_packed_rows(const int32_t *Ap, const int16_t *Bp, int32_t *C,
                                               long i0, long i1, long M, long N, long panels,
                                               long Kp) {
    int32_t tile[4 * 24];
    long block = 8192 / Kp;
    if (block < 3) block = 3;
    for (long q0 = 0; q0 < panels; q0 += block) {
        long q1 = q0 + block < panels ? q0 + block : panels;
        for (long i = i0; i < i1; i += 4) {
            long q = q0;
            for (; q + 3 <= q1; q += 3) {
                vtpu_s8_tile_4x3(Ap + i * Kp, Bp + q * Kp * 16, Kp, tile);
                vtpu_s8_store(tile, 24, C, i, q * 8, M, N);
            }
            for (; q < q1; q++) {
                vtpu_s8_tile_4x1(Ap + i * Kp, Bp + q * Kp * 16, Kp, tile);
                vtpu_s8_store(tile, 8, C, i, q * 8, M, N);
            }
        }
    }
}

/* ---- u8 x s8 GEMM for dynamically quantised activations against packed int8 weights ---------
 * C[i, j] = sum_k A[i, k] * W[j, k], A unsigned (an activation quantised to [-63, 63] plus an
 * offset of 64, so in [1, 127]), W signed in [-127, 127]. vpmaddubsw multiplies u8 by s8 and adds
 * pairs into int16 with saturation; with A <= 127 a pair is at most 2 * 127 * 127 = 32258, so it
 * never saturates and vpmaddwd by ones widens the pairs into exact int32 sums of 4. The caller
 * subtracts 64 * sum_k W[j, k] (the offset) and applies the scales.
 * W is packed once: panels of 8 output columns; panel q, group p is 8 columns x 4 consecutive k
 * = 32 bytes = one ymm (Kq = Kp / 4 groups, Kp = K rounded up to 4, padding zero). A rows have
 * Kp bytes (lda). Rows [i0, i1) of A go to rows 0.. of C (ldc = N). */

static void vtpu_gemm_u8s8_rows_generic(const uint8_t *A, long lda, const int8_t *Wp, long Kq,
                                        int32_t *C, long i0, long i1, long N) {
    for (long i = i0; i < i1; i++)
        for (long j = 0; j < N; j++) {
            const int8_t *w = Wp + ((j / 8) * Kq * 8 + j % 8) * 4;
            const uint8_t *a = A + i * lda;
            int32_t s = 0;
            for (long p = 0; p < Kq; p++)
                for (int t = 0; t < 4; t++) s += (int32_t)a[4 * p + t] * (int32_t)w[p * 32 + t];
            C[(i - i0) * N + j] = s;
        }
}

#define VTPU_U8_TILE(NP)                                                                         \
    VTPU_AVX2 static void vtpu_u8_tile_4x##NP(const uint8_t *A, long lda, const int8_t *Wp,      \
                                             long Kq, int32_t *tile) {                           \
        const __m256i ones = _mm256_set1_epi16(1);                                               \
        __m256i acc[4][NP];                                                                      \
        for (int r = 0; r < 4; r++)                                                              \
            for (int c = 0; c < NP; c++) acc[r][c] = _mm256_setzero_si256();                     \
        for (long p = 0; p < Kq; p++) {                                                          \
            __m256i b[NP];                                                                       \
            for (int c = 0; c < NP; c++)                                                         \
                b[c] = _mm256_loadu_si256((const __m256i *)(Wp + (c * Kq + p) * 32));            \
            for (int r = 0; r < 4; r++) {                                                        \
                int32_t quad;                                                                    \
                memcpy(&quad, A + r * lda + 4 * p, 4);                                           \
                __m256i a = _mm256_set1_epi32(quad);                                             \
                for (int c = 0; c < NP; c++)                                                     \
                    acc[r][c] = _mm256_add_epi32(                                                \
                        acc[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b[c]), ones));      \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < 4; r++)                                                              \
            for (int c = 0; c < NP; c++)                                                         \
                _mm256_storeu_si256((__m256i *)(tile + r * 8 * NP + c * 8), acc[r][c]);          \
    }
VTPU_U8_TILE(3)
VTPU_U8_TILE(1)

/* i0, i1 multiples of 4; A holds rows up to i1 (rows past the real M may hold anything); only
 * rows below M are stored. */
VTPU_AVX2 static void vtpu_gemm_u8s8_rows_avx2(const uint8_t *A, long lda, const int8_t *Wp,
                                               long Kq, int32_t *C, long i0, long i1, long M,
                                               long N) {
    int32_t tile[4 * 24];
    long panels = (N + 7) / 8;
    for (long i = i0; i < i1; i += 4) {
        long q = 0;
        for (; q + 3 <= panels; q += 3) {
            vtpu_u8_tile_4x3(A + i * lda, lda, Wp + q * Kq * 32, Kq, tile);
            vtpu_s8_store(tile, 24, C, i - i0, q * 8, M - i0, N);
        }
        for (; q < panels; q++) {
            vtpu_u8_tile_4x1(A + i * lda, lda, Wp + q * Kq * 32, Kq, tile);
            vtpu_s8_store(tile, 8, C, i - i0, q * 8, M - i0, N);
        }
    }
}

/* AVX-512 VNNI: vpdpbusd does the u8 x s8 products of a group of 4 and their sum into int32 in
 * one instruction, without intermediate saturation, so it gives the AVX2 path's integers exactly.
 * Same packed layout and tiles, on 256-bit registers (AVX-512 VL). */
#define VTPU_AVX512_VNNI __attribute__((target("avx512vnni,avx512vl,avx512bw,avx512f,avx2,fma")))

/* Set with the level: the AVX-512 level needs F+BW+VL, and VNNI is a separate feature. */
static int vtpu_vnni = 0;

#define VTPU_U8_TILE_VNNI(NP)                                                                    \
    VTPU_AVX512_VNNI static void vtpu_u8_tile_vnni_4x##NP(const uint8_t *A, long lda,            \
                                                        const int8_t *Wp, long Kq,              \
                                                        int32_t *tile) {                        \
        __m256i acc[4][NP];                                                                      \
        for (int r = 0; r < 4; r++)                                                              \
            for (int c = 0; c < NP; c++) acc[r][c] = _mm256_setzero_si256();                     \
        for (long p = 0; p < Kq; p++) {                                                          \
            __m256i b[NP];                                                                       \
            for (int c = 0; c < NP; c++)                                                         \
                b[c] = _mm256_loadu_si256((const __m256i *)(Wp + (c * Kq + p) * 32));            \
            for (int r = 0; r < 4; r++) {                                                        \
                int32_t quad;                                                                    \
                memcpy(&quad, A + r * lda + 4 * p, 4);                                           \
                __m256i a = _mm256_set1_epi32(quad);                                             \
                for (int c = 0; c < NP; c++) acc[r][c] = _mm256_dpbusd_epi32(acc[r][c], a, b[c]); \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < 4; r++)                                                              \
            for (int c = 0; c < NP; c++)                                                         \
                _mm256_storeu_si256((__m256i *)(tile + r * 8 * NP + c * 8), acc[r][c]);          \
    }
VTPU_U8_TILE_VNNI(3)
VTPU_U8_TILE_VNNI(1)

VTPU_AVX512_VNNI static void vtpu_gemm_u8s8_rows_vnni(const uint8_t *A, long lda,
                                                      const int8_t *Wp, long Kq, int32_t *C,
                                                      long i0, long i1, long M, long N) {
    int32_t tile[4 * 24];
    long panels = (N + 7) / 8;
    for (long i = i0; i < i1; i += 4) {
        long q = 0;
        for (; q + 3 <= panels; q += 3) {
            vtpu_u8_tile_vnni_4x3(A + i * lda, lda, Wp + q * Kq * 32, Kq, tile);
            vtpu_s8_store(tile, 24, C, i - i0, q * 8, M - i0, N);
        }
        for (; q < panels; q++) {
            vtpu_u8_tile_vnni_4x1(A + i * lda, lda, Wp + q * Kq * 32, Kq, tile);
            vtpu_s8_store(tile, 8, C, i - i0, q * 8, M - i0, N);
        }
    }
}

static inline void vtpu_gemm_u8s8_rows(const uint8_t *A, long lda, const int8_t *Wp, long Kq,
                                       int32_t *C, long i0, long i1, long M, long N) {
    if (vtpu_level >= VTPU_LEVEL_AVX512 && vtpu_vnni)
        vtpu_gemm_u8s8_rows_vnni(A, lda, Wp, Kq, C, i0, i1, M, N);
    else if (vtpu_level >= VTPU_LEVEL_AVX2)
        vtpu_gemm_u8s8_rows_avx2(A, lda, Wp, Kq, C, i0, i1, M, N);
    else vtpu_gemm_u8s8_rows_generic(A, lda, Wp, Kq, C, i0, i1 < M ? i1 : M, N);
}

/* ---- dispatchers: one branch per call, predictable, costs nothing next to the work ---------- */

static inline float vtpu_dot(const float *a, const float *b, long n) {
    return vtpu_level >= VTPU_LEVEL_AVX2 ? vtpu_dot_avx2(a, b, n) : vtpu_dot_generic(a, b, n);
}
static inline float vtpu_sum(const float *a, long n) {
    return vtpu_level >= VTPU_LEVEL_AVX2 ? vtpu_sum_avx2(a, n) : vtpu_sum_generic(a, n);
}
static inline float vtpu_sumsq_centered(const float *a, float mean, long n) {
    return vtpu_level >= VTPU_LEVEL_AVX2 ? vtpu_sumsq_centered_avx2(a, mean, n)
                                         : vtpu_sumsq_centered_generic(a, mean, n);
}
static inline float vtpu_max(const float *a, long n) {
    return vtpu_level >= VTPU_LEVEL_AVX2 ? vtpu_max_avx2(a, n) : vtpu_max_generic(a, n);
}
static inline float vtpu_exp_shift_sum(const float *x, float *y, float shift, long n) {
    return vtpu_level >= VTPU_LEVEL_AVX2 ? vtpu_exp_shift_sum_avx2(x, y, shift, n)
                                         : vtpu_exp_shift_sum_generic(x, y, shift, n);
}
static inline void vtpu_scale(float *y, float alpha, long n) {
    if (vtpu_level >= VTPU_LEVEL_AVX2) vtpu_scale_avx2(y, alpha, n); else vtpu_scale_generic(y, alpha, n);
}
static inline void vtpu_bias_act(float *y, const float *bias, long n, int act) {
    if (vtpu_level >= VTPU_LEVEL_AVX2) vtpu_bias_act_avx2(y, bias, n, act);
    else vtpu_bias_act_generic(y, bias, n, act);
}

/* ---- attention pieces: both loops vectorise across keys or features, so neither needs a
 * horizontal sum per score (the cost of a dot product per key when the head size is small). */

/* s[j] = scale * sum_t q[t] * KT[t * ld + j] for j < n: scores against keys stored transposed */
static void vtpu_qk_generic(const float *q, const float *KT, long ld, long n, long d, float scale,
                            float *s) {
    for (long j = 0; j < n; j++) s[j] = 0.0f;
    for (long t = 0; t < d; t++) {
        const float *kr = KT + t * ld;
        for (long j = 0; j < n; j++) s[j] += q[t] * kr[j];
    }
    for (long j = 0; j < n; j++) s[j] *= scale;
}

VTPU_AVX2 static void vtpu_qk_avx2(const float *q, const float *KT, long ld, long n, long d,
                                   float scale, float *s) {
    const __m256 sc = _mm256_set1_ps(scale);
    long j = 0;
    for (; j + 32 <= n; j += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (long t = 0; t < d; t++) {
            const float *kr = KT + t * ld + j;
            __m256 qt = _mm256_broadcast_ss(q + t);
            a0 = _mm256_fmadd_ps(qt, _mm256_loadu_ps(kr), a0);
            a1 = _mm256_fmadd_ps(qt, _mm256_loadu_ps(kr + 8), a1);
            a2 = _mm256_fmadd_ps(qt, _mm256_loadu_ps(kr + 16), a2);
            a3 = _mm256_fmadd_ps(qt, _mm256_loadu_ps(kr + 24), a3);
        }
        _mm256_storeu_ps(s + j, _mm256_mul_ps(a0, sc));
        _mm256_storeu_ps(s + j + 8, _mm256_mul_ps(a1, sc));
        _mm256_storeu_ps(s + j + 16, _mm256_mul_ps(a2, sc));
        _mm256_storeu_ps(s + j + 24, _mm256_mul_ps(a3, sc));
    }
    for (; j + 8 <= n; j += 8) {
        __m256 a0 = _mm256_setzero_ps();
        for (long t = 0; t < d; t++)
            a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(q + t), _mm256_loadu_ps(KT + t * ld + j), a0);
        _mm256_storeu_ps(s + j, _mm256_mul_ps(a0, sc));
    }
    for (; j < n; j++) {
        float a = 0.0f;
        for (long t = 0; t < d; t++) a += q[t] * KT[t * ld + j];
        s[j] = a * scale;
    }
}

/* out[0:d] = sum_{j<n} p[j] * V[j * d : j * d + d] */
static void vtpu_pv_generic(const float *p, const float *V, long n, long d, float *out) {
    for (long t = 0; t < d; t++) out[t] = 0.0f;
    for (long j = 0; j < n; j++)
        for (long t = 0; t < d; t++) out[t] += p[j] * V[j * d + t];
}

VTPU_AVX2 static void vtpu_pv_avx2(const float *p, const float *V, long n, long d, float *out) {
    long c = 0;
    for (; c + 32 <= d; c += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (long j = 0; j < n; j++) {
            const float *vr = V + j * d + c;
            __m256 pj = _mm256_broadcast_ss(p + j);
            a0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr), a0);
            a1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 8), a1);
            a2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 16), a2);
            a3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 24), a3);
        }
        _mm256_storeu_ps(out + c, a0);
        _mm256_storeu_ps(out + c + 8, a1);
        _mm256_storeu_ps(out + c + 16, a2);
        _mm256_storeu_ps(out + c + 24, a3);
    }
    for (; c + 8 <= d; c += 8) {
        __m256 a0 = _mm256_setzero_ps();
        for (long j = 0; j < n; j++)
            a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), _mm256_loadu_ps(V + j * d + c), a0);
        _mm256_storeu_ps(out + c, a0);
    }
    for (; c < d; c++) {
        float a = 0.0f;
        for (long j = 0; j < n; j++) a += p[j] * V[j * d + c];
        out[c] = a;
    }
}

static inline void vtpu_qk(const float *q, const float *KT, long ld, long n, long d, float scale,
                           float *s) {
    if (vtpu_level >= VTPU_LEVEL_AVX2) vtpu_qk_avx2(q, KT, ld, n, d, scale, s);
    else vtpu_qk_generic(q, KT, ld, n, d, scale, s);
}
static inline void vtpu_pv(const float *p, const float *V, long n, long d, float *out) {
    if (vtpu_level >= VTPU_LEVEL_AVX2) vtpu_pv_avx2(p, V, n, d, out);
    else vtpu_pv_generic(p, V, n, d, out);
}

static inline void vtpu_set_level(int level) {
    vtpu_level = level;
    vtpu_vnni = level >= VTPU_LEVEL_AVX512 && vtpu_detect().avx512_vnni;
}
static inline int vtpu_get_level(void) { return vtpu_level; }

#endif
