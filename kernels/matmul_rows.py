"""Row-group matvec kernels: out[:, r0:r1] = x @ W[r0:r1]^T for one GGML type, on raw block bytes.

Q8_0 (which is also what repacked Q4_0 becomes) and Q5_0 run through the integer row dots of
kernels/intdot.py against x quantized to Q8_0. The f32 kernel (every other type, through
rows_generic) computes FOUR weight rows at a time:
the loop over a block's elements then carries four independent reductions and shares each x
load between them, which is the shape LLVM's loop vectorizer turns into 8-lane FMAs (a one-row
32-element loop is fully unrolled first and then not vectorized: ~3 GB/s instead of ~13).
Indices are cast to uint64 so numba emits no negative-index wraparound selects, which would
hide that the loads are consecutive. A tail group past m re-reads row m-1 (same code path) and
its results are simply not stored. Every kernel prefetches ahead of its rows (kernels/prefetch.py).

Batch invariance: for each (x row j, weight row r) the result is the same bits whatever n is and
whatever the other rows of x hold. Q5_0 with n >= 2 dots a Q8_0 copy of its rows (widened in an
L1 scratch) instead of the packed blocks: the same values and scales, so the same bits, which the
tests assert.

Shapes: u8 raw bytes of W (m, k); xf = x (n, k) flattened; out = (n, m) flattened.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ggserve.kernels import jit_cache, threads  # noqa: F401  (numba cache dir + threading layer before any kernel)
from ggserve.kernels.intdot import dot_row_q5_0, dot_row_q8_0, dot_rows_q8_0, widen_q5_0_blocks
from ggserve.kernels.prefetch import prefetch_ahead
from ggserve.kernels.quant import deq_range

U = np.uint64


@njit(cache=True)
def rows_q8_0(u8, lut, m, k, xq, xd, n, out, r0, r1):
    # W Q8_0 (m, k): block = f16 d, 32 x int8, times x quantized to Q8_0 (kernels/activations.py):
    # xq (n, k) int8 flat, xd (n, k/32) f32 flat. One weight row against each x row in turn
    # through dot_row_q8_0 (exact integer block sums, llama.cpp's f32 accumulation), so a row's
    # bits never depend on n. The next rows are prefetched a row at a time.
    nb = k // 32
    row_bytes = nb * 34
    for r in range(r0, r1):
        o = r * row_bytes
        prefetch_ahead(u8, o, (row_bytes + 63) // 64)  # the row PREFETCH_DISTANCE ahead
        for j in range(n):
            out[j * m + r] = dot_row_q8_0(u8, U(o), nb, lut, xq, xd, U(j * nb))


@njit(cache=True)
def rows_q5_0_int(u8, lut, m, k, xq, xd, xo, n, out, r0, r1):
    # W Q5_0 (m, k): block = f16 d, u32 qh (fifth bits), 16 bytes of nibbles, times x quantized
    # to Q8_0 as rows_q8_0 does, xo its quad_offsets (same bits as the widened Q8_0 rows). One
    # x row: dot_row_q5_0 on the packed blocks (22 bytes per 32 weights streamed, not 34).
    # Several: widen 2 rows to Q8_0 in an L1 scratch once, then dot_rows_q8_0 that with each x
    # row (unpacking per x row made 4 rows 1.3x slower than widened weights).
    nb = k // 32
    row_bytes = nb * 22
    scratch = np.empty(2 * nb * 34, np.uint8)
    if n == 1:
        for r in range(r0, r1):
            o = r * row_bytes
            prefetch_ahead(u8, o, (row_bytes + 63) // 64)  # the row PREFETCH_DISTANCE ahead
            out[r] = dot_row_q5_0(u8, U(o), nb, lut, xq, xd, U(0), xo)
        return
    for r in range(r0, r1, 2):
        o = r * row_bytes
        second = row_bytes if r + 1 < m else 0  # a last odd row is read twice, stored once
        prefetch_ahead(u8, o, (2 * row_bytes + 63) // 64)  # the 2 rows PREFETCH_DISTANCE ahead
        widen_q5_0_blocks(u8, U(o), nb, scratch)
        widen_q5_0_blocks(u8, U(o + second), nb, scratch[nb * 34:])
        for j in range(n):
            a, b = dot_rows_q8_0(scratch, U(0), U(nb * 34), nb, lut, xq, xd, U(j * nb))
            out[j * m + r] = a
            if r + 1 < m:
                out[j * m + r + 1] = b


@njit(cache=True, inline="always")
def _store4(out, base, r, m, s0, s1, s2, s3):
    out[base + r] = s0
    if r + 1 < m:
        out[base + r + 1] = s1
    if r + 2 < m:
        out[base + r + 2] = s2
    if r + 3 < m:
        out[base + r + 3] = s3


@njit(cache=True, fastmath=True)
def rows_generic(ggml_type, block_size, block_bytes, u8, lut, m, k, xf, n, out, r0, r1, tmp):
    # Any type: decode 4 rows into tmp (4*k,) f32, then 4 f32 dot products per x row.
    bpr = k // block_size
    for r in range(r0, r1, 4):
        for t in range(4):
            rr = min(r + t, m - 1)
            deq_range(ggml_type, u8, lut, rr * bpr, bpr, block_size, block_bytes, tmp, t * k)
        for j in range(n):
            xb = j * k
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for i in range(k):
                xv = xf[U(xb + i)]
                s0 += tmp[U(i)] * xv
                s1 += tmp[U(k + i)] * xv
                s2 += tmp[U(2 * k + i)] * xv
                s3 += tmp[U(3 * k + i)] * xv
            _store4(out, j * m, r, m, s0, s1, s2, s3)
