# cython: language_level=3
"""The three x86 instructions Python cannot reach: rdtsc, cpuid and xgetbv.

cpu.py uses cpuid for the ISA feature bits and the TSC leaves, xgetbv for which register states
the OS actually saves (AVX-512 and AMX are unusable without it, whatever cpuid says), and rdtsc to
calibrate the TSC when neither cpuid nor /proc/cpuinfo states its frequency.
"""

from libc.stdint cimport uint32_t, uint64_t

cdef extern from *:
    """
    #include <cpuid.h>
    #include <x86intrin.h>
    #include <stdint.h>

    static inline int vtpu_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t *regs) {
        /* __get_cpuid_count checks the maximum leaf of the range (basic or extended) and
           returns 0 when leaf is beyond it, so an unsupported leaf is never executed. Leaves in
           the hypervisor range (0x4000xxxx) are not covered by that check; cpuid itself returns
           zeros or the highest basic leaf for them, which the caller treats as absent. */
        if ((leaf & 0xF0000000u) == 0x40000000u) {
            __cpuid_count(leaf, subleaf, regs[0], regs[1], regs[2], regs[3]);
            return 1;
        }
        return __get_cpuid_count(leaf, subleaf, &regs[0], &regs[1], &regs[2], &regs[3]);
    }

    static inline uint64_t vtpu_xgetbv0(void) {
        uint32_t eax, edx;
        __asm__ __volatile__("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
        return ((uint64_t)edx << 32) | eax;
    }

    static inline uint64_t vtpu_rdtsc(void) { return __rdtsc(); }
    """
    int vtpu_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t *regs) nogil
    uint64_t vtpu_xgetbv0() nogil
    uint64_t vtpu_rdtsc() nogil


def rdtsc() -> int:
    """The time-stamp counter of the core this thread runs on (constant rate on modern CPUs)."""
    return vtpu_rdtsc()


def cpuid(leaf: int, subleaf: int = 0):
    """(eax, ebx, ecx, edx) of CPUID leaf/subleaf, or None when the CPU does not have that leaf."""
    cdef uint32_t regs[4]
    regs[0] = regs[1] = regs[2] = regs[3] = 0
    if not vtpu_cpuid(leaf, subleaf, regs):
        return None
    return (regs[0], regs[1], regs[2], regs[3])


def xgetbv0():
    """XCR0: the register states the OS saves on context switch, or None without OSXSAVE.

    xgetbv faults (#UD) unless CR4.OSXSAVE is set, which CPUID.1:ECX bit 27 reports.
    """
    cdef uint32_t regs[4]
    if not vtpu_cpuid(1, 0, regs) or not (regs[2] >> 27) & 1:
        return None
    return vtpu_xgetbv0()
