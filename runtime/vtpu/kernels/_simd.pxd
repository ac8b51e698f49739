# Declarations of the vector primitives in _simd.h, shared by the kernel modules.
from libc.stdint cimport int8_t, int16_t, int32_t, uint8_t, uint16_t


cdef extern from "_simd.h" nogil:
    ctypedef struct vtpu_cpu_features:
        int avx2, fma, f16c, avx512f, avx512dq, avx512bw, avx512vl, avx512_vnni, avx512_bf16
        int avx512_fp16, avx_vnni, amx_tile, amx_bf16, amx_int8

    int VTPU_LEVEL_GENERIC, VTPU_LEVEL_AVX2
    int VTPU_ACT_NONE, VTPU_ACT_RELU, VTPU_ACT_GELU, VTPU_ACT_GELU_TANH, VTPU_ACT_SILU

    vtpu_cpu_features vtpu_detect()
    void vtpu_set_level(int level)
    int vtpu_get_level()

    float vtpu_dot(const float *a, const float *b, long n)
    float vtpu_sum(const float *a, long n)
    float vtpu_sumsq_centered(const float *a, float mean, long n)
    float vtpu_max(const float *a, long n)
    float vtpu_exp_shift_sum(const float *x, float *y, float shift, long n)
    void vtpu_scale(float *y, float alpha, long n)
    void vtpu_bias_act(float *y, const float *bias, long n, int act)
    int vtpu_bf16_row(const float *x, long k, uint16_t *a)
    void vtpu_transpose(const float *src, long lds, long rows, long cols, float *dst, long ldd)
    void vtpu_attend_rows(const float *q, long ldq, const float *KT, long ld, const float *V,
                          long n, long d, float scale, float *s, float *out, long ldo,
                          long rows)
    void vtpu_gemm_s8_rows_generic(const int8_t *A, const int8_t *BT, int32_t *C, long i0,
                                   long i1, long N, long K)
    void vtpu_pack_a_s8(const int8_t *A, long M, long K, long Kp, long i0, long i1, int32_t *Ap)
    void vtpu_pack_bt_s8(const int8_t *BT, long N, long K, long Kp, long q0, long q1,
                         int16_t *Bp)
    void vtpu_gemm_s8_packed_rows(const int32_t *Ap, const int16_t *Bp, int32_t *C, long i0,
                                  long i1, long M, long N, long panels, long Kp)
    void vtpu_gemm_q8_rows(int8_t *A, long lda, const int8_t *Wp, long Kq, long gq,
                           const float *ws, const int32_t *gsum, long ldw, float *C, long ldc,
                           long rows, long N)
    void vtpu_gemm_bf16_rows(const uint16_t *A, long lda, const uint16_t *Wp, long Kh, float *C,
                             long ldc, long rows, long N)
    uint16_t vtpu_f32_to_bf16(float f)
    int vtpu_bf16_active()
    int vtpu_amx_bf16_active()
    int vtpu_amx_int8_active()
    void vtpu_set_amx(int wanted)
    void vtpu_q8_finish_rows(float *y, long ldy, long rows, long n, const float *s,
                             const float *c, const float *wsum, const float *xv, const float *ow,
                             long nout, const float *bias, int act)
    int vtpu_q8_quantize(const float *x, long k, const uint8_t *keep, int8_t *q, float *step,
                          float *centre)
