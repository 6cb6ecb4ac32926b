"""Row-group matvec kernels for the k-quants used by Q4_K_M models: Q4_K and Q6_K.

Same scheme as matmul_rows.py (several weight rows per inner loop so LLVM vectorizes along
the elements, uint64 indices, tail rows clamped to m-1 and not stored, j outer loop so results
are batch invariant). Q4_K's per-sub-block minimum is applied with precomputed x block sums:
sum_l (d*sc*q_l - dmin*mn) * x_l = d*sc*sum_l q_l*x_l - dmin*mn*sum_l x_l.

Shapes: u8 raw bytes of W (m, k); xf = x (n, k) flattened; xs = per-32-element sums of x,
(n, k/32) flattened; out = (n, m) flattened.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from kernels.matmul_rows import _prefetch_ahead
from kernels.quant_kquants import scale_min_k4

U = np.uint64
I2, I3, I4, I6, I15, I32 = (np.int32(v) for v in (2, 3, 4, 6, 15, 32))


@njit(cache=True, inline="always")
def _f16(u8, lut, o):
    return lut[np.int64(u8[U(o)]) | (np.int64(u8[U(o + 1)]) << 8)]


@njit(cache=True, inline="always")
def _q4k_group(u8, lut, o, g, pl, ph, xsl, xsh):
    # super-block at byte o, 64-element group g: apply the two sub-block scales and mins
    d = _f16(u8, lut, o)
    dmin = _f16(u8, lut, o + 2)
    sc1, m1 = scale_min_k4(u8, o + 4, 2 * g)
    sc2, m2 = scale_min_k4(u8, o + 4, 2 * g + 1)
    return (d * (np.float32(sc1) * pl + np.float32(sc2) * ph)
            - dmin * (np.float32(m1) * xsl + np.float32(m2) * xsh))


@njit(cache=True, fastmath=True)
def rows_q4_k(u8, lut, m, k, xf, xs, n, out, r0, r1):
    # W Q4_K (m, k): super-block = d, dmin, 12 scale bytes, 128 bytes of nibbles.
    # Two W rows per inner loop, one x row per pass (j outer) for every n: a two-x-row
    # variant ran at 3.5 vs 5.3 GMAC/s for n=1 and its bits differ from this one.
    nb = k // 256
    row_bytes = nb * 144
    nsub = k // 32
    for r in range(r0, r1, 2):
        oa = r * row_bytes
        ob = min(r + 1, m - 1) * row_bytes
        for j in range(n):
            xb = j * k
            s0 = s1 = np.float32(0.0)
            for b in range(nb):
                bo = b * 144
                for g in range(4):
                    _prefetch_ahead(u8, oa + 2 * bo + g * 72, 2)  # 2 rows x 144 bytes / 4 groups
                    a0 = a1 = c0 = c1 = np.float32(0.0)  # (W row a, b) x (low, high nibbles)
                    qo = bo + 16 + g * 32
                    xo = xb + b * 256 + g * 64
                    for l in range(32):
                        xl = xf[U(xo + l)]
                        xh = xf[U(xo + 32 + l)]
                        q = np.int32(u8[U(oa + qo + l)])
                        a0 += np.float32(np.int32(q & I15)) * xl
                        c0 += np.float32(np.int32(q >> I4)) * xh
                        q = np.int32(u8[U(ob + qo + l)])
                        a1 += np.float32(np.int32(q & I15)) * xl
                        c1 += np.float32(np.int32(q >> I4)) * xh
                    sub = b * 8 + 2 * g
                    xsl = xs[j * nsub + sub]
                    xsh = xs[j * nsub + sub + 1]
                    s0 += _q4k_group(u8, lut, oa + bo, g, a0, c0, xsl, xsh)
                    s1 += _q4k_group(u8, lut, ob + bo, g, a1, c1, xsl, xsh)
            _store2(out, j * m, r, m, s0, s1)


@njit(cache=True, inline="always")
def _store2(out, base, r, m, s0, s1):
    out[base + r] = s0
    if r + 1 < m:
        out[base + r + 1] = s1


@njit(cache=True, inline="always")
def _q6(u8, o, half, l):
    # Q6_K super-block at byte o: the four 6-bit values (l, l+32, l+64, l+96) of a 128-half
    a = np.int32(u8[U(o + half * 64 + l)])
    b = np.int32(u8[U(o + half * 64 + 32 + l)])
    h = np.int32(u8[U(o + 128 + half * 32 + l)])
    # int32 everywhere: numba's int64 promotion would halve the vector width
    q1 = np.int32(np.int32(a & I15) | np.int32(np.int32(h & I3) << I4)) - I32
    q2 = np.int32(np.int32(b & I15) | np.int32(np.int32(np.int32(h >> I2) & I3) << I4)) - I32
    q3 = np.int32(np.int32(a >> I4) | np.int32(np.int32(np.int32(h >> I4) & I3) << I4)) - I32
    q4 = np.int32(np.int32(b >> I4) | np.int32(np.int32(np.int32(h >> I6) & I3) << I4)) - I32
    return np.float32(np.int32(q1)), np.float32(np.int32(q2)), np.float32(np.int32(q3)), np.float32(np.int32(q4))


@njit(cache=True, inline="always")
def _q6k_scale(u8, lut, o, half, s, p1, p2, p3, p4):
    so = o + 192 + half * 8 + s
    return _f16(u8, lut, o + 208) * (np.float32(np.int8(u8[so])) * p1 + np.float32(np.int8(u8[so + 2])) * p2
                                     + np.float32(np.int8(u8[so + 4])) * p3 + np.float32(np.int8(u8[so + 6])) * p4)


@njit(cache=True, fastmath=True)
def rows_q6_k(u8, lut, m, k, xf, n, out, r0, r1):
    # W Q6_K (m, k): super-block = ql[128], qh[64], int8 scales[16] (one per 16 values), d.
    # Two W rows per inner loop (4 partial sums per row already make 8 accumulators), one x
    # row per pass: a two-x-row variant was measured to give slot-dependent bits.
    nb = k // 256
    row_bytes = nb * 210
    for r in range(r0, r1, 2):
        oa = r * row_bytes
        ob = min(r + 1, m - 1) * row_bytes
        for j in range(n):
            xb = j * k
            s0 = s1 = np.float32(0.0)
            for b in range(nb):
                bo = b * 210
                for half in range(2):
                    xo = xb + b * 256 + half * 128
                    for s in range(2):
                        _prefetch_ahead(u8, oa + 2 * bo + (half * 2 + s) * 105, 2)  # 2 x 210 B / 4
                        a1 = a2 = a3 = a4 = np.float32(0.0)
                        c1 = c2 = c3 = c4 = np.float32(0.0)
                        for t in range(16):
                            l = s * 16 + t
                            x1 = xf[U(xo + l)]
                            x2 = xf[U(xo + 32 + l)]
                            x3 = xf[U(xo + 64 + l)]
                            x4 = xf[U(xo + 96 + l)]
                            q1, q2, q3, q4 = _q6(u8, oa + bo, half, l)
                            a1 += q1 * x1
                            a2 += q2 * x2
                            a3 += q3 * x3
                            a4 += q4 * x4
                            q1, q2, q3, q4 = _q6(u8, ob + bo, half, l)
                            c1 += q1 * x1
                            c2 += q2 * x2
                            c3 += q3 * x3
                            c4 += q4 * x4
                        s0 += _q6k_scale(u8, lut, oa + bo, half, s, a1, a2, a3, a4)
                        s1 += _q6k_scale(u8, lut, ob + bo, half, s, c1, c2, c3, c4)
            _store2(out, j * m, r, m, s0, s1)
