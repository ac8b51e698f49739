"""`python -m vtpu.bench.packed`: the packed Linear kernels (vtpu.kernels.packed) against numpy.

Decode: the Linear weights of `--layers` layers of Qwen3-0.6B's shape (q 2048x1024, k and v
1024x1024, o 1024x2048, gate and up 3072x1024, down 1024x3072), and optionally its 151936x1024
lm_head, resident in each precision; one pass of M activation rows through all of them is
timed, so the weights come from memory, not cache (they exceed L3 from one layer in fp32, two in
int8). Its figure is GB/s of weights read, and that as a fraction of the read bandwidth a numpy
sum over a 256 MiB array reaches in the same run. Prefill: M = 512 rows through one layer,
GFLOP/s. The baseline is numpy (BLAS sgemm) on fp32 copies of the same dequantised weights.

Ours, numpy and the bandwidth probe run interleaved (A B C A B C ...) and the figures are
medians; `vs numpy` is the median of the per-round time ratios numpy / ours.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from vtpu import kernels
from vtpu.cpu import cpu_info
from vtpu.kernels import packed

LAYER = [(2048, 1024), (1024, 1024), (1024, 1024), (1024, 2048), (3072, 1024), (3072, 1024),
         (1024, 3072)]  # fmt: skip
LM_HEAD = (151936, 1024)
# OpenMP's and OpenBLAS's idle workers spin for a while after a call (OpenBLAS ~2**28 cycles);
# a pause between the sides keeps one side's spinners from taxing the other's timing.
_SETTLE_S = 0.15


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _weights(shapes: list[tuple[int, int]], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s, dtype=np.float32) * 0.02) for s in shapes]


def run(layers: int, lm_head: bool, rows: list[int], repeats: int, threads: int | None) -> None:
    shapes = LAYER * layers + ([LM_HEAD] if lm_head else [])
    fp32 = _weights(shapes, 0)
    probe = np.ones((256 << 20) // 4, np.float32)
    info = cpu_info()
    print(f"CPU: {info.model_name} (family {info.family} model {info.model}), "
          f"{kernels.num_threads() if threads is None else threads} threads, "
          f"kernels at {kernels.isa()}, {kernels.blas_library()}")  # fmt: skip
    print(f"weights: {len(shapes)} matrices ({layers} layers" + (" + lm_head)" if lm_head else ")"))
    for precision in packed.PRECISIONS:
        ws = [packed.pack(w, precision) for w in fp32]
        nbytes = sum(w.nbytes for w in ws)
        # numpy's baseline reads the same dequantised values as fp32
        base = [packed.rows(w, np.arange(w.shape[0])) for w in ws] if precision != "fp32" else fp32
        for m in rows + [512]:
            prefill = m == 512
            use_w = ws[:7] if prefill else ws
            use_b = base[:7] if prefill else base
            xs = {k: np.random.default_rng(m).standard_normal((m, k), dtype=np.float32)
                  for k in {w.shape[1] for w in use_w}}  # fmt: skip
            outs = [np.empty((m, w.shape[0]), np.float32) for w in use_w]

            def ours(use_w=use_w, xs=xs, outs=outs) -> None:
                for w, y in zip(use_w, outs, strict=True):
                    packed.matmul(xs[w.shape[1]], w, out=y, nthreads=threads)

            def theirs(use_b=use_b, xs=xs, outs=outs) -> None:
                for w, y in zip(use_b, outs, strict=True):
                    np.matmul(xs[w.shape[1]], w.T, out=y)

            t_ours, t_np, t_bw = [], [], []
            for _ in range(repeats):
                t_ours.append(_timed(ours))
                time.sleep(_SETTLE_S)
                t_np.append(_timed(theirs))
                time.sleep(_SETTLE_S)
                t_bw.append(_timed(probe.sum))
            ours_s, np_s = statistics.median(t_ours), statistics.median(t_np)
            bw = probe.nbytes / statistics.median(t_bw) / 1e9
            ratio = statistics.median(b / a for a, b in zip(t_ours, t_np, strict=True))
            if prefill:
                flops = 2 * m * sum(w.shape[0] * w.shape[1] for w in use_w)
                print(f"  {precision:4} prefill M={m:3}: ours {flops / ours_s / 1e9:6.1f} GFLOP/s, "
                      f"numpy fp32 {flops / np_s / 1e9:6.1f} GFLOP/s, vs numpy {ratio:.2f}x  "
                      f"[{packed.path(precision, m)}]")  # fmt: skip
            else:
                read = sum(w.nbytes for w in use_w)
                gbs = read / ours_s / 1e9
                print(f"  {precision:4} decode  M={m:3}: ours {ours_s * 1e3:7.2f} ms "
                      f"{gbs:5.1f} GB/s = {gbs / bw:4.0%} of {bw:4.1f} GB/s read bandwidth; "
                      f"numpy fp32 {np_s * 1e3:7.2f} ms; vs numpy {ratio:.2f}x  "
                      f"[{packed.path(precision, m)}]")  # fmt: skip
        print(f"  ({precision}: {nbytes / 1e6:.0f} MB resident)")
        del ws, base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtpu.bench.packed", description=__doc__)
    parser.add_argument("--layers", type=int, default=4, help="Qwen3-0.6B layers (default 4)")
    parser.add_argument("--lm-head", action="store_true", help="add the 151936x1024 lm_head")
    parser.add_argument("--rows", default="1,4,8", help="decode M values (default 1,4,8)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="own kernels' threads")
    parser.add_argument("--isa", default=None, help="force an instruction set (generic, avx2...)")
    args = parser.parse_args(argv)
    if args.isa:
        kernels.set_isa(args.isa)
    rows = [int(r) for r in args.rows.split(",") if r]
    run(args.layers, args.lm_head, rows, args.repeats, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
