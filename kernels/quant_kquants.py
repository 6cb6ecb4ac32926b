"""Block decoders for the k-quants (256-element super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Each `deq_*(u8, lut, o, y, yo)` decodes the super-block at byte offset o of the raw GGUF bytes
into y[yo:yo+256] (f32). Byte layouts (ggml's block_q*_K structs, little-endian):
  Q2_K  84 B: scales[16] (lo nibble scale, hi nibble min), qs[64] (2-bit), d f16, dmin f16
  Q3_K 110 B: hmask[32], qs[64] (low 2 bits), scales[12] (16 x 6-bit, signed -32), d f16
  Q4_K 144 B: d f16, dmin f16, scales[12] (8 x 6-bit scale + 8 x 6-bit min), qs[128]
  Q5_K 176 B: d f16, dmin f16, scales[12], qh[32] (5th bits), qs[128]
  Q6_K 210 B: ql[128], qh[64] (2 high bits), scales[16] int8, d f16
`scale_min_k4` decodes one sub-block's (scale, min); matmul_krows.py unpacks all 8 at once, straight-line.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ggserve.kernels import jit_cache, threads  # noqa: F401  (numba cache dir + threading layer before any kernel)

U = np.uint64


@njit(cache=True, inline="always")
def _f16(u8, lut, o):
    return lut[np.int64(u8[o]) | (np.int64(u8[o + 1]) << 8)]


@njit(cache=True, inline="always")
def scale_min_k4(u8, s, j):
    # Q4_K / Q5_K: sub-block j (0..7) 6-bit (scale, min) from the 12 scale bytes at offset s
    if j < 4:
        return np.int32(u8[s + j]) & 63, np.int32(u8[s + j + 4]) & 63
    sc = (np.int32(u8[s + j + 4]) & 15) | ((np.int32(u8[s + j - 4]) >> 6) << 4)
    mn = (np.int32(u8[s + j + 4]) >> 4) | ((np.int32(u8[s + j]) >> 6) << 4)
    return sc, mn


@njit(cache=True, inline="always")
def scale_q3_k(u8, s, i):
    # Q3_K: sub-block i (0..15) signed 6-bit scale from the 12 scale bytes at offset s
    low = (np.int32(u8[s + (i & 7)]) >> (4 * (i >> 3))) & 15
    high = (np.int32(u8[s + 8 + (i & 3)]) >> (2 * (i >> 2))) & 3
    return (low | (high << 4)) - 32


@njit(cache=True, fastmath=True)
def deq_q2_k(u8, lut, o, y, yo, n16):
    d = _f16(u8, lut, o + 80)
    dmin = _f16(u8, lut, o + 82)
    sub = 0
    for half in range(2):
        q = o + 16 + half * 32
        for shift in range(0, 8, 2):
            for part in range(2):
                sc = np.int32(u8[o + sub])
                dl = d * np.float32(sc & 15)
                ml = dmin * np.float32(sc >> 4)
                base = yo + sub * 16
                for l in range(n16):  # n16 == 16, a run-time bound (see quant.py)
                    qv = (np.int32(u8[U(q + part * 16 + l)]) >> shift) & 3
                    y[U(base + l)] = dl * np.float32(qv) - ml
                sub += 1


@njit(cache=True, fastmath=True)
def deq_q3_k(u8, lut, o, y, yo, n16):
    d = _f16(u8, lut, o + 108)
    sub = 0
    bit = 0
    for half in range(2):
        q = o + 32 + half * 32
        for shift in range(0, 8, 2):
            for part in range(2):
                dl = d * np.float32(scale_q3_k(u8, o + 96, sub))
                base = yo + sub * 16
                for l in range(n16):  # n16 == 16, a run-time bound (see quant.py)
                    qv = (np.int32(u8[U(q + part * 16 + l)]) >> shift) & 3
                    hm = (np.int32(u8[U(o + part * 16 + l)]) >> bit) & 1
                    y[U(base + l)] = dl * np.float32(qv - 4 * (1 - hm))
                sub += 1
            bit += 1


@njit(cache=True, fastmath=True)
def deq_q4_k(u8, lut, o, y, yo, n16):
    _deq_q4_q5_k(u8, lut, o, y, yo, n16, False)


@njit(cache=True, fastmath=True)
def deq_q5_k(u8, lut, o, y, yo, n16):
    _deq_q4_q5_k(u8, lut, o, y, yo, n16, True)


@njit(cache=True, fastmath=True, inline="always")
def _deq_q4_q5_k(u8, lut, o, y, yo, n16, q5):
    # Q4_K and Q5_K share the layout up to Q5_K's qh[32] (bit s of qh[l] is the fifth bit of
    # value 32 s + l), which pushes the nibbles from byte 16 to 48; q5 is a literal from the callers
    d = _f16(u8, lut, o)
    dmin = _f16(u8, lut, o + 2)
    qs = o + 48 if q5 else o + 16
    for g in range(4):
        sc1, m1 = scale_min_k4(u8, o + 4, 2 * g)
        sc2, m2 = scale_min_k4(u8, o + 4, 2 * g + 1)
        d1 = d * np.float32(sc1)
        d2 = d * np.float32(sc2)
        mm1 = dmin * np.float32(m1)
        mm2 = dmin * np.float32(m2)
        q = qs + g * 32
        base = yo + g * 64
        for l in range(2 * n16):  # == 32, a run-time bound (see quant.py)
            qv = np.int32(u8[q + l])
            lo = qv & 15
            hi = qv >> 4
            if q5:
                h = np.int32(u8[o + 16 + l])
                lo |= ((h >> (2 * g)) & 1) << 4
                hi |= ((h >> (2 * g + 1)) & 1) << 4
            y[U(base + l)] = d1 * np.float32(lo) - mm1
            y[U(base + 32 + l)] = d2 * np.float32(hi) - mm2


@njit(cache=True, fastmath=True)
def deq_q6_k(u8, lut, o, y, yo, n16):
    d = _f16(u8, lut, o + 208)
    for half in range(2):
        ql = o + half * 64
        qh = o + 128 + half * 32
        sc = o + 192 + half * 8
        base = yo + half * 128
        for l in range(2 * n16):  # == 32, a run-time bound (see quant.py)
            s = l >> 4
            h = np.int32(u8[qh + l])
            a = np.int32(u8[ql + l])
            b = np.int32(u8[ql + l + 32])
            q1 = ((a & 15) | ((h & 3) << 4)) - 32
            q2 = ((b & 15) | (((h >> 2) & 3) << 4)) - 32
            q3 = ((a >> 4) | (((h >> 4) & 3) << 4)) - 32
            q4 = ((b >> 4) | (((h >> 6) & 3) << 4)) - 32
            y[U(base + l)] = d * np.float32(np.int8(u8[sc + s])) * np.float32(q1)
            y[U(base + l + 32)] = d * np.float32(np.int8(u8[sc + s + 2])) * np.float32(q2)
            y[U(base + l + 64)] = d * np.float32(np.int8(u8[sc + s + 4])) * np.float32(q3)
            y[U(base + l + 96)] = d * np.float32(np.int8(u8[sc + s + 6])) * np.float32(q4)
