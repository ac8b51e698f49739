# cython: language_level=3
"""Kernels of the Qwen3 decoder that read or write the paged KV cache (vtpu.kernels.decoder
wraps them; vtpu.models.qwen3 and the sentron's paged D ops call them).

The KV arena is float32 (pages, layers, 2, kv_heads, page_tokens * head_dim): per page, per layer,
per kv head, one block of K and one of V. K is stored transposed, [head_dim][page_tokens], and V
as [page_tokens][head_dim], so both inner loops of decode attention run over contiguous memory
with independent accumulators (scores over the page's tokens for q.K, the head's features for
p.V) and vectorise without reassociating a float sum.

- `qk_norm_rope_store`: per row of the fused QKV projection, RMSNorm each query and key head with
  its own weight (Qwen3's q_norm / k_norm), rotate both with the row's cos/sin (rotate-half, as
  Hugging Face's Qwen3), write the queries to q_out and the key and value into the row's cache
  page and slot.
- `decode_attention`: one query row per sequence, attention over the sequence's cache pages in
  place (page frames given, as the PPT translated them), grouped-query (head h reads kv head
  h // (heads / kv_heads)), exact two-pass softmax.

Python validates (vtpu.kernels.decoder builds every argument), kernels trust. Each kernel has a
portable build and an AVX2+FMA build of the same C (the compiler vectorises both); `avx2` picks
one per call, so vtpu.kernels.set_isa("generic") reaches these kernels too.
"""

cimport cython
from cython.parallel cimport prange
from libc.stdint cimport int64_t

cdef extern from *:
    """
    #include <math.h>
    #include <immintrin.h>
    #define H1_ALWAYS_INLINE static inline __attribute__((always_inline))
    #define H1_AVX2 __attribute__((target("avx2,fma")))

    static int h1_cpu_avx2(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }

    /* s[t] = scale * sum_i q[i] * KT[i * P + t] for t < n (KT is [d][P]). */
    H1_ALWAYS_INLINE void h1_qk_body(const float *q, const float *KT, long P, long n, long d,
                                     float scale, float *s) {
        float acc[256];
        for (long t = 0; t < n; t++) acc[t] = 0.0f;
        for (long i = 0; i < d; i++) {
            const float qi = q[i];
            const float *row = KT + i * P;
            for (long t = 0; t < n; t++) acc[t] += qi * row[t];
        }
        for (long t = 0; t < n; t++) s[t] = acc[t] * scale;
    }
    /* out[i] += sum_t p[t] * V[t * d + i] (V is [P][d]). */
    H1_ALWAYS_INLINE void h1_pv_body(const float *p, const float *V, long n, long d, float *out) {
        for (long t = 0; t < n; t++) {
            const float pt = p[t];
            const float *row = V + t * d;
            for (long i = 0; i < d; i++) out[i] += pt * row[i];
        }
    }
    static void h1_qk_generic(const float *q, const float *KT, long P, long n, long d,
                              float scale, float *s) { h1_qk_body(q, KT, P, n, d, scale, s); }
    static void h1_pv_generic(const float *p, const float *V, long n, long d, float *out) {
        h1_pv_body(p, V, n, d, out);
    }

    /* AVX2+FMA. Scores: 8 keys per vector, four head features per step into separate
     * accumulators, so FMA latency does not serialise the loop; keys of a page beyond n are
     * computed from the page's stale floats and dropped. Values: 64 (or 32) features of out held
     * in registers across the page's keys. */
    H1_AVX2 static void h1_qk_avx2(const float *q, const float *KT, long P, long n, long d,
                                   float scale, float *s) {
        if (P % 8 || d % 4) { h1_qk_body(q, KT, P, n, d, scale, s); return; }
        float tmp[16];
        const __m256 sc = _mm256_set1_ps(scale);
        long t0 = 0;
        if (P % 16 == 0) {
            for (; t0 + 8 < n; t0 += 16) {  /* 16 keys, four features per step: 8 chains */
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
                __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
                __m256 b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
                for (long i = 0; i < d; i += 4) {
                    const float *k = KT + i * P + t0;
                    __m256 q0 = _mm256_broadcast_ss(q + i), q1 = _mm256_broadcast_ss(q + i + 1);
                    __m256 q2 = _mm256_broadcast_ss(q + i + 2);
                    __m256 q3 = _mm256_broadcast_ss(q + i + 3);
                    a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k), a0);
                    b0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k + 8), b0);
                    a1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(k + P), a1);
                    b1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(k + P + 8), b1);
                    a2 = _mm256_fmadd_ps(q2, _mm256_loadu_ps(k + 2 * P), a2);
                    b2 = _mm256_fmadd_ps(q2, _mm256_loadu_ps(k + 2 * P + 8), b2);
                    a3 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(k + 3 * P), a3);
                    b3 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(k + 3 * P + 8), b3);
                }
                __m256 ra = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
                __m256 rb = _mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3));
                _mm256_storeu_ps(tmp, _mm256_mul_ps(ra, sc));
                _mm256_storeu_ps(tmp + 8, _mm256_mul_ps(rb, sc));
                for (long t = t0; t < n && t < t0 + 16; t++) s[t] = tmp[t - t0];
            }
        }
        for (; t0 < n; t0 += 8) {  /* 8 keys, four features per step: 4 chains */
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            for (long i = 0; i < d; i += 4) {
                const float *k = KT + i * P + t0;
                a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(q + i), _mm256_loadu_ps(k), a0);
                a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(q + i + 1), _mm256_loadu_ps(k + P), a1);
                a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(q + i + 2),
                                     _mm256_loadu_ps(k + 2 * P), a2);
                a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(q + i + 3),
                                     _mm256_loadu_ps(k + 3 * P), a3);
            }
            __m256 r = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            _mm256_storeu_ps(tmp, _mm256_mul_ps(r, sc));
            for (long t = t0; t < n && t < t0 + 8; t++) s[t] = tmp[t - t0];
        }
    }
    H1_AVX2 static void h1_pv_avx2(const float *p, const float *V, long n, long d, float *out) {
        if (d % 32) { h1_pv_body(p, V, n, d, out); return; }
        long i0 = 0;
        for (; i0 + 64 <= d; i0 += 64) {  /* 64 features: 8 chains */
            __m256 o[8];
            for (int j = 0; j < 8; j++) o[j] = _mm256_loadu_ps(out + i0 + 8 * j);
            for (long t = 0; t < n; t++) {
                const __m256 pt = _mm256_broadcast_ss(p + t);
                const float *r = V + t * d + i0;
                for (int j = 0; j < 8; j++) o[j] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(r + 8 * j), o[j]);
            }
            for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + i0 + 8 * j, o[j]);
        }
        for (; i0 < d; i0 += 32) {
            __m256 o0 = _mm256_loadu_ps(out + i0), o1 = _mm256_loadu_ps(out + i0 + 8);
            __m256 o2 = _mm256_loadu_ps(out + i0 + 16), o3 = _mm256_loadu_ps(out + i0 + 24);
            for (long t = 0; t < n; t++) {
                const __m256 pt = _mm256_broadcast_ss(p + t);
                const float *r = V + t * d + i0;
                o0 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(r), o0);
                o1 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(r + 8), o1);
                o2 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(r + 16), o2);
                o3 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(r + 24), o3);
            }
            _mm256_storeu_ps(out + i0, o0);
            _mm256_storeu_ps(out + i0 + 8, o1);
            _mm256_storeu_ps(out + i0 + 16, o2);
            _mm256_storeu_ps(out + i0 + 24, o3);
        }
    }
    /* exp(x) for x <= 0 (scores minus their max): Cephes' range reduction and degree-5
     * polynomial, within 2 ulp of expf; below -87.3 the result is 0, as softmax wants. */
    H1_AVX2 static inline __m256 h1_exp_neg256(__m256 x) {
        const __m256 lo = _mm256_set1_ps(-87.33654f);
        const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
        x = _mm256_max_ps(x, lo);
        __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
        r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
        __m256 y = _mm256_set1_ps(1.9875691500e-4f);
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
        y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
        __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
        y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
        return _mm256_andnot_ps(under, y);
    }
    /* s[t] = exp(s[t] - m) for t < n; returns their sum. */
    H1_AVX2 static float h1_exp_sum_avx2(float *s, long n, float m) {
        __m256 acc = _mm256_setzero_ps();
        const __m256 mv = _mm256_set1_ps(m);
        long t = 0;
        for (; t + 8 <= n; t += 8) {
            __m256 e = h1_exp_neg256(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
            _mm256_storeu_ps(s + t, e);
            acc = _mm256_add_ps(acc, e);
        }
        float lanes[8], sum = 0.0f;
        _mm256_storeu_ps(lanes, acc);
        for (int i = 0; i < 8; i++) sum += lanes[i];
        for (; t < n; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
        return sum;
    }
    static float h1_exp_sum_generic(float *s, long n, float m) {
        float sum = 0.0f;
        for (long t = 0; t < n; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
        return sum;
    }

    /* One head of decode attention over its pages; s is scratch of at least n_pages * P. */
    H1_ALWAYS_INLINE void h1_head_body(const float *q, const float *arena, const int64_t *frames,
                                       long n_pages, long length, long page_stride,
                                       long k_offset, long v_offset, long P, long d, float scale,
                                       float *s, float *out, int avx2) {
        long j, t, i, cnt;
        float m = -INFINITY, sum = 0.0f;
        for (j = 0; j < n_pages; j++) {
            cnt = length - j * P < P ? length - j * P : P;
            if (cnt <= 0) break;
            const float *KT = arena + frames[j] * page_stride + k_offset;
            if (avx2) h1_qk_avx2(q, KT, P, cnt, d, scale, s + j * P);
            else h1_qk_generic(q, KT, P, cnt, d, scale, s + j * P);
        }
        for (t = 0; t < length; t++) if (s[t] > m) m = s[t];
        sum = avx2 ? h1_exp_sum_avx2(s, length, m) : h1_exp_sum_generic(s, length, m);
        for (i = 0; i < d; i++) out[i] = 0.0f;
        for (j = 0; j < n_pages; j++) {
            cnt = length - j * P < P ? length - j * P : P;
            if (cnt <= 0) break;
            const float *V = arena + frames[j] * page_stride + v_offset;
            if (avx2) h1_pv_avx2(s + j * P, V, cnt, d, out);
            else h1_pv_generic(s + j * P, V, cnt, d, out);
        }
        const float inv = 1.0f / sum;
        for (i = 0; i < d; i++) out[i] *= inv;
    }

    /* RMSNorm of x (d) with weight w into y, then rotate-half with cos/sin (d each). */
    H1_ALWAYS_INLINE void h1_norm_rope_body(const float *x, const float *w, float eps,
                                            const float *c, const float *sn, long d, float *y) {
        float ss = 0.0f, tmp[1024];
        long i, half = d / 2;
        for (i = 0; i < d; i++) ss += x[i] * x[i];
        const float r = 1.0f / sqrtf(ss / (float)d + eps);
        for (i = 0; i < d; i++) tmp[i] = w[i] * (x[i] * r);
        for (i = 0; i < half; i++) {
            y[i] = tmp[i] * c[i] - tmp[i + half] * sn[i];
            y[i + half] = tmp[i + half] * c[i + half] + tmp[i] * sn[i + half];
        }
    }
    static void h1_norm_rope_generic(const float *x, const float *w, float eps, const float *c,
                                     const float *sn, long d, float *y) {
        h1_norm_rope_body(x, w, eps, c, sn, d, y);
    }
    H1_AVX2 static void h1_norm_rope_avx2(const float *x, const float *w, float eps,
                                          const float *c, const float *sn, long d, float *y) {
        h1_norm_rope_body(x, w, eps, c, sn, d, y);
    }
    """
    int h1_cpu_avx2() nogil
    void h1_head_body(const float *q, const float *arena, const int64_t *frames, long n_pages,
                      long length, long page_stride, long k_offset, long v_offset, long P,
                      long d, float scale, float *s, float *out, int avx2) noexcept nogil
    void h1_norm_rope_generic(const float *x, const float *w, float eps, const float *c,
                              const float *sn, long d, float *y) noexcept nogil
    void h1_norm_rope_avx2(const float *x, const float *w, float eps, const float *c,
                           const float *sn, long d, float *y) noexcept nogil

# Largest page_tokens and head_dim the fixed-size C scratch buffers hold.
MAX_PAGE_TOKENS = 256
MAX_HEAD_DIM = 1024


def cpu_has_avx2() -> bool:
    """AVX2 and FMA, as the CPU and OS report them (the AVX2 builds need both)."""
    return bool(h1_cpu_avx2())


@cython.boundscheck(False)
@cython.wraparound(False)
def qk_norm_rope_store(
    float[:, ::1] qkv,
    const float[::1] q_norm,
    const float[::1] k_norm,
    float eps,
    const float[:, ::1] cos,
    const float[:, ::1] sin,
    float[:, :, :, :, ::1] arena,
    int layer,
    const int64_t[::1] frames,
    const int64_t[::1] slots,
    float[:, :, :] q_out,
    bint avx2,
    int nthreads,
):
    """Rows m of qkv (M, (H + 2 * KV) * d): q heads normalised and rotated into q_out (M, H, d);
    k heads normalised, rotated and v heads copied into page frames[m], slot slots[m]. Each
    q_out[m] is a dense (H, d) block (the caller checks), which may be qkv's own q columns: a
    head is read whole before it is written."""
    cdef Py_ssize_t rows = qkv.shape[0], heads = q_out.shape[1], d = q_out.shape[2]
    cdef Py_ssize_t kv = arena.shape[3], P = arena.shape[4] // d
    cdef Py_ssize_t width = qkv.shape[1]
    cdef Py_ssize_t page_stride = arena.shape[1] * 2 * kv * P * d
    cdef Py_ssize_t layer_off = layer * 2 * kv * P * d
    cdef Py_ssize_t m
    if rows == 0:
        return
    cdef float* base = &arena[0, 0, 0, 0, 0]
    with nogil:
        for m in prange(rows, num_threads=nthreads, schedule="static"):
            _store_row(&qkv[m, 0], &q_norm[0], &k_norm[0], eps, &cos[m, 0], &sin[m, 0],
                       base + frames[m] * page_stride + layer_off, slots[m], &q_out[m, 0, 0],
                       heads, kv, d, P, avx2)


cdef void _store_row(
    const float* row, const float* qn, const float* kn, float eps, const float* c,
    const float* s, float* page, int64_t slot, float* q_out, Py_ssize_t heads, Py_ssize_t kv,
    Py_ssize_t d, Py_ssize_t P, bint avx2,
) noexcept nogil:
    """One row: page points at this layer's K blocks (then V blocks) of the row's page."""
    cdef Py_ssize_t h, i
    cdef float tmp[1024]
    cdef float* kt
    cdef float* vv
    cdef const float* v_src = row + (heads + kv) * d
    for h in range(heads):
        if avx2:
            h1_norm_rope_avx2(row + h * d, qn, eps, c, s, d, q_out + h * d)
        else:
            h1_norm_rope_generic(row + h * d, qn, eps, c, s, d, q_out + h * d)
    for h in range(kv):
        if avx2:
            h1_norm_rope_avx2(row + (heads + h) * d, kn, eps, c, s, d, tmp)
        else:
            h1_norm_rope_generic(row + (heads + h) * d, kn, eps, c, s, d, tmp)
        kt = page + h * P * d
        for i in range(d):
            kt[i * P + slot] = tmp[i]
        vv = page + (kv + h) * P * d + slot * d
        for i in range(d):
            vv[i] = v_src[h * d + i]


@cython.boundscheck(False)
@cython.wraparound(False)
def decode_attention(
    const float[:, :, :] q,
    const float[:, :, :, :, ::1] arena,
    int layer,
    const int64_t[::1] frames,
    const int64_t[::1] page_start,
    const int64_t[::1] lengths,
    float scale,
    float[:, :, ::1] out,
    float[:, ::1] scratch,
    bint avx2,
    int nthreads,
):
    """out[b, h] = softmax(q[b, h] . K_b * scale) . V_b over sequence b's lengths[b] cached
    tokens, whose pages are frames[page_start[b]:page_start[b + 1]]; scratch is (B * H, >= the
    longest sequence's pages * page_tokens). Each q[b, h] is a dense head (the caller
    checks); the rows of q may be apart (qkv's q columns)."""
    cdef Py_ssize_t bsz = q.shape[0], heads = q.shape[1], d = q.shape[2]
    cdef Py_ssize_t kv = arena.shape[3], P = arena.shape[4] // d
    cdef Py_ssize_t group = heads // kv
    cdef Py_ssize_t page_stride = arena.shape[1] * 2 * kv * P * d
    cdef Py_ssize_t layer_off = layer * 2 * kv * P * d
    cdef Py_ssize_t work, b, h, g
    if bsz == 0:
        return
    with nogil:
        for work in prange(bsz * heads, num_threads=nthreads, schedule="static"):
            b = work // heads
            h = work % heads
            g = h // group
            h1_head_body(
                &q[b, h, 0], &arena[0, 0, 0, 0, 0], &frames[page_start[b]],
                page_start[b + 1] - page_start[b], lengths[b], page_stride,
                layer_off + g * P * d, layer_off + (kv + g) * P * d, P, d, scale,
                &scratch[work, 0], &out[b, h, 0], avx2,
            )
