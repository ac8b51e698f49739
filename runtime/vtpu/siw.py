"""SIW, the Sentron Instruction Word: binary encoding, text assembly, validation.

A program is a tensor table plus a list of 64-byte words. Each word carries one slot per pipe:
**D** (dense math), **S** (sparse/memory) and **C** (coordination), and two dependency bits that
order a word's D and S slots. The executor (sentron.py) runs the D and S slots of a word concurrently and the C slot
after both; see "Issue order" below.

Word layout (64 bytes, little-endian; every reserved byte must be zero)::

    offset size field      meaning
    ------ ---- ---------- -----------------------------------------------------------------
     0     1    format     SIW format, must be 1
     1     1    deps       bit3 D<S (D needs this word's S), bit4 S<D (S needs D);
                           bits 0-2 and 5-7 reserved
     2     2    reserved
     4     16   D slot     op u8 | flags u8 | dst u16 | a u16 | b u16 | c u16 | imm f32 | e u16
    20     16   S slot     op u8 | flags u8 | dst u16 | src u16 | idx u16 | tile u16 | rows u16
                           | rsv u32
    36     8    C slot     op u8 | flags u8 | target u16 | count u32
                           (flags: C.loop's register, see "Loop registers")
    44     20   reserved

Removed (they validated but did nothing): the word's phext address (bytes 44-61; phext
coordinates address memory through the Phext Page Table, vtpu.ppt, not through words), the
C ops BARRIER (1) and SYNC (2) and the dependency bits D>D, S>S, C>C and C<D — on a sentron a
word's C slot runs after its D and S slots are done, and each word after the previous one, so
there was never anything to wait for. Their codes and bits are rejected with that reason.

The D slot's `e` (bytes 18-19) is a fifth operand, used by KV_STORE_PAGED only (0 otherwise).

D flags: bits 0-1 activation of LINEAR (0 none, 1 relu, 2 gelu, 3 silu); bit 2 causal of
ATTENTION; bit 3 acc of GEMM (dst += a @ b, accumulating as a systolic array does); all 8 bits
the (query) head count of ATTN_QKV, QK_NORM_ROPE, ATTN_GQA, KV_APPEND and CACHED_ATTN (text
heads=N, 1..255); all 8 bits the layer of KV_STORE_PAGED and PAGED_ATTN (text layer=N, 0..255).
D imm: eps of LAYERNORM/RMSNORM/ADD_LAYERNORM/L2NORM/ADD_RMSNORM/QK_NORM_ROPE/KV_STORE_PAGED,
scale of ATTENTION/ATTN_QKV (0 = the default), else 0.
Operand fields a slot does not use are 0; LINEAR without bias and MATMUL/ROWS without scale
have c = 0xFFFF. D operands are
dense row-major tensors (views included); dst may share memory with a source only where the
rule says "in place" and only as that very tensor.

    D ops  operands (text order)      rule
    nop
    gemm       dst, a, b  [acc]       f32 a(m,k) @ b(k,n) -> dst(m,n); acc adds to dst
    linear     dst, x, w[, bias]      x(m,k) @ w(k,n) + bias(n), activation fused; w is f32
                                      or a packed Linear weight (see "Packed Linear weights")
    add, mul   dst, a, b              b has a's shape or is a row vector (a.shape[-1],)
    layernorm  dst, x, gamma, beta    normalise the last axis; gamma, beta (n,)
    rmsnorm    dst, x, gamma
    softmax    dst, x                 over the last axis
    attention  dst, q, k, v [causal]  q(h,sq,d), k and v (hk,sk,d), h a multiple of hk
                                      -> dst(h,sq,d); causal: query i sees keys <= i+sk-sq
    gemm_i8    dst, a, b              i8 @ i8 -> i32 (k <= 131071, so int32 cannot overflow)
    add_layernorm dst, x, res, gb     layernorm(x + res), gb (2,n) = gamma; beta (in place on
                                      x or res)
    attn_qkv   dst, qkv, lengths heads=H  qkv (b,s,3*H*d) packed q|k|v -> dst (b,s,H*d);
                                      lengths (b,) i32 masks each sequence's padded keys
    mean_pool  dst, x, lengths        x (b,s,d) -> dst (b,d): mean of each first lengths[i] rows
    l2norm     dst, x                 x / max(||x||, eps) over the last axis (eps 1e-12)
    gelu       dst, x                 exact GELU, 0.5 x (1 + erf(x / sqrt 2)); LINEAR act=gelu
                                      fuses it with the bias

add, mul, layernorm, rmsnorm, softmax, add_layernorm, l2norm and gelu may work in place.

The decoder's D ops (a Qwen3 graph lowered by phextcc.lower.DecoderModule; each runs the code
phextcc.run runs for the graph op, so the two agree bit for bit). A packed weight W (N, K) is
f32, bf16 (raw bits) or i8 with an f32 (N,) per-row scale (vtpu.kernels.packed's layouts);
positions are i32/i64; a packed q|k|v row is (heads + 2 kv_heads) x head_dim wide, q heads
first, heads a multiple of kv_heads (grouped-query); head_dim and kv_heads follow from shapes.

    add_rmsnorm dst, x, res, gamma    x += res (x keeps the residual stream), dst = rmsnorm(x);
                                      writes dst and x
    qk_norm_rope qkv, gammas, inv_freq, positions heads=H
                                      in place on qkv (b,s,width): q and k heads RMS-normalised
                                      (gammas (2,d): q's, k's) and rotated (rotate-half;
                                      inv_freq (d/2,) = 1/theta^(2i/d)); positions (b,s)
    attn_gqa   dst, qkv heads=H       causal grouped-query attention: qkv (b,s,width) ->
                                      dst (b,s,H*d)
    swiglu     dst, x                 x (..,2n) gate|up -> dst (..,n) = silu(gate) * up
    matmul     dst, x, w[, scale]     packed.matmul: x (m,K) @ W.T -> dst (m,N)
    rows       dst, table, idx[, scale]  packed.rows: dequantised table[idx] -> dst (r,K) f32
                                      (an index beyond the table fails the run)
    kv_append  cache, qkv, positions heads=H  writes each token's k and v heads into its
                                      sequence's row `position` of cache (2,b,kv_heads,T,d),
                                      in place (a position >= T fails the run)
    cached_attn dst, qkv, cache, positions heads=H  one query per sequence, qkv (b,1,width),
                                      against its cached keys 0..position -> dst (b,1,H*d)

The node's paged KV cache (vtpu.models.kvcache; the hand-written forward of vtpu.models.qwen3
runs the same kernels, vtpu.kernels.decoder, in the same order). `kv` is the arena, f32
(frames, layers, 2, kv_heads, P * d), P tokens a page, K transposed per page, bound `inout`;
`pages` is the step's page table, i64 (b, 1 + max_pages): row i = sequence i's length after
the step (its s new tokens included), then its frames in token order, as the Phext Page Table
translated them. Token j of sequence i is at position length - s + j, frame
pages[i, 1 + position // P], slot position % P. A length below s or beyond the row's pages, or
a frame outside the arena, fails the run. d <= 1024, P <= 256 (the kernels' scratch).

    kv_store_paged kv, qkv, gammas, rope, pages layer=L eps=E
                                      qkv (b,s,width): q heads RMS-normalised (gammas (2,d):
                                      q's, k's) and rotated (rope (2,b*s,d): cos, sin per
                                      row) in place; k heads likewise and v heads written
                                      into layer L of their frame and slot; writes kv and qkv
    paged_attn dst, qkv, kv, pages layer=L  attention of qkv's q heads over each sequence's
                                      pages of layer L -> dst (b,s,H*d); s = 1: one query per
                                      sequence (the decode kernel), s > 1: causal over the
                                      sequence's cached tokens (the prefill kernel)

    S ops  operands                   rule
    load       dst, src  tile rows    dst[:rows] = src[tile*rows:(tile+1)*rows]
    store      dst, src  tile rows    dst[tile*rows:(tile+1)*rows] = src[:rows]
    gather     dst, table, idx        dst = table[idx]    (idx i32/i64, 1-D; any row dtype)
    scatter    table, idx, values     table[idx] = values (encoded dst=table, src=values)
    prefetch   src  tile rows         touch one row-tile so it is in cache
    alloc, free  t                    give / take back arena memory of a `scratch` tensor

    C ops: nop, loop target count [reg], halt. LOOP jumps back to word `target` (<= its own
    index) `count` times, so its body (words target..itself) runs count + 1 times; loops must
    nest. Every program ends with a word whose C slot is HALT.

Loop registers. Eight integer registers r0..r7, all 0 when a program starts. A LOOP may drive
one (C flags: bit 3 set, bits 0-2 the register; text `C.loop 3 count=5 reg=r1`): the register
holds the pass's index, 0 on the first pass through the body, +1 at each back-jump, and 0
again when the loop falls through, so an enclosing loop re-enters it afresh. Nothing else
writes a register. A view may be register-relative: its first element is OFFSET + r[N] x STEP
(elements; text `view(w,0+r1*4096,64,1)`), so each pass of the loop reads another slice of its
base -- a layer's weights out of a stacked (layers, ...) tensor. Validation: a loop inside
another loop that drives the same register is rejected (it would overwrite the outer index);
a word may use a register-relative view only inside a loop that drives its register, and the
view must lie inside its base for every index 0..count of that loop (checked statically; the
view is also checked at index 0); its base may not be `scratch` (S.alloc moves it). Races and
issue order are judged on the base's memory, which every pass's view aliases.

Packed Linear weights. The reduced precisions an encoder is loaded in keep each Linear weight
packed for its kernel, with its scales; the dtype names the packing, the shape is the (K, N) the
D.linear reads (x (m, K) -> dst (m, N)), and the resident binding is the node's packed weight
itself, read in place (its bytes are the binding's, not the shape's):

    bf16lin  vtpu.kernels.Bf16Weight: bf16 pairs in panels of 16 output columns (vdpbf16ps)
             -> kernels.linear_bf16 (bf16 activations, fp32 sums)
    int8lin  kernels.Int8GroupWeight: int8 (K, N) with an f32 scale per output channel and group
             of input rows -> kernels.linear_weight_int8 (weight-only: widened, fp32 GEMM)
    int8dyn  kernels.Int8Weight: int8 panels with an f32 scale per output channel and group of
             inputs, the group sums, weight sums and keep mask of the integer scheme and the
             fp32 outlier input columns -> kernels.linear_dynamic_int8 (int8 activations)

Bias and activation stay fused as for f32. A packed weight is `resident`, (K, N) or a stack
(layers, K, N) bound to one packed weight per layer, or a `view` of one that selects a whole
weight: shape (K, N), dense strides, offset and register step multiples of K x N (so a layer
loop reads layer r of a stack: `view(w_all,0+r0*442368,1152,1)`). Only D.linear's weight
operand reads one; any other operand of any op is refused with the reason, as are other
initialisers and `output`. Binding checks the packed weight's kind, (K, N) and its parts (the
scales' and sums' shapes and dtypes, the outlier columns) before anything runs.

Tensors (initialisers below) live in the sentron's arena, except `resident` ones: bound by name
to arrays the node holds (a loaded model's weights), used in place and read-only; `inout` ones:
bound by name per run to the caller's arrays (a decoder's KV caches), used in place and
writable, never copied; and `view`s:
a shape, an element offset and element strides over an earlier non-view tensor (reshape is a
dense view, transpose a strided one; D operands must be dense, S.load/S.store copy any view).
A view aliases its base: races and issue order are judged on the memory, not the name.

Issue order within a word. Each slot reads its operands as they were before the word, unless a
dependency bit says it consumes the other slot's result: D<S runs S first, S<D runs D first.
Without either bit, D and S run concurrently; where they touch the same tensor the order is
inferred (a slot that reads what the other writes must run first). A **cyclic dependency** is a
word whose required order is contradictory:

- D<S and S<D both set (each waits for the other);
- no bit set, D writes a tensor S reads *and* S writes a tensor D reads: S must run before D and
  D before S, which no issue order satisfies;
- a bit that waits on a slot that never produces: D<S or S<D where the awaited slot is NOP.

Both slots writing one tensor with no bit to order them is a **data race**, also rejected.

Container: ``b"SIW1"`` | version u16 | n_tensors u16 | n_words u32 | words_offset u32, then the
tensor table (per tensor: id u16 | dtype u8 | init u8 | flags u8 (bit0 output, bit1
register-relative view) | ndim u8 | name_len u8 | reg u8 (a register-relative view's register,
else 0) | seed u64 (a view's offset) | ndim x u32 dims | name utf-8, and for a view: base id
u16 | ndim x u32 strides, then for a register-relative one: step u32), zero padding, then the
words at ``words_offset``, the first multiple of 64 after the table. Registers needed no new
version: the fields they use were reserved (zero) before, so older programs read unchanged.
Dtype codes: 1 f32, 2 i8, 3 i32, 4 i64, 5 bf16, 6 bf16lin, 7 int8lin, 8 int8dyn (the packed
Linear weights needed no new version either: codes 6-8 were refused before).

Text form, one word per line, ``#`` comments::

    .tensor x f32[128,256] input
    .tensor w f32[256,512] random(7)
    .tensor y f32[128,512] output
    D.linear y, x, w act=gelu | S.prefetch w tile=1 rows=64
    C.halt

Initialisers: zeros (the default), ones, random(seed) (f32 uniform [-1, 1), bf16 those
truncated, i8 [-127, 127], i32/i64 [0, 100)), input (bound at run time), scratch (no memory
until S.alloc), resident (bound by name at run time, not copied), inout (bound by name per run,
in place), view(BASE,OFFSET,STRIDE,...) (strides in elements) or view(BASE,OFFSET+rN*STEP,
STRIDE,...) (register-relative). Dtypes: f32, bf16 (raw bits,
only as a packed weight), i8, i32, i64, and the packed Linear weights bf16lin, int8lin,
int8dyn; 1 to 5 dims.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

MAGIC = b"SIW1"
CONTAINER_VERSION = 1
WORD_FORMAT = 1
WORD_BYTES = 64
NONE = 0xFFFF  # "no tensor" in an optional operand field
MAX_NDIM = 5  # a decoder's KV cache is (2, batch, kv_heads, tokens, head_dim)
MAX_NAME = 64
NUM_REGS = 8  # loop registers r0..r7
LOOP_REG = 0x08  # C flag of LOOP: it drives register (flags & 7)
VIEW_REG = 0x02  # tensor-entry flag: a register-relative view


class DOp(IntEnum):
    NOP = 0
    GEMM = 1
    LINEAR = 2
    ADD = 3
    MUL = 4
    LAYERNORM = 5
    RMSNORM = 6
    SOFTMAX = 7
    ATTENTION = 8
    GEMM_I8 = 9
    ADD_LAYERNORM = 10
    ATTN_QKV = 11
    MEAN_POOL = 12
    L2NORM = 13
    GELU = 14
    ADD_RMSNORM = 15
    QK_NORM_ROPE = 16
    ATTN_GQA = 17
    SWIGLU = 18
    MATMUL = 19
    ROWS = 20
    KV_APPEND = 21
    CACHED_ATTN = 22
    KV_STORE_PAGED = 23
    PAGED_ATTN = 24


class SOp(IntEnum):
    NOP = 0
    LOAD = 1
    STORE = 2
    GATHER = 3
    SCATTER = 4
    PREFETCH = 5
    ALLOC = 6
    FREE = 7


class COp(IntEnum):
    NOP = 0
    LOOP = 3
    HALT = 4


DEP_D_NEEDS_S, DEP_S_NEEDS_D = 1 << 3, 1 << 4
DEPS = {"D<S": DEP_D_NEEDS_S, "S<D": DEP_S_NEEDS_D}
_REMOVED_DEPS = ("D>D", "S>S", "C>C", "C<D")
_REMOVED_C_OPS = {1: "barrier", 2: "sync"}
_REMOVED_WHY = (
    "a word's C slot runs after its D and S slots are done, and each word after the previous"
    " one, so it never waited for anything"
)
ACTIVATIONS = (None, "relu", "gelu", "silu")
FLAG_CAUSAL = 4
FLAG_ACC = 8
INT8_MAX_K = (2**31 - 1) // (128 * 128)
# The paged kernels' fixed scratch (vtpu.kernels.decoder.MAX_PAGE_TOKENS / MAX_HEAD_DIM).
MAX_PAGE_TOKENS = 256
MAX_HEAD_DIM = 1024

DTYPES = {1: "f32", 2: "i8", 3: "i32", 4: "i64", 5: "bf16",  # bf16: raw bits, as uint16
          6: "bf16lin", 7: "int8lin", 8: "int8dyn"}  # fmt: skip
# Linear weights packed for the encoder's reduced-precision kernels ("Packed Linear weights"):
# no numpy dtype, their binding is the kernel's weight object.
PACKED_WEIGHTS = ("bf16lin", "int8lin", "int8dyn")
NUMPY_DTYPES = {"f32": np.float32, "i8": np.int8, "i32": np.int32, "i64": np.int64,
                "bf16": np.uint16}  # fmt: skip
INITS = {0: "zeros", 1: "ones", 2: "random", 3: "input", 4: "scratch", 5: "resident", 6: "view",
         7: "inout"}  # fmt: skip
_DTYPE_CODE = {v: k for k, v in DTYPES.items()}
_INIT_CODE = {v: k for k, v in INITS.items()}

# Issue orders of the D and S slots of one word.
ORDER_PARALLEL, ORDER_S_FIRST, ORDER_D_FIRST = 0, 1, 2

SIW_DTYPE = np.dtype(
    {
        "names": [
            "fmt", "deps", "rsv0",
            "d_op", "d_flags", "d_dst", "d_a", "d_b", "d_c", "d_imm", "d_e",
            "s_op", "s_flags", "s_dst", "s_src", "s_idx", "s_tile", "s_rows", "s_rsv",
            "c_op", "c_flags", "c_target", "c_count",
            "rsv2", "rsv1",
        ],
        "formats": [
            "u1", "u1", "<u2",
            "u1", "u1", "<u2", "<u2", "<u2", "<u2", "<u4", "<u2",
            "u1", "u1", "<u2", "<u2", "<u2", "<u2", "<u2", "<u4",
            "u1", "u1", "<u2", "<u4",
            ("<u2", (9,)), "<u2",
        ],
        "offsets": [0, 1, 2, 4, 5, 6, 8, 10, 12, 14, 18, 20, 21, 22, 24, 26, 28, 30, 32,
                    36, 37, 38, 40, 44, 62],
        "itemsize": WORD_BYTES,
    }
)  # fmt: skip

_HEADER = struct.Struct("<4sHHII")
_ENTRY = struct.Struct("<HBBBBBBQ")

# Operand fields each opcode uses, in text order.
_D_OPERANDS = {
    DOp.NOP: (),
    DOp.GEMM: ("d_dst", "d_a", "d_b"),
    DOp.LINEAR: ("d_dst", "d_a", "d_b", "d_c"),
    DOp.ADD: ("d_dst", "d_a", "d_b"),
    DOp.MUL: ("d_dst", "d_a", "d_b"),
    DOp.LAYERNORM: ("d_dst", "d_a", "d_b", "d_c"),
    DOp.RMSNORM: ("d_dst", "d_a", "d_b"),
    DOp.SOFTMAX: ("d_dst", "d_a"),
    DOp.ATTENTION: ("d_dst", "d_a", "d_b", "d_c"),
    DOp.GEMM_I8: ("d_dst", "d_a", "d_b"),
    DOp.ADD_LAYERNORM: ("d_dst", "d_a", "d_b", "d_c"),
    DOp.ATTN_QKV: ("d_dst", "d_a", "d_b"),
    DOp.MEAN_POOL: ("d_dst", "d_a", "d_b"),
    DOp.L2NORM: ("d_dst", "d_a"),
    DOp.GELU: ("d_dst", "d_a"),
    DOp.ADD_RMSNORM: ("d_dst", "d_a", "d_b", "d_c"),
    DOp.QK_NORM_ROPE: ("d_dst", "d_a", "d_b", "d_c"),
    DOp.ATTN_GQA: ("d_dst", "d_a"),
    DOp.SWIGLU: ("d_dst", "d_a"),
    DOp.MATMUL: ("d_dst", "d_a", "d_b", "d_c"),
    DOp.ROWS: ("d_dst", "d_a", "d_b", "d_c"),
    DOp.KV_APPEND: ("d_dst", "d_a", "d_b"),
    DOp.CACHED_ATTN: ("d_dst", "d_a", "d_b", "d_c"),
    DOp.KV_STORE_PAGED: ("d_dst", "d_a", "d_b", "d_c", "d_e"),
    DOp.PAGED_ATTN: ("d_dst", "d_a", "d_b", "d_c"),
}
_S_OPERANDS = {
    SOp.NOP: (),
    SOp.LOAD: ("s_dst", "s_src"),
    SOp.STORE: ("s_dst", "s_src"),
    SOp.GATHER: ("s_dst", "s_src", "s_idx"),
    SOp.SCATTER: ("s_dst", "s_idx", "s_src"),
    SOp.PREFETCH: ("s_src",),
    SOp.ALLOC: ("s_dst",),
    SOp.FREE: ("s_dst",),
}
_S_TILED = (SOp.LOAD, SOp.STORE, SOp.PREFETCH)
_D_IMM = {
    DOp.LAYERNORM: "eps",
    DOp.RMSNORM: "eps",
    DOp.ATTENTION: "scale",
    DOp.ADD_LAYERNORM: "eps",
    DOp.ATTN_QKV: "scale",
    DOp.L2NORM: "eps",
    DOp.ADD_RMSNORM: "eps",
    DOp.QK_NORM_ROPE: "eps",
    DOp.KV_STORE_PAGED: "eps",
}
# D ops with the head count in their flags (heads=N in text), and ops whose last operand is
# optional (c = NONE: LINEAR's bias, MATMUL's and ROWS' int8 scale).
_HEADS_OPS = (DOp.ATTN_QKV, DOp.QK_NORM_ROPE, DOp.ATTN_GQA, DOp.KV_APPEND, DOp.CACHED_ATTN)
_LAYER_OPS = (DOp.KV_STORE_PAGED, DOp.PAGED_ATTN)  # the layer in the flags (layer=N)
_OPTIONAL_C = (DOp.LINEAR, DOp.MATMUL, DOp.ROWS)
# D ops that also read dst (they write part of it) or also write their first source.
_D_READS_DST = (DOp.QK_NORM_ROPE, DOp.KV_APPEND, DOp.KV_STORE_PAGED)
_D_WRITES_A = (DOp.ADD_RMSNORM, DOp.KV_STORE_PAGED)
# D ops whose dst may be their first source (row-wise kernels read a row before writing it).
_D_IN_PLACE = (DOp.LAYERNORM, DOp.RMSNORM, DOp.ADD_LAYERNORM, DOp.L2NORM, DOp.GELU, DOp.ADD,
               DOp.MUL, DOp.SOFTMAX)  # fmt: skip
_RESERVED_NAMES = {"causal", "acc"}
_BARE_FLAGS = {"causal": (DOp.ATTENTION, FLAG_CAUSAL), "acc": (DOp.GEMM, FLAG_ACC)}
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class ProgramError(ValueError):
    """A program was rejected: `reason` is a short category, `index` the offending word (None for
    the header or tensor table), `detail` what exactly was wrong and what to do."""

    def __init__(self, reason: str, index: int | None, detail: str, line: int | None = None):
        self.reason = reason
        self.index = index
        self.detail = detail
        self.line = line
        where = "program header" if index is None else f"word {index}"
        if line is not None:
            where = f"line {line} ({where})"
        super().__init__(f"{where}: {reason}: {detail}")


@dataclass(frozen=True)
class Limits:
    """What one program may ask of a node, so a client cannot make it allocate 100 GB or spin."""

    max_words: int = 65536
    max_tensors: int = 1024
    max_tensor_elements: int = 1 << 28  # 1 GiB of f32
    max_total_elements: int = 1 << 29
    max_loop_iterations: int = 10_000_000  # back-jumps taken over the whole run, nesting included


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a name in DTYPES
    shape: tuple[int, ...]
    init: str = "zeros"  # zeros | ones | random | input | scratch | resident | view
    seed: int = 0
    output: bool = False
    base: str = ""  # a view's base tensor (declared before it, not itself a view)
    offset: int = 0  # a view's first element in its base, in elements
    strides: tuple[int, ...] = ()  # a view's strides, in elements
    reg: int | None = None  # a register-relative view: offset + r[reg] * step
    step: int = 0  # elements per unit of the register

    def offset_at(self, value: int) -> int:
        """The view's first element when its register holds `value`."""
        return self.offset + value * self.step

    @property
    def contiguous(self) -> bool:
        """Row-major and dense: what the D kernels read and write."""
        return self.init != "view" or self.strides == c_strides(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        if self.dtype in PACKED_WEIGHTS:
            raise ValueError(f"{self.name!r} is a packed Linear weight: its binding has its bytes")
        return self.size * np.dtype(NUMPY_DTYPES[self.dtype]).itemsize

    def text(self) -> str:
        init = "" if self.init == "zeros" else f" {self.init}"
        if self.init == "random":
            init = f" random({self.seed})"
        if self.init == "view":
            offset = (
                f"{self.offset}" if self.reg is None else f"{self.offset}+r{self.reg}*{self.step}"
            )
            init = f" view({self.base},{offset},{','.join(str(s) for s in self.strides)})"
        dims = ",".join(str(d) for d in self.shape)
        return f".tensor {self.name} {self.dtype}[{dims}]{init}{' output' if self.output else ''}"


@dataclass
class Program:
    tensors: list[TensorSpec]
    words: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=SIW_DTYPE))

    def tensor_id(self, name: str) -> int:
        for i, t in enumerate(self.tensors):
            if t.name == name:
                return i
        raise KeyError(f"no tensor named {name!r}")

    def to_bytes(self) -> bytes:
        return encode(self)

    def to_text(self) -> str:
        return to_text(self)


def empty_words(n: int) -> np.ndarray:
    words = np.zeros(n, dtype=SIW_DTYPE)
    words["fmt"] = WORD_FORMAT
    return words


# --------------------------------------------------------------------------- binary


def encode(program: Program) -> bytes:
    """Program -> container bytes (the canonical encoding; decode(encode(p)) gives p back)."""
    parts = [b""]
    names = {t.name: i for i, t in enumerate(program.tensors)}
    for i, t in enumerate(program.tensors):
        name = t.name.encode()
        parts.append(
            _ENTRY.pack(
                i,
                _DTYPE_CODE[t.dtype],
                _INIT_CODE[t.init],
                int(t.output) | (VIEW_REG if t.reg is not None else 0),
                len(t.shape),
                len(name),
                t.reg or 0,
                t.offset if t.init == "view" else t.seed,
            )  # fmt: skip
        )
        parts.append(struct.pack(f"<{len(t.shape)}I", *t.shape))
        parts.append(name)
        if t.init == "view":
            parts.append(struct.pack(f"<H{len(t.strides)}I", names[t.base], *t.strides))
            if t.reg is not None:
                parts.append(struct.pack("<I", t.step))
    table = b"".join(parts)
    words_offset = _round_up(_HEADER.size + len(table), WORD_BYTES)
    header = _HEADER.pack(
        MAGIC, CONTAINER_VERSION, len(program.tensors), len(program.words), words_offset
    )
    pad = bytes(words_offset - _HEADER.size - len(table))
    words = np.ascontiguousarray(program.words, dtype=SIW_DTYPE).tobytes()
    return header + table + pad + words


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS, *, check: bool = True) -> Program:
    """Container bytes -> Program; any malformed input raises ProgramError, never anything else.

    With check=True (the default) the program is also validated against `limits`."""
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise ProgramError("truncated", None, f"{len(data)} bytes is shorter than the header")
    magic, version, n_tensors, n_words, words_offset = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProgramError("bad magic", None, f"expected {MAGIC!r}, found {magic!r}")
    if version != CONTAINER_VERSION:
        raise ProgramError(
            "bad version", None, f"container version {version}; this runtime reads version 1"
        )
    if n_tensors > limits.max_tensors:
        raise ProgramError(
            "limits", None, f"{n_tensors} tensors; at most {limits.max_tensors} allowed"
        )
    if n_words > limits.max_words:
        raise ProgramError("limits", None, f"{n_words} words; at most {limits.max_words} allowed")
    pos = _HEADER.size
    tensors = []
    for i in range(n_tensors):
        if pos + _ENTRY.size > len(data):
            raise ProgramError("truncated", None, f"tensor table ends inside entry {i}")
        tid, dtype, init, flags, ndim, name_len, rsv, seed = _ENTRY.unpack_from(data, pos)
        pos += _ENTRY.size
        end = pos + 4 * ndim + name_len
        if end > len(data):
            raise ProgramError("truncated", None, f"tensor table ends inside entry {i}")
        where = f"tensor entry {i}"
        if tid != i:
            raise ProgramError("bad tensor", None, f"{where} has id {tid}; ids must be 0..n-1")
        indexed = bool(flags & VIEW_REG) and init == _INIT_CODE["view"]
        if (
            (rsv and not indexed)
            or flags & ~(1 | VIEW_REG)
            or (flags & VIEW_REG and not indexed)
            or (seed and init not in (_INIT_CODE["random"], _INIT_CODE["view"]))
        ):
            raise ProgramError("reserved bytes", None, f"{where} has non-zero reserved bits")
        if dtype not in DTYPES:
            raise ProgramError("bad tensor", None, f"{where} has unknown dtype code {dtype}")
        if init not in INITS:
            raise ProgramError("bad tensor", None, f"{where} has unknown initialiser {init}")
        shape = struct.unpack_from(f"<{ndim}I", data, pos)
        try:
            name = data[pos + 4 * ndim : end].decode()
        except UnicodeDecodeError:
            raise ProgramError(
                "bad tensor", None, f"{where} has a name that is not UTF-8"
            ) from None
        pos = end
        if INITS[init] == "view":
            if pos + 2 + 4 * ndim > len(data):
                raise ProgramError("truncated", None, f"tensor table ends inside view {i}")
            base, *strides = struct.unpack_from(f"<H{ndim}I", data, pos)
            pos += 2 + 4 * ndim
            step = 0
            if indexed:
                if pos + 4 > len(data):
                    raise ProgramError("truncated", None, f"tensor table ends inside view {i}")
                (step,) = struct.unpack_from("<I", data, pos)
                pos += 4
            if base >= i:
                raise ProgramError(
                    "bad tensor", None, f"{where}: a view's base must be declared before it"
                )
            tensors.append(
                TensorSpec(
                    name,
                    DTYPES[dtype],
                    shape,
                    "view",
                    0,
                    bool(flags & 1),
                    tensors[base].name,
                    seed,
                    tuple(strides),
                    rsv if indexed else None,
                    step,
                )  # fmt: skip
            )
            continue
        tensors.append(TensorSpec(name, DTYPES[dtype], shape, INITS[init], seed, bool(flags & 1)))
    expected = _round_up(pos, WORD_BYTES)
    if words_offset != expected:
        raise ProgramError(
            "bad header",
            None,
            f"words_offset {words_offset}; the table ends so it must be {expected}",
        )
    if len(data) < words_offset:
        raise ProgramError("truncated", None, "data ends inside the table padding")
    if any(data[pos:words_offset]):
        raise ProgramError("reserved bytes", None, "padding after the tensor table is not zero")
    needed = words_offset + WORD_BYTES * n_words
    if len(data) != needed:
        what = "truncated" if len(data) < needed else "trailing bytes"
        raise ProgramError(
            what, None, f"{n_words} words need {needed} bytes in all, found {len(data)}"
        )
    words = np.frombuffer(data, dtype=SIW_DTYPE, count=n_words, offset=words_offset).copy()
    program = Program(tensors, words)
    if check:
        validate(program, limits)
    return program


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


# --------------------------------------------------------------------------- validation


def _check_tensors(program: Program, limits: Limits) -> None:
    n = len(program.tensors)
    if n > limits.max_tensors:
        raise ProgramError("limits", None, f"{n} tensors; at most {limits.max_tensors} allowed")
    seen: set[str] = set()
    total = 0
    for i, t in enumerate(program.tensors):
        where = f"tensor {i} ({t.name!r})"
        if not _NAME_RE.match(t.name) or len(t.name) > MAX_NAME or t.name in _RESERVED_NAMES:
            raise ProgramError(
                "bad tensor", None,
                f"{where}: a name is a letter or _ then letters, digits, _ (at most {MAX_NAME}),"
                " and not 'causal' or 'acc'",
            )  # fmt: skip
        if t.name in seen:
            raise ProgramError("bad tensor", None, f"{where}: name declared twice")
        seen.add(t.name)
        if t.dtype not in _DTYPE_CODE or t.init not in _INIT_CODE:
            raise ProgramError("bad tensor", None, f"{where}: unknown dtype or initialiser")
        if t.dtype in PACKED_WEIGHTS:
            _check_packed_tensor(t, where)
        if not 1 <= len(t.shape) <= MAX_NDIM or any(d < 1 for d in t.shape):
            raise ProgramError(
                "bad tensor", None, f"{where}: shape {t.shape} needs 1..{MAX_NDIM} dims, each >= 1"
            )
        if not 0 <= t.seed < 1 << 64 or (t.seed and t.init != "random"):
            raise ProgramError("bad tensor", None, f"{where}: seed only for random, 0..2**64-1")
        if t.init == "view":
            _check_view(program, i, t, where)
        elif t.base or t.offset or t.strides or t.reg is not None or t.step:
            raise ProgramError(
                "bad tensor", None, f"{where}: base/offset/strides/register only for a view"
            )
        if t.size > limits.max_tensor_elements:
            raise ProgramError(
                "limits", None,
                f"{where} has {t.size} elements; at most {limits.max_tensor_elements} allowed",
            )  # fmt: skip
        if t.init not in ("view", "resident", "inout"):  # none of them allocates
            total += t.size
    if total > limits.max_total_elements:
        raise ProgramError(
            "limits", None,
            f"tensors hold {total} elements in all; at most {limits.max_total_elements} allowed",
        )  # fmt: skip


def _check_packed_tensor(t: TensorSpec, where: str) -> None:
    """A packed Linear weight is a loaded model's: resident (K, N) or (layers, K, N), or a view
    of one (checked with the view); never arena memory, never an output."""
    if t.init not in ("resident", "view") or t.output:
        raise ProgramError(
            "bad tensor", None,
            f"{where}: a {t.dtype} packed Linear weight is bound from a loaded model: declare it"
            " resident (or a view of one), not " + ("output" if t.output else t.init),
        )  # fmt: skip
    if t.init == "resident" and len(t.shape) not in (2, 3):
        raise ProgramError(
            "bad tensor", None,
            f"{where}: a {t.dtype} weight is (K, N), or (layers, K, N) for a stack; got {t.shape}",
        )  # fmt: skip


def c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of `shape`, in elements."""
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


def _check_view(program: Program, i: int, t: TensorSpec, where: str) -> None:
    bases = {u.name: (j, u) for j, u in enumerate(program.tensors[:i])}
    if t.base not in bases:
        raise ProgramError(
            "bad tensor", None, f"{where}: view of {t.base!r}, which is not declared before it"
        )
    base = bases[t.base][1]
    if base.init == "view":
        raise ProgramError(
            "bad tensor", None, f"{where}: a view's base {t.base!r} must not itself be a view"
        )
    if base.dtype != t.dtype:
        raise ProgramError(
            "wrong dtype", None, f"{where}: a {t.dtype} view of {base.dtype} {t.base!r}"
        )
    if len(t.strides) != len(t.shape) or any(s < 0 for s in t.strides) or t.offset < 0:
        raise ProgramError(
            "bad tensor", None, f"{where}: a view needs one stride >= 0 per axis and offset >= 0"
        )
    if t.reg is not None:
        if not 0 <= t.reg < NUM_REGS:
            raise ProgramError(
                "bad register", None, f"{where}: r{t.reg}; the registers are r0..r{NUM_REGS - 1}"
            )
        if not 0 <= t.step < 1 << 32:
            raise ProgramError("bad tensor", None, f"{where}: a register's step is 0..2**32-1")
        if base.init == "scratch":
            raise ProgramError(
                "bad tensor", None,
                f"{where}: a register-relative view of scratch {t.base!r}; S.alloc moves it,"
                " so index a plain tensor instead",
            )  # fmt: skip
    elif t.step:
        raise ProgramError("bad tensor", None, f"{where}: a step without a register")
    if t.dtype in PACKED_WEIGHTS:
        _check_packed_view(t, base, where)
    last = t.offset + _span(t)
    if last >= base.size:
        raise ProgramError(
            "out of range", None,
            f"{where}: the view reaches element {last} of {t.base!r}, which has {base.size}",
        )  # fmt: skip


def _check_packed_view(t: TensorSpec, base: TensorSpec, where: str) -> None:
    """A view of a packed weight selects one whole (K, N) weight of its base (a stack's layer):
    the packing has no elements to offset into or stride over."""
    weight = base.shape[-2:]
    size = math.prod(weight)
    if t.shape != weight or t.strides != c_strides(weight) or t.offset % size or t.step % size:
        raise ProgramError(
            "bad tensor", None,
            f"{where}: a view of {t.dtype} {t.base!r} selects one whole weight: shape"
            f" {list(weight)}, strides {list(c_strides(weight))}, offset and step multiples of"
            f" {size}",
        )  # fmt: skip


def _span(t: TensorSpec) -> int:
    """Elements from a view's first element to its last."""
    return sum((d - 1) * s for d, s in zip(t.shape, t.strides, strict=True))


def roots(program: Program) -> list[int]:
    """Each tensor's memory owner: a view's base, else itself (for aliasing and races)."""
    ids = {t.name: i for i, t in enumerate(program.tensors)}
    return [ids.get(t.base, i) if t.init == "view" else i for i, t in enumerate(program.tensors)]


def _reserved_check(words: np.ndarray) -> None:
    """Vectorised structural checks: format byte, reserved bytes, opcode ranges."""
    checks = (
        ("bad version", words["fmt"] != WORD_FORMAT, "the word's format byte must be 1"),
        (
            "reserved bytes",
            (words["deps"] & (0xFF ^ DEP_D_NEEDS_S ^ DEP_S_NEEDS_D)) != 0,
            "deps bits 0-2 and 5-7 are reserved (D>D, S>S, C>C and C<D were removed: "
            + _REMOVED_WHY
            + ")",
        ),
        (
            "bad opcode",
            np.isin(words["c_op"], list(_REMOVED_C_OPS)),
            "C opcodes 1 and 2 (barrier, sync) were removed: " + _REMOVED_WHY,
        ),
        (
            "reserved bytes",
            words["rsv2"].any(axis=1),
            "bytes 44-61 are reserved (the word's phext address was removed: it was never used;"
            " phext coordinates address memory through the Phext Page Table)",
        ),
        ("reserved bytes", words["rsv0"] != 0, "bytes 2-3 are reserved"),
        (
            "reserved bytes",
            (words["d_e"] != 0) & (words["d_op"] != DOp.KV_STORE_PAGED),
            "bytes 18-19 (the D slot's operand e) are used by D.kv_store_paged only; else 0",
        ),
        ("reserved bytes", words["s_rsv"] != 0, "bytes 32-35 (S slot) are reserved"),
        ("reserved bytes", words["rsv1"] != 0, "bytes 62-63 are reserved"),
        ("bad opcode", words["d_op"] > max(DOp), f"D opcodes are 0..{max(DOp)}"),
        ("bad opcode", words["s_op"] > max(SOp), f"S opcodes are 0..{max(SOp)}"),
        ("bad opcode", words["c_op"] > max(COp), f"C opcodes are 0..{max(COp)}"),
        ("reserved bytes", words["s_flags"] != 0, "S flags are reserved"),
        (
            "reserved bytes",
            np.where(
                words["c_op"] == COp.LOOP,
                (words["c_flags"] & (0xFF ^ LOOP_REG ^ (NUM_REGS - 1)) != 0)
                | ((words["c_flags"] & (NUM_REGS - 1) != 0) & (words["c_flags"] & LOOP_REG == 0)),
                words["c_flags"] != 0,
            ),
            "C flags are reserved, but for C.loop's register (bit 3 set, bits 0-2 the register)",
        ),
    )
    bad = np.zeros(len(words), dtype=bool)
    for _, mask, _ in checks:
        bad |= mask
    if not bad.any():
        return
    first = int(np.argmax(bad))
    for reason, mask, detail in checks:
        if mask[first]:
            raise ProgramError(reason, first, detail)


def validate(program: Program, limits: Limits = DEFAULT_LIMITS) -> None:
    """Reject a program that could crash, hang, race or overrun the node; see the module doc."""
    _check_tensors(program, limits)
    words = program.words
    if words.dtype != SIW_DTYPE:
        raise ProgramError("bad header", None, "words must be a SIW_DTYPE array")
    n = len(words)
    if n > limits.max_words:
        raise ProgramError("limits", None, f"{n} words; at most {limits.max_words} allowed")
    if n == 0 or words["c_op"][-1] != COp.HALT:
        raise ProgramError(
            "missing halt", n - 1 if n else None, "the last word's C slot must be C.halt"
        )
    _reserved_check(words)
    # Words with nothing but a plain C op (NOP streams, halts) pass the vectorised checks alone.
    plain = (words["d_op"] == 0) & (words["s_op"] == 0) & (words["deps"] == 0)
    plain &= words["c_op"] != COp.LOOP
    for f in ("d_flags", "d_dst", "d_a", "d_b", "d_c", "d_imm", "s_dst", "s_src", "s_idx",
              "s_tile", "s_rows", "c_target", "c_count"):  # fmt: skip
        plain &= words[f] == 0
    names = SIW_DTYPE.names
    owners = roots(program)
    for i in np.flatnonzero(~plain).tolist():
        _check_word(program, i, dict(zip(names, words[i].tolist(), strict=True)), owners)
    _check_registers(program, _check_loops(words, limits))


def _check_word(program: Program, i: int, w: dict, owners: list[int]) -> None:
    tensors = program.tensors
    d_op, s_op, c_op = DOp(w["d_op"]), SOp(w["s_op"]), COp(w["c_op"])

    def operand(field_name: str, pipe: str) -> TensorSpec:
        tid = w[field_name]
        if tid >= len(tensors):
            raise ProgramError(
                "bad operand", i,
                f"{pipe} slot field {field_name[2:]} names tensor {tid}; the program declares"
                f" {len(tensors)} (ids 0..{len(tensors) - 1})",
            )  # fmt: skip
        return tensors[tid]

    def reserved_fields(fields: tuple[str, ...], used: tuple[str, ...], pipe: str) -> None:
        for f in fields:
            if f not in used and w[f] != 0:
                raise ProgramError(
                    "reserved bytes", i, f"{pipe}.{name} does not use field {f[2:]}; it must be 0"
                )

    # D slot
    name = d_op.name.lower()
    used = _D_OPERANDS[d_op]
    if d_op in _OPTIONAL_C and w["d_c"] == NONE:
        used = used[:3]
    reserved_fields(("d_dst", "d_a", "d_b", "d_c", "d_e"), _D_OPERANDS[d_op], "D")
    flags_allowed = {DOp.LINEAR: 3, DOp.ATTENTION: FLAG_CAUSAL, DOp.GEMM: FLAG_ACC,
                     **dict.fromkeys(_HEADS_OPS + _LAYER_OPS, 0xFF)}.get(d_op, 0)  # fmt: skip
    if w["d_flags"] & ~flags_allowed:
        raise ProgramError("reserved bytes", i, f"D.{name} flags {w['d_flags']:#x} not defined")
    imm = float(np.uint32(w["d_imm"]).view(np.float32))
    if d_op in _D_IMM:
        if w["d_imm"] and not (math.isfinite(imm) and imm > 0):
            raise ProgramError("bad operand", i, f"D.{name} {_D_IMM[d_op]}={imm} must be > 0")
    elif w["d_imm"]:
        raise ProgramError("reserved bytes", i, f"D.{name} takes no immediate; it must be 0")
    d_specs = [operand(f, "D") for f in used]
    _check_packed_readers(i, f"D.{name}", d_specs, used, d_op == DOp.LINEAR)
    if d_op != DOp.NOP:
        for spec in d_specs:
            if not spec.contiguous:
                raise ProgramError(
                    "bad operand", i,
                    f"D.{name}: {spec.name!r} is a strided view; D operands are dense row-major"
                    " (S.load it into a plain tensor first)",
                )  # fmt: skip
        _check_d_shapes(i, name, d_op, d_specs, w)
        _check_d_aliasing(program, i, f"D.{name}", d_op, w, owners)

    # S slot
    name = s_op.name.lower()
    used = _S_OPERANDS[s_op]
    reserved_fields(("s_dst", "s_src", "s_idx"), used, "S")
    if s_op not in _S_TILED and (w["s_tile"] or w["s_rows"]):
        raise ProgramError("reserved bytes", i, f"S.{name} takes no tile/rows; they must be 0")
    s_specs = [operand(f, "S") for f in used]
    _check_packed_readers(i, f"S.{name}", s_specs, used, False)
    if s_op != SOp.NOP:
        _check_s_shapes(i, name, s_op, s_specs, w)
        if s_op in (SOp.GATHER, SOp.SCATTER):
            for spec in s_specs:
                if not spec.contiguous:
                    raise ProgramError(
                        "bad operand", i, f"S.{name}: {spec.name!r} must be dense, not strided"
                    )
        if s_op in (SOp.LOAD, SOp.STORE, SOp.GATHER, SOp.SCATTER):
            _check_writable(program, i, f"S.{name}", w["s_dst"], owners)

    # C slot
    if c_op != COp.LOOP and (w["c_target"] or w["c_count"]):
        raise ProgramError(
            "reserved bytes", i, f"C.{c_op.name.lower()} takes no target/count; they must be 0"
        )
    if c_op == COp.LOOP and w["c_target"] > i:
        raise ProgramError(
            "bad loop", i, f"C.loop target {w['c_target']} is forward; it must be <= {i}"
        )
    issue_order(program, i, w, owners)


def _check_packed_readers(
    i: int, label: str, specs: list[TensorSpec], fields: tuple[str, ...], linear: bool
) -> None:
    """Packed Linear weights are read by D.linear's weight operand and by nothing else."""
    for f, spec in zip(fields, specs, strict=True):
        if spec.dtype in PACKED_WEIGHTS and not (linear and f == "d_b"):
            raise ProgramError(
                "wrong dtype", i,
                f"{label}: {spec.name!r} is a {spec.dtype} packed Linear weight; only D.linear's"
                " weight operand (w) reads one",
            )  # fmt: skip


def _check_writable(program: Program, i: int, label: str, tid: int, owners: list[int]) -> None:
    owner = program.tensors[owners[tid]]
    if owner.init == "resident":
        raise ProgramError(
            "read-only", i,
            f"{label}: writes {program.tensors[tid].name!r}, which is resident {owner.name!r};"
            " resident tensors are read-only",
        )  # fmt: skip


def _check_d_aliasing(
    program: Program, i: int, label: str, op: DOp, w: dict, owners: list[int]
) -> None:
    """dst must not share memory with a source, except a row-wise op writing over its first
    source(s) exactly (the same tensor)."""
    dst = w["d_dst"]
    _check_writable(program, i, label, dst, owners)
    if op in _D_WRITES_A:  # add_rmsnorm leaves the residual sum in x: x is written too
        x = w["d_a"]
        _check_writable(program, i, label, x, owners)
        others = {owners[w[f]] for f in _D_OPERANDS[op][2:] if w[f] != NONE}
        if owners[x] in others:
            raise ProgramError(
                "bad operand", i, f"{label}: x {program.tensors[x].name!r} (written with the"
                " residual sum) shares memory with another source",
            )  # fmt: skip
    exact = ("d_a", "d_b") if op in (DOp.ADD_LAYERNORM, DOp.ADD, DOp.MUL) else ("d_a",)
    for f in _D_OPERANDS[op][1:]:
        src = w[f]
        if src == NONE or owners[src] != owners[dst]:
            continue
        if src == dst and op in _D_IN_PLACE and f in exact:
            continue
        raise ProgramError(
            "bad operand", i,
            f"{label}: dst {program.tensors[dst].name!r} shares memory with source"
            f" {program.tensors[src].name!r}" + (
                "; only the same tensor as its first source may be overwritten"
                if op in _D_IN_PLACE else "; give dst its own tensor"),
        )  # fmt: skip


def _shape_error(i: int, name: str, detail: str) -> ProgramError:
    return ProgramError("shape mismatch", i, f"{name}: {detail}")


def _need_dtype(i: int, name: str, specs: list[TensorSpec], dtypes: tuple[str, ...]) -> None:
    for t, want in zip(specs, dtypes, strict=False):
        if t.dtype != want:
            raise ProgramError(
                "wrong dtype", i, f"{name}: tensor {t.name!r} is {t.dtype}, needs {want}"
            )


def _check_d_shapes(i: int, name: str, op: DOp, t: list[TensorSpec], w: dict) -> None:
    name = f"D.{name}"
    if op in _DECODER_CHECKS:
        _DECODER_CHECKS[op](i, name, t, w)
        if any(w[f] == w["d_dst"] for f in _D_OPERANDS[op][1:]):
            raise ProgramError("bad operand", i, f"{name}: dst must not also be a source")
        return
    if op == DOp.GEMM_I8:
        _need_dtype(i, name, t, ("i32", "i8", "i8"))
    elif op in (DOp.ATTN_QKV, DOp.MEAN_POOL):
        _need_dtype(i, name, t[:2], ("f32", "f32"))
        if t[2].dtype != "i32" or len(t[2].shape) != 1:
            raise ProgramError(
                "wrong dtype", i, f"{name}: lengths {t[2].name!r} must be 1-D i32 (one per batch)"
            )
    elif op == DOp.LINEAR:
        _need_dtype(i, name, t[:2] + t[3:], ("f32",) * 3)
        if t[2].dtype not in ("f32", *PACKED_WEIGHTS):
            raise ProgramError(
                "wrong dtype", i,
                f"{name}: weight {t[2].name!r} is {t[2].dtype}; D.linear reads f32 (K, N) or a"
                f" packed Linear weight ({', '.join(PACKED_WEIGHTS)})",
            )  # fmt: skip
    else:
        _need_dtype(i, name, t, ("f32",) * 4)
    s = [x.shape for x in t]
    if op in (DOp.GEMM, DOp.GEMM_I8, DOp.LINEAR):
        if len(s[1]) != 2 or len(s[2]) != 2 or len(s[0]) != 2:
            raise _shape_error(i, name, f"needs 2-D operands, got {s[0]}, {s[1]}, {s[2]}")
        (m, k), (k2, n) = s[1], s[2]
        if k != k2:
            raise _shape_error(i, name, f"inner dims differ: {s[1]} @ {s[2]} ({k} != {k2})")
        if s[0] != (m, n):
            raise _shape_error(i, name, f"dst {t[0].name!r} is {s[0]}, the product is {(m, n)}")
        if op == DOp.GEMM_I8 and k > INT8_MAX_K:
            raise _shape_error(i, name, f"k={k} could overflow int32; split it (k <= {INT8_MAX_K})")
        if len(s) == 4 and s[3] != (n,):
            raise _shape_error(i, name, f"bias {t[3].name!r} is {s[3]}, needs ({n},)")
    elif op in (DOp.ADD, DOp.MUL):
        if s[2] != s[1] and s[2] != (s[1][-1],):
            raise _shape_error(
                i, name, f"b {s[2]} must equal a {s[1]} or be a row vector ({s[1][-1]},)"
            )
        if s[0] != s[1]:
            raise _shape_error(i, name, f"dst is {s[0]}, a is {s[1]}")
    elif op in (DOp.LAYERNORM, DOp.RMSNORM, DOp.SOFTMAX):
        if s[0] != s[1]:
            raise _shape_error(i, name, f"dst is {s[0]}, x is {s[1]}")
        for extra in s[2:]:
            if extra != (s[1][-1],):
                raise _shape_error(i, name, f"gamma/beta is {extra}, needs ({s[1][-1]},)")
    elif op == DOp.ADD_LAYERNORM:
        if s[0] != s[1] or s[2] != s[1]:
            raise _shape_error(i, name, f"dst {s[0]}, x {s[1]} and residual {s[2]} must match")
        if s[3] != (2, s[1][-1]):
            raise _shape_error(
                i, name, f"gamma_beta is {s[3]}, needs (2, {s[1][-1]}): gamma then beta"
            )
    elif op in (DOp.L2NORM, DOp.GELU):
        if s[0] != s[1]:
            raise _shape_error(i, name, f"dst is {s[0]}, x is {s[1]}")
    elif op == DOp.ATTN_QKV:
        heads = w["d_flags"]
        if len(s[1]) != 3 or heads < 1 or s[1][2] % (3 * heads):
            raise _shape_error(
                i, name, f"qkv {s[1]} must be (batch, seq, 3 x heads x d) with heads={heads} >= 1"
            )
        bsz, seq, width = s[1]
        if s[0] != (bsz, seq, width // 3):
            raise _shape_error(i, name, f"dst is {s[0]}, needs {(bsz, seq, width // 3)}")
        if s[2] != (bsz,):
            raise _shape_error(i, name, f"lengths is {s[2]}, needs ({bsz},)")
    elif op == DOp.MEAN_POOL:
        if len(s[1]) != 3 or s[0] != (s[1][0], s[1][2]) or s[2] != (s[1][0],):
            raise _shape_error(
                i, name, f"x (batch, seq, d), lengths (batch,) -> dst (batch, d); got x {s[1]},"
                f" lengths {s[2]}, dst {s[0]}",
            )  # fmt: skip
    elif op == DOp.ATTENTION:
        if any(len(x) != 3 for x in s):
            raise _shape_error(i, name, f"needs 3-D (heads, seq, d) operands, got {s}")
        (h, _, d), (hk, _, dk) = s[1], s[2]
        if s[2] != s[3] or d != dk or h % hk:
            raise _shape_error(
                i, name, f"q {s[1]}, k {s[2]}, v {s[3]}: k and v must match, with q's head size"
                " and a head count that divides q's",
            )  # fmt: skip
        if s[0] != s[1]:
            raise _shape_error(i, name, f"dst is {s[0]}, needs q's shape {s[1]}")
    if op in (DOp.GEMM, DOp.GEMM_I8, DOp.LINEAR, DOp.ATTENTION):
        fields = _D_OPERANDS[op][1:]
        if any(w[f] == w["d_dst"] for f in fields):
            raise ProgramError("bad operand", i, f"{name}: dst must not also be a source")


def _ints(i: int, name: str, t: TensorSpec, what: str) -> None:
    if t.dtype not in ("i32", "i64"):
        raise ProgramError("wrong dtype", i, f"{name}: {what} {t.name!r} must be i32 or i64")


def _gqa_heads(i: int, name: str, heads: int, width: int, d: int) -> int:
    """kv_heads of a packed (heads + 2 kv_heads) x d projection, or ProgramError."""
    rest = width // d - heads if d and width % d == 0 else -1
    if heads < 1 or rest < 2 or rest % 2 or heads % (rest // 2):
        raise _shape_error(
            i, name, f"a packed q|k|v row of {width} is not (heads={heads} + 2 kv_heads) x"
            f" head_dim={d} with heads a multiple of kv_heads",
        )  # fmt: skip
    return rest // 2


def _check_add_rmsnorm(i: int, name: str, t: list[TensorSpec], w: dict) -> None:
    _need_dtype(i, name, t, ("f32",) * 4)
    dst, x, res, gamma = (u.shape for u in t)
    if not dst == x == res or gamma != (x[-1],):
        raise _shape_error(
            i, name, f"dst {dst}, x {x} and residual {res} must match, gamma ({x[-1]},); got"
            f" gamma {gamma}",
        )  # fmt: skip


def _check_qk_norm_rope(i: int, name: str, t: list[TensorSpec], w: dict) -> None:
    _need_dtype(i, name, t[:3], ("f32",) * 3)
    _ints(i, name, t[3], "positions")
    qkv, gammas, inv_freq, positions = (u.shape for u in t)
    if len(qkv) != 3 or len(gammas) != 2 or gammas[0] != 2 or gammas[1] % 2:
        raise _shape_error(
            i, name, f"qkv (batch, seq, width) and gammas (2, head_dim) (q's then k's, head_dim"
            f" even); got qkv {qkv}, gammas {gammas}",
        )  # fmt: skip
    d = gammas[1]
    _gqa_heads(i, name, w["d_flags"], qkv[2], d)
    if inv_freq != (d // 2,) or positions != qkv[:2]:
        raise _shape_error(
            i, name, f"inv_freq must be ({d // 2},) and positions {qkv[:2]}; got {inv_freq},"
            f" {positions}",
        )  # fmt: skip


def _check_attn_gqa(i: int, name: str, t: list[TensorSpec], w: dict) -> None:
    _need_dtype(i, name, t, ("f32", "f32"))
    dst, qkv = t[0].shape, t[1].shape
    heads = w["d_flags"]
    if len(qkv) != 3 or len(dst) != 3 or dst[:2] != qkv[:2] or heads < 1 or dst[2] % heads:
        raise _shape_error(
            i, name, f"qkv (batch, seq, width) -> dst (batch, seq, heads={heads} x head_dim);"
            f" got qkv {qkv}, dst {dst}",
        )  # fmt: skip
    _gqa_heads(i, name, heads, qkv[2], dst[2] // heads)


def _check_swiglu(i: int, name: str, t: list[TensorSpec], w: dict) -> None:
    _need_dtype(i, name, t, ("f32", "f32"))
    dst, x = t[0].shape, t[1].shape
    if x[-1] % 2 or dst != (*x[:-1], x[-1] // 2):
        raise _shape_error(
            i, name, f"x (..., 2n) gate then up -> dst (..., n); got x {x}, dst {dst}"
        )


def _check_packed(i: int, name: str, w: TensorSpec, scale: TensorSpec | None) -> None:
    """A packed weight (N, K): f32, bf16 bits, or i8 with its f32 (N,) per-row scale."""
    if w.dtype not in ("f32", "bf16", "i8") or len(w.shape) != 2:
        raise ProgramError(
            "wrong dtype", i, f"{name}: weight {w.name!r} must be 2-D (N, K) f32, bf16 or i8"
        )
    if (w.dtype == "i8") != (scale is not None):
        raise ProgramError(
            "bad operand", i, f"{name}: an i8 weight takes an f32 (N,) scale, others none"
        )
    if scale is not None and (scale.dtype != "f32" or scale.shape != (w.shape[0],)):
        raise _shape_error(i, name, f"scale {scale.name!r} must be f32 ({w.shape[0]},)")


def _check_matmul(i: int, name: str, t: list[TensorSpec], w: dict) -> None:
    _need_dtype(i, name, t[:2], ("f32", "f32"))
    _check_packed(i, name, t[2], t[3] if len(t) > 3 else None)
    dst, x, (n, k) = t[0].shape, t[1].shape, t[2].shape
    if len(x) != 2 or x[1] != k or dst != (x[0], n):
        raise _shape_error(
            i, name, f"x (m, {k}) @ W({n}, {k}).T -> dst (m, {n}); got x {x}, dst {dst}"
        )


def _check_rows(i: int, name: str, t: list[TensorSpec], w: dict) -> None:
    _need_dtype(i, name, t[:1], ("f32",))
    _check_packed(i, name, t[1], t[3] if len(t) > 3 else None)
    _ints(i, name, t[2], "index")
    dst, (_, k), idx = t[0].shape, t[1].shape, t[2].shape
    if len(idx) != 1 or dst != (idx[0], k):
        raise _shape_error(i, name, f"index (r,) -> dst (r, {k}); got index {idx}, dst {dst}")


def _check_cache(i: int, name: str, cache: TensorSpec, qkv: TensorSpec, heads: int) -> None:
    c, q = cache.shape, qkv.shape
    if len(c) != 5 or c[0] != 2 or len(q) != 3 or c[1] != q[0]:
        raise _shape_error(
            i, name, f"cache (2, batch, kv_heads, tokens, head_dim) for qkv (batch, seq, width);"
            f" got cache {c}, qkv {q}",
        )  # fmt: skip
    if _gqa_heads(i, name, heads, q[2], c[4]) != c[2]:
        raise _shape_error(i, name, f"cache has {c[2]} kv heads; qkv {q} holds another count")


def _check_kv_append(i: int, name: str, t: list[TensorSpec], w: dict) -> None:
    _need_dtype(i, name, t[:2], ("f32", "f32"))
    _ints(i, name, t[2], "positions")
    _check_cache(i, name, t[0], t[1], w["d_flags"])
    if t[2].shape != t[1].shape[:2]:
        raise _shape_error(i, name, f"positions must be {t[1].shape[:2]}, got {t[2].shape}")


def _check_cached_attn(i: int, name: str, t: list[TensorSpec], w: dict) -> None:
    _need_dtype(i, name, t[:3], ("f32",) * 3)
    _ints(i, name, t[3], "positions")
    dst, qkv, cache, positions = t
    _check_cache(i, name, cache, qkv, w["d_flags"])
    bsz, seq, _ = qkv.shape
    want = (bsz, 1, w["d_flags"] * cache.shape[4])
    if seq != 1 or positions.shape != (bsz, 1) or dst.shape != want:
        raise _shape_error(
            i, name, f"one token per sequence: qkv (batch, 1, width), positions (batch, 1) ->"
            f" dst {want}; got qkv {qkv.shape}, positions {positions.shape}, dst {dst.shape}",
        )  # fmt: skip


def _paged_dims(i: int, name: str, kv: TensorSpec, d: int, layer: int) -> tuple[int, int]:
    """(kv_heads, page_tokens) of a KV arena (frames, layers, 2, kv_heads, P * d), or the
    reason it is not one for head_dim d and this layer."""
    s = kv.shape
    if kv.dtype != "f32" or len(s) != 5 or s[2] != 2:
        raise _shape_error(
            i, name, f"kv {kv.name!r} must be f32 (frames, layers, 2, kv_heads, P x head_dim);"
            f" got {kv.dtype}{list(s)}",
        )  # fmt: skip
    if not 0 < d <= MAX_HEAD_DIM or d % 2 or s[4] % d or not s[4] // d <= MAX_PAGE_TOKENS:
        raise _shape_error(
            i, name, f"head_dim {d} (even, <= {MAX_HEAD_DIM}) must divide kv's {s[4]} into at"
            f" most {MAX_PAGE_TOKENS} tokens a page",
        )  # fmt: skip
    if layer >= s[1]:
        raise ProgramError("out of range", i, f"{name}: layer={layer}; kv holds {s[1]} layers")
    return s[3], s[4] // d


def _paged_qkv(i: int, name: str, qkv: TensorSpec, d: int, kv_heads: int) -> int:
    """Query heads of a packed (b, s, (heads + 2 kv_heads) x d) projection."""
    q = qkv.shape
    heads = q[2] // d - 2 * kv_heads if len(q) == 3 and q[2] % d == 0 else 0
    if qkv.dtype != "f32" or heads < 1 or heads % kv_heads:
        raise _shape_error(
            i, name, f"qkv must be f32 (batch, seq, (heads + 2 x {kv_heads}) x {d}) with heads a"
            f" multiple of {kv_heads}; got {qkv.dtype}{list(q)}",
        )  # fmt: skip
    return heads


def _check_page_table(i: int, name: str, pages: TensorSpec, bsz: int) -> None:
    if pages.dtype != "i64" or len(pages.shape) != 2 or pages.shape[0] != bsz:
        raise _shape_error(
            i, name, f"pages {pages.name!r} must be i64 ({bsz}, 1 + max_pages); got"
            f" {pages.dtype}{list(pages.shape)}",
        )  # fmt: skip
    if pages.shape[1] < 2:
        raise _shape_error(i, name, f"pages {pages.name!r} holds no page column")


def _check_kv_store_paged(i: int, name: str, t: list[TensorSpec], w: dict) -> None:
    kv, qkv, gammas, rope, pages = t
    if gammas.dtype != "f32" or len(gammas.shape) != 2 or gammas.shape[0] != 2:
        raise _shape_error(i, name, f"gammas must be f32 (2, head_dim), got {list(gammas.shape)}")
    d = gammas.shape[1]
    kv_heads, _ = _paged_dims(i, name, kv, d, w["d_flags"])
    _paged_qkv(i, name, qkv, d, kv_heads)
    bsz, seq, _ = qkv.shape
    if rope.dtype != "f32" or rope.shape != (2, bsz * seq, d):
        raise _shape_error(
            i, name, f"rope must be f32 (2, {bsz * seq}, {d}): cos then sin per row; got"
            f" {rope.dtype}{list(rope.shape)}",
        )  # fmt: skip
    _check_page_table(i, name, pages, bsz)


def _check_paged_attn(i: int, name: str, t: list[TensorSpec], w: dict) -> None:
    dst, qkv, kv, pages = t
    q, o = qkv.shape, dst.shape
    kv_heads = kv.shape[3] if len(kv.shape) == 5 else 0
    width = q[2] - o[2] if len(q) == 3 and len(o) == 3 else 0
    if not kv_heads or width <= 0 or width % (2 * kv_heads) or o[:2] != q[:2]:
        raise _shape_error(
            i, name, f"qkv (batch, seq, (heads + 2 kv_heads) x d) -> dst (batch, seq, heads x"
            f" d) over kv (frames, layers, 2, kv_heads, P x d); got qkv {q}, dst {o}, kv"
            f" {kv.shape}",
        )  # fmt: skip
    d = width // (2 * kv_heads)
    _paged_dims(i, name, kv, d, w["d_flags"])
    heads = _paged_qkv(i, name, qkv, d, kv_heads)
    if dst.dtype != "f32" or o[2] != heads * d:
        raise _shape_error(i, name, f"dst must be f32 (batch, seq, {heads * d}), got {o}")
    _check_page_table(i, name, pages, q[0])


_DECODER_CHECKS = {
    DOp.ADD_RMSNORM: _check_add_rmsnorm,
    DOp.QK_NORM_ROPE: _check_qk_norm_rope,
    DOp.ATTN_GQA: _check_attn_gqa,
    DOp.SWIGLU: _check_swiglu,
    DOp.MATMUL: _check_matmul,
    DOp.ROWS: _check_rows,
    DOp.KV_APPEND: _check_kv_append,
    DOp.CACHED_ATTN: _check_cached_attn,
    DOp.KV_STORE_PAGED: _check_kv_store_paged,
    DOp.PAGED_ATTN: _check_paged_attn,
}


def _check_s_shapes(i: int, name: str, op: SOp, t: list[TensorSpec], w: dict) -> None:
    name = f"S.{name}"
    if op in (SOp.LOAD, SOp.STORE, SOp.PREFETCH):
        tile, rows = w["s_tile"], w["s_rows"]
        if rows < 1:
            raise ProgramError("bad operand", i, f"{name}: rows must be >= 1")
        if op == SOp.PREFETCH:
            tiled, other = t[0], None
        else:
            dst, src = t
            tiled, other = (src, dst) if op == SOp.LOAD else (dst, src)
            if w["s_dst"] == w["s_src"]:
                raise ProgramError("bad operand", i, f"{name}: dst and src are the same tensor")
            if dst.dtype != src.dtype:
                raise ProgramError(
                    "wrong dtype", i, f"{name}: {dst.name!r} is {dst.dtype}, {src.name!r} is"
                    f" {src.dtype}",
                )  # fmt: skip
            if dst.shape[1:] != src.shape[1:]:
                raise _shape_error(i, name, f"rows of {dst.shape} and {src.shape} differ")
            if rows > other.shape[0]:
                raise ProgramError(
                    "out of range", i, f"{name}: {rows} rows, {other.name!r} has {other.shape[0]}"
                )
        if (tile + 1) * rows > tiled.shape[0]:
            raise ProgramError(
                "out of range", i,
                f"{name}: tile {tile} of {rows} rows ends at row {(tile + 1) * rows};"
                f" {tiled.name!r} has {tiled.shape[0]}",
            )  # fmt: skip
    elif op in (SOp.GATHER, SOp.SCATTER):
        if op == SOp.GATHER:
            dst, table, idx = t
        else:
            table, idx, dst = t
        if idx.dtype not in ("i32", "i64") or len(idx.shape) != 1:
            raise ProgramError(
                "wrong dtype", i, f"{name}: index {idx.name!r} must be 1-D i32 or i64"
            )
        if table.dtype != dst.dtype:
            raise ProgramError(
                "wrong dtype", i, f"{name}: table is {table.dtype} but rows are {dst.dtype}"
            )
        if dst.shape != idx.shape + table.shape[1:]:
            raise _shape_error(
                i, name, f"rows {dst.shape} must be {idx.shape + table.shape[1:]} for that index"
            )
        if idx.init == "ones" and table.shape[0] < 2:
            raise ProgramError("out of range", i, f"{name}: index 1 beyond a 1-row table")
    elif op in (SOp.ALLOC, SOp.FREE):
        if t[0].init != "scratch":
            raise ProgramError("bad operand", i, f"{name}: {t[0].name!r} is not declared scratch")


def _rw_sets(
    w: dict, owners: list[int] | None = None
) -> tuple[set[int], set[int], set[int], set[int]]:
    """Tensors each slot reads and writes; with `owners` (roots()), the memory they alias."""
    d_op, s_op = w["d_op"], w["s_op"]
    d_reads = {w[f] for f in _D_OPERANDS[d_op][1:] if w[f] != NONE}
    d_writes = {w["d_dst"]} if d_op else set()
    if (w["d_flags"] & FLAG_ACC and d_op == DOp.GEMM) or d_op in _D_READS_DST:
        d_reads.add(w["d_dst"])
    if d_op in _D_WRITES_A:
        d_writes.add(w["d_a"])
    s_fields = _S_OPERANDS[s_op]
    s_writes = {w["s_dst"]} if "s_dst" in s_fields else set()
    s_reads = {w[f] for f in s_fields if f != "s_dst"}
    sets = (d_reads, d_writes, s_reads, s_writes)
    if owners is not None:
        n = len(owners)
        sets = tuple({owners[t] if t < n else t for t in ids} for ids in sets)
    return sets


# D ops that write every element of their dst (and nothing else) whatever the data: the
# written_first analysis may rely on them. GEMM only without FLAG_ACC (which reads dst).
_D_FULL_WRITE = (DOp.GEMM, DOp.LINEAR, DOp.ADD, DOp.MUL, DOp.LAYERNORM, DOp.RMSNORM,
                 DOp.SOFTMAX, DOp.ADD_LAYERNORM, DOp.ATTN_QKV, DOp.MEAN_POOL, DOp.L2NORM,
                 DOp.GELU, DOp.MATMUL)  # fmt: skip


def written_first(program: Program, owners: list[int] | None = None) -> set[int]:
    """The tensors whose whole memory the program writes before anything reads it: for each,
    the first word that touches it (in program order, which is issue order up to the first
    back-jump: loops only jump back) writes all of it, through the tensor itself or a view
    covering it exactly, with a D op of _D_FULL_WRITE or S.gather, and neither slot of that
    word reads it. Initialising such a tensor (zeros, ones, random) cannot be observed, so the
    executor skips it (a one-sentence forward zeroed ~0.5 MB of activations it then overwrote;
    a 32 x 128 batch, 69 MB)."""
    owners = roots(program) if owners is None else owners
    tensors = program.tensors

    def covers(t: int) -> bool:
        spec = tensors[t]
        if spec.init != "view":
            return True
        return (spec.reg is None and spec.offset == 0 and spec.contiguous
                and spec.size == tensors[owners[t]].size)  # fmt: skip

    seen: set[int] = set()
    first: set[int] = set()
    for row in program.words.tolist():
        w = dict(zip(SIW_DTYPE.names, row, strict=True))
        d_reads, d_writes, s_reads, s_writes = _rw_sets(w, owners)
        full: set[int] = set()
        d_op = w["d_op"]
        if d_op in _D_FULL_WRITE and not (d_op == DOp.GEMM and w["d_flags"] & FLAG_ACC):
            if covers(w["d_dst"]):
                full.add(owners[w["d_dst"]])
        if w["s_op"] == SOp.GATHER and covers(w["s_dst"]):
            full.add(owners[w["s_dst"]])
        touched = d_reads | d_writes | s_reads | s_writes
        for t in touched - seen:
            only_written = t not in d_reads and t not in s_reads and not (
                t in d_writes and t in s_writes)  # fmt: skip
            if t in full and only_written:
                first.add(t)
        seen |= touched
    return first


def issue_order(
    program: Program, i: int, w: dict | None = None, owners: list[int] | None = None
) -> int:
    """ORDER_PARALLEL / ORDER_S_FIRST / ORDER_D_FIRST for word i, or ProgramError if cyclic."""
    if w is None:
        w = dict(zip(SIW_DTYPE.names, program.words[i].tolist(), strict=True))
    deps, d_op, s_op = w["deps"], w["d_op"], w["s_op"]
    waits = (
        (DEP_D_NEEDS_S, s_op, "D<S waits on the S slot, which is a nop"),
        (DEP_S_NEEDS_D, d_op, "S<D waits on the D slot, which is a nop"),
    )
    for bit, producer, detail in waits:
        if deps & bit and not producer:
            raise ProgramError("cyclic dependency", i, f"{detail}; it would never be satisfied")
    if deps & DEP_D_NEEDS_S and deps & DEP_S_NEEDS_D:
        raise ProgramError("cyclic dependency", i, "D<S and S<D: each slot waits for the other")
    if deps & DEP_D_NEEDS_S:
        return ORDER_S_FIRST
    if deps & DEP_S_NEEDS_D:
        return ORDER_D_FIRST
    owners = roots(program) if owners is None else owners
    d_reads, d_writes, s_reads, s_writes = _rw_sets(w, owners)
    names = [t.name for t in program.tensors]

    def show(ids: set[int]) -> str:
        return ", ".join(repr(names[t]) if t < len(names) else str(t) for t in sorted(ids))

    s_must_go_first = d_writes & s_reads
    d_must_go_first = s_writes & d_reads
    if s_must_go_first and d_must_go_first:
        raise ProgramError(
            "cyclic dependency", i,
            f"D writes {show(s_must_go_first)} which S reads, and S writes"
            f" {show(d_must_go_first)} which D reads; no issue order gives both their old"
            " values: split the word in two",
        )  # fmt: skip
    if d_writes & s_writes:
        raise ProgramError(
            "data race", i,
            f"D and S both write {show(d_writes & s_writes)}; set D<S or S<D to order them",
        )  # fmt: skip
    if s_must_go_first:
        return ORDER_S_FIRST
    if d_must_go_first:
        return ORDER_D_FIRST
    return ORDER_PARALLEL


@dataclass(frozen=True)
class Loop:
    """A C.loop: its body is words target..end (the LOOP word included), run count + 1 times;
    `reg` the register holding the pass's index (0..count), or None."""

    target: int
    end: int
    count: int
    reg: int | None


def loops_of(words: np.ndarray) -> list[Loop]:
    """The program's loops, outermost first (sorted by target, then longest body first)."""
    out = []
    for j in np.flatnonzero(words["c_op"] == COp.LOOP).tolist():
        flags = int(words["c_flags"][j])
        reg = flags & (NUM_REGS - 1) if flags & LOOP_REG else None
        out.append(Loop(int(words["c_target"][j]), j, int(words["c_count"][j]), reg))
    return sorted(out, key=lambda lp: (lp.target, -lp.end))


def _check_loops(words: np.ndarray, limits: Limits) -> list[Loop]:
    loops = loops_of(words)
    stack: list[tuple[Loop, int]] = []  # (loop, multiplicity of one pass of its body)
    jumps = 0
    for loop in loops:
        target, end, count = loop.target, loop.end, loop.count
        while stack and stack[-1][0].end < target:
            stack.pop()
        if stack and end > stack[-1][0].end:
            raise ProgramError(
                "bad loop", end,
                f"loop {target}..{end} crosses the loop ending at word {stack[-1][0].end};"
                " loops must nest",
            )  # fmt: skip
        outer = next((o for o, _ in stack if loop.reg is not None and o.reg == loop.reg), None)
        if outer is not None:
            raise ProgramError(
                "bad loop", end,
                f"loop {target}..{end} drives r{loop.reg}, as does the loop {outer.target}.."
                f"{outer.end} around it, whose index it would overwrite: use another register",
            )  # fmt: skip
        times = stack[-1][1] if stack else 1
        jumps += count * times
        if jumps > limits.max_loop_iterations:
            raise ProgramError(
                "limits", end,
                f"loops take more than {limits.max_loop_iterations} back-jumps in all",
            )  # fmt: skip
        stack.append((loop, times * (count + 1)))
    return loops


def driving_loop(loops: list[Loop], reg: int, i: int) -> Loop | None:
    """The loop around word i that drives register `reg` (at most one: they may not nest)."""
    return next((lp for lp in loops if lp.reg == reg and lp.target <= i <= lp.end), None)


def register_operands(program: Program, w: dict) -> list[tuple[str, int]]:
    """(pipe, tensor id) of the register-relative views word w's D and S slots use."""
    tensors, n = program.tensors, len(program.tensors)
    used = [("D", w[f]) for f in _D_OPERANDS[DOp(w["d_op"])]]
    used += [("S", w[f]) for f in _S_OPERANDS[SOp(w["s_op"])]]
    return [(pipe, t) for pipe, t in used if t < n and tensors[t].reg is not None]


def _check_registers(program: Program, loops: list[Loop]) -> None:
    """A register-relative view is used only inside a loop that drives its register, and is
    inside its base on every pass of that loop (the register runs 0..count)."""
    tensors = program.tensors
    indexed = [i for i, t in enumerate(tensors) if t.reg is not None]
    if not indexed:
        return
    words = program.words
    hit = np.zeros(len(words), dtype=bool)
    for f in ("d_dst", "d_a", "d_b", "d_c", "d_e", "s_dst", "s_src", "s_idx"):
        hit |= np.isin(words[f], indexed)
    sizes = {t.name: t.size for t in tensors}
    for i in np.flatnonzero(hit).tolist():
        w = dict(zip(SIW_DTYPE.names, words[i].tolist(), strict=True))
        for pipe, tid in register_operands(program, w):
            t = tensors[tid]
            loop = driving_loop(loops, t.reg, i)
            if loop is None:
                raise ProgramError(
                    "bad register", i,
                    f"{pipe} slot uses view {t.name!r} at r{t.reg}, but word {i} is in no loop"
                    f" that drives r{t.reg}: put it inside a 'C.loop TARGET count=N reg=r{t.reg}'",
                )  # fmt: skip
            last = t.offset_at(loop.count) + _span(t)
            if last >= sizes[t.base]:
                raise ProgramError(
                    "out of range", i,
                    f"{pipe} slot: view {t.name!r} reaches element {last} of {t.base!r}, which"
                    f" has {sizes[t.base]}, on the last pass of loop {loop.target}..{loop.end}"
                    f" (r{t.reg} = {loop.count})",
                )  # fmt: skip


# --------------------------------------------------------------------------- text


def _float_text(bits: int) -> str:
    return str(np.uint32(bits).view(np.float32))


def word_text(program: Program, i: int) -> str:
    w = dict(zip(SIW_DTYPE.names, program.words[i].tolist(), strict=True))
    names = [t.name for t in program.tensors]

    def tname(tid: int) -> str:
        return names[tid] if tid < len(names) else f"%{tid}"

    slots = []
    d_op = DOp(w["d_op"])
    if d_op:
        ops = [tname(w[f]) for f in _D_OPERANDS[d_op] if not (f == "d_c" and w[f] == NONE)]
        text = f"D.{d_op.name.lower()} " + ", ".join(ops)
        if d_op == DOp.LINEAR and w["d_flags"] & 3:
            text += f" act={ACTIVATIONS[w['d_flags'] & 3]}"
        if d_op in _HEADS_OPS:
            text += f" heads={w['d_flags']}"
        if d_op in _LAYER_OPS:
            text += f" layer={w['d_flags']}"
        if w["d_flags"] & FLAG_CAUSAL and d_op == DOp.ATTENTION:
            text += " causal"
        if w["d_flags"] & FLAG_ACC and d_op == DOp.GEMM:
            text += " acc"
        if d_op in _D_IMM and w["d_imm"]:
            text += f" {_D_IMM[d_op]}={_float_text(w['d_imm'])}"
        slots.append(text)
    s_op = SOp(w["s_op"])
    if s_op:
        text = f"S.{s_op.name.lower()} " + ", ".join(tname(w[f]) for f in _S_OPERANDS[s_op])
        if s_op in _S_TILED:
            text += f" tile={w['s_tile']} rows={w['s_rows']}"
        slots.append(text)
    c_op = COp(w["c_op"])
    if c_op:
        text = f"C.{c_op.name.lower()}"
        if c_op == COp.LOOP:
            text += f" {w['c_target']} count={w['c_count']}"
            if w["c_flags"] & LOOP_REG:
                text += f" reg=r{w['c_flags'] & (NUM_REGS - 1)}"
        slots.append(text)
    line = " | ".join(slots) if slots else "nop"
    if w["deps"]:
        line += " deps=" + ",".join(n for n, bit in DEPS.items() if w["deps"] & bit)
    return line


def to_text(program: Program) -> str:
    """Canonical assembly: tensors, then one word per line. assemble(to_text(p)) encodes as p."""
    lines = [t.text() for t in program.tensors]
    lines += [word_text(program, i) for i in range(len(program.words))]
    return "\n".join(lines) + "\n"


def disassemble(data: bytes, limits: Limits = DEFAULT_LIMITS) -> str:
    return to_text(decode(data, limits))


_TENSOR_RE = re.compile(
    r"\.tensor\s+(\S+)\s+(" + "|".join(sorted(_DTYPE_CODE, key=len, reverse=True))
    + r")\[([0-9,\s]*)\]((?:\s+\S+)*)\s*\Z"
)  # fmt: skip
_OPS_BY_PIPE = {"D": DOp, "S": SOp, "C": COp}


def assemble(text: str, limits: Limits = DEFAULT_LIMITS, *, check: bool = True) -> Program:
    """Assembly text -> Program (validated unless check=False). Errors name the line and word."""
    tensors: list[TensorSpec] = []
    rows: list[dict] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(".tensor"):
            tensors.append(_parse_tensor(line, lineno))
        else:
            rows.append({"line": lineno, "text": line})
    names = {t.name: i for i, t in enumerate(tensors)}
    if len(names) != len(tensors):
        dup = next(t.name for t in tensors if sum(u.name == t.name for u in tensors) > 1)
        raise ProgramError("bad tensor", None, f"tensor {dup!r} is declared twice")
    if len(rows) > limits.max_words:
        raise ProgramError("limits", None, f"{len(rows)} words; at most {limits.max_words}")
    words = empty_words(len(rows))
    for i, row in enumerate(rows):
        _parse_word(row["text"], words, i, names, row["line"])
    program = Program(tensors, words)
    if check:
        validate(program, limits)
    return program


def _register(text: str, i: int | None, lineno: int) -> int:
    m = re.fullmatch(r"r(\d+)", text)
    if not m or int(m.group(1)) >= NUM_REGS:
        raise ProgramError(
            "bad register", i, f"{text!r}: the registers are r0..r{NUM_REGS - 1}", lineno
        )
    return int(m.group(1))


def _parse_tensor(line: str, lineno: int) -> TensorSpec:
    m = _TENSOR_RE.match(line)
    if not m:
        raise ProgramError(
            "syntax", None, f"{line!r}: expected '.tensor NAME f32[4,8] [init] [output]'", lineno
        )
    name, dtype, dims, rest = m.groups()
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
    except ValueError:
        raise ProgramError("syntax", None, f"bad dims [{dims}] in {line!r}", lineno) from None
    init, seed, output = "zeros", 0, False
    base, offset, strides, reg, step = "", 0, (), None, 0
    for tok in rest.split():
        rm = re.fullmatch(r"random\((\d+)\)", tok)
        vm = re.fullmatch(
            r"view\(([A-Za-z_][A-Za-z0-9_]*),(\d+)(?:\+(r\d+)\*(\d+))?,(\d+(?:,\d+)*)\)", tok
        )
        if tok == "output":
            output = True
        elif tok in ("zeros", "ones", "input", "scratch", "resident", "inout"):
            init = tok
        elif rm:
            init, seed = "random", int(rm.group(1))
        elif vm:
            init, base, offset = "view", vm.group(1), int(vm.group(2))
            if vm.group(3):
                reg, step = _register(vm.group(3), None, lineno), int(vm.group(4))
            strides = tuple(int(x) for x in vm.group(5).split(","))
        else:
            raise ProgramError(
                "syntax", None,
                f"{tok!r} in {line!r}: expected zeros, ones, random(SEED), input, scratch,"
                " resident, inout, view(BASE,OFFSET[+rN*STEP],STRIDE,...), output",
                lineno,
            )  # fmt: skip
    return TensorSpec(name, dtype, shape, init, seed, output, base, offset, strides, reg, step)


def _parse_word(text: str, words: np.ndarray, i: int, names: dict[str, int], lineno: int) -> None:
    def fail(detail: str) -> ProgramError:
        return ProgramError("syntax", i, detail, lineno)

    w = words[i]
    segments = [s.strip() for s in text.split("|")]
    seen: set[str] = set()
    for seg in segments:
        spaced = seg.split()
        word_level = [t for t in spaced if t.startswith("@") or t.startswith("deps=")]
        rest = " ".join(t for t in spaced if t not in word_level)
        tokens = [t for t in re.split(r"[,\s]+", rest) if t]
        for t in word_level:
            if t.startswith("@"):
                raise fail(
                    f"{t!r}: the word's phext address was removed (it was never used); phext"
                    " coordinates address memory through the Phext Page Table"
                )
            for dep in t[5:].split(","):
                if dep in _REMOVED_DEPS:
                    raise fail(f"dependency {dep!r} was removed: {_REMOVED_WHY}")
                if dep not in DEPS:
                    raise fail(f"dependency {dep!r}: known {', '.join(DEPS)}")
                w["deps"] |= DEPS[dep]
        if not tokens:
            continue
        head, args = tokens[0], tokens[1:]
        if head.lower() == "nop" and not args and len(segments) == 1:
            continue
        pipe, _, opname = head.partition(".")
        pipe = pipe.upper()
        ops = _OPS_BY_PIPE.get(pipe)
        if pipe == "C" and opname.lower() in _REMOVED_C_OPS.values():
            raise ProgramError(
                "bad opcode", i, f"{head!r} was removed: {_REMOVED_WHY}; drop it", lineno
            )
        if ops is None or opname.upper() not in ops.__members__:
            known = ", ".join(f"{pipe}.{o.lower()}" for o in ops.__members__) if ops else "D/S/C"
            raise ProgramError("bad opcode", i, f"{head!r}: known: {known}", lineno)
        if pipe in seen:
            raise fail(f"two {pipe} slots in one word")
        seen.add(pipe)
        op = ops[opname.upper()]
        positional = [a for a in args if "=" not in a and a not in _BARE_FLAGS]
        keywords = dict(a.split("=", 1) for a in args if "=" in a)
        flags = [a for a in args if a in _BARE_FLAGS]
        _fill_slot(pipe, op, positional, keywords, flags, w, names, fail, i, lineno)


def _fill_slot(pipe, op, positional, keywords, flags, w, names, fail, i, lineno) -> None:
    label = f"{pipe}.{op.name.lower()}"

    def tensor(name: str) -> int:
        if name not in names:
            raise ProgramError(
                "bad operand", i, f"{label}: no tensor named {name!r} (declare it with .tensor)",
                lineno,
            )  # fmt: skip
        return names[name]

    def integer(key: str, value: str, hi: int) -> int:
        if not value.isdigit() or int(value) > hi:
            raise fail(f"{label}: {key}={value!r} must be an integer 0..{hi}")
        return int(value)

    allowed: set[str] = set()
    if pipe == "D":
        fields = list(_D_OPERANDS[op])
        if op in _OPTIONAL_C and len(positional) == 3:
            fields = fields[:3]
            w["d_c"] = NONE
        if op == DOp.LINEAR:
            allowed.add("act")
            act = keywords.get("act", "none")
            if act not in ("none", "relu", "gelu", "silu"):
                raise fail(f"{label}: act={act!r}; use none, relu, gelu or silu")
            w["d_flags"] |= ACTIVATIONS.index(None if act == "none" else act)
        if op in _LAYER_OPS:
            allowed.add("layer")
            if "layer" not in keywords:
                raise fail(f"{label} needs layer=N (0..255)")
            w["d_flags"] = integer("layer", keywords["layer"], 0xFF)
        if op in _HEADS_OPS:
            allowed.add("heads")
            if "heads" not in keywords:
                raise fail(f"{label} needs heads=N (1..255)")
            w["d_flags"] = integer("heads", keywords["heads"], 0xFF)
        if op in _D_IMM:
            key = _D_IMM[op]
            allowed.add(key)
            if key in keywords:
                try:
                    value = np.float32(float(keywords[key]))
                except (ValueError, OverflowError):
                    raise fail(f"{label}: {key}={keywords[key]!r} is not a number") from None
                w["d_imm"] = int(value.view(np.uint32))
        for flag in flags:
            flag_op, bit = _BARE_FLAGS[flag]
            if op != flag_op:
                raise fail(f"{label} takes no {flag!r}")
            w["d_flags"] |= bit
    elif pipe == "S":
        fields = list(_S_OPERANDS[op])
        if op in _S_TILED:
            allowed |= {"tile", "rows"}
            for key in ("tile", "rows"):
                if key not in keywords:
                    raise fail(f"{label} needs {key}=N")
                w[f"s_{key}"] = integer(key, keywords[key], 0xFFFF)
    else:
        fields = []
        if op == COp.LOOP:
            allowed |= {"count", "reg"}
            if len(positional) != 1 or "count" not in keywords:
                raise fail("C.loop needs a target word and count=N, e.g. 'C.loop 3 count=10'")
            w["c_target"] = integer("target", positional[0], 0xFFFF)
            w["c_count"] = integer("count", keywords["count"], 0xFFFFFFFF)
            if "reg" in keywords:
                w["c_flags"] = LOOP_REG | _register(keywords["reg"], i, lineno)
            positional = []
    if flags and pipe != "D":
        raise fail(f"{label} takes no {flags[0]!r}")
    extra = set(keywords) - allowed
    if extra:
        raise fail(f"{label} takes no {', '.join(sorted(extra))}=")
    if len(positional) != len(fields):
        want = len(fields)
        raise fail(f"{label} takes {want} tensor operand{'s' * (want != 1)}, got {len(positional)}")
    w[f"{pipe.lower()}_op"] = int(op)
    for f, name in zip(fields, positional, strict=True):
        w[f] = tensor(name)
