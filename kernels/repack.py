"""Load-time repacking of weight blocks into a layout the decode kernels stream faster.

Owns `widen_to_q8_0` and `WIDENED_TYPES`: Q5_0 blocks (f16 d, u32 fifth bits, 16 bytes of
nibble pairs; 22 bytes per 32 weights) and Q4_0 blocks (f16 d, 16 bytes of nibble pairs; 18
bytes) rewritten as Q8_0 blocks (the same f16 d, 32 int8; 34 bytes). The values are identical
(a weight in [-16, 15] fits an int8 and the scale is copied bit for bit), so dequantized weights
do not change; only the bytes per weight grow (1.55x for Q5_0, 1.9x for Q4_0).

Why: a Q4_0 matvec is compute-bound unpacking nibbles with the f32 kernel, while Q8_0 is
memory-bound (~23-26 GB/s of weights on 2 cores with prefetching and integer dots). llama.cpp
repacks for the same reason (its CPU "repack" buffers); `--no-repack` keeps every weight in the
memory-mapped file. Q5_0 is no longer widened at load: its integer kernel unpacks the 5-bit
values in registers (kernels/intdot.py dot_row_q5_0) and streams 22 bytes per 32 weights
instead of 34, ~15-20% faster per decode step; widen_q5_0_blocks makes the same Q8_0 copy
of two rows in L1 for batches. widen_to_q8_0 still accepts Q5_0 (tests compare against it).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ggserve.kernels import jit_cache, threads  # noqa: F401  (numba cache dir + threading layer before any kernel)
from ggserve.kernels.ggml_types import BLOCK_LAYOUT, Q4_0, Q5_0, GGMLType

WIDENED_TYPES = (Q4_0,)  # GGML types the model widens at load (widen_to_q8_0 also takes Q5_0)
Q8_0_BLOCK_BYTES = BLOCK_LAYOUT[GGMLType.Q8_0][1]


@njit(cache=True, parallel=True)
def _widen(src, dst, n_blocks, src_block_bytes, has_fifth_bits):
    # src (n_blocks * src_block_bytes,) Q4_0 / Q5_0 bytes -> dst (n_blocks * 34,) Q8_0 bytes
    for b in prange(n_blocks):
        s = b * src_block_bytes
        d = b * Q8_0_BLOCK_BYTES
        dst[d] = src[s]
        dst[d + 1] = src[s + 1]
        qh = np.uint32(0)
        qs = s + 2
        offset = 8  # Q4_0 values are nibble - 8
        if has_fifth_bits:
            qh = (np.uint32(src[s + 2]) | (np.uint32(src[s + 3]) << 8) | (np.uint32(src[s + 4]) << 16)
                  | (np.uint32(src[s + 5]) << 24))
            qs = s + 6
            offset = 16  # Q5_0 values are (nibble | fifth bit << 4) - 16
        for i in range(16):
            q = np.int32(src[qs + i])
            lo = (q & 15) | (np.int32((qh >> i) & 1) << 4)
            hi = (q >> 4) | (np.int32((qh >> (i + 16)) & 1) << 4)
            dst[d + 2 + i] = np.uint8((lo - offset) & 0xFF)  # int8 two's complement
            dst[d + 18 + i] = np.uint8((hi - offset) & 0xFF)


def widen_to_q8_0(src: np.ndarray, ggml_type: int) -> np.ndarray:
    """Q4_0 or Q5_0 block bytes (uint8) -> a new array holding the same weights as Q8_0 blocks."""
    if ggml_type not in (Q4_0, Q5_0):
        raise ValueError(f"only Q4_0 and Q5_0 widen to Q8_0, got GGML type {ggml_type}")
    block_bytes = BLOCK_LAYOUT[GGMLType(ggml_type)][1]
    src = np.ascontiguousarray(src, dtype=np.uint8).reshape(-1)
    if src.size % block_bytes:
        raise ValueError(f"data must be whole {block_bytes}-byte blocks, got {src.size} bytes")
    n_blocks = src.size // block_bytes
    dst = np.empty(n_blocks * Q8_0_BLOCK_BYTES, np.uint8)
    _widen(src, dst, n_blocks, block_bytes, ggml_type == Q5_0)
    return dst
