"""Row-group matvec kernels for the k-quants of Q4_K_M / Q5_K_M models: Q4_K, Q5_K and Q6_K.

As llama.cpp does, x is quantized to Q8_K first (kernels/activations.py) and each 256-value
super-block's weight x activation products are exact integer sums (vpmaddubsw + vpmaddwd on
AVX2). Q4_K's per-sub-block minimum uses the int sums of x's 16-value groups:
sum_l (d*sc*q_l - dmin*mn) * x_l = d*sc*sum_l q_l*x_l - dmin*mn*sum_l x_l.

Q4_K and Q6_K then add the integer parts in f32 in exactly the shape llama.cpp's AVX2 build
does, so an output equals llama.cpp's bit for bit:
- Q4_K (which llama.cpp repacks 8 rows at a time): intdot_kquant.dot_row_q4_k (its gemv's shape:
  per super-block, acc += isum * (d*dx) and acc_min += imin * (dmin*dx) as fused
  multiply-adds, output acc - acc_min), or for a row of x that llama.cpp's batch sends
  through its 4-row gemm (flag QUAD) dot_row_q4_k_quad (the super-block in four 64-value
  parts, as that gemm adds it).
- Q6_K: intdot_kquant.dot_row_q6_k (ggml_vec_dot_q6_K_q8_K's 8-lane shape), or for a row of a batch
  of 8 or more (flag TILED) dot_row_q6_k_tiled (ggml's tiled k-quant matmul).
Which flags a row gets (`shapes`, one int8 per x row) is kernels/matmul.py's row_shapes_by_group.
Q5_K keeps one f32 sum per row (llama.cpp's Q5_K dot has yet another shape, not reproduced).

Each kernel dots one weight row at a time with every x row, each x row through the same code
for its flags, so a row's bits depend only on its own x row and its shape flags.

Shapes: u8 raw bytes of W (m, k); xq = x (n, k) as Q8_K int8 values, flattened; xd = (n, k/256)
scales; xbs = (n, k/16) int32 sums of xq; shapes = (n,) int8 flags; out = (n, m) flattened.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ggserve.kernels import jit_cache, threads  # noqa: F401  (numba cache dir + threading layer before any kernel)
from ggserve.kernels.ggml_types import Q4_K
from ggserve.kernels.intdot_kquant import dot_row_q4_k, dot_row_q4_k_quad, dot_row_q6_k, dot_row_q6_k_tiled, q5_k_block_isum

U = np.uint64
# bits of a row's `shapes` entry: the batch shape llama.cpp would sum that x row in
QUAD = np.int8(1)  # one of a 4-row group of Q4_K's repacked gemm (else its gemv)
TILED = np.int8(2)  # in a batch of >= 8 rows: ggml's tiled k-quant matmul (else its vec_dot)


@njit(cache=True, inline="always")
def _f16(u8, lut, o):
    return lut[np.int64(u8[U(o)]) | (np.int64(u8[U(o + 1)]) << 8)]


@njit(cache=True, inline="always")
def _unpack_scales(u8, o, scales, mins):
    # the 8 (scale, min) 6-bit pairs of the 12 scale bytes of the Q4_K / Q5_K super-block at o,
    # straight-line (a per-sub-block helper's branch cost as much as the integer dot itself)
    b0, b1, b2, b3 = np.int32(u8[o + 4]), np.int32(u8[o + 5]), np.int32(u8[o + 6]), np.int32(u8[o + 7])
    b4, b5, b6, b7 = np.int32(u8[o + 8]), np.int32(u8[o + 9]), np.int32(u8[o + 10]), np.int32(u8[o + 11])
    b8, b9, b10, b11 = np.int32(u8[o + 12]), np.int32(u8[o + 13]), np.int32(u8[o + 14]), np.int32(u8[o + 15])
    scales[0], scales[1], scales[2], scales[3] = b0 & 63, b1 & 63, b2 & 63, b3 & 63
    scales[4] = (b8 & 15) | ((b0 >> 6) << 4)
    scales[5] = (b9 & 15) | ((b1 >> 6) << 4)
    scales[6] = (b10 & 15) | ((b2 >> 6) << 4)
    scales[7] = (b11 & 15) | ((b3 >> 6) << 4)
    mins[0], mins[1], mins[2], mins[3] = b4 & 63, b5 & 63, b6 & 63, b7 & 63
    mins[4] = (b8 >> 4) | ((b4 >> 6) << 4)
    mins[5] = (b9 >> 4) | ((b5 >> 6) << 4)
    mins[6] = (b10 >> 4) | ((b6 >> 6) << 4)
    mins[7] = (b11 >> 4) | ((b7 >> 6) << 4)


@njit(cache=True, inline="always")
def _imin(mins, xbs, so, first, count):
    # sum over sub-blocks s in [first, first + count) of mins[s] * (sum of x's 32 values of s)
    total = np.int32(0)
    for s in range(first, first + count):
        total += mins[s] * (xbs[so + 2 * s] + xbs[so + 2 * s + 1])
    return total


@njit(cache=True, inline="always")
def _q5k_block(u8, lut, o, xq, xo, dx, xbs, so, scales, mins, acc):
    # acc + dx * (d * isum - dmin * imin) for the Q5_K super-block at byte o against 256 Q8_K
    # values at xo: one plain f32 row sum
    _unpack_scales(u8, o, scales, mins)
    isum = q5_k_block_isum(u8, U(o), scales, xq, U(xo))
    value = _f16(u8, lut, o) * np.float32(isum) - _f16(u8, lut, o + 2) * np.float32(_imin(mins, xbs, so, 0, 8))
    return acc + dx * value


@njit(cache=True, inline="always")
def _rows_by_shape(u8, lut, m, k, xq, xd, xbs, shapes, n, out, r0, r1, ggml_type):
    # One weight row against each x row in turn, through the row dot of that x row's shape:
    # Q4_K (ggml_type 12) dot_row_q4_k, or dot_row_q4_k_quad for rows flagged QUAD; Q6_K (14)
    # dot_row_q6_k, or dot_row_q6_k_tiled for rows flagged TILED. ggml_type is a literal from
    # the wrappers below, so the branches fold away. No software prefetch: one sequential stream
    # per thread is what the hardware prefetcher follows best (a burst of prefetches per row
    # streamed ~1.4x slower from DRAM, on Q6_K's 4 KB rows).
    nb = k // 256
    row_bytes = nb * (144 if ggml_type == Q4_K else 210)
    for r in range(r0, r1):
        o = U(r * row_bytes)
        for j in range(n):
            if ggml_type == Q4_K and shapes[j] & QUAD:
                out[j * m + r] = dot_row_q4_k_quad(u8, o, nb, lut, xq, xd, U(j * nb), xbs)
            elif ggml_type == Q4_K:
                out[j * m + r] = dot_row_q4_k(u8, o, nb, lut, xq, xd, U(j * nb), xbs)
            elif shapes[j] & TILED:
                out[j * m + r] = dot_row_q6_k_tiled(u8, o, nb, lut, xq, xd, U(j * nb), xbs)
            else:
                out[j * m + r] = dot_row_q6_k(u8, o, nb, lut, xq, xd, U(j * nb), xbs)


@njit(cache=True)
def rows_q4_k(u8, lut, m, k, xq, xd, xbs, shapes, n, out, r0, r1):
    # W Q4_K (m, k): super-block = d, dmin, 12 scale bytes, 128 bytes of nibbles, times x as
    # Q8_K (xq (n, k) int8, xd (n, k/256) f32, xbs (n, k/16) int32 sums; kernels/activations.py).
    _rows_by_shape(u8, lut, m, k, xq, xd, xbs, shapes, n, out, r0, r1, 12)


@njit(cache=True)
def rows_q5_k(u8, lut, m, k, xq, xd, xbs, shapes, n, out, r0, r1):
    # W Q5_K (m, k): super-block = d, dmin, 12 scale bytes, qh[32] (fifth bits), 128 bytes of
    # nibbles, times x as Q8_K (as rows_q4_k). Row sum in f32 without fastmath; shapes unused.
    nb = k // 256
    row_bytes = nb * 176
    scales, mins = np.empty(8, np.int32), np.empty(8, np.int32)
    for r in range(r0, r1):
        o = r * row_bytes
        for j in range(n):
            acc = np.float32(0.0)
            for b in range(nb):
                acc = _q5k_block(u8, lut, o + b * 176, xq, j * k + b * 256, xd[j * nb + b], xbs, j * (k // 16) + b * 16,
                                 scales, mins, acc)
            out[j * m + r] = acc


@njit(cache=True)
def rows_q6_k(u8, lut, m, k, xq, xd, xbs, shapes, n, out, r0, r1):
    # W Q6_K (m, k): super-block = ql[128], qh[64], int8 scales[16] (one per 16 values), f16 d,
    # times x as Q8_K (as rows_q4_k).
    _rows_by_shape(u8, lut, m, k, xq, xd, xbs, shapes, n, out, r0, r1, 14)
