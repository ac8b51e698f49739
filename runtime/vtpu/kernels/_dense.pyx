# D-pipe kernels: GEMM, bias+activation, norms, softmax, attention, int8 GEMM, top-k similarity.
#
# Entry points here trust their arguments: vtpu.kernels (Python) has already checked dtype, shape,
# contiguity, aliasing and limits. Each one releases the GIL for the whole computation.
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, sqrtf
from libc.stdint cimport int8_t, int16_t, int32_t, uint8_t, uint16_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport sgemm

from ._simd cimport (
    vtpu_amx_bf16_active,
    vtpu_amx_int8_active,
    vtpu_bf16_active,
    vtpu_bias_act,
    vtpu_cpu_features,
    vtpu_gemm_bf16_rows,
    vtpu_detect,
    vtpu_dot,
    vtpu_exp_shift_sum,
    vtpu_gemm_s8_packed_rows,
    vtpu_gemm_s8_rows_generic,
    vtpu_gemm_q8_rows,
    vtpu_q8_finish_rows,
    vtpu_q8_quantize,
    vtpu_attend_rows,
    vtpu_bf16_row,
    vtpu_transpose,
    vtpu_get_level,
    VTPU_LEVEL_AVX2,
    vtpu_pack_a_s8,
    vtpu_pack_bt_s8,
    vtpu_max,
    vtpu_scale,
    vtpu_set_amx,
    vtpu_set_level,
    vtpu_sum,
    vtpu_sumsq_centered,
)

# Rows of A per parallel work item of the int8 GEMM (a multiple of its 4-row register block).
cdef enum:
    INT8_ROW_BLOCK = 16
# Rows of x per work item of the bf16 GEMM (a multiple of its 6-row register block and of AMX's
# 16-row tiles).
cdef enum:
    BF16_ROW_BLOCK = 48


def cpu_features() -> dict:
    cdef vtpu_cpu_features f = vtpu_detect()
    return f


def set_level(int level) -> None:
    vtpu_set_level(level)


def get_level() -> int:
    return vtpu_get_level()


cdef inline void _sgemm_rowmajor(const float *a, const float *b, float *c, int m, int n, int k,
                                 bint trans_b, float alpha, float beta) noexcept nogil:
    # BLAS is column-major: a row-major C = A @ op(B) is the column-major C^T = op(B)^T @ A^T.
    cdef char ta = b'T' if trans_b else b'N'
    cdef char tb = b'N'
    cdef int ldb = k if trans_b else n
    cdef int lda = k
    cdef int ldc = n
    sgemm(&ta, &tb, &n, &m, &k, &alpha, <float *>b, &ldb, <float *>a, &lda, &beta, c, &ldc)


def gemm(const float[:, ::1] a, const float[:, ::1] b, float[:, ::1] out, bint trans_b,
         float alpha, float beta) -> None:
    cdef int m = out.shape[0], n = out.shape[1], k = a.shape[1]
    with nogil:
        _sgemm_rowmajor(&a[0, 0], &b[0, 0], &out[0, 0], m, n, k, trans_b, alpha, beta)


def linear(const float[:, ::1] x, const float[:, ::1] w, const float[::1] bias, int act,
           float[:, ::1] out, bint trans_w, int nthreads) -> None:
    # One BLAS call, then one parallel bias+activation pass. Interleaving BLAS with our OpenMP
    # team block by block (to reuse the block in cache) was 10-40x slower here: OpenBLAS workers
    # spin for a while after each call and fight the OpenMP threads for the same cores.
    cdef int m = out.shape[0], n = out.shape[1], k = x.shape[1]
    cdef Py_ssize_t i
    cdef const float *bptr = &bias[0] if bias is not None else NULL
    with nogil:
        _sgemm_rowmajor(&x[0, 0], &w[0, 0], &out[0, 0], m, n, k, trans_w, 1.0, 0.0)
        if bptr != NULL or act != 0:
            for i in prange(m, schedule='static', num_threads=nthreads):
                vtpu_bias_act(&out[i, 0], bptr, n, act)


def bias_act(float[:, ::1] y, const float[::1] bias, int act, int nthreads) -> None:
    cdef Py_ssize_t i, m = y.shape[0], n = y.shape[1]
    cdef const float *bptr = &bias[0] if bias is not None else NULL
    with nogil:
        for i in prange(m, schedule='static', num_threads=nthreads):
            vtpu_bias_act(&y[i, 0], bptr, n, act)


def layer_norm(const float[:, ::1] x, const float[::1] gamma, const float[::1] beta, float eps,
               float[:, ::1] out, int nthreads) -> None:
    cdef Py_ssize_t i, j, m = x.shape[0], n = x.shape[1]
    cdef float mean, rstd
    with nogil:
        for i in prange(m, schedule='static', num_threads=nthreads):
            mean = vtpu_sum(&x[i, 0], n) / n
            # two-pass variance: no cancellation when |mean| >> std
            rstd = 1.0 / sqrtf(vtpu_sumsq_centered(&x[i, 0], mean, n) / n + eps)
            for j in range(n):
                out[i, j] = (x[i, j] - mean) * rstd * gamma[j] + beta[j]


def rms_norm(const float[:, ::1] x, const float[::1] gamma, float eps, float[:, ::1] out,
             int nthreads) -> None:
    cdef Py_ssize_t i, j, m = x.shape[0], n = x.shape[1]
    cdef float rstd
    with nogil:
        for i in prange(m, schedule='static', num_threads=nthreads):
            rstd = 1.0 / sqrtf(vtpu_dot(&x[i, 0], &x[i, 0], n) / n + eps)
            for j in range(n):
                out[i, j] = x[i, j] * rstd * gamma[j]


cdef inline void _softmax_row(const float *x, float *y, long n) noexcept nogil:
    cdef float mx = vtpu_max(x, n)
    cdef float s
    if mx == -INFINITY:
        # every entry masked out: no distribution to form; zeros make the row contribute nothing
        memset(y, 0, n * sizeof(float))
        return
    s = vtpu_exp_shift_sum(x, y, mx, n)
    vtpu_scale(y, 1.0 / s, n)


def softmax(const float[:, ::1] x, float[:, ::1] out, int nthreads) -> None:
    cdef Py_ssize_t i, m = x.shape[0], n = x.shape[1]
    with nogil:
        for i in prange(m, schedule='static', num_threads=nthreads):
            _softmax_row(&x[i, 0], &out[i, 0], n)


def attention(const float[:, ::1] q, const float[:, ::1] k, const float[:, ::1] v,
              const int[::1] key_lengths, Py_ssize_t batch, Py_ssize_t heads,
              Py_ssize_t kv_heads, Py_ssize_t sq, Py_ssize_t sk, bint causal, float scale,
              float[:, ::1] out, int nthreads) -> None:
    """One (batch, head) per work item. Its keys are transposed once into a per-thread buffer so
    each query's scores are a vectorised sweep across keys; scores, softmax and the weighted sum
    of V stay in that thread's cache, and nothing of size sq x sk is ever materialised."""
    cdef Py_ssize_t d = q.shape[1], group = heads // kv_heads
    cdef Py_ssize_t bh, b, i, r, klen, limit, kv_base
    cdef float *scores = NULL
    cdef float *kt = NULL
    cdef int failed = 0
    with nogil, parallel(num_threads=nthreads):
        scores = <float *>malloc((sk if sk > 0 else 1) * sizeof(float))
        kt = <float *>malloc((sk * d if sk * d > 0 else 1) * sizeof(float))
        for bh in prange(batch * heads, schedule='static'):
            if scores == NULL or kt == NULL:
                failed += 1
                continue
            b = bh // heads
            kv_base = (b * kv_heads + (bh % heads) // group) * sk
            klen = key_lengths[b]
            if klen > 0:
                vtpu_transpose(&k[kv_base, 0], k.shape[1], klen, d, kt, klen)
            for i in range(sq):
                r = bh * sq + i
                limit = klen
                if causal and i + (sk - sq) + 1 < limit:
                    # queries are the last sq positions of the sk keys (a KV cache before them)
                    limit = i + (sk - sq) + 1
                if limit <= 0:
                    memset(&out[r, 0], 0, d * sizeof(float))
                    continue
                vtpu_attend_rows(&q[r, 0], d, kt, klen, &v[kv_base, 0], limit, d, scale, scores,
                                 &out[r, 0], d, 1)
        free(scores)
        free(kt)
    if failed:
        raise MemoryError(f"attention: no memory for a {sk} x {d} per-thread key buffer")


def gemm_int8(const int8_t[:, ::1] a, const int8_t[:, ::1] bt, int32_t[:, ::1] out,
              int nthreads) -> None:
    cdef Py_ssize_t m = a.shape[0], k = a.shape[1], n = bt.shape[0]
    cdef Py_ssize_t blocks = (m + INT8_ROW_BLOCK - 1) // INT8_ROW_BLOCK
    cdef Py_ssize_t blk, i0, i1
    cdef Py_ssize_t mp = (m + 3) // 4 * 4, kp = (k + 1) // 2, panels = (n + 7) // 8
    cdef int32_t *ap
    cdef int16_t *bp
    if vtpu_get_level() < VTPU_LEVEL_AVX2:
        with nogil:
            for blk in prange(blocks, schedule='static', num_threads=nthreads):
                i0 = blk * INT8_ROW_BLOCK
                i1 = i0 + INT8_ROW_BLOCK if i0 + INT8_ROW_BLOCK < m else m
                vtpu_gemm_s8_rows_generic(&a[0, 0], &bt[0, 0], &out[0, 0], i0, i1, n, k)
        return
    ap = <int32_t *>malloc(mp * kp * sizeof(int32_t))
    bp = <int16_t *>malloc(panels * kp * 16 * sizeof(int16_t))
    if ap == NULL or bp == NULL:
        free(ap)
        free(bp)
        raise MemoryError(f"gemm_int8: no memory to pack {m}x{k} and {k}x{n} operands")
    with nogil, parallel(num_threads=nthreads):
        for blk in prange(panels, schedule='static'):
            vtpu_pack_bt_s8(&bt[0, 0], n, k, kp, blk, blk + 1, bp)
        for blk in prange(mp // 4, schedule='static'):
            vtpu_pack_a_s8(&a[0, 0], m, k, kp, 4 * blk, 4 * blk + 4, ap)
        for blk in prange(blocks, schedule='static'):
            i0 = blk * INT8_ROW_BLOCK
            i1 = i0 + INT8_ROW_BLOCK if i0 + INT8_ROW_BLOCK < mp else mp
            vtpu_gemm_s8_packed_rows(ap, bp, &out[0, 0], i0, i1, m, n, panels, kp)
    free(ap)
    free(bp)


def topk_similarity(const float[:, ::1] queries, const float[:, ::1] keys,
                    const float[::1] q_inv_norm, const float[::1] k_inv_norm,
                    float[:, ::1] scratch, float[:, ::1] best_s, long long[:, ::1] best_i,
                    int nthreads) -> None:
    """Scores are made a block of keys at a time with one BLAS call into `scratch` (rows =
    queries), then each thread folds its queries' scores into a sorted top-k list. Equal scores
    keep the lower key index first. best_s must start at -inf and best_i at -1."""
    cdef Py_ssize_t nq = queries.shape[0], nk = keys.shape[0], d = queries.shape[1]
    cdef Py_ssize_t topk = best_s.shape[1], block = scratch.shape[1]
    cdef Py_ssize_t j0, w, qi, j, pos
    cdef bint cosine = q_inv_norm is not None
    cdef float s
    cdef float *row
    with nogil:
        j0 = 0
        while j0 < nk:
            w = block if j0 + block <= nk else nk - j0
            _sgemm_rowmajor(&queries[0, 0], &keys[j0, 0], &scratch[0, 0], <int>nq, <int>w,
                            <int>d, True, 1.0, 0.0)
            for qi in prange(nq, schedule='static', num_threads=nthreads):
                row = &scratch[0, 0] + qi * w
                for j in range(w):
                    s = row[j]
                    if cosine:
                        s = s * q_inv_norm[qi] * k_inv_norm[j0 + j]
                    if s > best_s[qi, topk - 1]:
                        pos = topk - 1
                        while pos > 0 and best_s[qi, pos - 1] < s:
                            best_s[qi, pos] = best_s[qi, pos - 1]
                            best_i[qi, pos] = best_i[qi, pos - 1]
                            pos = pos - 1
                        best_s[qi, pos] = s
                        best_i[qi, pos] = j0 + j
            j0 = j0 + w


def inverse_norms(const float[:, ::1] x, float[::1] out, int nthreads) -> None:
    """1/||row||, with 0 for an all-zero row so its cosine similarity to anything is 0."""
    cdef Py_ssize_t i, m = x.shape[0], d = x.shape[1]
    cdef float nrm
    with nogil:
        for i in prange(m, schedule='static', num_threads=nthreads):
            nrm = sqrtf(vtpu_dot(&x[i, 0], &x[i, 0], d))
            out[i] = 1.0 / nrm if nrm > 0 else 0.0


def add_layer_norm(const float[:, ::1] x, const float[:, ::1] residual,
                   const float[::1] gamma, const float[::1] beta, float eps,
                   float[:, ::1] out, int nthreads) -> None:
    """out = layer_norm(x + residual): the sum is formed in out's row, so the residual stream
    is read once and never written back as a separate tensor (out may be x or residual)."""
    cdef Py_ssize_t i, j, m = x.shape[0], n = x.shape[1]
    cdef float mean, rstd
    with nogil:
        for i in prange(m, schedule='static', num_threads=nthreads):
            for j in range(n):
                out[i, j] = x[i, j] + residual[i, j]
            mean = vtpu_sum(&out[i, 0], n) / n
            rstd = 1.0 / sqrtf(vtpu_sumsq_centered(&out[i, 0], mean, n) / n + eps)
            for j in range(n):
                out[i, j] = (out[i, j] - mean) * rstd * gamma[j] + beta[j]


def masked_mean_pool(const float[:, ::1] x, const int[::1] lengths, Py_ssize_t seq,
                     float[:, ::1] out, int nthreads) -> None:
    """out[b] = mean of x's rows b*seq .. b*seq + lengths[b] - 1 (zeros when lengths[b] is 0)."""
    cdef Py_ssize_t b, t, j, nb = out.shape[0], d = out.shape[1]
    with nogil:
        for b in prange(nb, schedule='static', num_threads=nthreads):
            memset(&out[b, 0], 0, d * sizeof(float))
            for t in range(lengths[b]):
                for j in range(d):
                    out[b, j] += x[b * seq + t, j]
            if lengths[b] > 0:
                vtpu_scale(&out[b, 0], 1.0 / lengths[b], d)


def l2_normalize(const float[:, ::1] x, float eps, float[:, ::1] out, int nthreads) -> None:
    """out[i] = x[i] / max(||x[i]||, eps), PyTorch's F.normalize (out may be x)."""
    cdef Py_ssize_t i, j, m = x.shape[0], n = x.shape[1]
    cdef float nrm
    with nogil:
        for i in prange(m, schedule='static', num_threads=nthreads):
            nrm = sqrtf(vtpu_dot(&x[i, 0], &x[i, 0], n))
            if nrm < eps:
                nrm = eps
            for j in range(n):
                out[i, j] = x[i, j] / nrm


def attention_packed(const float[:, ::1] qkv, const int[::1] key_lengths, Py_ssize_t batch,
                     Py_ssize_t seq, Py_ssize_t heads, float scale, float[:, ::1] out,
                     int nthreads) -> None:
    """Self-attention straight from a fused QKV projection: row b*seq+i of qkv holds that
    position's query, key and value side by side (heads x d each), and the result goes to row
    b*seq+i of out with the heads side by side, so no head split or merge is ever copied out.
    One (batch, head) per work item; its keys (transposed) and values are gathered once into
    per-thread buffers; its queries go four rows at a time (vtpu_attend_rows). Sequence b sees
    its first key_lengths[b] keys."""
    cdef Py_ssize_t hd = out.shape[1], d = hd // heads
    cdef Py_ssize_t bh, b, h, i, j, t, row0, klen
    cdef float *scores = NULL
    cdef float *kt = NULL
    cdef float *vb = NULL
    cdef int failed = 0
    with nogil, parallel(num_threads=nthreads):
        scores = <float *>malloc((4 * seq if seq > 0 else 1) * sizeof(float))
        kt = <float *>malloc((seq * d if seq * d > 0 else 1) * sizeof(float))
        vb = <float *>malloc((seq * d if seq * d > 0 else 1) * sizeof(float))
        for bh in prange(batch * heads, schedule='static'):
            if scores == NULL or kt == NULL or vb == NULL:
                failed += 1
                continue
            b = bh // heads
            h = bh % heads
            klen = key_lengths[b]
            row0 = b * seq
            if klen > 0:
                vtpu_transpose(&qkv[row0, hd + h * d], qkv.shape[1], klen, d, kt, klen)
            for j in range(klen):
                memcpy(&vb[j * d], &qkv[row0 + j, 2 * hd + h * d], d * sizeof(float))
            if klen <= 0:
                for i in range(seq):
                    memset(&out[row0 + i, h * d], 0, d * sizeof(float))
                continue
            vtpu_attend_rows(&qkv[row0, h * d], qkv.shape[1], kt, klen, vb, klen, d, scale,
                             scores, &out[row0, h * d], out.shape[1], seq)
        free(scores)
        free(kt)
        free(vb)
    if failed:
        raise MemoryError(f"attention_packed: no memory for {seq} x {d} per-thread buffers")


def linear_dynamic_int8(const float[:, ::1] x, const int8_t[::1] wp, Py_ssize_t kp,
                        Py_ssize_t gq, const float[:, ::1] w_scale, const int32_t[:, ::1] w_gsum,
                        const float[::1] w_sum, const uint8_t[::1] keep,
                        const long long[::1] out_idx, const float[:, ::1] out_w,
                        const float[::1] bias, int act, float[:, ::1] out, int nthreads) -> int:
    """out = act(x @ W.T + bias) with W packed by vtpu.kernels.pack_int8_weight; returns the
    number of rows of x holding NaN or inf (the quantiser finds them in its own pass over x;
    out is then meaningless and the caller refuses x).

    Each row of x is quantised on its own over the input channels W keeps in int8 (keep[j],
    vtpu_q8_quantize): centre c = (min + max) / 2 and step s = (max - min) / 254,
    q = rint((x - c) / s) in [-127, 127], so the 255 levels span the row's range whatever its sign balance (a GELU
    output is mostly >= 0). The s8 x s8 GEMM folds W's group scales into F; then
    out = s * F + c * w_sum (w_sum[j] = the dequantised row sum of W's int8 part), plus the
    outlier channels in fp32: x[:, out_idx] @ out_w. Every work item quantises and multiplies
    its own rows in its own buffer; nothing of size M x N but out is materialised."""
    cdef Py_ssize_t m = x.shape[0], k = x.shape[1], n = out.shape[1], kq = kp // 4
    cdef Py_ssize_t ldw = w_scale.shape[1], nout = out_idx.shape[0]
    cdef Py_ssize_t blocks = (m + INT8_ROW_BLOCK - 1) // INT8_ROW_BLOCK
    cdef Py_ssize_t blk, i0, rows, r, t
    cdef int8_t *aq = NULL
    cdef float *xs = NULL
    cdef float *xc = NULL
    cdef float *xv = NULL
    cdef const float *bptr = &bias[0] if bias is not None else NULL
    cdef int failed = 0
    cdef Py_ssize_t nonfinite = 0
    with nogil, parallel(num_threads=nthreads):
        aq = <int8_t *>malloc(INT8_ROW_BLOCK * kp)
        xs = <float *>malloc(INT8_ROW_BLOCK * sizeof(float))
        xc = <float *>malloc(INT8_ROW_BLOCK * sizeof(float))
        xv = <float *>malloc((INT8_ROW_BLOCK * nout if nout > 0 else 1) * sizeof(float))
        for blk in prange(blocks, schedule='static'):
            if aq == NULL or xs == NULL or xc == NULL or xv == NULL:
                failed += 1
                continue
            i0 = blk * INT8_ROW_BLOCK
            rows = INT8_ROW_BLOCK if i0 + INT8_ROW_BLOCK <= m else m - i0
            memset(aq, 0, INT8_ROW_BLOCK * kp)
            for r in range(rows):
                nonfinite += vtpu_q8_quantize(&x[i0 + r, 0], k, &keep[0], &aq[r * kp], &xs[r],
                                              &xc[r])
            vtpu_gemm_q8_rows(aq, kp, &wp[0], kq, gq, &w_scale[0, 0], &w_gsum[0, 0], ldw,
                              &out[i0, 0], n, rows, n)
            for r in range(rows):
                for t in range(nout):
                    xv[r * nout + t] = x[i0 + r, out_idx[t]]
            vtpu_q8_finish_rows(&out[i0, 0], n, rows, n, xs, xc, &w_sum[0], xv,
                                &out_w[0, 0] if nout > 0 else NULL, nout, bptr, act)
        free(aq)
        free(xs)
        free(xc)
        free(xv)
    if failed:
        raise MemoryError(f"linear_dynamic_int8: no memory for {INT8_ROW_BLOCK} rows of buffers")
    return nonfinite


def dequantize_int8_groups(const int8_t[:, ::1] q, const float[:, ::1] scale, Py_ssize_t group,
                           float[:, ::1] out, int nthreads) -> None:
    """out[k, n] = q[k, n] * scale[k // group, n]: a weight-only int8 matrix back to fp32."""
    cdef Py_ssize_t kk, j, rows = q.shape[0], n = q.shape[1]
    cdef const float *srow
    with nogil:
        for kk in prange(rows, schedule='static', num_threads=nthreads):
            srow = &scale[kk // group, 0]
            for j in range(n):
                out[kk, j] = q[kk, j] * srow[j]


def bf16_active() -> bool:
    """Whether linear_bf16 runs its AVX-512 BF16 body now (else its scalar twin)."""
    return bool(vtpu_bf16_active())


def amx_bf16_active() -> bool:
    """Whether linear_bf16 runs on AMX tiles now (for K a multiple of 32)."""
    return bool(vtpu_amx_bf16_active())


def amx_int8_active() -> bool:
    """Whether linear_dynamic_int8 runs on AMX tiles now (for K and its group multiples of 64)."""
    return bool(vtpu_amx_int8_active())


def set_amx(bint wanted) -> None:
    vtpu_set_amx(wanted)


def linear_bf16(const float[:, ::1] x, const uint16_t[::1] wp, Py_ssize_t kh,
                const float[::1] bias, int act, float[:, ::1] out, int nthreads) -> int:
    """out = act(bf16(x) @ W.T + bias) with W packed by vtpu.kernels.pack_bf16_weight (kh pairs
    of K per column). Each work item rounds its rows of x to bf16 (to nearest, ties to even)
    into its own buffer, zero-padded to whole pairs and 6-row tiles, then multiplies them with
    fp32 accumulation straight into out. Returns the number of rows of x holding a value bf16
    cannot take (NaN, inf, or beyond its range: out is then meaningless, the caller refuses x)."""
    cdef Py_ssize_t m = x.shape[0], k = x.shape[1], n = out.shape[1]
    cdef Py_ssize_t blocks = (m + BF16_ROW_BLOCK - 1) // BF16_ROW_BLOCK
    cdef Py_ssize_t blk, i0, rows, r
    cdef uint16_t *a = NULL
    cdef const float *bptr = &bias[0] if bias is not None else NULL
    cdef int failed = 0
    cdef Py_ssize_t unfit = 0
    with nogil, parallel(num_threads=nthreads):
        a = <uint16_t *>malloc(BF16_ROW_BLOCK * kh * 2 * sizeof(uint16_t))
        for blk in prange(blocks, schedule='static'):
            if a == NULL:
                failed += 1
                continue
            i0 = blk * BF16_ROW_BLOCK
            rows = BF16_ROW_BLOCK if i0 + BF16_ROW_BLOCK <= m else m - i0
            for r in range(rows):
                unfit += vtpu_bf16_row(&x[i0 + r, 0], k, &a[r * kh * 2])
            if rows < BF16_ROW_BLOCK:  # tiles read whole 6-row (AVX-512) or 16-row (AMX) groups
                memset(&a[rows * kh * 2], 0, (BF16_ROW_BLOCK - rows) * kh * 2 * sizeof(uint16_t))
            vtpu_gemm_bf16_rows(a, kh, &wp[0], kh, &out[i0, 0], n, rows, n)
            if bptr != NULL or act != 0:
                for r in range(rows):
                    vtpu_bias_act(&out[i0 + r, 0], bptr, n, act)
        free(a)
    if failed:
        raise MemoryError(f"linear_bf16: no memory for {BF16_ROW_BLOCK} rows of bf16 buffers")
    return unfit
