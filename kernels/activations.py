"""8-bit activations: x rounded to ggml's Q8_0 or Q8_K blocks before a quantized matmul.

Owns:
- `quantize_q8_0(xf, n, k, xq, xd)`: each 32-value block of x becomes int8 values and one
  scale, with ggml's rule: d = max|x| / 127, rounded to f16 as ggml stores it;
  q = round-half-even(x * 127 / max|x|); and `quad_offsets(xq, x_offsets)`, the per-4-value
  sums the Q5_0 dot takes its offset from.
- `quantize_q8_k(xf, n, k, xq, xd, xbs)`: ggml's Q8_K (256-value blocks, f32 scale), the
  activations of the k-quant kernels, plus the int sums of each 16 values (ggml's bsums).
- `q8_0_round_trip(x)`, `q8_k_round_trip(x)`: x rounded and back, for the dequantize + BLAS
  prefill path, so a prompt sees the same activations on either path.

llama.cpp multiplies Q8_0 / Q5_0 / Q4_0 weights with Q8_0 activations and k-quants with Q8_K
ones; doing the same keeps our numbers close to its numbers and lets the dot products be exact
integer sums.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ggserve.kernels import jit_cache, threads  # noqa: F401  (numba cache dir + threading layer before any kernel)
from ggserve.kernels.quant import _bits_f32, f16_round

U = np.uint64  # unsigned indices: no negative-index wraparound selects, so the loops vectorize
ABS_BITS = np.int32(0x7FFFFFFF)  # an f32's bits but the sign
INF_BITS = np.int32(0x7F800000)  # the smallest |x| bit pattern that is not finite


@njit(cache=True, inline="always")
def _abs_bits_max(xi, o, count):
    # max over xi[o:o + count] (x's f32 bit patterns as int32) of the pattern of |x|: for
    # non-negative floats the integer order is the float order, and inf / nan patterns
    # (>= INF_BITS) sit above every finite one. An integer max reduction vectorizes without
    # fastmath; the float compare-and-branch it replaces mispredicted (~10 cycles per value).
    top = np.int32(0)
    for i in range(count):
        top = max(top, xi[U(o + i)] & ABS_BITS)
    return top


@njit(cache=True)
def quantize_q8_0(xf, n, k, xq, xd):
    # x (n, k) f32 flat -> xq (n, k) int8 flat in [-127, 127], xd (n, k/32) f32 flat block scales.
    # A block holding inf/nan gets scale nan, so the dot products with it stay nan as with f32.
    nb = k // 32
    xi = xf.view(np.int32)
    for j in range(n):
        for b in range(nb):
            o = U(j * k + b * 32)
            top = _abs_bits_max(xi, o, 32)
            if top >= INF_BITS:
                xd[j * nb + b] = np.float32(np.nan)
                xq[o:o + 32] = 0
                continue
            amax = _bits_f32(np.uint32(top))
            d = amax / np.float32(127.0)
            # 127 / amax, not 1 / d: ggml's x86 quantize_row_q8_0 (the one llama.cpp runs here)
            # multiplies by it, and the two differ in the last bit often enough to flip a rounding
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            for i in range(32):
                xq[U(o + i)] = np.int8(np.rint(xf[U(o + i)] * inv))
            xd[j * nb + b] = f16_round(d)


@njit(cache=True)
def quad_offsets(xq, x_offsets):
    # xq (n, k) int8 flat -> x_offsets (n, k/4) int32 flat: 16 * the sum of each 4 consecutive
    # values, what a Q5_0 dot on unsigned values (0..31) takes off each lane for the -16 of the
    # weights (kernels/intdot.py dot_row_q5_0)
    for i in range(x_offsets.size):
        o = U(4 * i)
        quad = np.int32(xq[o]) + np.int32(xq[o + U(1)]) + np.int32(xq[o + U(2)]) + np.int32(xq[o + U(3)])
        x_offsets[i] = np.int32(16) * quad


def q8_0_round_trip(x: np.ndarray) -> np.ndarray:
    """x (n, k) f32 -> a new (n, k) f32 array: x rounded to Q8_0 and back (values * scales),
    the activations an integer Q8_0 dot product sees; for the BLAS prefill path."""
    n, k = x.shape
    xq = np.empty(n * k, np.int8)
    xd = np.empty(n * (k // 32), np.float32)
    quantize_q8_0(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), n, k, xq, xd)
    return (xq.reshape(n, k // 32, 32) * xd.reshape(n, k // 32, 1)).reshape(n, k)


@njit(cache=True)
def quantize_q8_k(xf, n, k, xq, xd, xbs):
    # x (n, k) f32 flat -> ggml's Q8_K: xq (n, k) int8 flat, xd (n, k/256) f32 scales and xbs
    # (n, k/16) int32 sums of each 16 values (ggml's bsums: Q4_K's minimums, Q6_K's offset). Per
    # 256 values: max = the value of largest |x| (first on ties); q = min(127,
    # round-half-even(x * -127 / max)); d = 1 / (-127 / max).
    nb = k // 256
    xi = xf.view(np.int32)
    for j in range(n):
        for b in range(nb):
            o = U(j * k + b * 256)
            top = _abs_bits_max(xi, o, 256)
            if top >= INF_BITS or top == 0:
                xd[j * nb + b] = np.float32(np.nan) if top >= INF_BITS else np.float32(0.0)
                xq[o:o + 256] = 0
            else:
                first = o
                while xi[first] & ABS_BITS != top:
                    first += U(1)
                iscale = np.float32(-127.0) / xf[first]
                for i in range(256):
                    xq[U(o + i)] = np.int8(min(np.float32(127.0), np.rint(iscale * xf[U(o + i)])))
                xd[j * nb + b] = np.float32(1.0) / iscale
            for s in range(16):
                total = np.int32(0)
                for i in range(16):
                    total += np.int32(xq[U(o + s * 16 + i)])
                xbs[j * (k // 16) + b * 16 + s] = total


def q8_k_round_trip(x: np.ndarray) -> np.ndarray:
    """x (n, k) f32 -> a new (n, k) f32 array: x rounded to Q8_K and back (the k-quant kernels'
    activations), for the BLAS prefill path."""
    n, k = x.shape
    xq = np.empty(n * k, np.int8)
    xd = np.empty(n * (k // 256), np.float32)
    quantize_q8_k(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), n, k, xq, xd, np.empty(n * (k // 16), np.int32))
    return (xq.reshape(n, k // 256, 256) * xd.reshape(n, k // 256, 1)).reshape(n, k)
