"""Row-group matvec kernels for the k-quants of Q4_K_M / Q5_K_M models: Q4_K, Q5_K and Q6_K.

As llama.cpp does, x is quantized to Q8_K first (kernels/activations.py) and each 256-value
super-block is one exact integer sum of weight x activation products (vpmaddwd on AVX2),
scaled once in f32. Q4_K's per-sub-block minimum uses the int sums of x's 32-value blocks:
sum_l (d*sc*q_l - dmin*mn) * x_l = d*sc*sum_l q_l*x_l - dmin*mn*sum_l x_l.
Tail rows are clamped to m-1 and not stored; the j (x row) loop is outermost around an
identical body, so results are bitwise batch invariant.

Shapes: u8 raw bytes of W (m, k); xq = x (n, k) as Q8_K int16 values, flattened; xd = (n, k/256)
scales; xbs = (n, k/32) int32 sums of xq; out = (n, m) flattened.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from kernels.intdot import q4_k_block_isum, q5_k_block_isum, q6_k_block_isum
from kernels.prefetch import prefetch_ahead

U = np.uint64


@njit(cache=True, inline="always")
def _f16(u8, lut, o):
    return lut[np.int64(u8[U(o)]) | (np.int64(u8[U(o + 1)]) << 8)]


@njit(cache=True)
def rows_q4_k(u8, lut, m, k, xq, xd, xbs, n, out, r0, r1):
    # W Q4_K (m, k): super-block = d, dmin, 12 scale bytes, 128 bytes of nibbles, times x as
    # Q8_K (xq (n, k) int16, xd (n, k/256) f32, xbs (n, k/32) int32 sums; kernels/activations.py).
    _rows(u8, lut, m, k, xq, xd, xbs, n, out, r0, r1, 12)


@njit(cache=True)
def rows_q5_k(u8, lut, m, k, xq, xd, xbs, n, out, r0, r1):
    # W Q5_K (m, k): super-block = d, dmin, 12 scale bytes, qh[32] (fifth bits), 128 bytes of
    # nibbles, times x as Q8_K (as rows_q4_k).
    _rows(u8, lut, m, k, xq, xd, xbs, n, out, r0, r1, 13)


@njit(cache=True)
def rows_q6_k(u8, lut, m, k, xq, xd, xbs, n, out, r0, r1):
    # W Q6_K (m, k): super-block = ql[128], qh[64], int8 scales[16] (one per 16 values), f16 d,
    # times x as Q8_K (as rows_q4_k; xbs goes unused: Q6_K has no minimums).
    _rows(u8, lut, m, k, xq, xd, xbs, n, out, r0, r1, 14)


@njit(cache=True, inline="always")
def _rows(u8, lut, m, k, xq, xd, xbs, n, out, r0, r1, ggml_type):
    # The row sum adds dx * (one super-block's exact-integer dot, scaled by its f16 d / dmin)
    # block by block in f32 without fastmath, so a row's bits never depend on n. Two W rows per
    # pass. ggml_type is a literal from the wrappers above, so the branches fold away.
    block_bytes = 210 if ggml_type == 14 else (176 if ggml_type == 13 else 144)
    nb = k // 256
    row_bytes = nb * block_bytes
    scales = np.empty(8, np.int32)  # one Q4_K / Q5_K super-block's unpacked sub-block scales
    for r in range(r0, r1, 2):
        oa = r * row_bytes
        ob = min(r + 1, m - 1) * row_bytes
        for j in range(n):
            xb = j * k
            s0 = s1 = np.float32(0.0)
            for b in range(nb):
                bo = b * block_bytes
                prefetch_ahead(u8, oa + 2 * bo, (2 * block_bytes + 63) // 64)  # 2 rows' block bytes
                xo = xb + b * 256
                dx = xd[j * nb + b]
                if ggml_type == 14:
                    s0 += dx * _q6k_block(u8, lut, oa + bo, xq, xo)
                    s1 += dx * _q6k_block(u8, lut, ob + bo, xq, xo)
                else:
                    so = j * (k // 32) + b * 8
                    s0 += dx * _q4k_q5k_block(u8, lut, oa + bo, xq, xo, xbs, so, scales, ggml_type == 13)
                    s1 += dx * _q4k_q5k_block(u8, lut, ob + bo, xq, xo, xbs, so, scales, ggml_type == 13)
            _store2(out, j * m, r, m, s0, s1)

@njit(cache=True, inline="always")
def _q4k_q5k_block(u8, lut, o, xq, xo, xbs, so, scales, q5):
    # d * isum - dmin * imin for the Q4_K / Q5_K super-block at byte o against 256 Q8_K values at xo
    # the 8 (scale, min) 6-bit pairs of the 12 scale bytes, unpacked straight-line (the
    # per-sub-block helper's branch cost as much as the integer dot itself)
    b0, b1, b2, b3 = np.int32(u8[o + 4]), np.int32(u8[o + 5]), np.int32(u8[o + 6]), np.int32(u8[o + 7])
    b4, b5, b6, b7 = np.int32(u8[o + 8]), np.int32(u8[o + 9]), np.int32(u8[o + 10]), np.int32(u8[o + 11])
    b8, b9, b10, b11 = np.int32(u8[o + 12]), np.int32(u8[o + 13]), np.int32(u8[o + 14]), np.int32(u8[o + 15])
    scales[0], scales[1], scales[2], scales[3] = b0 & 63, b1 & 63, b2 & 63, b3 & 63
    scales[4] = (b8 & 15) | ((b0 >> 6) << 4)
    scales[5] = (b9 & 15) | ((b1 >> 6) << 4)
    scales[6] = (b10 & 15) | ((b2 >> 6) << 4)
    scales[7] = (b11 & 15) | ((b3 >> 6) << 4)
    imin = ((b4 & 63) * xbs[so] + (b5 & 63) * xbs[so + 1] + (b6 & 63) * xbs[so + 2] + (b7 & 63) * xbs[so + 3]
            + ((b8 >> 4) | ((b4 >> 6) << 4)) * xbs[so + 4] + ((b9 >> 4) | ((b5 >> 6) << 4)) * xbs[so + 5]
            + ((b10 >> 4) | ((b6 >> 6) << 4)) * xbs[so + 6] + ((b11 >> 4) | ((b7 >> 6) << 4)) * xbs[so + 7])
    if q5:
        isum = q5_k_block_isum(u8, U(o), scales, xq, U(xo))
    else:
        isum = q4_k_block_isum(u8, U(o), scales, xq, U(xo))
    return _f16(u8, lut, o) * np.float32(isum) - _f16(u8, lut, o + 2) * np.float32(imin)


@njit(cache=True, inline="always")
def _store2(out, base, r, m, s0, s1):
    out[base + r] = s0
    if r + 1 < m:
        out[base + r + 1] = s1


@njit(cache=True, inline="always")
def _q6k_block(u8, lut, o, xq, xo):
    # d * isum for the Q6_K super-block at byte o against 256 Q8_K values at xo
    return _f16(u8, lut, o + 208) * np.float32(q6_k_block_isum(u8, U(o), xq, U(xo)))
