# Linear layers against fp32 / bf16 / int8 resident weights (vtpu.kernels.packed); see _packed.h.
#
# Entry points trust their arguments: vtpu.kernels.packed has checked dtype, shape, contiguity and
# aliasing. The weight arrives as its raw bytes, (N, K * element size) uint8, with `prec` saying
# how to read them. Each entry point releases the GIL for the whole computation.
from cython.parallel cimport prange
from libc.stdint cimport uint8_t
from libc.stdlib cimport free, malloc
from scipy.linalg.cython_blas cimport sgemm

from ._simd cimport vtpu_get_level, vtpu_set_level


cdef extern from "_packed.h" nogil:
    int VTPU_PREC_F32, VTPU_PREC_BF16, VTPU_PREC_I8, VTPU_GEMV_MAX_M
    void vtpu_packed_gemv(int prec, const void *w, const float *scale, long K, const float *x,
                          long ldx, long M, float *y, long ldy, long n0, long n1)
    void vtpu_packed_dequant(int prec, const void *w, const float *scale, long K, long n0,
                             long n1, float *out)


PREC_F32 = VTPU_PREC_F32
PREC_BF16 = VTPU_PREC_BF16
PREC_I8 = VTPU_PREC_I8
GEMV_MAX_M = VTPU_GEMV_MAX_M


def set_level(int level) -> None:
    # _simd.h's level is per extension module: vtpu.kernels.set_isa sets every module's copy.
    vtpu_set_level(level)


def get_level() -> int:
    return vtpu_get_level()


cdef inline void _sgemm_nt(const float *x, const float *w, float *y, int m, int n, int k,
                           int ldy) noexcept nogil:
    # Row-major y (m, n; row stride ldy) = x (m, k) @ w (n, k).T, i.e. column-major
    # y^T = w^T' @ x^T with w read transposed.
    cdef char ta = b'T'
    cdef char tb = b'N'
    cdef float one = 1.0
    cdef float zero = 0.0
    sgemm(&ta, &tb, &n, &m, &k, &one, <float *>w, &k, <float *>x, &k, &zero, y, &ldy)


def gemv(int prec, const uint8_t[:, ::1] w, const float[::1] scale, const float[:, ::1] x,
         float[:, ::1] out, Py_ssize_t slice_rows, int nthreads) -> None:
    """out = x @ W.T reading W in slices of slice_rows rows; each thread takes a contiguous run of
    slices, and every block of VTPU_GEMV_MAX_M rows of x passes over a slice while it is in
    cache, so W comes from memory once per call whatever M is."""
    cdef Py_ssize_t m = x.shape[0], k = x.shape[1], n = out.shape[1]
    cdef Py_ssize_t slices = (n + slice_rows - 1) // slice_rows
    cdef Py_ssize_t s, n0, n1, m0, mb
    cdef const float *sptr = &scale[0] if scale is not None else NULL
    cdef const void *wptr = &w[0, 0]
    with nogil:
        for s in prange(slices, schedule='static', num_threads=nthreads):
            n0 = s * slice_rows
            n1 = n0 + slice_rows if n0 + slice_rows < n else n
            m0 = 0
            while m0 < m:
                mb = VTPU_GEMV_MAX_M if m0 + VTPU_GEMV_MAX_M <= m else m - m0
                vtpu_packed_gemv(prec, wptr, sptr, k, &x[m0, 0], k, mb, &out[m0, 0], n, n0, n1)
                m0 = m0 + mb


def blas_nt(const float[:, ::1] x, const float[:, ::1] w, float[:, ::1] out) -> None:
    """out = x @ w.T in one BLAS call (fp32 weights, many rows)."""
    with nogil:
        _sgemm_nt(&x[0, 0], &w[0, 0], &out[0, 0], <int>x.shape[0], <int>w.shape[0],
                  <int>x.shape[1], <int>out.shape[1])


def dequant_blas(int prec, const uint8_t[:, ::1] w, const float[::1] scale,
                 const float[:, ::1] x, float[:, ::1] out, Py_ssize_t block_rows) -> None:
    """out = x @ W.T for many rows: widen block_rows rows of W at a time into an fp32 scratch
    (on this thread: a few percent of the GEMM's time) and multiply it with BLAS. Widening on the
    calling thread rather than an OpenMP team keeps BLAS's spinning workers and ours from
    fighting over the cores between blocks."""
    cdef Py_ssize_t m = x.shape[0], k = x.shape[1], n = out.shape[1]
    cdef Py_ssize_t n0, nb
    cdef const float *sptr = &scale[0] if scale is not None else NULL
    cdef const void *wptr = &w[0, 0]
    cdef float *scratch = <float *>malloc(block_rows * k * sizeof(float))
    if scratch == NULL:
        raise MemoryError(f"matmul: no memory for a {block_rows} x {k} fp32 scratch block")
    with nogil:
        n0 = 0
        while n0 < n:
            nb = block_rows if n0 + block_rows <= n else n - n0
            vtpu_packed_dequant(prec, wptr, sptr, k, n0, n0 + nb, scratch)
            _sgemm_nt(&x[0, 0], scratch, &out[0, n0], <int>m, <int>nb, <int>k, <int>n)
            n0 = n0 + nb
    free(scratch)


def dequant_rows(int prec, const uint8_t[:, ::1] w, const float[::1] scale, long n0, long n1,
                 float[:, ::1] out) -> None:
    """out = the dequantised rows W[n0:n1] (for tests and rows())."""
    with nogil:
        vtpu_packed_dequant(prec, &w[0, 0], &scale[0] if scale is not None else NULL,
                            out.shape[1], n0, n1, &out[0, 0])
