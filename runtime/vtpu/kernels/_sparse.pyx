# S-pipe kernels: row gather and scatter, the memory moves behind embedding lookups and KV caches.
#
# They move rows as raw bytes, so one kernel serves every dtype; vtpu.kernels (Python) has checked
# that every index is in range before calling.
from cython.parallel cimport prange
from libc.stdint cimport int64_t
from libc.string cimport memcpy


def gather_rows(const unsigned char[:, ::1] table, const int64_t[::1] index,
                unsigned char[:, ::1] out, int nthreads) -> None:
    cdef Py_ssize_t i, m = index.shape[0], row_bytes = table.shape[1]
    with nogil:
        for i in prange(m, schedule='static', num_threads=nthreads):
            memcpy(&out[i, 0], &table[index[i], 0], row_bytes)


def scatter_rows(const unsigned char[:, ::1] rows, const int64_t[::1] index,
                 unsigned char[:, ::1] table) -> None:
    # Serial on purpose: with repeated indices the last write must win, deterministically.
    cdef Py_ssize_t i, m = index.shape[0], row_bytes = rows.shape[1]
    with nogil:
        for i in range(m):
            memcpy(&table[index[i], 0], &rows[i, 0], row_bytes)
