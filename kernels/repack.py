"""Load-time repacking of weight blocks into a layout the decode kernels stream faster.

Owns `widen_q5_0_to_q8_0`: Q5_0 blocks (f16 d, u32 high bits, 16 bytes of nibble pairs; 22 bytes
per 32 weights) rewritten as Q8_0 blocks (the same f16 d, 32 int8; 34 bytes). The values are
identical (a 5-bit weight in [-16, 15] fits an int8 and the scale is copied bit for bit), so
dequantized weights do not change; only the bytes per weight grow 1.55x.

Why: a matvec is compute-bound on Q5_0 (unpacking the fifth bits costs ~8 vector ops per 8
weights: ~5 GMAC/s per core, 7 GB/s on 2 cores) but memory-bound on Q8_0 (~23 GB/s of weights on
2 cores with prefetching). Reading 1.55x the bytes at 3x the speed halves the time of the
matrices that carry most of a Q4_K_M model's per-token bytes. llama.cpp repacks for the same
reason (its CPU "repack" buffers); `--no-repack` keeps every weight in the memory-mapped file.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

Q5_0_BLOCK_BYTES = 22
Q8_0_BLOCK_BYTES = 34


@njit(cache=True, parallel=True)
def _widen(src, dst, n_blocks):
    # src (n_blocks * 22,) Q5_0 bytes -> dst (n_blocks * 34,) Q8_0 bytes
    for b in prange(n_blocks):
        s = b * Q5_0_BLOCK_BYTES
        d = b * Q8_0_BLOCK_BYTES
        dst[d] = src[s]
        dst[d + 1] = src[s + 1]
        qh = (np.uint32(src[s + 2]) | (np.uint32(src[s + 3]) << 8) | (np.uint32(src[s + 4]) << 16)
              | (np.uint32(src[s + 5]) << 24))
        for i in range(16):
            q = np.int32(src[s + 6 + i])
            lo = (q & 15) | (np.int32((qh >> i) & 1) << 4)
            hi = (q >> 4) | (np.int32((qh >> (i + 16)) & 1) << 4)
            dst[d + 2 + i] = np.uint8((lo - 16) & 0xFF)  # int8 two's complement
            dst[d + 18 + i] = np.uint8((hi - 16) & 0xFF)


def widen_q5_0_to_q8_0(src: np.ndarray) -> np.ndarray:
    """Q5_0 block bytes (n_blocks * 22,) uint8 -> a new array of the same weights as Q8_0 blocks."""
    src = np.ascontiguousarray(src, dtype=np.uint8).reshape(-1)
    if src.size % Q5_0_BLOCK_BYTES:
        raise ValueError(f"Q5_0 data must be whole 22-byte blocks, got {src.size} bytes")
    n_blocks = src.size // Q5_0_BLOCK_BYTES
    dst = np.empty(n_blocks * Q8_0_BLOCK_BYTES, np.uint8)
    _widen(src, dst, n_blocks)
    return dst
