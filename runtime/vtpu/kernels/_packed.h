/* Linear layers against weights resident in fp32, bf16 or int8 (vtpu.kernels.packed).
 *
 * W is row-major (N, K) in every precision: float32, bf16 bits (uint16) or int8 with one float
 * scale per row. Two shapes of work:
 *
 * - vtpu_packed_gemv, for decode (M = 1..8, memory-bound) and short prompts: W is read from
 *   memory once per call and widened to fp32 in registers (int8: sign-extend + convert; bf16:
 *   zero-extend + shift left 16), then FMA'd against the activation rows. A tile is R weight rows
 *   x M <= 4 activation rows of vector accumulators (R chosen per M to fit the register file),
 *   reduced once at the end of K. The caller visits W in slices small enough to stay in L2 while
 *   each block of 4 activation rows passes over them.
 * - vtpu_packed_dequant, for long prompts: the caller widens a block of W rows into an fp32
 *   scratch and hands it to BLAS sgemm.
 *
 * Paths: generic C, AVX2+FMA, AVX-512 (F+BW+VL), chosen by vtpu_level (see _simd.h); every vector
 * routine carries its own target attribute, since the build has no -march. Accumulation is fp32
 * in every path; the order of the sums differs between paths, the products do not.
 */
#ifndef VTPU_PACKED_H
#define VTPU_PACKED_H

#include "_simd.h"

enum { VTPU_PREC_F32 = 0, VTPU_PREC_BF16 = 1, VTPU_PREC_I8 = 2 };

/* Activation rows per register tile (callers split M into blocks of this many) and most weight
 * rows per tile. Four rows of x with K <= 1536 stay in a 32 KB L1 beside the weight stream; eight
 * did not: eight-row tiles ran at half the GFLOP/s of two four-row passes on Zen 4. */
enum { VTPU_GEMV_MAX_M = 4, VTPU_GEMV_MAX_R = 4 };

/* A tile's R rows are adjacent in memory, so its loop over K sweeps R * K * element bytes in
 * order; it prefetches the bytes this far ahead of where it reads. Rows of an int8 weight with
 * K = 1024 are 16 cache lines each: streams too short for the hardware prefetcher to reach
 * full bandwidth on its own. The prefetch goes to L2 (T1), not L1: with 4 activation rows of
 * up to 12 KB each in L1, lines prefetched into L1 evicted x and each other before use.
 * Measured on AMD EPYC Zen 4, 2 threads, 8 layers of Qwen3-0.6B (interleaved, same run),
 * T1 at 16 KB against T0 at 8 KB: int8 M=1 1.06-1.10x, M=4 1.17x; bf16 M=1 1.17x, M=4 1.9x;
 * fp32 M=1 1.08x, M=4 1.6x; 24 and 32 KB were no better, T0 at 4 or 16 KB or NTA no better. */
#ifndef VTPU_PREFETCH_BYTES
#define VTPU_PREFETCH_BYTES 16384
#endif
#ifndef VTPU_PREFETCH_HINT
#define VTPU_PREFETCH_HINT _MM_HINT_T1
#endif

#define VTPU_INLINE static inline __attribute__((always_inline))
#define VTPU_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

static inline long vtpu_prec_bytes(int prec) {
    return prec == VTPU_PREC_F32 ? 4 : prec == VTPU_PREC_BF16 ? 2 : 1;
}

VTPU_INLINE float vtpu_w_scalar(int prec, const void *w, long i) {
    if (prec == VTPU_PREC_F32) return ((const float *)w)[i];
    if (prec == VTPU_PREC_BF16) {
        uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return (float)((const int8_t *)w)[i];
}

/* ---- generic ---------------------------------------------------------------------------- */

/* y[m * ldy + n] = scale[n] * sum_k x[m * ldx + k] * W[n, k] for m < M, n in [n0, n1) */
static void vtpu_gemv_generic(int prec, const void *w, const float *scale, long K, const float *x,
                              long ldx, long M, float *y, long ldy, long n0, long n1) {
    for (long n = n0; n < n1; n++) {
        const char *row = (const char *)w + n * K * vtpu_prec_bytes(prec);
        float s = scale ? scale[n] : 1.0f;
        for (long m = 0; m < M; m++) {
            const float *xm = x + m * ldx;
            float acc = 0.0f;
            for (long k = 0; k < K; k++) acc += xm[k] * vtpu_w_scalar(prec, row, k);
            y[m * ldy + n] = acc * s;
        }
    }
}

static void vtpu_dequant_generic(int prec, const void *w, const float *scale, long K, long n0,
                                 long n1, float *out) {
    for (long n = n0; n < n1; n++) {
        const char *row = (const char *)w + n * K * vtpu_prec_bytes(prec);
        float s = scale ? scale[n] : 1.0f;
        float *o = out + (n - n0) * K;
        for (long k = 0; k < K; k++) o[k] = vtpu_w_scalar(prec, row, k) * s;
    }
}

/* ---- AVX2 + FMA: 8 lanes -------------------------------------------------------------------- */

VTPU_AVX2 VTPU_INLINE __m256 vtpu_wide8(int prec, const void *w, long i) {
    if (prec == VTPU_PREC_F32) return _mm256_loadu_ps((const float *)w + i);
    if (prec == VTPU_PREC_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    __m128i b = _mm_loadl_epi64((const __m128i *)((const int8_t *)w + i));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

/* R weight rows (starting at w, K apart) x M activation rows -> sums[m * R + r]. */
VTPU_AVX2 VTPU_INLINE void vtpu_tile_avx2(const int prec, const int M, const int R, const void *w,
                                          long K, const float *x, long ldx, float *sums) {
    __m256 acc[VTPU_GEMV_MAX_M * VTPU_GEMV_MAX_R];
    for (int i = 0; i < M * R; i++) acc[i] = _mm256_setzero_ps();
    long k = 0;
    const char *pf = (const char *)w + VTPU_PREFETCH_BYTES;
    const long step = R * 8 * vtpu_prec_bytes(prec);
    for (; k + 8 <= K; k += 8, pf += step) {
        for (long b = 0; b < step; b += 64) _mm_prefetch(pf + b, VTPU_PREFETCH_HINT);
        __m256 wv[VTPU_GEMV_MAX_R];
        for (int r = 0; r < R; r++) wv[r] = vtpu_wide8(prec, w, r * K + k);
        for (int m = 0; m < M; m++) {
            __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
            for (int r = 0; r < R; r++) acc[m * R + r] = _mm256_fmadd_ps(xv, wv[r], acc[m * R + r]);
        }
    }
    for (int i = 0; i < M * R; i++) sums[i] = vtpu_hsum256(acc[i]);
    for (; k < K; k++)
        for (int r = 0; r < R; r++) {
            float wk = vtpu_w_scalar(prec, w, r * K + k);
            for (int m = 0; m < M; m++) sums[m * R + r] += x[m * ldx + k] * wk;
        }
}

#define VTPU_TILE_CASE(FN, PREC, MM, RR)                                                          \
    case MM:                                                                                      \
        FN(PREC, MM, RR, row, K, x, ldx, sums);                                                   \
        break;

/* One tile of compile-time shape: a switch over M so each case inlines a fully unrolled tile of
 * R1..R4 weight rows (for M = 1..4), or of one row for the last rows of a range. */
#define VTPU_TILE_DISPATCH(FN, PREC, M, R1, R2, R3, R4, ONE)                                      \
    if (ONE) {                                                                                    \
        switch (M) {                                                                              \
            VTPU_TILE_CASE(FN, PREC, 1, 1) VTPU_TILE_CASE(FN, PREC, 2, 1)                         \
            VTPU_TILE_CASE(FN, PREC, 3, 1) VTPU_TILE_CASE(FN, PREC, 4, 1)                         \
        }                                                                                         \
    } else {                                                                                      \
        switch (M) {                                                                              \
            VTPU_TILE_CASE(FN, PREC, 1, R1) VTPU_TILE_CASE(FN, PREC, 2, R2)                       \
            VTPU_TILE_CASE(FN, PREC, 3, R3) VTPU_TILE_CASE(FN, PREC, 4, R4)                       \
        }                                                                                         \
    }

/* Rows [n0, n1) of W against M <= VTPU_GEMV_MAX_M activation rows; y as in vtpu_gemv_generic.
 * R1..R4: weight rows per tile for M = 1..4, chosen to fit the register file. */
#define VTPU_GEMV_BODY(ISA, R1, R2, R3, R4)                                                       \
    VTPU_##ISA static void vtpu_gemv_##ISA##_p(const int prec, const void *w, const float *scale, \
                                               long K, const float *x, long ldx, long M,          \
                                               float *y, long ldy, long n0, long n1) {            \
        static const int rows_for_m[VTPU_GEMV_MAX_M + 1] = {0, R1, R2, R3, R4};                   \
        float sums[VTPU_GEMV_MAX_M * VTPU_GEMV_MAX_R];                                            \
        long eb = vtpu_prec_bytes(prec);                                                          \
        int R = rows_for_m[M];                                                                    \
        long n = n0;                                                                              \
        while (n < n1) {                                                                          \
            int one = n + R > n1;                                                                 \
            int rr = one ? 1 : R;                                                                 \
            const char *row = (const char *)w + n * K * eb;                                       \
            if (prec == VTPU_PREC_F32) {                                                          \
                VTPU_TILE_DISPATCH(vtpu_tile_##ISA, VTPU_PREC_F32, M, R1, R2, R3, R4, one)        \
            } else if (prec == VTPU_PREC_BF16) {                                                  \
                VTPU_TILE_DISPATCH(vtpu_tile_##ISA, VTPU_PREC_BF16, M, R1, R2, R3, R4, one)       \
            } else {                                                                              \
                VTPU_TILE_DISPATCH(vtpu_tile_##ISA, VTPU_PREC_I8, M, R1, R2, R3, R4, one)         \
            }                                                                                     \
            for (int r = 0; r < rr; r++) {                                                        \
                float s = scale ? scale[n + r] : 1.0f;                                            \
                for (long m = 0; m < M; m++) y[m * ldy + n + r] = sums[m * rr + r] * s;           \
            }                                                                                     \
            n += rr;                                                                              \
        }                                                                                         \
    }

/* 16 ymm: M * R accumulators + R weight vectors (x is an FMA memory operand); for M = 4, three
 * weight rows ran 1.5x faster than two */
#define vtpu_tile_AVX2 vtpu_tile_avx2
VTPU_GEMV_BODY(AVX2, 4, 4, 3, 3)

#define VTPU_DEQUANT_BODY(ISA, WIDE, VEC, SET1, MUL, STORE, LANES)                                \
    VTPU_##ISA static void vtpu_dequant_##ISA##_p(int prec, const void *w, const float *scale,    \
                                                  long K, long n0, long n1, float *out) {         \
        for (long n = n0; n < n1; n++) {                                                          \
            const char *row = (const char *)w + n * K * vtpu_prec_bytes(prec);                    \
            float s = scale ? scale[n] : 1.0f;                                                    \
            float *o = out + (n - n0) * K;                                                        \
            long k = 0;                                                                           \
            if (prec == VTPU_PREC_BF16)                                                           \
                for (; k + LANES <= K; k += LANES) STORE(o + k, WIDE(VTPU_PREC_BF16, row, k));    \
            else if (prec == VTPU_PREC_I8) {                                                      \
                VEC sv = SET1(s);                                                                 \
                for (; k + LANES <= K; k += LANES)                                                \
                    STORE(o + k, MUL(WIDE(VTPU_PREC_I8, row, k), sv));                            \
            }                                                                                     \
            for (; k < K; k++) o[k] = vtpu_w_scalar(prec, row, k) * s;                            \
        }                                                                                         \
    }

VTPU_DEQUANT_BODY(AVX2, vtpu_wide8, __m256, _mm256_set1_ps, _mm256_mul_ps, _mm256_storeu_ps, 8)

/* ---- AVX-512: 16 lanes, 32 registers -------------------------------------------------------- */

VTPU_AVX512 VTPU_INLINE __m512 vtpu_wide16(int prec, const void *w, long i) {
    if (prec == VTPU_PREC_F32) return _mm512_loadu_ps((const float *)w + i);
    if (prec == VTPU_PREC_BF16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    __m128i b = _mm_loadu_si128((const __m128i *)((const int8_t *)w + i));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

VTPU_AVX512 VTPU_INLINE void vtpu_tile_avx512(const int prec, const int M, const int R,
                                              const void *w, long K, const float *x, long ldx,
                                              float *sums) {
    __m512 acc[VTPU_GEMV_MAX_M * VTPU_GEMV_MAX_R];
    for (int i = 0; i < M * R; i++) acc[i] = _mm512_setzero_ps();
    long k = 0;
    const char *pf = (const char *)w + VTPU_PREFETCH_BYTES;
    const long step = R * 16 * vtpu_prec_bytes(prec);
    for (; k + 16 <= K; k += 16, pf += step) {
        for (long b = 0; b < step; b += 64) _mm_prefetch(pf + b, VTPU_PREFETCH_HINT);
        __m512 wv[VTPU_GEMV_MAX_R];
        for (int r = 0; r < R; r++) wv[r] = vtpu_wide16(prec, w, r * K + k);
        for (int m = 0; m < M; m++) {
            __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
            for (int r = 0; r < R; r++) acc[m * R + r] = _mm512_fmadd_ps(xv, wv[r], acc[m * R + r]);
        }
    }
    for (int i = 0; i < M * R; i++) sums[i] = _mm512_reduce_add_ps(acc[i]);
    for (; k < K; k++)
        for (int r = 0; r < R; r++) {
            float wk = vtpu_w_scalar(prec, w, r * K + k);
            for (int m = 0; m < M; m++) sums[m * R + r] += x[m * ldx + k] * wk;
        }
}

/* 32 zmm: M * R accumulators + R weight vectors; 6 or 8 rows measured no faster than 4 */
#define vtpu_tile_AVX512 vtpu_tile_avx512
VTPU_GEMV_BODY(AVX512, 4, 4, 4, 4)

VTPU_DEQUANT_BODY(AVX512, vtpu_wide16, __m512, _mm512_set1_ps, _mm512_mul_ps, _mm512_storeu_ps,
                  16)

/* ---- dispatch --------------------------------------------------------------------------- */

/* y = x @ W[n0:n1].T for M <= VTPU_GEMV_MAX_M activation rows (ldx, ldy row strides). */
static inline void vtpu_packed_gemv(int prec, const void *w, const float *scale, long K,
                                    const float *x, long ldx, long M, float *y, long ldy, long n0,
                                    long n1) {
    if (vtpu_level >= VTPU_LEVEL_AVX512)
        vtpu_gemv_AVX512_p(prec, w, scale, K, x, ldx, M, y, ldy, n0, n1);
    else if (vtpu_level >= VTPU_LEVEL_AVX2)
        vtpu_gemv_AVX2_p(prec, w, scale, K, x, ldx, M, y, ldy, n0, n1);
    else
        vtpu_gemv_generic(prec, w, scale, K, x, ldx, M, y, ldy, n0, n1);
}

/* out (n1 - n0, K) = dequantised W[n0:n1] */
static inline void vtpu_packed_dequant(int prec, const void *w, const float *scale, long K, long n0,
                                       long n1, float *out) {
    if (vtpu_level >= VTPU_LEVEL_AVX512) vtpu_dequant_AVX512_p(prec, w, scale, K, n0, n1, out);
    else if (vtpu_level >= VTPU_LEVEL_AVX2) vtpu_dequant_AVX2_p(prec, w, scale, K, n0, n1, out);
    else vtpu_dequant_generic(prec, w, scale, K, n0, n1, out);
}

#endif
