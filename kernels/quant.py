"""GGML weight block layouts and numba dequantization for every supported type.

Owns: which ggml types the kernels decode (`SUPPORTED_TYPES`; ids and layouts are
ggml_types.py's), the f16 -> f32 lookup table, scalar f32 -> f16
rounding (`f32_to_f16_bits`, `f16_round`), and `dequantize` / `dequantize_blocks` which expand
raw row-major block bytes to f32.

The kernels read the raw GGUF block bytes in place (no repacking): every block's f16 scales sit
at even byte offsets, and are converted with a 65536-entry f32 table (numba has no CPU float16);
whole f16 rows (F16 weights, the f16 KV cache) convert by bit placement, which vectorizes.
The per-type block decoders for the k-quants live in `quant_kquants.py`.
"""
from __future__ import annotations

import functools

import numpy as np
import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ggserve.kernels import jit_cache, threads  # noqa: F401  (numba cache dir + threading layer before any kernel)
from ggserve.kernels.ggml_types import (BF16, BLOCK_LAYOUT, F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0,
                                        GGMLType, type_name)
from ggserve.kernels.quant_kquants import deq_q2_k, deq_q3_k, deq_q4_k, deq_q5_k, deq_q6_k

# The types these kernels decode; the layouts themselves are ggml_types.BLOCK_LAYOUT.
SUPPORTED_TYPES: tuple[int, ...] = (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)


def block_layout(ggml_type: int) -> tuple[int, int]:
    """(elements per block, bytes per block); ValueError for types ggserve cannot run."""
    if int(ggml_type) not in SUPPORTED_TYPES:
        supported = sorted(type_name(t) for t in SUPPORTED_TYPES)
        raise ValueError(f"unsupported ggml type {int(ggml_type)} ({type_name(ggml_type)}); supported: {supported}")
    return BLOCK_LAYOUT[GGMLType(int(ggml_type))]


@functools.lru_cache(maxsize=1)
def f16_table() -> np.ndarray:
    """f32 value of every f16 bit pattern, (65536,) read-only; built once per process (~1 ms)."""
    table = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    table.flags.writeable = False
    return table


@intrinsic
def _f32_bits(typingctx, v):
    # float32 -> its IEEE bit pattern as uint32 (a register bitcast, no memory round trip)
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, u):
    # uint32 IEEE bit pattern -> that float32
    if u != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


# f32_to_f16_bits and f16_round are ordinary calls, not inlined at numba's IR level: inlining their
# branches makes numba print NumbaIRAssumptionWarnings at every first compile. Integer work and
# one exact multiply: compiled apart, they give the same bits.
@njit(cache=True)
def f32_to_f16_bits(v):
    # v f32 -> the nearest f16 (ties to even, as F16C's vcvtps2ph and numpy) as its uint16 bit pattern
    u = np.int64(_f32_bits(np.float32(v)))
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    h = np.int64(0x7C00)
    if a >= 0x47800000:  # >= 65536 (or inf / nan): inf, or a quiet nan
        if a > 0x7F800000:
            h = np.int64(0x7E00)
    elif a < 0x38800000:  # below 2^-14: an f16 subnormal, multiple of 2^-24
        h = np.int64(np.rint(abs(np.float64(v)) * 16777216.0))
    else:  # rebias the exponent, round the 13 dropped bits to nearest even
        h = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13
    return np.uint16(h | sign)


@njit(cache=True, inline="always")
def f16_bits_to_f32(h):
    # one f16 bit pattern (uint16) -> its f32 value. The bits move into an f32's place and 2^112
    # rebiases the exponent (exact for normals and subnormals); inf / nan get an f32 all-ones
    # exponent, which the multiply keeps. Branch-free, so a loop over it vectorizes (~4x the table).
    h = np.uint32(h)
    sign_mantissa = ((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x3FF)) << np.uint32(13))
    exponent = (h & np.uint32(0x7C00)) << np.uint32(13)
    is_special = np.uint32(exponent == np.uint32(0x0F800000))  # f16 inf / nan: f32 exponent 0xFF
    bits = sign_mantissa | (exponent + is_special * np.uint32(0x70000000))
    return _bits_f32(np.uint32(bits)) * np.float32(5.192296858534828e33)  # 2^112


@njit(cache=True)
def f16_round(v):
    # v f32 -> v rounded to f16 (ties to even), as f32: what ggml's f32 -> f16 -> f32 round trip gives
    return f16_bits_to_f32(f32_to_f16_bits(v))


# F16C's vcvtph2ps converts 8 f16 values in one instruction (exact, like f16_bits_to_f32)
HAS_F16C = bool(llvm_binding.get_host_cpu_features().get("f16c", False))


@intrinsic
def _f16x8_to_f32(typingctx, src, i, dst, j):
    # dst[j:j + 8] (f32) <- the f16 bit patterns src[i:i + 8] (uint16), as one LLVM `fpext <8 x
    # half>`, which is vcvtph2ps with F16C. Both arrays must be contiguous: the addresses are
    # data + index, whatever the type's layout says (the caller checks at run time).
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array)):
        return None

    def codegen(context, builder, signature, args):
        src_data = context.make_array(signature.args[0])(context, builder, args[0]).data
        dst_data = context.make_array(signature.args[2])(context, builder, args[2]).data
        halves = builder.load(builder.bitcast(builder.gep(src_data, [args[1]]), ir.VectorType(ir.IntType(16), 8).as_pointer()), align=2)
        floats = builder.fpext(builder.bitcast(halves, ir.VectorType(ir.HalfType(), 8)), ir.VectorType(ir.FloatType(), 8))
        builder.store(floats, builder.bitcast(builder.gep(dst_data, [args[3]]), floats.type.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(src, i, dst, j), codegen


@njit(cache=True, inline="always")
def f16_row_to_f32(src, dst):
    # src (d,) uint16 f16 bit patterns -> dst (d,) f32 (see f16_bits_to_f32); 8 at a time with F16C
    # when both rows are contiguous (a K/V cache row: ~6x faster than the bit arithmetic).
    # Branch-free setup: inlined branches make numba warn (see f32_to_f16_bits).
    fast = HAS_F16C & src.flags.c_contiguous & dst.flags.c_contiguous
    n_fast = src.shape[0] // 8 * 8 * np.int64(fast)
    for c in range(n_fast // 8):
        _f16x8_to_f32(src, np.uint64(8 * c), dst, np.uint64(8 * c))
    for j in range(n_fast, src.shape[0]):
        dst[j] = f16_bits_to_f32(src[j])


@njit(cache=True, inline="always")
def f16_at(u8, lut, o):
    # little-endian f16 at byte offset o -> f32
    return lut[np.int64(u8[o]) | (np.int64(u8[o + 1]) << 8)]


# Loop bounds below are `n16` (always 16, passed at run time) instead of literal 16/32: a
# constant-trip loop is fully unrolled first, and the unrolled stores to y cannot be vectorized
# because LLVM cannot rule out that y aliases u8. A run-time bound gets the loop vectorizer,
# which checks aliasing once at run time: measured 8x faster (0.5 -> 4 G values/s per core).
# Casts to int32 keep the vector lanes 32-bit (numba computes small ints in int64).
I0, I4, I8, I15, I16 = np.int32(0), np.int32(4), np.int32(8), np.int32(15), np.int32(16)
BIT = np.array([1 << i for i in range(32)], dtype=np.uint32).view(np.int32)  # bit i of a word
U = np.uint64  # unsigned indices: no negative-index wraparound selects in the loops


@njit(cache=True, inline="always")
def u32_at(u8, o):
    # little-endian u32 at byte o, as int32
    return np.int32(np.int64(u8[o]) | (np.int64(u8[o + 1]) << 8) | (np.int64(u8[o + 2]) << 16)
                    | (np.int64(u8[o + 3]) << 24))


@njit(cache=True, fastmath=True)
def deq_q4_0(u8, lut, o, y, yo, n16):
    # one 18-byte block at byte o -> y[yo:yo+32]
    d = f16_at(u8, lut, o)
    for j in range(n16):
        q = np.int32(u8[U(o + 2 + j)])
        y[U(yo + j)] = np.float32(np.int32(np.int32(q & I15) - I8)) * d
        y[U(yo + j + 16)] = np.float32(np.int32(np.int32(q >> I4) - I8)) * d


@njit(cache=True, fastmath=True)
def deq_q4_1(u8, lut, o, y, yo, n16):
    d = f16_at(u8, lut, o)
    m = f16_at(u8, lut, o + 2)
    for j in range(n16):
        q = np.int32(u8[U(o + 4 + j)])
        y[U(yo + j)] = np.float32(np.int32(q & I15)) * d + m
        y[U(yo + j + 16)] = np.float32(np.int32(q >> I4)) * d + m


@njit(cache=True, fastmath=True)
def deq_q5_0(u8, lut, o, y, yo, n16):
    d = f16_at(u8, lut, o)
    qh = u32_at(u8, o + 2)
    for j in range(n16):
        q = np.int32(u8[U(o + 6 + j)])
        lo = np.int32(q & I15) - (I0 if np.int32(qh & BIT[j]) != I0 else I16)
        hi = np.int32(q >> I4) - (I0 if np.int32(qh & BIT[j + 16]) != I0 else I16)
        y[U(yo + j)] = np.float32(np.int32(lo)) * d
        y[U(yo + j + 16)] = np.float32(np.int32(hi)) * d


@njit(cache=True, fastmath=True)
def deq_q5_1(u8, lut, o, y, yo, n16):
    d = f16_at(u8, lut, o)
    m = f16_at(u8, lut, o + 2)
    qh = u32_at(u8, o + 4)
    for j in range(n16):
        q = np.int32(u8[U(o + 8 + j)])
        lo = np.int32(q & I15) + (I16 if np.int32(qh & BIT[j]) != I0 else I0)
        hi = np.int32(q >> I4) + (I16 if np.int32(qh & BIT[j + 16]) != I0 else I0)
        y[U(yo + j)] = np.float32(np.int32(lo)) * d + m
        y[U(yo + j + 16)] = np.float32(np.int32(hi)) * d + m


@njit(cache=True, fastmath=True)
def deq_q8_0(u8, lut, o, y, yo, n16):
    d = f16_at(u8, lut, o)
    for j in range(2 * n16):
        y[U(yo + j)] = np.float32(np.int8(u8[U(o + 2 + j)])) * d


@njit(cache=True)
def deq_range(ggml_type, u8, lut, blk0, nblk, block_size, block_bytes, y, yo):
    # blocks [blk0, blk0+nblk) of u8 -> y[yo : yo + nblk*block_size]
    if ggml_type == F32:  # F32: plain little-endian floats; view instead of bit assembly
        src = u8[blk0 * 4:(blk0 + nblk) * 4].view(np.float32)
        for i in range(nblk):
            y[yo + i] = src[i]
    elif ggml_type == BF16:  # BF16: the f32 with the low 16 mantissa bits zero
        bits = y[yo:yo + nblk].view(np.uint32)
        for i in range(nblk):
            o = (blk0 + i) * 2
            bits[i] = (np.uint32(u8[o]) << np.uint32(16)) | (np.uint32(u8[o + 1]) << np.uint32(24))
    elif ggml_type == F16:  # F16: little-endian halves, converted by bit placement
        f16_row_to_f32(u8[blk0 * 2:(blk0 + nblk) * 2].view(np.uint16), y[yo:yo + nblk])
    else:
        # dispatch once, then a tight loop over blocks (a per-block dispatch was 2x slower)
        n16 = (block_size >> 5) * 16 if block_size == 32 else block_size >> 4  # 16, opaque to LLVM
        o0 = blk0 * block_bytes
        if ggml_type == Q4_0:
            for b in range(nblk):
                deq_q4_0(u8, lut, o0 + b * block_bytes, y, yo + b * block_size, n16)
        elif ggml_type == Q4_1:
            for b in range(nblk):
                deq_q4_1(u8, lut, o0 + b * block_bytes, y, yo + b * block_size, n16)
        elif ggml_type == Q5_0:
            for b in range(nblk):
                deq_q5_0(u8, lut, o0 + b * block_bytes, y, yo + b * block_size, n16)
        elif ggml_type == Q5_1:
            for b in range(nblk):
                deq_q5_1(u8, lut, o0 + b * block_bytes, y, yo + b * block_size, n16)
        elif ggml_type == Q8_0:
            for b in range(nblk):
                deq_q8_0(u8, lut, o0 + b * block_bytes, y, yo + b * block_size, n16)
        elif ggml_type == Q2_K:
            for b in range(nblk):
                deq_q2_k(u8, lut, o0 + b * block_bytes, y, yo + b * block_size, n16)
        elif ggml_type == Q3_K:
            for b in range(nblk):
                deq_q3_k(u8, lut, o0 + b * block_bytes, y, yo + b * block_size, n16)
        elif ggml_type == Q4_K:
            for b in range(nblk):
                deq_q4_k(u8, lut, o0 + b * block_bytes, y, yo + b * block_size, n16)
        elif ggml_type == Q5_K:
            for b in range(nblk):
                deq_q5_k(u8, lut, o0 + b * block_bytes, y, yo + b * block_size, n16)
        elif ggml_type == Q6_K:
            for b in range(nblk):
                deq_q6_k(u8, lut, o0 + b * block_bytes, y, yo + b * block_size, n16)


@njit(cache=True, parallel=True)
def deq_rows_parallel(ggml_type, u8, lut, r0, r1, blocks_per_row, block_size, block_bytes, out):
    # rows [r0, r1) of W (m, k) -> out (r1 - r0, k) f32; parallel over rows (prefill tiles)
    for r in prange(r1 - r0):
        deq_range(ggml_type, u8, lut, (r0 + r) * blocks_per_row, blocks_per_row, block_size,
                  block_bytes, out[r], 0)


def as_bytes(data: np.ndarray) -> np.ndarray:
    """uint8 1-D read-only view of `data` (every kernel sees one array type -> one compilation)."""
    u8 = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if u8.flags.writeable:
        u8 = u8.view()
        u8.flags.writeable = False
    return u8


def dequantize(data: np.ndarray, ggml_type: int, n_elements: int) -> np.ndarray:
    """Raw block bytes of `ggml_type` -> f32 (n_elements,). ValueError if sizes disagree."""
    block_size, block_bytes = block_layout(ggml_type)
    if n_elements % block_size:
        raise ValueError(f"{type_name(ggml_type)}: n_elements {n_elements} is not a multiple of {block_size}")
    u8 = as_bytes(data)
    nblk = n_elements // block_size
    if u8.size != nblk * block_bytes:
        raise ValueError(f"{type_name(ggml_type)}: expected {nblk * block_bytes} bytes for "
                         f"{n_elements} elements, got {u8.size}")
    y = np.empty(n_elements, np.float32)
    deq_range(int(ggml_type), u8, f16_table(), 0, nblk, block_size, block_bytes, y, 0)
    return y
