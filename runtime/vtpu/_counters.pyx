# The hot path of vtpu.counters: atomic int64 slots and the kernel scope (see counters.py).
from libc.stdint cimport int64_t

cdef extern from "<time.h>":
    ctypedef int clockid_t
    clockid_t CLOCK_PROCESS_CPUTIME_ID
    clockid_t CLOCK_MONOTONIC

cdef extern from "_counters.h":
    void vtpu_atomic_add(int64_t *slot, int64_t delta) noexcept nogil
    int64_t vtpu_atomic_load(int64_t *slot) noexcept nogil
    int64_t vtpu_clock_ns(clockid_t clock) noexcept nogil
    void vtpu_lock() noexcept nogil
    void vtpu_unlock() noexcept nogil

# Slot indices, fixed by counters.SLOTS (checked there at import).
cdef enum:
    OPS = 0
    KERNEL_CALLS = 1
    RUNTIME_CPU_NS = 2
    KERNEL_WALL_NS = 3


cdef class Slots:
    """A view of int64 counter slots (process memory or a shared mmap) with atomic adds."""
    cdef int64_t[::1] view
    cdef int64_t *ptr
    cdef readonly Py_ssize_t size

    def __init__(self, int64_t[::1] view):
        self.view = view
        self.ptr = &view[0]
        self.size = view.shape[0]

    cpdef void add(self, Py_ssize_t index, int64_t delta):
        if index < 0 or index >= self.size:
            raise IndexError(f"counter slot {index} out of range")
        vtpu_atomic_add(self.ptr + index, delta)

    def load_all(self):
        cdef Py_ssize_t i
        return [vtpu_atomic_load(self.ptr + i) for i in range(self.size)]


cdef Slots _slots = None
cdef int _active = 0
cdef int64_t _cpu_start = 0
cdef int64_t _wall_start = 0


def use_slots(Slots slots):
    global _slots
    _slots = slots


cdef class kernel_scope:
    """Wraps one kernel call: counts its ops and the CPU and wall time the runtime was busy.

    CPU and wall time are taken over the union of concurrently running kernels (from the first
    one entering to the last one leaving), so parallel sentrons are not counted twice; the CPU
    time is the whole process's, so OpenMP and BLAS worker threads are included. Nested scopes
    (a kernel built from kernels) are counted by each level for ops; keep ops on one level.
    """
    cdef int64_t ops

    def __init__(self, ops):
        self.ops = ops

    def __enter__(self):
        global _active, _cpu_start, _wall_start
        vtpu_lock()
        if _active == 0:
            _cpu_start = vtpu_clock_ns(CLOCK_PROCESS_CPUTIME_ID)
            _wall_start = vtpu_clock_ns(CLOCK_MONOTONIC)
        _active += 1
        vtpu_unlock()
        return self

    def __exit__(self, exc_type, exc, tb):
        global _active
        cdef int64_t *p = _slots.ptr
        if exc_type is None and self.ops:
            vtpu_atomic_add(p + OPS, self.ops)
            vtpu_atomic_add(p + KERNEL_CALLS, 1)
        vtpu_lock()
        _active -= 1
        if _active == 0:
            vtpu_atomic_add(p + RUNTIME_CPU_NS, vtpu_clock_ns(CLOCK_PROCESS_CPUTIME_ID) - _cpu_start)
            vtpu_atomic_add(p + KERNEL_WALL_NS, vtpu_clock_ns(CLOCK_MONOTONIC) - _wall_start)
        vtpu_unlock()
        return False
