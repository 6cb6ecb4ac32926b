"""Micro-benchmark of the quantized matmul kernels: `python -m ggserve.bench.kernels [--types Q8_0,...] [--cpu]`.

Prints medians of:
- matvec (n=1) GB/s of weight bytes per type, on Qwen2.5-0.5B shapes, cycling through enough
  copies of the matrix (>= 96 MB) that every call streams from DRAM like a decode step does;
- batched decode n=2,4,8: time relative to n=1 (weights are read once per call, so < n);
- prefill n=512 (tile dequant + sgemm path) GFLOP/s, and the fused path at n=16.
Random block bytes with valid f16 scales; numbers on a shared 2-core machine are noisy.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from ggserve.kernels.matmul import BLAS_MIN_ROWS, QuantMatrix, matmul
from ggserve.kernels.quant import block_layout

# (type, m, k): the matrices a Qwen2.5-0.5B Q4_K_M decode step streams
SHAPES = {"Q5_0": (6, 4864, 896), "Q8_0": (8, 151936 // 8, 896), "Q4_K": (12, 896, 4864),
          "Q6_K": (14, 896, 4864), "Q4_0": (2, 4864, 896), "Q4_1": (3, 4864, 896),
          "Q5_1": (7, 4864, 896), "Q2_K": (10, 896, 4864), "Q3_K": (11, 896, 4864),
          "Q5_K": (13, 896, 4864), "F16": (1, 896, 896 * 4), "BF16": (30, 896, 896 * 4),
          "F32": (0, 896, 896 * 2)}
_SCALE_OFFSETS = {2: [0], 3: [0, 2], 6: [0], 7: [0, 2], 8: [0], 10: [80, 82], 11: [108], 12: [0, 2],
                  13: [0, 2], 14: [208]}


def random_matrix_bytes(rng: np.random.Generator, ggml_type: int, m: int, k: int) -> np.ndarray:
    """Random raw blocks for W (m, k) whose f16 scales are finite and small (no inf/NaN)."""
    block_size, block_bytes = block_layout(ggml_type)
    nblk = m * k // block_size
    if ggml_type == 0:
        return rng.standard_normal(nblk).astype(np.float32).view(np.uint8)
    if ggml_type == 1:
        return (rng.standard_normal(nblk) * 0.05).astype(np.float16).view(np.uint8)
    if ggml_type == 30:
        bits = rng.standard_normal(nblk).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, (nblk, block_bytes), dtype=np.uint8)
    for o in _SCALE_OFFSETS[ggml_type]:
        raw[:, o:o + 2] = (rng.standard_normal(nblk) * 0.02).astype(np.float16).view(np.uint8).reshape(nblk, 2)
    return raw.reshape(-1)


def _median_time(fn, reps: int, clock=time.perf_counter) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return float(np.median(times))


def bench_type(name: str, reps: int, rng: np.random.Generator, clock=time.perf_counter) -> None:
    ggml_type, m, k = SHAPES[name]
    one = random_matrix_bytes(rng, ggml_type, m, k)
    copies = max(1, (96 << 20) // one.size)
    ws = [QuantMatrix(one.copy(), ggml_type, m, k) for _ in range(copies)]
    results = {}
    for n in (1, 2, 4, 8):
        x = rng.standard_normal((n, k)).astype(np.float32)
        out = np.empty((n, m), np.float32)

        def run():
            for w in ws:
                matmul(x, w, out)
        results[n] = _median_time(run, reps, clock) / copies
    gbs = one.size / results[1] / 1e9
    scale = "  ".join(f"n={n}: {results[n] / results[1]:.2f}x" for n in (2, 4, 8))
    print(f"{name:5s} W ({m}, {k}) {one.size / 1e6:6.1f} MB  n=1 {results[1] * 1e3:7.3f} ms "
          f"{gbs:5.1f} GB/s | time vs n=1: {scale}", flush=True)


def bench_prefill(reps: int, rng: np.random.Generator) -> None:
    for name in ("Q5_0", "Q4_K", "Q6_K", "Q8_0"):
        ggml_type, m, k = SHAPES[name]
        w = QuantMatrix(random_matrix_bytes(rng, ggml_type, m, k), ggml_type, m, k)
        for n in (BLAS_MIN_ROWS // 2, 512):
            x = rng.standard_normal((n, k)).astype(np.float32)
            out = np.empty((n, m), np.float32)
            t = _median_time(lambda: matmul(x, w, out), reps)
            path = "fused" if n < BLAS_MIN_ROWS else "dequant+sgemm"
            print(f"{name:5s} W ({m}, {k}) n={n:3d} {path:13s} {t * 1e3:8.2f} ms "
                  f"{2 * n * m * k / t / 1e9:6.1f} GFLOP/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default="Q5_0,Q8_0,Q4_K,Q6_K,Q4_0,Q4_1,Q5_1,Q2_K,Q3_K,Q5_K,F16,BF16,F32")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--cpu", action="store_true",
                        help="CPU-time clock; run with NUMBA_NUM_THREADS=1 for per-core figures")
    args = parser.parse_args(argv)
    # --cpu: this thread's CPU clock (meaningful with NUMBA_NUM_THREADS=1 only): per-core kernel
    # speed that other processes on a shared machine cannot distort
    clock = time.thread_time if args.cpu else time.perf_counter
    import numba
    print(f"numba {numba.__version__}, threads {numba.get_num_threads()}", flush=True)
    rng = np.random.default_rng(0)
    for name in args.types.split(","):
        if name not in SHAPES:
            raise SystemExit(f"unknown type {name}; known: {', '.join(SHAPES)}")
        bench_type(name, args.reps, rng, clock)
    if not args.no_prefill:
        bench_prefill(max(3, args.reps // 3), rng)
    print(f"threading layer: {numba.threading_layer()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
