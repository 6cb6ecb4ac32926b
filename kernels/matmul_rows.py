"""Row-group matvec kernels: out[:, r0:r1] = x @ W[r0:r1]^T for one GGML type, on raw block bytes.

Q8_0 (which is also what repacked Q5_0 becomes) runs through the integer row dot of
kernels/intdot.py against x quantized to Q8_0. The f32 kernels (Q5_0 kept in the file with
--no-repack, and every other type through rows_generic) compute FOUR weight rows at a time:
the loop over a block's elements then carries four independent reductions and shares each x
load between them, which is the shape LLVM's loop vectorizer turns into 8-lane FMAs (a one-row
32-element loop is fully unrolled first and then not vectorized: ~3 GB/s instead of ~13).
Indices are cast to uint64 so numba emits no negative-index wraparound selects, which would
hide that the loads are consecutive. A tail group past m re-reads row m-1 (same code path) and
its results are simply not stored. Every kernel prefetches ahead of its rows (kernels/prefetch.py).

Batch invariance: for each (x row j, weight row r) the same instructions run in the same order
whatever n is and whatever the other rows of x hold (j is the outer loop around an identical
body), so results are bitwise independent of the batch. The one exception to "same kernel for
every n" is Q5_0: n >= 2 runs rows_q5_0_x2, which decodes a block once for two x rows; its
per-row bits equal rows_q5_0's, which the tests assert.

Shapes: u8 raw bytes of W (m, k); xf = x (n, k) flattened; out = (n, m) flattened.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from kernels.intdot import dot_rows_q8_0
from kernels.prefetch import prefetch_ahead
from kernels.quant import deq_range

U = np.uint64
I0, I4, I15, I16 = np.int32(0), np.int32(4), np.int32(15), np.int32(16)


@njit(cache=True)
def rows_q8_0(u8, lut, m, k, xq, xd, n, out, r0, r1):
    # W Q8_0 (m, k): block = f16 d, 32 x int8, times x quantized to Q8_0 (kernels/activations.py):
    # xq (n, k) int8 flat, xd (n, k/32) f32 flat. Two weight rows against each x row in turn
    # through dot_rows_q8_0 (exact integer block sums, llama.cpp's f32 accumulation), so a row's
    # bits never depend on n. The next rows are prefetched two rows at a time.
    nb = k // 32
    row_bytes = nb * 34
    for r in range(r0, r1, 2):
        o = r * row_bytes
        second = row_bytes if r + 1 < m else 0  # a last odd row is read twice, stored once
        prefetch_ahead(u8, o, (2 * row_bytes + 63) // 64)  # the 2 rows PREFETCH_DISTANCE ahead
        for j in range(n):
            a, b = dot_rows_q8_0(u8, U(o), U(second), nb, lut, xq, xd, U(j * nb))
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


@njit(cache=True, inline="always")
def _f16h(u16, lut, o):
    # f16 at (even) byte offset o, through a uint16 view of the bytes: one load instead of two
    return lut[np.int64(u16[U(o >> 1)])]


@njit(cache=True, inline="always")
def _qh32h(u16, o):
    # little-endian u32 at (even) byte offset o as int32, from two uint16 loads
    return np.int32(np.int64(u16[U(o >> 1)]) | (np.int64(u16[U((o >> 1) + 1)]) << 16))


# bit i of a 32-bit word, as int32 (compile-time constant array): testing `qh & BIT[i]` keeps
# the vector lanes 32-bit; numba's int64 promotion turned `(qh >> i) & 1` into 64-bit shifts.
BIT = np.array([1 << i for i in range(32)], dtype=np.uint32).view(np.int32)


@njit(cache=True, inline="always")
def _q5(u8, o, qh, i):
    # Q5_0 element pair (i, i+16) of a block whose qs start at byte o; values in [-16, 15]
    q = np.int32(u8[U(o + i)])
    lo = np.int32(q & I15) - (I0 if np.int32(qh & BIT[i]) != I0 else I16)
    hi = np.int32(q >> I4) - (I0 if np.int32(qh & BIT[i + 16]) != I0 else I16)
    return np.float32(np.int32(lo)), np.float32(np.int32(hi))


@njit(cache=True, fastmath=True)
def rows_q5_0(u8, lut, m, k, xf, n, out, r0, r1):
    # W Q5_0 (m, k): block = f16 d, u32 qh (5th bits), 16 bytes of nibble pairs (i, i+16)
    u16 = u8.view(np.uint16)  # every f16 / qh field sits at an even byte offset
    nb = k // 32
    row_bytes = nb * 22
    for r in range(r0, r1, 4):
        oa = r * row_bytes
        ob = min(r + 1, m - 1) * row_bytes
        oc = min(r + 2, m - 1) * row_bytes
        od = min(r + 3, m - 1) * row_bytes
        for j in range(n):
            xb = j * k
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for b in range(nb):
                bo = b * 22
                prefetch_ahead(u8, oa + 4 * bo, 2)
                ha = _qh32h(u16, oa + bo + 2)
                hb = _qh32h(u16, ob + bo + 2)
                hc = _qh32h(u16, oc + bo + 2)
                hd = _qh32h(u16, od + bo + 2)
                p0 = p1 = p2 = p3 = np.float32(0.0)
                xo = xb + b * 32
                for i in range(16):
                    xl = xf[U(xo + i)]
                    xh = xf[U(xo + 16 + i)]
                    lo, hi = _q5(u8, oa + bo + 6, ha, i)
                    p0 += lo * xl + hi * xh
                    lo, hi = _q5(u8, ob + bo + 6, hb, i)
                    p1 += lo * xl + hi * xh
                    lo, hi = _q5(u8, oc + bo + 6, hc, i)
                    p2 += lo * xl + hi * xh
                    lo, hi = _q5(u8, od + bo + 6, hd, i)
                    p3 += lo * xl + hi * xh
                s0 += _f16h(u16, lut, oa + bo) * p0
                s1 += _f16h(u16, lut, ob + bo) * p1
                s2 += _f16h(u16, lut, oc + bo) * p2
                s3 += _f16h(u16, lut, od + bo) * p3
            _store4(out, j * m, r, m, s0, s1, s2, s3)


@njit(cache=True, fastmath=True)
def rows_q5_0_x2(u8, lut, m, k, xf, n, out, r0, r1):
    # rows_q5_0 for TWO x rows per pass (j, j+1): each block is decoded once for both, so a
    # batch of n costs ~n/2 single passes; an odd last row is paired with itself. Per (x row,
    # W row) the arithmetic matches rows_q5_0 bit for bit (tests/test_kernels_matmul.py).
    u16 = u8.view(np.uint16)  # every f16 / qh field sits at an even byte offset
    nb = k // 32
    row_bytes = nb * 22
    for r in range(r0, r1, 4):
        oa = r * row_bytes
        ob = min(r + 1, m - 1) * row_bytes
        oc = min(r + 2, m - 1) * row_bytes
        od = min(r + 3, m - 1) * row_bytes
        for j in range(0, n, 2):
            xb = j * k
            yb = min(j + 1, n - 1) * k
            s0 = s1 = s2 = s3 = t0 = t1 = t2 = t3 = np.float32(0.0)
            for b in range(nb):
                bo = b * 22
                prefetch_ahead(u8, oa + 4 * bo, 2)
                ha = _qh32h(u16, oa + bo + 2)
                hb = _qh32h(u16, ob + bo + 2)
                hc = _qh32h(u16, oc + bo + 2)
                hd = _qh32h(u16, od + bo + 2)
                p0 = p1 = p2 = p3 = q0 = q1 = q2 = q3 = np.float32(0.0)
                xo = xb + b * 32
                yo = yb + b * 32
                for i in range(16):
                    xl = xf[U(xo + i)]
                    xh = xf[U(xo + 16 + i)]
                    yl = xf[U(yo + i)]
                    yh = xf[U(yo + 16 + i)]
                    lo, hi = _q5(u8, oa + bo + 6, ha, i)
                    p0 += lo * xl + hi * xh
                    q0 += lo * yl + hi * yh
                    lo, hi = _q5(u8, ob + bo + 6, hb, i)
                    p1 += lo * xl + hi * xh
                    q1 += lo * yl + hi * yh
                    lo, hi = _q5(u8, oc + bo + 6, hc, i)
                    p2 += lo * xl + hi * xh
                    q2 += lo * yl + hi * yh
                    lo, hi = _q5(u8, od + bo + 6, hd, i)
                    p3 += lo * xl + hi * xh
                    q3 += lo * yl + hi * yh
                da = _f16h(u16, lut, oa + bo)
                db = _f16h(u16, lut, ob + bo)
                dc = _f16h(u16, lut, oc + bo)
                dd = _f16h(u16, lut, od + bo)
                s0 += da * p0
                s1 += db * p1
                s2 += dc * p2
                s3 += dd * p3
                t0 += da * q0
                t1 += db * q1
                t2 += dc * q2
                t3 += dd * q3
            _store4(out, j * m, r, m, s0, s1, s2, s3)
            if j + 1 < n:
                _store4(out, (j + 1) * m, r, m, t0, t1, t2, t3)


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
