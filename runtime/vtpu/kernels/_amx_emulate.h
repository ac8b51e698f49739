/* A software model of the AMX tile instructions the kernels in _simd.h use, so their exact source
 * runs on a CPU without AMX (our AMD machines have none): with
 * VTPU_AMX_EMULATE defined, _simd.h includes this right after <immintrin.h> and every _tile_*
 * the kernels call lands here instead of on tiles. Never part of the wheel's build; only
 * tests/runtime/test_amx_emulated.py defines it, compiling the kernels into a test library.
 *
 * The model follows the Intel SDM's pseudocode for LDTILECFG, TILERELEASE, TILEZERO, TILELOADD,
 * TILESTORED, TDPBUSD and TDPBF16PS (palette 1: 8 tiles of up to 16 rows x 64 bytes): loads
 * and stores touch exactly rows x colsb bytes of memory (a buffer overread faults as on
 * hardware), the bytes and rows past the configuration read as zero, and what hardware answers
 * with #GP or #UD (a bad configuration, a tile used unconfigured or with shapes that do not
 * multiply) aborts with a message naming the instruction. It does not model start_row (the
 * restart of an interrupted load) and refuses a configuration that sets it.
 * State is per thread, like the tile registers. */
#ifndef VTPU_AMX_EMULATE_H
#define VTPU_AMX_EMULATE_H

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* GCC's AMX intrinsics are asm macros (TILELOADD etc.) and inline functions (LDTILECFG,
 * TILERELEASE): the macros are removed so a _tile_* the model lacks fails to build (the test
 * compiles with -Werror=implicit-function-declaration) instead of executing an instruction this
 * CPU may not have; the functions are shadowed below. */
#undef _tile_loadd
#undef _tile_stream_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbssd
#undef _tile_dpbsud
#undef _tile_dpbusd
#undef _tile_dpbuud
#undef _tile_dpbf16ps

enum { VTPU_AMX_EMU_TILES = 8, VTPU_AMX_EMU_ROWS = 16, VTPU_AMX_EMU_COLSB = 64 };

typedef struct {
    int configured; /* palette 1 loaded and not released (the SDM's TILES_CONFIGURED) */
    uint8_t rows[VTPU_AMX_EMU_TILES];
    uint16_t colsb[VTPU_AMX_EMU_TILES];
    uint8_t data[VTPU_AMX_EMU_TILES][VTPU_AMX_EMU_ROWS][VTPU_AMX_EMU_COLSB];
} vtpu_amx_emu_state;

static __thread vtpu_amx_emu_state vtpu_amx_emu;

/* TDPBUSD and TDPBF16PS executed on this thread: a test reads it to know the tiles did the
 * work (a kernel that quietly fell back to AVX-512 would leave it at 0). */
static __thread long vtpu_amx_emu_products;

__attribute__((noreturn, format(printf, 2, 3))) static void
vtpu_amx_emu_fault(const char *insn, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "AMX emulation: %s faults (", insn);
    vfprintf(stderr, fmt, args);
    fprintf(stderr, ")\n");
    va_end(args);
    fflush(stderr);
    abort();
}

/* #UD unless tile t is configured (rows and colsb nonzero) and, for the instructions that move
 * or multiply dwords (all but TILEZERO), has whole dwords per row. */
static void vtpu_amx_emu_check_tile(const char *insn, int t, int dwords) {
    if (!vtpu_amx_emu.configured)
        vtpu_amx_emu_fault(insn, "#UD: tmm%d used with no tile configuration loaded", t);
    if (t < 0 || t >= VTPU_AMX_EMU_TILES || vtpu_amx_emu.rows[t] == 0)
        vtpu_amx_emu_fault(insn, "#UD: tmm%d is not configured", t);
    if (dwords && vtpu_amx_emu.colsb[t] % 4)
        vtpu_amx_emu_fault(insn, "#UD: tmm%d has colsb %d, not a multiple of 4", t,
                           vtpu_amx_emu.colsb[t]);
}

/* LDTILECFG: palette 0 releases the tiles; palette 1 takes colsb (uint16 at bytes 16..31) and
 * rows (bytes 48..55) of tiles 0..7, each at most 64 bytes x 16 rows and both zero or both
 * not; every reserved byte must be zero. Loading a configuration zeroes every tile. */
static void vtpu_amx_emu_loadconfig(const void *config) {
    const uint8_t *b = (const uint8_t *)config;
    if (b[0] == 0) {
        memset(&vtpu_amx_emu, 0, sizeof vtpu_amx_emu);
        return;
    }
    if (b[0] != 1) vtpu_amx_emu_fault("LDTILECFG", "#GP: palette %d; only palette 1 exists", b[0]);
    if (b[1] != 0)
        vtpu_amx_emu_fault("LDTILECFG", "start_row %d: restarting a load is not modelled", b[1]);
    for (int i = 2; i < 64; i++)
        if ((i < 16 || (i >= 32 && i < 48) || i >= 56) && b[i] != 0)
            vtpu_amx_emu_fault("LDTILECFG", "#GP: reserved byte %d is %d, must be 0", i, b[i]);
    vtpu_amx_emu_state next;
    memset(&next, 0, sizeof next);
    next.configured = 1;
    for (int t = 0; t < VTPU_AMX_EMU_TILES; t++) {
        next.colsb[t] = (uint16_t)(b[16 + 2 * t] | b[17 + 2 * t] << 8);
        next.rows[t] = b[48 + t];
        if (next.colsb[t] > VTPU_AMX_EMU_COLSB || next.rows[t] > VTPU_AMX_EMU_ROWS)
            vtpu_amx_emu_fault("LDTILECFG", "#GP: tmm%d is %d rows x %d bytes; at most 16 x 64",
                               t, next.rows[t], next.colsb[t]);
        if ((next.colsb[t] == 0) != (next.rows[t] == 0))
            vtpu_amx_emu_fault("LDTILECFG", "#GP: tmm%d has %d rows of %d bytes (both or neither "
                               "must be 0)", t, next.rows[t], next.colsb[t]);
    }
    vtpu_amx_emu = next;
}

/* TILERELEASE: back to the initial state, no configuration. */
static void vtpu_amx_emu_release(void) { memset(&vtpu_amx_emu, 0, sizeof vtpu_amx_emu); }

static void vtpu_amx_emu_zero(int t) {
    vtpu_amx_emu_check_tile("TILEZERO", t, 0);
    memset(vtpu_amx_emu.data[t], 0, sizeof vtpu_amx_emu.data[t]);
}

/* TILELOADD: rows[t] rows of colsb[t] bytes, `stride` bytes apart; the rest of the tile is 0. */
static void vtpu_amx_emu_loadd(int t, const void *base, long stride) {
    vtpu_amx_emu_check_tile("TILELOADD", t, 1);
    memset(vtpu_amx_emu.data[t], 0, sizeof vtpu_amx_emu.data[t]);
    for (int r = 0; r < vtpu_amx_emu.rows[t]; r++)
        memcpy(vtpu_amx_emu.data[t][r], (const uint8_t *)base + r * stride, vtpu_amx_emu.colsb[t]);
}

/* TILESTORED: rows[t] rows of colsb[t] bytes to memory, `stride` bytes apart. */
static void vtpu_amx_emu_stored(int t, void *base, long stride) {
    vtpu_amx_emu_check_tile("TILESTORED", t, 1);
    for (int r = 0; r < vtpu_amx_emu.rows[t]; r++)
        memcpy((uint8_t *)base + r * stride, vtpu_amx_emu.data[t][r], vtpu_amx_emu.colsb[t]);
}

/* The checks TDPBUSD and TDPBF16PS share (the SDM's AMX-E4 class): three distinct configured
 * tiles whose shapes multiply, C (m x n dwords) += A (m x k dwords) . B (k x n dwords), with
 * k and n at most 16 (tmul_maxk, tmul_maxn / 4). */
static void vtpu_amx_emu_check_product(const char *insn, int c, int a, int b) {
    if (c == a || c == b || a == b)
        vtpu_amx_emu_fault(insn, "#UD: tmm%d, tmm%d, tmm%d are not three distinct tiles", c, a, b);
    vtpu_amx_emu_check_tile(insn, c, 1);
    vtpu_amx_emu_check_tile(insn, a, 1);
    vtpu_amx_emu_check_tile(insn, b, 1);
    const vtpu_amx_emu_state *s = &vtpu_amx_emu;
    if (s->colsb[c] != s->colsb[b] || s->rows[c] != s->rows[a] || s->colsb[a] / 4 != s->rows[b])
        vtpu_amx_emu_fault(insn, "#UD: shapes do not multiply: C tmm%d %dx%dB, A tmm%d %dx%dB, "
                           "B tmm%d %dx%dB (need C.colsb = B.colsb, C.rows = A.rows, "
                           "A.colsb / 4 = B.rows)", c, s->rows[c], s->colsb[c], a, s->rows[a],
                           s->colsb[a], b, s->rows[b], s->colsb[b]);
    if (s->colsb[c] / 4 > 16 || s->rows[b] > 16)
        vtpu_amx_emu_fault(insn, "#UD: k %d or n %d beyond tmul_maxk / tmul_maxn", s->rows[b],
                           s->colsb[c] / 4);
    vtpu_amx_emu_products++;
}

/* After a product: the bytes past colsb of C's rows and the rows past its row count are 0
 * (the SDM's write_row_and_zero and zero_upper_rows). */
static void vtpu_amx_emu_zero_outside(int c) {
    for (int r = 0; r < VTPU_AMX_EMU_ROWS; r++) {
        int from = r < vtpu_amx_emu.rows[c] ? vtpu_amx_emu.colsb[c] : 0;
        memset(vtpu_amx_emu.data[c][r] + from, 0, VTPU_AMX_EMU_COLSB - from);
    }
}

/* TDPBUSD: C.i32[m][n] += sum over k, i < 4 of u8(A[m][4k + i]) * s8(B[k][4n + i]), wrapping
 * (computed in uint32: two's complement, no signed overflow in C). */
static void vtpu_amx_emu_dpbusd(int c, int a, int b) {
    vtpu_amx_emu_check_product("TDPBUSD", c, a, b);
    int M = vtpu_amx_emu.rows[c], N = vtpu_amx_emu.colsb[c] / 4, Kd = vtpu_amx_emu.rows[b];
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            uint32_t acc;
            memcpy(&acc, vtpu_amx_emu.data[c][m] + 4 * n, 4);
            for (int k = 0; k < Kd; k++)
                for (int i = 0; i < 4; i++)
                    acc += (uint32_t)((int32_t)vtpu_amx_emu.data[a][m][4 * k + i] *
                                      (int32_t)(int8_t)vtpu_amx_emu.data[b][k][4 * n + i]);
            memcpy(vtpu_amx_emu.data[c][m] + 4 * n, &acc, 4);
        }
    vtpu_amx_emu_zero_outside(c);
}

/* Denormals to signed zero: the instruction's DAZ on inputs and FTZ on results. */
static inline float vtpu_amx_emu_flush(float f) {
    return fabsf(f) < FLT_MIN ? copysignf(0.0f, f) : f;
}

static inline float vtpu_amx_emu_bf16(const uint8_t *p) {
    uint32_t u = (uint32_t)(p[0] | p[1] << 8) << 16;
    float f;
    memcpy(&f, &u, 4);
    return vtpu_amx_emu_flush(f);
}

/* TDPBF16PS, in the SDM's order: per row m, the even and the odd products of every pair k run
 * in two fp32 chains of fused multiply-adds (temp.fp32[2n] and [2n + 1]), then
 * C[m][n] += (even + odd); round to nearest even, denormal inputs and results flushed to zero
 * (the instruction ignores MXCSR; the model assumes its default rounding, which fmaf uses). */
static void vtpu_amx_emu_dpbf16ps(int c, int a, int b) {
    vtpu_amx_emu_check_product("TDPBF16PS", c, a, b);
    int M = vtpu_amx_emu.rows[c], N = vtpu_amx_emu.colsb[c] / 4, Kd = vtpu_amx_emu.colsb[a] / 4;
    for (int m = 0; m < M; m++) {
        float temp[2 * 16] = {0.0f};
        for (int k = 0; k < Kd; k++)
            for (int n = 0; n < N; n++)
                for (int i = 0; i < 2; i++) {
                    float x = vtpu_amx_emu_bf16(vtpu_amx_emu.data[a][m] + 4 * k + 2 * i);
                    float y = vtpu_amx_emu_bf16(vtpu_amx_emu.data[b][k] + 4 * n + 2 * i);
                    temp[2 * n + i] = vtpu_amx_emu_flush(fmaf(x, y, temp[2 * n + i]));
                }
        for (int n = 0; n < N; n++) {
            float acc;
            memcpy(&acc, vtpu_amx_emu.data[c][m] + 4 * n, 4);
            float pair = vtpu_amx_emu_flush(temp[2 * n] + temp[2 * n + 1]);
            acc = vtpu_amx_emu_flush(vtpu_amx_emu_flush(acc) + pair);
            memcpy(vtpu_amx_emu.data[c][m] + 4 * n, &acc, 4);
        }
    }
    vtpu_amx_emu_zero_outside(c);
}

#define _tile_loadconfig(config) vtpu_amx_emu_loadconfig(config)
#define _tile_release() vtpu_amx_emu_release()
#define _tile_zero(t) vtpu_amx_emu_zero(t)
#define _tile_loadd(t, base, stride) vtpu_amx_emu_loadd((t), (base), (stride))
#define _tile_stored(t, base, stride) vtpu_amx_emu_stored((t), (base), (stride))
#define _tile_dpbusd(c, a, b) vtpu_amx_emu_dpbusd((c), (a), (b))
#define _tile_dpbf16ps(c, a, b) vtpu_amx_emu_dpbf16ps((c), (a), (b))

#endif
