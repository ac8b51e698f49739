/* The AMX kernels of runtime/vtpu/kernels/_simd.h on the software model of the tiles
 * (_amx_emulate.h), next to the AVX-512 paths they replace: tests/runtime/test_amx_emulated.py
 * builds this file with gcc into a library and calls it through ctypes. */
#define VTPU_AMX_EMULATE
#include "_simd.h"

#include <sys/mman.h>

/* The avx512 level with the AMX kernels on (the model stands in for the tiles) or off, as
 * vtpu_set_level would leave it on a CPU with AMX; the product counter starts at 0. */
static void vtpu_test_select(int amx) {
    vtpu_set_level(VTPU_LEVEL_AVX512);
    vtpu_amx_int8 = amx && vtpu_vnni;
    vtpu_amx_bf16 = amx && vtpu_bf16;
    vtpu_amx_emu_products = 0;
}

/* linear_dynamic_int8's GEMM through its dispatcher; returns the tile products it ran. */
long q8_rows(int amx, int8_t *A, long lda, const int8_t *Wp, long Kq, long gq, const float *ws,
             const int32_t *gsum, long ldw, float *C, long ldc, long rows, long N) {
    vtpu_test_select(amx);
    vtpu_gemm_q8_rows(A, lda, Wp, Kq, gq, ws, gsum, ldw, C, ldc, rows, N);
    return vtpu_amx_emu_products;
}

/* linear_bf16's GEMM through its dispatcher; returns the tile products it ran. */
long bf16_rows(int amx, const uint16_t *A, long lda, const uint16_t *Wp, long Kh, float *C,
               long ldc, long rows, long N) {
    vtpu_test_select(amx);
    vtpu_gemm_bf16_rows(A, lda, Wp, Kh, C, ldc, rows, N);
    return vtpu_amx_emu_products;
}

/* One instruction on the model: cfg (64 bytes) shapes tiles 0 (C), 1 (A) and 2 (B), which are
 * loaded from c, a and b (rows ld* bytes apart); then TDPBUSD (op 0) or TDPBF16PS (op 1), and C
 * stored back to c. */
void tile_product(const uint8_t *cfg, int op, void *c, long ldc, const void *a, long lda,
                  const void *b, long ldb) {
    _tile_loadconfig(cfg);
    _tile_loadd(0, c, ldc);
    _tile_loadd(1, a, lda);
    _tile_loadd(2, b, ldb);
    if (op == 0) _tile_dpbusd(0, 1, 2);
    else _tile_dpbf16ps(0, 1, 2);
    _tile_stored(0, c, ldc);
    _tile_release();
}

/* TILEZERO after TILERELEASE: a tile used with no configuration. */
void tile_zero_released(void) {
    _tile_release();
    _tile_zero(0);
}

/* n bytes that end where a PROT_NONE page begins, so any access past them faults; NULL if the
 * memory cannot be had. Never freed: the tests that use it run in a child process. */
void *guarded_bytes(long n) {
    long page = sysconf(_SC_PAGESIZE), span = (n + page - 1) / page * page;
    uint8_t *p = mmap(NULL, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                      0);
    if (p == MAP_FAILED || mprotect(p + span, page, PROT_NONE) != 0) return NULL;
    return p + span - n;
}
