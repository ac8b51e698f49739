/* CPU feature detection and the vector primitives the kernels are built from.
 *
 * The build passes no -march (the wheel must run on any x86-64), so every AVX2 / AVX-512 routine
 * carries a function-level target attribute and is chosen at run time through `vtpu_level`. The
 * primitives here have AVX2 bodies, the s8 x s8 GEMM an AVX-512 VNNI one and the bf16 GEMM an
 * AVX-512 BF16 one (vdpbf16ps), and both an AMX one (tdpbusd, tdpbf16ps); the packed Linear kernels
 * (_packed.h) have AVX-512 bodies.
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
#ifdef VTPU_AMX_EMULATE /* tests only: the AMX kernels on a software model of the tiles */
#include "_amx_emulate.h"
#endif
#include <sys/syscall.h>
#include <unistd.h>

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

/* ---- AMX (Intel Sapphire Rapids and later): shared by the int8 and bf16 tile kernels -------
 * The tile configuration (palette 1: 8 tiles, each up to 16 rows x 64 bytes) is per thread and
 * libraries release it, so each kernel call loads its own (docs PERFORMANCE.md). */
typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} vtpu_tile_config;

/* 0 after vtpu_set_amx(0): tests compare the AMX kernels with the AVX-512 ones. */
static int vtpu_amx_wanted = 1;

/* Linux hands out AMX's 8 KB of tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XFEATURE_XTILEDATA), once per process; 1 if granted. */
static int vtpu_amx_permitted(void) {
    static int granted = -1;
    if (granted < 0) granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return granted;
}

/* Tiles 0..7 all 16 rows; tile t's row is colsb[t] bytes. */
static inline void vtpu_tile_config_fill(vtpu_tile_config *cfg, const uint16_t colsb[8]) {
    memset(cfg, 0, sizeof *cfg);
    cfg->palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg->rows[t] = 16;
        cfg->colsb[t] = colsb[t];
    }
}

/* ldtilecfg of the whole 64-byte config. GCC 12's _tile_loadconfig declares its operand as one
 * pointer (8 bytes), so the compiler may treat the stores filling the rest of the config as
 * dead; this operand is the struct. (Under the tests' tile model, the model's loader.) */
static inline void vtpu_tile_loadconfig(const vtpu_tile_config *cfg) {
#ifdef VTPU_AMX_EMULATE
    _tile_loadconfig(cfg);
#else
    __asm__ volatile("ldtilecfg %0" ::"m"(*cfg));
#endif
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

/* ---- s8 x s8 GEMM with per-group weight scales, for dynamically quantised activations -------
 * F[i, j] = sum_g ws[g, j] * sum_{k in group g} A[i, k] * W[j, k], A and W signed in [-127, 127].
 * Each group's integer sum is exact in int32 (|sum| <= 128 * 127 * 127 < 2^24, so its float
 * conversion is exact too), and the groups are folded into fp32 with one fused multiply-add each,
 * in order, on every path: the generic, AVX2 and VNNI paths give the same bits.
 * W is packed once (vtpu.kernels.pack_int8_weight): panels of 8 output columns; panel q, quad p
 * is 8 columns x 4 consecutive k = 32 bytes = one ymm (Kq quads, K padded to 4 with zeros). A
 * group is gq quads; ws and gsum are (G, ldw) with ldw = 8 * panels; gsum = 128 * the group's
 * sum of W (what VNNI's unsigned operand adds). A rows have lda bytes, zero-padded; rows [0,
 * rows) go to rows 0.. of C (float, ldc). The caller applies the activation scale and zero
 * point. */

static void vtpu_gemm_q8_rows_generic(const int8_t *A, long lda, const int8_t *Wp, long Kq,
                                      long gq, const float *ws, long ldw, float *C, long ldc,
                                      long rows, long N) {
    for (long i = 0; i < rows; i++)
        for (long j = 0; j < N; j++) {
            const int8_t *w = Wp + ((j / 8) * Kq * 8 + j % 8) * 4;
            const int8_t *a = A + i * lda;
            float f = 0.0f;
            for (long g0 = 0; g0 < Kq; g0 += gq) {
                long g1 = g0 + gq < Kq ? g0 + gq : Kq;
                int32_t s = 0;
                for (long p = g0; p < g1; p++)
                    for (int t = 0; t < 4; t++) s += (int32_t)a[4 * p + t] * (int32_t)w[p * 32 + t];
                f = fmaf((float)s, ws[(g0 / gq) * ldw + j], f);
            }
            C[i * ldc + j] = f;
        }
}

static inline void vtpu_q8_store(const float *tile, long width, float *C, long ldc, long rows,
                                 long cols) {
    for (long r = 0; r < 4 && r < rows; r++)
        for (long c = 0; c < width && c < cols; c++) C[r * ldc + c] = tile[r * width + c];
}

/* AVX2: vpmaddubsw multiplies u8 by s8, so the products go as |w| x (a with w's sign)
 * (vpsignb); a pair is then at most 2 * 127 * 127 = 32258 and never saturates its int16, and
 * vpmaddwd with ones widens the pairs to int32. A tile is 4 rows x 2 panels (16 columns): 8
 * accumulators, |w| of both panels, the broadcast activations, two products and the ones = 14
 * of the 16 ymm. Written with intrinsics, GCC 12 kept 4 of the 8 accumulators on the stack (a
 * load and a store per accumulator per step), so the k loop's body is assembly; vpsignb reads w
 * from memory (L1) instead of a register. Groups fold into `out` (ldo floats a row) as they
 * end: the first one by a multiply (= the fused multiply-add onto 0 of the other paths), the
 * rest by fused multiply-adds, in order.
 * The ceiling on AMD Zen 3 (measured): vpmaddubsw and vpmaddwd issue 2 a cycle between them and
 * vpsignb competes with them, so sign + maddubs + madd + add runs ~24 MACs a cycle against fp32
 * FMA's 16; this tile reaches 18-23 in L1 (on a shared machine). 7-bit operands, which would
 * drop vpsignb (an unsigned operand that cannot saturate), cost too much accuracy: min cosine
 * 0.998 on the varied set. */

/* One row of one k quad: a = the row's 4 bytes on every lane, then |w| x (a with w's sign) for
 * both panels (panel 0 at %[w], panel 1 %[wstep] further), pairs widened and added to the row's
 * accumulators c0, c1. */
#define VTPU_Q8_AVX2_ROW(a, c0, c1)                                                              \
    "vpbroadcastd " a ", %[a]\n\t"                                                               \
    "vpsignb (%[w]), %[a], %[t0]\n\t"                                                            \
    "vpsignb (%[w],%[wstep]), %[a], %[t1]\n\t"                                                   \
    "vpmaddubsw %[t0], %[b0], %[t0]\n\t"                                                         \
    "vpmaddubsw %[t1], %[b1], %[t1]\n\t"                                                         \
    "vpmaddwd %[ones], %[t0], %[t0]\n\t"                                                         \
    "vpmaddwd %[ones], %[t1], %[t1]\n\t"                                                         \
    "vpaddd %[t0], %[" c0 "], %[" c0 "]\n\t"                                                     \
    "vpaddd %[t1], %[" c1 "], %[" c1 "]\n\t"

VTPU_AVX2 static inline void vtpu_q8_fold_avx2(__m256i acc, const float *scale, float *o,
                                               int first) {
    __m256 f = _mm256_cvtepi32_ps(acc), sc = _mm256_loadu_ps(scale);
    _mm256_storeu_ps(o, first ? _mm256_mul_ps(f, sc) : _mm256_fmadd_ps(f, sc, _mm256_loadu_ps(o)));
}

VTPU_AVX2 static void vtpu_q8_tile_avx2_4x2(const int8_t *A, long lda, const int8_t *Wp,
                                            long Kq, long gq, const float *ws, long ldw,
                                            float *out, long ldo) {
    const __m256i ones = _mm256_set1_epi16(1);
    const long wstep = Kq * 32, lda3 = 3 * lda;
    for (long g0 = 0; g0 < Kq; g0 += gq) {
        long g1 = g0 + gq < Kq ? g0 + gq : Kq;
        __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
                c21 = c00, c30 = c00, c31 = c00, b0, b1, a, t0, t1;
        const int8_t *a0 = A + 4 * g0, *w = Wp + g0 * 32;
        for (long p = g0; p < g1; p++, a0 += 4, w += 32)
            __asm__("vpabsb (%[w]), %[b0]\n\t"
                    "vpabsb (%[w],%[wstep]), %[b1]\n\t"
                    VTPU_Q8_AVX2_ROW("(%[a0])", "c00", "c01")
                    VTPU_Q8_AVX2_ROW("(%[a0],%[lda],1)", "c10", "c11")
                    VTPU_Q8_AVX2_ROW("(%[a0],%[lda],2)", "c20", "c21")
                    VTPU_Q8_AVX2_ROW("(%[a0],%[lda3],1)", "c30", "c31")
                    : [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11),
                      [c20] "+x"(c20), [c21] "+x"(c21), [c30] "+x"(c30), [c31] "+x"(c31),
                      [b0] "=&x"(b0), [b1] "=&x"(b1), [a] "=&x"(a), [t0] "=&x"(t0),
                      [t1] "=&x"(t1)
                    : [w] "r"(w), [wstep] "r"(wstep), [a0] "r"(a0), [lda] "r"(lda),
                      [lda3] "r"(lda3), [ones] "x"(ones)
                    : "memory");
        const float *sg = ws + (g0 / gq) * ldw;
        int first = g0 == 0;
        vtpu_q8_fold_avx2(c00, sg, out, first);
        vtpu_q8_fold_avx2(c01, sg + 8, out + 8, first);
        vtpu_q8_fold_avx2(c10, sg, out + ldo, first);
        vtpu_q8_fold_avx2(c11, sg + 8, out + ldo + 8, first);
        vtpu_q8_fold_avx2(c20, sg, out + 2 * ldo, first);
        vtpu_q8_fold_avx2(c21, sg + 8, out + 2 * ldo + 8, first);
        vtpu_q8_fold_avx2(c30, sg, out + 3 * ldo, first);
        vtpu_q8_fold_avx2(c31, sg + 8, out + 3 * ldo + 8, first);
    }
}

/* The last odd panel: 4 rows x 8 columns, intrinsics (few accumulators, no spill). */
VTPU_AVX2 static void vtpu_q8_tile_avx2_4x1(const int8_t *A, long lda, const int8_t *Wp,
                                            long Kq, long gq, const float *ws, long ldw,
                                            float *out, long ldo) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (long g0 = 0; g0 < Kq; g0 += gq) {
        long g1 = g0 + gq < Kq ? g0 + gq : Kq;
        __m256i acc[4];
        for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_si256();
        for (long p = g0; p < g1; p++) {
            __m256i b = _mm256_loadu_si256((const __m256i *)(Wp + p * 32));
            __m256i babs = _mm256_abs_epi8(b);
            for (int r = 0; r < 4; r++) {
                int32_t quad;
                memcpy(&quad, A + r * lda + 4 * p, 4);
                __m256i a = _mm256_sign_epi8(_mm256_set1_epi32(quad), b);
                acc[r] = _mm256_add_epi32(acc[r],
                                          _mm256_madd_epi16(_mm256_maddubs_epi16(babs, a), ones));
            }
        }
        for (int r = 0; r < 4; r++)
            vtpu_q8_fold_avx2(acc[r], ws + (g0 / gq) * ldw, out + r * ldo, g0 == 0);
    }
}

/* Full tiles fold straight into C; ragged ones (the last rows or columns) go through a buffer.
 * Panel pairs outer instead (a pair stays in L1 across the block's rows) measured no faster at
 * MiniLM's shapes, with 16 or 48 rows a block. */
VTPU_AVX2 static void vtpu_gemm_q8_rows_avx2(const int8_t *A, long lda, const int8_t *Wp,
                                             long Kq, long gq, const float *ws, long ldw,
                                             float *C, long ldc, long rows, long N) {
    float tile[4 * 16];
    long panels = (N + 7) / 8;
    for (long i = 0; i < rows; i += 4) {
        const int8_t *a = A + i * lda;
        long q = 0;
        for (; q + 2 <= panels; q += 2) {
            const int8_t *w = Wp + q * Kq * 32;
            if (i + 4 <= rows && q * 8 + 16 <= N) {
                vtpu_q8_tile_avx2_4x2(a, lda, w, Kq, gq, ws + q * 8, ldw, C + i * ldc + q * 8,
                                      ldc);
            } else {
                vtpu_q8_tile_avx2_4x2(a, lda, w, Kq, gq, ws + q * 8, ldw, tile, 16);
                vtpu_q8_store(tile, 16, C + i * ldc + q * 8, ldc, rows - i, N - q * 8);
            }
        }
        for (; q < panels; q++) {
            vtpu_q8_tile_avx2_4x1(a, lda, Wp + q * Kq * 32, Kq, gq, ws + q * 8, ldw, tile, 8);
            vtpu_q8_store(tile, 8, C + i * ldc + q * 8, ldc, rows - i, N - q * 8);
        }
    }
}

/* AVX-512 VNNI: vpdpbusd takes u8 x s8 with no intermediate saturation; a + 128 (a xor 0x80,
 * done once on the scratch block A) makes the activations unsigned, and subtracting the
 * group's 128 * sum(W) gives the AVX2 path's integers exactly. 256-bit registers (AVX-512 VL),
 * 32 of them: 8 x 3 tiles, each step 3 weight loads and 8 broadcasts from memory for 24
 * vpdpbusd (2 a cycle on Zen 4, as many multiply-adds as 1 zmm vpdpbusd); groups fold into C
 * as they end. */
#define VTPU_AVX512_VNNI __attribute__((target("avx512vnni,avx512vl,avx512bw,avx512f,avx2,fma")))

/* Set with the level: the AVX-512 level needs F+BW+VL, and VNNI is a separate feature. */
static int vtpu_vnni = 0;

/* One row of one k quad in the 8 x 3 tile: the row's 4 bytes on every lane of ymm3, multiplied
 * with the three panels' quads (ymm0-2) into the row's accumulators. */
#define VTPU_Q8_VNNI_ROW(a, c0, c1, c2)                                                          \
    "vpbroadcastd " a ", %%ymm3\n\t"                                                             \
    "vpdpbusd %%ymm0, %%ymm3, %%ymm" #c0 "\n\t"                                                  \
    "vpdpbusd %%ymm1, %%ymm3, %%ymm" #c1 "\n\t"                                                  \
    "vpdpbusd %%ymm2, %%ymm3, %%ymm" #c2 "\n\t"

/* One group of an 8-row x 3-panel tile: `steps` k quads from U's rows (lda bytes apart) and
 * the three panels at w (wstep bytes apart), the 24 int32 sums minus the group's offsets
 * (acc starts at -off, the same integers as subtracting at the end) stored to buf (row r,
 * panel c at buf + (r * 3 + c) * 8). Written with intrinsics, GCC 12 copied accumulators
 * between registers and to the stack at every step (37 % of vpdpbusd's peak on Zen 4), so the
 * body is assembly over fixed registers: ymm8-31 the accumulators, ymm0-2 the weights, ymm3
 * the broadcast row. Rows 0-7 are a0, a0+lda, a0+2lda, a0+lda3, a0+4lda, a5, a0+2lda3,
 * a5+2lda (a5 = a0 + 5 lda). */
VTPU_AVX512_VNNI static void vtpu_q8_vnni_8x3_group(const uint8_t *a0, long lda,
                                                    const int8_t *w, long wstep, long steps,
                                                    const int32_t *off, int32_t *buf) {
    const long lda3 = 3 * lda;
    const uint8_t *a5 = a0 + 5 * lda;
    const int8_t *wend = w + steps * 32;
    __asm__ volatile(
        "vpxord %%ymm3, %%ymm3, %%ymm3\n\t"
        "vpsubd (%[off]), %%ymm3, %%ymm0\n\t"
        "vpsubd 32(%[off]), %%ymm3, %%ymm1\n\t"
        "vpsubd 64(%[off]), %%ymm3, %%ymm2\n\t"
#define VTPU_Q8_VNNI_INIT(c0, c1, c2)                                                            \
    "vmovdqa32 %%ymm0, %%ymm" #c0 "\n\t"                                                         \
    "vmovdqa32 %%ymm1, %%ymm" #c1 "\n\t"                                                         \
    "vmovdqa32 %%ymm2, %%ymm" #c2 "\n\t"
        VTPU_Q8_VNNI_INIT(8, 9, 10) VTPU_Q8_VNNI_INIT(11, 12, 13) VTPU_Q8_VNNI_INIT(14, 15, 16)
        VTPU_Q8_VNNI_INIT(17, 18, 19) VTPU_Q8_VNNI_INIT(20, 21, 22)
        VTPU_Q8_VNNI_INIT(23, 24, 25) VTPU_Q8_VNNI_INIT(26, 27, 28)
        VTPU_Q8_VNNI_INIT(29, 30, 31)
#undef VTPU_Q8_VNNI_INIT
        "1:\n\t"
        "vmovdqu (%[w]), %%ymm0\n\t"
        "vmovdqu (%[w],%[wstep],1), %%ymm1\n\t"
        "vmovdqu (%[w],%[wstep],2), %%ymm2\n\t"
        VTPU_Q8_VNNI_ROW("(%[a0])", 8, 9, 10)
        VTPU_Q8_VNNI_ROW("(%[a0],%[lda],1)", 11, 12, 13)
        VTPU_Q8_VNNI_ROW("(%[a0],%[lda],2)", 14, 15, 16)
        VTPU_Q8_VNNI_ROW("(%[a0],%[lda3],1)", 17, 18, 19)
        VTPU_Q8_VNNI_ROW("(%[a0],%[lda],4)", 20, 21, 22)
        VTPU_Q8_VNNI_ROW("(%[a5])", 23, 24, 25)
        VTPU_Q8_VNNI_ROW("(%[a0],%[lda3],2)", 26, 27, 28)
        VTPU_Q8_VNNI_ROW("(%[a5],%[lda],2)", 29, 30, 31)
        "add $4, %[a0]\n\t"
        "add $4, %[a5]\n\t"
        "add $32, %[w]\n\t"
        "cmp %[wend], %[w]\n\t"
        "jne 1b\n\t"
#define VTPU_Q8_VNNI_STORE(c, at) "vmovdqu32 %%ymm" #c ", " #at "(%[buf])\n\t"
        VTPU_Q8_VNNI_STORE(8, 0) VTPU_Q8_VNNI_STORE(9, 32) VTPU_Q8_VNNI_STORE(10, 64)
        VTPU_Q8_VNNI_STORE(11, 96) VTPU_Q8_VNNI_STORE(12, 128) VTPU_Q8_VNNI_STORE(13, 160)
        VTPU_Q8_VNNI_STORE(14, 192) VTPU_Q8_VNNI_STORE(15, 224) VTPU_Q8_VNNI_STORE(16, 256)
        VTPU_Q8_VNNI_STORE(17, 288) VTPU_Q8_VNNI_STORE(18, 320) VTPU_Q8_VNNI_STORE(19, 352)
        VTPU_Q8_VNNI_STORE(20, 384) VTPU_Q8_VNNI_STORE(21, 416) VTPU_Q8_VNNI_STORE(22, 448)
        VTPU_Q8_VNNI_STORE(23, 480) VTPU_Q8_VNNI_STORE(24, 512) VTPU_Q8_VNNI_STORE(25, 544)
        VTPU_Q8_VNNI_STORE(26, 576) VTPU_Q8_VNNI_STORE(27, 608) VTPU_Q8_VNNI_STORE(28, 640)
        VTPU_Q8_VNNI_STORE(29, 672) VTPU_Q8_VNNI_STORE(30, 704) VTPU_Q8_VNNI_STORE(31, 736)
#undef VTPU_Q8_VNNI_STORE
        : [a0] "+r"(a0), [a5] "+r"(a5), [w] "+r"(w)
        : [wend] "r"(wend), [wstep] "r"(wstep), [lda] "r"(lda), [lda3] "r"(lda3),
          [off] "r"(off), [buf] "r"(buf)
        : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm8", "xmm9", "xmm10", "xmm11",
          "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20",
          "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29",
          "xmm30", "xmm31");
}

/* 8 rows x 3 panels over all of K into `out` (ldo floats a row): each group's sums fold in
 * as it ends, the first by a multiply and the rest by fused multiply-adds, in order (the
 * AVX2 path's order: the same bits). */
VTPU_AVX512_VNNI static void vtpu_q8_tile_vnni_8x3(const uint8_t *A, long lda, const int8_t *Wp,
                                                   long Kq, long gq, const float *ws,
                                                   const int32_t *gsum, long ldw, float *out,
                                                   long ldo) {
    int32_t buf[8 * 24] __attribute__((aligned(32)));
    for (long g0 = 0; g0 < Kq; g0 += gq) {
        long g1 = g0 + gq < Kq ? g0 + gq : Kq, g = g0 / gq;
        vtpu_q8_vnni_8x3_group(A + 4 * g0, lda, Wp + g0 * 32, Kq * 32, g1 - g0, gsum + g * ldw,
                               buf);
        for (int c = 0; c < 3; c++) {
            __m256 sc = _mm256_loadu_ps(ws + g * ldw + c * 8);
            for (int r = 0; r < 8; r++) {
                __m256 f = _mm256_cvtepi32_ps(_mm256_load_si256((const __m256i *)(buf + (r * 3 + c) * 8)));
                float *o = out + r * ldo + c * 8;
                _mm256_storeu_ps(o, g0 == 0 ? _mm256_mul_ps(f, sc)
                                            : _mm256_fmadd_ps(f, sc, _mm256_loadu_ps(o)));
            }
        }
    }
}

/* The last panels (fewer than 3): 8 rows x 1 panel, intrinsics (few accumulators, no spill). */
VTPU_AVX512_VNNI static void vtpu_q8_tile_vnni_8x1(const uint8_t *A, long lda, const int8_t *Wp,
                                                   long Kq, long gq, const float *ws,
                                                   const int32_t *gsum, long ldw, float *tile) {
    for (long g0 = 0; g0 < Kq; g0 += gq) {
        long g1 = g0 + gq < Kq ? g0 + gq : Kq, g = g0 / gq;
        __m256i acc[8];
        for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_si256();
        for (long p = g0; p < g1; p++) {
            __m256i b = _mm256_loadu_si256((const __m256i *)(Wp + p * 32));
            for (int r = 0; r < 8; r++) {
                int32_t quad;
                memcpy(&quad, A + r * lda + 4 * p, 4);
                acc[r] = _mm256_dpbusd_epi32(acc[r], _mm256_set1_epi32(quad), b);
            }
        }
        __m256 sc = _mm256_loadu_ps(ws + g * ldw);
        __m256i off = _mm256_loadu_si256((const __m256i *)(gsum + g * ldw));
        for (int r = 0; r < 8; r++) {
            __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r], off));
            float *o = tile + r * 8;
            _mm256_storeu_ps(o, g0 == 0 ? _mm256_mul_ps(f, sc)
                                        : _mm256_fmadd_ps(f, sc, _mm256_loadu_ps(o)));
        }
    }
}

static inline void vtpu_q8_store_rows(const float *tile, long height, long width, float *C,
                                      long ldc, long rows, long cols) {
    for (long r = 0; r < height && r < rows; r++)
        for (long c = 0; c < width && c < cols; c++) C[r * ldc + c] = tile[r * width + c];
}

/* A is scratch: its bytes are flipped to u8 in place. It holds zeroed rows up to a multiple of
 * 8 past `rows`. Full tiles fold straight into C; ragged ones go through a buffer. */
VTPU_AVX512_VNNI static void vtpu_gemm_q8_rows_vnni(int8_t *A, long lda, const int8_t *Wp,
                                                    long Kq, long gq, const float *ws,
                                                    const int32_t *gsum, long ldw, float *C,
                                                    long ldc, long rows, long N) {
    float tile[8 * 24];
    long padded = (rows + 7) / 8 * 8, panels = (N + 7) / 8;
    for (long i = 0; i < padded * lda; i++) A[i] ^= (int8_t)0x80;
    const uint8_t *U = (const uint8_t *)A;
    for (long i = 0; i < rows; i += 8) {
        long q = 0;
        for (; q + 3 <= panels; q += 3) {
            const int8_t *w = Wp + q * Kq * 32;
            if (i + 8 <= rows && q * 8 + 24 <= N) {
                vtpu_q8_tile_vnni_8x3(U + i * lda, lda, w, Kq, gq, ws + q * 8, gsum + q * 8,
                                      ldw, C + i * ldc + q * 8, ldc);
            } else {
                vtpu_q8_tile_vnni_8x3(U + i * lda, lda, w, Kq, gq, ws + q * 8, gsum + q * 8,
                                      ldw, tile, 24);
                vtpu_q8_store_rows(tile, 8, 24, C + i * ldc + q * 8, ldc, rows - i, N - q * 8);
            }
        }
        for (; q < panels; q++) {
            vtpu_q8_tile_vnni_8x1(U + i * lda, lda, Wp + q * Kq * 32, Kq, gq, ws + q * 8,
                                  gsum + q * 8, ldw, tile);
            vtpu_q8_store_rows(tile, 8, 8, C + i * ldc + q * 8, ldc, rows - i, N - q * 8);
        }
    }
}

/* AMX-INT8: the VNNI path's integers on tiles. tdpbusd takes u8 x s8 like vpdpbusd, so A is
 * flipped to a + 128 the same way and the group's 128 * sum(W) subtracted. A panel's 16
 * consecutive quads are a 16-row x 32-byte B tile as packed (8 columns x 4 k), 16 rows of A by
 * 64 k an A tile; C is 16 rows x 4 panels (4 tiles of 16 x 8 int32), zeroed per group; at a
 * group's end each tile goes through a 512-byte buffer and is folded into the fp32 sums with
 * one fused multiply-add per group, in order: the same bits as every other path. Needs Kq and
 * gq multiples of 16 (K and the group multiples of 64) and 1 to 16 rows (linear_dynamic_int8's
 * blocks are 16); otherwise the VNNI body runs. The A and C tiles are configured with the real
 * row count, so A is read (and flipped) only in its `rows` rows: the dispatcher promises zeroed
 * rows only up to a multiple of 8, and 16-row tiles read up to 8 rows past that.
 * Not run on the machines this was written on (AMD: no AMX); tests/runtime/test_int8.py runs
 * it where the CPU has AMX and skips with the reason elsewhere, test_amx_emulated.py runs it on
 * a software model of the tiles (_amx_emulate.h) wherever the CPU has AVX-512 VNNI, and
 * vtpu.kernels checks it against VNNI at its first call. */
#define VTPU_AMX_INT8 \
    __attribute__((target("amx-tile,amx-int8,avx512vnni,avx512vl,avx512bw,avx512f,avx2,fma")))

/* 1 when AMX-INT8 runs linear_dynamic_int8 (set with the level, like vtpu_amx_bf16). */
static int vtpu_amx_int8 = 0;

/* Fold a rows x 8 int32 tile (in buf) into rows x 8 fp32 sums (ld floats a row). */
VTPU_AMX_INT8 static void vtpu_amx_q8_fold(const int32_t *buf, const float *ws,
                                           const int32_t *gsum, float *sums, long ld, long rows) {
    __m256 sc = _mm256_loadu_ps(ws);
    __m256i off = _mm256_loadu_si256((const __m256i *)gsum);
    for (long r = 0; r < rows; r++) {
        __m256i acc = _mm256_loadu_si256((const __m256i *)(buf + r * 8));
        float *o = sums + r * ld;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc, off)), sc,
                                            _mm256_loadu_ps(o)));
    }
}

/* Up to 4 panels (np) of 8 columns from panel q: tiles 0..3 are C, 4 is A, 5 is B. */
VTPU_AMX_INT8 static void vtpu_amx_q8_block(const uint8_t *U, long lda, const int8_t *Wp,
                                            long Kq, long gq, const float *ws,
                                            const int32_t *gsum, long ldw, long q, int np,
                                            float *sums, long rows) {
    int32_t buf[16 * 8] __attribute__((aligned(64)));
    for (long t = 0; t < rows * 32; t++) sums[t] = 0.0f;
    for (long g0 = 0; g0 < Kq; g0 += gq) {
        long g1 = g0 + gq < Kq ? g0 + gq : Kq;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (long p = g0; p < g1; p += 16) {
            const int8_t *w = Wp + (q * Kq + p) * 32;
            _tile_loadd(4, U + 4 * p, lda);
            _tile_loadd(5, w, 32);
            _tile_dpbusd(0, 4, 5);
            if (np > 1) {
                _tile_loadd(5, w + Kq * 32, 32);
                _tile_dpbusd(1, 4, 5);
            }
            if (np > 2) {
                _tile_loadd(5, w + 2 * Kq * 32, 32);
                _tile_dpbusd(2, 4, 5);
            }
            if (np > 3) {
                _tile_loadd(5, w + 3 * Kq * 32, 32);
                _tile_dpbusd(3, 4, 5);
            }
        }
        long g = g0 / gq, col = q * 8;
        _tile_stored(0, buf, 32);
        vtpu_amx_q8_fold(buf, ws + g * ldw + col, gsum + g * ldw + col, sums, 32, rows);
        if (np > 1) {
            _tile_stored(1, buf, 32);
            vtpu_amx_q8_fold(buf, ws + g * ldw + col + 8, gsum + g * ldw + col + 8, sums + 8, 32,
                             rows);
        }
        if (np > 2) {
            _tile_stored(2, buf, 32);
            vtpu_amx_q8_fold(buf, ws + g * ldw + col + 16, gsum + g * ldw + col + 16, sums + 16,
                             32, rows);
        }
        if (np > 3) {
            _tile_stored(3, buf, 32);
            vtpu_amx_q8_fold(buf, ws + g * ldw + col + 24, gsum + g * ldw + col + 24, sums + 24,
                             32, rows);
        }
    }
}

/* A is scratch (flipped to u8 in place), rows [0, rows) read; rows [0, rows) of C are
 * written. */
VTPU_AMX_INT8 static void vtpu_gemm_q8_rows_amx(int8_t *A, long lda, const int8_t *Wp, long Kq,
                                                long gq, const float *ws, const int32_t *gsum,
                                                long ldw, float *C, long ldc, long rows,
                                                long N) {
    static const uint16_t colsb[8] = {32, 32, 32, 32, 64, 32, 32, 32}; /* 6, 7 unused */
    vtpu_tile_config cfg;
    vtpu_tile_config_fill(&cfg, colsb);
    for (int t = 0; t < 5; t++) cfg.rows[t] = (uint8_t)rows; /* C (0..3) and A (4) */
    vtpu_tile_loadconfig(&cfg);
    float sums[16 * 32];
    long panels = (N + 7) / 8;
    for (long i = 0; i < rows * lda; i++) A[i] ^= (int8_t)0x80;
    for (long q = 0; q < panels; q += 4) {
        int np = panels - q < 4 ? (int)(panels - q) : 4;
        vtpu_amx_q8_block((const uint8_t *)A, lda, Wp, Kq, gq, ws, gsum, ldw, q, np, sums,
                          rows);
        long cols = N - q * 8 < 32 ? N - q * 8 : 32;
        for (long r = 0; r < rows; r++) memcpy(C + r * ldc + q * 8, sums + r * 32, cols * 4);
    }
    _tile_release();
}

/* 1 when linear_dynamic_int8 runs on AMX tiles (for K and its group multiples of 64). */
static inline int vtpu_amx_int8_active(void) {
    return vtpu_level >= VTPU_LEVEL_AVX512 && vtpu_vnni && vtpu_amx_int8;
}

/* A is scratch (the VNNI path flips its sign bits) and holds zeroed rows up to a multiple of 8
 * past `rows`. */
static inline void vtpu_gemm_q8_rows(int8_t *A, long lda, const int8_t *Wp, long Kq, long gq,
                                     const float *ws, const int32_t *gsum, long ldw, float *C,
                                     long ldc, long rows, long N) {
    if (vtpu_amx_int8_active() && Kq % 16 == 0 && gq % 16 == 0 && rows > 0 && rows <= 16)
        vtpu_gemm_q8_rows_amx(A, lda, Wp, Kq, gq, ws, gsum, ldw, C, ldc, rows, N);
    else if (vtpu_level >= VTPU_LEVEL_AVX512 && vtpu_vnni)
        vtpu_gemm_q8_rows_vnni(A, lda, Wp, Kq, gq, ws, gsum, ldw, C, ldc, rows, N);
    else if (vtpu_level >= VTPU_LEVEL_AVX2)
        vtpu_gemm_q8_rows_avx2(A, lda, Wp, Kq, gq, ws, ldw, C, ldc, rows, N);
    else vtpu_gemm_q8_rows_generic(A, lda, Wp, Kq, gq, ws, ldw, C, ldc, rows, N);
}

/* One activation row of linear_dynamic_int8 to int8 (q[j] = 0 where keep[j] is 0, the fp32
 * outlier channels): centre c = (min + max) / 2 and step s = (max - min) / 254 over the kept
 * channels, q = rint((x - c) / s) in [-127, 127]. The vector body does the same operations
 * in the same order (subtract, multiply by 1 / s, round to nearest even), so every level gives
 * the same bytes. */
static inline void vtpu_q8_row_params(float lo, float hi, float *step, float *centre,
                                      float *inv) {
    if (lo > hi) lo = hi = 0.0f; /* no int8 channel: every input is an fp32 outlier */
    *centre = 0.5f * (lo + hi);
    *step = (hi - lo) / 254.0f;
    *inv = *step > 0.0f ? 1.0f / *step : 0.0f;
}

static inline int8_t vtpu_q8_one(float v, float c, float inv) {
    float q = rintf((v - c) * inv);
    q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
    return (int8_t)(int)q;
}

/* A row holding NaN or inf (in any channel, kept or not): its levels are zeros and the
 * quantiser returns 1, so the caller refuses x without a separate pass to check it. */
static int vtpu_q8_refuse_row(long k, int8_t *q, float *step, float *centre) {
    memset(q, 0, k);
    *step = *centre = 0.0f;
    return 1;
}

static int vtpu_q8_quantize_generic(const float *x, long k, const uint8_t *keep, int8_t *q,
                                    float *step, float *centre) {
    float lo = INFINITY, hi = -INFINITY, inv;
    for (long j = 0; j < k; j++) {
        if (!isfinite(x[j])) return vtpu_q8_refuse_row(k, q, step, centre);
        if (keep[j]) { lo = x[j] < lo ? x[j] : lo; hi = x[j] > hi ? x[j] : hi; }
    }
    vtpu_q8_row_params(lo, hi, step, centre, &inv);
    for (long j = 0; j < k; j++) q[j] = keep[j] ? vtpu_q8_one(x[j], *centre, inv) : 0;
    return 0;
}

/* 8 levels rint((x - c) / s) clamped to [-127, 127], as floats (vtpu_q8_one's operations) */
VTPU_AVX2 static inline __m256 vtpu_q8_levels_avx2(const float *x, __m256 vc, __m256 vi) {
    __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x), vc), vi);
    v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
}

VTPU_AVX2 static int vtpu_q8_quantize_avx2(const float *x, long k, const uint8_t *keep,
                                           int8_t *q, float *step, float *centre) {
    /* v - v is +0 for finite v and NaN for NaN or inf: any bit left in `nonfinite` is one */
    __m256 vlo = _mm256_set1_ps(INFINITY), vhi = _mm256_set1_ps(-INFINITY),
           nonfinite = _mm256_setzero_ps();
    const __m256i zero = _mm256_setzero_si256();
    long j = 0;
    for (; j + 8 <= k; j += 8) {
        int64_t bytes;
        memcpy(&bytes, keep + j, 8);
        __m256 m = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
            _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes)), zero));
        __m256 v = _mm256_loadu_ps(x + j);
        nonfinite = _mm256_or_ps(nonfinite, _mm256_sub_ps(v, v));
        vlo = _mm256_min_ps(vlo, _mm256_blendv_ps(_mm256_set1_ps(INFINITY), v, m));
        vhi = _mm256_max_ps(vhi, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, m));
    }
    float lo_lanes[8], hi_lanes[8], lo = INFINITY, hi = -INFINITY, inv;
    _mm256_storeu_ps(lo_lanes, vlo);
    _mm256_storeu_ps(hi_lanes, vhi);
    for (int t = 0; t < 8; t++) {
        lo = lo_lanes[t] < lo ? lo_lanes[t] : lo;
        hi = hi_lanes[t] > hi ? hi_lanes[t] : hi;
    }
    if (!_mm256_testz_si256(_mm256_castps_si256(nonfinite), _mm256_castps_si256(nonfinite)))
        return vtpu_q8_refuse_row(k, q, step, centre);
    for (long t = j; t < k; t++) {
        if (!isfinite(x[t])) return vtpu_q8_refuse_row(k, q, step, centre);
        if (keep[t]) { lo = x[t] < lo ? x[t] : lo; hi = x[t] > hi ? x[t] : hi; }
    }
    vtpu_q8_row_params(lo, hi, step, centre, &inv);
    const __m256 vc = _mm256_set1_ps(*centre), vi = _mm256_set1_ps(inv);
    /* 32 at a time: the packs interleave 4-byte runs of the 4 vectors; one permute restores
     * their order, and keep's bytes (0 or 1) become the mask of one 32-byte store. Measured
     * 1.5x the 8-at-a-time loop on Zen 3 for rows of 384 and 1.2x for 1536 (4096 rows). */
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (j = 0; j + 32 <= k; j += 32) {
        __m256i i0 = _mm256_cvtps_epi32(vtpu_q8_levels_avx2(x + j, vc, vi));
        __m256i i1 = _mm256_cvtps_epi32(vtpu_q8_levels_avx2(x + j + 8, vc, vi));
        __m256i i2 = _mm256_cvtps_epi32(vtpu_q8_levels_avx2(x + j + 16, vc, vi));
        __m256i i3 = _mm256_cvtps_epi32(vtpu_q8_levels_avx2(x + j + 24, vc, vi));
        __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        b = _mm256_permutevar8x32_epi32(b, order);
        __m256i kept = _mm256_cmpgt_epi8(_mm256_loadu_si256((const __m256i *)(keep + j)), zero);
        _mm256_storeu_si256((__m256i *)(q + j), _mm256_and_si256(b, kept));
    }
    for (; j < k; j++) q[j] = keep[j] ? vtpu_q8_one(x[j], *centre, inv) : 0;
    return 0;
}

/* 1 (and a row of zeros) where the row holds NaN or inf, else 0 */
static inline int vtpu_q8_quantize(const float *x, long k, const uint8_t *keep, int8_t *q,
                                   float *step, float *centre) {
    if (vtpu_level >= VTPU_LEVEL_AVX2) return vtpu_q8_quantize_avx2(x, k, keep, q, step, centre);
    return vtpu_q8_quantize_generic(x, k, keep, q, step, centre);
}

/* One output row of linear_dynamic_int8 from its F row, in place: y = s * F + c * wsum (the
 * row's step and centre) + sum_t xv[t] * ow[t, :] (the fp32 outlier channels, ow's rows ldo
 * apart), in one pass. Explicit fused multiply-adds on every level (the compiler would fuse a
 * vector multiply and add by itself, a scalar one not), so every level gives the same bits. */
static void vtpu_q8_finish_generic(float *y, long n, float s, float c, const float *wsum,
                                   const float *xv, const float *ow, long ldo, long nout) {
    for (long j = 0; j < n; j++) {
        float v = fmaf(s, y[j], c * wsum[j]);
        for (long t = 0; t < nout; t++) v = fmaf(xv[t], ow[t * ldo + j], v);
        y[j] = v;
    }
}

/* A block's rows (ldy floats apart) finished, biased and activated in one pass, column vectors
 * outer: the nout outlier weight rows at j stay in L1 across the rows (one row at a time read
 * them from L2: nout x n floats) and each element is loaded and stored once. Per element the
 * operations and their order are vtpu_q8_finish_generic's, then vtpu_bias_act's: the same bits.
 * s, c: the rows' steps and centres; xv: rows x nout outlier activations. */
VTPU_AVX2 static void vtpu_q8_finish_rows_avx2(float *y, long ldy, long rows, long n,
                                               const float *s, const float *c,
                                               const float *wsum, const float *xv,
                                               const float *ow, long nout, const float *bias,
                                               int act) {
    long j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 ws = _mm256_loadu_ps(wsum + j);
        __m256 b = bias ? _mm256_loadu_ps(bias + j) : _mm256_setzero_ps();
        long r = 0;
        /* four rows side by side: an output's outlier sum is a chain of nout dependent fused
         * multiply-adds, one row at a time waited on it (~15 % of the FFN1 Linear) */
        for (; r + 4 <= rows; r += 4) {
            float *y0 = y + r * ldy + j, *y1 = y0 + ldy, *y2 = y1 + ldy, *y3 = y2 + ldy;
            const float *x0 = xv + r * nout, *x1 = x0 + nout, *x2 = x1 + nout, *x3 = x2 + nout;
            __m256 v0 = _mm256_fmadd_ps(_mm256_set1_ps(s[r]), _mm256_loadu_ps(y0),
                                        _mm256_mul_ps(_mm256_set1_ps(c[r]), ws));
            __m256 v1 = _mm256_fmadd_ps(_mm256_set1_ps(s[r + 1]), _mm256_loadu_ps(y1),
                                        _mm256_mul_ps(_mm256_set1_ps(c[r + 1]), ws));
            __m256 v2 = _mm256_fmadd_ps(_mm256_set1_ps(s[r + 2]), _mm256_loadu_ps(y2),
                                        _mm256_mul_ps(_mm256_set1_ps(c[r + 2]), ws));
            __m256 v3 = _mm256_fmadd_ps(_mm256_set1_ps(s[r + 3]), _mm256_loadu_ps(y3),
                                        _mm256_mul_ps(_mm256_set1_ps(c[r + 3]), ws));
            for (long t = 0; t < nout; t++) {
                __m256 o = _mm256_loadu_ps(ow + t * n + j);
                v0 = _mm256_fmadd_ps(_mm256_set1_ps(x0[t]), o, v0);
                v1 = _mm256_fmadd_ps(_mm256_set1_ps(x1[t]), o, v1);
                v2 = _mm256_fmadd_ps(_mm256_set1_ps(x2[t]), o, v2);
                v3 = _mm256_fmadd_ps(_mm256_set1_ps(x3[t]), o, v3);
            }
            if (bias) {
                v0 = _mm256_add_ps(v0, b);
                v1 = _mm256_add_ps(v1, b);
                v2 = _mm256_add_ps(v2, b);
                v3 = _mm256_add_ps(v3, b);
            }
            if (act) {
                v0 = vtpu_act256(v0, act);
                v1 = vtpu_act256(v1, act);
                v2 = vtpu_act256(v2, act);
                v3 = vtpu_act256(v3, act);
            }
            _mm256_storeu_ps(y0, v0);
            _mm256_storeu_ps(y1, v1);
            _mm256_storeu_ps(y2, v2);
            _mm256_storeu_ps(y3, v3);
        }
        for (; r < rows; r++) {
            float *yr = y + r * ldy + j;
            const float *xr = xv + r * nout;
            __m256 v = _mm256_fmadd_ps(_mm256_set1_ps(s[r]), _mm256_loadu_ps(yr),
                                       _mm256_mul_ps(_mm256_set1_ps(c[r]), ws));
            for (long t = 0; t < nout; t++)
                v = _mm256_fmadd_ps(_mm256_set1_ps(xr[t]), _mm256_loadu_ps(ow + t * n + j), v);
            if (bias) v = _mm256_add_ps(v, b);
            _mm256_storeu_ps(yr, act ? vtpu_act256(v, act) : v);
        }
    }
    if (j < n)
        for (long r = 0; r < rows; r++) {
            vtpu_q8_finish_generic(y + r * ldy + j, n - j, s[r], c[r], wsum + j, xv + r * nout,
                                   ow ? ow + j : NULL, n, nout);
            if (bias || act) vtpu_bias_act_avx2(y + r * ldy + j, bias ? bias + j : NULL, n - j, act);
        }
}

static inline void vtpu_q8_finish_rows(float *y, long ldy, long rows, long n, const float *s,
                                       const float *c, const float *wsum, const float *xv,
                                       const float *ow, long nout, const float *bias, int act) {
    if (vtpu_level >= VTPU_LEVEL_AVX2) {
        vtpu_q8_finish_rows_avx2(y, ldy, rows, n, s, c, wsum, xv, ow, nout, bias, act);
        return;
    }
    for (long r = 0; r < rows; r++) {
        vtpu_q8_finish_generic(y + r * ldy, n, s[r], c[r], wsum, xv + r * nout, ow, n, nout);
        if (bias || act) vtpu_bias_act_generic(y + r * ldy, bias, n, act);
    }
}

/* ---- bf16 GEMM: C[i, j] = sum_k A[i, k] * W[j, k], bf16 inputs, fp32 accumulation ----------
 * AVX-512 BF16's vdpbf16ps multiplies bf16 pairs exactly and adds both products into an fp32
 * lane. W is packed once (vtpu.kernels.pack_bf16_weight): panels of 16 output columns; panel q,
 * pair p holds 16 columns x (w[j, 2p], w[j, 2p + 1]) = 32 bf16 = one zmm (Kh = ceil(K / 2) pairs,
 * padding zero). A rows are bf16 too, Kh pairs each (lda in pairs), so a pair is one 32-bit word
 * broadcast to every lane. The instruction treats denormal inputs as zero (DAZ) and adds a pair's
 * odd product, then its even one (Intel's pseudocode; products of bf16 are exact in fp32); the
 * scalar twin does the same in the same order, so both paths give the same sums for normal
 * inputs (denormal results: the instruction flushes them, the twin keeps them). */

static inline float vtpu_bf16_daz(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    if ((u & 0x7F800000u) == 0) u &= 0x80000000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* no-tree-vectorize: GCC 12's -O3 vectoriser miscompiled this loop (a product counted twice at
 * Kh = 4); the twin is a reference, not a fast path. */
__attribute__((optimize("no-tree-vectorize")))
static void vtpu_gemm_bf16_rows_generic(const uint16_t *A, long lda, const uint16_t *Wp,
                                        long Kh, float *C, long ldc, long rows, long N) {
    for (long i = 0; i < rows; i++)
        for (long j = 0; j < N; j++) {
            const uint16_t *w = Wp + ((j / 16) * Kh * 16 + j % 16) * 2;
            const uint16_t *a = A + i * lda * 2;
            float s = 0.0f;
            for (long p = 0; p < Kh; p++) {
                s += vtpu_bf16_daz(a[2 * p + 1]) * vtpu_bf16_daz(w[p * 32 + 1]);
                s += vtpu_bf16_daz(a[2 * p]) * vtpu_bf16_daz(w[p * 32]);
            }
            C[i * ldc + j] = s;
        }
}

#define VTPU_AVX512_BF16 __attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f,avx2,fma")))

/* Set with the level, like vtpu_vnni. */
static int vtpu_bf16 = 0;

/* R rows x NP panels (16 columns each) of C, straight to C with a column mask at the edge. */
#define VTPU_BF16_TILE(R, NP)                                                                    \
    VTPU_AVX512_BF16 static void vtpu_bf16_tile_##R##x##NP(const uint16_t *A, long lda,          \
                                                          const uint16_t *Wp, long Kh,          \
                                                          float *C, long ldc, long rows,        \
                                                          long cols) {                          \
        __m512 acc[R][NP];                                                                       \
        for (int r = 0; r < R; r++)                                                              \
            for (int c = 0; c < NP; c++) acc[r][c] = _mm512_setzero_ps();                        \
        const uint32_t *a32 = (const uint32_t *)A;                                               \
        for (long p = 0; p < Kh; p++) {                                                          \
            __m512bh b[NP];                                                                      \
            for (int c = 0; c < NP; c++)                                                         \
                b[c] = (__m512bh)_mm512_loadu_si512((const void *)(Wp + (c * Kh + p) * 32));     \
            for (int r = 0; r < R; r++) {                                                        \
                __m512bh a = (__m512bh)_mm512_set1_epi32((int)a32[r * lda + p]);                 \
                for (int c = 0; c < NP; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);   \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < R && r < rows; r++)                                                  \
            for (int c = 0; c < NP; c++) {                                                       \
                long left = cols - 16 * c;                                                       \
                if (left <= 0) break;                                                            \
                __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);    \
                _mm512_mask_storeu_ps(C + r * ldc + 16 * c, m, acc[r][c]);                       \
            }                                                                                    \
    }
VTPU_BF16_TILE(6, 4)
VTPU_BF16_TILE(6, 1)

/* rows [0, rows) of A (A holds zeroed rows up to a multiple of 6) times every panel; columns go
 * in groups of 4 panels (4 x 16 x K bf16: 48 KB at K = 384) that stay in L2 while the rows pass. */
VTPU_AVX512_BF16 static void vtpu_gemm_bf16_rows_avx512(const uint16_t *A, long lda,
                                                        const uint16_t *Wp, long Kh, float *C,
                                                        long ldc, long rows, long N) {
    long panels = (N + 15) / 16;
    long q = 0;
    for (; q + 4 <= panels; q += 4)
        for (long i = 0; i < rows; i += 6)
            vtpu_bf16_tile_6x4(A + i * lda * 2, lda, Wp + q * Kh * 32, Kh, C + i * ldc + q * 16,
                               ldc, rows - i, N - q * 16);
    for (; q < panels; q++)
        for (long i = 0; i < rows; i += 6)
            vtpu_bf16_tile_6x1(A + i * lda * 2, lda, Wp + q * Kh * 32, Kh, C + i * ldc + q * 16,
                               ldc, rows - i, N - q * 16);
}

/* ---- AMX-BF16: the same GEMM on tiles ------------------------------------------------------
 * W's packing is already AMX's B layout: a panel's 16 consecutive pairs are a 16-row x 64-byte
 * tile (row p: the pair (w[j, 2p], w[j, 2p + 1]) of each of the 16 columns), and 16 rows of A
 * by 32 bf16 are an A tile. C goes in 2 x 2 tiles of 16 x 16 fp32 (32 rows x 32 columns) that
 * stay in tile registers for the whole of K (docs PERFORMANCE.md: storing them per K block
 * stalls AMX), then pass through a 1 KB buffer to C, clipped to its rows and columns.
 * tdpbf16ps sums in its own order, so results match the vdpbf16ps path to fp32 rounding, not
 * bit for bit. Needs Kh % 16 == 0 (K a multiple of 32) and A rows readable up to a multiple of
 * 16 (linear_bf16's row blocks are 48); otherwise the AVX-512 body runs.
 * Not run on the machines this was written on (AMD: no AMX); tests/runtime/test_bf16.py checks
 * it against the vdpbf16ps path where the CPU has AMX, and skips with the reason elsewhere;
 * test_amx_emulated.py runs it on a software model of the tiles (_amx_emulate.h) wherever the
 * CPU has AVX512_BF16. */
#define VTPU_AMX_BF16 \
    __attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512vl,avx512bw,avx512f,avx2,fma")))

/* 1 when AMX-BF16 runs linear_bf16 (set with the level: the CPU has it, the kernel granted
 * this process the tile state, and vtpu_set_amx has not turned it off). */
static int vtpu_amx_bf16 = 0;

VTPU_AMX_BF16 static void vtpu_amx_bf16_store(float *buf, float *C, long ldc, long rows,
                                              long cols) {
    for (long r = 0; r < 16 && r < rows; r++)
        memcpy(C + r * ldc, buf + r * 16, (cols < 16 ? cols : 16) * sizeof(float));
}

VTPU_AMX_BF16 static void vtpu_gemm_bf16_rows_amx(const uint16_t *A, long lda,
                                                  const uint16_t *Wp, long Kh, float *C,
                                                  long ldc, long rows, long N) {
    static const uint16_t colsb[8] = {64, 64, 64, 64, 64, 64, 64, 64};
    vtpu_tile_config cfg;
    vtpu_tile_config_fill(&cfg, colsb);
    vtpu_tile_loadconfig(&cfg);
    float buf[16 * 16] __attribute__((aligned(64)));
    long panels = (N + 15) / 16, astride = lda * 4; /* bytes: lda pairs of two bf16 */
    for (long i = 0; i < rows; i += 32) {
        const uint16_t *a0 = A + i * lda * 2, *a1 = a0 + 16 * lda * 2;
        int two_rows = i + 16 < rows;
        for (long q = 0; q < panels; q += 2) {
            const uint16_t *w0 = Wp + q * Kh * 32, *w1 = w0 + Kh * 32;
            int two_cols = q + 1 < panels;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (long p = 0; p < Kh; p += 16) {
                _tile_loadd(4, a0 + p * 2, astride);
                _tile_loadd(6, w0 + p * 32, 64);
                _tile_dpbf16ps(0, 4, 6);
                if (two_cols) {
                    _tile_loadd(7, w1 + p * 32, 64);
                    _tile_dpbf16ps(1, 4, 7);
                }
                if (two_rows) {
                    _tile_loadd(5, a1 + p * 2, astride);
                    _tile_dpbf16ps(2, 5, 6);
                    if (two_cols) _tile_dpbf16ps(3, 5, 7);
                }
            }
            float *c = C + i * ldc + q * 16;
            long cols = N - q * 16;
            _tile_stored(0, buf, 64);
            vtpu_amx_bf16_store(buf, c, ldc, rows - i, cols);
            if (two_cols) {
                _tile_stored(1, buf, 64);
                vtpu_amx_bf16_store(buf, c + 16, ldc, rows - i, cols - 16);
            }
            if (two_rows) {
                _tile_stored(2, buf, 64);
                vtpu_amx_bf16_store(buf, c + 16 * ldc, ldc, rows - i - 16, cols);
                if (two_cols) {
                    _tile_stored(3, buf, 64);
                    vtpu_amx_bf16_store(buf, c + 16 * ldc + 16, ldc, rows - i - 16, cols - 16);
                }
            }
        }
    }
    _tile_release();
}

/* 1 when the AVX-512 BF16 body runs at the current level, else 0 (the scalar twin). */
static inline int vtpu_bf16_active(void) { return vtpu_level >= VTPU_LEVEL_AVX512 && vtpu_bf16; }

/* 1 when linear_bf16 runs on AMX tiles for a K that is a multiple of 32. */
static inline int vtpu_amx_bf16_active(void) { return vtpu_bf16_active() && vtpu_amx_bf16; }

static inline void vtpu_gemm_bf16_rows(const uint16_t *A, long lda, const uint16_t *Wp, long Kh,
                                       float *C, long ldc, long rows, long N) {
    if (vtpu_amx_bf16_active() && Kh % 16 == 0)
        vtpu_gemm_bf16_rows_amx(A, lda, Wp, Kh, C, ldc, rows, N);
    else if (vtpu_bf16_active()) vtpu_gemm_bf16_rows_avx512(A, lda, Wp, Kh, C, ldc, rows, N);
    else vtpu_gemm_bf16_rows_generic(A, lda, Wp, Kh, C, ldc, rows, N);
}

/* fp32 -> bf16 bits, to nearest with ties to even (finite inputs: the Python layer checks). */
static inline uint16_t vtpu_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* A row of x rounded to bf16 into a (k values, zero-padded to whole pairs); 1 if the row holds
 * a value bf16 cannot take, else 0: NaN, inf and |x| >= 0x7F7F8000's value (which rounds to inf)
 * are exactly the magnitudes whose bits reach 0x7F7F8000, so one compare of the largest
 * magnitude's bits finds them in the conversion's own pass (numpy's isfinite, abs and max over x
 * were 6 % of a bf16 encoder forward). */
static int vtpu_bf16_row(const float *x, long k, uint16_t *a) {
    uint32_t largest = 0;
    for (long j = 0; j < k; j++) {
        uint32_t u;
        memcpy(&u, x + j, 4);
        u &= 0x7FFFFFFFu;
        largest = u > largest ? u : largest;
        a[j] = vtpu_f32_to_bf16(x[j]);
    }
    if (k & 1) a[k] = 0;
    return largest >= 0x7F7F8000u;
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

/* a mask of the first `count` (1..8) of 8 lanes */
VTPU_AVX2 static inline __m256i vtpu_lanes_below(long count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
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
    if (j < n) { /* the last keys in masked lanes: short sentences have a few past the vectors */
        __m256i m = vtpu_lanes_below(n - j);
        __m256 a0 = _mm256_setzero_ps();
        for (long t = 0; t < d; t++)
            a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(q + t), _mm256_maskload_ps(KT + t * ld + j, m),
                                 a0);
        _mm256_maskstore_ps(s + j, m, _mm256_mul_ps(a0, sc));
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

/* dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: an attention head's keys
 * transposed once per (batch, head), 8 x 8 blocks through registers where AVX2 runs (the
 * scalar double loop was ~5 % of a 2-thread int8 encoder forward). */
static void vtpu_transpose_generic(const float *src, long lds, long rows, long cols, float *dst,
                                   long ldd) {
    for (long r = 0; r < rows; r++)
        for (long c = 0; c < cols; c++) dst[c * ldd + r] = src[r * lds + c];
}

VTPU_AVX2 static void vtpu_transpose_avx2(const float *src, long lds, long rows, long cols,
                                          float *dst, long ldd) {
    long r = 0;
    for (; r + 8 <= rows; r += 8) {
        long c = 0;
        for (; c + 8 <= cols; c += 8) {
            const float *a = src + r * lds + c;
            __m256 r0 = _mm256_loadu_ps(a), r1 = _mm256_loadu_ps(a + lds),
                   r2 = _mm256_loadu_ps(a + 2 * lds), r3 = _mm256_loadu_ps(a + 3 * lds),
                   r4 = _mm256_loadu_ps(a + 4 * lds), r5 = _mm256_loadu_ps(a + 5 * lds),
                   r6 = _mm256_loadu_ps(a + 6 * lds), r7 = _mm256_loadu_ps(a + 7 * lds);
            __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
                   t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
                   t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                   t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                   u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                   u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                   u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *o = dst + c * ldd + r;
            _mm256_storeu_ps(o, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(o + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(o + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(o + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(o + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(o + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(o + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(o + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
        if (c < cols) vtpu_transpose_generic(src + r * lds + c, lds, 8, cols - c, dst + c * ldd + r, ldd);
    }
    if (r < rows) vtpu_transpose_generic(src + r * lds, lds, rows - r, cols, dst + r, ldd);
}

static inline void vtpu_transpose(const float *src, long lds, long rows, long cols, float *dst,
                                  long ldd) {
    if (vtpu_level >= VTPU_LEVEL_AVX2) vtpu_transpose_avx2(src, lds, rows, cols, dst, ldd);
    else vtpu_transpose_generic(src, lds, rows, cols, dst, ldd);
}

/* Four query rows at once (q's rows ldq floats apart, against the same keys): each key row
 * KT[t] and value row V[j] loaded once serves all four, where one row at a time was bound by
 * those loads (a GEMV's). Every score and output element sums in the order vtpu_qk_avx2 /
 * vtpu_pv_avx2 sum it, and the output is scaled by the same 1 / sum, so the bits are the
 * one-row path's (whose last keys also go in masked lanes). */
VTPU_AVX2 static void vtpu_qk4_avx2(const float *q, long ldq, const float *KT, long ld, long n,
                                    long d, float scale, float *s) {
    const __m256 sc = _mm256_set1_ps(scale);
    const float *q1 = q + ldq, *q2 = q + 2 * ldq, *q3 = q + 3 * ldq;
    long j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
               a30 = a00, a31 = a00;
        for (long t = 0; t < d; t++) {
            const float *kr = KT + t * ld + j;
            __m256 k0 = _mm256_loadu_ps(kr), k1 = _mm256_loadu_ps(kr + 8), x;
            x = _mm256_broadcast_ss(q + t);
            a00 = _mm256_fmadd_ps(x, k0, a00);
            a01 = _mm256_fmadd_ps(x, k1, a01);
            x = _mm256_broadcast_ss(q1 + t);
            a10 = _mm256_fmadd_ps(x, k0, a10);
            a11 = _mm256_fmadd_ps(x, k1, a11);
            x = _mm256_broadcast_ss(q2 + t);
            a20 = _mm256_fmadd_ps(x, k0, a20);
            a21 = _mm256_fmadd_ps(x, k1, a21);
            x = _mm256_broadcast_ss(q3 + t);
            a30 = _mm256_fmadd_ps(x, k0, a30);
            a31 = _mm256_fmadd_ps(x, k1, a31);
        }
        _mm256_storeu_ps(s + j, _mm256_mul_ps(a00, sc));
        _mm256_storeu_ps(s + j + 8, _mm256_mul_ps(a01, sc));
        _mm256_storeu_ps(s + n + j, _mm256_mul_ps(a10, sc));
        _mm256_storeu_ps(s + n + j + 8, _mm256_mul_ps(a11, sc));
        _mm256_storeu_ps(s + 2 * n + j, _mm256_mul_ps(a20, sc));
        _mm256_storeu_ps(s + 2 * n + j + 8, _mm256_mul_ps(a21, sc));
        _mm256_storeu_ps(s + 3 * n + j, _mm256_mul_ps(a30, sc));
        _mm256_storeu_ps(s + 3 * n + j + 8, _mm256_mul_ps(a31, sc));
    }
    for (; j < n; j += 8) { /* 8 keys (the last ones in masked lanes) x 4 rows */
        __m256i m = vtpu_lanes_below(n - j < 8 ? n - j : 8);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (long t = 0; t < d; t++) {
            __m256 k0 = _mm256_maskload_ps(KT + t * ld + j, m);
            a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(q + t), k0, a0);
            a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(q1 + t), k0, a1);
            a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(q2 + t), k0, a2);
            a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(q3 + t), k0, a3);
        }
        _mm256_maskstore_ps(s + j, m, _mm256_mul_ps(a0, sc));
        _mm256_maskstore_ps(s + n + j, m, _mm256_mul_ps(a1, sc));
        _mm256_maskstore_ps(s + 2 * n + j, m, _mm256_mul_ps(a2, sc));
        _mm256_maskstore_ps(s + 3 * n + j, m, _mm256_mul_ps(a3, sc));
    }
}

/* out[r] = inv[r] * sum_j p[r][j] V[j] for 4 rows of p (n apart); d a multiple of 16. */
VTPU_AVX2 static void vtpu_pv4_avx2(const float *p, const float *V, long n, long d,
                                    const float inv[4], float *out, long ldo) {
    for (long c = 0; c < d; c += 16) {
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
               a30 = a00, a31 = a00;
        for (long j = 0; j < n; j++) {
            const float *vr = V + j * d + c;
            __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8), x;
            x = _mm256_broadcast_ss(p + j);
            a00 = _mm256_fmadd_ps(x, v0, a00);
            a01 = _mm256_fmadd_ps(x, v1, a01);
            x = _mm256_broadcast_ss(p + n + j);
            a10 = _mm256_fmadd_ps(x, v0, a10);
            a11 = _mm256_fmadd_ps(x, v1, a11);
            x = _mm256_broadcast_ss(p + 2 * n + j);
            a20 = _mm256_fmadd_ps(x, v0, a20);
            a21 = _mm256_fmadd_ps(x, v1, a21);
            x = _mm256_broadcast_ss(p + 3 * n + j);
            a30 = _mm256_fmadd_ps(x, v0, a30);
            a31 = _mm256_fmadd_ps(x, v1, a31);
        }
        __m256 i0 = _mm256_set1_ps(inv[0]), i1 = _mm256_set1_ps(inv[1]),
               i2 = _mm256_set1_ps(inv[2]), i3 = _mm256_set1_ps(inv[3]);
        _mm256_storeu_ps(out + c, _mm256_mul_ps(i0, a00));
        _mm256_storeu_ps(out + c + 8, _mm256_mul_ps(i0, a01));
        _mm256_storeu_ps(out + ldo + c, _mm256_mul_ps(i1, a10));
        _mm256_storeu_ps(out + ldo + c + 8, _mm256_mul_ps(i1, a11));
        _mm256_storeu_ps(out + 2 * ldo + c, _mm256_mul_ps(i2, a20));
        _mm256_storeu_ps(out + 2 * ldo + c + 8, _mm256_mul_ps(i2, a21));
        _mm256_storeu_ps(out + 3 * ldo + c, _mm256_mul_ps(i3, a30));
        _mm256_storeu_ps(out + 3 * ldo + c + 8, _mm256_mul_ps(i3, a31));
    }
}

/* Self-attention of `rows` query rows (q ldq floats apart, out ldo apart) over n keys: KT the
 * keys transposed (ld floats a row), V n rows of d; s scratch for 4 rows of n scores. Blocks
 * of 4 rows where AVX2 runs and d is a multiple of 16, the rest a row at a time: the same bits
 * either way. */
static inline void vtpu_attend_rows(const float *q, long ldq, const float *KT, long ld,
                                    const float *V, long n, long d, float scale, float *s,
                                    float *out, long ldo, long rows) {
    long i = 0;
    if (vtpu_level >= VTPU_LEVEL_AVX2 && d % 16 == 0) {
        float inv[4];
        for (; i + 4 <= rows; i += 4) {
            vtpu_qk4_avx2(q + i * ldq, ldq, KT, ld, n, d, scale, s);
            for (int r = 0; r < 4; r++) {
                float mx = vtpu_max(s + r * n, n);
                inv[r] = (float)(1.0 / vtpu_exp_shift_sum(s + r * n, s + r * n, mx, n));
            }
            vtpu_pv4_avx2(s, V, n, d, inv, out + i * ldo, ldo);
        }
    }
    for (; i < rows; i++) {
        vtpu_qk(q + i * ldq, KT, ld, n, d, scale, s);
        float mx = vtpu_max(s, n);
        float sum = vtpu_exp_shift_sum(s, s, mx, n);
        vtpu_pv(s, V, n, d, out + i * ldo);
        vtpu_scale(out + i * ldo, (float)(1.0 / sum), d);
    }
}

static inline void vtpu_set_level(int level) {
    vtpu_cpu_features f = vtpu_detect();
    vtpu_level = level;
    vtpu_vnni = level >= VTPU_LEVEL_AVX512 && f.avx512_vnni;
    vtpu_bf16 = level >= VTPU_LEVEL_AVX512 && f.avx512_bf16;
    vtpu_amx_bf16 = vtpu_bf16 && vtpu_amx_wanted && f.amx_tile && f.amx_bf16 &&
                    vtpu_amx_permitted();
    vtpu_amx_int8 = vtpu_vnni && vtpu_amx_wanted && f.amx_tile && f.amx_int8 &&
                    vtpu_amx_permitted();
}

/* AMX on (the default, where the CPU has it) or off (tests compare it with the AVX-512 path). */
static inline void vtpu_set_amx(int wanted) {
    vtpu_amx_wanted = wanted;
    vtpu_set_level(vtpu_level);
}
static inline int vtpu_get_level(void) { return vtpu_level; }

#endif
