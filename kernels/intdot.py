"""8-bit activations and integer block dot products, as ggml computes Q8_0 matmuls on the CPU.

Owns:
- `quantize_q8_0(xf, n, k, xq, xd)`: each 32-value block of x becomes int8 values (stored as
  int16, the width the dot wants) and one scale, with ggml's rule: d = max|x| / 127, rounded to
  f16 as ggml stores it; q = round-half-even(x * 127 / max|x|).
- `q8_0_round_trip(x)`, `q8_k_round_trip(x)`: x rounded and back, for the dequantize + BLAS
  prefill path, so a prompt sees the same activations on either path.
- `quantize_q8_k(xf, n, k, xq, xd, xbs)`: ggml's Q8_K (256-value blocks, f32 scale), the
  activations of the k-quant kernels, plus int sums of each 32 values.
- integer dot intrinsics over raw weight bytes: `dot32_i8_i16` (32 int8, Q8_0), `dot64_u4_i16`
  (64 nibbles, a Q4_K group), `dot32_q6_i16` (32 6-bit values, half of a Q6_K quarter).

Why: the weight x activation products of a block are then exact integers, summed in any order
to the same value, so every kernel variant (one x row per pass or several) gives a row the same
bits, which keeps batched decode batch invariant; and on AVX2 the dot is `vpmaddwd`, 16
multiply-adds per instruction. Measured on a Q8_0 (4864, 896) matvec on 2 cores: 33-36 GMAC/s
for 4-8 x rows against 24-25 GMAC/s with f32 activations (n = 1 stays memory-bound, ~20 GB/s).
LLVM does not find `vpmaddwd` by itself from numba code (it emits `vpmulld`), hence the
intrinsic. Numbers also move toward llama.cpp's: it rounds activations the same way.
"""
from __future__ import annotations

import llvmlite.binding as llvm_binding
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# Chosen once per process from the CPU numba compiles for; numba's cache is keyed by CPU too.
HAS_AVX2 = bool(llvm_binding.get_host_cpu_features().get("avx2", False))


def _splat(builder, value, vector_type):
    # a vector with `value` (an integer of the element type) in every lane
    undef = ir.Constant(vector_type, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), None))


def _half(builder, vector, which):
    # lanes [16 * which, 16 * which + 16) of a 32-lane vector
    mask = ir.Constant(ir.VectorType(ir.IntType(32), 16), [16 * which + i for i in range(16)])
    return builder.shuffle_vector(vector, vector, mask)


def _dot16(builder, a16, x16):
    # int32 sum of 16 products of two <16 x i16> vectors (exact: |a*x| < 2^15 * 2^15)
    i32 = ir.IntType(32)
    if HAS_AVX2:
        v16i16, v8i32 = ir.VectorType(ir.IntType(16), 16), ir.VectorType(i32, 8)
        madd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8i32, [v16i16, v16i16]),
                                              "llvm.x86.avx2.pmadd.wd")
        pairs = builder.call(madd, [a16, x16])  # vpmaddwd: 8 lanes of a[2i]*x[2i] + a[2i+1]*x[2i+1]
    else:  # portable: LLVM lowers this for whatever the CPU has
        v16i32 = ir.VectorType(i32, 16)
        pairs = builder.mul(builder.sext(a16, v16i32), builder.sext(x16, v16i32))
    reduce_add = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(i32, [pairs.type]), f"llvm.vector.reduce.add.v{pairs.type.count}i32")
    return builder.call(reduce_add, [pairs])


def _load(builder, pointer, offset, vector_type, align):
    at = builder.gep(pointer, [offset]) if offset is not None else pointer
    return builder.load(builder.bitcast(at, vector_type.as_pointer()), align=align)


def _pointer(context, builder, array_type, array, offset):
    return builder.gep(context.make_array(array_type)(context, builder, array).data, [offset])


I8, I16, I32, I64 = (ir.IntType(b) for b in (8, 16, 32, 64))
V32I8, V16I16, V32I16 = ir.VectorType(I8, 32), ir.VectorType(I16, 16), ir.VectorType(I16, 32)


def _x_halves(builder, x_ptr):
    # the 32 int16 activations at x_ptr as two <16 x i16>
    return (_load(builder, x_ptr, None, V16I16, 2),
            _load(builder, x_ptr, ir.Constant(I64, 16), V16I16, 2))


@intrinsic
def dot32_i8_i16(typingctx, w, w_offset, xq, x_offset):
    """int32 sum_{i<32} int8(w[w_offset + i]) * xq[x_offset + i]; w uint8 bytes, xq int16."""
    if not (isinstance(w, types.Array) and isinstance(xq, types.Array)):
        return None
    sig = types.int32(w, w_offset, xq, x_offset)

    def codegen(context, builder, signature, args):
        w_ptr = _pointer(context, builder, signature.args[0], args[0], args[1])
        x_lo, x_hi = _x_halves(builder, _pointer(context, builder, signature.args[2], args[2], args[3]))
        weights = builder.sext(_load(builder, w_ptr, None, V32I8, 1), V32I16)
        return builder.add(_dot16(builder, _half(builder, weights, 0), x_lo),
                           _dot16(builder, _half(builder, weights, 1), x_hi))

    return sig, codegen


@intrinsic
def dot_row_q8_0(typingctx, w, w_offset, n_blocks, lut, xq, xd, x_block):
    """f32 dot of one Q8_0 weight row (n_blocks blocks from byte w_offset of w) with one x row
    quantized to Q8_0 (values xq[32 * x_block:], scales xd[x_block:]; kernels read the f16
    block scales of w through lut).

    Each block's 32 products are an exact vpmaddwd sum (8 lanes of pairs); they are scaled by
    d_w * d_x and added into one of two 8-lane f32 accumulators (even / odd blocks; a last odd
    block goes to the first), summed lane by lane in a fixed order at the end. Keeping the running sums in vectors is what makes this fast: a horizontal sum
    per block costs more than the block's multiply-adds. Fixed order, no fastmath: the same
    inputs give the same bits in every caller."""
    if not all(isinstance(a, types.Array) for a in (w, lut, xq, xd)):
        return None
    sig = types.float32(w, w_offset, n_blocks, lut, xq, xd, x_block)

    def codegen(context, builder, signature, args):
        w_arg, w_offset, n_blocks, lut_arg, xq_arg, xd_arg, x_block = args
        f32 = ir.FloatType()
        v8f32, v8i32 = ir.VectorType(f32, 8), ir.VectorType(I32, 8)
        w_row = _pointer(context, builder, signature.args[0], w_arg, w_offset)
        lut = context.make_array(signature.args[3])(context, builder, lut_arg).data
        x_row = _pointer(context, builder, signature.args[4], xq_arg, builder.mul(x_block, ir.Constant(x_block.type, 32)))
        d_row = _pointer(context, builder, signature.args[5], xd_arg, x_block)
        accumulators = [cgutils.alloca_once_value(builder, ir.Constant(v8f32, [0.0] * 8)) for _ in range(2)]
        n_blocks = builder.sext(n_blocks, I64) if n_blocks.type.width < 64 else n_blocks

        def add_block(b, accumulator):
            # accumulator += d_w * d_x * (8 lanes of pairwise products of block b)
            block = builder.gep(w_row, [builder.mul(b, ir.Constant(I64, 34))])
            d_bits = builder.load(builder.bitcast(block, I16.as_pointer()), align=1)
            d_w = builder.load(builder.gep(lut, [builder.zext(d_bits, I64)]))
            scale = builder.fmul(d_w, builder.load(builder.gep(d_row, [b])))
            weights = builder.sext(_load(builder, block, ir.Constant(I64, 2), V32I8, 1), V32I16)
            x_lo, x_hi = _x_halves(builder, builder.gep(x_row, [builder.mul(b, ir.Constant(I64, 32))]))
            pairs = builder.add(_madd16(builder, _half(builder, weights, 0), x_lo),
                                _madd16(builder, _half(builder, weights, 1), x_hi))
            term = builder.fmul(builder.sitofp(pairs, v8f32), _splat_float(builder, scale, v8f32))
            builder.store(builder.fadd(builder.load(accumulator), term), accumulator)

        # even blocks into one accumulator and odd ones into the other: two independent add chains
        with cgutils.for_range(builder, builder.udiv(n_blocks, ir.Constant(I64, 2))) as loop:
            first = builder.mul(loop.index, ir.Constant(I64, 2))
            add_block(first, accumulators[0])
            add_block(builder.add(first, ir.Constant(I64, 1)), accumulators[1])
        is_odd = builder.trunc(n_blocks, ir.IntType(1))
        with builder.if_then(is_odd):
            add_block(builder.sub(n_blocks, ir.Constant(I64, 1)), accumulators[0])
        total = builder.fadd(builder.load(accumulators[0]), builder.load(accumulators[1]))
        result = builder.extract_element(total, ir.Constant(I32, 0))
        for lane in range(1, 8):
            result = builder.fadd(result, builder.extract_element(total, ir.Constant(I32, lane)))
        return result

    return sig, codegen


def _splat_float(builder, value, vector_type):
    undef = ir.Constant(vector_type, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(I32, vector_type.count), None))


def _madd16(builder, a16, x16):
    # <8 x i32> pairwise products a[2i]*x[2i] + a[2i+1]*x[2i+1] of two <16 x i16>
    if HAS_AVX2:
        v8i32 = ir.VectorType(I32, 8)
        madd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8i32, [V16I16, V16I16]),
                                              "llvm.x86.avx2.pmadd.wd")
        return builder.call(madd, [a16, x16])
    v16i32 = ir.VectorType(I32, 16)
    products = builder.mul(builder.sext(a16, v16i32), builder.sext(x16, v16i32))
    even = builder.shuffle_vector(products, products, ir.Constant(ir.VectorType(I32, 8), list(range(0, 16, 2))))
    odd = builder.shuffle_vector(products, products, ir.Constant(ir.VectorType(I32, 8), list(range(1, 16, 2))))
    return builder.add(even, odd)


@intrinsic
def dot64_u4_i16(typingctx, w, w_offset, xq, x_offset):
    """(lo, hi) int32: the 32 bytes at w[w_offset] hold 64 4-bit values, element i in the low
    nibble and element 32 + i in the high nibble of byte i (a Q4_K group);
    lo = sum_{i<32} (w_i & 15) * xq[x_offset + i], hi = sum_{i<32} (w_i >> 4) * xq[x_offset + 32 + i]."""
    if not (isinstance(w, types.Array) and isinstance(xq, types.Array)):
        return None
    sig = types.UniTuple(types.int32, 2)(w, w_offset, xq, x_offset)

    def codegen(context, builder, signature, args):
        w_ptr = _pointer(context, builder, signature.args[0], args[0], args[1])
        x_ptr = _pointer(context, builder, signature.args[2], args[2], args[3])
        packed = _load(builder, w_ptr, None, V32I8, 1)
        sums = []
        for shift, x_offset in ((0, 0), (4, 32)):
            nibbles = builder.and_(builder.lshr(packed, _splat(builder, ir.Constant(I8, shift), V32I8)),
                                   _splat(builder, ir.Constant(I8, 15), V32I8))
            values = builder.zext(nibbles, V32I16)
            x_lo, x_hi = _x_halves(builder, builder.gep(x_ptr, [ir.Constant(I64, x_offset)]))
            sums.append(builder.add(_dot16(builder, _half(builder, values, 0), x_lo),
                                    _dot16(builder, _half(builder, values, 1), x_hi)))
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


@intrinsic
def dot32_q6_i16(typingctx, w, ql_offset, qh_offset, nibble_shift, high_shift, xq, x_offset):
    """(first, second) int32 for 32 Q6_K values q_i = ((ql_i >> nibble_shift) & 15) |
    (((qh_i >> high_shift) & 3) << 4), minus 32, with ql_i = w[ql_offset + i], qh_i = w[qh_offset + i]:
    first = sum_{i<16} q_i * xq[x_offset + i], second = the same over i in [16, 32) (each 16 has
    its own scale in Q6_K)."""
    if not (isinstance(w, types.Array) and isinstance(xq, types.Array)):
        return None
    sig = types.UniTuple(types.int32, 2)(w, ql_offset, qh_offset, nibble_shift, high_shift, xq, x_offset)

    def codegen(context, builder, signature, args):
        w_type = signature.args[0]
        ql = _load(builder, _pointer(context, builder, w_type, args[0], args[1]), None, V32I8, 1)
        qh = _load(builder, _pointer(context, builder, w_type, args[0], args[2]), None, V32I8, 1)
        nibble_shift = builder.trunc(args[3], I8) if args[3].type.width > 8 else args[3]
        high_shift = builder.trunc(args[4], I8) if args[4].type.width > 8 else args[4]
        low = builder.and_(builder.lshr(ql, _splat(builder, nibble_shift, V32I8)), _splat(builder, ir.Constant(I8, 15), V32I8))
        high = builder.and_(builder.lshr(qh, _splat(builder, high_shift, V32I8)), _splat(builder, ir.Constant(I8, 3), V32I8))
        q = builder.sub(builder.or_(low, builder.shl(high, _splat(builder, ir.Constant(I8, 4), V32I8))),
                        _splat(builder, ir.Constant(I8, 32), V32I8))  # in [-32, 31]
        values = builder.sext(q, V32I16)
        x_lo, x_hi = _x_halves(builder, _pointer(context, builder, signature.args[5], args[5], args[6]))
        sums = [_dot16(builder, _half(builder, values, 0), x_lo), _dot16(builder, _half(builder, values, 1), x_hi)]
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


@njit(cache=True, inline="always")
def _round_to_f16(v):
    # v (finite, >= 0) rounded to the nearest float16 value (ties to even), returned as f32
    if v < np.float32(6.103515625e-05):  # below f16's smallest normal: a multiple of 2^-24
        return np.float32(np.rint(np.float64(v) * 16777216.0) / 16777216.0)
    if v >= np.float32(65504.0):
        return np.float32(np.inf) if v >= np.float32(65520.0) else np.float32(65504.0)
    bits = np.empty(1, np.float32)
    bits[0] = v
    u = bits.view(np.uint32)
    u[0] = (u[0] + np.uint32(0xFFF) + ((u[0] >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return bits[0]


@njit(cache=True)
def quantize_q8_0(xf, n, k, xq, xd):
    # x (n, k) f32 flat -> xq (n, k) int16 flat in [-127, 127], xd (n, k/32) f32 flat block scales.
    # A block holding inf/nan gets scale nan, so the dot products with it stay nan as with f32.
    nb = k // 32
    for j in range(n):
        for b in range(nb):
            o = j * k + b * 32
            amax = np.float32(0.0)
            finite = True
            for i in range(32):
                v = abs(xf[o + i])
                if not v <= np.float32(3.0e38):  # inf or nan
                    finite = False
                elif v > amax:
                    amax = v
            if not finite:
                xd[j * nb + b] = np.float32(np.nan)
                for i in range(32):
                    xq[o + i] = 0
                continue
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            for i in range(32):
                xq[o + i] = np.int16(np.rint(xf[o + i] * inv))
            xd[j * nb + b] = _round_to_f16(d)


def q8_0_round_trip(x: np.ndarray) -> np.ndarray:
    """x (n, k) f32 -> a new (n, k) f32 array: x rounded to Q8_0 and back (values * scales),
    the activations an integer Q8_0 dot product sees; for the BLAS prefill path."""
    n, k = x.shape
    xq = np.empty(n * k, np.int16)
    xd = np.empty(n * (k // 32), np.float32)
    quantize_q8_0(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), n, k, xq, xd)
    return (xq.reshape(n, k // 32, 32) * xd.reshape(n, k // 32, 1)).reshape(n, k)


@njit(cache=True)
def quantize_q8_k(xf, n, k, xq, xd, xbs):
    # x (n, k) f32 flat -> ggml's Q8_K: xq (n, k) int16 flat, xd (n, k/256) f32 scales and xbs
    # (n, k/32) int32 sums of each 32 values (Q4_K's minimums). Per 256 values: max = the value
    # of largest |x| (first on ties); q = min(127, round-half-even(x * -127 / max)); d = 1 / (-127 / max).
    nb = k // 256
    for j in range(n):
        for b in range(nb):
            o = j * k + b * 256
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            finite = True
            for i in range(256):
                v = xf[o + i]
                if not abs(v) <= np.float32(3.0e38):
                    finite = False
                elif abs(v) > amax:
                    amax = abs(v)
                    vmax = v
            if not finite or amax == 0:
                xd[j * nb + b] = np.float32(np.nan) if not finite else np.float32(0.0)
                for i in range(256):
                    xq[o + i] = 0
            else:
                iscale = np.float32(-127.0) / vmax
                for i in range(256):
                    xq[o + i] = np.int16(min(np.float32(127.0), np.rint(iscale * xf[o + i])))
                xd[j * nb + b] = np.float32(1.0) / iscale
            for s in range(8):
                total = np.int32(0)
                for i in range(32):
                    total += np.int32(xq[o + s * 32 + i])
                xbs[j * (k // 32) + b * 8 + s] = total


def q8_k_round_trip(x: np.ndarray) -> np.ndarray:
    """x (n, k) f32 -> a new (n, k) f32 array: x rounded to Q8_K and back (the k-quant kernels'
    activations), for the BLAS prefill path."""
    n, k = x.shape
    xq = np.empty(n * k, np.int16)
    xd = np.empty(n * (k // 256), np.float32)
    quantize_q8_k(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), n, k, xq, xd, np.empty(n * (k // 32), np.int32))
    return (xq.reshape(n, k // 256, 256) * xd.reshape(n, k // 256, 1)).reshape(n, k)
